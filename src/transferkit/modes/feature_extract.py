"""feature-extract: the pretrained network is frozen, only the new head trains. With the feature cache
the frozen part runs once per (image, view) and epochs train the head on cached features."""

from __future__ import annotations

from .base import EpochLoopMode


class FeatureExtract(EpochLoopMode):
    name = "feature-extract"

    def make_source(self, state):
        if not self.cfg.cache:
            return super().make_source(state)
        from ..engine.sources import CachedFeatureSource

        return CachedFeatureSource(state)

    def set_train_mode(self, model, spec) -> None:
        if spec.aux_head:  # inception's auxiliary head needs the training-mode forward
            return super().set_train_mode(model, spec)
        # Only the head learns: the frozen part (dropout included) behaves as at inference.
        model.eval()
        model.get_submodule(spec.head).train()
