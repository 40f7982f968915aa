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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from torch.utils.data import DataLoader, Dataset

from ..data.decoded import (DecodedStore, content_sha256, decode_missing, failure_reason, open_store,
                            warn_undecodable)
from ..data.images import load_rgb
from ..data.transforms import crop_pixels, dihedral, eval_crop, eval_transform, normalize_batch, train_transform
from .. import shards
from ..caches import ENGINES_DIR, FEATURE_SUFFIX, evict_to_cap, feature_root, touch
from ..io import RunFolderError, atomic_write, atomic_write_json
from ..preprocessing import Preprocessing
from ..inference import read_ahead
from ..threads import start_prefetch
from . import signals
from .progress import progress
from .runtime import EXPORT_VERSION

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # 2: random views are cropped from the decoded-image store; 3: checksummed shards;
# 4: large JPEGs decoded at a reduced DCT scale (data/images.py DRAFT_MARGIN)
SUFFIX = FEATURE_SUFFIX


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
        image = self.pixels.image(key)
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
    """(views of the readable images, their item numbers, {path: why} for the unreadable ones). Grey
    crops (one channel) join colour ones as three equal channels; an all-grey batch stays one."""
    good = [b for b in batch if isinstance(b, tuple)]
    errors = {path: why for b in batch if isinstance(b, dict) for path, why in b.items()}
    if not good:
        return (None, [], errors) if errors else None
    channels = max(b[0].shape[1] for b in good)
    if isinstance(good[0][0], np.ndarray):  # streamed uint8 crops: numpy copies them in a fraction of the time
        x = torch.from_numpy(np.concatenate([np.broadcast_to(b[0], (len(b[0]), channels, *b[0].shape[2:]))
                                             for b in good]))
    else:
        with one_thread():
            x = torch.cat([b[0].expand(-1, channels, -1, -1) for b in good])
    return x, [b[1] for b in good], errors


@contextmanager
def one_thread():
    """torch ops on one intra-op thread. Between network calls, a batch's copies and arithmetic on all
    of torch's threads wait on each other whenever anything else holds a core: the network's own pool,
    decode threads, other programs (2-core EPYC beside other jobs: concatenating 64 crops took 825 ms on
    2 threads, 2 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_REFUSING_CACHES: set[Path] = set()  # cache folders whose disk refused a write in this process (said once)


class FeatureStore:
    """Append-only shards of (key → feature) in safetensors, one folder per backbone configuration.

    Each shard's json index entry records its keys, size and sha256 (shards.py); a shard is checked when
    it is first read, and a damaged or foreign one is dropped, so its keys read as missing and the caller
    recomputes them. `verify(keys)` does that for the shards holding `keys` and warns once about what it
    dropped; cached_features calls it before deciding what to compute. A shard whose data file is
    gone was evicted (caches.evict_to_cap) or dropped by another run: its keys read as missing, without a warning."""

    def __init__(self, root: Path, onnx_path: Path | None = None):
        self.root = Path(root)
        # Where the frozen part's ONNX export (and, beside it, the engine choice) lives: store_for shares
        # one per network, whatever the crop.
        self.onnx_path = Path(onnx_path) if onnx_path is not None else self.root / "frozen.onnx"
        self.index: dict[str, tuple[str, int]] = {}
        # Shards this store has read and found whole: shards never change once written, so their checksum is not
        # taken again (cached_features verifies, then reads, the same shards: the search reads them call after call).
        self._checked: set[str] = set()
        # Shards written since the cache's disk refused a write (keep_in_memory); None while it takes them.
        self._in_memory: dict[str, torch.Tensor] | None = None
        self._entries, self.damaged = shards.list_shards(self.root, SUFFIX)
        for name, _ in self.damaged:
            shards.drop(self.root, name, SUFFIX)
        for name, entry in list(self._entries.items()):
            if not isinstance(entry.get("keys"), list) or not all(isinstance(k, str) for k in entry["keys"]):
                self._drop(name, "foreign index entry")
                continue
            for row, key in enumerate(entry["keys"]):
                self.index[key] = (name, row)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def refresh(self) -> None:
        """Take in the shards other processes wrote since this store was opened."""
        fresh = FeatureStore(self.root, self.onnx_path)
        self._entries.update(fresh._entries)
        self.index.update(fresh.index)
        self.damaged += fresh.damaged

    def verify(self, keys) -> None:
        """Read (and check) every shard holding one of `keys` not checked yet; drop damaged ones with one warning."""
        for name in {self.index[k][0] for k in keys if k in self.index} - self._checked:
            self._load(name)
        shards.warn_dropped("feature cache", self.root, self.damaged)
        self.damaged = []

    def get(self, keys: list[str]) -> torch.Tensor:
        """The rows of `keys`; KeyError for a key that is missing or whose shard proved damaged. Each
        shard is read once and let go: memory holds the result and one shard, not the whole store."""
        rows_by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            shard, row = self.index[key]
            rows_by_shard.setdefault(shard, []).append((pos, row))
        out = None
        for shard, rows in rows_by_shard.items():
            tensor = self._load(shard)
            if tensor is None:
                raise KeyError(f"{keys[rows[0][0]]}: its shard {shard} was damaged and dropped")
            if out is None:
                out = torch.empty((len(keys), *tensor.shape[1:]), dtype=tensor.dtype)
            out[[pos for pos, _ in rows]] = tensor[[row for _, row in rows]]
        return out if out is not None else torch.empty(0)

    def keep_in_memory(self, refused: Exception) -> None:
        """The cache's disk refused a write (full, read-only): the run goes on, this store's new shards in memory."""
        if self._in_memory is not None:
            return
        self._in_memory = {}
        base = self.root.parent
        if base not in _REFUSING_CACHES:  # one line per cache folder and process, not one per store
            _REFUSING_CACHES.add(base)
            log.warning("feature cache not written (%s): features are kept in memory; free space (`transferkit "
                        "cache clear`) or point TRANSFERKIT_FEATURE_CACHE elsewhere", refused)

    def _load(self, name: str) -> torch.Tensor | None:
        """The shard's tensor, read and checked; None (and dropped) where damaged."""
        if self._in_memory is not None and name in self._in_memory:
            return self._in_memory[name]
        entry = self._entries[name]
        path = self.root / f"{name}{SUFFIX}"
        try:
            blob = path.read_bytes()
        except FileNotFoundError:  # evicted by the size cap, or dropped by another run (which said so)
            return self._forget(name)
        except OSError as exc:
            return self._drop(name, f"unreadable ({exc.strerror or exc})")
        touch(path)  # least recently used shards are evicted first
        if len(blob) != entry["bytes"] or (name not in self._checked
                                           and hashlib.sha256(blob).hexdigest() != entry.get("sha256")):
            return self._drop(name, "checksum mismatch")
        try:
            tensor = load(blob)["features"]
        except Exception as exc:  # noqa: BLE001 - any unreadable content is damage, never a traceback
            return self._drop(name, f"bad content ({type(exc).__name__})")
        if tensor.shape[0] != len(entry["keys"]):
            return self._drop(name, f"{tensor.shape[0]} rows for {len(entry['keys'])} keys")
        self._checked.add(name)
        return tensor

    def _drop(self, name: str, why: str) -> None:
        self.damaged.append((name, why))
        shards.drop(self.root, name, SUFFIX)
        return self._forget(name)

    def _forget(self, name: str) -> None:
        """Take shard `name` out of the index: its keys read as missing."""
        self._checked.discard(name)
        for key in self._entries.pop(name)["keys"]:
            if self.index.get(key, (None,))[0] == name:
                del self.index[key]
        return None

    def shard_paths(self, keys) -> set[Path]:
        """The data files holding `keys` (those in the index)."""
        return {self.root / f"{self.index[k][0]}{SUFFIX}" for k in keys if k in self.index}

    def put(self, keys: list[str], features: torch.Tensor) -> None:
        if not keys:
            return
        name = f"shard-{uuid.uuid4().hex[:12]}"
        tensor = features.detach().cpu().contiguous()
        blob = save({"features": tensor})
        entry = shards.new_entry(self.root, len(blob), keys=list(keys), sha256=hashlib.sha256(blob).hexdigest())
        if self._in_memory is None:
            try:
                # Index entry first, then the data (shards.py): a crash in between leaves no dangling keys.
                atomic_write_json(self.root / f"{name}.json", entry)
                atomic_write(self.root / f"{name}{SUFFIX}", lambda tmp: Path(tmp).write_bytes(blob))
            except RunFolderError as exc:
                shards.drop(self.root, name, SUFFIX)
                self.keep_in_memory(exc)
        if self._in_memory is not None:
            self._in_memory[name] = tensor
            self._checked.add(name)
        self._entries[name] = entry
        for row, key in enumerate(keys):
            self.index[key] = (name, row)


def store_for(identity: dict) -> FeatureStore:
    root = feature_root() / _digest(identity)
    refused = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "identity.json", identity)
    except (OSError, RunFolderError) as exc:  # a full or read-only cache disk: the run goes on (keep_in_memory)
        refused = exc
    store = FeatureStore(root, frozen_onnx_path(identity))
    if refused is not None:
        store.keep_in_memory(refused)
    return store


def frozen_onnx_path(identity: dict) -> Path:
    """Where the frozen part of a feature store's `identity` is exported (FrozenEngine adds the input size)."""
    return engine_folder(identity) / "frozen.onnx"


def engine_folder(identity: dict) -> Path:
    """The frozen part's ONNX export and engine choice for a feature store's `identity`, keyed by what the
    network computes (model, weights, cache point, input size) and not by the crop or the cached dtype,
    which change only what goes in and what is kept: the search's two crops, and the final run after it,
    export and measure once instead of once per crop (~3 s a cold run on a 2-core EPYC)."""
    network = {k: v for k, v in identity.items() if k not in ("preprocessing", "dtype")}
    network["input_size"] = identity.get("preprocessing", {}).get("input_size")
    network["graph"] = EXPORT_VERSION  # a better export of the same network is exported (and measured) again
    folder = feature_root() / ENGINES_DIR / _digest(network)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache, or a file where it should be: the export fails and torch runs the part
        pass
    return folder


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps({**identity, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:20]


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
    left_out_of: str = "training",
) -> tuple[torch.Tensor | None, list[bool], dict]:
    """Features of every (path, view): a tensor (len(paths), len(views), ...) and which paths worked.

    Only what is not in the store is computed. `digests` are the files' sha256 where the caller already
    has them (the data scan hashes every file); others are hashed here. Returns stats: hits, computed,
    skipped, seconds, errors where some file could not be decoded now (path -> why; warned about as left out of
    `left_out_of`), and the caches' size against their cap (caches.evict_to_cap, run after the features are
    read: never evicting this call's). With `sharding` (engine/distributed.py) each rank computes its share of
    the missing images, then sees every rank's."""
    sha = {p: content_sha256(p, digests) for p in paths}  # None: the file cannot be read any more
    keys = [[f"{sha[p]}|{v.key}" for v in views] if sha[p] else [] for p in paths]
    flat_keys = [k for row in keys for k in row]
    for attempt in range(3):
        try:
            features, ok, stats = _features_once(extract, store, paths, views, keys, flat_keys, sha, pre, batch_size,
                                                 workers, desc, sharding, left_out_of)
            break
        except KeyError as exc:  # a shard evicted by another run, or damaged, between the check and the read
            if attempt == 2:
                raise
            log.info("feature cache: %s; computing those features again", exc)
    stats.update(evict_to_cap(store.root.parent, keep=store.shard_paths(flat_keys)))
    return features, ok, stats


def _features_once(extract, store, paths, views, keys, flat_keys, sha, pre, batch_size, workers, desc, sharding,
                   left_out_of):
    store.verify(flat_keys)  # damaged shards drop out here and are recomputed
    todo = [(p, [(v, k) for v, k in zip(views, row) if k not in store]) for p, row in zip(paths, keys) if row]
    todo = [(p, missing) for p, missing in todo if missing]
    stats = {"hits": sum(1 for row in keys for k in row if k in store), "computed": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    mine = sharding.take(todo) if sharding else todo
    failed = _extract_missing(extract, store, mine, sha, pre, batch_size, workers, desc, left_out_of) if mine else {}
    if failed:
        stats["errors"] = failed
    if sharding:
        sharding.sync(store)
    stats["seconds"] = time.perf_counter() - t0
    stats["computed"] = sum(len(missing) for p, missing in mine if p not in failed)  # a file that failed: none
    ok = [bool(row) and all(k in store for k in row) for row in keys]
    stats["skipped"] = ok.count(False)
    good_keys = [row for row, good in zip(keys, ok) if good]
    if not good_keys:
        return None, ok, stats
    flat = store.get([k for row in good_keys for k in row])
    return flat.reshape(len(good_keys), len(views), *flat.shape[1:]), ok, stats


def _extract_missing(extract, store, todo, sha, pre, batch_size, workers, desc, left_out_of="training") -> dict:
    """todo: (path, [(view, key), ...]) per image. Views of the eval crop (its symmetries included) are
    computed once and never re-cropped, so their images stream from the files: decoded and cropped by
    threads while the network runs here, nothing kept but the features. Seeded random views re-crop the
    full image, so those images go through the decoded-image store (data/decoded.py), which later runs
    (finetune, other views) read again. Returns why each file that could not be decoded failed (path -> why)."""
    # Batches hold every view of each image; keep the tensor batch near `batch_size` rows.
    per_batch = max(1, batch_size // max(len(missing) for _, missing in todo))
    if any(v.index and v.kind != "dihedral" for _, missing in todo for v, _ in missing):
        dataset = _stored_views(todo, sha, pre, workers, desc)  # undecodable files are reported there
        # From the store, crops are cheap and made here.
        batches = DataLoader(dataset, batch_size=per_batch, collate_fn=_collate, generator=torch.Generator())
    else:
        dataset = FileViewDataset([(p, [v for v, _ in missing]) for p, missing in todo], pre)
        batches = _DecodedAhead(dataset, per_batch, max(1, workers))
    failed = {}
    pending_keys, pending = [], []
    inputs = None  # the float input batch, reused (normalize_batch)
    for batch in progress(batches, desc=desc, total=len(batches)):
        if batch is None:
            continue
        x, items, errors = batch
        failed.update(errors)
        if x is None:
            continue
        if x.dtype == torch.uint8:  # streamed crops: normalized here, a whole batch at a time
            if inputs is None or len(inputs) < len(x):
                inputs = torch.empty((len(x), 3, *x.shape[2:]))
            with one_thread():
                x = normalize_batch(x, pre, out=inputs[: len(x)])
        pending.append(extract(x))
        start_prefetch()  # the engine is chosen (its timing is over) and the cores stay busy: once, then a no-op
        pending_keys += [k for i in items for _, k in todo[i][1]]
        # Write every few thousand rows, and before a requested stop, so an interrupted extraction keeps
        # what it did.
        stopping = signals.stop_requested(pause=True)
        if len(pending_keys) >= 2048 or stopping:
            store.put(pending_keys, torch.cat(pending))
            pending_keys, pending = [], []
        if stopping:
            signals.check_stop(desc)
    if pending_keys:
        store.put(pending_keys, torch.cat(pending))
    warn_undecodable(failed, left_out_of)
    return failed


def _stored_views(todo, sha, pre, workers, desc) -> "ViewDataset":
    pixels = open_store(feature_root(), pre)
    pixel_keys, _ = decode_missing(pixels, [p for p, _ in todo], sha, pre, workers=workers,
                                   desc=f"{desc}: decoding")
    return ViewDataset([(k, [v for v, _ in missing]) for k, (_, missing) in zip(pixel_keys, todo)], pixels, pre)


class FileViewDataset(Dataset):
    """One item per image: the file decoded and eval-cropped, then each asked-for symmetry of that crop,
    as uint8 numpy (V×C×H×W; grey images as one channel: decode, resize and copies cost a third); the
    caller normalizes whole batches (transforms.normalize_batch). Numpy and Pillow only, both of which
    release the GIL for the heavy work, so threads can run it beside the network. An unreadable file
    gives its error instead, reported once by the caller."""

    def __init__(self, entries: list[tuple[str, list[View]]], pre: Preprocessing):
        self.entries = entries
        self.crop = eval_crop(pre)
        self.shorter_side, self.sixteen_bit_white = pre.resize_size, pre.sixteen_bit_white

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        path, views = self.entries[i]
        try:
            crop = crop_pixels(self.crop, load_rgb(path, keep_gray=True, shorter_side=self.shorter_side,
                                                       sixteen_bit_white=self.sixteen_bit_white))
        except Exception as exc:  # noqa: BLE001 - one bad file is reported and skipped, never fatal
            return {path: failure_reason(exc)}
        return np.stack([dihedral(crop, v.index) for v in views]), i


class _DecodedAhead:
    """Batches of `dataset` in order (collated by _collate), its items made by `threads` threads while
    the caller runs the network on the batch before. Threads, not DataLoader processes: the items are
    Pillow decodes and resizes, which release the GIL, and threads cost no process start-up, no fork of
    a large process and no copy of every crop between processes (2-core EPYC, lite0 on ELPV: worker
    processes took 4.2 CPU ms per image beside the network's 9.5). At most `ahead` batches wait
    (inference.read_ahead, which prediction reads its files with too)."""

    def __init__(self, dataset, per_batch: int, threads: int, ahead: int = 2):
        self.dataset, self.per_batch, self.threads, self.ahead = dataset, per_batch, threads, ahead

    def __len__(self):
        return (len(self.dataset) + self.per_batch - 1) // self.per_batch

    def __iter__(self):
        for _, items in read_ahead(range(len(self.dataset)), self.dataset.__getitem__, self.per_batch, self.threads,
                                   self.ahead, name="transferkit-decode"):
            yield _collate(items)


def default_workers(accelerator: bool = False) -> int:
    """Threads (or loader processes) that decode images beside the network. On a CPU the network needs
    the cores itself: at most 4. With the network on a GPU the cores are free for decoding, which is then
    what limits extraction (an H200 with 16 cores and 4 decode threads: 354-612 images/s through an engine
    timed at 900-2,066; RESULTS.md notes-session19): every core of this process's share but one."""
    cores = os.cpu_count() or 1
    if not accelerator:
        return min(4, cores)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun: the node's cores are shared
    return max(1, min(16, cores // max(ranks_here, 1) - 1))
