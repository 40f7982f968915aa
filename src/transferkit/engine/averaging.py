"""--ema-epochs: an exponential moving average of the weights (Polyak averaging, as timm's ModelEma), which
is what each epoch evaluates, keeps as its best and saves. It smooths the step-to-step wander of long runs at a
steady learning rate; on ELPV's short cosine fine-tuning it scored no better than the last step's weights
(benchmarks/RESULTS.md, notes of session 33), so the recipe search leaves it off.

Averaged: the parameters that train and the floating-point buffers (BatchNorm's running statistics, where
they learn). The training steps keep working on the raw weights; the averaged ones are swapped into the
model only while an epoch is evaluated and written (`applied`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

# The first steps average over fewer steps ((1 + t) / (WARMUP_STEPS + t), as timm's ModelEmaV3 warm-up), so
# the average does not start out anchored to the weights before any training.
WARMUP_STEPS = 10


class WeightAverage:
    def __init__(self, model: nn.Module, horizon_epochs: float, steps_per_epoch: int):
        self.tensors = [p for p in model.parameters() if p.requires_grad]
        self.tensors += [b for b in model.buffers() if b.is_floating_point()]
        self.average = [t.detach().clone() for t in self.tensors]
        self.decay = 1.0 - 1.0 / max(1.0, horizon_epochs * steps_per_epoch)
        self.steps = 0
        self.training_weights: list[torch.Tensor] | None = None

    def update(self) -> None:
        """After an optimizer step: move the average towards the current weights."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (WARMUP_STEPS + self.steps))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, self.tensors, 1.0 - decay)

    @contextmanager
    def applied(self):
        """The averaged weights in the model for the block; the training weights back after it.
        `training_weights` holds them meanwhile (the resume checkpoint stores them)."""
        self.training_weights = [t.detach().clone() for t in self.tensors]
        self._copy(self.average)
        try:
            yield
        finally:
            self._copy(self.training_weights)
            self.training_weights = None

    def training(self) -> list[torch.Tensor]:
        """The training weights, whether the average is applied (after an epoch) or not (before the first)."""
        return self.training_weights if self.training_weights is not None else self.tensors

    def restore(self, training_weights: list[torch.Tensor], steps: int) -> None:
        """Resume: the model holds the averaged weights (as saved); put them in the average and the
        training weights back in the model."""
        self.average = [t.detach().clone() for t in self.tensors]
        self._copy(training_weights)
        self.steps = steps

    def _copy(self, values) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors, values):
                t.copy_(v)
