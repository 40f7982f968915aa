"""What a scan records about the files it skips or only reports, and the words it says them in."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

from transferkit.errors import DataError

logger = logging.getLogger(__name__)

# Kinds that skip nothing the user meant to train on; strict mode does not stop on them.
INFORMATIONAL_KINDS = frozenset({"no_extension", "hidden", "os_junk", "outside_class_folder", "unused_folder",
                                 "test_folder", "run_folder", "dataset_manifest"})
# Kinds recorded in data_report.json without a summary line: nothing the user needs to act on or know.
SILENT_KINDS = frozenset({"dataset_manifest"})

# Summary wording per kind, in report order; "{n}" is the count, the other fields are
# nouns that agree with it.
KIND_TEXT = {
    "corrupt": "skipped {n} corrupt or truncated {images}",
    "not_an_image": "skipped {n} {files} with an image extension but no image inside",
    "non_image": "skipped {n} non-image {files}",
    "heic": "skipped {n} HEIC/HEIF {images}, which Pillow here cannot decode: convert them to JPEG or PNG",
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
    "run_folder": "ignored {n} {folders} of transferkit's output (runs, data checks) inside the data folder",
}


def kind_text(kind: str, n: int) -> str:
    one = n == 1
    singular = {"images": "image", "files": "file", "loops": "loop", "symlinks": "symlink",
                "folders": "folder", "classes": "class", "entries": "entry"}
    nouns = {plural: one_word if one else plural for plural, one_word in singular.items()}
    template = KIND_TEXT.get(kind, "{n} problems of kind " + kind)
    return template.format(n=n, are="is" if one else "are", have="has" if one else "have", **nouns)


class Problems:
    """Collects problems by kind; in strict mode the first real problem is fatal."""

    def __init__(self, root: Path, strict: bool):
        self.root = root
        self.strict = strict
        self.items: dict[str, list[dict]] = defaultdict(list)

    def add(self, kind: str, path, detail: str, split: str | None = None) -> None:
        """split: the split a manifest listed the file in, where that is known before the file is read."""
        rel = relative(path, self.root)
        self.items[kind].append({"path": rel, "detail": detail, **({"split": split} if split else {})})
        logger.debug("%s: %s: %s", kind, rel, detail)
        if self.strict and kind not in INFORMATIONAL_KINDS:
            raise DataError(
                f"{kind}: {rel}: {detail} (strict data checking stops at the first problem; "
                "fix or remove the file, or turn strict checking off)"
            )


def relative(path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()
