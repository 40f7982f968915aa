"""finetune: every layer trains (lower groups at lr × --lower-lr-factor per step down)."""

from __future__ import annotations

from .base import EpochLoopMode


class Finetune(EpochLoopMode):
    name = "finetune"
    trains_backbone = True

    def first_trainable_group(self, n_groups: int, spec) -> int:
        return 0
