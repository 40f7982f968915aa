"""Cheap picture fingerprints: find copies of one picture without a network pass.

A fingerprint is taken from the image the data scan decodes anyway: a 64-bit difference hash (dHash)
and a 32×32 grey thumbnail. Two files are "the same picture" when their thumbnails correlate at
SAME_PICTURE_CORRELATION or more: re-encoding (PNG → JPEG q80) and resizing keep them ≥ 0.9995, while
the most alike *different* images we measured, neighbouring ELPV solar cells of one module, stay
≤ 0.9985 (benchmarks/RESULTS.md, data check). Comparing every pair would be quadratic, so pairs are
only compared when their dHashes share one of 8 bytes: by the pigeonhole principle every pair within
Hamming distance 7 shares one, and re-encoded or resized copies stay within 3.

Crops are not "the same picture" at a fixed alignment; `aligned_similarity` tries small crops of
each image against the other (used by `transferkit data check` to confirm an embedding match).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMB_SIDE = 32
SAME_PICTURE_CORRELATION = 0.999
HASH_BANDS = 8  # bytes of the 64-bit dHash; pairs sharing none differ in ≥ 8 bits and are not compared
CROP_SCALES = (0.95, 0.9, 0.85)  # aligned_similarity: crops of 5–15 % per side, at 9 anchors each
CROP_ANCHORS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Fingerprint:
    dhash: int
    thumb: bytes  # THUMB_SIDE² grey pixels, uint8

    def vector(self) -> np.ndarray:
        return _unit(np.frombuffer(self.thumb, dtype=np.uint8).astype(np.float32))


def fingerprint(img: Image.Image) -> Fingerprint:
    grey = img.convert("L")
    small = np.asarray(grey.resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return Fingerprint(int.from_bytes(np.packbits(bits).tobytes(), "big"), _thumb(grey).tobytes())


def _thumb(grey: Image.Image) -> np.ndarray:
    return np.asarray(grey.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR), dtype=np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    """Zero mean, unit length: the dot product of two is their Pearson correlation."""
    v = v.ravel().astype(np.float32)
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def same_picture_pairs(fingerprints: dict[str, Fingerprint],
                       threshold: float = SAME_PICTURE_CORRELATION) -> list[tuple[str, str, float]]:
    """(path_a, path_b, correlation) for every pair of files showing the same picture, a < b."""
    paths = sorted(fingerprints)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        h = fingerprints[path].dhash
        for band in range(HASH_BANDS):
            buckets[(band, (h >> (8 * band)) & 0xFF)].append(i)
    vectors = np.stack([fingerprints[p].vector() for p in paths]) if paths else np.zeros((0, 1))
    found: dict[tuple[int, int], float] = {}
    for members in buckets.values():
        if len(members) < 2:
            continue
        idx = np.asarray(members)
        corr = vectors[idx] @ vectors[idx].T
        for a, b in zip(*np.nonzero(np.triu(corr >= threshold, k=1))):
            found[(idx[a], idx[b])] = float(corr[a, b])
    return [(paths[i], paths[j], c) for (i, j), c in sorted(found.items())]


def groups_of(pairs, digests: dict[str, str] | None = None) -> list[list[str]]:
    """Connected groups (size ≥ 2) of files linked by `pairs` or by an identical sha256."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for a, b, *_ in pairs:
        union(a, b)
    first_with: dict[str, str] = {}
    for path, sha in sorted((digests or {}).items()):
        union(path, first_with.setdefault(sha, path))
    members: dict[str, list[str]] = defaultdict(list)
    for x in parent:
        members[find(x)].append(x)
    return sorted(sorted(g) for g in members.values() if len(g) > 1)


def aligned_similarity(a: Image.Image, b: Image.Image) -> float:
    """Highest thumbnail correlation between one image and mild crops (or all) of the other, both ways:
    a crop or resize of a picture scores about as high as a re-encoded copy."""
    best = -1.0
    for x, y in ((a, b), (b, a)):
        target = _unit(_thumb(y.convert("L")))
        grey = x.convert("L")
        for crop in _crops(grey):
            best = max(best, float(_unit(_thumb(crop)) @ target))
    return best


def _crops(img: Image.Image):
    yield img
    w, h = img.size
    for scale in CROP_SCALES:
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        for fx in CROP_ANCHORS:
            for fy in CROP_ANCHORS:
                x, y = round((w - cw) * fx), round((h - ch) * fy)
                yield img.crop((x, y, x + cw, y + ch))


def one_side_per_group(side: dict, groups: list[list]) -> list:
    """Move every group that straddles train/val wholly to the side most of it is on (train on a tie),
    in place; return the moved keys. Groups already on one side are left alone, so a split without
    straddling groups is unchanged."""
    moved = []
    for group in groups:
        sides = [side[k] for k in group if k in side]
        if len(set(sides)) < 2:
            continue
        keep = "val" if sides.count("val") > sides.count("train") else "train"
        for k in group:
            if k in side and side[k] != keep:
                side[k] = keep
                moved.append(k)
    return moved
