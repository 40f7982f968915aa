"""What transferkit keeps between runs, how big it is, and clearing it: `transferkit cache [clear NAME...]`.

Every cache holds only what a run can compute again: the next run recomputes what is gone (the weights only where
they can be fetched again, so `clear` leaves them unless named). Clearing removes only entries named as transferkit
names them (a 20-hex-digit folder, a scan record, a converted weights file), so a cache folder pointed at a folder
that holds other files (TRANSFERKIT_FEATURE_CACHE=~/data) loses nothing else. A run using a cache while it is
cleared finds its entries missing and computes them again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import shards
from .models.weights import cache_dir

log = logging.getLogger(__name__)

FEATURES_ENV = "TRANSFERKIT_FEATURE_CACHE"
_STORE = re.compile(r"[0-9a-f]{20}")  # engine/features.py and data/decoded.py name their stores so
_RECORD = re.compile(r"[0-9a-f]{24}\.npz")  # data/scan_record.py
# The files a store folder holds (engine/features.py, data/decoded.py, engine/runtime.py's exports and engine choice,
# and their writers' temporary files): what `clear` removes from a folder of store name.
_STORE_FILE = re.compile(r"identity\.json|engine-choice\.json|shard-[0-9a-f]+\.(json|safetensors|u8)|frozen[\w-]*\.onnx"
                         r"|\..+\.tmp")
# Under the feature cache's folder, beside the feature stores (the writers use these names too):
DECODED_DIR = "decoded"  # data/decoded.py's stores
ENGINES_DIR = "engines"  # engine/features.py's exported frozen parts and engine choices
DEPTHWISE_FILE = "depthwise-grads.json"  # engine/depthwise.py's per-machine choice, listed with the engines
FEATURE_SUFFIX = ".safetensors"  # a feature store's shards (engine/features.py)
DECODED_SUFFIX = ".u8"  # a decoded-image store's shards (data/decoded.py)
# The size cap over the caches that grow with the data (features, decoded images, scan records); engines and
# weights are a few MB per backbone and never evicted.
CAP_ENV = "TRANSFERKIT_CACHE_MAX"
DEFAULT_CAP_FRACTION = 0.25  # of the space the capped caches may use: their own size + the disk's free space
RECENT_SECONDS = 600  # entries used this recently are never evicted: another run may be about to read them
# A process checks the cap of a cache at most this often: a search writes after each of its extractions (~40 times),
# and a check stats every shard (10,000 shards: 0.13-0.19 s); 10 s of a GPU's extraction is ~0.3 GB of features.
RECHECK_SECONDS = 10.0
_checked_at: dict[Path, float] = {}  # feature cache root -> when this process last checked its cap
_over_cap_said: set[Path] = set()  # feature cache roots whose being over the cap was said in this process
DERIVED = ("features", "decoded", "engines", "scans")  # what `cache clear` clears when no name is given
NAMES = DERIVED + ("weights",)
WHAT = {"features": "backbone features and activations of images",
        "decoded": "decoded images for fine-tuning epochs",
        "engines": "frozen parts exported to ONNX, and this machine's engine choices",
        "scans": "what the data scan found about each file (TRANSFERKIT_SCAN_CACHE)",
        "weights": "pretrained weights converted to safetensors"}


def feature_root() -> Path:
    """Where feature stores live (and the decoded-image store under decoded/, the engines under engines/)."""
    # expanduser: TRANSFERKIT_FEATURE_CACHE="~/x" (quoted, so no shell expands it) made a folder named ~ here
    return Path(os.environ.get(FEATURES_ENV) or cache_dir() / "features").expanduser()


@dataclass
class Cache:
    name: str
    folder: Path
    entries: list[Path]

    @property
    def size(self) -> int:
        return sum(_size(p) for p in self.entries)

    def clear(self) -> int:
        """Remove the entries; bytes freed."""
        freed = 0
        for entry in self.entries:
            if entry.is_dir() and not entry.is_symlink():
                freed += _clear_store(entry)
            else:
                freed += _size(entry)
                entry.unlink(missing_ok=True)
        return freed


def _clear_store(folder: Path) -> int:
    """Remove a store's folder where it holds only files a store writes; bytes freed. A folder of the user's that
    only has a store's name (20 hex digits, in TRANSFERKIT_FEATURE_CACHE=~/data) is left as it is."""
    try:
        foreign = [p.name for p in folder.iterdir() if not (_STORE_FILE.fullmatch(p.name) and p.is_file())]
    except OSError:  # removed meanwhile, or unreadable: nothing to free here
        return 0
    if foreign:
        log.warning("kept %s: it holds %s, which transferkit does not write", folder, ", ".join(sorted(foreign)[:3]))
        return 0
    freed = _size(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return freed


def caches() -> dict[str, Cache]:
    from .data.scan_record import records_folder

    root = feature_root()
    scans = records_folder()
    return {
        "features": Cache("features", root, _stores(root)),
        "decoded": Cache("decoded", root / DECODED_DIR, _stores(root / DECODED_DIR)),
        "engines": Cache("engines", root / ENGINES_DIR,
                         _stores(root / ENGINES_DIR) + [p for p in [root / DEPTHWISE_FILE] if p.exists()]),
        "scans": Cache("scans", scans or Path("(off)"), _named(scans, _RECORD) if scans else []),
        "weights": Cache("weights", cache_dir() / "weights", sorted((cache_dir() / "weights").glob("*.safetensors"))),
    }


def _stores(folder: Path) -> list[Path]:
    """The store folders in `folder`; a file of a store's name is not one (a user's, in a folder they pointed the
    cache at)."""
    return [p for p in _named(folder, _STORE) if p.is_dir()]


def _named(folder: Path, pattern: re.Pattern) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # no such folder yet
        return []


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


# ---- the size cap: least recently used entries go first ------------------------------------------------------------


def cap_setting() -> int | None:
    """TRANSFERKIT_CACHE_MAX in bytes (a number, or with K/M/G/T, KB...TB or KiB...TiB, all binary), None where
    unset; a UsageError where it is not a size (`train` checks it before any work, not at its first extraction's
    end)."""
    text = os.environ.get(CAP_ENV, "").strip()
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    # "5G", and as people write it: "5GB", "5 GiB", "500 MB" (binary units all: 1G = 2**30 bytes)
    number, unit = re.fullmatch(r"(.*?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE).groups()
    try:
        size = int(float(number) * units.get(unit.upper(), 1))
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        size = -1
    if size < 0:
        from .errors import UsageError

        raise UsageError(f"{CAP_ENV} must be a size such as 500M or 20G, not {text!r}")
    return size


def cache_cap(root: Path, used: int) -> int:
    """The capped caches' size cap in bytes: TRANSFERKIT_CACHE_MAX, else DEFAULT_CAP_FRACTION of what they may use
    (their size now + the free space of `root`'s disk)."""
    asked = cap_setting()
    if asked is not None:
        return asked
    existing = next((folder for folder in (root, *root.parents) if folder.exists()), root)  # not made yet: its disk
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return 1 << 62  # unknown: no cap
    return int(DEFAULT_CAP_FRACTION * (used + free))


def capped_entries(root: Path | None = None) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every entry the cap counts: feature and decoded-image shards under the feature
    cache `root` (default feature_root()), and scan records. A shard's index entry is counted with its data."""
    from .data.scan_record import records_folder

    root = feature_root() if root is None else Path(root)
    files = [p for store in _named(root, _STORE) for p in store.glob(f"shard-*{FEATURE_SUFFIX}")]
    files += [p for store in _named(root / DECODED_DIR, _STORE) for p in store.glob(f"shard-*{DECODED_SUFFIX}")]
    scans = records_folder()
    files += _named(scans, _RECORD) if scans else []
    entries = []
    for path in files:
        try:
            info = path.stat()
            size = info.st_size + (path.with_suffix(".json").stat().st_size if path.name.startswith("shard-") else 0)
        except OSError:  # evicted or dropped by another run meanwhile
            continue
        entries.append((info.st_mtime, size, path))
    return entries


def evict_to_cap(root: Path | None = None, keep: set[Path] = frozenset()) -> dict:
    """Delete the least recently used capped entries (capped_entries) until they are under the cap; never those
    in `keep` (what the calling run uses now) or used in the last RECENT_SECONDS. Stats for the run's record (none
    where this process checked within RECHECK_SECONDS)."""
    root = feature_root() if root is None else Path(root)
    if time.monotonic() - _checked_at.get(root, -RECHECK_SECONDS) < RECHECK_SECONDS:
        return {}
    _checked_at[root] = time.monotonic()
    entries = capped_entries(root)
    used = sum(size for _, size, _ in entries)
    cap = cache_cap(root, used)
    evicted, freed, now = 0, 0, time.time()
    for mtime, size, path in sorted(entries):
        if used - freed <= cap:
            break
        if path in keep or now - mtime < RECENT_SECONDS:
            continue
        _evict(path)
        evicted, freed = evicted + 1, freed + size
    if used - freed > cap:
        # Once a process and cache: a search checks the cap after each of its extractions.
        log.log(logging.DEBUG if root in _over_cap_said else logging.WARNING,
                "transferkit's caches hold %.1f MB, over their cap of %.1f MB (%s), in entries in use",
                (used - freed) / 1e6, cap / 1e6, CAP_ENV)
        _over_cap_said.add(root)
    elif evicted:
        log.info("caches: %d least recently used entries evicted (%.1f MB) to stay under %.1f MB (%s)",
                 evicted, freed / 1e6, cap / 1e6, CAP_ENV)
    return {"cache_bytes": used - freed, "cache_cap_bytes": cap, "evicted_entries": evicted}


def _evict(path: Path) -> None:
    if path.name.startswith("shard-"):  # data first, then its index entry (shards.py)
        shards.drop(path.parent, path.name[: -len(path.suffix)], path.suffix)
    else:
        path.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Mark a capped entry used now: the least recently used are evicted first."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: it is simply not evicted by recency
        pass
