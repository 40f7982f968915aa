"""Feature-extract at scale: folders of 10k, 30k and 70k small generated images, as a user would run it.

    python benchmarks/scale.py [--work DIR] [--sizes 10000,30000,70000] [--extra '--epochs 1'] [--fresh]

Each size is a folder of 28×28 grey PNGs in 10 classes (a digit-like stroke pattern per class, with
noise and jitter), generated once. Each run is `python -m transferkit train DIR --mode feature-extract`
in a fresh process with cold caches (a new TRANSFERKIT_FEATURE_CACHE), the default recipe otherwise.
Reports wall seconds, extraction images/s (from the run's metrics.json), peak RSS of that process
(os.wait4), and the cache's bytes on disk per image (feature store and decoded-image store apart),
against the decoded source pixels (28 × 28 = 784 bytes per image). Sizes may be measured one per
invocation (each is long on a small CPU): every row, with its machine line and load, is kept in
benchmarks/scale_rows.json and the RESULTS.md table is rebuilt from all rows of the same --extra
(--fresh starts the list again).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, environment_line, run_cli, table, write_section  # noqa: E402

SIDE = 28
CLASSES = 10
ROWS = Path(__file__).with_name("scale_rows.json")


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """n images, 80% train / 20% val, classes balanced; idempotent (a finished folder has a marker)."""
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for i in range(n):
        label = i % CLASSES
        angle = np.pi * label / CLASSES + rng.normal(0, 0.08)
        offset = rng.normal(0, 1.5)
        stroke = np.abs((xx - SIDE / 2) * np.sin(angle) - (yy - SIDE / 2) * np.cos(angle) - offset) < 2.0
        ring = np.abs(np.hypot(xx - SIDE / 2, yy - SIDE / 2) - 4 - label) < 1.0
        pixels = np.clip(220 * (stroke | ring) + rng.normal(0, 20, (SIDE, SIDE)), 0, 255).astype(np.uint8)
        split = "val" if (i // CLASSES) % 5 == 0 else "train"  # every class in both splits
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")  # mode L: one channel
    (root / ".complete").touch()
    return root


def folder_bytes(root: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def run(data: Path, out: Path, cache: Path, extra: list[str]) -> dict:
    wall, usage = run_cli(["train", str(data), "--recipe", "tutorial", "--mode", "feature-extract", "--out", str(out),
                           *extra], cache)
    metrics = json.loads((out / "metrics.json").read_text())
    src = metrics["source"]
    computed = src["train"]["computed"] + src["val"]["computed"]
    seconds = src["train"]["seconds"] + src["val"]["seconds"]
    decoded = folder_bytes(cache / "decoded") if (cache / "decoded").exists() else 0
    # Feature shards sit one folder down (<id>/shard-*), decoded-store shards two (decoded/<id>/shard-*). (This
    # was the glob "[!d]*/shard-*", which also left out every feature folder whose id began with "d".)
    features = folder_bytes(cache, "*/shard-*")
    return {"wall_s": wall, "extraction_rate": computed / seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "feature_bytes": features, "decoded_bytes": decoded,
            "fixed_bytes": folder_bytes(cache) - features - decoded,
            "val_acc": metrics["best_val_acc"], "engine": src.get("engine"), "precision": metrics.get("precision")}


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sizes", default="10000,30000,70000")
    ap.add_argument("--extra", default="", help="more `transferkit train` options, e.g. '--epochs 5'")
    ap.add_argument("--fresh", action="store_true", help="forget the rows recorded by earlier invocations")
    args = ap.parse_args()
    work = Path(args.work)
    env_line = environment_line()
    kept = [] if args.fresh or not ROWS.exists() else json.loads(ROWS.read_text())
    rows = [r for r in kept if r.get("extra", "") == args.extra]
    for n in [int(s) for s in args.sizes.split(",")]:
        data = generate(work / f"scale-{n}", n)
        cache = Path(tempfile.mkdtemp(prefix=f"tk-scale-{n}-"))
        try:
            r = run(data, work / f"scale-run-{n}-{int(time.time())}", cache, args.extra.split())
        finally:
            shutil.rmtree(cache, ignore_errors=True)  # measured inside run(); 0.06-0.4 GB a size otherwise left behind
        rows.append({"images": n, "wall s": r["wall_s"], "extraction images/s": r["extraction_rate"],
                     "peak RSS MB": r["peak_rss_mb"], "feature cache bytes/image": r["feature_bytes"] / n,
                     "decoded store bytes/image": r["decoded_bytes"] / n,
                     "decoded / source pixels": r["decoded_bytes"] / (n * SIDE * SIDE),
                     "fixed cache MB": r["fixed_bytes"] / 1e6,
                     "val acc": r["val_acc"], "engine": r["engine"], "machine": env_line, "extra": args.extra})
        rows = [row for row in rows[:-1] if row["images"] != n] + rows[-1:]  # a size re-measured: the new row
        print(rows[-1], flush=True)
        ROWS.write_text(json.dumps([r for r in kept if r.get("extra", "") != args.extra] + rows, indent=1))
    rows.sort(key=lambda row: row["images"])
    first, last = rows[0], rows[-1]
    growth = last["peak RSS MB"] / first["peak RSS MB"] - 1
    machines = sorted({row["machine"] for row in rows})
    text = (f"## Feature-extract at scale\n\nGenerated 28×28 grey PNGs, 10 classes, 80/20 split; "
            f"`transferkit train DIR --recipe tutorial --mode feature-extract {args.extra}` in a fresh process, cold caches. "
            f"Command: `python benchmarks/scale.py --sizes SIZE" + (f" --extra '{args.extra}'" if args.extra else "")
            + "` once per size (rows kept in benchmarks/scale_rows.json). Machine and load per row: "
            + "; ".join(f"({chr(97 + i)}) {m}" for i, m in enumerate(machines)) + ".\n\n"
            + table([{**row, "machine": chr(97 + machines.index(row["machine"]))} for row in rows],
                    ["images", "wall s", "extraction images/s", "peak RSS MB", "feature cache bytes/image",
                     "decoded store bytes/image", "decoded / source pixels", "fixed cache MB", "val acc",
                     "engine", "machine"])
            + f"\n\nPeak RSS from {first['images']} to {last['images']} images: {100 * growth:+.0f}% "
            f"(target: within 25%). Source pixels: {SIDE * SIDE} bytes per image. Fixed cache: the exported "
            "frozen part (.onnx) and the engine choice, once per backbone configuration. Extraction images/s "
            "includes the engine choice (ONNX export, parity and timing of the candidates) on a cold cache.")
    print(text)
    write_section("scale", text)


if __name__ == "__main__":
    main()
