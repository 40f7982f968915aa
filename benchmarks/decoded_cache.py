"""One finetune-style data epoch with and without the decoded-image cache (data/decoded.py).

    python benchmarks/decoded_cache.py [--work DIR] [--photos 200] [--workers 0 1]

Times iterating the train DataLoader once (decode as the run without the store does it — a large JPEG at a
reduced scale, data/images.py — or store read; RandomResizedCrop + flip, normalize,
collate; no model) on the seed-sized ELPV subset (244 train images, 300×300 grayscale PNG) and on
generated 2000×1500 JPEG "photos" (smooth colour fields plus grain), where decoding dominates. The
store is built before timing (its one-off build time is reported beside it).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, elpv, environment_line, stratified_subset, table, write_section  # noqa: E402

from transferkit.data.dataset import ImageListDataset, skip_broken_collate  # noqa: E402
from transferkit.data.decoded import DecodedDataset, decode_missing, open_store  # noqa: E402
from transferkit.data.transforms import train_transform  # noqa: E402
from transferkit.engine.features import default_workers  # noqa: E402
from transferkit.engine.sources import loader_batches  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402


def make_photos(folder: Path, n: int, size=(2000, 1500)) -> Path:
    """JPEGs that decode like photos: smooth content (pure noise would be an unrealistically costly
    decode) with some grain, quality 90."""
    if len(list(folder.glob("train/*/*.jpg"))) >= n:
        return folder
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        out = folder / "train" / f"c{i % 2}" / f"p{i:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 6, (h, w, 3))
        Image.fromarray(np.clip(np.asarray(small) + grain, 0, 255).astype(np.uint8)).save(out, quality=90)
    return folder


def epoch_seconds(dataset, workers: int, batch: int) -> float:
    loader = DataLoader(dataset, batch, shuffle=True, num_workers=workers, collate_fn=skip_broken_collate)
    t0 = time.perf_counter()
    # As a CPU run fetches them (in this process on one intra-op thread, or from the workers); worker
    # start-up is inside the timing, as in a run's first epoch.
    for _ in loader_batches(loader, torch.device("cpu")):
        pass
    return time.perf_counter() - t0


def measure(name: str, paths: list[str], pre, cache: Path, workers_list: list[int], batch: int, repeats: int):
    items = [(p, 0) for p in paths]
    tf = train_transform(pre, "standard")
    store = open_store(cache, pre)
    keys, stats = decode_missing(store, paths, None, pre, workers=default_workers())
    build = stats["seconds"]
    rows = []
    for workers in workers_list:
        best = {"file": float("inf"), "store": float("inf")}
        for _ in range(repeats):  # interleaved, best of: the box is shared, so the load drifts
            files = ImageListDataset(items, tf, shorter_side=pre.resize_size)  # as a run without the store reads
            best["file"] = min(best["file"], epoch_seconds(files, workers, batch))
            best["store"] = min(best["store"], epoch_seconds(DecodedDataset(items, keys, store, tf), workers, batch))
        rows.append({"data": name, "images": len(paths), "workers": workers,
                     "decode every epoch, images/s": len(paths) / best["file"],
                     "decoded cache, images/s": len(paths) / best["store"],
                     "ratio": best["file"] / best["store"], "store build s (once)": build})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = benchmark_parser(__doc__, model=True)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "elpv2-seed-sized"
    if not (data / "train").is_dir():
        data = stratified_subset(elpv(work / "elpv2", 2), data, 244, 153)
    photos = make_photos(work / "photos-2000x1500", args.photos)
    pre = get_spec(args.model).preprocessing
    cache = Path(tempfile.mkdtemp(prefix="tk-decoded-"))
    try:
        rows = measure("ELPV seed-sized (300×300 PNG)", sorted(str(p) for p in (data / "train").rglob("*.png")),
                       pre, cache, args.workers, args.batch, args.repeats)
        rows += measure(f"{args.photos} JPEGs 2000×1500", sorted(str(p) for p in photos.rglob("*.jpg")),
                        pre, cache, args.workers, args.batch, args.repeats)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    text = (f"## Decoded-image cache: one finetune data epoch\n\n{environment_line()}. {args.model} preprocessing "
            f"(resize {pre.resize_size} {pre.interpolation}, RandomResizedCrop {pre.input_size} + flip), batch "
            f"{args.batch}, no model: the train DataLoader alone, best of {args.repeats} interleaved runs, worker "
            f"start-up included. Store built once with {default_workers()} workers beforehand. Workers 0 makes "
            f"each batch in this process on one intra-op thread, as a CPU run with the store does "
            f"(engine/sources.loader_batches); a worker process also uses one thread. "
            f"Command: `python benchmarks/decoded_cache.py`.\n\n"
            + table(rows, ["data", "images", "workers", "decode every epoch, images/s", "decoded cache, images/s",
                           "ratio", "store build s (once)"]))
    print(text)
    write_section("decoded_cache", text)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFERKIT_QUIET", "1")
    main()
