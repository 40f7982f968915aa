"""The default recipe on a folder with many classes: does the search plan its time so that every class keeps
enough training images?

    python benchmarks/many_classes.py [--work DIR] [--classes 100] [--train-per-class 30] [--baseline SRC]
                                      [--budget 60s] [--no-record]

The folder: generated 128×128 RGB JPEGs, one class per (shape, colour, stripe frequency) of 4 × 5 × 5, each image
a striped background at a random angle under pixel noise with the class's shape at a random place, size and
colour. Synthetic: it says how the search spends a budget on 100 classes, not how good a probe is on real photos.

Runs, each `python -m transferkit ...` in a fresh process with a cold feature cache:
- `train DIR` (the default recipe; the default budget, or `--time-budget` of --budget) with this tree's
  transferkit;
- the same with the transferkit sources at SRC (`--baseline`, e.g. a `git worktree` of an earlier commit's
  `src`), to compare the two trees in one sitting;
- `train DIR --recipe tutorial --mode linear-probe --crop-fraction 1.0`: one logistic probe on one view of every
  training image at the grid's default C, no search: what the budget should at least reach.
Reports wall seconds, the final model's training images, the images the candidates were compared on, the
choice, and val accuracy with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from common import environment_line, publish, run_cli, table  # noqa: E402

SIDE = 128
SHAPES = ("ellipse", "rectangle", "triangle", "cross")
COLOURS = ((1, .2, .2), (.2, 1, .2), (.2, .2, 1), (1, 1, .2), (.8, .2, 1))


def generate(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """The folder (train/ and val/, a folder per class); idempotent (a finished folder has a marker)."""
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE)
    for c in range(classes):
        shape, colour, frequency = SHAPES[c % 4], np.array(COLOURS[(c // 4) % 5]), c // 20 + 1
        for i in range(train_per_class + val_per_class):
            folder = root / ("train" if i < train_per_class else "val") / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = rng.uniform(0, np.pi)
            phase = np.cos(angle) * ramp[None] + np.sin(angle) * ramp[:, None]
            stripes = 0.5 + 0.5 * np.sin(6 * np.pi * frequency * phase)
            pixels = stripes[..., None] * colour * 150 + rng.normal(0, 40, (SIDE, SIDE, 3)) + 40
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            _draw(ImageDraw.Draw(image), shape, *rng.integers(40, 88, 2), rng.integers(15, 35),
                  tuple(int(v) for v in rng.integers(0, 255, 3)))
            image.save(folder / f"{i}.jpg", quality=85)
    (root / ".complete").touch()
    return root


def _draw(draw, shape: str, x: int, y: int, r: int, fill: tuple) -> None:
    if shape == "ellipse":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        draw.rectangle([x - r, y - 5, x + r, y + 5], fill=fill)
        draw.rectangle([x - 5, y - r, x + 5, y + r], fill=fill)


def run(data: Path, out: Path, extra: list[str], src: str | None = None) -> dict:
    """One cold `transferkit train` (common.run_cli), with the sources at `src` where given."""
    cache = tempfile.mkdtemp(prefix="tk-many-classes-")
    try:
        wall, _ = run_cli(["train", str(data), "--out", str(out), "--overwrite", *extra], cache,
                          {"PYTHONPATH": src} if src else None)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    metrics = json.loads((out / "metrics.json").read_text())
    search = json.loads((out / "search.json").read_text()) if (out / "search.json").exists() else {}
    interval = metrics.get("best_val_acc_interval") or {}
    low, high = interval.get("low"), interval.get("high")
    return {"wall s": round(wall, 1), "final model's training images": metrics.get("train_images"),
            "compared on": search.get("compared_on_images") or "", "val acc": round(metrics["best_val_acc"], 4),
            "95% interval": f"{low:.4f}-{high:.4f}" if low is not None else "",
            "chosen": search.get("chosen", "")}


def _commit(src: str | None) -> str:
    where = src or str(Path(__file__).parent)
    done = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train-per-class", type=int, default=30)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--baseline", default=None, help="transferkit sources (a src folder) of another tree")
    ap.add_argument("--budget", default=None, help="--time-budget of the default runs (default: the default)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tk-many-classes-"))
    data = generate(work / "data", args.classes, args.train_per_class, args.val_per_class)
    budget = ["--time-budget", args.budget] if args.budget else []
    label = f"--time-budget {args.budget}" if args.budget else "default"
    runs = [(f"{label}, this tree ({_commit(None)})", budget, None)]
    if args.baseline:
        runs.append((f"{label}, baseline tree ({_commit(args.baseline)})", budget, args.baseline))
    runs.append(("one probe, one view, every training image (`--recipe tutorial --mode linear-probe "
                 "--crop-fraction 1.0`)", ["--recipe", "tutorial", "--mode", "linear-probe", "--crop-fraction",
                                           "1.0"], None))
    rows = []
    for i, (name, extra, src) in enumerate(runs):
        rows.append({"run": name, **run(data, work / f"run{i}", extra, src)})
        print(rows[-1], flush=True)
    command = "python benchmarks/many_classes.py" + (" --baseline SRC" if args.baseline else "") + \
        (f" --classes {args.classes}" if args.classes != 100 else "") + \
        (f" --train-per-class {args.train_per_class}" if args.train_per_class != 30 else "") + \
        (f" --val-per-class {args.val_per_class}" if args.val_per_class != 10 else "") + \
        (f" --budget {args.budget}" if args.budget else "")
    text = (f"## The default recipe on {args.classes} classes{', ' + label if args.budget else ''}\n\n{environment_line()}. Data: {args.classes} classes of "
            f"generated 128×128 JPEGs (shape × colour × stripe frequency; benchmarks/many_classes.py), "
            f"{args.train_per_class} train / {args.val_per_class} val per class. Each run in a fresh process with a "
            f"cold feature cache. Command: `{command}`.\n\n"
            + table(rows, ["run", "wall s", "final model's training images", "compared on", "val acc",
                           "95% interval", "chosen"]) + "\n")
    publish("many_classes" + (f"_{args.classes}" if args.classes != 100 else "")
            + (f"_{args.budget}" if args.budget else ""), text, record=not args.no_record)


if __name__ == "__main__":
    main()
