"""partial: the top --unfreeze layer groups train with the head. Where the backbone states its stages,
the frozen lower groups run once per (image, view) and are cached (engine/activations.py)."""

from __future__ import annotations

from ..errors import UsageError
from .base import EpochLoopMode


class Partial(EpochLoopMode):
    name = "partial"
    trains_backbone = True

    def unread_options(self) -> tuple[str, ...]:
        return tuple(name for name in super().unread_options() if name != "unfreeze")

    def first_trainable_group(self, n_groups: int, spec) -> int:
        unfreeze = self.cfg.unfreeze
        if not 1 <= unfreeze <= n_groups:
            raise UsageError(f"--unfreeze must be between 1 and {n_groups} for {spec.name} "
                             f"(it has {n_groups} layer groups)")
        return n_groups - unfreeze

    def make_source(self, state):
        if self.cfg.cache and state.spec.stages is not None and not state.spec.aux_head:
            from ..engine.activations import CachedActivationSource

            return CachedActivationSource(state)
        return super().make_source(state)
