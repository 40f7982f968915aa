"""The default recipe (`transferkit train DATA`: the recipe search, default budget) against the seed tutorials'
recipe (`--recipe tutorial`) and a raw-pixel SVM, on real labelled image sets that install from PyPI.

    python benchmarks/auto.py --work DIR [--sets elpv2,elpv4,elpv2-seed-sized,digits,lfw_faces,textures]
                              [--budget 4m] [--long elpv2,elpv4 --long-budget 20m] [--no-tutorial]
                              [--device cpu|cuda] [--data NAME=FOLDER,...]
                              [--best-metrics balanced_accuracy,macro_f1]

Every transferkit run starts with an empty feature cache (cold, as a new user's first run), through the
public CLI, and is timed as a whole command. The SVM: images resized to 32x32 grey, standardized, an RBF SVC
with C chosen by 3-fold CV on train (scikit-learn), scored once on val. Each set's row goes to its own
section of benchmarks/RESULTS.md as soon as it is done, with the machine and its load. --device cuda runs
transferkit on the GPU (its own sections); --data takes a set's folder made elsewhere (a machine without the
package that holds it); --best-metrics adds an auto row per metric at the first budget, the search told to
choose by it (`--best-metric M`), in a section of its own with the val macro-F1 beside accuracy and balanced
accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (benchmark_parser, cold_env, elpv, environment_line, stratified_subset, table,  # noqa: E402
                    write_section)

from transferkit.config import DEFAULT_TIME_BUDGET  # noqa: E402

SETS = ("elpv2", "elpv4", "elpv2-seed-sized", "digits", "lfw_faces", "textures")


def materialize(name: str, work: Path, given: dict[str, Path]) -> Path:
    if name in given:
        return given[name]
    if name == "elpv2":
        return elpv(work / "elpv2", 2)
    if name == "elpv4":
        return elpv(work / "elpv4", 4)
    if name == "elpv2-seed-sized":  # the size of the tutorials' bees/ants (244 train / 153 val)
        return stratified_subset(elpv(work / "elpv2", 2), work / "elpv2-seed-sized", 244, 153)
    import datasets  # benchmarks/datasets.py: packaged real sets

    getattr(datasets, f"materialize_{name}")(work / name)
    return work / name


def transferkit_run(data: Path, out: Path, cache: Path, *flags: str) -> dict:
    """One cold `transferkit train` command: its metrics, search record and wall time."""
    env = cold_env(cache)
    for old in (out, cache):  # a cold run: no earlier run folder or features
        shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), *flags],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    search = json.loads((out / "search.json").read_text()) if (out / "search.json").exists() else None
    return {"acc": metrics["best_val_acc"], "balanced": metrics["best_val_balanced_accuracy"],
            "macro_f1": metrics["best_val_macro_f1"], "wall_s": wall, "search": search}


def image_matrix(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img:
                xs.append(np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), np.float32).ravel() / 255)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def svm_baseline(data: Path) -> dict:
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    t0 = time.perf_counter()
    xtr, ytr = image_matrix(data / "train", classes)
    xva, yva = image_matrix(data / "val", classes)
    search = GridSearchCV(make_pipeline(StandardScaler(), SVC()), {"svc__C": [0.1, 1, 10, 100]}, cv=3)
    search.fit(xtr, ytr)
    acc = float((search.predict(xva) == yva).mean())
    return {"acc": acc, "wall_s": time.perf_counter() - t0, "C": search.best_params_["svc__C"],
            "n_train": len(ytr), "n_val": len(yva), "classes": len(classes)}


def chosen_text(search: dict | None) -> str:
    if not search:
        return ""
    s = {k: v for k, v in search["chosen_settings"].items() if k != "cv_per_C"}
    return f"{search['chosen']} ({', '.join(f'{k}={v}' for k, v in s.items())})"


def bench_set(name: str, work: Path, budgets: list[str], tutorial: bool = True, device: str = "cpu",
              given: dict[str, Path] | None = None, best_metrics: tuple[str, ...] = ()) -> None:
    data = materialize(name, work, given or {})
    env = environment_line(torch.device(device))
    on_device = ("--device", device)
    svm = svm_baseline(data)
    rows = [{"recipe": "raw-pixel SVM (32x32 grey, RBF, C by 3-fold CV)", "val_acc": svm["acc"],
             "wall_s": svm["wall_s"]}]
    tut = {"acc": float("nan")}
    if tutorial:  # --no-tutorial: its row is in the default-budget section already
        tut = transferkit_run(data, work / "runs" / f"{name}-tutorial", work / "cache" / f"{name}-tutorial",
                              "--recipe", "tutorial", *on_device)
        rows.append({"recipe": "`--recipe tutorial` (seeds: SGD 0.001, StepLR 7/0.1, 15 epochs)",
                     "val_acc": tut["acc"], "balanced": tut["balanced"], "wall_s": tut["wall_s"]})
    for budget in budgets:
        auto = transferkit_run(data, work / "runs" / f"{name}-auto-{budget}", work / "cache" / f"{name}-auto-{budget}",
                               "--time-budget", budget, *on_device)
        rows.append({"recipe": f"auto, `--time-budget {budget}`" + (" (the default)" if budget == DEFAULT_TIME_BUDGET else ""),
                     "val_acc": auto["acc"], "balanced": auto["balanced"], "wall_s": auto["wall_s"],
                     "macro_f1": auto["macro_f1"], "chosen": chosen_text(auto["search"])})
    for metric in best_metrics:  # the search told what to choose by
        run = transferkit_run(data, work / "runs" / f"{name}-auto-{metric}", work / "cache" / f"{name}-auto-{metric}",
                              "--time-budget", budgets[0], "--best-metric", metric, *on_device)
        rows.append({"recipe": f"auto, `--time-budget {budgets[0]} --best-metric {metric}`", "val_acc": run["acc"],
                     "balanced": run["balanced"], "macro_f1": run["macro_f1"], "wall_s": run["wall_s"],
                     "chosen": chosen_text(run["search"])})
    autos = rows[2:] if tutorial else rows[1:]
    versus_tutorial = f"auto - tutorial = {100 * (autos[0]['val_acc'] - tut['acc']):+.1f} points, " if tutorial else ""
    verdict = (f"{versus_tutorial}auto - SVM = {100 * (autos[0]['val_acc'] - svm['acc']):+.1f} points "
               f"(`--time-budget {budgets[0]}`); best auto {max(r['val_acc'] for r in autos):.4f}")
    flags = "" if budgets == [DEFAULT_TIME_BUDGET] else f" --budget {budgets[0]}"
    flags += f" --device {device}" if device != "cpu" else ""
    flags += f" --best-metrics {','.join(best_metrics)}" if best_metrics else ""
    command = (f"python benchmarks/auto.py --sets {name}{flags}" + ("" if tutorial else " --no-tutorial")
               + (f" --data {name}={data}" if name in (given or {}) else ""))
    text = (f"## Recipe search: {name}{flags}\n\n{env}. `{command}` "
            f"({svm['n_train']} train / {svm['n_val']} val images, {svm['classes']} classes; cold feature cache "
            f"for every transferkit run; wall = the whole command).\n\n"
            + table(rows, ["recipe", "val_acc", "balanced"] + ["macro_f1"] * bool(best_metrics) + ["wall_s", "chosen"])
            + f"\n\n{verdict}.\n")
    print(text, flush=True)
    write_section(f"auto-{name}" + flags.replace(" --budget ", "-").replace(" --device ", "-")
                  .replace(" --best-metrics ", "-metrics-").replace(",", "-"), text)


def main() -> None:
    ap = benchmark_parser(__doc__, work=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--budget", default=DEFAULT_TIME_BUDGET, help="the auto runs' budget (default: the CLI's)")
    ap.add_argument("--long", default="", help="sets that also run with --long-budget")
    ap.add_argument("--long-budget", default="20m")
    ap.add_argument("--no-tutorial", action="store_true", help="skip the tutorial recipe's row")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--data", default="", help="NAME=FOLDER,...: sets made elsewhere")
    ap.add_argument("--best-metrics", default="", help="METRIC,...: an auto row each with --best-metric METRIC")
    args = ap.parse_args()
    given = {name: Path(folder) for name, folder in (item.split("=", 1) for item in args.data.split(",") if item)}
    long = set(filter(None, args.long.split(",")))
    for name in args.sets.split(","):
        bench_set(name, args.work, [args.budget] + ([args.long_budget] if name in long else []),
                  tutorial=not args.no_tutorial, device=args.device, given=given,
                  best_metrics=tuple(filter(None, args.best_metrics.split(","))))


if __name__ == "__main__":
    main()
