"""The train/val loop: a plain loop over epochs that keeps the best weights, as in the seed tutorials,
fed either by cached features (feature-extract: only the head runs per epoch) or by image batches."""

from __future__ import annotations

import copy
import csv
import io
import logging
import random
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.folders import (IMBALANCE_WARN_RATIO, DataScan, file_sha256, read_manifest, scan_dataset,
                            write_manifest)
from ..data.transforms import eval_transform, train_transform
from ..errors import TrainingError, UsageError
from ..io import atomic_write_json, atomic_write_text
from ..models.adapt import ParamPlan, apply_freeze, build_model, set_train_mode
from ..models.registry import BackboneSpec, get_spec
from ..preprocessing import Preprocessing
from ..novelty import FILE as NOVELTY_FILE
from . import distributed
from . import precision as precisions
from . import tensorboard
from .checkpoint import save_checkpoint
from .environment import describe_environment, pick_device
from .optim import make_optimizer, make_schedule
from .progress import progress
from .resume import LAST, fresh_best, restore_last, save_last
from . import signals
from .signals import after_batch, oom_as_training_error
from .sources import BatchSource, CachedFeatureSource, ImageBatchSource

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
    return Path("runs") / f"{stamp}-{cfg.model}-{cfg.mode}"


def prepare(cfg: TrainConfig, resume: bool = False, scan: DataScan | None = None) -> RunState:
    """Validate, scan (or take the given split), write the run's config and split, build the model.
    `scan`: a split made by the caller (the recipe search's inner hold-out)."""
    cfg.validate()
    if cfg.out and not resume:
        refuse_to_overwrite(Path(cfg.out), cfg.overwrite)
    set_seed(cfg.seed)
    spec = get_spec(cfg.model)
    pre = spec.preprocessing.at_size(cfg.image_size, cfg.crop_fraction)
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
    if scan.imbalance_ratio() > IMBALANCE_WARN_RATIO and cfg.best_metric == "accuracy":
        log.warning("accuracy flatters the large classes: consider --best-metric balanced_accuracy "
                    "(and --class-weights auto or --balanced-sampler)")
    out = Path(distributed.share_from_main(lambda: cfg.out or str(default_run_dir(cfg))))
    cfg = replace(cfg, out=str(out))  # the run's own copy: the caller's config is not changed
    model = build_model(spec, len(scan.classes), pretrained=cfg.pretrained, weights_path=cfg.weights)
    plan = apply_freeze(model, spec, cfg.mode, cfg.unfreeze)
    # Only now, with every option checked, does the run folder get its first files.
    if distributed.is_main() and not resume:
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
        write_manifest(scan, out / "split.csv")
        scan.write_report(out / "data_report.json")
    signals.note_run_dir(out)
    log.info("run folder: %s", out)
    if cfg.mode != "linear-probe":  # a probe's head is sized by its features: the run says so when fitted
        log.info("params to learn: %s of %s, in groups %s", f"{plan.count():,}", f"{plan.count(False):,}",
                 ", ".join(plan.trainable_groups()))
    model.to(device)
    if device.type == "cpu" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return RunState(cfg, spec, pre, scan, model, plan, device, out)


def refuse_to_overwrite(out: Path, overwrite: bool) -> None:
    """A run folder that holds a run (finished, or resumable) is replaced only when asked to."""
    finished, started = (out / "metrics.json").is_file(), (out / "last.safetensors").is_file()
    if not (finished or started):
        return
    if not overwrite:
        if finished:
            raise UsageError(f"--out {out} holds a finished run; pass --overwrite to replace it, "
                             "or choose another --out")
        raise UsageError(f"--out {out} holds an interrupted run; continue it with `transferkit train --resume "
                         f"{out}`, or pass --overwrite to replace it")
    log.warning("replacing the run in %s (--overwrite)", out)
    if distributed.is_main():  # until the new run finishes, the folder must not look finished
        for name in ("metrics.json", "last.safetensors", "last.json", NOVELTY_FILE):
            (out / name).unlink(missing_ok=True)


def make_source(state: RunState) -> BatchSource:
    if state.cfg.mode == "feature-extract" and state.cfg.cache:
        return CachedFeatureSource(state)
    from .activations import CachedActivationSource, supports_cached_activations

    if supports_cached_activations(state):
        return CachedActivationSource(state)
    return ImageBatchSource(state, train_transform(state.pre, state.cfg.augment), eval_transform(state.pre))


@distributed.session
def fit(cfg: TrainConfig, resume: bool = False, scan: DataScan | None = None, deadline: float | None = None,
        figures: bool = True) -> dict:
    """Train as configured; write the run folder; return metrics.json's content.
    resume=True continues the run in cfg.out from its `last` checkpoint (engine/resume.py).
    scan: the split to use instead of scanning cfg.data. deadline (time.perf_counter() value): no epoch
    is started that would end after it (the recipe search's budget). figures=False skips figures and
    the report (the search's inner runs)."""
    t_start = time.perf_counter()
    state = prepare(cfg, resume, scan)
    if cfg.mode == "linear-probe":
        return _linear_probe_run(state, t_start, figures)
    if cfg.head_init == "probe" and not resume:
        from .probe_train import init_head_from_probe

        state.probe_init = init_head_from_probe(state)
    source = make_source(state)
    source.prepare()
    if distributed.leave_training_to_main(source):  # cached features: rank 0 alone trains the head
        return distributed.worker_result(state)
    optimizer = make_optimizer(state.plan, distributed.scaled(cfg))
    schedule = make_schedule(optimizer, distributed.scaled(cfg), max(1, source.steps_per_epoch()))
    criterion = nn.CrossEntropyLoss(weight=_class_weights(state), label_smoothing=cfg.label_smoothing)
    start, best = _start(state, optimizer, schedule, source, resume)
    t_start -= state.elapsed_before
    for epoch in range(start, cfg.epochs + 1):
        final = epoch == cfg.epochs or _last_before(deadline, state.history)
        with oom_as_training_error(cfg, epoch, state.out), source.compute_threads():
            row, val_out = _run_epoch(state, source, optimizer, schedule, criterion, epoch,
                                      with_val=final or cfg.best_metric != "last")
        state.history.append(row)
        main = distributed.is_main()  # only rank 0 writes run files
        if main:
            _write_history(state)
            if cfg.tensorboard:
                tensorboard.log_epoch(state.out, row)
        score = _score(row, cfg.best_metric)
        if best["score"] is None or score > best["score"]:
            best.update(score=score, epoch=epoch, val=val_out,
                        weights=copy.deepcopy(state.model.state_dict()))
            if main:
                save_checkpoint(state.out / "best.safetensors", state.model, _meta(state, epoch, row))
        if main:
            save_last(state, _meta(state, epoch, row), optimizer, schedule, best, source,
                      time.perf_counter() - t_start)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %s acc %s  (%.1fs)", epoch, cfg.epochs,
                 row["train_loss"], row["train_acc"], _fmt(row["val_loss"]), _fmt(row["val_acc"]), row["seconds"])
        if distributed.main_decides(cfg.patience and epoch - best["epoch"] >= cfg.patience):
            log.info("early stopping: no improvement in %s for %d epochs", cfg.best_metric, cfg.patience)
            break
        if final and epoch < cfg.epochs:
            log.info("stopping after epoch %d: another epoch would end past the time budget", epoch)
            break
    source.finish()
    state.model.load_state_dict(best["weights"])
    if not distributed.is_main():
        return distributed.worker_result(state)
    return _finish(state, source, best, time.perf_counter() - t_start)


def _linear_probe_run(state: RunState, t_start: float, figures: bool) -> dict:
    """--mode linear-probe: one fit of the probe (engine/probe_train.py), written as an ordinary run:
    best.safetensors (a ProbeClassifier), history.csv (one row), metrics, evaluation, figures, report."""
    from .probe_train import train_linear_probe

    t0 = time.perf_counter()
    result = train_linear_probe(state)
    (p_train, y_train), (p_val, y_val) = result["train"], result["val"]
    val = _summarize(p_val, y_val)
    row = {"epoch": 1, "train_loss": _nll(p_train, y_train), "train_acc": float((p_train.argmax(1) == y_train).mean()),
           "val_loss": val["loss"], "val_acc": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
           "val_macro_f1": val["macro_f1"], "lr": None, "seconds": time.perf_counter() - t0}
    state.history.append(row)
    state.model = result["model"]
    state.plan = _probe_plan(state.model)
    state.skipped_in_training = result["skipped"]
    if distributed.is_main():
        _write_history(state)
        meta = {**_meta(state, 1, row), "probe": result["meta"]}
        save_checkpoint(state.out / "best.safetensors", state.model, meta)
    log.info("linear probe: %d features, C=%g, views %s: train acc %.4f, val acc %.4f", result["record"]["features"],
             result["meta"]["C"], result["meta"]["views"], row["train_acc"], row["val_acc"])
    best = {"epoch": 1, "val": {**val, "indices": np.arange(len(y_val))}}
    source = _ProbeRecord(result)
    return _finish(state, source, best, time.perf_counter() - t_start, figures)


def _probe_plan(probe: nn.Module) -> ParamPlan:
    """The probe's parameters for metrics and the summary: the frozen backbone, and the head that was fitted."""
    head = list(probe.head.named_parameters(prefix="head"))
    backbone = [(n, p.requires_grad_(False)) for n, p in probe.named_parameters() if not n.startswith("head.")]
    return ParamPlan(["backbone", "head"], [backbone, head])


class _ProbeRecord:
    """What _finish asks of a batch source, for a probe run."""

    def __init__(self, result: dict):
        self.val_items, self.record = result["val_items"], result["record"]
        self._head_inputs = result["head_inputs"]

    def describe(self) -> dict:
        return {"kind": "linear-probe", **self.record}

    def head_inputs(self):
        """The probe head's inputs (standardized pooled features of each image itself), train and val: the
        novelty reference (novelty.py), as the predictor sees them through a hook on the head."""
        return self._head_inputs


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def _start(state: RunState, optimizer, schedule, source, resume: bool) -> tuple[int, dict]:
    """First epoch to run and the best so far: restored from `last`, or fresh with an epoch-0 `last`
    (so a run killed during its first epoch can resume too)."""
    if distributed.is_main() or resume:  # every rank checks a resumed split; rank 0 writes a new one
        state.split_sha256 = file_sha256(state.out / "split.csv")
    if resume and (state.out / LAST).is_file():  # no `last`: stopped before training began, start afresh
        start, best, state.elapsed_before = restore_last(state, optimizer, schedule, source)
        return start, best
    best = fresh_best()
    if distributed.is_main():
        save_last(state, _meta(state, 0, dict.fromkeys(HISTORY_FIELDS)), optimizer, schedule, best, source, 0.0)
    return 1, best


def _last_before(deadline: float | None, history: list[dict]) -> bool:
    """Whether the coming epoch must be the last: one more after it would end past the deadline
    (epochs are assumed to take as long as the slowest so far)."""
    if deadline is None or not history:
        return False
    return time.perf_counter() + 2 * max(row["seconds"] for row in history) > deadline


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _run_epoch(state, source, optimizer, schedule, criterion, epoch, with_val: bool = True):
    t0 = time.perf_counter()
    train_loss, train_acc = _train_phase(state, source, optimizer, schedule, criterion, epoch)
    # --best-metric last chooses nothing on val: it is scored once, after the last epoch.
    val = evaluate_source(source, criterion) if with_val else dict.fromkeys(
        ("loss", "accuracy", "balanced_accuracy", "macro_f1"))
    schedule.epoch_end()
    row = {
        "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
        "val_loss": val["loss"], "val_acc": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
        "lr": optimizer.param_groups[-1]["lr"], "seconds": time.perf_counter() - t0,
    }
    return row, val


def _train_phase(state, source, optimizer, schedule, criterion, epoch):
    source.set_train_mode()
    total_loss, correct, seen = 0.0, 0, 0
    for batch_idx, (x, y) in enumerate(progress(source.train_batches(epoch), desc=f"epoch {epoch} train",
                                                total=source.steps_per_epoch())):
        optimizer.zero_grad(set_to_none=True)
        logits, loss = _loss(source.forward(x), y, criterion, state.spec)
        if not distributed.all_true(bool(torch.isfinite(loss))):  # one rank's nan stops every rank
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch}, batch {batch_idx + 1}; try a lower --lr "
                f"(now {state.cfg.lr}); checkpoints of finished epochs are kept in {state.out}"
            )
        loss.backward()
        optimizer.step()
        schedule.batch_end()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        after_batch(epoch, state.out)  # SIGINT/SIGTERM stop here, between batches
    state.skipped_in_training += source.take_skipped()
    total_loss, correct, seen = distributed.sum_across(total_loss, correct, seen)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _loss(output, y, criterion, spec: BackboneSpec):
    # inception_v3 in training mode returns (logits, aux_logits): the seed's loss1 + 0.4 * loss2.
    if isinstance(output, tuple):
        logits, aux = output[0], output[1]
        return logits, criterion(logits, y) + spec.aux_loss_weight * criterion(aux, y)
    return output, criterion(output, y)


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
    from sklearn.metrics import balanced_accuracy_score, f1_score  # ~0.5 s to import: not before it is used

    pred = p.argmax(1)
    if loss is None:
        loss = _nll(p, y)
    return {
        "loss": loss,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=range(p.shape[1]), zero_division=0)),
        "probs": p, "labels": y,
    }


def _score(row: dict, metric: str) -> float:
    if metric == "last":
        return row["epoch"]
    if metric == "loss":
        return -row["val_loss"]
    return row["val_acc"] if metric == "accuracy" else row[f"val_{metric}"]


def _class_weights(state: RunState) -> torch.Tensor | None:
    if state.cfg.class_weights != "auto":
        return None
    counts = np.bincount([label for _, label in state.scan.train], minlength=len(state.scan.classes))
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=state.device)


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
    signals.check_stop("finishing the run")  # before metrics.json: `--resume` still finishes the run
    best_row = state.history[best["epoch"] - 1]
    metrics = {
        "model": state.spec.name,
        "mode": state.cfg.mode,
        "classes": state.scan.classes,
        "best_metric": state.cfg.best_metric,
        "best_epoch": best["epoch"],
        "best_val_acc": best_row["val_acc"],
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
            images.append(seen(load_rgb(path)))
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
    atomic_write_json(run.evaluation, ev)
    return ev
