"""The seeds' experiment as one command: pretrained feature-extract, pretrained finetune and scratch,
trained on the same split for the same epochs, summarised as a table, JSON and one figure."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .engine.signals import Interrupted
from .errors import TransferkitError, UsageError
from .io import atomic_write_json, read_json_object
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
    # An earlier compare into OUT that stopped partway (no compare.json): its finished runs are kept and its
    # interrupted one resumed, so the same command continues it; before, it was refused (or --overwrite
    # trained all three again)
    again = not base.overwrite and not (out / "compare.json").exists()
    try:
        for name, cfg in configs.items():
            runs[name] = _summary(_run_variant(name, cfg, again))
    except Interrupted as exc:
        raise Interrupted(f"{str(exc).split(';')[0]}; run the same compare command again to continue it "
                          "(finished runs are kept)", exc.exit_code - 128) from None
    figure = plot_compare({name: r["val_acc"] for name, r in runs.items()}, out / "compare.png",
                          title=f"{model}: validation accuracy per epoch")
    result = {"data": str(data), "model": model, "epochs": epochs, "options": options,
              "runs": runs, "figure": str(figure)}
    atomic_write_json(out / "compare.json", result)
    return result


def _run_variant(name: str, cfg: TrainConfig, again: bool) -> dict:
    """The variant's metrics: trained, or where `again` and its folder holds a run of the same options, that
    finished run's or that interrupted run's resumed."""
    from .api import resume_run
    from .engine.fit import fit

    folder = RunFolder(cfg.out)
    if again and _same_options(folder, cfg):
        metrics = read_json_object(folder.metrics)  # {} where damaged: trained again, as fit decides
        if "history" in metrics:
            log.info("compare: %s already trained in %s (kept)", name, cfg.out)
            return metrics
        if not folder.finished() and folder.last.is_file():
            log.info("compare: resuming %s in %s", name, cfg.out)
            return resume_run(cfg.out, {})
    log.info("compare: training %s", name)
    return fit(cfg)


def _same_options(folder: RunFolder, cfg: TrainConfig) -> bool:
    """Whether the run in FOLDER was made with CFG's options (the data folder resolved: config.yaml holds it
    absolute)."""
    try:
        saved = TrainConfig.from_yaml(folder.config).to_dict()
    except (OSError, ValueError, TransferkitError):  # no config (an empty folder) or not one of ours
        return False
    wanted = cfg.to_dict()
    if Path(saved.pop("data") or "").resolve() != Path(wanted.pop("data") or "").resolve():
        return False
    return all(saved.get(k) == v for k, v in wanted.items() if k not in ("out", "overwrite"))


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
