"""The probe's fit tolerance judged by nested CV on the training images only: a loose L-BFGS stop against tighter
ones, in accuracy and in the seconds the search's CV takes.

    python benchmarks/probe_tolerance.py [--sets elpv2,elpv4,elpv2-seed-sized,digits]
                                         [--tols sklearn@1e-4,1e-4,1e-5] [--outer 5] [--no-record]

Why: engine/probe.py's `fit_logistic` stopped L-BFGS at tol 1e-3 (FIT_TOL) until session 46, which leaves the
weak-C fits unconverged, so on a flat CV curve the chosen C can move with the order of the BLAS sums (session 44:
ELPV 2 classes, 8 views, C 0.1 in one BLAS thread, 0.01 in two). Converged fits depend far less on the rounding, at a
price in time; this measures both sides. Session 45 compared 1e-3 with 1e-6, session 46 1e-3 with 1e-4 (the
default since). Every tolerance runs under the product's iteration cap, FIT_MAX_ITER (3,000 since session 46;
sessions 45-46's tol 1e-3 rows ran under the cap of 200 that went with it, session 45's 1e-6 rows under 3,000).
Since session 47 the product solves the fits itself (engine/logistic.py: the same objective, preconditioned); a
tolerance written `sklearn@TOL` runs scikit-learn's LogisticRegression instead, the solver until then, as the
reference.

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
    """The outer-test accuracy and the C chosen in each outer fold, with the probe's fits as they are set now."""
    from transferkit.engine import probe

    right, chosen = 0, []
    for train, test in probe.stratified_folds(y, outer, seed=100):
        C = probe.cross_validate(x[train], y[train], columns, n_classes, grid).C
        fit = probe.fit_probe(x[train], y[train], columns, C, n_classes)
        right += int((probe.predict_proba(fit, x[test]).argmax(1) == y[test]).sum())
        chosen.append(C)
    return right / len(y), chosen


def sklearn_solve(x, labels, C, classes, sample_weight=None, warm=None, directions=None, tol=1e-4, max_iter=3000):
    """engine/logistic.solve as scikit-learn's LogisticRegression computes it (the product's solver until session
    47): the same objective and the same binomial form for two classes; `directions` unused."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, warm_start=warm is not None)
    if warm is not None:
        clf.coef_, clf.intercept_ = warm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, labels, sample_weight=sample_weight)
    return clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)


def solver(tol: str):
    """A context in which the product's probe fits run at the tolerance `tol` ("sklearn@TOL": in scikit-learn)."""
    from contextlib import ExitStack

    from transferkit.engine import logistic, probe

    stack = ExitStack()
    if tol.startswith("sklearn@"):
        stack.enter_context(patch.object(logistic, "solve", sklearn_solve))
        stack.enter_context(patch.object(logistic, "top_directions", lambda x: None))
    stack.enter_context(patch.object(probe, "FIT_TOL", float(tol.split("@")[-1])))  # under FIT_MAX_ITER
    return stack


def summary(rows: list[dict], tols: list[str]) -> str:
    """Each tolerance against the first: the mean and range of the accuracy differences, the median time ratio."""
    lines = []
    for tol in tols[1:]:
        gain = [100 * (r[f"acc tol {tol}"] - r[f"acc tol {tols[0]}"]) for r in rows]
        cost = np.median([r[f"s tol {tol}"] / r[f"s tol {tols[0]}"] for r in rows])
        lines.append(f"tol {tol} against {tols[0]}: accuracy {np.mean(gain):+.2f} points on average (from "
                     f"{min(gain):+.2f} to {max(gain):+.2f}), the nested CV {cost:.1f}× as long (median).")
    return "\n".join(lines)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sets", default="elpv2,elpv4,elpv2-seed-sized,digits", help="data sets (benchmarks/auto.py's)")
    ap.add_argument("--tols", default="sklearn@1e-4,1e-4,1e-5",
                    help="L-BFGS tolerances (sklearn@TOL: in scikit-learn's solver); the first is the reference")
    ap.add_argument("--outer", type=int, default=5, help="outer folds")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    machine, tols = environment_line(), args.tols.split(",")
    groups = {name: list(capture(name, args.work).glob("*.npz")) for name in args.sets.split(",")}
    rows, columns = [], ["set", "images × views × columns"]
    for tol in tols:
        columns += [f"acc tol {tol}", f"s tol {tol}", f"C per fold, tol {tol}"]
    for name, paths in groups.items():
        for path in feature_sets(paths):
            with np.load(path) as saved:  # read once: the seconds are the nested CV's alone
                call = (saved["x"], saved["y"], saved["columns"], int(saved["n_classes"]),
                        [float(c) for c in saved["grid"]])
            shape = "{} × {} × {}".format(*call[0].shape[:2], len(call[2]))
            row = {"set": f"{name} ({path.stem})", "images × views × columns": shape}
            for tol in tols:
                t = time.perf_counter()
                with solver(tol):
                    acc, chosen = nested_cv(*call, args.outer)
                row.update({f"acc tol {tol}": acc, f"s tol {tol}": time.perf_counter() - t,
                            f"C per fold, tol {tol}": " ".join(f"{c:g}" for c in chosen)})
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python benchmarks/probe_tolerance.py " + " ".join(sys.argv[1:])
    publish("probe_tolerance", f"## The probe's fit tolerance, judged by nested CV on train\n\n{machine}. Command: "
            f"`{command}`. Outer {args.outer}-fold split of the training images; the search's 3-fold CV chooses C "
            f"inside each outer-train part; accuracy over the outer-test images; seconds of the whole nested CV "
            f"in one BLAS thread.\n\n{table(rows, columns)}\n\n{summary(rows, tols)}", record=not args.no_record)


if __name__ == "__main__":
    main()
