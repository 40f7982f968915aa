"""Peak memory of the probe's fit and CV against the features they read: the multiples behind search/costs.py's memory caps
(FIT_MEMORY_COPIES, CV_MEMORY_COPIES), which keep a long budget or a GPU's extraction rate from growing the images
the search compares on, or the final probe's, past the machine's memory.

    python benchmarks/probe_memory.py [--shapes 20000x1x2,5000x8x2,20000x1x50] [--features 4048] [--no-record]

Each measurement runs in a fresh process: float32 features of N images × V views × D columns (standard normal, a
weak class signal in the first 50 columns), K classes; its peak RSS after making them, then after
engine/probe.py's fit_probe (at C 0.01, and predict_proba on the same rows) or cross_validate (the C grid, 3 folds);
extra = (peak - before) / the features' bytes. The caps budget `1 + CV_MEMORY_COPIES` (the CV) and
`FIT_MEMORY_COPIES` (the fit) times the features: the measured totals must stay below them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment_line, publish, table  # noqa: E402

from transferkit.search.costs import CV_MEMORY_COPIES, FIT_MEMORY_COPIES  # noqa: E402

# The measurement, in a process of its own (ru_maxrss is a process's high-water mark).
_MEASURE = r"""
import json, resource, sys, time
import numpy as np
from transferkit.engine.probe import cross_validate, fit_probe, predict_proba
from transferkit.engine.probe_train import C_GRID

what, n, views, classes, width = sys.argv[1], *map(int, sys.argv[2:6])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
y = np.arange(n) % classes
x = np.random.default_rng(0).standard_normal(size=(n, views, width), dtype=np.float32)  # no float64 temporary
x[:, :, :50] += (y[:, None, None] * 0.05).astype(np.float32)
before, t0 = peak(), time.perf_counter()
if what == "fit":
    predict_proba(fit_probe(x, y, np.arange(width), 0.01, classes), x)
else:
    cross_validate(x, y, np.arange(width), classes, list(C_GRID))
print(json.dumps({"features_bytes": x.nbytes, "before": before, "peak": peak(), "seconds": time.perf_counter() - t0}))
"""


def measure(what: str, n: int, views: int, classes: int, width: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, what, str(n), str(views), str(classes), str(width)],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (m["peak"] - m["before"]) / m["features_bytes"]
    budget = FIT_MEMORY_COPIES if what == "fit" else 1 + CV_MEMORY_COPIES
    return {"what": what, "images × views × classes": f"{n} × {views} × {classes}",
            "features MB": m["features_bytes"] / 1e6, "peak RSS MB": m["peak"] / 1e6, "extra × features": extra,
            "total × features": 1 + extra, "budgeted ×": budget, "within": "yes" if 1 + extra <= budget else "NO",
            "seconds": m["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="20000x1x2,5000x8x2,20000x1x50",
                    help="IMAGESxVIEWSxCLASSES, comma-separated; each measured by fit and by CV")
    ap.add_argument("--features", type=int, default=4048, help="columns per view (efficientnet_lite0's taps: 4,048)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        n, views, classes = (int(v) for v in shape.split("x"))
        for what in ("fit", "cv"):
            rows.append(measure(what, n, views, classes, args.features))
            print(rows[-1], flush=True)
    columns = ["what", "images × views × classes", "features MB", "peak RSS MB", "extra × features",
               "total × features", "budgeted ×", "within", "seconds"]
    markdown = (f"## Probe fit and CV: peak memory against their features\n\n{environment_line()}. Command: `python "
                f"benchmarks/probe_memory.py --shapes {args.shapes} --features {args.features}`. Each row a fresh "
                "process; extra = (peak RSS after - before) / the float32 features' bytes; total = 1 + extra, against "
                "what search/costs.py budgets for them (fit: FIT_MEMORY_COPIES; CV: 1 + CV_MEMORY_COPIES per view held).\n\n"
                + table(rows, columns))
    publish("probe_memory", markdown, record=not args.no_record)


if __name__ == "__main__":
    main()
