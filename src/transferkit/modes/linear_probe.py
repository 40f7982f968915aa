"""linear-probe: the frozen backbone's pooled multi-stage features and a logistic regression whose C is
chosen by 3-fold CV on train (engine/probe.py, engine/probe_train.py). One fit, no epochs, written as an
ordinary run: best.safetensors (a ProbeClassifier), history.csv (one row), metrics, evaluation, figures,
report."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch.nn as nn

from ..engine import distributed
from ..engine.checkpoint import save_checkpoint
from ..models.adapt import ParamPlan
from ..run_folder import RunFolder
from .base import Mode

log = logging.getLogger(__name__)

# Options only the modes that train in epochs read (a probe is one fit: nothing for a time budget to stop either).
EPOCH_OPTIONS = ("epochs", "lr", "optimizer", "momentum", "weight_decay", "scheduler", "step_size", "gamma",
                 "warmup_epochs", "lower_lr_factor", "patience", "label_smoothing", "augment", "views", "view_kind",
                 "head_init", "batchnorm", "unfreeze", "time_budget")


class LinearProbe(Mode):
    name = "linear-probe"
    unread_why = "one fit, its C chosen by CV"

    def unread_options(self) -> tuple[str, ...]:
        return EPOCH_OPTIONS

    def train(self, state, t_start: float, figures: bool = True, **ignored) -> dict:
        from ..engine.fit import _finish, _meta, _nll, _summarize, _write_history
        from ..engine.probe_train import train_linear_probe

        if state.cfg.tensorboard and figures:
            log.info("--tensorboard: a linear probe is one fit, with no epochs to log (its numbers are in "
                     "metrics.json and history.csv)")
        if state.cfg.balanced_sampler and figures:  # (--class-weights auto weighs its fit: probe.fit_logistic)
            log.warning("--balanced-sampler: the linear probe sees every image once, with no batches to draw (it "
                        "applies to the modes that train in epochs; --class-weights auto weighs the probe's fit)")
        t0 = time.perf_counter()
        result = train_linear_probe(state)
        (p_train, y_train), (p_val, y_val) = result["train"], result["val"]
        val = _summarize(p_val, y_val)
        row = {"epoch": 1, "train_loss": _nll(p_train, y_train),
               "train_acc": float((p_train.argmax(1) == y_train).mean()), "val_loss": val["loss"],
               "val_acc": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
               "val_macro_f1": val["macro_f1"], "lr": None, "seconds": time.perf_counter() - t0}
        state.history.append(row)
        state.model = result["model"]
        state.plan = _probe_plan(state.model)
        state.skipped_in_training = result["skipped"]
        if distributed.is_main():
            _write_history(state)
            save_checkpoint(RunFolder(state.out).best, state.model,
                            {**_meta(state, 1, row), "probe": result["meta"]})
        meta = result["meta"]
        head = f"an MLP head ({meta['hidden']} units)" if meta.get("hidden") else f"C={meta['C']:g}"
        log.info("linear probe: %d features, %s, views %s: train acc %.4f, val acc %.4f",
                 result["record"]["features"], head, meta["views"], row["train_acc"], row["val_acc"])
        best = {"epoch": 1, "val": {**val, "indices": np.arange(len(y_val))}}
        return _finish(state, _ProbeRecord(result), best, time.perf_counter() - t_start, figures)


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
