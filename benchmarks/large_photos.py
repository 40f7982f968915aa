"""Camera-sized JPEGs: decoding at a reduced DCT scale (data/images.py DRAFT_MARGIN) against a full decode.

    python benchmarks/large_photos.py [--work DIR] [--per-class 30] [--repeats 2]

The folder: real colour photos shipped by scikit-image (astronaut, coffee, chelsea the cat, rocket; one
class each), each image a random crop of its photo, flipped at random, resized to 4032×3024 (a 12-MP phone
camera), with Gaussian sensor noise (σ 4 grey levels) so the files weigh what camera JPEGs weigh (quality 92),
split 2:1 into train/val. Both arms run alternated in this one process, `--repeats` times:

- decode: each file read as a feature extraction reads it (load_rgb, then the eval resize and crop), one
  thread, images/s;
- cold run: `transferkit train DIR --recipe tutorial --mode feature-extract` in a fresh process with an empty
  feature cache (scan + engine choice + extraction + 15 epochs + report), wall seconds and best val accuracy.

The full-decode arm is the same code with the reduced-scale step switched off (`images._draft` replaced by a
no-op in that process only). Also the largest difference between the two arms' eval crops, in grey levels.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_WORK, benchmark_parser, cold_env, environment_line, table, write_section  # noqa: E402

from transferkit.data import images  # noqa: E402
from transferkit.data.transforms import eval_crop  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CAMERA = (4032, 3024)
# A cold feature-extract run in a fresh process; FULL=1 switches the reduced-scale JPEG decode off.
RUN = ("import os, sys\n"
       "if os.environ.get('FULL') == '1':\n"
       "    from transferkit.data import images; images._draft = lambda img, side: None\n"
       "from transferkit.cli import entry\n"
       "sys.argv = ['transferkit', 'train', sys.argv[1], '--recipe', 'tutorial', '--mode', 'feature-extract',"
       " '--out', sys.argv[2], '--overwrite']\n"
       "entry()\n")


def make_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """The camera-sized folder (written once; a complete one is reused)."""
    from skimage import data

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = photo.size
        for i in range(per_class):
            share = rng.uniform(0.7, 1.0)
            cw, ch = int(w * share), int(h * share)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(CAMERA, Image.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (CAMERA[1], CAMERA[0], 3))
            split = "val" if i % 3 == 2 else "train"
            out = root / split / name / f"{name}_{i:03d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    (root / "done").write_text("")
    return root


def decode_rate(paths: list[str], full: bool) -> tuple[float, list[np.ndarray]]:
    """Images/s of load_rgb + eval crop on one thread, and the crops."""
    pre = get_spec("efficientnet_lite0").preprocessing
    crop, saved = eval_crop(pre), images._draft
    if full:
        images._draft = lambda img, side: None
    try:
        t0 = time.perf_counter()
        crops = [np.asarray(crop(images.load_rgb(p, shorter_side=pre.resize_size))) for p in paths]
        return len(paths) / (time.perf_counter() - t0), crops
    finally:
        images._draft = saved


def cold_run(data: Path, work: Path, full: bool, tag: str) -> dict:
    out, cache = work / f"run-{tag}", Path(tempfile.mkdtemp(prefix="tk-photos-cache-"))
    env = cold_env(cache, FULL="1" if full else "0")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, str(data), str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall s": wall, "best val acc": metrics.get("best_val_acc")}


def main() -> None:
    ap = benchmark_parser(__doc__, work=SHARED_WORK / "photos")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    start = environment_line()
    data = make_folder(work / "data", args.per_class)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    mb = statistics.median(os.path.getsize(p) for p in paths) / 1e6
    rows, diffs = [], []
    for rep in range(args.repeats):  # alternated: the box may drift
        for full in (True, False):
            rate, crops = decode_rate(paths, full)
            if full:
                reference = crops
            else:
                diffs = [np.abs(a.astype(np.int16) - b).max() for a, b in zip(crops, reference)]
                mean_diffs = [np.abs(a.astype(np.float32) - b).mean() for a, b in zip(crops, reference)]
            row = {"repeat": rep + 1, "decode": "full" if full else "reduced scale", "decode images/s": rate,
                   **cold_run(data, work, full, f"{rep}-{'full' if full else 'reduced'}")}
            rows.append(row)
            print(row, flush=True)

    def median(kind, key):
        return statistics.median(r[key] for r in rows if r["decode"] == kind)

    text = (f"## Camera-sized JPEGs: reduced-scale decode vs full decode\n\n{start}. "
            f"`python benchmarks/large_photos.py --per-class {args.per_class} --repeats {args.repeats}`: "
            f"{len(paths)} JPEGs of {CAMERA[0]}×{CAMERA[1]} (median {mb:.1f} MB; scikit-image photos "
            f"{', '.join(PHOTOS)}, one class each, cropped, resized, with sensor noise). Cold run = `transferkit "
            "train DIR --recipe tutorial --mode feature-extract`, fresh process, empty feature cache.\n\n"
            + table(rows, ["repeat", "decode", "decode images/s", "wall s", "best val acc"])
            + f"\n\nMedians: decode "
            f"**{median('reduced scale', 'decode images/s') / median('full', 'decode images/s'):.1f}×**"
            f" faster, cold run **{median('full', 'wall s') / median('reduced scale', 'wall s'):.1f}×** faster "
            f"({median('full', 'wall s'):.1f} s → {median('reduced scale', 'wall s'):.1f} s). Eval crops of the two "
            f"decodes differ by {statistics.mean(mean_diffs):.2f} grey levels on average, {max(diffs)} at most.")
    print(text)
    write_section("large_photos", text)


if __name__ == "__main__":
    main()
