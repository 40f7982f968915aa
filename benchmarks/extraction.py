"""Feature-extraction throughput vs the bare engine forward, in the same run.

    python benchmarks/extraction.py [--work DIR] [--full] [--batch 64] [--precision auto]

The engine is the one transferkit chooses (engine/runtime.py: the fastest of torch fp32, torch bf16 and
ONNX Runtime fp32 that passes parity, measured on the first batch). Extraction = transferkit's
cached_features over real ELPV files with a cold feature store (the files decoded and eval-cropped by
decode threads while the network runs, then the forward and the feature-store write). Bare = the
same engine on random tensors of the same shape and batch size. Alternated `--repeats` times (the box
may be shared); reports each pair and the median fraction. Also the CPU milliseconds per image of each
(the whole process, decode threads included): on a shared box the wall rates swing with the other jobs, while
the extra CPU time extraction spends per image (decoding, cropping, copies, the store) barely moves.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (benchmark_parser, cpu_seconds, elpv, environment_line, stratified_subset, table,  # noqa: E402
                    thread_cpu_by_role, write_section)

from transferkit.data.images import load_rgb  # noqa: E402
from transferkit.data.transforms import eval_transform  # noqa: E402
from transferkit.engine.features import FeatureStore, View, cached_features, default_workers  # noqa: E402
from transferkit.engine.runtime import FrozenEngine, FrozenPart  # noqa: E402
from transferkit.malloc import keep_freed_blocks  # noqa: E402
from transferkit.models.adapt import build_model  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402


# The extraction's threads by what they do (transferkit/threads.py names them at the OS level): ONNX Runtime's
# lanes, and the calling thread; the decode threads are the rest of the process's CPU.
ROLES = {"tk-ort": "network"}
SPLIT_COLUMNS = [f"{role} CPU ms/image" for role in ("network", "decode", "main")]


def main() -> None:
    ap = benchmark_parser(__doc__, model=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--full", action="store_true",
                    help="all 1968 ELPV train images instead of the 244 of the seed-sized subset (fixed costs "
                         "such as worker start-up and fsync weigh less)")
    args = ap.parse_args()
    keep_freed_blocks()  # the allocator as the `transferkit` program sets it (transferkit/malloc.py)
    work = Path(args.work)
    data = elpv(work / "elpv2", 2) if args.full else stratified_subset(elpv(work / "elpv2", 2),
                                                                       work / "elpv2-seed-sized", 244, 153)
    paths = sorted(str(p) for p in (data / "train").rglob("*.png"))
    spec = get_spec(args.model)
    model = build_model(spec, 2, pretrained=True).eval()
    pre = spec.preprocessing
    tmp = Path(tempfile.mkdtemp(prefix="tk-extract-"))
    model = model.to(memory_format=torch.channels_last)
    engine = FrozenEngine(FrozenPart(model, spec.cache_point), torch.device("cpu"), "auto", tmp / "frozen.onnx",
                          precision=args.precision)
    # The choice (export, parity, timing) outside the timing, on real cells as a run makes it: bf16 passes parity
    # on random tensors but misses it on ELPV cells, where runs use an fp32 engine (a random first batch had this
    # benchmark time torch-bf16, session 25).
    crop = eval_transform(pre)
    engine(torch.stack([crop(load_rgb(path, shorter_side=pre.resize_size)) for path in paths[:args.batch]]))
    x = torch.randn(args.batch, 3, pre.input_size, pre.input_size)  # the bare engine's input: values do not matter
    chosen = engine.active
    chosen(x)  # warm-up
    rows = []
    for rep in range(args.repeats):  # interleaved: if the box is shared, the load drifts
        t0, c0 = time.perf_counter(), cpu_seconds()
        for start in range(0, len(paths), args.batch):
            chosen(x[: min(args.batch, len(paths) - start)])
        bare, bare_cpu = len(paths) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(paths)
        os.environ["TRANSFERKIT_FEATURE_CACHE"] = str(tmp / f"cache{rep}")  # cold caches
        store = FeatureStore(tmp / f"store{rep}")
        t0, c0, roles0 = time.perf_counter(), cpu_seconds(), thread_cpu_by_role(os.getpid(), ROLES, "main")
        cached_features(engine, store, paths, [View(0)], pre, batch_size=args.batch, workers=default_workers())
        real, real_cpu = len(paths) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(paths)
        roles1 = thread_cpu_by_role(os.getpid(), ROLES, "main")
        split = {f"{role} CPU ms/image": 1000 * (roles1[role] - roles0[role]) / len(paths) for role in ("network", "main")}
        # The decode threads end with the extraction, and /proc forgets an ended thread: theirs is the rest.
        split["decode CPU ms/image"] = 1000 * real_cpu - sum(split.values())
        rows.append({"repeat": rep + 1, "bare engine images/s": bare, "extraction images/s": real,
                     "fraction": real / bare, "bare CPU ms/image": 1000 * bare_cpu,
                     "extraction CPU ms/image": 1000 * real_cpu, "CPU fraction": bare_cpu / real_cpu, **split,
                     "load": round(os.getloadavg()[0], 1)})
        print(rows[-1], flush=True)
    median = statistics.median(r["fraction"] for r in rows)
    rates = ", ".join(f"{k} {v:.0f}" for k, v in engine.info.get("rates", {}).items())
    text = (f"## Extraction throughput vs the bare engine{' (all ELPV train images)' if args.full else ''}\n\n"
            f"{environment_line()}. {args.model}, {len(paths)} ELPV images at {pre.input_size}px, batch "
            f"{args.batch}, {default_workers()} decode threads, {torch.get_num_threads()} torch threads. Engine "
            f"chosen: **{engine.info['engine']}** (--precision {args.precision}; first-batch rates, images/s: "
            f"{rates or 'not measured'}; parity max abs diff by engine "
            f"{engine.info.get('parity_max_abs_diff_by_engine', {})}). "
            f"Command: `python benchmarks/extraction.py{' --full' if args.full else ''}"
            f"{'' if args.precision == 'auto' else ' --precision ' + args.precision}`. Target: fraction ≥ 0.85.\n\n"
            + table(rows, ["repeat", "bare engine images/s", "extraction images/s", "fraction", "bare CPU ms/image",
                           "extraction CPU ms/image", "CPU fraction", *SPLIT_COLUMNS, "load"])
            + f"\n\nMedian fraction: **{median:.2f}** (CPU fraction "
            f"{statistics.median(r['CPU fraction'] for r in rows):.2f}: bare CPU time / extraction CPU time per "
            "image, the whole process, decode threads included; network / decode / main: the extraction's CPU "
            "per image by thread, from their OS-level names: the engine's lanes, the decode threads (file read, "
            "PNG decode, resize and crop: the rest of the process's CPU), and the calling thread (batch normalization, the feature store's "
            "writes, and the engine itself where it runs there); load: 1-minute load average after the pair). "
            "On two cores shared by all of it, the CPU fraction is about the most the wall fraction can reach.")
    print(text)
    write_section(("extraction_full" if args.full else "extraction")
                  + ("" if args.precision == "auto" else "_" + args.precision), text)
    shutil.rmtree(tmp, ignore_errors=True)  # the ONNX export and the repeats' caches


if __name__ == "__main__":
    main()
