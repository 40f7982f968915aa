"""Optimizers with per-group learning rates, and the schedulers the seeds and users ask for."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR


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
