"""Interruptions and faults inside the training loop.

SIGINT/SIGTERM set a flag; every phase of a run (decoding, feature extraction, epochs, evaluation,
the report) checks it after each batch and stops with `Interrupted`; what was computed stays in the caches.
The run's `last` checkpoint (written atomically at the end of every epoch) is what `--resume` continues
from, so an interruption loses at most the epoch in progress. A second Ctrl-C stops at once.
CUDA out-of-memory becomes a `TrainingError` that names the batch size and suggests a smaller one;
BatchNorm's refusal of a one-image batch a `UsageError` that names what to change.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager

from ..errors import TrainingError, TransferkitError, UsageError

log = logging.getLogger(__name__)

# Test-only: seconds to sleep after every training and feature-extraction batch, so tests can stop a run
# in the middle of a phase.
BATCH_DELAY_ENV = "TRANSFERKIT_TEST_BATCH_DELAY"

_requested: list[int] = []  # signal numbers received while a run is guarded
# The run folder of the run being guarded, for the resume command (set by fit once the folder is named).
_run_dir: list[str] = []


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
    log.warning("%s received: stopping after the current batch (Ctrl-C again stops at once)",
                signal.Signals(signum).name)


@contextmanager
def stop_on_signals():
    """While training, turn SIGINT/SIGTERM into a stop request (main thread only: signal's rule)."""
    _requested.clear()
    _run_dir.clear()
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


def note_run_dir(run_dir) -> None:
    """The folder that `--resume` would continue, named in the message of a stop outside the epochs."""
    _run_dir[:] = [str(run_dir)]


def stop_requested(pause: bool = False) -> bool:
    """Whether a signal asked to stop; pause: after the test-only delay (feature extraction batches)."""
    if pause:
        _test_delay()
    return bool(_requested)


def check_stop(phase: str, next_step: str | None = None) -> None:
    """Called after each batch of decoding, feature extraction, evaluation and before the report: stop
    here if a signal asked for it (training batches use `after_batch`). next_step: what to tell the user
    instead of the resume command."""
    if _requested:
        if next_step is None:
            next_step = "what was computed is kept in the cache"
            if _run_dir:
                next_step += f"; resume with: {resume_command(_run_dir[0])}"
        raise Interrupted(f"interrupted during {phase}; {next_step}", _requested[0])


def resume_command(run_dir) -> str:
    """The command that continues RUN_DIR as it ran: with --nproc N under torchrun, where one process would
    train on a smaller global batch (batch size × processes) and end unlike the run it continues."""
    processes = int(os.environ.get("WORLD_SIZE") or 1)
    if processes == 1:
        return f"transferkit train --resume {run_dir}"
    if int(os.environ.get("LOCAL_WORLD_SIZE") or processes) == processes:  # one machine: what --nproc starts
        return f"transferkit train --resume {run_dir} --nproc {processes}"
    return f"transferkit train --resume {run_dir}, under the same torchrun command"


def resume_hint() -> str:
    """"; resume with: ..." where the run being guarded can be resumed (its `last` is written), else ""."""
    from ..run_folder import RunFolder

    if not _run_dir or not RunFolder(_run_dir[0]).last.is_file():
        return ""
    return f"; resume with: {resume_command(_run_dir[0])}"


def _test_delay() -> None:
    delay = os.environ.get(BATCH_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def after_batch(epoch: int, run_dir) -> None:
    """Called after each training batch: stop here if a signal asked for it."""
    _test_delay()
    # Under torchrun every rank must stop after the same batch, or the others wait on a collective.
    from . import distributed

    if not distributed.all_true(not _requested):
        code = _requested[0] if _requested else 128 + signal.SIGTERM
        raise Interrupted(f"interrupted at epoch {epoch}; resume with: {resume_command(run_dir)}",
                          code)


@contextmanager
def oom_as_training_error(cfg, epoch: int, run_dir):
    """CUDA out of memory → one line naming the batch size that failed and one to try."""
    import torch  # here, not above: the data scan checks for stops too, and needs no torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        smaller = max(1, cfg.batch_size // 2)
        hint = f"try --batch-size {smaller}" if cfg.batch_size > 1 else "try a smaller --image-size or model"
        raise TrainingError(
            f"out of GPU memory in epoch {epoch} with --batch-size {cfg.batch_size}; {hint} "
            f"(checkpoints so far are kept in {run_dir})"
        ) from None


@contextmanager
def lone_image_as_usage_error(cfg):
    """--batch-size 1 where BatchNorm trains and the network's top map is 1×1 (--image-size 32): every batch
    is one image, which BatchNorm cannot normalize (sources.drops_a_lone_image covers only an epoch's last
    batch) → one line naming what to change instead of torch's ValueError."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel when training" not in str(exc):
            raise
        raise UsageError(
            f"--batch-size {cfg.batch_size}: BatchNorm cannot train on a single image whose feature map is 1×1; "
            "use --batch-size 2 or more, --batchnorm frozen, or a larger --image-size") from None
