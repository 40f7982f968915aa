"""The epoch loop: a plain loop over epochs that keeps the best weights, as in the seed tutorials. What
trains, and on which batches, is the run's mode (modes/); what happens around the steps (checkpoints,
history, early stopping, the time budget, signals, non-finite loss, TensorBoard) is callbacks
(engine/callbacks.py). Per step the loop does what it always did: zero_grad, forward, loss, backward,
optimizer step, the weight average's update (--ema-epochs, engine/averaging.py), scheduler step, and the
callbacks that step hooks name (no others are called).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn as nn

from ..data.folders import file_sha256
from ..run_folder import RunFolder
from . import distributed
from .callbacks import HOOKS, Callback, Step, added_callbacks, default_callbacks
from .averaging import WeightAverage
from .fit import RunState, _finish, evaluate_source
from .optim import make_optimizer, make_schedule
from .probe import balanced_class_weights
from .progress import progress
from .resume import fresh_best, restore_last
from .signals import lone_image_as_usage_error, oom_as_training_error

log = logging.getLogger(__name__)


class Trainer:
    """One run's training: fit() prepares the mode's batch source, restores or starts the epochs, runs
    them and writes the run (fit.py's _finish). Callbacks: added ones (extra_callbacks), the given ones,
    the mode's, then the defaults."""

    def __init__(self, state: RunState, t_start: float, resume: bool = False, deadline: float | None = None,
                 figures: bool = True, callbacks=()):
        self.state, self.mode, self.t_start = state, state.mode, t_start
        self.resume, self.figures = resume, figures
        self.callbacks: list[Callback] = [*added_callbacks(), *callbacks, *self.mode.callbacks(),
                                          *default_callbacks(state.cfg, deadline)]
        # Per hook, only the callbacks that override it: a step pays for nothing it does not use.
        self._hooks = {name: [getattr(cb, name) for cb in self.callbacks
                              if getattr(type(cb), name) is not getattr(Callback, name)] for name in HOOKS}
        self.best = fresh_best()
        self.source = self.optimizer = self.schedule = self.criterion = self.averaging = None
        self.epoch, self.start_epoch, self.restored = 0, 1, False
        self.final, self.stop_reason = False, None

    def emit(self, hook: str, *args) -> None:
        for call in self._hooks[hook]:
            call(self, *args)

    def elapsed(self) -> float:
        """Seconds this run has trained, across resumes."""
        return time.perf_counter() - self.t_start

    def fit(self) -> dict:
        state, cfg = self.state, self.state.cfg
        log.info("params to learn: %s of %s, in groups %s", f"{state.plan.count():,}",
                 f"{state.plan.count(False):,}", ", ".join(state.plan.trainable_groups()))
        self.emit("on_fit_start")
        if not self.resume:
            state.probe_init = self.mode.before_training(state)
        self.source = self.mode.make_source(state)
        self.source.prepare()
        if distributed.leave_training_to_main(self.source):  # cached features: rank 0 alone trains the head
            return distributed.worker_result(state)
        scaled = distributed.scaled(cfg)
        self.optimizer = make_optimizer(self.mode.param_groups(state.plan, scaled.lr), scaled)
        self.schedule = make_schedule(self.optimizer, scaled, max(1, self.source.steps_per_epoch()))
        self.criterion = nn.CrossEntropyLoss(weight=_class_weights(state), label_smoothing=cfg.label_smoothing)
        if cfg.ema_epochs:
            self.averaging = WeightAverage(state.model, cfg.ema_epochs, max(1, self.source.steps_per_epoch()))
        self._start()
        self.emit("on_train_start")
        try:
            for epoch in range(self.start_epoch, cfg.epochs + 1):
                self._epoch(epoch)
                if self.stop_reason:
                    break
        except BaseException:  # a non-finite loss, out of memory, Ctrl-C: the callbacks keep what is whole
            self.emit("on_fit_abort")
            raise
        self.source.finish()
        state.model.load_state_dict(self.best["weights"])
        self.emit("on_fit_end")
        if not distributed.is_main():
            return distributed.worker_result(state)
        return _finish(state, self.source, self.best, self.elapsed(), self.figures)

    def _start(self) -> None:
        """First epoch and best so far: restored from `last` on a resume (every rank checks the split)."""
        state = self.state
        if distributed.is_main() or self.resume:  # rank 0 writes a new split's sha256 into `last`
            state.split_sha256 = file_sha256(RunFolder(state.out).split)
        if self.resume and RunFolder(state.out).last.is_file():
            self.start_epoch, self.best, state.elapsed_before = restore_last(state, self.optimizer, self.schedule,
                                                                             self.source, self.averaging)
            self.restored = True
        elif self.resume:  # no `last`: stopped before training began, or removed since
            log.info("--resume: %s has no %s (the run stopped before its first epoch); training from epoch 1",
                     state.out, RunFolder.LAST)
        self.t_start -= state.elapsed_before

    def _epoch(self, epoch: int) -> None:
        cfg = self.state.cfg
        self.epoch, self.final = epoch, epoch == cfg.epochs
        self.emit("on_epoch_start")  # the time budget may make this epoch the last
        t0 = time.perf_counter()
        with self._computing(epoch):
            train_loss, train_acc = self._train_phase(epoch)
        self.schedule.epoch_end()
        # --ema-epochs: the averaged weights are the ones evaluated, kept as the best and written.
        with self.averaging.applied() if self.averaging else nullcontext():
            with self._computing(epoch):
                # --best-metric last chooses nothing on val: it is scored once, after the last epoch.
                if self.final or cfg.best_metric != "last":
                    val = evaluate_source(self.source, self.criterion)
                else:
                    val = dict.fromkeys(("loss", "accuracy", "balanced_accuracy", "macro_f1"))
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val["loss"], "val_acc": val["accuracy"],
                   "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
                   # the top group's (the head's: --lr as scheduled); lower groups run at --lower-lr-factor powers
                   # of it. The last group's, recorded before, showed a finetune at factor 0.5 as 1.95e-06 for 0.001.
                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            self.emit("on_epoch_end", row, val)  # history, checkpoints, the epoch's line, early stopping

    @contextmanager
    def _computing(self, epoch: int):
        """Around the epoch's training and its evaluation: out of memory and BatchNorm's one-image refusal as
        one-line errors, the source's compute threads."""
        cfg = self.state.cfg
        with oom_as_training_error(cfg, epoch, self.state.out), lone_image_as_usage_error(cfg), \
                self.source.compute_threads():
            yield

    def _train_phase(self, epoch: int) -> tuple[float, float]:
        source, optimizer, schedule, criterion = self.source, self.optimizer, self.schedule, self.criterion
        on_loss, on_batch_end = self._hooks["on_loss"], self._hooks["on_batch_end"]
        source.set_train_mode()
        total_loss, correct, seen = 0.0, 0, 0
        for batch_idx, (x, y) in enumerate(progress(source.train_batches(epoch), desc=f"epoch {epoch} train",
                                                    total=source.steps_per_epoch())):
            optimizer.zero_grad(set_to_none=True)
            logits, loss = _loss(source.forward(x), y, criterion, self.state.spec)
            step = Step(epoch, batch_idx + 1, loss, logits, y)
            for call in on_loss:
                call(self, step)
            step.loss.backward()
            optimizer.step()
            if self.averaging:
                self.averaging.update()
            schedule.batch_end()
            total_loss += step.loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            for call in on_batch_end:
                call(self, step)
        self.state.skipped_in_training += source.take_skipped()
        total_loss, correct, seen = distributed.sum_across(total_loss, correct, seen)
        return total_loss / max(seen, 1), correct / max(seen, 1)


def _loss(output, y, criterion, spec):
    # inception_v3 in training mode returns (logits, aux_logits): the seed's loss1 + 0.4 * loss2.
    if isinstance(output, tuple):
        logits, aux = output[0], output[1]
        return logits, criterion(logits, y) + spec.aux_loss_weight * criterion(aux, y)
    return output, criterion(output, y)


def _class_weights(state) -> torch.Tensor | None:
    if not state.cfg.balanced_classes:
        return None
    labels = np.array([label for _, label in state.scan.train])
    return torch.from_numpy(balanced_class_weights(labels, len(state.scan.classes))).to(state.device)
