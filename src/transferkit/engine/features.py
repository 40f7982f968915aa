"""Cached features: the frozen backbone runs once per image (per view), not once per epoch.

Features are keyed by what determines them: the backbone and its weights, the preprocessing, the
point in the network they are taken from, the view, and the image file's content (sha256). A second
run, a new head or a new learning rate costs no backbone time; a changed file is recomputed alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..data.decoded import DecodedStore, content_sha256, decode_missing, open_store
from ..data.transforms import dihedral, eval_transform, train_transform
from ..io import atomic_write, atomic_write_json
from ..models.registry import Preprocessing
from ..models.weights import cache_dir
from .progress import progress

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: random views are cropped from the decoded-image store


@dataclass(frozen=True)
class View:
    """One deterministic way of presenting an image: 0 is the eval crop; k > 0 a symmetry or a seeded
    random augmentation of it."""

    index: int
    kind: str = "dihedral"
    seed: int = 0

    @property
    def key(self) -> str:
        if self.index == 0:
            return "eval"
        return f"d{self.index}" if self.kind == "dihedral" else f"r{self.index}s{self.seed}"


class ViewDataset(Dataset):
    """One item per image: its decoded pixels (data/decoded.py) turned into every view asked of it
    (views of the eval crop share one crop; only seeded random views run the train transform)."""

    def __init__(self, entries: list[tuple[str | None, list[View]]], pixels: DecodedStore, pre: Preprocessing):
        self.entries = entries  # (decoded-store key or None where the file could not be decoded, views)
        self.pixels = pixels
        self.eval_tf = eval_transform(pre)
        self.train_tf = train_transform(pre, "standard")

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        key, views = self.entries[i]
        if key is None:
            return None
        image = self.pixels.get(key)
        crop = None
        tensors = []
        for view in views:
            if view.index == 0 or view.kind == "dihedral":
                crop = self.eval_tf(image) if crop is None else crop
                tensors.append(dihedral(crop, view.index))
            else:
                tensors.append(self._random_view(image, key, view))
        return torch.stack(tensors), i

    def _random_view(self, image, key: str, view: View) -> torch.Tensor:
        # Seeded by the view and the content so a random view is the same every time it is recomputed.
        seed = int(hashlib.sha256(f"{key}|{view.key}".encode()).hexdigest()[:8], 16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.train_tf(image)


def _collate(batch):
    good = [b for b in batch if b is not None]
    if not good:
        return None
    return torch.cat([b[0] for b in good]), [b[1] for b in good]


class FeatureStore:
    """Append-only shards of (key → feature) in safetensors, one folder per backbone configuration."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index: dict[str, tuple[str, int]] = {}
        self._shards: dict[str, torch.Tensor] = {}
        for meta in sorted(self.root.glob("shard-*.json")):
            shard = meta.stem
            if not (self.root / f"{shard}.safetensors").exists():
                continue  # an interrupted write; its json never pointed at data
            for row, key in enumerate(json.loads(meta.read_text())["keys"]):
                self.index[key] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, keys: list[str]) -> torch.Tensor:
        rows = []
        for key in keys:
            shard, row = self.index[key]
            if shard not in self._shards:
                self._shards[shard] = load_file(str(self.root / f"{shard}.safetensors"))["features"]
            rows.append(self._shards[shard][row])
        return torch.stack(rows)

    def put(self, keys: list[str], features: torch.Tensor) -> None:
        if not keys:
            return
        shard = f"shard-{uuid.uuid4().hex[:12]}"
        tensor = features.detach().cpu().contiguous()
        # Data first, then the json that makes it visible: a crash in between leaves no dangling keys.
        atomic_write(self.root / f"{shard}.safetensors", lambda tmp: save_file({"features": tensor}, tmp))
        atomic_write_json(self.root / f"{shard}.json", {"keys": keys})
        for row, key in enumerate(keys):
            self.index[key] = (shard, row)
        self._shards[shard] = tensor


def cache_root() -> Path:
    """Where feature stores live (and the decoded-image store, under decoded/)."""
    return Path(os.environ.get("TRANSFERKIT_FEATURE_CACHE") or cache_dir() / "features")


def store_for(identity: dict) -> FeatureStore:
    digest = hashlib.sha256(json.dumps({**identity, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()
    root = cache_root() / digest[:20]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "identity.json", identity)
    return FeatureStore(root)


def cached_features(
    extract,
    store: FeatureStore,
    paths: list[str],
    views: list[View],
    pre: Preprocessing,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "features",
    sharding=None,
    digests: dict[str, str] | None = None,
) -> tuple[torch.Tensor | None, list[bool], dict]:
    """Features of every (path, view): a tensor (len(paths), len(views), ...) and which paths worked.

    Only what is not in the store is computed. `digests` are the files' sha256 where the caller already
    has them (the data scan hashes every file); others are hashed here. Returns stats: hits, computed,
    skipped, seconds. With `sharding` (engine/distributed.py) each rank computes its share of the
    missing images, then sees every rank's."""
    sha = {p: content_sha256(p, digests) for p in paths}  # None: the file cannot be read any more
    keys = [[f"{sha[p]}|{v.key}" for v in views] if sha[p] else [] for p in paths]
    todo = [(p, [(v, k) for v, k in zip(views, row) if k not in store]) for p, row in zip(paths, keys) if row]
    todo = [(p, missing) for p, missing in todo if missing]
    stats = {"hits": sum(1 for row in keys for k in row if k in store), "computed": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    mine = sharding.take(todo) if sharding else todo
    if mine:
        _extract_missing(extract, store, mine, sha, pre, batch_size, workers, desc)
    if sharding:
        sharding.sync(store)
    stats["seconds"] = time.perf_counter() - t0
    stats["computed"] = sum(len(missing) for _, missing in mine)
    ok = [bool(row) and all(k in store for k in row) for row in keys]
    stats["skipped"] = ok.count(False)
    good_keys = [row for row, good in zip(keys, ok) if good]
    if not good_keys:
        return None, ok, stats
    flat = store.get([k for row in good_keys for k in row])
    features = flat.reshape(len(good_keys), len(views), *flat.shape[1:])
    return features, ok, stats


def _extract_missing(extract, store, todo, sha, pre, batch_size, workers, desc) -> None:
    """todo: (path, [(view, key), ...]) per image. Two phases, each with every core: the images are
    decoded into the decoded-image store by `workers` processes, then cropped, normalised and run through
    the network here. Overlapped, decode workers and the runtime's threads would share the cores, and a
    runtime's parallel kernels slow down more when a core is taken from them than decoding costs. The
    decoded pixels are kept for later runs (finetune reads the same store)."""
    pixels = open_store(cache_root(), pre)
    paths = [p for p, _ in todo]
    pixel_keys, _ = decode_missing(pixels, paths, sha, pre, workers=workers, desc=f"{desc}: decoding")
    dataset = ViewDataset([(k, [v for v, _ in missing]) for k, (_, missing) in zip(pixel_keys, todo)], pixels, pre)
    # Batches hold every view of each image; keep the tensor batch near `batch_size` rows.
    per_batch = max(1, batch_size // max(len(missing) for _, missing in todo))
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=0, collate_fn=_collate)
    pending_keys, pending = [], []
    for batch in progress(loader, desc=desc, total=len(loader)):
        if batch is None:
            continue
        x, items = batch
        pending.append(extract(x))
        pending_keys += [k for i in items for _, k in todo[i][1]]
        # Write every few thousand rows so an interrupted extraction keeps what it did.
        if len(pending_keys) >= 2048:
            store.put(pending_keys, torch.cat(pending))
            pending_keys, pending = [], []
    if pending_keys:
        store.put(pending_keys, torch.cat(pending))


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
