"""A run's split as a CSV (path, class, split), and the split rebuilt from it."""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath, PureWindowsPath

from transferkit.errors import DataError

from . import checks
from .problems import Problems, relative
from .scan import DataScan
from .splits import assemble_given_split
from .walk import check_root

MANIFEST_COLUMNS = ("path", "class", "split")


def write_manifest(scan: DataScan, path) -> None:
    """CSV of every sample: path relative to the data root (posix), class name, split."""
    # surrogateescape: a file name that is not UTF-8 (a Latin-1 zip's café.png) is written as its bytes on disk, and
    # read back (below) as the same name; it was a UnicodeEncodeError traceback as the run began
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fp:
        writer = csv.writer(fp)
        writer.writerow(MANIFEST_COLUMNS)
        for split, samples in (("train", scan.train), ("val", scan.val)):
            for sample_path, label in samples:
                writer.writerow([relative(sample_path, scan.root), scan.classes[label], split])


def read_manifest(path, root, *, verify_images=False) -> DataScan:
    """Rebuild a run's exact split from its manifest; rows may not point outside `root`."""
    root = check_root(root)
    problems = Problems(root, strict=False)
    by_split: dict[str, dict[str, list[tuple[str, None]]]] = {"train": {}, "val": {}}
    for line, rel, name, split in _manifest_rows(path, root):
        full = root.joinpath(*PurePosixPath(rel).parts)
        by_split[split].setdefault(name, [])
        if not full.is_file():
            problems.add("missing", full, f"listed in the manifest's {split} split but not found", split=split)
            continue
        if verify_images:
            kind, detail, *_ = checks.verify_one(str(full), not full.suffix)  # through the module, as the scan
            if kind is not None:
                problems.add(kind, full, detail)
                continue
        by_split[split][name].append((str(full), None))
    split_dirs = {"train": root / "train", "val": root / "val"}  # only used to word messages
    scan = assemble_given_split(root, by_split["train"], by_split["val"], problems, split_dirs)
    scan.split_source = "manifest"
    scan.problems = dict(problems.items)
    return scan


def _manifest_rows(path, root: Path):
    try:
        # utf-8-sig: a split.csv saved from Excel (CSV UTF-8) starts with a byte-order mark, and its header's
        # "path" column was not found
        fp = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with fp:
        try:
            yield from _rows_of(path, root, csv.DictReader(fp))
        except (UnicodeDecodeError, csv.Error) as exc:  # was a traceback: a UTF-16 or binary file given as the CSV
            raise DataError(f"cannot read manifest {path}: not a UTF-8 text CSV ({str(exc).splitlines()[0]})"
                            ) from None


def _rows_of(path, root: Path, reader: csv.DictReader):
    if any(_not_text(name) for name in reader.fieldnames or []):  # file names may hold any bytes; the header not
        raise DataError(f"cannot read manifest {path}: not a UTF-8 text CSV (its header is not text)")
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


def _not_text(name: str) -> bool:
    """A NUL (UTF-16's every other byte) or a byte that is not UTF-8 (read as a lone surrogate)."""
    return "\0" in name or any("\udc80" <= ch <= "\udcff" for ch in name)


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
