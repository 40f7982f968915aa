"""Ready-made datasets: ELPV solar cells (installed with the `elpv-dataset` package) and the
PyTorch tutorial's ants/bees (hymenoptera) zip, both written as ROOT/{train,val}/<class>/ folders.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import http.client
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from transferkit.data.fingerprint import (SAME_PICTURE_CORRELATION, fingerprint, groups_of, one_side_per_group,
                                          same_picture_pairs)
from transferkit.data.folders.walk import ELPV_MANIFEST
from transferkit.data.images import load_rgb
from transferkit.errors import DataError, UsageError
from transferkit.io import staged_folder

logger = logging.getLogger(__name__)

ELPV_FORMAT = 1
ELPV_VAL_FRACTION = 0.25
# Defect probabilities in the labels are 0, 1/3, 2/3 and 1.
ELPV_LEVEL_NAMES = ("p000", "p033", "p067", "p100")

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
# No published checksum could be found; with None only the zip's own CRCs are checked.
HYMENOPTERA_SHA256: str | None = None
HYMENOPTERA_FOLDER = "hymenoptera_data"
_CHUNK = 1 << 20


# ---------------------------------------------------------------- ELPV


def materialize_elpv(out, classes=2, seed=0, group_duplicates=True,
                     group_correlation=SAME_PICTURE_CORRELATION) -> dict:
    """Write the ELPV images as OUT/{train,val}/<class>/*.png (75/25, stratified by defect
    probability × cell type). Re-running with the same arguments does nothing.

    With `group_duplicates`, images whose thumbnails correlate at `group_correlation` or more
    (data/fingerprint.py) are kept on one side. At the default threshold ELPV has no such pair, so
    the split is the one made without grouping; a lower threshold (e.g. 0.995, neighbouring cells of
    one module) moves images, and the folder records it.

    Files are hard links to the package's images where possible (no extra space), so edit
    copies of them rather than the files in place."""
    if classes not in (2, 4):
        raise UsageError(f"ELPV comes with 2 classes (functional/defective) or 4 (defect probability levels), not {classes}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:  # scikit-learn's range
        raise UsageError(f"--seed must be a whole number from 0 to 2**32 - 1, not {seed!r}")
    if group_duplicates and not -1 <= group_correlation <= 1:  # nan too: it made a folder no rerun matched
        raise UsageError(f"--group-correlation must be a correlation between -1 and 1, not {group_correlation}")
    out = Path(out).expanduser()
    wanted = {"format": ELPV_FORMAT, "classes": classes, "seed": seed}
    if not group_duplicates or group_correlation != SAME_PICTURE_CORRELATION:
        # Only a non-default grouping is part of the folder's identity: folders made before grouping
        # existed hold the same split as the default (ELPV has no copies at the default threshold).
        wanted["group_correlation"] = group_correlation if group_duplicates else None
    existing = _existing_elpv(out, wanted)
    if existing is not None:
        logger.info("ELPV already materialized in %s", out)
        return existing
    data_dir = _elpv_data_dir()
    records = _read_elpv_labels(data_dir / "labels.csv")
    summary = _write_elpv(out, data_dir, records, wanted)
    logger.info("wrote %d ELPV images to %s (%s)", len(records), out, summary["method"])
    return summary


def _existing_elpv(out: Path, wanted: dict) -> dict | None:
    """The summary of an identical earlier run, None for a fresh folder; refuses anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UsageError(f"{out} is a file; choose a folder to write the ELPV dataset into")
    if not any(out.iterdir()):
        return None
    marker = out / ELPV_MANIFEST
    try:
        summary = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    summary = summary if isinstance(summary, dict) else None  # a JSON list there was an AttributeError
    # group_correlation is compared even where not asked for (absent: the default split, as None is): a folder
    # grouped at 0.995 (images moved) was taken for the default split
    if (summary and all(summary.get(k) == wanted.get(k) for k in {*wanted, "group_correlation"})
            and (out / "train").is_dir()):
        summary.pop("files", None)
        return {**summary, "out": str(out), "created": False}
    held = f" (it holds ELPV made with {_elpv_options(summary)})" if summary and "seed" in summary else ""
    raise UsageError(f"{out} is not empty and does not hold ELPV made with {_elpv_options(wanted)}{held}; "
                     "choose another folder")


def _elpv_options(made: dict) -> str:
    """classes=2, seed=0 and the grouping where it is not the default (that split was made otherwise)."""
    grouping = f", group_correlation={made['group_correlation']}" if made.get("group_correlation") else ""
    return f"classes={made.get('classes')}, seed={made.get('seed')}{grouping}"


def _elpv_data_dir() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.origin:
        raise DataError("the elpv-dataset package is not installed; install it with: pip install elpv-dataset")
    data_dir = Path(spec.origin).parent / "data"
    if not (data_dir / "labels.csv").is_file():
        raise DataError(f"the elpv-dataset package at {data_dir.parent} has no data/labels.csv; reinstall it")
    return data_dir


def _read_elpv_labels(labels_csv: Path) -> list[dict]:
    """labels.csv rows are whitespace separated: images/cellNNNN.png probability type."""
    records = []
    for line in labels_csv.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rel, probability, cell_type = line.split()
        level = round(float(probability) * 3)  # 0..3 for p = 0, 1/3, 2/3, 1
        records.append({"file": rel, "probability": float(probability), "level": level, "type": cell_type})
    return records


def _elpv_class(record: dict, classes: int) -> str:
    if classes == 4:
        return ELPV_LEVEL_NAMES[record["level"]]
    return "defective" if record["probability"] > 0.5 else "functional"


def _write_elpv(out: Path, data_dir: Path, records: list[dict], wanted: dict) -> dict:
    # Stratifying on the four probability levels × cell type also stratifies the 2-class labels.
    strata = [f"{r['level']}-{r['type']}" for r in records]
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(
        list(range(len(records))), test_size=ELPV_VAL_FRACTION, random_state=wanted["seed"], stratify=strata
    )
    splits = {i: "train" for i in train_idx} | {i: "val" for i in val_idx}
    grouping = _group_elpv(data_dir, records, splits, wanted.get("group_correlation", SAME_PICTURE_CORRELATION))
    names = {_elpv_class(r, wanted["classes"]) for r in records}
    for split in ("train", "val"):  # a low correlation joins every image into one group, on one side
        lacking = names - {_elpv_class(records[i], wanted["classes"]) for i, side in splits.items() if side == split}
        if lacking:
            raise UsageError(f"--group-correlation {grouping.get('correlation')} joins so many images into groups "
                             f"that {split}/ gets no {', '.join(sorted(lacking))} image; use a value nearer 1 "
                             f"(default {SAME_PICTURE_CORRELATION})")
    # Built next to OUT and renamed at the end, so an interrupted run leaves no half dataset in OUT.
    with staged_folder(out) as staging:
        methods = Counter()
        files = []
        for i, record in enumerate(records):
            name = _elpv_class(record, wanted["classes"])
            target = staging / splits[i] / name / Path(record["file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            methods[_link_or_copy(data_dir / record["file"], target)] += 1
            files.append({**record, "split": splits[i], "class": name})
        summary = {**_elpv_summary(out, files, wanted, methods), "duplicate_grouping": grouping}
        (staging / ELPV_MANIFEST).write_text(json.dumps({**summary, "files": files}, indent=1) + "\n", encoding="utf-8")
    return {**summary, "created": True}


def _group_elpv(data_dir: Path, records: list[dict], splits: dict[int, str], threshold: float | None) -> dict:
    """Keep groups of look-alike images on one side of the split (in place); what was done."""
    if threshold is None:
        return {"enabled": False}
    fingerprints = {i: fingerprint(load_rgb(data_dir / r["file"])) for i, r in enumerate(records)}
    groups = groups_of(same_picture_pairs(fingerprints, threshold))
    moved = one_side_per_group(splits, groups)
    logger.info("ELPV group-aware split (thumbnail correlation >= %s): %d groups of %d images, %d moved",
                threshold, len(groups), sum(map(len, groups)), len(moved))
    return {"enabled": True, "correlation": threshold, "groups": len(groups),
            "images_in_groups": sum(map(len, groups)), "moved": len(moved)}


def _link_or_copy(source: Path, target: Path) -> str:
    # Hard links cost no space; they fail across filesystems or where links are not allowed.
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        shutil.copyfile(source, target)
        return "copy"


def _elpv_summary(out: Path, files: list[dict], wanted: dict, methods: Counter) -> dict:
    counts = {split: dict(sorted(Counter(f["class"] for f in files if f["split"] == split).items())) for split in ("train", "val")}
    try:
        version = importlib.metadata.version("elpv-dataset")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        **wanted,
        "out": str(out),
        "class_names": sorted(counts["train"]),
        "counts": counts,
        "total": len(files),
        "val_fraction": ELPV_VAL_FRACTION,
        "source": f"elpv-dataset {version} (PyPI)",
        "method": "hardlink" if set(methods) == {"hardlink"} else "copy",
    }


# ---------------------------------------------------------------- hymenoptera (ants / bees)


def download_hymenoptera(out, url=HYMENOPTERA_URL, sha256=HYMENOPTERA_SHA256, timeout=30) -> Path:
    """Download and unzip the ants/bees data into OUT; returns OUT/hymenoptera_data.

    An interrupted download is resumed from OUT/.<zip name>.part on the next call."""
    out = Path(out).expanduser()
    result = out / HYMENOPTERA_FOLDER
    if (result / "train").is_dir() and (result / "val").is_dir():
        logger.info("hymenoptera data already in %s", result)
        return result
    if result.exists():
        raise DataError(f"{result} exists but has no train/ and val/ folders; remove it and run again")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; choose a folder to download the ants/bees data into")
    out.mkdir(parents=True, exist_ok=True)
    part = out / f".{Path(urllib.parse.urlsplit(url).path).name or 'download.zip'}.part"
    _download(url, part, out, timeout)
    _verify_download(part, sha256, url)
    _safe_extract(part, out, HYMENOPTERA_FOLDER, needs=("train", "val"), url=url)
    part.unlink()
    return result


def _download(url: str, part: Path, out: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    logger.info("downloading %s to %s%s", url, part, f" (resuming after {have} bytes)" if have else "")
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            _save(response, part, have, url, out)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # nothing past what we have: the .part is complete; the checksum decides
        raise _download_error(url, out, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = str(getattr(exc, "reason", None) or exc)
        if part.is_file() and part.stat().st_size > have:  # a timeout mid-body: what came is kept
            reason += f" after {part.stat().st_size} bytes (run again to resume)"
        raise _download_error(url, out, reason) from None


def _save(response, part: Path, have: int, url: str, out: Path) -> None:
    resumed = response.status == 206
    if resumed and _content_range_start(response) != have:
        part.unlink()
        raise _download_error(url, out, "the server sent an unexpected byte range (partial download deleted, run again)")
    if have and not resumed:
        logger.info("server did not resume %s; downloading it again from the start", url)
    expected = response.headers.get("Content-Length")
    written = 0
    with open(part, "ab" if resumed else "wb") as fp:
        for block in iter(lambda: response.read(_CHUNK), b""):
            fp.write(block)
            written += len(block)
    if expected is not None and written < int(expected):
        raise _download_error(url, out, f"connection closed after {written} of {expected} bytes (run again to resume)")


def _content_range_start(response) -> int | None:
    # "bytes 100-999/1000" -> 100
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _download_error(url: str, out: Path, reason: str) -> DataError:
    return DataError(f"could not download {url}: {reason}; download it by hand from {url} and unzip into {out}")


def _verify_download(part: Path, sha256: str | None, url: str) -> None:
    if sha256 is None:
        logger.info("no sha256 given for %s; relying on the zip's own CRC checks", url)
        return
    digest = hashlib.sha256()
    with open(part, "rb") as fp:
        for block in iter(lambda: fp.read(_CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != sha256.lower():
        part.unlink()
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}; "
            "the download was deleted, run again"
        )


def _safe_extract(archive: Path, out: Path, top: str, needs: tuple[str, ...], url: str) -> None:
    """Unzip only `top`/ into OUT, refusing members that would land outside OUT, and only where `top`/ holds
    the folders `needs` names: an archive without them leaves nothing behind (it was unzipped half, and the
    next call refused the folder it left)."""
    base = out.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (base / member.filename).resolve()
                if target != base and base not in target.parents:
                    archive.unlink()
                    raise DataError(
                        f"refusing to unzip {archive.name}: member {member.filename!r} would land outside {out}; "
                        "the download was deleted"
                    )
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC for {bad}")
            # Extract to a staging folder and rename, so a crash leaves no half-extracted data.
            staging = Path(tempfile.mkdtemp(prefix=".extract.", dir=out))
            try:
                zf.extractall(staging, members=[m for m in zf.infolist() if m.filename.split("/")[0] == top])
                if not all((staging / top / name).is_dir() for name in needs):
                    archive.unlink()
                    raise DataError(f"{url} did not contain {top}/{' and /'.join(needs)} (the download was "
                                    f"deleted); download it by hand and unzip into {out}")
                os.replace(staging / top, out / top)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        archive.unlink()
        raise DataError(f"{archive.name} is not a valid zip ({exc}); it was deleted, run again") from None
