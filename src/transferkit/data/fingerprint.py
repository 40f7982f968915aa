"""Cheap picture fingerprints: find copies of one picture without a network pass.

A fingerprint is taken from the image the data scan decodes anyway: a 64-bit difference hash (dHash)
and a 32×32 grey thumbnail. Two files are "the same picture" when their thumbnails correlate at
SAME_PICTURE_CORRELATION or more: JPEG re-encodings and resized copies of ELPV cells do
(tests/test_datacheck.py), while no two *different* ELPV cells do, not even neighbouring cells of one
module, the most alike different images we know (benchmarks/RESULTS.md, data check). Comparing every
pair would be quadratic, so pairs are only compared when their dHashes share one of 8 bytes: by the
pigeonhole principle every pair within Hamming distance 7 shares one (the re-encoded and resized ELPV
copies we tried were within 3). That work still grows with the square of the folder, so a large folder is
searched in a k-d tree of the thumbnails instead, which finds every pair (`_pairs_near`).

Crops are not "the same picture" at a fixed alignment; `aligned_similarity` tries mild crops of
each image against the other (`transferkit data check` confirms an embedding match with it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMB_SIDE = 32
CROP_SOURCE_SIDE = 2 * THUMB_SIDE  # crop_thumbnails cuts its crops from a copy this small (a caller may decode so)
SAME_PICTURE_CORRELATION = 0.999
COMPARE_BLOCK = 512  # rows of a bucket compared at once: memory grows with the bucket, not its square
HASH_BANDS = 8  # bytes of the 64-bit dHash; pairs sharing none differ in ≥ 8 bits and are not compared
CROP_ANCHORS = (0.0, 0.5, 1.0)  # where a crop sits: left/top, centre, right/bottom
# From this many images the scan finds look-alike pairs in a k-d tree (_pairs_near) instead of dHash buckets, whose
# work grows with the square of the folder: about the size where the two cost the same (scipy's import included).
NEAR_SEARCH_FROM = 30_000
NEAR_DIMS = 8  # principal axes of the k-d tree (100,000 gratings: 3 axes left 29 million pairs to compare, 8 1,418)


@dataclass(frozen=True)
class Fingerprint:
    dhash: int
    thumb: bytes  # THUMB_SIDE² grey pixels, uint8
    size: tuple[int, int]  # width, height of the picture as stored (EXIF-oriented)


def fingerprint(img: Image.Image, size: tuple[int, int] | None = None) -> Fingerprint:
    """`size`: the picture's size as stored, where `img` was decoded smaller (data/images.py read_rgb)."""
    grey = img.convert("L")
    small = np.asarray(grey.resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return Fingerprint(int.from_bytes(np.packbits(bits).tobytes(), "big"), _thumb(grey).tobytes(), size or img.size)


def _thumb(grey: Image.Image) -> np.ndarray:
    return np.asarray(grey.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR), dtype=np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    """Zero mean, unit length: the dot product of two is their Pearson correlation."""
    v = v.ravel().astype(np.float32)
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """`_unit` of each row."""
    v = rows.astype(np.float32)
    v -= v.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=v, where=norms > 0)


def same_picture_pairs(fingerprints: dict[str, Fingerprint],
                       threshold: float = SAME_PICTURE_CORRELATION) -> list[tuple[str, str, float]]:
    """(path_a, path_b, correlation) for every pair of files showing the same picture, a < b."""
    paths = sorted(fingerprints)
    # The thumbnails stay uint8 (1 KB an image); they become unit vectors only while compared. (All of them as
    # float32 at once took 4 KB an image: 290 MB of a 70,000-image scan's peak.)
    if len(paths) < 2:
        return []
    thumbs = np.stack([np.frombuffer(fingerprints[p].thumb, dtype=np.uint8) for p in paths])
    if len(paths) >= NEAR_SEARCH_FROM:
        found = _pairs_near(thumbs, threshold)
    else:
        found = _pairs_in_buckets(thumbs, [fingerprints[p].dhash for p in paths], threshold)
    return [(paths[i], paths[j], c) for (i, j), c in sorted(found.items())]


def _pairs_in_buckets(thumbs: np.ndarray, dhashes: list[int], threshold: float) -> dict[tuple[int, int], float]:
    """Pairs (i < j) at `threshold` or more among the pairs whose dHashes share a byte (module docstring)."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, h in enumerate(dhashes):
        for band in range(HASH_BANDS):
            buckets[(band, (h >> (8 * band)) & 0xFF)].append(i)
    found: dict[tuple[int, int], float] = {}
    for members in buckets.values():
        if len(members) < 2:
            continue
        idx = np.asarray(members)
        vectors = _unit_rows(thumbs[idx])
        # Row blocks: look-alike images (one class of a synthetic set) can share a bucket by the thousand,
        # and a whole bucket's correlation matrix grows with its square.
        for start in range(0, len(idx), COMPARE_BLOCK):
            corr = vectors[start:start + COMPARE_BLOCK] @ vectors.T
            for a, b in zip(*np.nonzero(np.triu(corr >= threshold, k=start + 1))):
                found[(idx[start + a], idx[b])] = float(corr[a, b])
    return found


def _pairs_near(thumbs: np.ndarray, threshold: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) at `threshold` or more, found in a k-d tree of the thumbnails' coordinates along their
    NEAR_DIMS principal axes. Two unit vectors correlating at ρ lie sqrt(2 (1 - ρ)) apart, and projecting onto
    any orthonormal axes never lengthens a distance: the pairs within that radius there hold every match, and
    only they are compared in full. The bucket search compares each image with all that share a dHash byte (an
    eighth of a 256th of the folder each: quadratic), 12.4 s for 100,000 64-px gratings; this 2.8 s. It also
    finds matches whose dHashes share no byte."""
    from scipy.spatial import cKDTree

    coords = _principal_coordinates(thumbs)
    tree = cKDTree(coords)
    radius = float(np.sqrt(2 * (1 - threshold))) + 1e-3  # room for float32 rounding
    found: dict[tuple[int, int], float] = {}
    for start in range(0, len(thumbs), COMPARE_BLOCK):  # blocks: the neighbour lists stay small
        near = tree.query_ball_point(coords[start:start + COMPARE_BLOCK], radius)
        i = np.repeat(np.arange(start, start + len(near)), [len(n) for n in near])
        j = np.fromiter((k for n in near for k in n), dtype=np.int64, count=len(i))
        i, j = i[j > i], j[j > i]
        for s in range(0, len(i), COMPARE_BLOCK * 64):
            a, b = i[s:s + COMPARE_BLOCK * 64], j[s:s + COMPARE_BLOCK * 64]
            corr = np.einsum("ij,ij->i", _unit_rows(thumbs[a]), _unit_rows(thumbs[b]))
            match = corr >= threshold
            found.update(((int(x), int(y)), float(c)) for x, y, c in zip(a[match], b[match], corr[match]))
    return found


def _principal_coordinates(thumbs: np.ndarray) -> np.ndarray:
    """Unit thumbnails' coordinates along the top NEAR_DIMS principal axes of a seeded sample of them."""
    rng = np.random.default_rng(0)
    sample = _unit_rows(thumbs[rng.choice(len(thumbs), min(len(thumbs), 4000), replace=False)])
    axes = np.linalg.svd(sample, full_matrices=False)[2][:NEAR_DIMS].T  # orthonormal columns
    return np.concatenate([_unit_rows(thumbs[s:s + 8192]) @ axes for s in range(0, len(thumbs), 8192)])


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


def crop_thumbnails(img: Image.Image) -> np.ndarray:
    """Unit thumbnails of the whole image (row 0) and of mild crops of it (CROP_BOXES), one per row."""
    grey = img.convert("L")
    grey.thumbnail((CROP_SOURCE_SIDE, CROP_SOURCE_SIDE))  # crops of a small copy: about as exact at 32×32, faster
    w, h = grey.size
    side = (THUMB_SIDE, THUMB_SIDE)
    return np.stack([_unit(np.asarray(grey.resize(side, Image.BILINEAR, box=(x0 * w, y0 * h, x1 * w, y1 * h))))
                     for x0, y0, x1, y1 in CROP_BOXES])


def aligned_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Highest correlation between one image's whole thumbnail and the other's crops, both ways
    (crop_thumbnails of each): a crop or resize of a picture scores about as high as a copy."""
    return float(max((a @ b[0]).max(), (b @ a[0]).max()))


def _crop_boxes() -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) as fractions: the whole image first, then crops keeping 84–99 % of each side
    (the same on both axes in steps of 1 %, or 88–100 % per axis in steps of 3 %), at 9 anchors."""
    scales = [(1 - k / 100, 1 - k / 100) for k in range(1, 17)]
    scales += [(sx, sy) for sx in (1.0, 0.97, 0.94, 0.91, 0.88) for sy in (1.0, 0.97, 0.94, 0.91, 0.88) if sx != sy]
    boxes = {(0.0, 0.0, 1.0, 1.0)}
    for sx, sy in scales:
        for fx in CROP_ANCHORS:
            for fy in CROP_ANCHORS:
                x0, y0 = (1 - sx) * fx, (1 - sy) * fy
                boxes.add((round(x0, 4), round(y0, 4), round(x0 + sx, 4), round(y0 + sy, 4)))
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


CROP_BOXES = _crop_boxes()


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
