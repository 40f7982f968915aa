"""finetune: every layer trains (lower groups at lr × --lower-lr-factor per step down)."""

from __future__ import annotations

from .base import Mode


class Finetune(Mode):
    name = "finetune"
    trains_backbone = True
    unread_why = "the --probe-* options are --mode linear-probe's, --unfreeze partial's"

    def unread_options(self) -> tuple[str, ...]:
        return self._epoch_loop_unread()

    def first_trainable_group(self, n_groups: int, spec) -> int:
        return 0
