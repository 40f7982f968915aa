"""The default recipe on a folder larger than the search compares on: what fitting the chosen probe on more
training images than the search's subsample adds, in the same budget.

    python benchmarks/large_folder.py [--work DIR] [--images 20000] [--no-record]

The folder: N generated 64×64 grey PNGs in 10 classes (80/20 split), each an oriented sine grating (the class
sets the orientation, 18° apart, ±6° jitter; random frequency and phase) under blocky and pixel noise of about
twice its amplitude. Harder than benchmarks/scale.py's strokes (a probe on 2,000 training images scores ~0.6),
so the accuracy still grows with the number of training images, as on real data with many classes.

Two runs, each `python -m transferkit train DIR` in a fresh process with a cold feature cache and the default
budget: (a) the default, which compares the candidates on a seeded 2,000 of the training images and then fits
the chosen probe on as many as the time left pays for; (b) the same with `--train-subsample 2000`, where the
search and the final model keep those 2,000 (the search's images are the same in both). Reports wall
seconds, training images of the final model, the choice, and val accuracy with its 95% interval.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, cold_env, environment_line, publish, table  # noqa: E402

SIDE, CLASSES = 64, 10


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """n gratings under noise, 80% train / 20% val, classes balanced; idempotent (a finished folder has a marker)."""
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    for i in range(n):
        label = i % CLASSES
        angle = np.deg2rad(label * 180 / CLASSES + rng.normal(0, 6))
        grating = np.sin(rng.uniform(0.15, 0.3) * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
        blocks = np.kron(rng.normal(0, 1, (SIDE // 4, SIDE // 4)), np.ones((4, 4)))
        pixels = np.clip(128 + 40 * (1.2 * grating + blocks + rng.normal(0, 0.8, (SIDE, SIDE))), 0, 255)
        split = "val" if (i // CLASSES) % 5 == 0 else "train"  # every class in both splits
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:06d}.png")
    (root / ".complete").touch()
    return root


def run(data: Path, out: Path, extra: list[str]) -> dict:
    cache = tempfile.mkdtemp(prefix="tk-large-folder-")
    env = cold_env(cache, TRANSFERKIT_QUIET="1")
    cmd = [sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    search = json.loads((out / "search.json").read_text())
    interval = metrics.get("best_val_acc_interval") or {}
    return {"wall s": wall, "final model's training images": metrics["train_images"],
            "val acc": metrics["best_val_acc"], "95% interval": f"{interval.get('low', 0):.4f}-{interval.get('high', 0):.4f}",
            "chosen": search["chosen"], "search s": search["wall_seconds"]}


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    work = Path(args.work)
    machine = environment_line()
    data = generate(work / f"gratings-{args.images}", args.images)
    rows = []
    for label, extra in (("default (search on 2,000, final probe on what the budget pays for)", []),
                         ("`--train-subsample 2000` (search and final probe on the same 2,000)", ["--train-subsample", "2000"])):
        rows.append({"run": label, **run(data, work / f"large-folder-run-{len(rows)}", extra)})
        print(rows[-1], flush=True)
    gain = rows[0]["val acc"] - rows[1]["val acc"]
    text = (f"## The default recipe on a large folder\n\n{machine}. Data: {args.images} generated 64×64 grey gratings "
            f"under noise, 10 classes, 80/20 split (benchmarks/large_folder.py). Each run: `transferkit train DIR` "
            f"in a fresh process, cold feature cache, default budget (4m). Command: `python benchmarks/large_folder.py "
            f"--images {args.images}`.\n\n"
            + table(rows, ["run", "wall s", "search s", "final model's training images", "val acc", "95% interval",
                           "chosen"])
            + f"\n\nDefault − same 2,000: {100 * gain:+.1f} points of val accuracy.")
    publish("large_folder", text, record=not args.no_record)


if __name__ == "__main__":
    main()
