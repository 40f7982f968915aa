"""The probe's CV in one BLAS thread against the BLAS library's default, on an idle machine and beside another
process that keeps every core busy: the measurement behind threads.py's `in_one_blas_thread`.

    python benchmarks/probe_threads.py [--shapes 128x1x2,1968x4x2,3000x1x100] [--features 4048] [--repeats 3]
                                       [--conditions idle,busy] [--no-record]

Each measurement runs in a fresh process: float32 features of N images × V views × D columns (standard normal, a
weak class signal in the first 50 columns), K classes, then engine/probe.py's cross_validate over the search's C
grid (3 folds), timed `--repeats` times after one warm-up; the median is reported. "default" replaces the
one-thread limit by nothing, so the BLAS libraries (numpy's and scipy's OpenBLAS) use their own thread count.
"busy": a second process runs a torch convolution in as many threads as the machine has cores the whole time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment_line, publish, table  # noqa: E402

_MEASURE = r"""
import contextlib, json, statistics, sys, time
import numpy as np
from transferkit import threads
from transferkit.engine import probe
from transferkit.engine.probe_train import C_GRID

policy, n, views, classes, width, repeats = sys.argv[1], *map(int, sys.argv[2:7])
if policy == "default":  # the decorator asks for its limiter at each call
    threads._blas_pools = lambda: type("NoLimit", (), {"limit": lambda self, **_: contextlib.nullcontext()})()
y = np.arange(n) % classes
x = np.random.default_rng(0).standard_normal(size=(n, views, width), dtype=np.float32)
x[:, :, :50] += (y[:, None, None] * 0.3).astype(np.float32)
times = []
for _ in range(repeats + 1):  # the first: imports, BLAS warm-up
    t0 = time.perf_counter()
    probe.cross_validate(x, y, np.arange(width), classes, list(C_GRID))
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times[1:])}))
"""

# The competing process: a convolution on every core, until killed.
_BUSY = r"""
import os, torch
torch.set_num_threads(os.cpu_count() or 1)
a, conv = torch.randn(16, 128, 28, 28), torch.nn.Conv2d(128, 128, 3, padding=1)
with torch.no_grad():
    while True:
        conv(a)
"""


HEADING = "## Probe CV: one BLAS thread against the library's default"
LEGEND = ("Each cell the median of the timed 3-fold CVs over the C grid in a fresh process (synthetic standard-normal "
          "features); busy = beside a process running a torch convolution on every core.")
COLUMNS = ["machine", "images × views × classes", "one BLAS thread s", "BLAS default s", "default / one"]


def measure(policy: str, n: int, views: int, classes: int, width: int, repeats: int) -> float:
    out = subprocess.run([sys.executable, "-c", _MEASURE, policy, *map(str, (n, views, classes, width, repeats))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def measure_condition(condition: str, shapes: list[tuple[int, int, int]], width: int, repeats: int) -> list[dict]:
    busy = subprocess.Popen([sys.executable, "-c", _BUSY]) if condition == "busy" else None
    try:
        if busy:
            time.sleep(3)  # its imports done, its threads running
        rows = []
        for n, views, classes in shapes:
            seconds = {policy: measure(policy, n, views, classes, width, repeats) for policy in ("one", "default")}
            rows.append({"machine": condition, "images × views × classes": f"{n} × {views} × {classes}",
                         "one BLAS thread s": seconds["one"], "BLAS default s": seconds["default"],
                         "default / one": seconds["default"] / seconds["one"]})
            print(rows[-1], flush=True)
        return rows
    finally:
        if busy:
            busy.kill()
            busy.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x1x2,1968x4x2,3000x1x100",
                    help="IMAGESxVIEWSxCLASSES, comma-separated")
    ap.add_argument("--features", type=int, default=4048, help="columns per view (efficientnet_lite0's taps: 4,048)")
    ap.add_argument("--repeats", type=int, default=3, help="timed CVs per measurement (after one warm-up)")
    ap.add_argument("--conditions", default="idle,busy", help="idle, busy, or both")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    machine = environment_line()  # before the busy process loads it
    rows = [row for condition in args.conditions.split(",")
            for row in measure_condition(condition, shapes, args.features, args.repeats)]
    command = (f"python benchmarks/probe_threads.py --shapes {args.shapes} --features {args.features} "
               f"--repeats {args.repeats} --conditions {args.conditions}")
    publish("probe_threads", f"{HEADING}\n\n{machine}. Command: `{command}`. {LEGEND}\n\n" + table(rows, COLUMNS),
            record=not args.no_record)


if __name__ == "__main__":
    main()
