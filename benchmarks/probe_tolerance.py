"""The probe's fit tolerance judged by nested CV on the training images only: a loose L-BFGS stop against tighter
ones, in accuracy and in the seconds the search's CV takes.

    python benchmarks/probe_tolerance.py [--sets elpv2,elpv4,elpv2-seed-sized,digits] [--tols 1e-3,1e-4,1e-6]
                                         [--outer 5] [--no-record]

Why: engine/probe.py's `fit_logistic` stopped L-BFGS at tol 1e-3 (FIT_TOL) until session 46, which leaves the
weak-C fits unconverged, so on a flat CV curve the chosen C can move with the order of the BLAS sums (session 44:
ELPV 2 classes, 8 views, C 0.1 in one BLAS thread, 0.01 in two). Converged fits depend far less on the rounding, at a
price in time; this measures both sides. Session 45 compared 1e-3 with 1e-6, session 46 1e-3 with 1e-4 (the
default since). Every tolerance runs under the product's iteration cap, FIT_MAX_ITER (3,000 since session 46;
sessions 45-46's tol 1e-3 rows ran under the cap of 200 that went with it, session 45's 1e-6 rows under 3,000).

1. Inputs: per set, one cold default search (`transferkit train SET`, a fresh process, an empty feature cache)
   that saves the arguments of every `cross_validate` call it makes (features of every view, labels, columns, C
   grid) under --work/probe_tolerance/SET/ (N.npz, in call order); a set whose folder holds saved calls is not
   searched again.
2. Feature sets: of the calls on the same features (and labels), the one with the most columns (the search's default
   pooling: mean+max of every tap, with the pixel block where it tried one).
3. Nested CV, for each tolerance: an outer stratified 5-fold split of the training images (seed 100); on each
   outer-train part the search's own `cross_validate` (3 folds, C grid, one BLAS thread) chooses C, a probe fitted
   at that C (`fit_probe`) answers the outer-test images (logits averaged over views). The accuracy is over every
   outer-test image; seconds are the whole nested CV's. Val images are never read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from auto import materialize  # noqa: E402
from common import benchmark_parser, cold_env, environment_line, publish, table  # noqa: E402

# Run in a fresh process: a default search whose cross_validate calls are saved as they are made.
_CAPTURE = r"""
import itertools, sys
import numpy as np
import transferkit.engine.probe as probe
from transferkit.cli import program

folder, data, out = sys.argv[1:4]
calls, real = itertools.count(), probe.cross_validate
def saving(x, y, columns, n_classes, grid, **options):
    np.savez(f"{folder}/{next(calls)}.npz", x=x, y=y, columns=columns, n_classes=n_classes, grid=np.array(grid))
    return real(x, y, columns, n_classes, grid, **options)
probe.cross_validate = saving  # search/probes.py imports it at each call
sys.argv = ["transferkit", "train", data, "--out", out]
program()
"""


def capture(name: str, work: Path) -> Path:
    folder = work / "probe_tolerance" / name
    if not any(folder.glob("*.npz")):
        folder.mkdir(parents=True, exist_ok=True)
        data = materialize(name, work, {})
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-c", _CAPTURE, str(folder), str(data), f"{tmp}/run"], check=True,
                           env=cold_env(f"{tmp}/cache"), stdout=subprocess.DEVNULL)
    return folder


def feature_sets(paths: list[Path]) -> list[Path]:
    """Per distinct feature array (its shape, labels and first row), the saved call with the most columns."""
    best: dict[tuple, tuple[int, Path]] = {}
    for path in sorted(paths, key=lambda p: int(p.stem)):
        with np.load(path) as saved:
            x = saved["x"]
            key, width = (x.shape, saved["y"].tobytes(), x[0].tobytes()), len(saved["columns"])
        if key not in best or width > best[key][0]:
            best[key] = (width, path)
    return [path for _, path in best.values()]


def nested_cv(x: np.ndarray, y: np.ndarray, columns: np.ndarray, n_classes: int, grid: list[float],
              outer: int) -> tuple[float, list[float]]:
    """The outer-test accuracy and the C chosen in each outer fold, at engine/probe.py's FIT_TOL of the moment."""
    from transferkit.engine import probe

    right, chosen = 0, []
    for train, test in probe.stratified_folds(y, outer, seed=100):
        C = probe.cross_validate(x[train], y[train], columns, n_classes, grid).C
        fit = probe.fit_probe(x[train], y[train], columns, C, n_classes)
        right += int((probe.predict_proba(fit, x[test]).argmax(1) == y[test]).sum())
        chosen.append(C)
    return right / len(y), chosen


def summary(rows: list[dict], tols: list[float]) -> str:
    """Each tolerance against the first: the mean and range of the accuracy differences, the median time ratio."""
    lines = []
    for tol in tols[1:]:
        gain = [100 * (r[f"acc tol {tol:g}"] - r[f"acc tol {tols[0]:g}"]) for r in rows]
        cost = np.median([r[f"s tol {tol:g}"] / r[f"s tol {tols[0]:g}"] for r in rows])
        lines.append(f"tol {tol:g} against {tols[0]:g}: accuracy {np.mean(gain):+.2f} points on average (from "
                     f"{min(gain):+.2f} to {max(gain):+.2f}), the nested CV {cost:.1f}× as long (median).")
    return "\n".join(lines)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sets", default="elpv2,elpv4,elpv2-seed-sized,digits", help="data sets (benchmarks/auto.py's)")
    ap.add_argument("--tols", default="1e-3,1e-6", help="L-BFGS tolerances; the first is the reference")
    ap.add_argument("--outer", type=int, default=5, help="outer folds")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    from transferkit.engine import probe

    machine, tols = environment_line(), [float(t) for t in args.tols.split(",")]
    groups = {name: list(capture(name, args.work).glob("*.npz")) for name in args.sets.split(",")}
    rows, columns = [], ["set", "images × views × columns"]
    for tol in tols:
        columns += [f"acc tol {tol:g}", f"s tol {tol:g}", f"C per fold, tol {tol:g}"]
    for name, paths in groups.items():
        for path in feature_sets(paths):
            with np.load(path) as saved:  # read once: the seconds are the nested CV's alone
                call = (saved["x"], saved["y"], saved["columns"], int(saved["n_classes"]),
                        [float(c) for c in saved["grid"]])
            shape = "{} × {} × {}".format(*call[0].shape[:2], len(call[2]))
            row = {"set": f"{name} ({path.stem})", "images × views × columns": shape}
            for tol in tols:
                t = time.perf_counter()
                with patch.object(probe, "FIT_TOL", tol):  # under the product's iteration cap, FIT_MAX_ITER
                    acc, chosen = nested_cv(*call, args.outer)
                row.update({f"acc tol {tol:g}": acc, f"s tol {tol:g}": time.perf_counter() - t,
                            f"C per fold, tol {tol:g}": " ".join(f"{c:g}" for c in chosen)})
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python benchmarks/probe_tolerance.py " + " ".join(sys.argv[1:])
    publish("probe_tolerance", f"## The probe's fit tolerance, judged by nested CV on train\n\n{machine}. Command: "
            f"`{command}`. Outer {args.outer}-fold split of the training images; the search's 3-fold CV chooses C "
            f"inside each outer-train part; accuracy over the outer-test images; seconds of the whole nested CV "
            f"in one BLAS thread.\n\n{table(rows, columns)}\n\n{summary(rows, tols)}", record=not args.no_record)


if __name__ == "__main__":
    main()
