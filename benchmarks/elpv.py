"""ELPV accuracy benchmark through transferkit's public CLI, beside the published numbers.

    python benchmarks/elpv.py --classes 2 --out RUN [--data DIR] [--no-tta] [-- extra `transferkit train` flags]
    python benchmarks/elpv.py --classes 2 --out RUN --precisions bf16,fp32 [-- --epochs 2]

Materializes ELPV with `transferkit data elpv` (if needed), trains with one `transferkit train` command
(leaving a normal run folder in RUN that `transferkit evaluate RUN DATA/val` re-checks), then runs
`transferkit evaluate RUN DATA/val --tta` (the eight symmetries of the square, which the recipe's
dihedral augmentation declares safe; written to RUN/tta), and records accuracy, balanced accuracy,
macro-F1, wall time (training, and training + TTA) and the recipe in benchmarks/RESULTS.md.
Flags after `--` are appended to the recipe (later flags win). With --precisions, the recipe is trained
once per precision (RUN-bf16, RUN-fp32, no TTA) and the runs are recorded side by side: bf16 autocast
(weights fp32) must stay within one point of fp32 (issue 15).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment_line, table, write_section  # noqa: E402

# Deitsch et al. 2019 (Solar Energy 185), accuracy on their test split.
PUBLISHED = {2: [("CNN (VGG19, fine-tuned on a GPU)", 0.8842), ("SVM (KAZE/VGG features)", 0.8244)], 4: []}
# Best measured so far (RESULTS.md): full fine-tuning with BatchNorm frozen and folded (fast on a CPU),
# crops in any of the square's 8 orientations (cells have no "up"), the whole cell at evaluation
# (--crop-fraction 1.0: defects at the cell's edge are not cropped away; 0.8445 -> 0.872 on 2 classes),
# 5 epochs to stay under 20 minutes. Earlier recipes: feature-extract with 4 cached dihedral views 0.8506;
# partial --unfreeze 2, 0.8506.
RECIPE = ["--recipe", "tutorial", "--model", "efficientnet_lite0", "--mode", "finetune", "--batchnorm", "frozen", "--augment", "dihedral",
          "--epochs", "5", "--optimizer", "adamw", "--lr", "0.0005", "--weight-decay", "0.05",
          "--scheduler", "cosine", "--warmup-epochs", "0.3", "--batch-size", "32", "--label-smoothing", "0.1",
          "--crop-fraction", "1.0"]


def transferkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "transferkit", *args], check=True)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, choices=(2, 4), default=2)
    ap.add_argument("--out", required=True, help="run folder to write")
    ap.add_argument("--data", help="ELPV folder (made with `transferkit data elpv` if missing)")
    ap.add_argument("--no-tta", action="store_true", help="skip the test-time-augmentation evaluation")
    ap.add_argument("--precisions", help="e.g. bf16,fp32: one run per precision, recorded side by side")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    data = Path(args.data or Path(tempfile.gettempdir()) / f"elpv{args.classes}")
    if not (data / "train").is_dir():
        transferkit("data", "elpv", str(data), "--classes", str(args.classes))
    recipe = RECIPE + extra
    if args.precisions:
        return compare_precisions(args, data, recipe, extra)
    t0 = time.perf_counter()
    transferkit("train", str(data), "--out", args.out, *recipe)
    wall = time.perf_counter() - t0
    m = json.loads((Path(args.out) / "metrics.json").read_text())
    tta = None
    if not args.no_tta:
        transferkit("evaluate", args.out, str(data / "val"), "--tta", "--out", str(Path(args.out) / "tta"))
        tta = json.loads((Path(args.out) / "tta" / "evaluation.json").read_text())
        tta_wall = time.perf_counter() - t0
    last = m["history"][-1]
    rows = [{"method": f"transferkit ({m['model']}, {m['mode']}), best epoch {m['best_epoch']} on val",
             "accuracy": m["best_val_acc"], "balanced accuracy": m["best_val_balanced_accuracy"],
             "macro-F1": m["best_val_macro_f1"], "wall s (CPU)": wall},
            {"method": f"transferkit, last epoch ({last['epoch']})", "accuracy": last["val_acc"],
             "balanced accuracy": last["val_balanced_accuracy"], "macro-F1": last["val_macro_f1"]}]
    scored = rows[:1]  # the rows that count for the target: the best epoch, alone and with TTA
    if tta:
        scored.append({"method": f"transferkit, best epoch + TTA ({tta['tta']['kind']}, {tta['tta']['views']} views)",
                     "accuracy": tta["accuracy"], "balanced accuracy": tta["balanced_accuracy"],
                     "macro-F1": tta["macro_f1"], "wall s (CPU)": tta_wall})
        rows.append(scored[-1])
    rows += [{"method": f"Deitsch et al. 2019: {name}", "accuracy": acc} for name, acc in PUBLISHED[args.classes]]
    target = 0.90 if args.classes == 2 else 0.85
    met = any(r["accuracy"] >= target and r["wall s (CPU)"] < 1200 for r in scored)
    text = (f"## ELPV, {args.classes} classes\n\n{environment_line()}. Data: `transferkit data elpv --classes "
            f"{args.classes}` ({m['train_images']} train / {m['val_images']} val). Engine: "
            f"{m['source'].get('engine', 'torch')}; source {m['source'].get('kind')}.\n\n"
            f"Command: `python benchmarks/elpv.py --classes {args.classes} --out RUN"
            + (f" -- {' '.join(extra)}" if extra else "") + "`\n\n"
            f"Recipe: `transferkit train DATA {' '.join(recipe)}`\n\n"
            + table(rows, ["method", "accuracy", "balanced accuracy", "macro-F1", "wall s (CPU)"])
            + f"\n\nTarget: accuracy ≥ {target} in < 1200 s: " + ("met" if met else "not met") + ". The published numbers "
            "are on the paper's own test split; ours on a stratified 25% split, the epoch chosen on it.")
    print(text)
    write_section(f"elpv{args.classes}", text)


def compare_precisions(args, data: Path, recipe: list[str], extra: list[str]) -> None:
    env, rows = environment_line(), []
    for precision in args.precisions.split(","):
        out = Path(f"{args.out}-{precision}")
        t0 = time.perf_counter()
        transferkit("train", str(data), "--out", str(out), "--overwrite", *recipe, "--precision", precision)
        wall = time.perf_counter() - t0
        m = json.loads((out / "metrics.json").read_text())
        epochs = m["history"]
        rows.append({"precision": precision, "resolved": m.get("source", {}).get("precision", precision),
                     "best val acc": m["best_val_acc"], "last epoch val acc": epochs[-1]["val_acc"],
                     "epochs": len(epochs), "s / epoch": sum(r["seconds"] for r in epochs) / len(epochs),
                     "wall s": wall})
        print(rows[-1], flush=True)
    by = {r["precision"]: r for r in rows}
    verdict = ""
    if {"bf16", "fp32"} <= by.keys():
        gap = 100 * (by["bf16"]["best val acc"] - by["fp32"]["best val acc"])
        verdict = (f"\n\nbf16 − fp32: {gap:+.2f} points (best epoch), "
                   f"{100 * (by['bf16']['last epoch val acc'] - by['fp32']['last epoch val acc']):+.2f} (last epoch); "
                   f"target within one point: {'met' if abs(gap) <= 1.0 else 'not met'}. Speed: fp32 / bf16 s per "
                   f"epoch = {by['fp32']['s / epoch'] / by['bf16']['s / epoch']:.2f}.")
    text = (f"## ELPV, {args.classes} classes: bf16 vs fp32\n\n{env}. Command: `python benchmarks/elpv.py --classes "
            f"{args.classes} --out RUN --precisions {args.precisions}" + (f" -- {' '.join(extra)}" if extra else "")
            + f"`. Recipe: `transferkit train DATA {' '.join(recipe)} --precision P`.\n\n"
            + table(rows, ["precision", "resolved", "best val acc", "last epoch val acc", "epochs", "s / epoch",
                           "wall s"]) + verdict)
    print(text)
    write_section(f"elpv{args.classes}_precision", text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
