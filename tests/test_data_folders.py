import csv
import json
import os
import zlib
from pathlib import Path

import pytest
from PIL import Image

from transferkit.data import images
from transferkit.data.folders.checks import verify_one
from transferkit.data.folders import (
    CHECK_FILES,
    INFORMATIONAL_KINDS,
    DataScan,
    file_sha256,
    read_manifest,
    scan_dataset,
    write_manifest,
)
from transferkit.errors import DataError, UsageError
from torture import encode, make_torture_folder, random_rgb


@pytest.fixture(scope="module")
def torture(tmp_path_factory):
    info = make_torture_folder(tmp_path_factory.mktemp("torture") / "data")
    return info, scan_dataset(info["root"])


def _paths(samples):
    return sorted(path for path, _ in samples)


def _problem_paths(scan: DataScan, kind: str, root: Path) -> list[str]:
    return sorted(str(root / entry["path"]) for entry in scan.problems.get(kind, []))


def _flat(root: Path, counts: dict[str, int], size=(16, 16)) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            path = root / name / f"{name}_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            random_rgb(c * 1000 + i, size).save(path)
    return root


def _split(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    _flat(root / "train", train)
    for name, n in val.items():
        for i in range(n):
            path = root / "val" / name / f"v_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            random_rgb(zlib.crc32(f"val/{name}/{i}".encode())).save(path)
    return root


# ---------------------------------------------------------------- torture folder


def test_good_images_are_kept_with_their_classes(torture):
    info, scan = torture
    assert scan.classes == info["classes"]
    assert scan.split_source == "folders"
    for split, samples in (("train", scan.train), ("val", scan.val)):
        expected = sorted(p for paths in info["good"][split].values() for p in paths)
        assert _paths(samples) == expected
        for path, label in samples:
            assert Path(path).is_absolute()
            assert path in info["good"][split][scan.classes[label]]


@pytest.mark.parametrize(
    "kind",
    [
        "corrupt", "empty_file", "non_image", "not_an_image", "os_junk", "too_small", "decompression_bomb",
        "hidden", "outside_class_folder", "symlink_loop", "broken_symlink", "empty_class",
        "val_class_not_in_train", "duplicate_across_splits", "no_extension", "unreadable", "dataset_manifest",
    ],
)
def test_each_problem_kind_is_reported(torture, kind):
    info, scan = torture
    assert _problem_paths(scan, kind, info["root"]) == sorted(info["problems"][kind])
    for entry in scan.problems[kind]:
        assert entry["detail"] and "\n" not in entry["detail"]


def test_no_unexpected_problems(torture):
    info, scan = torture
    assert set(scan.problems) == set(info["problems"])


def test_every_file_is_either_used_or_reported(torture):
    info, scan = torture
    root = info["root"]
    accounted = set(_paths(scan.train) + _paths(scan.val))
    reported = {str(root / e["path"]) for entries in scan.problems.values() for e in entries}
    for dirpath, dirnames, filenames in os.walk(root):
        hidden = [d for d in dirnames if d.startswith(".")]
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames + hidden:
            path = os.path.join(dirpath, name)
            assert path in accounted or path in reported, path


def test_a_scan_in_processes_gives_what_the_threads_give(torture, monkeypatch):
    """A large folder's files are checked in forked processes (folders.checks.SCAN_PROCESSES_FROM); the scan must
    be the same: samples, every problem, digests and fingerprints."""
    from transferkit.data import folders

    info, threaded = torture
    monkeypatch.setattr(folders.checks, "SCAN_PROCESSES_FROM", 1)
    monkeypatch.setattr(folders.checks, "_scan_workers", lambda: 2)  # processes on a 1-core machine too
    forked = scan_dataset(info["root"])
    assert (forked.train, forked.val, forked.classes) == (threaded.train, threaded.val, threaded.classes)
    assert forked.problems == threaded.problems
    assert forked.digests == threaded.digests and forked.fingerprints == threaded.fingerprints


_SCANNING_PID = os.getpid()


def _dies_in_a_scan_process(path, no_ext):
    if os.getpid() != _SCANNING_PID:
        os._exit(3)  # as a process killed for memory, or a decoder that crashes, would end
    return verify_one(path, no_ext)


def test_a_scan_process_that_dies_leaves_the_checks_to_threads(tmp_path, monkeypatch, caplog):
    from transferkit.data import folders

    root = _split(tmp_path / "data", {"a": 3, "b": 3}, {"a": 1, "b": 1})
    expected = scan_dataset(root)
    monkeypatch.setitem(globals(), "_SCANNING_PID", os.getpid())
    monkeypatch.setattr(folders.checks, "SCAN_PROCESSES_FROM", 1)
    monkeypatch.setattr(folders.checks, "_scan_workers", lambda: 2)  # processes on a 1-core machine too
    monkeypatch.setattr(folders.checks, "verify_one", _dies_in_a_scan_process)
    scan = scan_dataset(root)
    assert (scan.train, scan.val, scan.digests) == (expected.train, expected.val, expected.digests)
    assert "a data-scan process ended abnormally" in caplog.text


def test_permission_denied_file_is_reported(tmp_path, monkeypatch):
    root = _flat(tmp_path, {"a": 3, "b": 3})
    locked = root / "a" / "locked.png"
    random_rgb(9).save(locked)
    locked.chmod(0)
    real_open = open

    def fake_open(path, *args, **kwargs):
        # Simulated when running as root, which can read a chmod 000 file anyway.
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(images, "open", fake_open, raising=False)
    scan = scan_dataset(root)
    assert [e["path"] for e in scan.problems["unreadable"]] == ["a/locked.png"]
    assert "Permission denied" in scan.problems["unreadable"][0]["detail"]


def test_summary_and_report(torture, tmp_path):
    info, scan = torture
    lines = scan.summary_lines()
    assert "skipped 3 corrupt or truncated images (see data_report.json)" in lines
    assert any(line.startswith("found 1 validation image identical") for line in lines)
    # The user's README.txt is worth a line; the manifest `transferkit data` wrote is recorded, not warned about.
    assert "ignored 1 non-image file outside class folders (see data_report.json)" in lines
    assert not any("manifest" in line or "elpv.json" in line for line in lines)
    scan.write_report(tmp_path / "data_report.json")
    report = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert report["classes"] == info["classes"]
    assert report["split_source"] == "folders"
    assert report["counts"] == scan.class_counts()
    assert report["problems"]["corrupt"] == scan.problems["corrupt"]
    assert [e["path"] for e in report["problems"]["dataset_manifest"]] == ["elpv.json"]
    assert report["imbalance"] == pytest.approx(scan.imbalance_ratio(), rel=1e-3)


def test_strict_mode_stops_at_the_first_problem(torture):
    info, _ = torture
    with pytest.raises(DataError) as err:
        scan_dataset(info["root"], strict=True)
    message = str(err.value)
    assert "\n" not in message and "strict" in message
    assert message.split(":")[0] not in INFORMATIONAL_KINDS


def test_strict_mode_passes_a_clean_folder(tmp_path):
    scan = scan_dataset(_split(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1}), strict=True)
    assert scan.class_counts() == {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}}
    assert scan.problems == {}


# ---------------------------------------------------------------- fatal cases


def _fatal(root, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        scan_dataset(root, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_root(tmp_path):
    assert "does not exist" in _fatal(tmp_path / "nope")


def test_file_as_root(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    assert "is a file, not a folder" in _fatal(tmp_path / "x.jpg")


def test_single_class(tmp_path):
    assert "need at least 2" in _fatal(_flat(tmp_path / "one", {"only": 5}))
    # An unzipped archive's extra folder (DATA/mydata/{train,test}/<class>/ or DATA/images/<class>/) reads as one
    # class: the message names the folder to pass instead.
    _flat(tmp_path / "zip" / "mydata" / "train", {"a": 3, "b": 3})
    _flat(tmp_path / "zip" / "mydata" / "test", {"a": 2, "b": 2})
    message = _fatal(tmp_path / "zip")
    assert "mydata/, whose images are all in subfolders of its own" in message
    assert message.endswith(f"pass {(tmp_path / 'zip' / 'mydata').resolve()} as the data folder")


def test_no_images_at_all(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert "found 0 classes with usable images" in _fatal(tmp_path)


def test_classes_whose_every_file_is_skipped_are_named_with_why(tmp_path):
    """Class folders whose files are all unusable (1×400 px strips, files that are no image): the message names
    the folders and what was skipped, not "put each class's images in its own subfolder", which they are."""
    for name in ("a", "b"):
        (tmp_path / "strips" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (1, 400) if i % 2 else (400, 1)).save(tmp_path / "strips" / name / f"{i}.png")
    message = _fatal(tmp_path / "strips")
    assert "the class folders a, b held no usable image (skipped 6 images with a side under 8 pixels" in message
    assert "its own subfolder" not in message
    _flat(tmp_path / "fake", {"good": 3})
    (tmp_path / "fake" / "bad").mkdir()
    (tmp_path / "fake" / "bad" / "0.png").write_bytes(b"not a png")
    message = _fatal(tmp_path / "fake")
    assert "found 1 class with usable images" in message and "the class folder bad held no usable image" in message


def test_a_val_fraction_that_leaves_no_training_image_is_named(tmp_path):
    message = _fatal(_flat(tmp_path, {"a": 6, "b": 6}), val_fraction=0.99)  # was "too few ...; add images"
    assert message == "--val-fraction 0.99 leaves 0 of the 12 usable images for training, fewer than one per class " \
                      "(2); lower --val-fraction"


def test_copies_of_one_picture_everywhere_keep_a_val_split(tmp_path, caplog):
    picture = random_rgb(7, (32, 32))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            picture.save(tmp_path / name / f"{i}.png")
    scan = scan_dataset(tmp_path)  # the group-aware split moved all 8 to train: "no image could be read" in training
    assert len(scan.val) == 2 and scan.grouping["not_used"] == "it left a split empty"
    assert "group-aware split not used" in caplog.text


def test_a_run_folder_passed_as_data_is_named_as_one(tmp_path):
    """`data check runs/x` or `train runs/`: "put each class's images in its own subfolder" was the advice."""
    for run in ("r1", "r2"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "config.yaml").write_text("data: mydata\n")
        (tmp_path / "runs" / run / "split.csv").write_text("path,label,split\n")
        random_rgb(0, (32, 32)).save(tmp_path / "runs" / run / "curves.png")
    assert "this is a transferkit run folder; pass the data folder the run trained on" in _fatal(tmp_path / "runs/r1")
    assert "its folders are transferkit run folders; pass the data folder" in _fatal(tmp_path / "runs")


def test_images_named_by_class_get_the_folders_to_make(tmp_path):
    """Kaggle's dogs-vs-cats: train/cat.0.jpg, train/dog.0.jpg, no class folders."""
    for name in ("cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.jpg", "dog12.jpg", "IMG_1.jpg"):
        (tmp_path / "train").mkdir(exist_ok=True)
        random_rgb(len(name)).save(tmp_path / "train" / name)
    message = _fatal(tmp_path)
    assert f"the 6 images in {tmp_path.resolve() / 'train'} are named by class (cat.*, dog.*)" in message
    assert message.endswith("for c in cat dog; do mkdir -p $c && mv $c[^a-zA-Z]* $c/; done")
    (tmp_path / "train" / "cat.1.jpg").unlink()  # one name of one image is no class
    assert "named by class" not in _fatal(tmp_path)


def test_empty_val_split(tmp_path):
    _split(tmp_path, {"a": 3, "b": 3}, {})
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "notes.txt").write_text("x")
    assert "has no usable images" in _fatal(tmp_path)


def test_class_missing_from_train(tmp_path):
    _split(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1, "c": 1})
    (tmp_path / "train" / "c").mkdir()
    message = _fatal(tmp_path)
    assert "class 'c'" in message and "no usable training images" in message


def test_val_without_train(tmp_path):
    _flat(tmp_path / "val", {"a": 2, "b": 2})
    assert "no train/ folder" in _fatal(tmp_path)


def test_class_with_one_image_cannot_be_split_randomly(tmp_path):
    assert "only 1 usable image" in _fatal(_flat(tmp_path, {"a": 5, "b": 1}))


def test_run_folders_inside_the_data_are_not_classes(tmp_path):
    """`--out` inside a flat data folder, or `runs/` where `transferkit train .` ran in it: the next scan read the
    run's figures as a class of images ("run1": 11 PNGs and non-images). Run folders (a config plus the scan's
    report, split or metrics), `runs/` of nothing but run folders, and a run folder nested in a class are
    ignored and reported; a class folder that merely holds a config.yaml is still a class."""
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    runs = [root / "run1", root / "runs" / "20261206-efficientnet_lite0-auto", root / "a" / "sub" / "run9"]
    for run, marker in zip(runs, ("data_report.json", "split.csv", "metrics.json")):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("mode: linear-probe\n")
        (run / marker).write_text("{}")
        random_rgb(7, (64, 64)).save(run / "confusion.png")
    (root / "b" / "config.yaml").write_text("not a run\n")
    scan = scan_dataset(root)
    assert scan.classes == ["a", "b"]
    used = _paths(scan.train) + _paths(scan.val)
    assert len(used) == 12 and not any("confusion" in p for p in used)
    assert [e["path"] for e in scan.problems["run_folder"]] == ["run1", "runs", "a/sub/run9"]
    assert "run_folder" in INFORMATIONAL_KINDS
    assert any(line.startswith("ignored 3 folders of transferkit's output (runs, data checks) inside the data folder")
               for line in scan.summary_lines())


def test_data_check_output_inside_the_data_is_no_class(tmp_path):
    """`transferkit data check DATA --out DATA/chk` (or `data check .` run in DATA, which writes runs/check-DATA):
    the next scan of DATA read chk/ as a class whose check.json and check.html were unusable files, and the check
    counted them among its findings. A folder holding both files the check writes is skipped as run folders are,
    alone, beside runs in runs/, or nested in a class; a class holding only one of the two names is still a class."""
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    for out in (root / "chk", root / "runs" / "check-data", root / "a" / "sub" / "chk2"):
        out.mkdir(parents=True)
        for name in CHECK_FILES:
            (out / name).write_text("{}")
    (root / "b" / "check.json").write_text("{}")  # a class folder with a stray check.json stays a class
    scan = scan_dataset(root)
    assert scan.classes == ["a", "b"]
    assert len(_paths(scan.train) + _paths(scan.val)) == 12
    assert [e["path"] for e in scan.problems["run_folder"]] == ["chk", "runs", "a/sub/chk2"]
    assert not scan.problems.get("empty_class")


def test_a_mac_zip_s_resource_fork_folder_is_not_a_class(tmp_path):
    """A zip made on a Mac unpacks with __MACOSX/<class>/._<image> beside the class folders: a flat scan took it
    for a class with no usable images (and --strict stopped on it). It is OS metadata, ignored and counted."""
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._a_000.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    scan = scan_dataset(root, strict=True)
    assert scan.classes == ["a", "b"] and [e["path"] for e in scan.problems["os_junk"]] == ["__MACOSX"]


def test_a_val_fraction_asked_for_beside_a_val_folder_is_said_to_be_unused(tmp_path, caplog):
    """`--val-fraction 0.5` on a folder with its own val/ was dropped without a word."""
    import logging

    root = _split(tmp_path / "data", {"a": 4, "b": 4}, {"a": 2, "b": 2})
    with caplog.at_level(logging.WARNING):
        assert len(scan_dataset(root).val) == 4 and not caplog.text
        assert len(scan_dataset(root, val_fraction=0.5).val) == 4
    assert f"--val-fraction 0.5 is not used: {root} has its own val/ folder" in caplog.text


def test_bad_val_fraction(tmp_path):
    with pytest.raises(UsageError):
        scan_dataset(_flat(tmp_path, {"a": 5, "b": 5}), val_fraction=1.5)


# ---------------------------------------------------------------- layouts, splits, manifest


def test_random_split_is_stratified_and_seeded(tmp_path):
    root = _flat(tmp_path / "data", {"cats": 20, "dogs": 10})
    first = scan_dataset(root, seed=3)
    again = scan_dataset(root, seed=3)
    other = scan_dataset(root, seed=4)
    assert first.split_source == "stratified"
    assert first.train == again.train and first.val == again.val
    assert first.val != other.val
    assert first.class_counts() == {"train": {"cats": 16, "dogs": 8}, "val": {"cats": 4, "dogs": 2}}
    assert not set(_paths(first.train)) & set(_paths(first.val))


def test_train_folder_without_val_is_split_randomly(tmp_path):
    root = _flat(tmp_path / "train", {"a": 5, "b": 5}).parent
    (root / "test").mkdir()
    (root / "extra").mkdir()
    scan = scan_dataset(root, val_fraction=0.4, strict=True)  # neither folder stops a strict scan
    assert scan.split_source == "stratified"
    assert scan.class_counts()["val"] == {"a": 2, "b": 2}
    # test/ is a held-out split the run never reads, and the summary says how to score a run on it.
    assert [e["path"] for e in scan.problems["test_folder"]] == ["test"]
    assert [e["path"] for e in scan.problems["unused_folder"]] == ["extra"]
    assert any(line.startswith("kept 1 test folder out of training and the recipe search") and
               "`transferkit evaluate RUN DATA/test`" in line for line in scan.summary_lines())


def test_the_train_summary_names_the_command_that_scores_the_test_folder(tmp_path, monkeypatch, capsys):
    from transferkit.cli import _print_test_folders

    root = _flat(tmp_path / "my data" / "train", {"a": 5, "b": 5}).parent  # a space: quoted to paste
    _flat(root / "test", {"a": 2, "b": 2})
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    scan_dataset(root, val_fraction=0.4).write_report(run / "data_report.json")
    monkeypatch.chdir(tmp_path)
    _print_test_folders("runs/r")
    assert capsys.readouterr().out == ("held-out test folder, not read by this run: score it once with "
                                       "`transferkit evaluate runs/r 'my data/test'`\n")


def test_tiny_classes_still_get_a_val_image(tmp_path):
    scan = scan_dataset(_flat(tmp_path, {"a": 2, "b": 2, "c": 2}), val_fraction=0.1)
    assert scan.class_counts()["val"] == {"a": 1, "b": 1, "c": 1}


def test_manifest_round_trip(tmp_path):
    root = _flat(tmp_path / "data", {"é spaced": 8, "b": 6})
    scan = scan_dataset(root, seed=1)
    write_manifest(scan, tmp_path / "split.csv")
    rows = list(csv.DictReader(open(tmp_path / "split.csv", newline="", encoding="utf-8")))
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all(not r["path"].startswith("/") for r in rows)
    again = read_manifest(tmp_path / "split.csv", root)
    assert (again.classes, again.train, again.val) == (scan.classes, scan.train, scan.val)
    assert again.split_source == "manifest"


def test_manifest_missing_files_become_problems(tmp_path):
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    scan = scan_dataset(root)
    write_manifest(scan, tmp_path / "split.csv")
    gone = Path(scan.train[0][0])
    gone.unlink()
    again = read_manifest(tmp_path / "split.csv", root)
    assert len(again.train) == len(scan.train) - 1
    assert again.problems["missing"][0]["path"] == gone.relative_to(root).as_posix()


@pytest.mark.parametrize("bad_path", ["../outside.png", "a/../../outside.png", "/etc/passwd", "C:\\x.png"])
def test_manifest_refuses_paths_outside_root(tmp_path, bad_path):
    root = _flat(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "outside.png").write_bytes(encode(random_rgb(1), "PNG"))
    manifest = tmp_path / "split.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerows([["path", "class", "split"], ["a/a_000.png", "a", "train"], [bad_path, "b", "val"]])
    with pytest.raises(DataError) as err:
        read_manifest(manifest, root)
    assert "line 3" in str(err.value) and "outside the data folder" in str(err.value)


def test_manifest_needs_its_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\nx.png,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks column"):
        read_manifest(tmp_path / "m.csv", tmp_path)


def test_manifest_saved_by_excel_or_in_another_encoding(tmp_path):
    """A split.csv saved by Excel as "CSV UTF-8" starts with a byte-order mark: its path column was not found. A
    UTF-16 one (Excel's "Unicode text"), given to `evaluate`, was a UnicodeDecodeError traceback."""
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    scan = scan_dataset(root)
    write_manifest(scan, tmp_path / "split.csv")
    text = (tmp_path / "split.csv").read_text(encoding="utf-8")
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    again = read_manifest(tmp_path / "bom.csv", root)
    assert (again.train, again.val) == (scan.train, scan.val)
    (tmp_path / "u16.csv").write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match="^cannot read manifest .*u16.csv: not a UTF-8 text CSV"):
        read_manifest(tmp_path / "u16.csv", root)


def test_a_file_name_that_is_not_utf8_goes_through_the_manifest(tmp_path):
    """A Latin-1 zip's café.png (the byte 0xE9 in its name): writing split.csv as a run began was a
    UnicodeEncodeError traceback; the name is kept as its bytes and read back as the same file."""
    root = _flat(tmp_path / "data", {"a": 6, "b": 6})
    source = root / "a" / "a_000.png"
    os.rename(source, os.path.join(os.fsencode(root / "a"), b"caf\xe9.png"))
    scan = scan_dataset(root)
    assert any("caf\udce9.png" in str(p) for p, _ in scan.train + scan.val)
    write_manifest(scan, tmp_path / "split.csv")
    again = read_manifest(tmp_path / "split.csv", root)
    assert (again.train, again.val) == (scan.train, scan.val)


def test_duplicates_within_a_split_and_imbalance(tmp_path):
    root = _flat(tmp_path, {"a": 16, "b": 3})
    (root / "b" / "copy.png").write_bytes((root / "a" / "a_000.png").read_bytes())
    scan = scan_dataset(root, seed=0)
    dups = scan.problems.get("duplicate_within_split", []) + scan.problems.get("duplicate_across_splits", [])
    assert len(dups) == 1
    assert scan.imbalance_ratio() > 3
    assert any(line.startswith("classes are imbalanced") for line in scan.summary_lines())


def test_symlinked_class_folder_is_followed(tmp_path):
    elsewhere = _flat(tmp_path / "elsewhere", {"b": 3})
    root = _flat(tmp_path / "data", {"a": 3})
    os.symlink(elsewhere / "b", root / "b")
    scan = scan_dataset(root)
    assert scan.classes == ["a", "b"]
    assert sum(scan.class_counts()["train"].values()) + sum(scan.class_counts()["val"].values()) == 6


def test_a_class_folder_linked_to_a_parent_is_a_loop_not_a_class(tmp_path):
    root = _flat(tmp_path / "data", {"a": 3, "b": 3})
    for name, target in (("up", ".."), ("here", ".")):  # `up` was a class holding the whole data folder again
        os.symlink(target, root / name)
    scan = scan_dataset(root)
    assert scan.classes == ["a", "b"]
    assert sorted(p["path"] for p in scan.problems["symlink_loop"]) == ["here", "up"]
    assert sum(scan.class_counts()["train"].values()) + sum(scan.class_counts()["val"].values()) == 6


def test_verify_off_skips_decoding_but_sniffs_extensionless_files(tmp_path):
    root = _flat(tmp_path, {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"garbage")
    (root / "a" / "noext").write_bytes(encode(random_rgb(2), "PNG"))
    (root / "b" / "text").write_bytes(b"hello")
    scan = scan_dataset(root, verify_images=False)
    kept = _paths(scan.train) + _paths(scan.val)
    assert str(root / "a" / "broken.png") in kept  # not decoded, so not caught
    assert str(root / "a" / "noext") in kept
    assert [e["path"] for e in scan.problems["non_image"]] == ["b/text"]


def test_file_sha256(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert file_sha256(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_big_thin_images_are_kept(tmp_path):
    root = _flat(tmp_path, {"a": 3, "b": 3})
    Image.new("RGB", (8, 500)).save(root / "a" / "thin.png")
    scan = scan_dataset(root)
    assert str(root / "a" / "thin.png") in _paths(scan.train) + _paths(scan.val)


def test_valid_is_a_class_name_in_a_flat_layout(tmp_path):
    scan = scan_dataset(_flat(tmp_path, {"valid": 4, "invalid": 4}))
    assert scan.classes == ["invalid", "valid"] and scan.split_source == "stratified"


def test_split_folders_are_found_in_any_case(tmp_path):
    """Kaggle's zips name them Training/ and Testing/ (a brain-tumour MRI set), Roboflow's Train/ and Valid/: read
    as a flat folder, Training and Testing became the two classes, a classifier of where an image was stored."""
    kaggle = tmp_path / "kaggle"
    _flat(kaggle / "Training", {"glioma": 5, "meningioma": 5})
    _flat(kaggle / "Testing", {"glioma": 2, "meningioma": 2})
    scan = scan_dataset(kaggle, val_fraction=0.4)
    assert scan.classes == ["glioma", "meningioma"] and scan.split_source == "stratified"
    assert scan.class_counts()["val"] == {"glioma": 2, "meningioma": 2}
    assert [e["path"] for e in scan.problems["test_folder"]] == ["Testing"]
    roboflow = _split(tmp_path / "roboflow", {"a": 3, "b": 3}, {"a": 1, "b": 1})
    (roboflow / "train").rename(roboflow / "Train")
    (roboflow / "val").rename(roboflow / "Valid")
    scan = scan_dataset(roboflow)
    assert scan.split_source == "folders" and scan.class_counts() == {"train": {"a": 3, "b": 3},
                                                                      "val": {"a": 1, "b": 1}}
    (roboflow / "Train").rename(roboflow / "elsewhere")  # a val folder without a train folder
    (roboflow / "Valid").rename(roboflow / "VAL")
    assert "has a VAL/ folder but no train/ folder" in _fatal(roboflow)


def test_val_class_folders_that_differ_from_train_only_in_case_are_named(tmp_path):
    root = _split(tmp_path / "data", {"Cat": 3, "Dog": 3}, {"Cat": 1, "dog": 1})
    scan = scan_dataset(root)
    [skipped] = scan.problems["val_class_not_in_train"]
    assert "train/Dog/ differs only in case: rename one" in skipped["detail"]
    (root / "val" / "Cat").rename(root / "val" / "cat")
    assert "its class folders cat, dog differ from train/'s only in case" in _fatal(root)


def test_a_train_folder_given_for_its_data_root_is_said(tmp_path, caplog):
    root = _split(tmp_path / "data", {"a": 5, "b": 5}, {"a": 1, "b": 1})
    with caplog.at_level("WARNING"):
        scan = scan_dataset(root / "train", val_fraction=0.4)
    assert scan.split_source == "stratified"
    assert f"{root / 'train'} is the train folder of {root}, whose val/ folder is not read" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        scan_dataset(root)
    assert "is the train folder of" not in caplog.text


def test_class_folders_named_like_splits_are_said(tmp_path, caplog):
    """A Kaggle zip's seg_train/seg_train/<class>/ and seg_test/seg_test/<class>/: as a flat folder, two classes."""
    nested = tmp_path / "intel"
    _flat(nested / "seg_train" / "seg_train", {"buildings": 3, "forest": 3})
    _flat(nested / "seg_test" / "seg_test", {"buildings": 2, "forest": 2})
    with caplog.at_level("WARNING"):
        scan_dataset(nested)
    assert "the class folders seg_test, seg_train of" in caplog.text and "look like splits" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        scan_dataset(_flat(tmp_path / "vehicles", {"trains": 3, "test_rigs": 3, "buses": 3}))
    assert "look like splits" not in caplog.text  # "trains" is a class


@pytest.mark.parametrize("peak, white", [(4000, 4095), (1000, 1023), (60000, 65535), (200, 255)])
def test_the_white_of_16_bit_images_is_found_from_their_values(tmp_path, caplog, peak, white):
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(4):
            path = tmp_path / "data" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, peak + 1, (16, 16)).astype(np.uint16)).save(path)
    with caplog.at_level("INFO"):
        scan = scan_dataset(tmp_path / "data", val_fraction=0.25)
    assert scan.sixteen_bit_white == white
    assert (f"read with {white} as white" in caplog.text) == (white != 65535)


def test_8_bit_data_has_no_16_bit_white(tmp_path):
    root = _split(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    assert scan_dataset(root).sixteen_bit_white is None


def test_evaluate_finds_the_val_folder_as_training_does(tmp_path):
    from transferkit.evaluate import resolve_items

    root = _split(tmp_path / "data", {"a": 3, "b": 3}, {"a": 1, "b": 2})
    (root / "train").rename(root / "Training")
    (root / "val").rename(root / "Validation")
    items, where = resolve_items(root, ["a", "b"], {})
    assert where == str(root / "Validation") and sorted(label for _, label in items) == [0, 1, 1]


def test_valid_folder_is_the_val_split_next_to_train(tmp_path):
    root = _split(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1})
    (root / "val").rename(root / "valid")
    scan = scan_dataset(root)
    assert scan.split_source == "folders" and scan.class_counts()["val"] == {"a": 1, "b": 1}


def test_scan_of_large_jpegs_keeps_their_stored_size_and_finds_copies(tmp_path, monkeypatch):
    """The scan decodes a large JPEG at a reduced scale (folders.checks.SCAN_SHORTER_SIDE); its fingerprint still
    carries the picture's own size, and it finds the same re-encoded copies as a full decode."""
    import numpy as np

    from transferkit.data import folders

    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float32)
    for c, name in enumerate(("a", "b")):
        for i in range(3):
            grey = 128 + 100 * np.sin(xx / (20 + 7 * i + 11 * c)) * np.cos(yy / (13 + 5 * i))
            img = Image.fromarray(grey.clip(0, 255).astype(np.uint8)).convert("RGB")
            for split in ("train", "val"):
                path = tmp_path / split / name / f"{name}{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path, "JPEG", quality=90 if split == "train" else 80)  # val: re-encoded copies
    reduced = scan_dataset(tmp_path)
    assert {fp.size for fp in reduced.fingerprints.values()} == {(1600, 1200)}
    monkeypatch.setattr(folders.checks, "SCAN_SHORTER_SIDE", None)
    full = scan_dataset(tmp_path)
    copies = [e["path"] for e in reduced.problems["same_picture_across_splits"]]
    assert len(copies) >= 4 and copies == [e["path"] for e in full.problems["same_picture_across_splits"]]


def test_scanning_a_folder_with_val_imports_no_scikit_learn(tmp_path):
    """scikit-learn (~0.8 s to import on a 2-core box) is for folders that need a split: a train/ + val/ folder
    is scanned without it, so a cold run imports it later, beside the feature extraction (threads.start_prefetch)."""
    import subprocess
    import sys

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            random_rgb(len(split) + ord(name)).save(tmp_path / split / name / "x.png")
    code = ("import sys\nfrom transferkit.data.folders import scan_dataset\n"
            f"scan = scan_dataset({str(tmp_path)!r})\nprint(len(scan.train), len(scan.val), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["2", "2", "False"]


def test_jfif_pbm_and_avif_files_are_images(tmp_path):
    """A browser's .jfif download, Netpbm's .pbm/.pnm and (where this Pillow reads it) .avif are images Pillow reads:
    they were skipped as "non-image files" (extension .jfif is not an image type read here), and predict and
    evaluate walked past them."""
    from PIL import features

    from transferkit.inference import expand_inputs

    names = ["a/photo.jfif", "a/scan.pbm", "b/frame.pnm", "b/plain.png"]
    formats = {"jfif": "JPEG", "pbm": "PPM", "pnm": "PPM", "png": "PNG", "avif": "AVIF"}
    if features.check("avif"):
        names.append("b/phone.avif")
    for i, name in enumerate(names):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        img = random_rgb(i, (24, 24))
        (img.convert("1") if name.endswith(".pbm") else img).save(path, formats[name.rsplit(".", 1)[1]])
    scan = scan_dataset(tmp_path, val_fraction=0.5)
    assert _paths(scan.train + scan.val) == sorted(str(tmp_path / name) for name in names)
    assert "non_image" not in scan.problems
    assert sorted(expand_inputs([str(tmp_path)])) == sorted(str(tmp_path / name) for name in names)


def test_heic_photos_are_named_as_such_not_as_non_image_files(tmp_path):
    """An iPhone's .HEIC photos were "skipped 3 non-image files", predict's folder walk passed them by unsaid, and
    predict named on one said "not an image file": they are photos that Pillow here cannot decode."""
    from transferkit.data.folders.problems import kind_text
    from transferkit.data.images import ImageDecodeError, load_rgb
    from transferkit.inference import expand_inputs

    _flat(tmp_path, {"cats": 3, "dogs": 3})
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # the header of one: no decoder here
    for i in range(2):
        (tmp_path / "cats" / f"IMG_{i}.HEIC").write_bytes(heic)
    scan = scan_dataset(tmp_path, val_fraction=0.34)
    assert _problem_paths(scan, "heic", tmp_path) == [str(tmp_path / "cats" / f"IMG_{i}.HEIC") for i in range(2)]
    assert "non_image" not in scan.problems
    assert kind_text("heic", 2) == ("skipped 2 HEIC/HEIF images, which Pillow here cannot decode: convert them to "
                                    "JPEG or PNG")
    assert str(tmp_path / "cats" / "IMG_0.HEIC") in expand_inputs([str(tmp_path / "cats")])
    with pytest.raises(ImageDecodeError, match="a HEIC/HEIF photo, which Pillow here cannot decode"):
        load_rgb(tmp_path / "cats" / "IMG_0.HEIC")
