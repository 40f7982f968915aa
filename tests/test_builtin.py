import hashlib
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from transferkit.data import builtin
from transferkit.data.builtin import download_hymenoptera, materialize_elpv
from transferkit.data.folders import scan_dataset
from transferkit.errors import DataError, UsageError
from torture import encode, random_rgb

ELPV_TOTAL = 2624

# ---------------------------------------------------------------- ELPV (the installed package)


@pytest.fixture(scope="module")
def elpv2(tmp_path_factory):
    out = tmp_path_factory.mktemp("elpv") / "elpv2"
    return out, materialize_elpv(out, classes=2, seed=0)


@pytest.mark.slow
def test_elpv_two_classes(elpv2):
    out, summary = elpv2
    assert summary["created"] is True
    assert summary["class_names"] == ["defective", "functional"]
    train, val = summary["counts"]["train"], summary["counts"]["val"]
    assert sum(train.values()) + sum(val.values()) == ELPV_TOTAL
    assert sum(val.values()) == pytest.approx(0.25 * ELPV_TOTAL, abs=1)
    for split in ("train", "val"):
        for name, n in summary["counts"][split].items():
            assert len(list((out / split / name).glob("*.png"))) == n


@pytest.mark.slow
def test_elpv_split_is_stratified_by_probability_and_cell_type(elpv2):
    out, _ = elpv2
    files = json.loads((out / "elpv.json").read_text(encoding="utf-8"))["files"]
    assert len(files) == ELPV_TOTAL
    strata = Counter((f["level"], f["type"]) for f in files)
    in_val = Counter((f["level"], f["type"]) for f in files if f["split"] == "val")
    assert len(strata) == 8
    for stratum, n in strata.items():
        assert abs(in_val[stratum] - 0.25 * n) <= 1, stratum
    for f in files:
        assert f["class"] == ("defective" if f["probability"] > 0.5 else "functional")


@pytest.mark.slow
def test_elpv_uses_hard_links_on_the_same_filesystem(elpv2):
    out, summary = elpv2
    some = next((out / "train" / "functional").glob("*.png"))
    source = builtin._elpv_data_dir() / "images" / some.name
    if os.stat(out).st_dev == os.stat(source).st_dev:
        assert summary["method"] == "hardlink"
        assert os.path.samefile(some, source)


@pytest.mark.slow
def test_elpv_rerun_is_a_no_op(elpv2):
    out, first = elpv2
    marker = out / "elpv.json"
    before = marker.stat().st_mtime_ns
    again = materialize_elpv(out, classes=2, seed=0)
    assert again["created"] is False
    assert again["counts"] == first["counts"]
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_elpv_other_arguments_into_the_same_folder_are_refused(elpv2):
    out, _ = elpv2
    with pytest.raises(UsageError, match="choose another folder"):
        materialize_elpv(out, classes=2, seed=1)
    with pytest.raises(UsageError, match="choose another folder"):
        materialize_elpv(out, classes=4, seed=0)


@pytest.mark.slow
def test_elpv_folder_scans_cleanly(elpv2):
    out, summary = elpv2
    scan = scan_dataset(out, verify_images=False)
    assert scan.split_source == "folders"
    assert scan.class_counts() == summary["counts"]
    assert set(scan.problems) == {"dataset_manifest"}  # elpv.json itself: recorded, with no warning
    assert scan.summary_lines() == []


@pytest.mark.slow
def test_elpv_four_classes(tmp_path):
    summary = materialize_elpv(tmp_path / "elpv4", classes=4, seed=0)
    assert summary["class_names"] == ["p000", "p033", "p067", "p100"]
    totals = Counter(summary["counts"]["train"]) + Counter(summary["counts"]["val"])
    assert dict(totals) == {"p000": 1508, "p033": 295, "p067": 106, "p100": 715}


def test_elpv_refuses_a_foreign_non_empty_folder_and_bad_class_count(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="choose another folder"):
        materialize_elpv(tmp_path, classes=2)
    with pytest.raises(UsageError):
        materialize_elpv(tmp_path / "new", classes=3)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_elpv_a_folder_grouped_otherwise_is_not_taken_for_the_asked_split(tmp_path):
    """A folder made with --group-correlation 0.995 (images moved across the split) was returned as the default
    split: the grouping was compared only where the rerun asked for one."""
    out = tmp_path / "elpv"
    (out / "train").mkdir(parents=True)
    made = {"format": builtin.ELPV_FORMAT, "classes": 2, "seed": 0}
    (out / "elpv.json").write_text(json.dumps({**made, "group_correlation": 0.995}))
    with pytest.raises(UsageError, match=r"\(it holds ELPV made with classes=2, seed=0, group_correlation=0.995\)"):
        materialize_elpv(out, classes=2, seed=0)
    (out / "elpv.json").write_text(json.dumps({**made, "group_correlation": None}))  # no grouping: the same split
    assert materialize_elpv(out, classes=2, seed=0)["created"] is False
    with pytest.raises(UsageError, match="made with classes=2, seed=0, group_correlation=0.995 \\(it holds"):
        materialize_elpv(out, classes=2, seed=0, group_correlation=0.995)
    (out / "elpv.json").write_text("[1]")  # JSON, but no summary: refused in one line
    with pytest.raises(UsageError, match="choose another folder"):
        materialize_elpv(out, classes=2, seed=0)


def test_elpv_bad_seed_and_group_correlation_are_one_line_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="--seed must be a whole number from 0 to 2\\*\\*32 - 1, not -1"):
        materialize_elpv(tmp_path / "a", seed=-1)  # was scikit-learn's InvalidParameterError
    for bad in (float("nan"), 5.0, -3.0):  # nan made a folder no rerun matched; -3 one without val/
        with pytest.raises(UsageError, match="--group-correlation must be a correlation between -1 and 1"):
            materialize_elpv(tmp_path / "b", group_correlation=bad)

    from transferkit.cli import main

    assert main(["data", "elpv", str(tmp_path / "c"), "--no-group-duplicates", "--group-correlation", "5"]) == 2
    assert ("--group-correlation sets how alike images are grouped, and --no-group-duplicates turns the grouping "
            "off: drop one of them") in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

    def one_group(data_dir, records, splits, threshold):  # what a correlation of 0 does to ELPV
        splits.update({i: "train" for i in splits})
        return {"enabled": True, "correlation": threshold}

    monkeypatch.setattr(builtin, "_group_elpv", one_group)
    with pytest.raises(UsageError, match="val/ gets no defective, functional image; use a value nearer 1"):
        materialize_elpv(tmp_path / "c", group_correlation=0.0)
    assert not any(tmp_path.iterdir())  # nothing written


def test_link_falls_back_to_copy(tmp_path, monkeypatch):
    source = tmp_path / "a.png"
    source.write_bytes(b"png bytes")

    def no_links(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert builtin._link_or_copy(source, tmp_path / "b.png") == "copy"
    assert (tmp_path / "b.png").read_bytes() == b"png bytes"


# ---------------------------------------------------------------- hymenoptera download (local server)


def _zip_bytes(extra_members=()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "val"):
            for c, name in enumerate(("ants", "bees")):
                for i in range(2):
                    zf.writestr(f"hymenoptera_data/{split}/{name}/{i}.jpg", encode(random_rgb(c * 10 + i, (48, 48)), "JPEG"))
        for member, data in extra_members:
            zf.writestr(member, data)
    return buf.getvalue()


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves server.payload; honours "Range: bytes=N-" unless told not to; can drop mid-body."""

    def do_GET(self):
        srv = self.server
        if self.path != "/hymenoptera_data.zip":
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        srv.seen.append(wanted)
        data, start = srv.payload, 0
        if wanted and srv.honour_range:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.stall_after is not None:  # sends some, then nothing: the client's read times out
            self.wfile.write(body[:srv.stall_after])
            self.wfile.flush()
            time.sleep(1.5)
            return
        if srv.drop_after is not None:
            cut, srv.drop_after = srv.drop_after, None
            self.wfile.write(body[:cut])
            return  # HTTP/1.0: returning closes the connection short of Content-Length
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.payload, srv.seen, srv.honour_range, srv.drop_after, srv.stall_after = _zip_bytes(), [], True, None, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/hymenoptera_data.zip"
    yield srv
    srv.shutdown()
    srv.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_extracted(path: Path, out: Path):
    assert path == out / "hymenoptera_data"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            assert len(list((path / split / name).glob("*.jpg"))) == 2
    assert not (out / ".hymenoptera_data.zip.part").exists()


def test_download_verifies_and_extracts(server, tmp_path):
    path = download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
    _assert_extracted(path, tmp_path)
    assert server.seen == [None]
    assert download_hymenoptera(tmp_path, url=server.url, timeout=5) == path  # already there: no request
    assert len(server.seen) == 1


def test_download_resumes_a_partial_file(server, tmp_path):
    half = len(server.payload) // 2
    (tmp_path / ".hymenoptera_data.zip.part").write_bytes(server.payload[:half])
    path = download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
    _assert_extracted(path, tmp_path)
    assert server.seen == [f"bytes={half}-"]


def test_interrupted_download_is_resumed_on_the_next_call(server, tmp_path):
    server.drop_after = len(server.payload) // 3
    with pytest.raises(DataError) as err:
        download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
    assert "run again to resume" in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / ".hymenoptera_data.zip.part").stat().st_size == len(server.payload) // 3
    path = download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
    _assert_extracted(path, tmp_path)
    assert server.seen == [None, f"bytes={len(server.payload) // 3}-"]


def test_a_download_that_times_out_midway_says_a_rerun_resumes_it(server, tmp_path, monkeypatch):
    """A read timeout kept the .part, but the message only said to download by hand."""
    monkeypatch.setattr(builtin, "_CHUNK", 50)  # blocks of 50 bytes: the two before the stall are written
    server.stall_after = 100
    with pytest.raises(DataError, match="timed out after 100 bytes \\(run again to resume\\)"):
        download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=0.5)
    server.stall_after = None
    _assert_extracted(download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5), tmp_path)
    assert server.seen == [None, "bytes=100-"]


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    (tmp_path / ".hymenoptera_data.zip.part").write_bytes(server.payload[:100])
    path = download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
    _assert_extracted(path, tmp_path)


def test_an_archive_without_val_leaves_nothing_behind(server, tmp_path):
    """A zip with train/ but no val/ was unzipped half, then refused; the next call refused the half folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hymenoptera_data/train/ants/0.jpg", encode(random_rgb(1, (48, 48)), "JPEG"))
    server.payload = buf.getvalue()
    for _ in range(2):  # the same answer again: nothing was left to trip over
        with pytest.raises(DataError, match="did not contain hymenoptera_data/train and /val \\(the download was "
                                            "deleted\\); download it by hand"):
            download_hymenoptera(tmp_path, url=server.url, sha256=_sha(server.payload), timeout=5)
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    with pytest.raises(DataError, match="checksum mismatch"):
        download_hymenoptera(tmp_path, url=server.url, sha256="0" * 64, timeout=5)
    assert not (tmp_path / ".hymenoptera_data.zip.part").exists()
    assert not (tmp_path / "hymenoptera_data").exists()


def test_zip_members_escaping_out_are_refused(server, tmp_path):
    server.payload = _zip_bytes([("../evil.txt", b"gotcha")])
    with pytest.raises(DataError, match="outside"):
        download_hymenoptera(tmp_path / "out", url=server.url, sha256=None, timeout=5)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out" / "hymenoptera_data").exists()
    assert not (tmp_path / "out" / ".hymenoptera_data.zip.part").exists()


def test_a_broken_zip_is_deleted(server, tmp_path):
    server.payload = b"PK\x03\x04 this is not really a zip"
    with pytest.raises(DataError, match="not a valid zip"):
        download_hymenoptera(tmp_path, url=server.url, sha256=None, timeout=5)
    assert not (tmp_path / ".hymenoptera_data.zip.part").exists()


def test_http_error_is_one_line(server, tmp_path):
    url = server.url.replace("hymenoptera_data.zip", "missing.zip")
    with pytest.raises(DataError) as err:
        download_hymenoptera(tmp_path, url=url, timeout=5)
    assert str(err.value).startswith(f"could not download {url}: HTTP 404")
    assert "\n" not in str(err.value)


def test_unreachable_server_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hymenoptera_data.zip"
    with pytest.raises(DataError) as err:
        download_hymenoptera(tmp_path, url=url, timeout=5)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {url}: ")
    assert f"download it by hand from {url} and unzip into {tmp_path}" in message
    assert err.value.exit_code == 3
