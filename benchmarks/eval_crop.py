"""The eval crop in one Pillow call (transferkit's EvalCrop) against torchvision's Resize + CenterCrop, on the
decoded images of the seed-sized ELPV subset: milliseconds per image on one thread, and whether the pixels agree;
beside them, what decoding the files costs (load_rgb, as the decode threads call it).

    python benchmarks/eval_crop.py [--work DIR] [--repeats 5]

The decode threads of feature extraction, predict and serve make this crop for every image (the rest of their
work is the file's decode); the two run in turns, so a slow spell of a shared box falls on both.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, elpv, environment_line, stratified_subset, table, write_section  # noqa: E402

from transferkit.data.images import load_rgb  # noqa: E402
from transferkit.data.transforms import eval_crop  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402


def main() -> None:
    ap = benchmark_parser(__doc__, model=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(args.work)
    data = stratified_subset(elpv(work / "elpv2", 2), work / "elpv2-seed-sized", 244, 153)
    pre = get_spec(args.model).preprocessing
    paths = sorted((data / "train").rglob("*.png"))
    images = [load_rgb(p, keep_gray=True, shorter_side=pre.resize_size) for p in paths]
    crop = eval_crop(pre)
    ways = {"torchvision Resize + CenterCrop": (crop.slow, images), "transferkit EvalCrop": (crop, images),
            "decoding the file (load_rgb), for scale": (
                lambda p: load_rgb(p, keep_gray=True, shorter_side=pre.resize_size), paths)}
    same = all(np.array_equal(np.asarray(crop(im)), np.asarray(crop.slow(im))) for im in images)
    ms = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, (way, items) in ways.items():
            t0 = time.perf_counter()
            for item in items:
                way(item)
            ms[name].append(1000 * (time.perf_counter() - t0) / len(items))
    rows = [{"crop": name, "ms / image (median)": statistics.median(v), "fastest": min(v), "slowest": max(v)}
            for name, v in ms.items()]
    ratio = rows[0]["ms / image (median)"] / rows[1]["ms / image (median)"]
    text = (f"## Eval crop: one Pillow call against Resize + CenterCrop\n\n{environment_line()}. {len(images)} "
            f"decoded ELPV cells ({images[0].size[0]}×{images[0].size[1]} grey, one band), {args.model}'s eval crop "
            f"(shorter side {pre.resize_size} {pre.interpolation}, centre {pre.input_size}), one thread, "
            f"{args.repeats} rounds in turns. Command: `python benchmarks/eval_crop.py`.\n\n"
            + table(rows, ["crop", "ms / image (median)", "fastest", "slowest"])
            + f"\n\n**{ratio:.2f}×**; the same pixels on every image: **{same}**.")
    print(text)
    write_section("eval_crop", text)


if __name__ == "__main__":
    main()
