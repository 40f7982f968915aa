"""The seeds' experiment as one command: pretrained feature-extract, pretrained finetune and scratch,
trained on the same split for the same epochs, summarised as a table, JSON and one figure."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .errors import UsageError
from .io import atomic_write_json
from .run_folder import RunFolder

log = logging.getLogger(__name__)

# name -> the options that differ between the three runs; everything else (split seed, epochs, lr...)
# is shared so the curves differ only by initialisation and what trains.
VARIANTS = {
    "pretrained-feature-extract": {"pretrained": True, "mode": "feature-extract"},
    "pretrained-finetune": {"pretrained": True, "mode": "finetune"},
    "scratch-finetune": {"pretrained": False, "mode": "finetune"},
}


def compare(data: str | Path, model: str, out: str | Path, epochs: int = 15, **options) -> dict:
    """Train the three variants into OUT/<variant>/; write OUT/compare.json and OUT/compare.png."""
    from .engine.fit import fit
    from .results.plots import plot_compare

    out = Path(out)
    if RunFolder(out).holds_run_files():  # its three runs and compare.json would land among another run's files
        raise UsageError(f"--out {out} holds a training run; compare writes three runs of its own into "
                         "OUT/<variant>/: choose another --out")
    base = TrainConfig(data=str(data), model=model, epochs=epochs, **options)
    configs = {name: replace(base, out=str(out / name), **changes) for name, changes in VARIANTS.items()}
    for cfg in configs.values():  # a bad option stops the comparison before its first run, not after it
        cfg.validate()
    runs = {}
    for name, cfg in configs.items():
        log.info("compare: training %s", name)
        runs[name] = _summary(fit(cfg))
    figure = plot_compare({name: r["val_acc"] for name, r in runs.items()}, out / "compare.png",
                          title=f"{model}: validation accuracy per epoch")
    result = {"data": str(data), "model": model, "epochs": epochs, "options": options,
              "runs": runs, "figure": str(figure)}
    atomic_write_json(out / "compare.json", result)
    return result


def _summary(metrics: dict) -> dict:
    return {
        "best_val_acc": metrics["best_val_acc"],
        "best_val_acc_interval": metrics.get("best_val_acc_interval"),
        "best_epoch": metrics["best_epoch"],
        "wall_seconds": metrics["wall_seconds"],
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        "val_acc": [row["val_acc"] for row in metrics["history"]],
        "run_dir": metrics["run_dir"],
    }


def format_compare_table(result: dict) -> str:
    """One row per run; the 95% interval of each best val accuracy says which gaps the val split can tell."""
    from .results.metrics import format_interval

    header = f"{'run':<28}{'best val acc':>13}{'95% interval':>16}{'epoch':>7}{'time':>9}{'trainable params':>18}"
    lines = [header, "-" * len(header)]
    for name, r in result["runs"].items():
        interval = r.get("best_val_acc_interval")
        spread = format_interval(interval, 3) if interval else "n/a"
        lines.append(f"{name:<28}{r['best_val_acc']:>13.4f}{spread:>16}{r['best_epoch']:>7}"
                     f"{r['wall_seconds']:>8.1f}s{r['trainable_params']:>18,}")
    return "\n".join(lines)
