"""From the usable files of each class to the train/val samples: the folders' own split or a stratified one made
here, copies of one picture kept on one side, and duplicates and leakage reported.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from transferkit.data.fingerprint import one_side_per_group
from transferkit.data.images import has_image_extension
from transferkit.errors import DataError
from transferkit.run_folder import RunFolder

from .problems import INFORMATIONAL_KINDS, Problems, kind_text, relative
from .scan import DataScan
from .walk import TEST_DIR_NAMES, TRAIN_DIR_NAMES, VAL_DIR_NAMES

logger = logging.getLogger(__name__)


def assemble_given_split(root: Path, train: dict, val: dict, problems: Problems, split_dirs: dict) -> DataScan:
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
    _require_two_classes(root, classes, train_dir, problems)
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


def assemble_random_split(
    root: Path, train: dict, problems: Problems, train_dir: Path, val_fraction: float, seed: int
) -> DataScan:
    for name in sorted(train):
        if not train[name]:
            problems.add("empty_class", train_dir / name, "no usable images; class dropped")
    classes = sorted(name for name in train if train[name])
    _require_two_classes(root, classes, train_dir, problems)
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
        if n >= 2 * n_classes:  # enough images: it is the fraction that leaves too few for training
            raise DataError(f"--val-fraction {val_fraction:g} leaves {n - n_val} of the {n} usable images for "
                            f"training, fewer than one per class ({n_classes}); lower --val-fraction")
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


def _require_two_classes(root: Path, classes: list[str], class_parent: Path, problems: Problems) -> None:
    if len(classes) < 2:
        found = ", ".join(classes) if classes else "none"
        wrapper = class_parent / classes[0] if classes else None
        if wrapper is not None and _holds_image_folders(wrapper):
            # An unzipped archive often wraps the data in one more folder: DATA/<name>/{train,val}/ or DATA/<name>/<class>/.
            raise DataError(f"found 1 class in {root}, {classes[0]}/, whose images are all in subfolders of its own: "
                            f"if those are the classes (or train/ and val/), pass {wrapper} as the data folder")
        dropped = [Path(row["path"]).name for row in problems.items.get("empty_class", [])]
        if dropped:
            # The class folders are there but their files were all skipped: "put each class's images in its own
            # subfolder" would send the user looking for a mistake they did not make.
            skipped = [kind_text(kind, len(rows)) for kind, rows in problems.items.items()
                       if kind not in INFORMATIONAL_KINDS and kind != "empty_class"]
            why = f"{'; '.join(skipped)}; `transferkit -v` names each file" if skipped else "no image files"
            raise DataError(f"found {len(classes)} class{'es' * (len(classes) != 1)} with usable images in {root} "
                            f"({found}); need at least 2: the class folder{'s' * (len(dropped) != 1)} "
                            f"{', '.join(dropped)} held no usable image ({why})")
        advice = (_named_by_class(class_parent) or _runs_advice(root, class_parent, classes, problems)
                  or "put each class's images in its own subfolder, e.g. cats/ and dogs/")
        raise DataError(f"found {len(classes)} class{'es' * (len(classes) != 1)} with usable images in {root} "
                        f"({found}); need at least 2: {advice}")


def _runs_advice(root: Path, class_parent: Path, classes: list[str], problems: Problems) -> str | None:
    """Where DATA is a run folder, or holds only run folders (runs/, a compare's --out): the data is elsewhere."""
    if RunFolder(root).is_run() or RunFolder(class_parent).is_run():
        return "this is a transferkit run folder; pass the data folder the run trained on (`data:` in its config.yaml)"
    if not classes and problems.items.get("run_folder"):
        return "its folders are transferkit run folders; pass the data folder the runs trained on"
    return None


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


def digests_of(found: dict) -> dict[str, str]:
    return {path: sha for classes in found.values() for files in classes.values() for path, sha in files if sha}


def report_duplicates(scan: DataScan, hashes: dict[str, str], problems: Problems) -> None:
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
                    f"same content as {relative(train_by_hash[sha], scan.root)} (train/val leakage)",
                )
            earlier = first_seen.get((split, sha))
            if earlier is None:
                first_seen[(split, sha)] = (path, label)
                if split == "train":
                    train_by_hash[sha] = path
                continue
            clash = "" if earlier[1] == label else f" but labelled {scan.classes[earlier[1]]!r}"
            problems.add("duplicate_within_split", path, f"same content as {relative(earlier[0], scan.root)}{clash}")


def keep_groups_together(scan: DataScan, groups: list[list[str]]) -> None:
    """Group-aware split: copies of one picture all go to the side most of them drew."""
    side = {path: "train" for path, _ in scan.train} | {path: "val" for path, _ in scan.val}
    moved = set(one_side_per_group(side, groups))
    scan.grouping = {"groups": len(groups), "images_in_groups": sum(map(len, groups)), "moved": len(moved)}
    empty = {"train", "val"} - set(side.values())
    if empty:  # all copies of a few pictures: training found no val images ("no image could be read")
        logger.warning("group-aware split not used: keeping the copies of each picture on one side left no %s "
                       "images; the plain stratified split has copies on both sides (leakage)", empty.pop())
        scan.grouping.update(moved=0, not_used="it left a split empty")
        return
    samples = sorted(scan.train + scan.val, key=_sample_key)
    scan.train = [s for s in samples if side[s[0]] == "train"]
    scan.val = [s for s in samples if side[s[0]] == "val"]
    if groups:
        logger.info("group-aware split: %d groups of copies (%d images) kept on one side each; %d images moved",
                    len(groups), scan.grouping["images_in_groups"], len(moved))


def report_same_pictures(scan: DataScan, pairs, problems: Problems) -> None:
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
                         f"same picture as {relative(train_path, scan.root)} (thumbnail correlation {corr:.4f})")
