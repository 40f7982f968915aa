"""What the training loop does around its steps, as callbacks (engine/trainer.py calls them): the run's
history, TensorBoard, best and last checkpoints, early stopping, the time budget, non-finite loss and
signals. A Trainer gets these defaults; callers add theirs with `fit(..., callbacks=[...])` or, for runs
started elsewhere (the CLI), inside `with extra_callbacks(...)`. Added callbacks run first, so a test can
change a step's loss before the non-finite check sees it, or ask for a stop before the signal check.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from ..run_folder import RunFolder
from . import distributed, tensorboard
from .checkpoint import save_checkpoint
from .resume import save_last
from .signals import after_batch

log = logging.getLogger(__name__)

CHECKPOINT_SHARE = 0.1  # most of the training time that writing checkpoints may take (Checkpoints)

HOOKS = ("on_fit_start", "on_train_start", "on_epoch_start", "on_loss", "on_batch_end", "on_epoch_end",
         "on_fit_end", "on_fit_abort")


@dataclass
class Step:
    """One training batch, as the per-step hooks see it. on_loss may replace `loss` (before backward)."""

    epoch: int
    batch: int  # 1-based within the epoch
    loss: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor


class Callback:
    """Override the hooks you need; each gets the Trainer (state, source, optimizer, schedule, best, epoch).
    on_fit_start runs before the batch source prepares (decoding, feature extraction); on_train_start
    once the optimizer exists; set `trainer.stop_reason` to end the run after the current epoch."""

    def on_fit_start(self, trainer) -> None: ...
    def on_train_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer) -> None: ...
    def on_loss(self, trainer, step: Step) -> None: ...
    def on_batch_end(self, trainer, step: Step) -> None: ...
    def on_epoch_end(self, trainer, row: dict, val: dict) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def on_fit_abort(self, trainer) -> None: ...  # an error or a signal stopped the epochs; it is raised after


_added: list[Callback] = []


@contextmanager
def extra_callbacks(*callbacks: Callback):
    """Every Trainer started inside this block also runs `callbacks` (first): how tests inject faults into
    a run the CLI starts."""
    _added.extend(callbacks)
    try:
        yield
    finally:
        del _added[-len(callbacks):]


def added_callbacks() -> list[Callback]:
    return list(_added)


def default_callbacks(cfg, deadline: float | None) -> list[Callback]:
    callbacks = [NonFiniteLoss(), SignalStop(), History()]
    if cfg.tensorboard:
        callbacks.append(TensorBoard())
    # Checkpoints last: it writes after the run's last epoch, which early stopping or the deadline may make it.
    callbacks += [BestEpoch(), EpochLog(), EarlyStopping(), Deadline(deadline), Checkpoints()]
    return callbacks


class NonFiniteLoss(Callback):
    """A nan/inf loss stops the run with the epoch and batch, before it reaches the weights."""

    def on_loss(self, trainer, step: Step) -> None:
        if not distributed.all_true(bool(torch.isfinite(step.loss))):  # one rank's nan stops every rank
            raise TrainingError(
                f"loss became {step.loss.item()} at epoch {step.epoch}, batch {step.batch}; try a lower --lr "
                f"(now {trainer.state.cfg.lr}); the last checkpoint is kept in {trainer.state.out}")


class SignalStop(Callback):
    """SIGINT/SIGTERM stop the run between batches (engine/signals.py)."""

    def on_batch_end(self, trainer, step: Step) -> None:
        after_batch(step.epoch, trainer.state.out)


class History(Callback):
    """Each epoch's row in state.history and RUN/history.csv."""

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        from .fit import _write_history

        trainer.state.history.append(row)
        if distributed.is_main():  # only rank 0 writes run files
            _write_history(trainer.state)


class TensorBoard(Callback):
    """--tensorboard: each epoch's row as scalars in RUN/tensorboard."""

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        if distributed.is_main():
            tensorboard.log_epoch(trainer.state.out, row)


class BestEpoch(Callback):
    """The best epoch by --best-metric: its score, weights and validation outputs, in memory (restored at
    the end of training; written to RUN/best.safetensors by Checkpoints)."""

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        best, state = trainer.best, trainer.state
        score = _score(row, state.cfg.best_metric)
        if best["score"] is None or score > best["score"]:
            best.update(score=score, epoch=row["epoch"], val=val, weights=copy.deepcopy(state.model.state_dict()))


class Checkpoints(Callback):
    """RUN/last.safetensors before the first epoch (a run killed in it can resume) and after the run's last
    epoch; between them, after an epoch whenever the training since the last write took at least
    1/CHECKPOINT_SHARE times as long as that write. RUN/best.safetensors is written with it, where a better
    epoch came since. Epochs of images are all written (a lite0 epoch takes seconds, its 13.7 MB 20-50 ms);
    epochs on cached features take milliseconds, and writing each of them made most of a short run's time
    (vgg16's 528 MB: seconds per epoch), so they are written every few seconds of training instead: a killed
    run loses at most that, and writing costs at most about CHECKPOINT_SHARE of the training it keeps."""

    def __init__(self):
        self.written_at = 0.0
        self.write_seconds = 0.0
        self.best_epoch_on_disk = 0

    def on_train_start(self, trainer) -> None:
        from .fit import HISTORY_FIELDS

        self.best_epoch_on_disk = trainer.best["epoch"]  # a resumed run's best file is already written
        self.written_at = time.perf_counter()  # training starts now (a resumed run's set-up is not training)
        if trainer.start_epoch == 1 and not trainer.restored:
            self._save(trainer, 0, dict.fromkeys(HISTORY_FIELDS))

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        training = time.perf_counter() - self.written_at
        if trainer.final or trainer.stop_reason or training * CHECKPOINT_SHARE >= self.write_seconds:
            self._save(trainer, row["epoch"], row)

    def on_fit_abort(self, trainer) -> None:
        # The weights are mid-epoch (no `last` to write for them), but the best epoch's are whole: keep them.
        try:
            self._save_best(trainer)
        except Exception as exc:  # noqa: BLE001 - the error that stopped the run is the one to report
            log.warning("the best epoch's weights could not be written: %s", exc)

    def _save(self, trainer, epoch: int, row: dict) -> None:
        from .fit import _meta

        t = time.perf_counter()
        self._save_best(trainer)  # first: `last` names the best epoch on disk
        if distributed.is_main():
            save_last(trainer.state, _meta(trainer.state, epoch, row), trainer.optimizer, trainer.schedule,
                      trainer.best, trainer.source, trainer.elapsed(), trainer.averaging)
        self.written_at = time.perf_counter()
        self.write_seconds = self.written_at - t

    def _save_best(self, trainer) -> None:
        from .fit import _meta

        best, state = trainer.best, trainer.state
        if best["epoch"] > self.best_epoch_on_disk and distributed.is_main():
            row = state.history[best["epoch"] - 1]  # History keeps every epoch's row
            save_checkpoint(RunFolder(state.out).best, best["weights"], _meta(state, best["epoch"], row))
        self.best_epoch_on_disk = best["epoch"]


class EpochLog(Callback):
    """One line per epoch."""

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        log.info("epoch %d/%d  train loss %.4f acc %.4f  %s loss %s acc %s  (%.1fs)", row["epoch"],
                 trainer.state.cfg.epochs, row["train_loss"], row["train_acc"], trainer.state.scan.val_name,
                 _fmt(row["val_loss"]), _fmt(row["val_acc"]), row["seconds"])


class EarlyStopping(Callback):
    """--patience: stop after that many epochs without a better --best-metric."""

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        cfg = trainer.state.cfg
        if distributed.main_decides(cfg.patience and row["epoch"] - trainer.best["epoch"] >= cfg.patience):
            log.info("early stopping: no improvement in %s for %d epochs", cfg.best_metric, cfg.patience)
            trainer.stop_reason = "early stopping"


class Deadline(Callback):
    """The run's time budget (the recipe search's, or --time-budget given with --recipe tutorial): no epoch is
    started that would end after `deadline` (a perf_counter value); epochs are assumed to take as long as the
    slowest so far. The last one is scored on val."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def on_epoch_start(self, trainer) -> None:
        history = trainer.state.history
        if self.deadline is not None and history:
            # rank 0's clock decides for every rank (a --time-budget run under torchrun): a rank that stopped
            # alone would leave the others waiting in the next epoch's collectives
            late = time.perf_counter() + 2 * max(row["seconds"] for row in history) > self.deadline
            if distributed.main_decides(late):
                trainer.final = True

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        if trainer.final and row["epoch"] < trainer.state.cfg.epochs and not trainer.stop_reason:
            log.info("stopping after epoch %d: another epoch would end past the time budget", row["epoch"])
            trainer.stop_reason = "time budget"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _score(row: dict, metric: str) -> float:
    if metric == "last":
        return row["epoch"]
    if metric == "loss":
        return -row["val_loss"]
    return row["val_acc"] if metric == "accuracy" else row[f"val_{metric}"]
