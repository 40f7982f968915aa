"""Find the images of a dataset folder, check each one, and decide the train/val split.

Layouts: ROOT/train/<class>/ + ROOT/val/<class>/ (split given), ROOT/train/<class>/ alone or
ROOT/<class>/ (stratified random split made here). Files in subfolders of a class folder
belong to that class. Every file that is skipped is recorded in `DataScan.problems`
(except the contents of hidden folders, which are recorded once per folder).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import logging
import math
import multiprocessing
import os
import re
import signal
import stat
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from transferkit.data.fingerprint import Fingerprint, fingerprint, groups_of, one_side_per_group, same_picture_pairs
from transferkit.data.images import (IMAGE_EXTENSIONS, SIXTEEN_BIT_MODES, ImageDecodeError, has_image_extension,
                                     read_rgb)
from transferkit.data.scan_record import ScanRecord, file_key, scan_settings
from transferkit.engine import signals
from transferkit.config import DEFAULT_VAL_FRACTION, SENSOR_BITS
from transferkit.preprocessing import SIXTEEN_BIT_WHITE
from transferkit.errors import DataError, UsageError
from transferkit.io import atomic_write_json
from transferkit.run_folder import RunFolder

logger = logging.getLogger(__name__)

# Split folders are recognised in any case (Kaggle's and Roboflow's zips: Training/ and Testing/, Train/ and Valid/):
# a layout of Training/<class>/ and Testing/<class>/ read as two classes, "Testing" and "Training", trained a
# classifier of which folder an image came from.
TRAIN_DIR_NAMES = ("train", "training")
VAL_DIR_NAMES = ("val", "valid", "validation")
# Beside train/, a held-out test split: never read by training or the search, and named so the user can score it.
TEST_DIR_NAMES = frozenset({"test", "testing", "holdout"})
# __MACOSX: the folder of resource forks (`._name` files) a zip made on a Mac carries, a class folder to a flat scan
OS_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})
MIN_SIDE = 8  # below this a side carries no usable detail even after resizing
# The scan decodes every file to check it and fingerprint it (32×32 thumbnails): a large JPEG may be decoded at a
# reduced scale, its shorter side still ≥ 2 × this (data/images.py DRAFT_MARGIN); a damaged file fails alike.
SCAN_SHORTER_SIDE = 128
SCAN_PROCESSES_FROM = 1000  # files from which the scan checks them in processes (_checked_files); fewer: threads
IMBALANCE_WARN_RATIO = 3.0
BIT_DEPTH_SAMPLE = 16  # training images whose pixel values give the data's 16-bit white (sixteen_bit_white)
MANIFEST_COLUMNS = ("path", "class", "split")

# Kinds that skip nothing the user meant to train on; strict mode does not stop on them.
INFORMATIONAL_KINDS = frozenset({"no_extension", "hidden", "os_junk", "outside_class_folder", "unused_folder",
                                 "test_folder", "run_folder"})

# Summary wording per kind, in report order; "{n}" is the count, the other fields are
# nouns that agree with it.
_KIND_TEXT = {
    "corrupt": "skipped {n} corrupt or truncated {images}",
    "not_an_image": "skipped {n} {files} with an image extension but no image inside",
    "non_image": "skipped {n} non-image {files}",
    "empty_file": "skipped {n} empty (0-byte) {files}",
    "unreadable": "skipped {n} unreadable {files} (permission denied or not a regular file)",
    "missing": "skipped {n} {files} listed in the manifest that no longer exist",
    "symlink_loop": "skipped {n} symlink {loops}",
    "broken_symlink": "skipped {n} broken {symlinks}",
    "decompression_bomb": "skipped {n} {images} over Pillow's pixel limit (decompression bomb guard)",
    "too_small": "skipped {n} {images} with a side under 8 pixels",
    "image_outside_class_folder": "skipped {n} {images} that {are} not inside a class folder",
    "empty_class": "dropped {n} class {folders} with no usable images",
    "val_class_not_in_train": "skipped {n} validation {images} whose class has no train folder",
    "no_val_images": "{n} {classes} {have} no validation images",
    "duplicate_across_splits": "found {n} validation {images} identical to a training image (leakage; kept)",
    "duplicate_within_split": "found {n} duplicate {images} within a split (kept)",
    "same_picture_across_splits": "found {n} validation {images} that {are} a re-encoded or resized copy of a "
                                  "training image (leakage; kept)",
    "no_extension": "used {n} {images} that {have} no file extension",
    "hidden": "ignored {n} hidden {entries} (files or folders)",
    "os_junk": "ignored {n} OS metadata {entries} (.DS_Store, Thumbs.db, desktop.ini, __MACOSX)",
    "outside_class_folder": "ignored {n} non-image {files} outside class folders",
    "unused_folder": "ignored {n} {folders} that {are} neither train nor val",
    "test_folder": "kept {n} test {folders} out of training and the recipe search (score a run on it once with "
                   "`transferkit evaluate RUN DATA/test`)",
    "run_folder": "ignored {n} transferkit run {folders} inside the data folder",
}


def _kind_text(kind: str, n: int) -> str:
    one = n == 1
    singular = {"images": "image", "files": "file", "loops": "loop", "symlinks": "symlink",
                "folders": "folder", "classes": "class", "entries": "entry"}
    nouns = {plural: one_word if one else plural for plural, one_word in singular.items()}
    template = _KIND_TEXT.get(kind, "{n} problems of kind " + kind)
    return template.format(n=n, are="is" if one else "are", have="has" if one else "have", **nouns)


@dataclass
class DataScan:
    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    problems: dict[str, list[dict]] = field(default_factory=dict)
    split_source: str = "folders"  # "folders", "stratified" (made here) or "manifest"
    # What the `val` split is called where it is scored: "hold-out" for the recipe search's inner split of the
    # training images (search/finetuning.py inner_scan), so that a candidate's epoch lines do not read as the val split choosing.
    val_name: str = "val"
    # sha256 of each usable file, from the verifying scan (empty without it); the feature cache keys on it.
    digests: dict[str, str] = field(default_factory=dict, repr=False)
    # Picture fingerprints from the same scan (data/fingerprint.py), and what the group-aware split did.
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict, repr=False)
    grouping: dict = field(default_factory=dict)
    # White of the 16-bit grey images, from a sample of the training images (sixteen_bit_white; None: none seen).
    sixteen_bit_white: int | None = None

    def class_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for split, samples in (("train", self.train), ("val", self.val)):
            per_class = dict.fromkeys(self.classes, 0)
            for _, index in samples:
                per_class[self.classes[index]] += 1
            counts[split] = per_class
        return counts

    def imbalance_ratio(self) -> float:
        counts = [n for n in self.class_counts()["train"].values() if n > 0]
        return max(counts) / min(counts) if counts else 1.0

    def summary_lines(self) -> list[str]:
        lines = []
        kinds = list(_KIND_TEXT) + sorted(set(self.problems) - set(_KIND_TEXT))
        for kind in kinds:
            n = len(self.problems.get(kind, ()))
            if n:
                lines.append(_kind_text(kind, n) + " (see data_report.json)")
        ratio = self.imbalance_ratio()
        if ratio > IMBALANCE_WARN_RATIO:
            train = self.class_counts()["train"]
            big, small = max(train, key=train.get), min(train, key=train.get)
            lines.append(
                f"classes are imbalanced: largest/smallest training class = {ratio:.1f} "
                f"({big}: {train[big]}, {small}: {train[small]})"
            )
        return lines

    def write_report(self, path) -> None:
        report = {
            "root": str(self.root),
            "classes": self.classes,
            "counts": self.class_counts(),
            "split_source": self.split_source,
            "duplicate_grouping": self.grouping,
            "imbalance": round(self.imbalance_ratio(), 4),
            "summary": self.summary_lines(),
            "problems": self.problems,
        }
        atomic_write_json(path, report)


class _Problems:
    """Collects problems by kind; in strict mode the first real problem is fatal."""

    def __init__(self, root: Path, strict: bool):
        self.root = root
        self.strict = strict
        self.items: dict[str, list[dict]] = defaultdict(list)

    def add(self, kind: str, path, detail: str) -> None:
        rel = _relative(path, self.root)
        self.items[kind].append({"path": rel, "detail": detail})
        logger.debug("%s: %s: %s", kind, rel, detail)
        if self.strict and kind not in INFORMATIONAL_KINDS:
            raise DataError(
                f"{kind}: {rel}: {detail} (strict data checking stops at the first problem; "
                "fix or remove the file, or turn strict checking off)"
            )


def _relative(path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- scanning


def scan_dataset(root, *, val_fraction=DEFAULT_VAL_FRACTION, seed=0, strict=False, verify_images=True,
                 group_duplicates=True) -> DataScan:
    """Scan `root`, check every candidate image and return the usable train/val samples.

    A split made here keeps copies of one picture (same content, or re-encoded/resized: see
    data/fingerprint.py) on one side when `group_duplicates` (and images are verified)."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    root = _check_root(root)
    problems = _Problems(root, strict)
    split_dirs = _find_split_dirs(root, problems)
    if "val" not in split_dirs:
        _say_val_beside(root)
    walked = {split: {name: _walk_class(class_dir, problems) for name, class_dir in _class_dirs(split_dir, problems)}
              for split, split_dir in split_dirs.items()}
    # Every file checked in one go (one pool for the whole folder, not one per class), then sorted back by class;
    # a verifying scan takes the checks of files unchanged since an earlier scan from the folder's record.
    record = ScanRecord(root, scan_settings(MIN_SIDE, SCAN_SHORTER_SIDE)) if verify_images else None
    candidates = [c for split in walked.values() for cands in split.values() for c in cands]
    checked = _checked_files(candidates, record)
    checks = iter(checked)
    found: dict[str, dict[str, list[tuple[str, str | None]]]] = {}
    fingerprints: dict[str, Fingerprint] = {}
    for split, classes in walked.items():
        found[split] = {name: _usable(candidates, checks, problems, fingerprints) for name, candidates in classes.items()}
    digests = _hashes(found)
    pairs = record.pairs if record is not None and record.unchanged else same_picture_pairs(fingerprints)
    if record is not None:
        record.save(_record_rows(candidates, checked), pairs)
    if "val" in found:
        if val_fraction != DEFAULT_VAL_FRACTION:  # asked for: a split the folder's own val/ overrides
            logger.warning("--val-fraction %g is not used: %s has its own val/ folder", val_fraction, root)
        scan = _assemble_given_split(root, found["train"], found["val"], problems, split_dirs)
    else:
        scan = _assemble_random_split(root, found["train"], problems, split_dirs["train"], val_fraction, seed)
        if group_duplicates and verify_images:
            _keep_groups_together(scan, groups_of(pairs, digests))
    scan.digests, scan.fingerprints = digests, fingerprints
    _report_duplicates(scan, scan.digests, problems)
    _report_same_pictures(scan, pairs, problems)
    scan.problems = dict(problems.items)
    _log_summary(scan)
    step = max(1, len(scan.train) // BIT_DEPTH_SAMPLE)  # spread over the classes (the list is sorted by class)
    scan.sixteen_bit_white = sixteen_bit_white([path for path, _ in scan.train[::step][:BIT_DEPTH_SAMPLE]])
    return scan


def subsample_order(labels, seed: int) -> np.ndarray:
    """The order in which seeded subsamples take training images: any prefix is a stratified random subsample
    (each class in proportion to its images, up to rounding, and every class from the first images on), and a
    smaller one lies inside a larger one (the recipe search extracts in this order, and stops where its budget
    does). A plain random prefix of 2,000 from a folder with a class of 40 images among 40,000 would hold two of
    them, or none."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]  # each class together, in a random order
    _, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    # the k-th image of its class at k / class size: a class's first image at 0, and images of a class spread
    # evenly along the order; ties between classes broken at random. One sort, not a pass per class (a million
    # images in 1,000 classes: 0.6 s against 9.5 s)
    rank = np.empty(len(labels))
    rank[by_class] = (np.arange(len(labels)) - np.repeat(starts, counts)) / np.repeat(counts, counts)
    return np.lexsort((rng.random(len(labels)), rank))


def check_subsample(n: int | None, scan: DataScan) -> None:
    """--train-subsample keeps at least one image of each class (subsample_order takes one of each first)."""
    if n and n < min(len(scan.train), len(scan.classes)):
        raise UsageError(f"--train-subsample {n} keeps fewer training images than there are classes "
                         f"({len(scan.classes)}): a model learns no class it has not seen")


def subsample_train(scan: DataScan, n: int | None, seed: int) -> DataScan:
    """`scan` with a seeded stratified random n of its training images (the first n of subsample_order, kept in
    scan order); the scan itself where n is None or not below the number of training images."""
    if not n or n >= len(scan.train):
        return scan
    check_subsample(n, scan)
    keep = np.sort(subsample_order([label for _, label in scan.train], seed)[:n])
    return replace(scan, train=[scan.train[i] for i in keep])


def _check_root(root) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data folder {path} does not exist; pass the folder that holds one subfolder of images per class")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a folder; pass the folder that holds one subfolder of images per class")
    return path.resolve()


def split_folders(root: Path) -> dict[str, Path]:
    """The subfolders of a data root that hold its splits: {"train": ..., "val": ...} as far as there are any,
    their names in any case (TRAIN_DIR_NAMES, VAL_DIR_NAMES; the first of each list present). Without a train
    folder, only a val folder named val counts ("valid" and "validation" may be the classes valid/invalid)."""
    by_name: dict[str, Path] = {}
    for name, path in _sorted_entries(root):
        if path.is_dir():
            by_name.setdefault(name.lower(), path)
    found = {split: next((by_name[n] for n in names if n in by_name), None)
             for split, names in (("train", TRAIN_DIR_NAMES), ("val", VAL_DIR_NAMES))}
    if found["train"] is None and found["val"] is not None and found["val"].name.lower() != "val":
        found["val"] = None
    return {split: path for split, path in found.items() if path is not None}


def sixteen_bit_white(paths: list[str]) -> int | None:
    """The white of a data set's 16-bit grey images, from a sample of them: a 12-bit camera's frames in a 16-bit PNG
    or TIFF (as microscopes and EL cameras write them) use values up to 4095 only, and read as 16-bit (0-65535 to
    0-255) they would reach the network in 16 grey levels at a sixteenth of full brightness. The smallest of
    SENSOR_BITS that holds every sampled value (None: no 16-bit image in the sample; a brighter image outside it
    reads its brightest values as white)."""
    peaks = []
    for path in paths:
        try:
            with Image.open(path) as image:
                if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
                    peaks.append(int(np.asarray(image).max()))
        except (OSError, ValueError):
            continue
    if not peaks or max(peaks) > SIXTEEN_BIT_WHITE:  # mode I beyond 16 bits is stretched image by image (data/images.py)
        return None
    bits = next(b for b in SENSOR_BITS if max(peaks) < 1 << b)
    if bits < 16:
        logger.info("%d of %d sampled training images are 16-bit with values up to %d, as a %d-bit camera writes "
                    "them: read with %d as white (unless --bit-depth says otherwise; 16 reads them as 16-bit)",
                    len(peaks), len(paths), max(peaks), bits, (1 << bits) - 1)
    return (1 << bits) - 1


def _say_val_beside(root: Path) -> None:
    """DATA/train given where DATA was meant: a val split is drawn at random from it, and the val folder beside
    it would go unread without a word."""
    if root.name.lower() not in TRAIN_DIR_NAMES or root.parent == root:
        return
    try:
        beside = split_folders(root.parent)
    except (DataError, OSError):  # a parent we may not list: nothing to say
        return
    if beside.get("train") == root and "val" in beside:
        logger.warning("%s is the train folder of %s, whose %s/ folder is not read: a val split is drawn from %s "
                       "instead (pass %s to validate on %s/)", root, root.parent, beside["val"].name, root.name,
                       root.parent, beside["val"].name)


def _find_split_dirs(root: Path, problems: _Problems) -> dict[str, Path]:
    """Return {"train": dir} or {"train": dir, "val": dir}; flat layouts use root as "train"."""
    split_dirs = split_folders(root)
    if "train" not in split_dirs:
        if "val" in split_dirs:
            val = split_dirs["val"].name
            raise DataError(f"{root} has a {val}/ folder but no train/ folder; add train/<class>/ folders next to it")
        return {"train": root}
    for name, path in _sorted_entries(root):
        if path in split_dirs.values():
            continue
        if _skip_special(name, path, problems):
            continue
        if path.is_dir() and name.lower() in TEST_DIR_NAMES:
            problems.add("test_folder", path, "a held-out test split: not read by training or the recipe search")
        elif path.is_dir():
            problems.add("unused_folder", path, "only train/ and val/ are read when a train/ folder exists")
        else:
            _outside_class_folder(path, problems)
    return split_dirs


def _sorted_entries(folder: Path) -> list[tuple[str, Path]]:
    try:
        return sorted((entry.name, Path(entry.path)) for entry in os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}; check its permissions") from None


def _skip_special(name: str, path: Path, problems: _Problems) -> bool:
    """Record hidden entries, OS junk and bad symlinks; True when the entry is to be skipped."""
    if name.lower() in OS_JUNK_NAMES:
        problems.add("os_junk", path, "operating system metadata " + ("folder" if path.is_dir() else "file"))
        return True
    if name.startswith("."):
        problems.add("hidden", path, "hidden folder (contents not read)" if path.is_dir() else "hidden file")
        return True
    if path.is_symlink():
        kind = _bad_symlink_kind(path)
        if kind:
            what = "loops back on itself" if kind == "symlink_loop" else "points to nothing"
            problems.add(kind, path, f"symlink to {os.readlink(path)} {what}")
            return True
    return False


def _bad_symlink_kind(path: Path) -> str | None:
    try:
        os.stat(path)
    except OSError as exc:
        return "symlink_loop" if exc.errno == errno.ELOOP else "broken_symlink"
    return None


def _outside_class_folder(path: Path, problems: _Problems) -> None:
    if has_image_extension(path.name):
        problems.add("image_outside_class_folder", path, "images must sit inside a class folder to get a label")
    else:
        problems.add("outside_class_folder", path, "not inside a class folder")


def _class_dirs(split_dir: Path, problems: _Problems) -> list[tuple[str, Path]]:
    classes = []
    for name, path in _sorted_entries(split_dir):
        if _skip_special(name, path, problems):
            continue
        if not path.is_dir():
            _outside_class_folder(path, problems)
        elif RunFolder(path).is_run() or _holds_only_runs(path):  # --out inside DATA, or runs/ of `train .`
            problems.add("run_folder", path, "transferkit's run folder(s), not training data")
        else:
            classes.append((name, path))
    return classes


def _holds_only_runs(path: Path) -> bool:
    """`runs/` of the default `--out`: run folders and nothing else (hidden entries aside)."""
    entries = [p for name, p in _sorted_entries(path) if not name.startswith(".")]
    return bool(entries) and all(p.is_dir() and RunFolder(p).is_run() for p in entries)


def _walk_class(class_dir: Path, problems: _Problems) -> list[tuple[str, bool, tuple]]:
    """Candidate image files under a class folder as (path, has_no_extension, file key), sorted."""
    candidates = []
    visited: set[tuple[int, int]] = set()

    def on_error(exc: OSError) -> None:
        problems.add("unreadable", exc.filename or class_dir, f"cannot list folder: {exc.strerror or exc}")

    # Following symlinked folders lets class folders be links into other disks; the checks
    # in _keep_dir and the `visited` set keep loops from making this walk endless.
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=on_error, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError as exc:  # removed while scanning, or a permission change
            problems.add("unreadable", dirpath, f"cannot read folder: {exc.strerror or exc}")
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in visited:
            problems.add("symlink_loop", dirpath, "folder reached twice through symlinks; skipped")
            dirnames[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if _keep_dir(Path(dirpath), d, problems))
        for name in sorted(filenames):
            candidate = _classify_file(os.path.join(dirpath, name), problems)
            if candidate is not None:
                candidates.append(candidate)
    return sorted(candidates)


def _keep_dir(parent: Path, name: str, problems: _Problems) -> bool:
    path = parent / name
    if name.startswith("."):
        problems.add("hidden", path, "hidden folder (contents not read)")
        return False
    if path.is_symlink():
        target = os.path.realpath(path)
        here = os.path.realpath(parent)
        if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
            problems.add("symlink_loop", path, f"symlink to {os.readlink(path)} points back to a parent folder")
            return False
    if RunFolder(path).is_run():
        problems.add("run_folder", path, "transferkit's run folder, not training data")
        return False
    return True


def _classify_file(path: str, problems: _Problems) -> tuple[str, bool, tuple] | None:
    """(path, has_no_extension, file key) of a candidate image, or None (recorded in `problems` where the
    file is skipped). Plain strings and one lstat per ordinary file: a 100,000-file walk spent ~1 s in
    pathlib and the second stat."""
    name = os.path.basename(path)
    if name.lower() in OS_JUNK_NAMES or name.startswith("."):
        _skip_special(name, Path(path), problems)  # recorded as OS junk or hidden
        return None
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            if _skip_special(name, Path(path), problems):
                return None
            info = os.stat(path)
    except OSError as exc:
        problems.add("unreadable", path, f"cannot stat file: {exc.strerror or exc}")
        return None
    if not stat.S_ISREG(info.st_mode):
        problems.add("unreadable", path, "not a regular file (device, pipe or socket)")
        return None
    if info.st_size == 0:
        problems.add("empty_file", path, "empty file (0 bytes)")
        return None
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    if ext and ext not in IMAGE_EXTENSIONS:
        problems.add("non_image", path, f"extension .{ext} is not an image type read here")
        return None
    return path, not ext, file_key(info)


def _usable(candidates, checks, problems: _Problems, fingerprints: dict[str, Fingerprint]) -> list[tuple[str, str | None]]:
    """The candidates whose check (the next ones of `checks`, in order) found nothing wrong, as (path, sha256 or
    None); what is wrong goes to `problems`, the verified images' fingerprints to `fingerprints`."""
    usable = []
    for (path, no_ext, _), (kind, detail, sha, fp) in zip(candidates, checks):
        if kind is not None:
            problems.add(kind, path, detail)
            continue
        if no_ext:
            problems.add("no_extension", path, "no file extension, but a readable image; used")
        usable.append((path, sha))
        if fp is not None:
            fingerprints[path] = fp
    return usable


def _checked_files(candidates: list[tuple[str, bool, tuple]], record: ScanRecord | None) -> list[tuple]:
    """_verify_one's answer for each candidate, in order, taken from the folder's scan `record` where the file is
    as recorded (data/scan_record.py); without a record (an unverified scan), _sniff_one's. A scan stopped by
    Ctrl-C records what it checked, so the same command goes on from there."""
    if record is None:
        return _checked_now(candidates, _sniff_one, [])
    recorded = [record.get(path, key) for path, _, key in candidates]
    missing = [c for c, check in zip(candidates, recorded) if check is None]
    fresh: list[tuple] = []
    try:
        _checked_now(missing, _verify_one, fresh)
    except signals.Interrupted:
        record.save(_record_rows(candidates, _merged(recorded, fresh)), pairs=None)
        raise
    if missing:
        logger.debug("scan: %d files checked, %d as an earlier scan recorded them", len(missing),
                     len(candidates) - len(missing))
    return _merged(recorded, fresh)


def _merged(recorded: list, fresh: list) -> list:
    """Each candidate's check: the record's, else the next of `fresh` (None past its end: a stopped scan)."""
    answers = iter(fresh)
    return [check if check is not None else next(answers, None) for check in recorded]


def _record_rows(candidates, checks) -> list[tuple]:
    """(path, file key, check) of every candidate whose check is known: what a scan record keeps."""
    return [(path, key, check) for (path, _, key), check in zip(candidates, checks) if check is not None]


def _checked_now(candidates: list[tuple[str, bool, tuple]], check, done: list) -> list[tuple]:
    """`check`'s answer for each candidate, in order, appended to `done` as they come (and returned). Checking
    a file is mostly Python (open, header, decode, hash, fingerprint: ~0.2 ms for a small PNG), so threads queue
    on one GIL: on a 2-core EPYC, 10,000 64-px PNGs took 3.5 s on two threads against 1.9 s on one, and
    1.0-1.25 s in two forked processes; on ELPV's 300-px cells, whose decoding releases the GIL, processes 2.0 s
    and threads 2.2 s. So a large folder is checked in forked processes on Linux (macOS's system libraries are
    not fork-safe, Windows has no fork); small ones, and elsewhere, in threads."""
    workers = _scan_workers()
    if len(candidates) >= SCAN_PROCESSES_FROM and workers > 1 and sys.platform.startswith("linux"):
        try:
            return _in_pool(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                initializer=_ignore_interrupts), check, candidates, done,
                            chunksize=max(16, min(256, len(candidates) // (8 * workers))))
        except BrokenProcessPool as exc:  # a process killed (out of memory, a crashing decoder): once more, here
            logger.warning("a data-scan process ended abnormally (%s); checking the files in this process instead", exc)
            done.clear()
    return _in_pool(ThreadPoolExecutor(workers), check, candidates, done)


def _in_pool(pool, check, candidates, done: list, chunksize: int = 1) -> list[tuple]:
    """The checks in order, appended to `done`. A stop asked for (the first Ctrl-C of a run: engine/signals.py)
    ends the scan at the next file, not after the last one (a million small files: minutes)."""
    try:
        for result in pool.map(check, [c[0] for c in candidates], [c[1] for c in candidates], chunksize=chunksize):
            done.append(result)
            signals.check_stop("the data scan", "run the same command to go on (the scan record keeps the files "
                                                "checked so far)")
        return done
    finally:  # a stop or a second Ctrl-C: the checks not started are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _scan_workers() -> int:
    """Checks at once: the cores this process may run on (its CPU affinity where the OS has one), at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def _ignore_interrupts() -> None:
    """In a scan process: Ctrl-C is the parent's to handle (it stops the pool); the processes just end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _verify_one(path: str, no_ext: bool) -> tuple[str | None, str, str | None, Fingerprint | None]:
    """(problem kind or None, detail, sha256, fingerprint of the decoded picture)."""
    try:
        img, size = read_rgb(path, shorter_side=SCAN_SHORTER_SIDE)
    except ImageDecodeError as exc:
        if no_ext and exc.kind == "not_an_image":
            return "non_image", "no file extension and not an image", None, None
        return exc.kind, exc.reason, None, None
    width, height = size
    if min(width, height) < MIN_SIDE:
        return "too_small", f"{width}×{height} pixels; a side under {MIN_SIDE} pixels carries no usable detail", None, None
    try:
        return None, "", file_sha256(path), fingerprint(img, size)
    except OSError as exc:
        return "unreadable", f"cannot read file: {exc.strerror or exc}", None, None


def _sniff_one(path: str, no_ext: bool) -> tuple[str | None, str, None, None]:
    """Without verification only extension-less files are opened, to see if they are images."""
    if not no_ext:
        return None, "", None, None
    try:
        with Image.open(path):
            return None, "", None, None
    except Exception:  # anything Pillow cannot even identify is not an image for us
        return "non_image", "no file extension and not an image", None, None


# ---------------------------------------------------------------- classes and splits


def _assemble_given_split(root: Path, train: dict, val: dict, problems: _Problems, split_dirs: dict) -> DataScan:
    train_dir, val_dir = split_dirs["train"], split_dirs["val"]
    for name in sorted(train):
        if not train[name]:
            if val.get(name):
                raise DataError(
                    f"class {name!r} has validation images but no usable training images; "
                    f"add images to {train_dir.name}/{name}/ or remove {val_dir.name}/{name}/"
                )
            problems.add("empty_class", train_dir / name, "no usable images; class dropped")
    classes = sorted(name for name in train if train[name])
    twins = case_twins(val, classes)  # Cat/ in train, cat/ in val: one class to the user, two to a scan
    for name in sorted(val):
        if name not in train:
            hint = f" ({train_dir.name}/{twins[name]}/ differs only in case: rename one)" if name in twins else ""
            for path, _ in val[name]:
                problems.add("val_class_not_in_train", path,
                             f"class {name!r} has no {train_dir.name}/{name}/ folder{hint}; skipped")
    _require_two_classes(root, classes, train_dir)
    for name in classes:
        if not val.get(name):
            problems.add("no_val_images", val_dir / name, f"class {name!r} has no validation images")
    index = {name: i for i, name in enumerate(classes)}
    train_samples = [(path, index[name]) for name in classes for path, _ in train[name]]
    val_samples = [(path, index[name]) for name in classes for path, _ in val.get(name, [])]
    if not val_samples:
        renames = sorted(twins)
        hint = (f" (its class folders {', '.join(renames)} differ from {train_dir.name}/'s only in case: rename them)"
                if renames else f"; put some images in {val_dir.name}/<class>/ folders")
        raise DataError(f"the validation folder {val_dir} has no usable images{hint}")
    return DataScan(root, classes, train_samples, val_samples, split_source="folders")


def _assemble_random_split(
    root: Path, train: dict, problems: _Problems, train_dir: Path, val_fraction: float, seed: int
) -> DataScan:
    for name in sorted(train):
        if not train[name]:
            problems.add("empty_class", train_dir / name, "no usable images; class dropped")
    classes = sorted(name for name in train if train[name])
    _require_two_classes(root, classes, train_dir)
    _say_split_like_classes(classes, train_dir)
    for name in classes:
        if len(train[name]) < 2:
            raise DataError(
                f"class {name!r} has only 1 usable image; a random train/val split needs at least 2 per class "
                "(add images, or give train/ and val/ folders)"
            )
    paths = [path for name in classes for path, _ in train[name]]
    labels = [i for i, name in enumerate(classes) for _ in train[name]]
    train_samples, val_samples = _stratified_split(paths, labels, len(classes), val_fraction, seed)
    return DataScan(root, classes, train_samples, val_samples, split_source="stratified")


def case_twins(names, known) -> dict[str, str]:
    """Each of `names` that is not one of `known` but is in another case (cat/ against Cat/) → that one: one name
    to a user, two to a file system that keeps case."""
    by_case = {name.casefold(): name for name in known}
    return {name: by_case[name.casefold()] for name in names if name not in known and name.casefold() in by_case}


def _say_split_like_classes(classes: list[str], class_parent: Path) -> None:
    """Class folders named like splits, one like a train folder and one like a test or val folder (seg_train/ and
    seg_test/, as a Kaggle zip nests its splits): a classifier of where an image was stored, unless said. A word of
    the name, not a part of one: "trains" is a class."""
    words = {name: set(re.split(r"[\W_]+", name.lower())) for name in classes}
    trains = [name for name in classes if words[name] & set(TRAIN_DIR_NAMES)]
    others = [name for name in classes if words[name] & (set(VAL_DIR_NAMES) | TEST_DIR_NAMES)]
    if trains and others:
        logger.warning("the class folders %s of %s look like splits, not classes: if they are, pass the folder "
                       "that holds the class folders of %s", ", ".join(sorted(trains + others)), class_parent,
                       trains[0])


def _stratified_split(paths, labels, n_classes, val_fraction, seed):
    n = len(paths)
    # Every class needs at least one val and one train image, so the val count has a floor.
    n_val = max(n_classes, math.ceil(val_fraction * n))
    if n - n_val < n_classes:
        raise DataError(
            f"only {n} usable images for {n_classes} classes: too few to split into train and val; add images"
        )
    from sklearn.model_selection import train_test_split  # ~0.8 s to import: only a folder without val/ needs it

    train_p, val_p, train_y, val_y = train_test_split(
        paths, labels, test_size=n_val, random_state=seed, stratify=labels
    )
    return sorted(zip(train_p, train_y), key=_sample_key), sorted(zip(val_p, val_y), key=_sample_key)


def _sample_key(sample: tuple[str, int]) -> tuple[int, str]:
    return sample[1], sample[0]


def _require_two_classes(root: Path, classes: list[str], class_parent: Path) -> None:
    if len(classes) < 2:
        found = ", ".join(classes) if classes else "none"
        wrapper = class_parent / classes[0] if classes else None
        if wrapper is not None and _holds_image_folders(wrapper):
            # An unzipped archive often wraps the data in one more folder: DATA/<name>/{train,val}/ or DATA/<name>/<class>/.
            raise DataError(f"found 1 class in {root}, {classes[0]}/, whose images are all in subfolders of its own: "
                            f"if those are the classes (or train/ and val/), pass {wrapper} as the data folder")
        advice = _named_by_class(class_parent) or "put each class's images in its own subfolder, e.g. cats/ and dogs/"
        raise DataError(f"found {len(classes)} class{'es' * (len(classes) != 1)} with usable images in {root} "
                        f"({found}); need at least 2: {advice}")


def _named_by_class(folder: Path) -> str | None:
    """Where the loose images of `folder` are named by class (cat.0.jpg, dog.0.jpg: Kaggle's dogs-vs-cats), the
    folders to make: at least two names, each the leading letters of two or more images."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.is_file() and has_image_extension(entry.name)]
    except OSError:
        return None
    prefixes: dict[str, int] = defaultdict(int)
    for name in names:
        match = re.match(r"[^\W\d_]+", name)
        if match:
            prefixes[match.group()] += 1
    classes = sorted(prefix for prefix, n in prefixes.items() if n >= 2)
    if len(classes) < 2:
        return None
    listed = ", ".join(c + ".*" for c in classes[:4]) + (", ..." if len(classes) > 4 else "")
    how = "move each class's images into a folder of its name"
    if len(classes) <= 8:  # a command short enough to read
        how += f", e.g. in that folder: for c in {' '.join(classes)}; do mkdir -p $c && mv $c[^a-zA-Z]* $c/; done"
    return f"the {len(names)} images in {folder} are named by class ({listed}): {how}"


def _holds_image_folders(folder: Path) -> bool:
    """Whether `folder` has subfolders and no image files of its own (its images are all further down)."""
    try:
        entries = list(os.scandir(folder))
        return (any(e.is_dir() and not e.name.startswith(".") for e in entries) and
                not any(e.is_file() and has_image_extension(e.name) for e in entries))
    except OSError:
        return False


# ---------------------------------------------------------------- duplicates and logging


def _hashes(found: dict) -> dict[str, str]:
    return {path: sha for classes in found.values() for files in classes.values() for path, sha in files if sha}


def _report_duplicates(scan: DataScan, hashes: dict[str, str], problems: _Problems) -> None:
    if not hashes:
        return  # not verified, so not hashed
    first_seen: dict[tuple[str, str], tuple[str, int]] = {}
    train_by_hash: dict[str, str] = {}
    for split, samples in (("train", scan.train), ("val", scan.val)):
        for path, label in samples:
            sha = hashes.get(path)
            if sha is None:
                continue
            if split == "val" and sha in train_by_hash:
                problems.add(
                    "duplicate_across_splits", path,
                    f"same content as {_relative(train_by_hash[sha], scan.root)} (train/val leakage)",
                )
            earlier = first_seen.get((split, sha))
            if earlier is None:
                first_seen[(split, sha)] = (path, label)
                if split == "train":
                    train_by_hash[sha] = path
                continue
            clash = "" if earlier[1] == label else f" but labelled {scan.classes[earlier[1]]!r}"
            problems.add("duplicate_within_split", path, f"same content as {_relative(earlier[0], scan.root)}{clash}")


def _keep_groups_together(scan: DataScan, groups: list[list[str]]) -> None:
    """Group-aware split: copies of one picture all go to the side most of them drew."""
    side = {path: "train" for path, _ in scan.train} | {path: "val" for path, _ in scan.val}
    moved = set(one_side_per_group(side, groups))
    samples = sorted(scan.train + scan.val, key=_sample_key)
    scan.train = [s for s in samples if side[s[0]] == "train"]
    scan.val = [s for s in samples if side[s[0]] == "val"]
    scan.grouping = {"groups": len(groups), "images_in_groups": sum(map(len, groups)), "moved": len(moved)}
    if groups:
        logger.info("group-aware split: %d groups of copies (%d images) kept on one side each; %d images moved",
                    len(groups), scan.grouping["images_in_groups"], len(moved))


def _report_same_pictures(scan: DataScan, pairs, problems: _Problems) -> None:
    """Val images that are a re-encoded/resized copy of a train image (byte copies are reported above)."""
    split = {path: "train" for path, _ in scan.train} | {path: "val" for path, _ in scan.val}
    reported = set()
    for a, b, corr in pairs:
        if {split.get(a), split.get(b)} != {"train", "val"} or scan.digests.get(a) == scan.digests.get(b):
            continue
        train_path, val_path = (a, b) if split[a] == "train" else (b, a)
        if val_path not in reported:
            reported.add(val_path)
            problems.add("same_picture_across_splits", val_path,
                         f"same picture as {_relative(train_path, scan.root)} (thumbnail correlation {corr:.4f})")


def _log_summary(scan: DataScan) -> None:
    counts = scan.class_counts()
    logger.info(
        "scanned %s: %d classes, %d train / %d val images (split: %s)",
        scan.root, len(scan.classes), sum(counts["train"].values()), sum(counts["val"].values()), scan.split_source,
    )


# ---------------------------------------------------------------- manifest


def write_manifest(scan: DataScan, path) -> None:
    """CSV of every sample: path relative to the data root (posix), class name, split."""
    with open(path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerow(MANIFEST_COLUMNS)
        for split, samples in (("train", scan.train), ("val", scan.val)):
            for sample_path, label in samples:
                writer.writerow([_relative(sample_path, scan.root), scan.classes[label], split])


def read_manifest(path, root, *, verify_images=False) -> DataScan:
    """Rebuild a run's exact split from its manifest; rows may not point outside `root`."""
    root = _check_root(root)
    problems = _Problems(root, strict=False)
    by_split: dict[str, dict[str, list[tuple[str, None]]]] = {"train": {}, "val": {}}
    for line, rel, name, split in _manifest_rows(path, root):
        full = root.joinpath(*PurePosixPath(rel).parts)
        by_split[split].setdefault(name, [])
        if not full.is_file():
            problems.add("missing", full, "listed in the manifest but not found")
            continue
        if verify_images:
            kind, detail, *_ = _verify_one(str(full), not full.suffix)
            if kind is not None:
                problems.add(kind, full, detail)
                continue
        by_split[split][name].append((str(full), None))
    split_dirs = {"train": root / "train", "val": root / "val"}  # only used to word messages
    scan = _assemble_given_split(root, by_split["train"], by_split["val"], problems, split_dirs)
    scan.split_source = "manifest"
    scan.problems = dict(problems.items)
    return scan


def _manifest_rows(path, root: Path):
    try:
        fp = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with fp:
        reader = csv.DictReader(fp)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"manifest {path} lacks column(s) {', '.join(missing)}; expected a header path,class,split")
        for row in reader:
            line = reader.line_num
            rel, name, split = (row.get(c) or "" for c in MANIFEST_COLUMNS)
            if split not in ("train", "val"):
                raise DataError(f"manifest {path} line {line}: split must be train or val, got {split!r}")
            if not rel or not name:
                raise DataError(f"manifest {path} line {line}: empty path or class")
            _refuse_escape(path, line, rel, root)
            yield line, rel, name, split


def _refuse_escape(manifest, line: int, rel: str, root: Path) -> None:
    """Lexical check: a manifest may only name files under the data root."""
    escapes = (
        PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).drive != ""
        or ".." in PurePosixPath(rel.replace("\\", "/")).parts
    )
    if escapes:
        raise DataError(
            f"manifest {manifest} line {line}: path {rel!r} points outside the data folder {root}; refusing it"
        )
