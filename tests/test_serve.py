"""`transferkit serve`: the real server on a free 127.0.0.1 port, checked against `transferkit predict`,
fed every kind of bad input, and its dynamic batcher on its own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from serve_client import ServerProcess, multipart, post_files, request  # noqa: E402
from tiny_run import export_tiny  # noqa: E402

from transferkit.serve.batching import DynamicBatcher, InferenceFailed  # noqa: E402

# Small limits so that each one is cheap to cross.
LIMITS = ["--max-files", "12", "--max-image-bytes", "300000", "--max-request-bytes", "2000000",
          "--max-image-pixels", "1000000", "--max-batch", "8", "--max-wait-ms", "20"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    proc = ServerProcess.transferkit(exported[2], *LIMITS, log_dir=tmp_path_factory.mktemp("logs"))
    yield proc
    assert proc.stop(), proc.log.read_text()  # SIGTERM: a clean shutdown
    assert "Traceback" not in proc.log.read_text()


def val_images(data: Path) -> list[Path]:
    return sorted((data / "val").rglob("*.png"))


def cli_rows(model, paths, *options) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "transferkit", "predict", str(model), *map(str, paths),
                           "--format", "json", *options], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_same_rows(http_rows: list[dict], rows: list[dict]) -> None:
    """Same keys, labels, top-k order and probabilities; the path is the uploaded file's name."""
    assert len(http_rows) == len(rows)
    for got, want in zip(http_rows, rows):
        assert set(got) == set(want)
        assert got["path"] == Path(want["path"]).name
        assert got["label"] == want["label"] and got["error"] is None
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert [t["probability"] for t in got["top_k"]] == pytest.approx([t["probability"] for t in want["top_k"]],
                                                                          abs=1e-5)
        for key in set(want) - {"path", "label", "error", "probability", "top_k"}:  # e.g. a novelty score
            assert got[key] == (pytest.approx(want[key], abs=1e-4) if isinstance(want[key], float) else want[key])


def test_predictions_over_http_equal_transferkit_predict(server, exported):
    data, _, model = exported
    paths = val_images(data)
    status, body = post_files(server.url, [(p.name, p.read_bytes()) for p in paths], "?top_k=2")
    assert status == 200, body
    assert_same_rows(body["predictions"], cli_rows(model, paths, "--engine", "onnx", "--top-k", "2"))
    assert {r["label"] for r in body["predictions"]} == {"ants", "bees"}  # not one label for everything


def test_json_base64_gives_the_same_rows_as_multipart(server, exported):
    paths = val_images(exported[0])[:3]
    images = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    status, body = request(server.url + "predict", json.dumps({"images": images}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, body
    assert body["predictions"] == post_files(server.url, [(p.name, p.read_bytes()) for p in paths])[1]["predictions"]


def test_a_raw_image_body_gives_the_same_row_as_multipart(server, exported):
    """`curl --data-binary @cat.jpg -H 'Content-Type: image/png'`: one image, named by ?name= (or image-0)."""
    path = val_images(exported[0])[0]
    want = post_files(server.url, [(path.name, path.read_bytes())])[1]["predictions"]
    for content_type in ("image/png", "application/octet-stream"):
        status, body = request(server.url + f"predict?name={path.name}", path.read_bytes(),
                               {"Content-Type": content_type})
        assert status == 200, body
        assert body["predictions"] == want
    status, body = request(server.url + "predict", path.read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and body["predictions"][0]["path"] == "image-0"


def test_concurrent_requests_each_get_their_own_image_back(server, exported):
    """Requests batched together are answered with their own rows (nothing shifted between them)."""
    paths = val_images(exported[0])
    alone = {p.name: post_files(server.url, [(p.name, p.read_bytes())])[1]["predictions"][0] for p in paths}
    with ThreadPoolExecutor(len(paths)) as pool:
        together = list(pool.map(lambda p: post_files(server.url, [(p.name, p.read_bytes())]), paths * 2))
    for p, (status, body) in zip(paths * 2, together):
        assert status == 200
        row = body["predictions"][0]
        assert row["path"] == p.name and row["label"] == alone[p.name]["label"]
        assert row["probability"] == pytest.approx(alone[p.name]["probability"], abs=1e-5)
    status, health = request(server.url + "health")
    assert status == 200 and health["images"] >= 3 * len(paths) and health["largest_batch"] <= 8
    assert health["inference_s"] > 0


def test_an_unreadable_image_gets_its_error_row_in_input_order(server, exported):
    good = val_images(exported[0])[:2]
    files = [(good[0].name, good[0].read_bytes()), ("notes.png", b"not an image"), (good[1].name, good[1].read_bytes())]
    status, body = post_files(server.url, files)
    assert status == 200
    rows = body["predictions"]
    assert [r["path"] for r in rows] == [good[0].name, "notes.png", good[1].name]
    assert rows[1]["label"] is None and "not an image" in rows[1]["error"]
    assert rows[0]["label"] and rows[2]["label"]


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests(good: bytes) -> dict:
    """name -> (body, headers, query, expected status, words the reason must contain)."""
    files = lambda *items: multipart(list(items))  # noqa: E731
    json_body = lambda obj: (json.dumps(obj).encode(), {"Content-Type": "application/json"})  # noqa: E731
    return {
        "not an image": (*files(("a.png", b"hello, not pixels")), "", 422, ["a.png", "not an image"]),
        "truncated": (*files(("t.png", good[: len(good) // 2])), "", 422, ["t.png", "truncated"]),
        "empty": (*files(("e.png", b"")), "", 422, ["e.png", "empty"]),
        "too many bytes": (*files(("big.png", good + b"\0" * 300_001)), "", 413, ["big.png", "--max-image-bytes"]),
        "too many pixels": (*files(("bomb.png", _png((2000, 2000), "L"))), "", 413, ["bomb.png", "2000×2000"]),
        "too many files": (*files(*[(f"{i}.png", good) for i in range(13)]), "", 400, ["Too many files"]),
        "wrong content type": (b"abc", {"Content-Type": "text/plain"}, "", 415, ["Content-Type", "text/plain"]),
        "no content type": (b"abc", {}, "", 415, ["Content-Type"]),
        "malformed JSON": (b'{"images": [', {"Content-Type": "application/json"}, "", 400, ["malformed JSON"]),
        "JSON not UTF-8": (b"\xff\xfe{", {"Content-Type": "application/json"}, "", 400, ["malformed JSON"]),
        "JSON of the wrong shape": (*json_body({"image": "abc"}), "", 400, ['{"images"']),
        "JSON item without data": (*json_body({"images": [{"name": "a"}]}), "", 400, ["images[0]"]),
        "JSON bad base64": (*json_body({"images": [{"data": "%%%"}]}), "", 400, ["images[0].data", "base64"]),
        "JSON too many images": (*json_body({"images": [{"data": ""}] * 13}), "", 400, ["too many images", "13"]),
        "no images": (*files(), "", 400, ["no images"]),
        "empty raw body": (b"", {"Content-Type": "image/png"}, "", 400, ["no images"]),
        "raw body not an image": (b"hello", {"Content-Type": "image/jpeg"}, "?name=a.jpg", 422,
                                  ["a.jpg", "not an image"]),
        "raw body too large": (good + b"\0" * 300_001, {"Content-Type": "image/png"}, "", 413, ["--max-image-bytes"]),
        "a newline in the name": (good + b"\0" * 300_001, {"Content-Type": "image/png"}, "?name=a%0AINFO:%20b.png", 413,
                                  ["a\ufffdINFO: b.png"]),  # was two lines, the second a forged log line
        "malformed multipart": (b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=y"}, "", 400,
                                ["multipart"]),
        "bad top_k": (*files(("a.png", good)), "?top_k=zero", 400, ["top_k"]),
        "non-ASCII digit top_k": (*files(("a.png", good)), "?top_k=%C2%B2", 400, ["top_k"]),  # was a 500
        "JSON nested too deeply": (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, "", 400,
                                   ["malformed JSON", "nested"]),  # was a 500 (RecursionError)
    }


BAD = list(_bad_requests(b""))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_4xx_with_one_line_and_the_server_keeps_answering(server, exported, case):
    good = val_images(exported[0])[0].read_bytes()
    body, headers, query, expected, words = _bad_requests(good)[case]
    status, answer = request(server.url + "predict" + query, body, headers)
    assert status == expected, answer
    reason = answer["error"]
    assert reason and "\n" not in reason and "Traceback" not in reason
    for word in words:
        assert word in reason, (word, reason)
    assert post_files(server.url, [("ok.png", good)])[0] == 200  # still answering, and correctly


def _connection(server):
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60)


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(server):
    conn = _connection(server)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "2000001")  # over the 2 MB --max-request-bytes
    conn.endheaders()  # and not a byte of the body: the answer must not wait for it
    response = conn.getresponse()
    assert response.status == 413 and "--max-request-bytes" in json.loads(response.read())["error"]
    conn.close()
    assert request(server.url + "health")[0] == 200


def test_a_chunked_body_is_cut_off_at_the_limit_without_content_length(server):
    """No Content-Length to trust: the server counts the bytes as they arrive and answers 413 at the limit.
    It then closes the connection with the rest unread, so a client still sending may see the reset
    before the answer (as with any server that does not drain); the server's log shows the 413 either way."""
    import http.client

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'
        for _ in range(40):  # 2.6 MB, over the 2 MB --max-request-bytes
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    refused = "refused POST /predict: 413"
    before = server.log.read_text().count(refused)
    conn = _connection(server)
    try:
        conn.request("POST", "/predict", body=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and "--max-request-bytes" in json.loads(response.read())["error"]
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        pass
    finally:
        conn.close()
    assert request(server.url + "health")[0] == 200
    assert server.log.read_text().count(refused) == before + 1  # logged when the 413 was sent


def _wait_for_line(server, line: str, count: int, timeout: float = 10) -> str:
    import time

    deadline = time.monotonic() + timeout
    while server.log.read_text().count(line) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.log.read_text()


@pytest.mark.parametrize("content_type, start", [
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n'),
    ("application/json", b'{"images": ['),
])
def test_a_client_that_goes_away_mid_upload_is_one_log_line(server, content_type, start):
    """Starlette's ClientDisconnect was a 500: a traceback (twice) in the log for a client that closed early."""
    import socket
    from urllib.parse import urlsplit

    gone = "client went away during POST /predict"
    before, failed = server.log.read_text().count(gone), server.log.read_text().count("POST /predict failed")
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     "Content-Length: 100000\r\n\r\n".encode() + start)  # and then no more
    log = _wait_for_line(server, gone, before + 1)
    assert log.count(gone) == before + 1 and log.count("POST /predict failed") == failed
    assert request(server.url + "health")[0] == 200


def test_a_json_name_with_a_lone_surrogate_or_a_control_character_is_answered(server, exported):
    """JSON allows "\\ud800" (no UTF-8 for it); echoing it as the row's path was a 500 (UnicodeEncodeError).
    A control character ("\\n", ESC) is no part of a name either: each becomes U+FFFD."""
    good = base64.b64encode(val_images(exported[0])[0].read_bytes())
    body = (b'{"images": [{"name": "a\\ud800.png", "data": "' + good + b'"}, {"name": "\\udfff", "data": "AAAA"}, '
            b'{"name": "b\\n\\u001b.png", "data": "' + good + b'"}]}')
    status, answer = request(server.url + "predict", body, {"Content-Type": "application/json"})
    assert status == 200, answer
    assert [row["path"] for row in answer["predictions"]] == ["a\ufffd.png", "\ufffd", "b\ufffd\ufffd.png"]
    assert answer["predictions"][0]["label"] and "\ufffd" in answer["predictions"][1]["error"]


@pytest.mark.parametrize("top_k, shown", [("9" * 5000, 2), ("0" * 5000 + "1", 1), ("12345678901", 2)])
def test_a_top_k_of_any_length_is_answered(server, exported, top_k, shown):
    """More than 4300 digits was a 500 (int() refuses them); past the classes, top_k means all of them."""
    good = val_images(exported[0])[0].read_bytes()
    status, answer = request(server.url + f"predict?top_k={top_k}", good, {"Content-Type": "image/png"})
    assert status == 200, answer
    assert len(answer["predictions"][0]["top_k"]) == shown  # of the 2 classes


def test_image_headers_are_read_off_the_event_loop(monkeypatch):
    """Pillow walks some headers byte by byte (a JPEG of 10 MB of empty markers took 4.5 s to open): read on
    the event loop, for the pixel limit, they stalled every other request, GET /health included."""
    import time

    from starlette.requests import Request

    from transferkit.serve import ServeOptions, uploads

    monkeypatch.setattr(uploads, "header_size", lambda data: time.sleep(0.5) or (1, 1))  # a slow header

    async def scenario():
        messages = [{"type": "http.request", "body": b"x", "more_body": False}]

        async def receive():
            return messages.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
                 "headers": [(b"content-type", b"image/png")]}
        gaps = []

        async def ticker():
            while True:
                start = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - start)

        tick = asyncio.create_task(ticker())
        got = await uploads.read_uploads(Request(scope, receive), ServeOptions())
        tick.cancel()
        return got, max(gaps)

    got, longest_stall = asyncio.run(scenario())
    assert got == [uploads.Upload("image-0", b"x")]
    assert longest_stall < 0.3  # the loop kept running while the header was read


@pytest.mark.slow
def test_sigterm_is_not_held_up_by_a_client_that_stalls_its_upload(exported, tmp_path):
    """A client that sent half its body and waits kept the server from exiting on SIGTERM until the client
    itself gave up (uvicorn waits for every connection): the process manager's SIGKILL ended it instead."""
    import socket
    import time
    from urllib.parse import urlsplit

    from transferkit.serve import GRACEFUL_SHUTDOWN_S

    proc = ServerProcess.transferkit(exported[2], log_dir=tmp_path)
    url = urlsplit(proc.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                     + b"\0" * 10)
        assert request(proc.url + "health")[0] == 200  # the stalled request is in flight
        start = time.monotonic()
        assert proc.stop(), proc.log.read_text()  # within stop()'s 30 s, and cleanly
        assert time.monotonic() - start < GRACEFUL_SHUTDOWN_S + 10


@pytest.mark.parametrize("method, path, status", [("GET", "predict", 405), ("GET", "nowhere", 404),
                                                  ("DELETE", "model", 405)])
def test_wrong_routes_are_one_line_json_errors(server, method, path, status):
    code, body = request(server.url + path, method=method)
    assert code == status and "\n" not in body["error"]


def test_health_model_card_and_page(server, exported):
    status, health = request(server.url + "health")
    assert status == 200 and health["status"] == "ok" and health["engine"] == "onnx"
    status, card = request(server.url + "model")
    assert status == 200
    assert card["classes"] == ["ants", "bees"] and card["architecture"] == "efficientnet_lite0"
    assert card["preprocessing"]["input_size"] == 96
    assert card["export"]["top1_agreement"] == 1.0  # from the run's export.json
    metrics = json.loads((exported[1] / "metrics.json").read_text())
    assert card["training"]["best_val_acc"] == metrics["best_val_acc"]
    assert card["limits"]["max_files"] == 12 and card["trained_date"]
    import urllib.request

    page = urllib.request.urlopen(server.url).read().decode()
    assert 'type="file"' in page and "fetch(\"predict" in page
    assert "http://" not in page and "https://" not in page  # nothing from the network


def test_requests_are_not_logged_line_by_line_unless_asked(server, exported, tmp_path):
    """The default server writes no access line per request (its CPU goes to the forward passes);
    `--access-log` brings uvicorn's lines back."""
    status, _ = request(server.url + "health")
    assert status == 200
    assert '"GET /health' not in server.log.read_text()
    logged = ServerProcess.transferkit(exported[2], "--access-log", log_dir=tmp_path)
    try:
        assert request(logged.url + "health")[0] == 200
    finally:
        assert logged.stop()
    assert '"GET /health HTTP/1.1" 200' in logged.log.read_text()


@pytest.mark.slow
def test_torch_engine_serves_a_run_like_predict(exported, tmp_path):
    data, run, _ = exported
    paths = val_images(data)[:4]
    proc = ServerProcess.transferkit(run, "--max-wait-ms", "1", log_dir=tmp_path)
    try:
        status, body = post_files(proc.url, [(p.name, p.read_bytes()) for p in paths])
        _, health = request(proc.url + "health")
    finally:
        assert proc.stop(), proc.log.read_text()
    assert status == 200 and health["engine"] == "torch"
    assert_same_rows(body["predictions"], cli_rows(run, paths))


@pytest.mark.parametrize("options, words", [
    (["--max-batch", "0"], ["--max-batch", "≥ 1"]),
    (["--max-wait-ms", "-1"], ["--max-wait-ms"]),
    (["--port", "70000"], ["--port"]),
    (["--max-image-pixels", "10000000000"], ["--max-image-pixels", "Pillow"]),
    (["--engine", "torch"], ["--engine torch", ".onnx"]),
])
def test_bad_serve_options_are_one_line_errors(exported, capsys, options, words):
    from transferkit import cli

    code = cli.main(["serve", str(exported[2]), *options])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_a_busy_port_is_one_line_error(exported, capsys):
    import socket

    from transferkit import cli

    with socket.create_server(("127.0.0.1", 0)) as busy:
        code = cli.main(["serve", str(exported[2]), "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.splitlines()) == 1, err


def test_a_run_without_an_export_cannot_be_served_by_onnx(tmp_path, capsys):
    from transferkit import cli

    (tmp_path / "run").mkdir()
    assert cli.main(["serve", str(tmp_path / "run"), "--engine", "onnx"]) == 5
    assert "transferkit export" in capsys.readouterr().err


# ---- the batcher alone -------------------------------------------------------------------------


def _echo_batcher(max_batch: int, max_wait_s: float, sizes: list[int]) -> DynamicBatcher:
    def infer(inputs):
        sizes.append(len(inputs))
        return np.array(inputs, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)

    return DynamicBatcher(infer, max_batch=max_batch, max_wait_s=max_wait_s)


def test_batcher_gathers_concurrent_requests_and_answers_each_its_own():
    async def scenario():
        sizes: list[int] = []
        batcher = _echo_batcher(4, 30.0, sizes)  # a long wait: only a full batch may run early ...
        batcher.start()
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit([i]) for i in range(8))), 10)
        await batcher.stop()
        return sizes, results

    sizes, results = asyncio.run(scenario())
    assert sizes == [4, 4]  # ... and two did
    assert [float(r[0, 0]) for r in results] == list(range(8))


def test_batcher_runs_a_partial_batch_after_max_wait_and_survives_an_error():
    async def scenario():
        sizes: list[int] = []
        batcher = _echo_batcher(16, 0.01, sizes)
        batcher.start()
        first = await asyncio.wait_for(asyncio.gather(batcher.submit([1, 2]), batcher.submit([3])), 10)
        batcher.infer = lambda inputs: 1 / 0
        with pytest.raises(InferenceFailed, match="inference failed \\(ZeroDivisionError: division by zero\\)") as err:
            await asyncio.wait_for(batcher.submit([4]), 10)
        assert isinstance(err.value.__cause__, ZeroDivisionError)
        batcher.infer = lambda inputs: np.zeros((len(inputs), 2))
        after = await asyncio.wait_for(batcher.submit([5]), 10)
        await batcher.stop()
        return sizes, first, after, batcher.stats

    sizes, first, after, stats = asyncio.run(scenario())
    assert sizes == [3] and [r[:, 0].tolist() for r in first] == [[1, 2], [3]]
    assert after.shape == (1, 2) and stats["batches"] == 2 and stats["images"] == 4


async def _asgi_post(app, body: bytes) -> tuple[int, dict]:
    """POST /predict to `app` as an ASGI server would (lifespan around it): (status, JSON answer). An error the
    app raises on after answering (Starlette does, for the server to log its traceback) is raised here."""
    lifespan_in: asyncio.Queue = asyncio.Queue()
    lifespan_out: list[dict] = []
    await lifespan_in.put({"type": "lifespan.startup"})

    async def lifespan_send(message):
        lifespan_out.append(message)

    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan_in.get,
                                       lifespan_send))
    while not lifespan_out:
        await asyncio.sleep(0.01)
    body_parts = [{"type": "http.request", "body": body, "more_body": False}]
    answer: list[dict] = []

    async def receive():
        return body_parts.pop(0) if body_parts else {"type": "http.disconnect"}

    async def send(message):
        answer.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    try:
        await app(scope, receive, send)
    finally:
        await lifespan_in.put({"type": "lifespan.shutdown"})
        await lifespan
    status = next(m["status"] for m in answer if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in answer if m["type"] == "http.response.body"))


def test_a_failed_forward_pass_is_one_traceback_in_the_log_and_a_500(exported, caplog):
    """An engine that raised mid-batch left three tracebacks per request in the server log: the batcher's, the
    app's error handler's, and uvicorn's (Starlette raised the handled error on). Now the batcher's alone, one
    line per request, and the answer a one-line 500."""
    from transferkit.serve import ServeOptions
    from transferkit.serve.app import create_app
    from transferkit.serve.model import load_served_model

    served = load_served_model(str(exported[2]))

    def exploding(inputs):
        raise RuntimeError("engine exploded")

    served.classifier.table_of = exploding
    image = next(p for p in exported[0].rglob("*") if p.suffix.lower() in (".png", ".jpg")).read_bytes()
    with caplog.at_level("INFO", logger="transferkit"):
        status, answer = asyncio.run(_asgi_post(create_app(served, ServeOptions()), image))  # nothing raised on
    assert status == 500 and answer == {"error": "internal error (RuntimeError); see the server log"}
    ours = [r for r in caplog.records if r.name.startswith("transferkit.serve")]
    assert sum(r.exc_info is not None for r in ours) == 1
    assert any(r.getMessage() == "POST /predict failed: inference failed (RuntimeError: engine exploded)"
               for r in ours)


def test_two_lanes_run_batches_side_by_side_and_one_lane_never_does():
    """With lanes, a second batch starts while the first is still in its forward pass; one lane (the
    torch engine) must never call the model from two threads at once."""
    import threading
    import time as _time

    def scenario(lanes: int) -> tuple[int, list]:
        inside, most, lock = [0], [0], threading.Lock()

        def infer(inputs):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            _time.sleep(0.2)  # long enough for the other batch to be formed and started
            with lock:
                inside[0] -= 1
            return np.array(inputs, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)

        async def run():
            batcher = DynamicBatcher(infer, max_batch=2, max_wait_s=30.0, lanes=lanes)
            batcher.start()
            results = await asyncio.wait_for(asyncio.gather(*(batcher.submit([i]) for i in range(4))), 10)
            await batcher.stop()
            return results

        results = asyncio.run(run())
        return most[0], [float(r[0, 0]) for r in results]

    assert scenario(2) == (2, [0.0, 1.0, 2.0, 3.0])
    assert scenario(1) == (1, [0.0, 1.0, 2.0, 3.0])


def test_onnx_lanes_fill_the_cores_and_the_torch_engine_keeps_one(monkeypatch, exported):
    from transferkit.errors import UsageError
    from transferkit.serve import model as served_model

    monkeypatch.setattr(served_model.os, "cpu_count", lambda: 8)
    assert served_model.onnx_layout(None, None) == (8, 1)  # one single-threaded lane per core
    assert served_model.onnx_layout(None, 4) == (2, 4)
    assert served_model.onnx_layout(1, None) == (1, 8)  # one lane: the classic all-cores pass
    assert served_model.onnx_layout(3, 2) == (3, 2)  # both given: as given
    with pytest.raises(UsageError, match="--lanes applies to the ONNX engine"):
        served_model.load_served_model(exported[1], engine="torch", lanes=2)


def test_the_torch_engine_chooses_its_frozen_engine_before_the_first_request(exported):
    from transferkit.serve.model import load_served_model

    served = load_served_model(exported[1], engine="torch")
    assert served.classifier.frozen_engine.active is not None  # exported, checked and chosen at load


def test_the_engine_is_told_by_the_model_content_not_its_name(exported, tmp_path):
    from transferkit.serve.model import load_served_model

    renamed = tmp_path / "classifier.bin"
    renamed.write_bytes(exported[2].read_bytes())
    served = load_served_model(renamed)
    assert served.engine == "onnx" and served.card["classes"] == ["ants", "bees"]


def test_a_run_whose_int8_model_was_refused_is_served(exported, tmp_path):
    """`export --quantize int8` records a refused int8 model with "path": null; serving that run ended in a
    TypeError traceback (the model card compared null with the served file's name): by default (the torch engine,
    the checkpoint served) and with --engine onnx (the float model, whose parity its card gives)."""
    import json
    import shutil

    from transferkit.serve.model import load_served_model

    run = tmp_path / "run"
    shutil.copytree(exported[1], run)
    record = run / "export" / "export.json"
    export = json.loads(record.read_text())
    export["path"] = str(run / "export" / "model.onnx")
    export["int8"] = {"top1_agreement": 0.88, "path": None}
    record.write_text(json.dumps(export))
    assert load_served_model(run, engine="onnx").card["export"]["top1_agreement"] == 1.0
    served = load_served_model(run)  # the torch engine: no export check of its checkpoint to show
    assert served.engine == "torch" and served.card["export"] is None
