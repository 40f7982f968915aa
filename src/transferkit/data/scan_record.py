"""What the data scan found about each file, kept between runs so that a folder scanned before is not decoded,
hashed and fingerprinted again.

Checking a file (decode, sha256, fingerprint) is most of a scan, and the scan is inside the recipe search's budget:
100,000 small PNGs took 15 s on every run, 2.1 s with their record (benchmarks/RESULTS.md, data scan at scale).
A run that finds a file unchanged since a scan recorded it takes that scan's answer instead; where no file
changed, the look-alike pairs found among them come from the record too.

"Unchanged" is decided as git, rsync and make decide it, from the file's status alone: its inode, size,
modification and status-change times (nanoseconds) must all be those recorded. Any write changes the times, and
a renamed, replaced, restored (`touch -d`, `tar x`) or chmod-ed file changes its status-change time, so it is
checked again. A file modified within RACY_S of the scan that checks it is not recorded: a write later within
the same clock tick could leave its times as they were (git's "racily clean" entries).

The record of a folder is one .npz file per data root (the root's resolved path names it) under
TRANSFERKIT_SCAN_CACHE (default: the transferkit cache's scans/; "off" turns recording off), written
atomically, about 1.1 KB per image (the 32×32 fingerprint thumbnail is most of it). The KEEP_RECORDS most
recently used are kept, and they count towards the caches' size cap (caches.evict_to_cap). A record that cannot be
read, or was made by another Pillow or other scan settings, is set aside with one line at debug level and
rewritten: it only ever saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from transferkit.data.fingerprint import NEAR_SEARCH_FROM, SAME_PICTURE_CORRELATION, THUMB_SIDE, Fingerprint
from transferkit.caches import evict_to_cap, touch
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

CACHE_ENV = "TRANSFERKIT_SCAN_CACHE"
FORMAT = 1
KEEP_RECORDS = 32  # data folders whose records are kept; older ones are deleted
RACY_S = 2.0  # a file modified this recently when the scan began is checked again next time
# Problems that depend on the moment, not on the file's content, are never recorded.
TRANSIENT_KINDS = frozenset({"unreadable"})
_SEPARATOR = b"\0"  # cannot occur in a path


def records_folder() -> Path | None:
    """Where the records are kept; None where TRANSFERKIT_SCAN_CACHE is "off"."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    from transferkit.models.weights import cache_dir

    return cache_dir() / "scans"


def file_key(info: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content without reading it (module docstring)."""
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class ScanRecord:
    """The recorded checks of one data root: `get` an unchanged file's check, `save` this scan's checks."""

    def __init__(self, root: Path, settings: dict):
        self.root = root
        self.prefix = str(root) + os.sep  # candidate paths are the root as given, joined with what is under it
        self.settings = settings
        self.started_ns = time.time_ns()
        folder = records_folder()
        name = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:24]
        self.path = folder / f"{name}.npz" if folder else None
        self.entries: dict[str, tuple[tuple, tuple]] = {}  # relative path -> (file key, check)
        self.recorded_pairs: list | None = None  # the look-alike pairs of the files recorded
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            self._read()

    def relative(self, path: str) -> str | None:
        return path[len(self.prefix):] if path.startswith(self.prefix) else None

    def get(self, path: str, key: tuple) -> tuple | None:
        """The recorded check of `path` if the file is as recorded, else None."""
        entry = self.entries.get(self.relative(path) or "")
        if entry is not None and entry[0] == key:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    @property
    def unchanged(self) -> bool:
        """Every file of this scan was found as recorded, and no recorded file is gone: what was derived from
        all of them (the look-alike pairs) is as recorded too."""
        return self.recorded_pairs is not None and self.misses == 0 and self.hits == len(self.entries)

    @property
    def pairs(self) -> list[tuple[str, str, float]]:
        return [(self.prefix + a, self.prefix + b, c) for a, b, c in self.recorded_pairs or ()]

    def save(self, checked: list[tuple[str, tuple, tuple]], pairs: list[tuple[str, str, float]] | None) -> None:
        """Record (path, file key, check) of this scan's files and the look-alike pairs found among them (None: a
        scan stopped before it found them), in place of the record read (files gone from the folder are
        dropped); nothing is written where nothing changed."""
        if self.path is None:
            return
        if self.unchanged:
            touch(self.path)  # used: the oldest records are the ones pruned and evicted
            return
        racy_from = self.started_ns - int(RACY_S * 1e9)
        keep = {}
        for path, key, check in checked:
            rel = self.relative(path)
            if rel is None or check[0] in TRANSIENT_KINDS or max(key[2], key[3]) >= racy_from:
                continue
            keep[rel] = (key, check)
        if not keep and not self.entries:
            return  # nothing to record (every file just modified), and no record to replace
        # Pairs are kept only with every file recorded (a file checked again next time may change them).
        complete = pairs is not None and len(keep) == len(checked)  # then every pair's paths are kept ones
        rel_pairs = [(self.relative(a), self.relative(b), c) for a, b, c in pairs] if complete else None
        try:
            self._write(keep, rel_pairs)
            self._prune()
            evict_to_cap(keep={self.path})  # records count towards the caches' size cap
        except (OSError, TransferkitError) as exc:  # a read-only or full cache disk: the scan is done all the same
            logger.debug("scan record %s not written: %s", self.path, exc)

    # ---- the file ------------------------------------------------------------------------------------------

    def _read(self) -> dict:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                if header.get("settings") != self.settings:
                    logger.debug("scan record %s was made with other settings; the files are checked again",
                                 self.path)
                    return
                self.entries = _entries(data, header)
                pairs = header.get("pairs")
                self.recorded_pairs = None if pairs is None else [(a, b, float(c)) for a, b, c in pairs]
        except Exception as exc:  # noqa: BLE001 - damaged, truncated or foreign: the scan checks the files again
            logger.debug("scan record %s could not be read (%s); the files are checked again", self.path, exc)
            self.entries, self.recorded_pairs = {}, None

    def _write(self, entries: dict, pairs: list | None) -> None:
        from transferkit.io import atomic_write

        rels = list(entries)
        n = len(rels)
        keys = np.array([entries[r][0] for r in rels], dtype=np.int64).reshape(n, 4)
        ok = np.array([entries[r][1][0] is None for r in rels], dtype=bool)
        problems = {str(i): list(entries[r][1][:2]) for i, r in enumerate(rels) if not ok[i]}
        sha = np.zeros((n, 32), dtype=np.uint8)
        dhash = np.zeros(n, dtype=np.uint64)
        thumbs = np.zeros((n, THUMB_SIDE * THUMB_SIDE), dtype=np.uint8)
        sizes = np.zeros((n, 2), dtype=np.int64)
        for i in np.flatnonzero(ok):
            _, _, digest, fp = entries[rels[i]][1]
            sha[i] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
            dhash[i], sizes[i] = fp.dhash, fp.size
            thumbs[i] = np.frombuffer(fp.thumb, dtype=np.uint8)
        header = {"format": FORMAT, "settings": self.settings, "root": str(self.root), "problems": problems,
                  "pairs": pairs}
        names = _SEPARATOR.join(r.encode("utf-8", "surrogateescape") for r in rels)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                         names=np.frombuffer(names, dtype=np.uint8), keys=keys, ok=ok, sha=sha, dhash=dhash,
                         thumbs=thumbs, sizes=sizes)

        atomic_write(self.path, write)
        self.entries, self.recorded_pairs = entries, pairs

    def _prune(self) -> None:
        records = sorted(self.path.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in records[KEEP_RECORDS:]:
            old.unlink(missing_ok=True)


def _entries(data, header: dict) -> dict:
    """relative path -> (file key, check) of a record's arrays (converted in bulk: 100,000 entries row by row took
    1 s, a tenth of the scan they save)."""
    names = bytes(data["names"]).split(_SEPARATOR) if data["names"].size else []
    keys, ok, sha, dhash, thumbs, sizes = (data[k] for k in ("keys", "ok", "sha", "dhash", "thumbs", "sizes"))
    n = len(names)
    if header.get("format") != FORMAT or not all(len(a) == n for a in (keys, ok, sha, dhash, thumbs, sizes)):
        raise ValueError("inconsistent record")
    problems = header["problems"]
    keys, ok, dhash, sizes = keys.tolist(), ok.tolist(), dhash.tolist(), sizes.tolist()
    hexes, thumb_bytes, side = sha.tobytes().hex(), thumbs.tobytes(), thumbs.shape[1]
    entries = {}
    for i, name in enumerate(names):
        if ok[i]:
            fp = Fingerprint(dhash[i], thumb_bytes[i * side:(i + 1) * side], tuple(sizes[i]))
            check = (None, "", hexes[64 * i:64 * (i + 1)], fp)
        else:
            kind, detail = problems[str(i)]
            check = (kind, detail, None, None)
        entries[name.decode("utf-8", "surrogateescape")] = (tuple(keys[i]), check)
    return entries


def scan_settings(min_side: int, shorter_side: int) -> dict:
    """What a recorded check depends on besides the file: a record made under other settings is not used."""
    return {"pillow": PIL.__version__, "max_image_pixels": Image.MAX_IMAGE_PIXELS, "min_side": min_side,
            "decode_shorter_side": shorter_side, "thumb_side": THUMB_SIDE, "format": FORMAT,
            "same_picture_correlation": SAME_PICTURE_CORRELATION, "near_search_from": NEAR_SEARCH_FROM}
