"""The scan record (data/scan_record.py): a folder scanned before is not checked again where its files are
unchanged, and whatever the record holds, a scan finds what a scan without it finds."""

import os

import pytest

from transferkit.data import folders, scan_record
from transferkit.data.folders import scan_dataset
from torture import encode, make_torture_folder, random_rgb


@pytest.fixture
def recording(tmp_path, monkeypatch):
    """Records on, in a folder of this test's; files written just now count as settled."""
    monkeypatch.setenv(scan_record.CACHE_ENV, str(tmp_path / "scans"))
    monkeypatch.setattr(scan_record, "RACY_S", 0.0)
    return tmp_path / "scans"


@pytest.fixture
def checks(monkeypatch):
    """The paths verify_one is called on (threads: the scan of a small folder runs in this process)."""
    seen = []
    real = folders.checks.verify_one

    def counted(path, no_ext):
        seen.append(path)
        return real(path, no_ext)

    monkeypatch.setattr(folders.checks, "verify_one", counted)
    return seen


def _same(a, b) -> None:
    assert (a.train, a.val, a.classes, a.problems) == (b.train, b.val, b.classes, b.problems)
    assert a.digests == b.digests and a.fingerprints == b.fingerprints


def _tiny(root, n=3):
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            for i in range(n):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                random_rgb(100 * c + 10 * i + (split == "val"), (24, 24)).save(path)
    return root


def test_a_second_scan_checks_nothing_and_finds_the_same(tmp_path, recording, checks):
    info = make_torture_folder(tmp_path / "data")
    first = scan_dataset(info["root"])
    checked_first = len(checks)
    assert checked_first > 0 and len(list(recording.glob("*.npz"))) == 1
    second = scan_dataset(info["root"])
    _same(first, second)
    assert len(checks) == checked_first  # every answer, problems included, came from the record


def test_a_changed_file_is_checked_again(tmp_path, recording, checks):
    root = _tiny(tmp_path / "data")
    first = scan_dataset(root)
    target = root / "train" / "a" / "1.png"
    before = os.stat(target)
    other = random_rgb(999, (24, 24))
    target.write_bytes(encode(other, "PNG"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old time back, as `touch -d` or tar would
    checks.clear()
    second = scan_dataset(root)
    assert checks == [str(target)]
    assert second.digests[str(target)] != first.digests[str(target)]
    assert second.digests[str(target)] == folders.file_sha256(target)


def test_a_file_damaged_since_is_not_taken_from_the_record(tmp_path, recording):
    root = _tiny(tmp_path / "data")
    scan_dataset(root)
    target = root / "train" / "a" / "2.png"
    target.write_bytes(target.read_bytes()[:-200])  # truncated in place
    scan = scan_dataset(root)
    assert [p["path"] for p in scan.problems["corrupt"]] == ["train/a/2.png"]
    assert str(target) not in dict(scan.train)


def test_new_and_deleted_files(tmp_path, recording, checks):
    root = _tiny(tmp_path / "data")
    scan_dataset(root)
    (root / "train" / "b" / "0.png").unlink()
    added = root / "train" / "b" / "new.png"
    random_rgb(77, (24, 24)).save(added)
    checks.clear()
    scan = scan_dataset(root)
    assert checks == [str(added)]
    paths = [p for p, _ in scan.train]
    assert str(added) in paths and str(root / "train" / "b" / "0.png") not in paths
    checks.clear()
    scan_dataset(root)
    assert checks == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_record_is_checked_again_and_rewritten(tmp_path, recording, checks, damage):
    root = _tiny(tmp_path / "data")
    first = scan_dataset(root)
    (record,) = recording.glob("*.npz")
    data = record.read_bytes()
    record.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    checks.clear()
    second = scan_dataset(root)
    _same(first, second)
    assert len(checks) == 12  # all checked again
    checks.clear()
    scan_dataset(root)  # the record was written anew
    assert checks == []


def test_files_modified_just_before_the_scan_are_not_recorded(tmp_path, recording, checks, monkeypatch):
    monkeypatch.setattr(scan_record, "RACY_S", 3600.0)  # every file here is "just modified"
    root = _tiny(tmp_path / "data")
    scan_dataset(root)
    checks.clear()
    scan_dataset(root)
    assert len(checks) == 12


def test_other_scan_settings_do_not_use_the_record(tmp_path, recording, checks, monkeypatch):
    root = _tiny(tmp_path / "data")
    scan_dataset(root)
    monkeypatch.setattr(folders.checks, "SCAN_SHORTER_SIDE", 64)  # the checks would decode JPEGs at another scale
    checks.clear()
    scan_dataset(root)
    assert len(checks) == 12


def test_off_writes_nothing(tmp_path, monkeypatch, checks):
    monkeypatch.setenv(scan_record.CACHE_ENV, "off")
    root = _tiny(tmp_path / "data")
    scan_dataset(root)
    scan_dataset(root)
    assert len(checks) == 24


def test_only_the_most_recent_records_are_kept(tmp_path, recording, monkeypatch):
    monkeypatch.setattr(scan_record, "KEEP_RECORDS", 2)
    roots = [_tiny(tmp_path / f"data{i}", n=1) for i in range(3)]
    for i, root in enumerate(roots):
        scan_dataset(root)
        for record in recording.glob("*.npz"):  # distinct times, oldest first
            os.utime(record, ns=(record.stat().st_atime_ns, record.stat().st_mtime_ns - 10**9))
    assert len(list(recording.glob("*.npz"))) == 2
    assert scan_record.ScanRecord(roots[0], scan_record.scan_settings(folders.checks.MIN_SIDE, 128)).entries == {}


def test_an_unwritable_cache_folder_is_no_error(tmp_path, monkeypatch):
    monkeypatch.setattr(scan_record, "RACY_S", 0.0)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(scan_record.CACHE_ENV, str(blocker / "scans"))
    root = _tiny(tmp_path / "data")
    assert len(scan_dataset(root).train) == 6
    assert len(scan_dataset(root).train) == 6


def test_look_alike_pairs_come_back_from_the_record_and_follow_changes(tmp_path, recording, monkeypatch):
    from transferkit.data import fingerprint

    import numpy as np
    from PIL import Image

    root = _tiny(tmp_path / "data")
    ramp = Image.fromarray(np.add.outer(np.arange(64), 2 * np.arange(64)).astype(np.uint8)).convert("RGB")
    ramp.save(root / "train" / "b" / "ramp.png")
    copy = root / "val" / "b" / "copy.jpg"
    copy.write_bytes(encode(ramp, "JPEG", quality=90))  # the same picture, re-encoded
    first = scan_dataset(root)
    assert first.problems["same_picture_across_splits"]
    calls = []
    real = folders.same_picture_pairs
    monkeypatch.setattr(folders, "same_picture_pairs", lambda fps: calls.append(1) or real(fps))
    again = scan_dataset(root)
    _same(first, again)
    assert calls == []  # nothing changed: the pairs were the record's
    copy.unlink()
    after = scan_dataset(root)
    assert calls == [1] and "same_picture_across_splits" not in after.problems
    assert fingerprint.SAME_PICTURE_CORRELATION == scan_record.scan_settings(8, 128)["same_picture_correlation"]


_REAL_VERIFY = folders.checks.verify_one
_MARKS: list = []  # the folder where a scan process marks each file it checks (set by the test before the fork)


def _marking_check(path, no_ext):
    """verify_one in a scan process, leaving a mark per file checked: the parent cannot see a child's calls."""
    with open(os.path.join(_MARKS[0], f"{os.getpid()}-{abs(hash(path))}"), "w"):
        pass
    return _REAL_VERIFY(path, no_ext)


def test_a_stop_during_a_scan_in_processes_keeps_every_check_the_processes_finished(tmp_path, recording,
                                                                                      monkeypatch):
    """In forked processes a task checks 16 files or more, and the processes run ahead of the parent's reading:
    at a stop (here: asked for before the first answer is read), every file a process checked is recorded, so the
    next scan checks exactly the others. (Stopping answer by answer, the scan kept the one file it had read.)"""
    from transferkit.engine import signals

    root = _tiny(tmp_path / "data", n=20)  # 80 files: 5 tasks of 16
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(folders.checks, "SCAN_PROCESSES_FROM", 1)
    monkeypatch.setattr(folders.checks, "_scan_workers", lambda: 2)  # processes on a 1-core machine too
    monkeypatch.setattr(folders.checks, "verify_one", _marking_check)
    _MARKS.append(str(marks))
    signals._requested.append(2)  # what the handler of a first SIGINT does
    try:
        with pytest.raises(signals.Interrupted, match="interrupted during the data scan"):
            scan_dataset(root)
    finally:
        signals._requested.clear()
        _MARKS.clear()
    checked = len(list(marks.iterdir()))
    assert 16 <= checked <= 80  # at least the task read (all 80 where the processes ran ahead that far)
    seen = []
    monkeypatch.setattr(folders.checks, "SCAN_PROCESSES_FROM", 10**9)  # threads now: the calls are seen here
    monkeypatch.setattr(folders.checks, "verify_one", lambda path, no_ext: seen.append(path) or
                        _REAL_VERIFY(path, no_ext))
    scan = scan_dataset(root)
    assert len(seen) == 80 - checked
    assert len(scan.train) == 40 and len(scan.val) == 40


def test_a_stop_during_the_scan_ends_it_at_once_and_keeps_what_was_checked(tmp_path, recording, monkeypatch):
    """The first Ctrl-C of a run asks the run to stop (engine/signals.py): the scan stops at the next file, and
    the next scan checks only the files the stopped one did not."""
    from transferkit.engine import signals

    root = _tiny(tmp_path / "data", n=20)  # 80 files
    seen, pressed = [], []
    real = folders.checks.verify_one

    def ctrl_c_after_ten(path, no_ext):
        seen.append(path)
        if len(seen) == 10 and not pressed:
            pressed.append(1)
            signals._requested.append(2)  # what the handler of a first SIGINT does
        return real(path, no_ext)

    monkeypatch.setattr(folders.checks, "verify_one", ctrl_c_after_ten)
    monkeypatch.setattr(folders.checks, "_scan_workers", lambda: 1)  # one file at a time: the stop lands at file 10
    try:
        with pytest.raises(signals.Interrupted, match="interrupted during the data scan") as stopped:
            scan_dataset(root)
    finally:
        signals._requested.clear()
    assert stopped.value.exit_code == 130
    assert 10 <= len(seen) < 80
    first = len(seen)
    seen.clear()
    scan = scan_dataset(root)
    # every file checked before the stop came from the record: those the worker had checked ahead of the scan's
    # reading too (it was 8 of 15 kept, now and then, when only the files read before the stop were recorded)
    assert len(seen) == 80 - first
    assert len(scan.train) == 40 and len(scan.val) == 40
