"""Decoded-image cache for image training: each file is decoded and resized once, not once per epoch.

finetune and partial (without cached activations) run the train transform on every image every epoch;
for photos, decoding the file is most of that cost. Here each image is decoded once with `load_rgb`,
its shorter side resized to the preprocessing's resize size by the eval transform's own Resize
(transforms.resize_shorter), and kept as uint8 HWC pixels in raw shard files read through memory maps.
Epochs then crop and augment those pixels (DecodedDataset).

Layout: BASE/decoded/<key>/shard-<id>.u8 (pixels back to back) + shard-<id>.json ({sha256: [offset,
height, width, crc32, channels]}, the shard's size). <key> hashes the resize size and interpolation, so other
preprocessing gets its own folder; images are keyed by their file's sha256, so a changed file is decoded
again alone. Shards are written and checked as in shards.py: a shard of the wrong size, without its json,
or holding an image whose crc32 differs from the one recorded at write time is dropped and its images
are decoded again (decode_missing verifies every image a run asks for before it decides what to decode).
The store counts towards the caches' size cap (caches.evict_to_cap, TRANSFERKIT_CACHE_MAX).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import shards
from ..caches import DECODED_DIR, DECODED_SUFFIX, evict_to_cap, touch
from ..engine import signals
from ..engine.progress import progress
from ..io import atomic_write_json
from ..preprocessing import SIXTEEN_BIT_WHITE, Preprocessing
from .folders import file_sha256
from .images import load_rgb
from .transforms import resize_shorter

log = logging.getLogger(__name__)
STORE_VERSION = 4  # 2: checksummed shards; 3: own resolution when smaller, grey as one channel;
# 4: large JPEGs decoded at a reduced DCT scale (data/images.py DRAFT_MARGIN)
SUFFIX = DECODED_SUFFIX
SHARD_BYTES = 1 << 28  # a new shard every 256 MiB: the unit an interrupted build keeps and eviction drops
MAX_LISTED = 20  # failed files named in the warning


class DecodedStore:
    """uint8 pixels by file sha256, in append-only shards of one folder (one resize size + interpolation)."""

    def __init__(self, root, resize_size: int | None = None):
        self.root = Path(root)
        self.resize_size = resize_size  # the preprocessing's: images stored below it are enlarged when cut
        self.index: dict[str, tuple[str, int, int, int, int]] = {}  # sha256 -> (shard, offset, h, w, channels)
        self.crc: dict[str, int] = {}  # sha256 -> crc32 of its pixels, recorded when they were written
        self._maps: dict[str, np.memmap] = {}
        self.decoded = 0  # images this object decoded and stored (a rerun on the same files: 0)
        self.errors: dict[str, str] = {}  # path -> why it could not be decoded, in this process
        self._entries, self.damaged = shards.list_shards(self.root, SUFFIX)
        for name, _ in self.damaged:
            shards.drop(self.root, name, SUFFIX)
        for name, entry in list(self._entries.items()):
            try:
                self._add(name, entry)
            except (AttributeError, KeyError, TypeError, ValueError):
                self._drop(name, "foreign index entry")

    def _add(self, name: str, entry: dict) -> None:
        self._entries[name] = entry
        for digest, (offset, height, width, crc, channels) in entry["images"].items():
            self.index[digest] = (name, offset, height, width, channels)
            self.crc[digest] = crc

    def refresh(self) -> None:
        """Take in the shards other processes wrote since this store was opened."""
        fresh = DecodedStore(self.root)
        self._entries.update(fresh._entries)
        self.index.update(fresh.index)
        self.crc.update(fresh.crc)
        self.damaged += fresh.damaged

    def verify(self, digests) -> None:
        """Check the pixels of `digests` against their crc32; drop every shard holding a damaged one
        (its images then read as missing) and warn once about what was dropped."""
        bad = {}
        for digest in digests:
            if digest in self.index and zlib.crc32(self._pixels(digest)) != self.crc[digest]:
                bad.setdefault(self.index[digest][0], "checksum mismatch")
        for name, why in bad.items():
            self._drop(name, why)
        shards.warn_dropped("decoded-image cache", self.root, self.damaged)
        self.damaged = []

    def _drop(self, name: str, why: str) -> None:
        self.damaged.append((name, why))
        self._maps.pop(name, None)
        self._entries.pop(name, None)
        shards.drop(self.root, name, SUFFIX)
        for digest in [d for d, (shard, *_) in self.index.items() if shard == name]:
            del self.index[digest]

    def __contains__(self, digest) -> bool:
        return digest in self.index

    def get(self, digest: str) -> torch.Tensor:
        """uint8 CHW; a channels-last view of the stored HWC pixels, the layout torchvision's uint8
        resize kernels are fastest on."""
        _, _, height, width, channels = self.index[digest]
        image = torch.from_numpy(self._pixels(digest).reshape(height, width, channels)).permute(2, 0, 1)
        return image.expand(3, -1, -1) if channels == 1 else image

    def image(self, digest: str):
        """What a transform is given: the stored tensor, or for an image stored below the resize size a
        PIL image of its pixels (the file's own), so the eval Resize enlarges it with the very kernels
        it applies to the file: training crops equal prediction's. Cheap: such images are small."""
        image = self.get(digest)
        if self.resize_size and min(image.shape[1:]) < self.resize_size:
            return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        return image

    def _pixels(self, digest: str) -> np.ndarray:
        """The stored bytes of one image, flat."""
        shard, offset, height, width, channels = self.index[digest]
        if shard not in self._maps:
            path = self.root / f"{shard}{SUFFIX}"
            # Copy-on-write: a transform writing in place could never reach the file, and torch does
            # not warn about wrapping a read-only array.
            self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="c")
            touch(path)  # least recently used shards are evicted first (caches.evict_to_cap)
        return self._maps[shard][offset:offset + height * width * channels]

    def nbytes(self) -> int:
        return sum(entry["bytes"] for entry in self._entries.values())

    def __getstate__(self):
        # DataLoader workers started by spawn get the index, not a pickled copy of every mapped shard.
        return {**self.__dict__, "_maps": {}}


def open_store(base, pre: Preprocessing) -> DecodedStore:
    identity = {"resize_size": pre.resize_size, "interpolation": pre.interpolation, "v": STORE_VERSION}
    if pre.sixteen_bit_white != SIXTEEN_BIT_WHITE:  # 16-bit images read with another white are other pixels
        identity["sixteen_bit_white"] = pre.sixteen_bit_white
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(base) / DECODED_DIR / key
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "identity.json").exists():
        atomic_write_json(root / "identity.json", identity)
    return DecodedStore(root, pre.resize_size)


class DecodedDataset(Dataset):
    """(tensor, label, index) like ImageListDataset, the transform applied to the stored uint8 pixels.

    Evaluation gives the PIL path's output: the stored image is the eval Resize's own result, so that
    Resize is a no-op here and the center crop and normalisation see the same pixels. Training:
    RandomResizedCrop picks the same fractions of the image, but resamples them from the stored copy
    (shorter side = resize size) instead of the full-resolution file, so small crops of large photos are
    a little softer (and images smaller than the resize size were upsampled once before cropping). timm
    and FFCV make the same trade for the same speed-up."""

    def __init__(self, items, keys: list[str], store: DecodedStore, transform):
        self.items = list(items)
        self.keys = list(keys)
        self.store = store
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(self.store.image(self.keys[index])), self.items[index][1], index


class _DecodeDataset(Dataset):
    def __init__(self, paths: list[str], pre: Preprocessing):
        self.paths = paths
        self.pre = pre
        self.resize = resize_shorter(pre)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i], shorter_side=self.pre.resize_size,
                             sixteen_bit_white=self.pre.sixteen_bit_white)
            pixels = stored_pixels(image, self.pre.resize_size, self.resize)
        except Exception as exc:  # noqa: BLE001 - one bad file is reported and skipped, never fatal
            return i, None, failure_reason(exc)
        return i, torch.from_numpy(pixels), ""  # a tensor crosses from the worker in shared memory


def stored_pixels(image, resize_size: int, resize) -> np.ndarray:
    """HWC uint8 as stored: shorter side reduced to `resize_size` where larger (never enlarged: the
    crop's Resize does that when it is cut), one channel where the three are equal (a grey image)."""
    if min(image.size) > resize_size:
        image = resize(image)
    # np.array, not np.asarray: Pillow hands out a read-only view, which torch.from_numpy warns about.
    pixels = np.array(image)
    if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
        return np.ascontiguousarray(pixels[..., :1])
    return pixels


def failure_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class _ShardWriter:
    """Appends pixels to a temp file that becomes a shard every SHARD_BYTES and at the end."""

    def __init__(self, store: DecodedStore):
        self.store = store
        self._open()

    def _open(self) -> None:
        self.name = f"shard-{uuid.uuid4().hex[:12]}"
        self.tmp = self.store.root / f".{self.name}.u8.tmp"
        self.fh = open(self.tmp, "wb")
        self.images: dict[str, list[int]] = {}
        self.offset = 0

    def add(self, digest: str, pixels: np.ndarray) -> None:
        data = np.ascontiguousarray(pixels).data
        self.fh.write(data)
        self.images[digest] = [self.offset, pixels.shape[0], pixels.shape[1], zlib.crc32(data), pixels.shape[2]]
        self.offset += pixels.nbytes
        if self.offset >= SHARD_BYTES:
            self.close()
            self._open()

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if not self.images:
            os.unlink(self.tmp)
            return
        # Index entry first, then the pixels (shards.py): an interrupted build leaves no dangling keys.
        entry = shards.new_entry(self.store.root, self.offset, images=self.images)
        atomic_write_json(self.store.root / f"{self.name}.json", entry)
        os.replace(self.tmp, self.store.root / f"{self.name}{SUFFIX}")
        self.store._add(self.name, entry)

    def abort(self) -> None:
        self.fh.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def decode_missing(store: DecodedStore, paths: list[str], digests: dict[str, str] | None, pre: Preprocessing,
                   workers: int = 0, sharding=None, desc: str = "decoding images") -> tuple[list, dict]:
    """The store key (file sha256) of each path, None where it could not be decoded; decodes only
    what the store lacks. `digests`: sha256 by path where the caller has them (the data scan). With
    `sharding` (engine/distributed.py) each rank decodes its share, then sees every rank's shards.
    Stats: hits, decoded, failed, seconds."""
    t0 = time.perf_counter()
    keys = [content_sha256(p, digests) for p in paths]
    store.verify(k for k in keys if k is not None)  # damaged shards drop out here and are decoded again
    hits = sum(1 for k in keys if k in store)
    todo = list({k: p for p, k in zip(paths, keys) if k is not None and k not in store}.items())
    mine = sharding.take(todo) if sharding else todo
    if mine:
        _decode(store, mine, pre, workers, desc)
    if sharding:
        sharding.sync(store)
    keys = [k if k in store else None for k in keys]
    failed = [p for p, k in zip(paths, keys) if k is None]
    warn_undecodable({p: store.errors.get(p, "cannot be read") for p in failed})
    in_use = {store.root / f"{store.index[k][0]}{SUFFIX}" for k in keys if k is not None}
    evicted = evict_to_cap(store.root.parent.parent, keep=in_use)
    stats = {"hits": hits, "decoded": store.decoded, "failed": len(failed),
             "seconds": round(time.perf_counter() - t0, 3), "store_bytes": store.nbytes(), **evicted}
    log.info("decoded-image cache: %.1f MB for %d images here (%s)", stats["store_bytes"] / 1e6, len(store.index),
             store.root)
    return keys, stats


def warn_undecodable(failed: dict[str, str], left_out_of: str = "training") -> None:
    """One warning naming the files (path -> why) that could not be decoded, and what they are `left_out_of`."""
    if not failed:
        return
    listed = "\n  ".join(f"{p}: {why}" for p, why in list(failed.items())[:MAX_LISTED])
    if len(failed) > MAX_LISTED:
        listed += f"\n  ... and {len(failed) - MAX_LISTED} more"
    log.warning("%d image(s) could not be decoded and are left out of %s:\n  %s", len(failed), left_out_of, listed)


def content_sha256(path: str, digests: dict[str, str] | None) -> str | None:
    """The file's sha256: from `digests` (the data scan's) where known, else hashed; None if unreadable."""
    digest = (digests or {}).get(path)
    if digest is None:
        try:
            digest = file_sha256(path)
        except OSError:
            return None
    return digest


def _decode(store: DecodedStore, todo: list[tuple[str, str]], pre: Preprocessing, workers: int, desc: str) -> None:
    """todo: (sha256, path). Decoding is the slow part, so it runs in DataLoader workers; this process
    only appends the pixels to the shard."""
    # Its own generator: a DataLoader draws a seed when iterated, and a run that builds the store must
    # leave the global RNG (and so its training) exactly as a run that finds it built.
    loader = DataLoader(_DecodeDataset([p for _, p in todo], pre), batch_size=None, num_workers=workers,
                        generator=torch.Generator())
    writer = _ShardWriter(store)
    try:
        for i, pixels, error in progress(loader, desc=desc, total=len(todo)):
            if pixels is None:
                store.errors[todo[i][1]] = error
                continue
            writer.add(todo[i][0], pixels.numpy())
            store.decoded += 1
            if signals.stop_requested():
                break  # Ctrl-C: keep what was decoded (the shard is closed below), then stop
    except BaseException:
        writer.abort()
        raise
    writer.close()
    signals.check_stop(desc)
