"""Interruptions and faults inside the training loop.

SIGINT/SIGTERM set a flag; the loop finishes the batch in progress, then stops with `Interrupted`.
The run's `last` checkpoint (written atomically at the end of every epoch) is what `--resume` continues
from, so an interruption loses at most the epoch in progress. A second Ctrl-C stops at once.
CUDA out-of-memory becomes a `TrainingError` that names the batch size and suggests a smaller one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager

import torch

from ..errors import TrainingError, TransferkitError

log = logging.getLogger(__name__)

# Test-only: seconds to sleep after every training batch, so tests can kill a run mid-epoch.
BATCH_DELAY_ENV = "TRANSFERKIT_TEST_BATCH_DELAY"

_requested: list[int] = []  # signal numbers received while a run is guarded


class Interrupted(TransferkitError):
    """The run was stopped by a signal; exit code 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    prefix = ""  # the CLI prints "transferkit: interrupted ...", not "error:"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _on_signal(signum, frame) -> None:
    if signum == signal.SIGINT and _requested:
        raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the batch
    _requested.append(signum)
    log.warning("%s received: stopping after the current batch", signal.Signals(signum).name)


@contextmanager
def stop_on_signals():
    """While training, turn SIGINT/SIGTERM into a stop request (main thread only: signal's rule)."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()


def after_batch(epoch: int, run_dir) -> None:
    """Called after each training batch: stop here if a signal asked for it."""
    delay = os.environ.get(BATCH_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    # Under torchrun every rank must stop after the same batch, or the others wait on a collective.
    from . import distributed

    if not distributed.all_true(not _requested):
        code = _requested[0] if _requested else 128 + signal.SIGTERM
        raise Interrupted(f"interrupted at epoch {epoch}; resume with: transferkit train --resume {run_dir}",
                          code)


@contextmanager
def oom_as_training_error(cfg, epoch: int, run_dir):
    """CUDA out of memory → one line naming the batch size that failed and one to try."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, cfg.batch_size // 2)
        hint = f"try --batch-size {smaller}" if cfg.batch_size > 1 else "try a smaller --image-size or model"
        raise TrainingError(
            f"out of GPU memory in epoch {epoch} with --batch-size {cfg.batch_size}; {hint} "
            f"(checkpoints so far are kept in {run_dir})"
        ) from None
