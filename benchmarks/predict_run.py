"""Predicting and evaluating with a trained run folder: the frozen part on its chosen engine against the eager model.

    python benchmarks/predict_run.py --work DIR [--classes 2]

Trains once (untimed) the kind of model `make demo`'s search chooses on ELPV: `transferkit train DATA --recipe
tutorial --mode linear-probe --probe-views dihedral --crop-fraction 1.0` (a probe over the 8 dihedral views),
with a feature cache of its own. Then, in this one process (torch imported once, rows in turn), predicts the
val images with `Predictor` as `transferkit predict RUN DATA/val` does (the program's malloc settings), and scores them with `evaluate_run`:
- the whole model eager, under bf16 autocast (what `predict --precision auto` ran before on a CPU with bf16)
  and in fp32;
- this tree's default: the precision the run scored its val images in, the frozen part on the engine its
  training chose on this machine and the trained rest in torch (predict.FrozenSplit);
- evaluate with the run's cached val features, and with an empty feature cache (export and engine choice
  included);
- the default again, its files read three ways (reading_rows): the eval transform per image in turn, as predict
  read them before; uint8 crops normalized a batch at a time, in turn; and those crops read ahead on threads
  beside the network (now); for this 8-view probe and for a 1-view probe trained on the same features
  (`--probe-views none`), where reading is a larger share.
Each row: seconds, images/s, val accuracy, and the largest probability difference from the eager fp32 row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, cold_env, elpv, environment_line, table, write_section  # noqa: E402


def train(data: Path, run: Path, cache: Path, views: str = "dihedral") -> dict:
    import json

    if not (run / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "transferkit", "train", str(data), "--recipe", "tutorial", "--mode",
               "linear-probe", "--probe-views", views, "--crop-fraction", "1.0", "--out", str(run),
               "--overwrite"]
        subprocess.run(cmd, env={**cold_env(cache), "TRANSFERKIT_QUIET": "1"}, check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads((run / "metrics.json").read_text())


def predicted(predictor, paths: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    probs, errors = predictor.predict_proba(paths)
    assert not any(errors), errors
    return time.perf_counter() - t0, probs


def main() -> None:
    ap = benchmark_parser(__doc__, work=None, work_help="folder for the data, the run and its feature caches")
    ap.add_argument("--classes", type=int, default=2, choices=(2, 4))
    args = ap.parse_args()
    work = Path(args.work)
    data = work / f"elpv{args.classes}"
    if not (data / "train").is_dir():
        elpv(data, args.classes)
    cache, run = work / "feature-cache", work / "run"
    metrics = train(data, run, cache)
    os.environ["TRANSFERKIT_FEATURE_CACHE"] = str(cache)  # the run's own cache: its engine choice and features

    from transferkit.evaluate import evaluate_run
    from transferkit.malloc import keep_freed_blocks
    from transferkit.predict import Predictor

    # As the `transferkit` program sets up its process (cli.entry): without it, eager torch here took twice as
    # long (each batch's activations mapped afresh: 124.6 s against ~60 s in `transferkit predict`)
    keep_freed_blocks()

    classes = metrics["classes"]
    paths = sorted(str(p) for p in (data / "val").rglob("*.png"))
    y = np.array([classes.index(Path(p).parent.name) for p in paths])
    rows, reference = [], None
    for name, precision, whole in (("the whole model eager, bf16 autocast (predict's auto before)", "bf16", True),
                                   ("the whole model eager, fp32", "fp32", True),
                                   ("the frozen part on its engine, the rest in torch (predict's auto now)", "auto",
                                    False)):
        predictor = Predictor(run, precision=precision)
        if whole:
            predictor.frozen_engine = None  # the path predict took before FrozenSplit
        seconds, probs = predicted(predictor, paths)
        reference = probs if precision == "fp32" else reference
        engine = "eager" if whole else predictor.frozen_engine.info.get("engine")
        rows.append({"how": name, "precision": predictor.precision, "engine": engine, "seconds": seconds,
                     "images/s": len(paths) / seconds, "val acc": float((probs.argmax(1) == y).mean()), "probs": probs})
    for row in rows:
        row["max prob diff vs eager fp32"] = float(np.abs(row.pop("probs") - reference).max())
    rows += reading_rows(data, work, cache, paths, y)
    for name, feature_cache in (("evaluate, the run's cached val features", cache),
                                ("evaluate, an empty feature cache", work / "empty-cache")):
        shutil.rmtree(work / "empty-cache", ignore_errors=True)
        os.environ["TRANSFERKIT_FEATURE_CACHE"] = str(feature_cache)
        t0 = time.perf_counter()
        ev = evaluate_run(run, data, out=work / "evaluation")
        seconds = time.perf_counter() - t0
        rows.append({"how": name, "precision": "auto", "engine": "cache" if ev["features"]["computed"] == 0 else
                     "chosen", "seconds": seconds, "images/s": ev["n"] / seconds, "val acc": ev["accuracy"]})
    shutil.rmtree(work / "empty-cache", ignore_errors=True)

    print(environment_line())
    columns = ["how", "precision", "engine", "seconds", "images/s", "val acc", "max prob diff vs eager fp32"]
    text = table(rows, columns)
    print(text)
    write_section(f"predict_run_elpv{args.classes}", (
        f"## Predicting with a run folder: ELPV {args.classes} classes\n\n{environment_line()}. Command: `python "
        f"benchmarks/predict_run.py --work DIR --classes {args.classes}`: a linear probe over the 8 dihedral views "
        f"(`--recipe tutorial --mode linear-probe --probe-views dihedral --crop-fraction 1.0`; its run reported val "
        f"{metrics['best_val_acc']:.4f}), its {len(paths)} val images predicted in one process (torch imported "
        f"once; each image's 8 views), then evaluated; last, the files read three ways (the faster of 2 alternated "
        f"runs each), for that probe and a 1-view one.\n\n{text}\n"))


def reading_rows(data: Path, work: Path, cache: Path, paths: list[str], y: np.ndarray) -> list[dict]:
    """The default predictor reading its files three ways, alternated twice (the faster of each kept), for the
    8-view probe and a 1-view one: the eval transform per image, in turn (how predict read before 2026-12-06);
    uint8 eval crops normalized a batch at a time, in turn; the same crops read ahead on threads (now)."""
    from transferkit import inference
    from transferkit.data.images import load_rgb
    from transferkit.data.transforms import eval_transform
    from transferkit.predict import Predictor

    one_view = work / "run-1view"
    train(data, one_view, cache, views="none")
    default_threads, rows = inference.READ_THREADS, []
    ways = {"the eval transform per image, read in turn (before)": 1,
            "uint8 crops, batch-normalized, read in turn": 1,
            f"uint8 crops, batch-normalized, next batches read on {default_threads} threads (now)": default_threads}
    for run, views in ((work / "run", "8 views"), (one_view, "1 view")):
        predictor = Predictor(run)
        new_way = predictor.preprocess
        transform = eval_transform(predictor.preprocessing)

        def old_way(path):
            return transform(load_rgb(path, shorter_side=predictor.preprocessing.resize_size))

        predicted(predictor, paths[:64])  # the engine is chosen (and its first batch run) outside the timing
        best = {}
        for _ in range(2):
            for way, threads in ways.items():
                inference.READ_THREADS = threads
                predictor.preprocess = old_way if way.startswith("the eval transform") else new_way
                seconds, probs = predicted(predictor, paths)
                best[way] = min(best.get(way, (np.inf,)), (seconds, probs), key=lambda t: t[0])
        inference.READ_THREADS = default_threads
        for way, (seconds, probs) in best.items():
            rows.append({"how": f"the default, {views}: {way}", "precision": predictor.precision,
                         "engine": predictor.frozen_engine.info.get("engine"), "seconds": seconds,
                         "images/s": len(paths) / seconds, "val acc": float((probs.argmax(1) == y).mean())})
    return rows


if __name__ == "__main__":
    main()
