"""The `last` checkpoint: everything a killed run needs to continue exactly where its last epoch ended.

One safetensors file, written atomically at the start of training, after the last epoch and between them as
often as engine/callbacks.py's Checkpoints finds worth its cost (every epoch of images): the model's
tensors under their own names (so `load_checkpoint` reads it like `best`), plus optimizer state,
RNG states and the best epoch's validation outputs as tensors, and the rest (scheduler, history,
best score, freeze phase, the split manifest's sha256) as JSON in the header. Nothing is pickled.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..run_folder import RunFolder
from . import distributed
from .checkpoint import RESUME_PREFIX, read_meta, save_checkpoint

log = logging.getLogger(__name__)


def fresh_best() -> dict:
    return {"score": None, "epoch": 0, "weights": None, "val": None}


def save_last(state, meta: dict, optimizer, schedule, best: dict, source, elapsed: float,
              averaging=None) -> None:
    """Write RUN/last.safetensors for the epoch in meta['epoch'] (0 = before the first epoch). With
    --ema-epochs the model's tensors are the averaged weights after an epoch (the training ones before the
    first); the training weights are stored beside them."""
    tensors, optim_json = _flatten_optimizer(optimizer.state_dict())
    tensors.update(_rng_tensors(source))
    if averaging is not None:
        tensors.update({f"averaging.training.{i}": t.detach().cpu().contiguous()
                        for i, t in enumerate(averaging.training())})
    for key, value in (best["val"] or {}).items():
        if hasattr(value, "shape"):  # per-sample arrays (probs, labels, indices) of the best epoch
            tensors[f"best.val.{key}"] = torch.as_tensor(np.ascontiguousarray(value))
    resume = {
        "optimizer": optim_json,
        "scheduler": schedule.state_dict(),
        "history": state.history,
        "best": {"score": best["score"], "epoch": best["epoch"],
                 "val": {k: v for k, v in (best["val"] or {}).items() if not hasattr(v, "shape")}},
        "rng": {"python": random.getstate(), "numpy": list(np.random.get_state()[2:])},
        "freeze": _freeze_phase(state),
        "split_sha256": state.split_sha256,
        "skipped_in_training": state.skipped_in_training,
        "elapsed_seconds": elapsed,
        "averaging_steps": averaging.steps if averaging is not None else None,
    }
    save_checkpoint(RunFolder(state.out).last, state.model, {**meta, "resume": resume},
                    extra={RESUME_PREFIX + k: v for k, v in tensors.items()})


def restore_last(state, optimizer, schedule, source, averaging=None) -> tuple[int, dict, float]:
    """Load RUN/last.safetensors into the live objects; return (next epoch, best, elapsed seconds)."""
    path = RunFolder(state.out).last
    try:
        meta = read_meta(path)
    except CheckpointError as exc:  # say how to go on: a run without `last` resumes from epoch 1
        raise CheckpointError(f"--resume: {exc}; remove it to train the run again from epoch 1 with --resume") from None
    resume = meta.get("resume")
    if not isinstance(resume, dict):
        raise CheckpointError(f"{path} holds no resume state (it was not written by a resumable run)")
    _check_same_run(state, resume, path)
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    extra = {k[len(RESUME_PREFIX):]: v for k, v in stored.items() if k.startswith(RESUME_PREFIX)}
    model_state = {k: v for k, v in stored.items() if not k.startswith(RESUME_PREFIX)}
    try:
        state.model.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(resume["optimizer"], extra))
        schedule.load_state_dict(resume["scheduler"])
        if averaging is not None:
            _restore_averaging(averaging, resume, extra)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not match this run's model or optimizer: "
                              f"{str(exc).splitlines()[0]}") from None
    state.history = list(resume["history"])
    state.skipped_in_training = int(resume.get("skipped_in_training", 0))
    best = _restore_best(state, resume["best"], extra)
    _restore_rng(resume["rng"], extra, source)
    epoch = int(meta["epoch"])
    if epoch:
        source.take_skipped()  # files skipped while preparing were counted before the interruption
    log.info("resuming %s after epoch %d of %d", state.out, epoch, state.cfg.epochs)
    _drop_stale_export(RunFolder(state.out))
    patience = state.cfg.patience
    stopped = bool(patience and epoch - best["epoch"] >= patience)  # killed right after early stopping
    return (state.cfg.epochs + 1 if stopped else epoch + 1), best, float(resume.get("elapsed_seconds", 0.0))


def _drop_stale_export(run: RunFolder) -> None:
    """RUN/export of an interrupted run holds its best checkpoint so far, which the resumed run goes on to replace;
    left there, it passed for the finished run's model (`predict RUN --engine onnx`, `serve`, a copied model.onnx),
    as `--overwrite` removes it for the same reason."""
    if distributed.is_main() and run.export_dir.is_dir():
        shutil.rmtree(run.export_dir, ignore_errors=True)
        log.warning("removed %s, exported before this resume: export the finished run again", run.export_dir)


def _restore_averaging(averaging, resume: dict, extra: dict) -> None:
    training = [extra.get(f"averaging.training.{i}") for i in range(len(averaging.tensors))]
    if resume.get("averaging_steps") is None or any(t is None for t in training):
        raise KeyError("the weight average (--ema-epochs) is not in it")
    averaging.restore(training, int(resume["averaging_steps"]))


def _check_same_run(state, resume: dict, path: Path) -> None:
    split = RunFolder(state.out).split
    if resume.get("split_sha256") != state.split_sha256:
        raise CheckpointError(f"{split} changed since {path} was written; refusing to resume on another split")
    if resume.get("freeze") != _freeze_phase(state):
        raise CheckpointError(f"{path} was written in freeze phase {resume.get('freeze')}, "
                              f"this run is in {_freeze_phase(state)}; refusing to resume")


def _freeze_phase(state) -> dict:
    return {"mode": state.cfg.mode, "unfreeze": state.cfg.unfreeze,
            "trainable_groups": state.plan.trainable_groups()}


def _restore_best(state, saved: dict, extra: dict) -> dict:
    best = fresh_best()
    best.update(score=saved["score"], epoch=int(saved["epoch"]))
    if not best["epoch"]:
        return best
    best_path = RunFolder(state.out).best
    try:
        on_disk = read_meta(best_path).get("epoch")
    except CheckpointError:  # its own words ("pass a run folder") misled here, where the run folder was given
        raise CheckpointError(f"--resume: {best_path}, the run's best epoch so far (epoch {best['epoch']}), is missing "
                              "or damaged, so the run cannot end as it would have; train it again with --overwrite"
                              ) from None
    if on_disk != best["epoch"]:
        # Written after `last` (killed between the two writes, or kept when an error or a signal stopped the
        # run): a better epoch than the recorded one, which the resumed epochs redo (on CPU they find it again
        # and rewrite it). Its weights stand in for the recorded best's, which it replaced.
        log.info("%s is from epoch %s, after the last checkpoint; the resumed epochs redo it", best_path, on_disk)
    best["weights"] = load_file(str(best_path), device=str(state.device))
    arrays = {k[len("best.val."):]: v.numpy() for k, v in extra.items() if k.startswith("best.val.")}
    best["val"] = {**saved.get("val", {}), **arrays}
    return best


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """Tensors to `optim.state.<i>.<name>`; numbers, None and param groups stay JSON."""
    tensors, plain = {}, {}
    for index, entry in sd["state"].items():
        plain[str(index)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[str(index)][name] = value
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(saved: dict, extra: dict) -> dict:
    state = {int(i): dict(values) for i, values in saved["state"].items()}
    for key, value in extra.items():
        if key.startswith("optim.state."):
            index, name = key[len("optim.state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _rng_tensors(source) -> dict:
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    generator = getattr(source, "generator", None)
    if generator is not None:  # re-seeded per epoch; kept so the state is complete
        tensors["rng.loader"] = generator.get_state()
    return tensors


def _restore_rng(saved: dict, extra: dict, source) -> None:
    torch.set_rng_state(extra["rng.torch"])
    keys = extra["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, *saved["numpy"]))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    generator = getattr(source, "generator", None)
    if generator is not None and "rng.loader" in extra:
        generator.set_state(extra["rng.loader"])
