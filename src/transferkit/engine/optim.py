"""Optimizers with per-group learning rates, and the schedulers the seeds and users ask for."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR


# What each --scheduler reads of the schedule options; given to another, they would change nothing without a word.
SCHEDULE_OPTIONS = {"step": ("step_size", "gamma"), "cosine": ("warmup_epochs",), "onecycle": (), "none": ()}


def schedule_warnings(cfg, given) -> list[str]:
    """Lines for schedule options given that shape nothing: read by another --scheduler than cfg's, a step as long
    as the run, or a cosine warm-up as long as the run (the lr only rises, the cosine never runs)."""
    lines = []
    read = SCHEDULE_OPTIONS.get(cfg.scheduler)  # None: a scheduler of a plugin's, not judged here
    unread = [name for name in ("step_size", "gamma", "warmup_epochs")
              if name in given and read is not None and name not in read]
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        lines.append(f"{flags}: not read by --scheduler {cfg.scheduler} (step reads --step-size and --gamma, "
                     "cosine --warmup-epochs)")
    if cfg.scheduler == "step" and "step_size" in given and cfg.step_size >= cfg.epochs:
        lines.append(f"--step-size {cfg.step_size} is not shorter than --epochs {cfg.epochs}: the lr never steps down")
    if cfg.scheduler == "cosine" and cfg.warmup_epochs >= cfg.epochs:
        lines.append(f"--warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: the lr rises "
                     "for the whole run and never decays")
    return lines


def make_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """--optimizer over the param groups the run's mode gives (modes/base.Mode.param_groups)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Schedule:
    """Wraps a scheduler and knows whether it steps per batch or per epoch."""

    def __init__(self, scheduler, per_batch: bool):
        self.scheduler, self.per_batch = scheduler, per_batch

    def batch_end(self):
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def epoch_end(self):
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state):
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state)


def make_schedule(optimizer, cfg, steps_per_epoch: int) -> Schedule:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "step":
        return Schedule(StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma), per_batch=False)
    if cfg.scheduler == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return Schedule(OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total), per_batch=True)
    if cfg.scheduler == "cosine":
        warmup = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return Schedule(LambdaLR(optimizer, factor), per_batch=True)
    return Schedule(None, per_batch=False)
