"""Walking a data folder: which subfolders are splits and classes, and which files are candidate images
(hidden entries, OS junk, bad symlinks, run folders and non-images recorded and left out).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Iterator

from transferkit.data.images import HEIF_EXTENSIONS, HEIF_WORDS, IMAGE_EXTENSIONS, has_image_extension
from transferkit.data.scan_record import file_key
from transferkit.errors import DataError
from transferkit.run_folder import RunFolder

from .problems import Problems

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
# What `transferkit data elpv` writes beside train/ and val/ (data/builtin.py): recorded in data_report.json but
# not warned about, so `make demo`'s first line is not a warning about the tool's own file.
ELPV_MANIFEST = "elpv.json"
CHECK_FILES = ("check.json", "check.html")  # what `data check` writes (datacheck.run_check)


def check_root(root) -> Path:
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


def say_val_beside(root: Path) -> None:
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


def find_split_dirs(root: Path, problems: Problems) -> dict[str, Path]:
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
        elif name == ELPV_MANIFEST:
            problems.add("dataset_manifest", path, "written by `transferkit data`: where the images came from")
        else:
            _outside_class_folder(path, problems)
    return split_dirs


def _sorted_entries(folder: Path) -> list[tuple[str, Path]]:
    try:
        return sorted((entry.name, Path(entry.path)) for entry in os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}; check its permissions") from None


def _skip_special(name: str, path: Path, problems: Problems) -> bool:
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
        if _points_to_a_parent(path):  # a class folder linked to `..`: the data root again, as one class
            problems.add("symlink_loop", path, f"symlink to {os.readlink(path)} points back to a parent folder")
            return True
    return False


def _points_to_a_parent(path: Path) -> bool:
    """A symlink to the folder it sits in or to a folder above it (a loop the walk would enter once)."""
    target, here = os.path.realpath(path), os.path.realpath(path.parent)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _bad_symlink_kind(path: Path) -> str | None:
    try:
        os.stat(path)
    except OSError as exc:
        return "symlink_loop" if exc.errno == errno.ELOOP else "broken_symlink"
    return None


def _outside_class_folder(path: Path, problems: Problems) -> None:
    if has_image_extension(path.name):
        problems.add("image_outside_class_folder", path, "images must sit inside a class folder to get a label")
    else:
        problems.add("outside_class_folder", path, "not inside a class folder")


def class_dirs(split_dir: Path, problems: Problems) -> list[tuple[str, Path]]:
    classes = []
    for name, path in _sorted_entries(split_dir):
        if _skip_special(name, path, problems):
            continue
        if not path.is_dir():
            _outside_class_folder(path, problems)
        elif holds_runs(path):
            problems.add("run_folder", path, "transferkit's output (runs or a data check), not training data")
        else:
            classes.append((name, path))
    return classes


def holds_runs(path: Path) -> bool:
    """A run folder (--out inside DATA) or `runs/` of `train .`: no class, for training and evaluate alike."""
    return is_output_folder(path) or _holds_only_runs(path)


def is_output_folder(path: Path) -> bool:
    """A folder transferkit wrote: a run's, or a `data check`'s (its --out inside DATA, or runs/check-* of
    `data check .`), whose check.json and check.html would read as a class of unusable files."""
    return RunFolder(path).is_run() or all((path / name).is_file() for name in CHECK_FILES)


def _holds_only_runs(path: Path) -> bool:
    """`runs/` of the default `--out`: run and check folders and nothing else (hidden entries aside)."""
    entries = [p for name, p in _sorted_entries(path) if not name.startswith(".")]
    return bool(entries) and all(p.is_dir() and is_output_folder(p) for p in entries)


def walk_class(class_dir: Path, problems: Problems) -> list[tuple[str, bool, tuple]]:
    """Candidate image files under a class folder as (path, has_no_extension, file key), sorted."""
    candidates = []
    for dirpath, filenames in folders_under(class_dir, problems):
        for name in filenames:
            candidate = _classify_file(os.path.join(dirpath, name), problems)
            if candidate is not None:
                candidates.append(candidate)
    return sorted(candidates)


def folders_under(top: Path, problems: Problems) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names sorted) for every folder under `top` a scan reads, top-down: hidden folders, run
    folders and links back up skipped, each folder once (recorded in `problems`). Following symlinked folders lets
    class folders be links into other disks; the checks in _keep_dir and the `visited` set keep loops from making
    this walk endless. Training's scan and predict's folders (inference.expand_inputs) walk alike."""
    visited: set[tuple[int, int]] = set()

    def on_error(exc: OSError) -> None:
        problems.add("unreadable", exc.filename or top, f"cannot list folder: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=True):
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
        yield dirpath, sorted(filenames)


def _keep_dir(parent: Path, name: str, problems: Problems) -> bool:
    path = parent / name
    if name.startswith("."):
        problems.add("hidden", path, "hidden folder (contents not read)")
        return False
    if path.is_symlink() and _points_to_a_parent(path):
        problems.add("symlink_loop", path, f"symlink to {os.readlink(path)} points back to a parent folder")
        return False
    if is_output_folder(path):
        problems.add("run_folder", path, "transferkit's output (a run or a data check), not training data")
        return False
    return True


def _classify_file(path: str, problems: Problems) -> tuple[str, bool, tuple] | None:
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
    if ext in HEIF_EXTENSIONS:  # an iPhone's photos: they were "non-image files"
        problems.add("heic", path, HEIF_WORDS)
        return None
    if ext and ext not in IMAGE_EXTENSIONS:
        problems.add("non_image", path, f"extension .{ext} is not an image type read here")
        return None
    return path, not ext, file_key(info)
