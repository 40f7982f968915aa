"""A training run: `fit(cfg)` validates the config, scans the data, builds the model and freezes it as the
run's mode says (`prepare`), lets the mode train it (modes/: the epoch loop of engine/trainer.py, or one
probe fit), then writes the run: metrics, evaluation, novelty reference, figures, report (`_finish`)."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.folders import (IMBALANCE_WARN_RATIO, DataScan, read_manifest, scan_dataset, subsample_train,
                            write_manifest)
from ..data.transforms import eval_transform, train_transform
from ..errors import UsageError
from ..io import atomic_write_json, atomic_write_text
from ..models.adapt import ParamPlan, build_model
from ..models.registry import BackboneSpec, get_spec
from ..modes import make_mode
from ..novelty import FILE as NOVELTY_FILE
from ..preprocessing import Preprocessing
from ..run_folder import RunFolder, claimed
from ..threads import prefetch_modules
from . import distributed
from . import precision as precisions
from .environment import describe_environment, pick_device
from . import signals
from .sources import BatchSource, CachedFeatureSource

if TYPE_CHECKING:
    from ..modes.base import Mode

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_accuracy",
                  "val_macro_f1", "lr", "seconds"]


@dataclass
class RunState:
    """What the loop needs, built once from the config."""

    cfg: TrainConfig
    spec: BackboneSpec
    pre: Preprocessing
    scan: DataScan
    model: nn.Module
    plan: ParamPlan
    mode: "Mode"  # modes/: what trains, on which batches
    device: torch.device
    out: Path
    history: list[dict] = field(default_factory=list)
    skipped_in_training: int = 0
    split_sha256: str = ""  # of RUN/split.csv, recorded in `last` so a resume uses the same split
    elapsed_before: float = 0.0  # seconds trained before a resume
    probe_init: dict | None = None  # --head-init probe: the probe's C and CV accuracy


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.replace(':', '.')}-{cfg.mode}"  # model: maybe module:function


def advise_on_imbalance(scan: DataScan, chooses_by: str) -> None:
    """Where the classes are imbalanced and the run chooses (a run in epochs its best epoch; a probe its strength;
    the recipe search its recipe) by plain accuracy, name the options that count the classes alike."""
    if scan.imbalance_ratio() > IMBALANCE_WARN_RATIO and chooses_by == "accuracy":
        log.warning("accuracy flatters the large classes: consider --best-metric balanced_accuracy (what the run "
                    "chooses by) and --class-weights auto (the classes weighed alike in training)")


def prepare(cfg: TrainConfig, resume: bool = False, scan: DataScan | None = None,
            announce: bool = True) -> RunState:
    """Validate, scan (or take the given split), write the run's config and split, build the model.
    `scan`: a split made by the caller (the recipe search's inner hold-out), who has said what there is to say
    of it (summary, class-imbalance advice). announce=False: the run folder (a throwaway one, in the temp
    folder, that the user never sees) is not logged."""
    cfg.validate()
    out = Path(cfg.out)  # fit named it and holds it (run_folder.claimed)
    if not resume:
        refuse_to_overwrite(out, cfg.overwrite)
    set_seed(cfg.seed)
    spec = get_spec(cfg.model)
    device = distributed.device_for(pick_device(cfg.device))  # a bad --device fails before any file is written
    # Under torchrun rank 0 scans and names the run folder; every rank gets the same split and folder.
    given = scan
    scan = distributed.share_from_main(
        lambda: given if given is not None
        else read_manifest(Path(cfg.out) / "split.csv", cfg.data) if resume  # the run's own split
        else scan_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict,
                          group_duplicates=cfg.group_duplicates))
    for line in scan.summary_lines() if given is None else []:
        log.warning(line)
    if cfg.train_subsample and cfg.train_subsample < len(scan.train):
        log.warning("training on a seeded stratified random %d of the %d training images (--train-subsample)",
                    cfg.train_subsample, len(scan.train))
        scan = subsample_train(scan, cfg.train_subsample, cfg.seed)
    cfg.keep_bit_depth(scan.sixteen_bit_white)  # before config.yaml is written: a resume reads as this run
    pre = spec.preprocessing.at_size(cfg.image_size, cfg.crop_fraction).reading(cfg.sixteen_bit_white)
    if given is None:  # said by whoever made the split (the recipe search: its own scan, not its inner split)
        advise_on_imbalance(scan, cfg.selection_metric if cfg.mode == "linear-probe" else cfg.best_metric)
    model = build_model(spec, len(scan.classes), pretrained=cfg.pretrained, weights_path=cfg.weights)
    mode = make_mode(cfg)
    plan = mode.freeze(model, spec)
    # Only now, with every option checked, does the run folder get its first files (and lose an old run's).
    if distributed.is_main() and not resume:
        _clear_replaced_run(out)
        # data as an absolute path: evaluate (of split.csv), export's check and --resume read it from any folder,
        # where a relative one named no folder, or another one of that name
        atomic_write_text(out / "config.yaml", replace(cfg, data=os.path.abspath(cfg.data)).to_yaml())
        write_manifest(scan, out / "split.csv")
        scan.write_report(out / "data_report.json")
    signals.note_run_dir(out)
    (log.info if announce else log.debug)("run folder: %s", out)
    model.to(device)
    if device.type == "cpu" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return RunState(cfg, spec, pre, scan, model, plan, mode, device, out)


def refuse_to_overwrite(out: Path, overwrite: bool) -> None:
    """A run folder that holds a run (finished, or resumable) is replaced only when asked to; the new run clears
    it as it writes its first files (prepare: _clear_replaced_run)."""
    if not _holds_a_run(out):
        _refuse_a_foreign_folder(out)
        return
    if not overwrite:
        if RunFolder(out).finished():
            raise UsageError(f"--out {out} holds a finished run; pass --overwrite to replace it, "
                             "or choose another --out")
        raise UsageError(f"--out {out} holds an interrupted run; continue it with `transferkit train --resume "
                         f"{out}`, or pass --overwrite to replace it")


def _holds_a_run(out: Path) -> bool:
    run = RunFolder(out)
    return run.finished() or run.last.is_file()


def _clear_replaced_run(out: Path) -> None:
    """--overwrite: nothing of the old run stays to pass for the new one's (nor a finished look). Cleared here, not
    when the run starts: a new run refused on its way (a data folder of one class, Ctrl-C in the recipe search)
    left the folder empty, the old run lost."""
    if _holds_a_run(out):
        log.warning("replacing the run in %s (--overwrite)", out)
        RunFolder(out).clear()


def _refuse_a_foreign_folder(out: Path) -> None:
    """`--out` naming a folder that holds files, none of them a run's (`--out .` in a home folder): the run's
    fifteen files would land among them."""
    try:
        names = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    except OSError:  # missing (a new run folder), or not a folder (check_paths says so)
        return
    if names and not RunFolder(out).holds_run_files():
        raise UsageError(f"--out {out} holds other files ({', '.join(sorted(names)[:3])}{', ...' * (len(names) > 3)})"
                         "; choose a new or empty folder for the run")


def make_source(state: RunState) -> BatchSource:
    """The batch source the run's mode trains on."""
    return state.mode.make_source(state)


@distributed.session
def fit(cfg: TrainConfig, resume: bool = False, scan: DataScan | None = None, deadline: float | None = None,
        figures: bool = True, callbacks=()) -> dict:
    """Train as configured; write the run folder; return metrics.json's content.
    resume=True continues the run in cfg.out from its `last` checkpoint (engine/resume.py).
    scan: the split to use instead of scanning cfg.data. deadline (time.perf_counter() value): no epoch
    is started that would end after it (the recipe search's budget). figures=False skips figures and
    the report, and leaves the run unannounced (the search's throwaway inner runs: prepare's `announce`).
    callbacks: engine/callbacks.Callback objects run before the default ones (checkpoints, early stopping,
    signals...)."""
    t_start = time.perf_counter()
    # Imported beside the feature extraction, where there is one (threads.start_prefetch): the epochs' scores
    # need scikit-learn's metrics, the end of the run matplotlib.
    prefetch_modules("transferkit.results.metrics", *(["transferkit.results.plots"] if figures else []))
    # The run's own copy of the config, with its folder named (under torchrun by rank 0, which alone holds it).
    cfg = replace(cfg, out=distributed.share_from_main(lambda: cfg.out or str(default_run_dir(cfg))))
    with claimed(Path(cfg.out)) if distributed.is_main() else nullcontext():
        state = prepare(cfg, resume, scan, announce=figures)
        return state.mode.train(state, t_start, resume=resume, deadline=deadline, figures=figures,
                                callbacks=callbacks)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


@torch.inference_mode()
def evaluate_source(source: BatchSource, criterion=None) -> dict:
    """Loss, accuracy, balanced accuracy, macro-F1 and per-sample probabilities on the val split."""
    source.set_eval_mode()
    probs, labels, indices, losses = [], [], [], []
    for x, y, idx in source.val_batches():
        signals.check_stop("evaluation")
        logits = source.forward(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none").cpu())
        probs.append(F.softmax(logits.float(), dim=1).cpu())
        labels.append(y.cpu())
        indices.append(idx.cpu())
    # Several ranks: every rank's predictions, padding dropped; one process: as is.
    p, y, idx, loss = distributed.gather_eval(*(torch.cat(t) for t in (probs, labels, indices, losses)))
    out = _summarize(p, y, float(loss.sum()) / max(len(y), 1) if criterion is not None else 0.0)
    return {**out, "indices": idx}


def _summarize(p: np.ndarray, y: np.ndarray, loss: float | None = None) -> dict:
    """Loss, accuracy, balanced accuracy and macro-F1 of probabilities p (N, C) against labels y."""
    from sklearn.metrics import f1_score  # ~0.5 s to import: not before it is used

    from ..results.metrics import balanced_accuracy

    pred = p.argmax(1)
    if loss is None:
        loss = _nll(p, y)
    return {
        "loss": loss,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=range(p.shape[1]), zero_division=0)),
        "probs": p, "labels": y,
    }


def _meta(state: RunState, epoch: int, row: dict) -> dict:
    return {
        "architecture": state.spec.name,
        "architecture_source": state.spec.source,  # "module:attribute" of a backbone from outside the zoo
        "classes": state.scan.classes,
        "preprocessing": state.pre.to_dict(),
        "mode": state.cfg.mode,
        "epoch": epoch,
        "val": {k: row[k] for k in ("val_loss", "val_acc", "val_balanced_accuracy", "val_macro_f1")},
        "config": state.cfg.to_dict(),
    }


def _write_history(state: RunState) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(state.history)
    atomic_write_text(state.out / "history.csv", buf.getvalue())


def _finish(state: RunState, source: BatchSource, best: dict, wall: float, figures: bool = True) -> dict:
    from ..results.metrics import accuracy_interval

    signals.check_stop("finishing the run")  # before metrics.json: `--resume` still finishes the run
    best_row = state.history[best["epoch"] - 1]
    metrics = {
        "model": state.spec.name,
        "mode": state.cfg.mode,
        "classes": state.scan.classes,
        "best_metric": state.cfg.best_metric,
        "best_epoch": best["epoch"],
        "best_val_acc": best_row["val_acc"],
        # 95% interval of that accuracy on this many val images: how much of a difference is noise
        "best_val_acc_interval": accuracy_interval(best_row["val_acc"], len(best["val"]["labels"])),
        # The best of several epochs by a val score is chosen on the images it is scored on: optimistic.
        "best_chosen_on_val": state.cfg.best_metric != "last" and len(state.history) > 1,
        "last_val_acc": state.history[-1]["val_acc"],
        "best_val_balanced_accuracy": best_row["val_balanced_accuracy"],
        "best_val_macro_f1": best_row["val_macro_f1"],
        "epochs_run": len(state.history),
        "wall_seconds": wall,
        "trainable_params": state.plan.count(),
        "total_params": state.plan.count(trainable_only=False),
        "trainable_groups": state.plan.trainable_groups(),
        "train_images": len(state.scan.train),
        "val_images": len(state.scan.val),
        "skipped_during_training": state.skipped_in_training,
        "source": source.describe(),
        "probe_head_init": state.probe_init,
        "precision": precisions.describe(state.cfg.precision, state.device),
        "environment": describe_environment(state.device),
        "run_dir": str(state.out),
        "history": state.history,
    }
    _write_novelty(state, source)
    atomic_write_json(state.out / "metrics.json", metrics)
    evaluation = _write_evaluation(state, source, best["val"])
    if figures:
        _write_figures(state, source, evaluation)
    return metrics


def _write_novelty(state: RunState, source: BatchSource) -> None:
    """RUN/novelty.safetensors from the cached head inputs (novelty.py); runs without them get none."""
    from ..novelty import NoveltyReference

    inputs = source.head_inputs()
    if inputs is None:
        log.debug("no novelty reference: it is made from cached head inputs (feature-extract runs)")
        return
    train, val = (t.float().numpy() for t in inputs)
    ref = NoveltyReference.calibrate(train, val, seed=state.cfg.seed)
    ref.save(state.out / NOVELTY_FILE)
    log.info("novelty threshold %.4f (%s)", ref.threshold, ref.info["threshold"])


def _write_figures(state: RunState, source: BatchSource, evaluation: dict) -> None:
    """Curves, confusion matrix, top losses, a grid of training images as training saw them (the seeds'
    imshow), the report."""
    from ..results import plots
    from ..results.report import write_report

    signals.check_stop("the figures", next_step=f"the run is saved; write its report with: transferkit report "
                                                f"{state.out}")
    if plots.has_curve(state.history):
        plots.plot_history(state.history, state.out / "curves.png")
    plots.plot_evaluation(evaluation, state.scan.classes, state.out)
    sample = _training_sample(state, source, 16)
    if sample is not None:
        images, labels = sample
        plots.plot_image_grid(images, [state.scan.classes[y] for y in labels], state.out / "batch_grid.png",
                              state.pre.mean, state.pre.std)
    write_report(state.out)


def _training_sample(state: RunState, source: BatchSource, n: int):
    """A seeded sample of training images, spread over the classes, as training saw them."""
    from ..data.images import load_rgb

    rng = random.Random(state.cfg.seed)
    items = rng.sample(state.scan.train, min(n, len(state.scan.train)))
    seen = _as_seen_in_training(state, source, rng)
    images, labels = [], []
    for path, label in items:
        try:
            images.append(seen(load_rgb(path, shorter_side=state.pre.resize_size,
                                        sixteen_bit_white=state.pre.sixteen_bit_white)))
            labels.append(label)
        except Exception:  # noqa: BLE001 - a sample picture is not worth failing the run
            continue
    return (torch.stack(images), labels) if images else None


def _as_seen_in_training(state: RunState, source: BatchSource, rng: random.Random):
    """Image -> tensor as the training batches held it: sources that cache features train on their cached
    views (the eval crop, its symmetries, or seeded augmentations: engine/features.View); the others on
    the train transform."""
    from ..data.transforms import dihedral

    if not isinstance(source, CachedFeatureSource):
        return train_transform(state.pre, state.cfg.augment)
    crop, augment = eval_transform(state.pre), train_transform(state.pre, "standard")

    def view(image):
        k = rng.randrange(state.cfg.views)  # each epoch picks one cached view per image
        if k and state.cfg.view_kind != "dihedral":
            return augment(image)
        return dihedral(crop(image), k)
    return view


def _write_evaluation(state: RunState, source: BatchSource, val: dict) -> dict:
    """The best epoch's validation predictions, summarised for reports (no extra forward pass), in the
    shape `evaluate` writes."""
    from ..results.metrics import evaluation_summary
    from ..run_folder import RunFolder

    run = RunFolder(state.out)
    paths = [source.val_items[i][0] for i in val["indices"]]
    skipped = sorted(set(range(len(source.val_items))) - {int(i) for i in val["indices"]})
    ev = evaluation_summary(val["labels"], val["probs"], state.scan.classes, paths=paths, split="val",
                            checkpoint=run.BEST, trained_on={"left_out": 0, "included": 0, "known": True},
                            skipped=[{"path": source.val_items[i][0], "error": "could not be read"} for i in skipped])
    ev["sixteen_bit_white"] = state.pre.sixteen_bit_white  # the figures' and the report's thumbnails read so
    atomic_write_json(run.evaluation, ev)
    return ev
