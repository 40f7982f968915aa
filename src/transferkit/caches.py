"""What transferkit keeps between runs, how big it is, and clearing it: `transferkit cache [clear NAME...]`.

Every cache holds only what a run can compute again: the next run recomputes what is gone (the weights only where
they can be fetched again, so `clear` leaves them unless named). Clearing removes only entries named as transferkit
names them (a 20-hex-digit folder, a scan record, a converted weights file), so a cache folder pointed at a folder
that holds other files (TRANSFERKIT_FEATURE_CACHE=~/data) loses nothing else. A run using a cache while it is
cleared finds its entries missing and computes them again.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .models.weights import cache_dir

FEATURES_ENV = "TRANSFERKIT_FEATURE_CACHE"
_STORE = re.compile(r"[0-9a-f]{20}")  # engine/features.py and data/decoded.py name their stores so
_RECORD = re.compile(r"[0-9a-f]{24}\.npz")  # data/scan_record.py
# Under the feature cache's folder, beside the feature stores (the writers use these names too):
DECODED_DIR = "decoded"  # data/decoded.py's stores
ENGINES_DIR = "engines"  # engine/features.py's exported frozen parts and engine choices
DEPTHWISE_FILE = "depthwise-grads.json"  # engine/depthwise.py's per-machine choice, listed with the engines
DERIVED = ("features", "decoded", "engines", "scans")  # what `cache clear` clears when no name is given
NAMES = DERIVED + ("weights",)
WHAT = {"features": "backbone features and activations of images",
        "decoded": "decoded images for fine-tuning epochs (capped by TRANSFERKIT_CACHE_MAX)",
        "engines": "frozen parts exported to ONNX, and this machine's engine choices",
        "scans": "what the data scan found about each file (TRANSFERKIT_SCAN_CACHE)",
        "weights": "pretrained weights converted to safetensors"}


def feature_root() -> Path:
    """Where feature stores live (and the decoded-image store under decoded/, the engines under engines/)."""
    return Path(os.environ.get(FEATURES_ENV) or cache_dir() / "features")


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
            freed += _size(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return freed


def caches() -> dict[str, Cache]:
    from .data.scan_record import records_folder

    root = feature_root()
    scans = records_folder()
    return {
        "features": Cache("features", root, _named(root, _STORE)),
        "decoded": Cache("decoded", root / DECODED_DIR, _named(root / DECODED_DIR, _STORE)),
        "engines": Cache("engines", root / ENGINES_DIR,
                         _named(root / ENGINES_DIR, _STORE) + [p for p in [root / DEPTHWISE_FILE] if p.exists()]),
        "scans": Cache("scans", scans or Path("(off)"), _named(scans, _RECORD) if scans else []),
        "weights": Cache("weights", cache_dir() / "weights", sorted((cache_dir() / "weights").glob("*.safetensors"))),
    }


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
