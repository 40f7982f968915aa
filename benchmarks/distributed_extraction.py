"""Sharded feature extraction: 2 processes (torchrun, gloo) against 1, on this machine.

Each run is a real `transferkit train` (feature-extract, 1 epoch) with an empty feature cache; the time
measured is rank 0's extraction time from metrics.json (train + val), which includes waiting at the
barrier for the other rank, so it is the wall time of the sharded extraction. Runs alternate 1, 2, 1, 2
so a change in the machine's load hits both. The frozen part runs on torch (--engine torch) with
cores // nproc threads per process.

    python benchmarks/distributed_extraction.py [--images 160] [--repeats 2]
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

sys.path.insert(0, str(Path(__file__).parent))
from common import (benchmark_parser, cold_env, elpv, environment_line, stratified_subset, table,  # noqa: E402
                    write_section)


def extract_once(data: Path, nproc: int, work: Path, tag: str, threads: int | None = None) -> dict:
    out, cache = work / f"run-{tag}", work / f"cache-{tag}"
    cmd = [sys.executable, "-m", "transferkit", "train", str(data), "--epochs", "1", "--engine", "torch",
           "--workers", "0", "--out", str(out), "--nproc", str(nproc)]
    env = cold_env(cache)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    src = metrics["source"]
    return {"processes": nproc, "threads_per_process": metrics["environment"]["torch_threads"],
            "extraction_s": src["train"]["seconds"] + src["val"]["seconds"], "command_wall_s": wall,
            "rank0_images": src["train"]["computed"] + src["val"]["computed"], "load_before": load}


def median_s(rows: list[dict], processes: int, one_thread: bool) -> float:
    return statistics.median(r["extraction_s"] for r in rows
                             if r["processes"] == processes and (r["threads_per_process"] == 1) == one_thread)


def main() -> None:
    ap = benchmark_parser(__doc__,
                          work_help="where the ELPV folders are materialized (shared with the other benchmarks)")
    ap.add_argument("--images", type=int, default=160, help="train images (val: a quarter of that)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    env_line = environment_line()
    shared = Path(args.work)
    data = stratified_subset(elpv(shared / "elpv2", 2), shared / f"elpv2-dist-{args.images}", args.images,
                             args.images // 4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 1 process on all cores, 2 processes with cores // 2 threads each, and 1 process on 1 thread
        # (to tell process parallelism from thread contention).
        rows = [row for i in range(args.repeats) for row in (
            extract_once(data, 1, work, f"1-{i}"), extract_once(data, 2, work, f"2-{i}"),
            extract_once(data, 1, work, f"1t-{i}", threads=1))]
    one, one_t1 = median_s(rows, 1, one_thread=False), median_s(rows, 1, one_thread=True)
    two = median_s(rows, 2, one_thread=os.cpu_count() // 2 <= 1)
    n_images = args.images + args.images // 4
    md = (f"## Distributed feature extraction (torchrun, 2 processes vs 1)\n\n"
          f"`python benchmarks/distributed_extraction.py --images {args.images} --repeats {args.repeats}`: "
          f"efficientnet_lite0 (torch engine), {n_images} ELPV images, empty cache each run, "
          f"runs alternated.\n\n{env_line}\n\n"
          + table(rows, ["processes", "threads_per_process", "extraction_s", "command_wall_s", "rank0_images",
                         "load_before"])
          + f"\n\nMedian extraction: 1 process (all cores) {one:.1f} s, 2 processes {two:.1f} s: "
          f"speedup **{one / two:.2f}×**; against 1 process on 1 thread ({one_t1:.1f} s): {one_t1 / two:.2f}×. "
          "On an idle 2-core machine 2 processes can at best trade torch's intra-op threads for process "
          "parallelism (≤ 2×). The load column shows the cores were shared with other work: an "
          "oversubscribed machine gives 2 processes a larger share of the CPU than one, and torch's intra-op "
          "threads wait on each other when cores are oversubscribed, so a figure above 2× measures that "
          "contention, not extra compute. command_wall_s adds start-up (imports, torchrun, rendezvous).\n")
    write_section("distributed_extraction", md)
    print(md)


if __name__ == "__main__":
    main()
