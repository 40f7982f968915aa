"""Checking each candidate file: decoded, hashed and fingerprinted (in threads, or in forked processes for a
large folder), or taken from the folder's scan record where the file is unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from transferkit.data.fingerprint import Fingerprint, fingerprint
from transferkit.data.images import ImageDecodeError, quiet_pillow, read_rgb
from transferkit.data.scan_record import ScanRecord
from transferkit.engine import signals

from .problems import Problems

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # below this a side carries no usable detail even after resizing
# The scan decodes every file to check it and fingerprint it (32×32 thumbnails): a large JPEG may be decoded at a
# reduced scale, its shorter side still ≥ 2 × this (data/images.py DRAFT_MARGIN); a damaged file fails alike.
SCAN_SHORTER_SIDE = 128
SCAN_PROCESSES_FROM = 1000  # files from which the scan checks them in processes (checked_files); fewer: threads


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keep_usable(candidates, checks, problems: Problems,
                fingerprints: dict[str, Fingerprint]) -> list[tuple[str, str | None]]:
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


def checked_files(candidates: list[tuple[str, bool, tuple]], record: ScanRecord | None) -> list[tuple]:
    """verify_one's answer for each candidate, in order, taken from the folder's scan `record` where the file is
    as recorded (data/scan_record.py); without a record (an unverified scan), _sniff_one's. A scan stopped by
    Ctrl-C records what it checked, so the same command goes on from there."""
    if record is None:
        return _checked_now(candidates, _sniff_one, [])
    recorded = [record.get(path, key) for path, _, key in candidates]
    missing = [c for c, check in zip(candidates, recorded) if check is None]
    fresh: list[tuple] = []
    try:
        _checked_now(missing, verify_one, fresh)
    except signals.Interrupted:
        record.save(record_rows(candidates, _merged(recorded, fresh)), pairs=None)
        raise
    if missing:
        logger.debug("scan: %d files checked, %d as an earlier scan recorded them", len(missing),
                     len(candidates) - len(missing))
    return _merged(recorded, fresh)


def _merged(recorded: list, fresh: list) -> list:
    """Each candidate's check: the record's, else the next of `fresh` (None past its end: a stopped scan)."""
    answers = iter(fresh)
    return [check if check is not None else next(answers, None) for check in recorded]


def record_rows(candidates, checks) -> list[tuple]:
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
    """The checks in order, appended to `done`, `chunksize` files to a task. A stop asked for (the first Ctrl-C
    of a run: engine/signals.py) ends the scan at the next file, not after the last one (a million small files:
    minutes); the checks already under way finish, and those that follow the last one read on without a gap are
    kept too (a worker runs ahead of the reading here), so the next scan does not check them again."""
    paths, no_exts = [c[0] for c in candidates], [c[1] for c in candidates]
    tasks = [pool.submit(_check_each, check, paths[i:i + chunksize], no_exts[i:i + chunksize])
             for i in range(0, len(paths), chunksize)]
    read = 0
    try:
        for task in tasks:
            done.extend(task.result())
            read += 1
            signals.check_stop("the data scan", "run the same command to go on (the scan record keeps the files "
                                                "checked so far)")
        return done
    except signals.Interrupted:
        pool.shutdown(wait=True, cancel_futures=True)  # the checks not started are dropped, not waited for
        for task in tasks[read:]:
            if task.cancelled() or task.exception() is not None:
                break
            done.extend(task.result())
        raise
    finally:  # a second Ctrl-C or a failed check: nothing more is waited for than the tasks under way
        pool.shutdown(wait=True, cancel_futures=True)


def _check_each(check, paths: list[str], no_exts: list[bool]) -> list[tuple]:
    """One task of a scan's pool: `check` on each of a few files (a module-level function, so a forked process
    can run it)."""
    return [check(path, no_ext) for path, no_ext in zip(paths, no_exts)]


def _scan_workers() -> int:
    """Checks at once: the cores this process may run on (its CPU affinity where the OS has one), at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def _ignore_interrupts() -> None:
    """In a scan process: Ctrl-C is the parent's to handle (it stops the pool); the processes just end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def verify_one(path: str, no_ext: bool) -> tuple[str | None, str, str | None, Fingerprint | None]:
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
    if not no_ext or identifies_an_image(path):
        return None, "", None, None
    return "non_image", "no file extension and not an image", None, None


def identifies_an_image(path: str) -> bool:
    """Whether Pillow identifies the file as an image from its header (for a file without an extension). One over
    Pillow's pixel limit is an image, refused when it is read with the reason why (it was "not an image", or
    dropped from predict's folder walk, and one under twice the limit printed Pillow's DecompressionBombWarning)."""
    try:
        with quiet_pillow(), Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - anything Pillow cannot even identify is not an image for us
        return False
