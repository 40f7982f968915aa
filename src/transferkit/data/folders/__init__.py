"""Find the images of a dataset folder, check each one, and decide the train/val split.

Layouts: ROOT/train/<class>/ + ROOT/val/<class>/ (split given), ROOT/train/<class>/ alone or
ROOT/<class>/ (stratified random split made here). Files in subfolders of a class folder
belong to that class. Every file that is skipped is recorded in `DataScan.problems`
(except the contents of hidden folders, which are recorded once per folder).

`scan_dataset` runs the steps in order, one module each: walk.py finds the splits, classes and candidate files;
checks.py decodes, hashes and fingerprints each file (or takes it from the folder's scan record); splits.py makes
the train/val samples and reports duplicates and leakage; problems.py words what was skipped; scan.py holds the
result (DataScan) and its subsamples; manifest.py writes a run's split as CSV and reads it back.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from transferkit.data.fingerprint import Fingerprint, groups_of, same_picture_pairs
from transferkit.data.images import SIXTEEN_BIT_MODES, quiet_pillow
from transferkit.data.scan_record import ScanRecord, scan_settings
from transferkit.config import DEFAULT_VAL_FRACTION, SENSOR_BITS
from transferkit.preprocessing import SIXTEEN_BIT_WHITE
from transferkit.errors import UsageError

from . import checks
from .checks import file_sha256, keep_usable, record_rows
from .manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from .problems import INFORMATIONAL_KINDS, Problems
from .scan import IMBALANCE_WARN_RATIO, DataScan, check_subsample, subsample_order, subsample_train
from .splits import (assemble_given_split, assemble_random_split, case_twins, digests_of, keep_groups_together,
                     report_duplicates, report_same_pictures)
from .walk import (CHECK_FILES, TEST_DIR_NAMES, TRAIN_DIR_NAMES, VAL_DIR_NAMES, check_root, class_dirs,
                   find_split_dirs, holds_runs, say_val_beside, split_folders, walk_class)

# What the rest of transferkit uses, importable from here as before the module became a package.
__all__ = ["BIT_DEPTH_SAMPLE", "CHECK_FILES", "IMBALANCE_WARN_RATIO", "INFORMATIONAL_KINDS", "MANIFEST_COLUMNS", "TEST_DIR_NAMES",
           "TRAIN_DIR_NAMES", "VAL_DIR_NAMES", "DataScan", "case_twins", "check_subsample", "file_sha256",
           "holds_runs", "read_manifest", "scan_dataset", "sixteen_bit_white", "split_folders", "subsample_order",
           "subsample_train", "write_manifest"]

logger = logging.getLogger(__name__)

BIT_DEPTH_SAMPLE = 16  # training images whose pixel values give the data's 16-bit white (sixteen_bit_white)


def scan_dataset(root, *, val_fraction=DEFAULT_VAL_FRACTION, seed=0, strict=False, verify_images=True,
                 group_duplicates=True) -> DataScan:
    """Scan `root`, check every candidate image and return the usable train/val samples.

    A split made here keeps copies of one picture (same content, or re-encoded/resized: see
    data/fingerprint.py) on one side when `group_duplicates` (and images are verified)."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    root = check_root(root)
    problems = Problems(root, strict)
    split_dirs = find_split_dirs(root, problems)
    if "val" not in split_dirs:
        say_val_beside(root)
    walked = {split: {name: walk_class(class_dir, problems) for name, class_dir in class_dirs(split_dir, problems)}
              for split, split_dir in split_dirs.items()}
    # Every file checked in one go (one pool for the whole folder, not one per class), then sorted back by class;
    # a verifying scan takes the checks of files unchanged since an earlier scan from the folder's record.
    record = ScanRecord(root, scan_settings(checks.MIN_SIDE, checks.SCAN_SHORTER_SIDE)) if verify_images else None
    candidates = [c for split in walked.values() for cands in split.values() for c in cands]
    checked = checks.checked_files(candidates, record)
    answers = iter(checked)
    found: dict[str, dict[str, list[tuple[str, str | None]]]] = {}
    fingerprints: dict[str, Fingerprint] = {}
    for split, classes in walked.items():
        found[split] = {name: keep_usable(candidates, answers, problems, fingerprints)
                        for name, candidates in classes.items()}
    digests = digests_of(found)
    pairs = record.pairs if record is not None and record.unchanged else same_picture_pairs(fingerprints)
    if record is not None:
        record.save(record_rows(candidates, checked), pairs)
    if "val" in found:
        if val_fraction != DEFAULT_VAL_FRACTION:  # asked for: a split the folder's own val/ overrides
            logger.warning("--val-fraction %g is not used: %s has its own val/ folder", val_fraction, root)
        scan = assemble_given_split(root, found["train"], found["val"], problems, split_dirs)
    else:
        scan = assemble_random_split(root, found["train"], problems, split_dirs["train"], val_fraction, seed)
        if group_duplicates and verify_images:
            keep_groups_together(scan, groups_of(pairs, digests))
    scan.digests, scan.fingerprints = digests, fingerprints
    report_duplicates(scan, scan.digests, problems)
    report_same_pictures(scan, pairs, problems)
    scan.problems = dict(problems.items)
    _log_summary(scan)
    step = max(1, len(scan.train) // BIT_DEPTH_SAMPLE)  # spread over the classes (the list is sorted by class)
    scan.sixteen_bit_white = sixteen_bit_white([path for path, _ in scan.train[::step][:BIT_DEPTH_SAMPLE]])
    return scan


def sixteen_bit_white(paths: list[str]) -> int | None:
    """The white of a data set's 16-bit grey images, from a sample of them: a 12-bit camera's frames in a 16-bit PNG
    or TIFF (as microscopes and EL cameras write them) use values up to 4095 only, and read as 16-bit (0-65535 to
    0-255) they would reach the network in 16 grey levels at a sixteenth of full brightness. The smallest of
    SENSOR_BITS that holds every sampled value (None: no 16-bit image in the sample; a brighter image outside it
    reads its brightest values as white)."""
    peaks = []
    for path in paths:
        try:
            with quiet_pillow(), Image.open(path) as image:  # a damaged TIFF tag: Pillow's warning was printed
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


def _log_summary(scan: DataScan) -> None:
    counts = scan.class_counts()
    logger.info(
        "scanned %s: %d classes, %d train / %d val images (split: %s)",
        scan.root, len(scan.classes), sum(counts["train"].values()), sum(counts["val"].values()), scan.split_source,
    )
