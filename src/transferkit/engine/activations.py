"""Cached activations for `--mode partial --unfreeze N`: the frozen lower layer groups run once per
(image, view); each epoch runs only the unfrozen top groups and the head on the cached tensors.

Needs the registry's `stages` for the backbone (the forward of each layer group, in order). The cache
shares FeatureStore with feature-extract, keyed additionally by the cut point and the stored dtype.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.nn as nn

from ..models.adapt import set_train_mode
from . import precision as precisions
from .runtime import FrozenEngine
from .sources import CachedFeatureSource

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def split_stages(model: nn.Module, spec, unfreeze: int) -> tuple[nn.Sequential, nn.Sequential, int]:
    """(frozen prefix, trainable top incl. head, number of frozen groups) for `unfreeze` top groups."""
    stages = spec.stages(model)
    cut = len(stages) - 1 - unfreeze  # the last stage is the head part
    return nn.Sequential(*stages[:cut]), nn.Sequential(*stages[cut:]), cut


class CachedActivationSource(CachedFeatureSource):
    """partial: like cached features, but the cache point is the output of the last frozen group and
    the trainable part is the top groups + head (BatchNorm in it follows set_train_mode's rules)."""

    def prepare(self) -> None:
        st = self.state
        self.prefix, top, self.cut = split_stages(st.model, st.spec, st.cfg.unfreeze)
        super().prepare()
        self.head = top  # replaces the cache-point module CachedFeatureSource trains
        frozen = [n for n, p in self.prefix.named_parameters() if p.requires_grad]
        if frozen:  # the registry's groups and stages disagree: caching would silently freeze these
            raise RuntimeError(f"{st.spec.name}: stages and groups disagree ({frozen[:2]} would be cached)")
        self.precision = precisions.resolve(st.cfg.precision, st.device)
        self.stats.update(frozen_groups=self.cut, cache_dtype=st.cfg.cache_dtype, training_precision=self.precision)
        log.info("partial: %d frozen groups cached as %s %s", self.cut, st.cfg.cache_dtype,
                 self.stats["feature_shape"])

    def _extractor(self, store) -> FrozenEngine:
        st = self.state
        return FrozenEngine(self.prefix, st.device, st.cfg.engine, store.onnx_path,
                            st.cfg.channels_last, out_dtype=DTYPES[st.cfg.cache_dtype], precision=st.cfg.precision)

    def _identity(self) -> dict:
        return {**super()._identity(), "point": f"stages[:{self.cut}]", "dtype": self.state.cfg.cache_dtype}

    def compute_threads(self):
        # The trainable top groups are convolutions worth every thread (unlike the linear head on pooled
        # features that CachedFeatureSource runs on one).
        return nullcontext()

    def set_train_mode(self) -> None:
        set_train_mode(self.head)
        self._after_mode_switch(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.state.device.type == "cpu" and self.state.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with precisions.training_autocast(self.state.device, self.precision):  # the unfrozen groups; fp32 weights
            return self.head(x).float()

    def describe(self) -> dict:
        return {**super().describe(), "kind": "cached-activations"}

    def head_inputs(self):
        return None  # the cache holds a frozen group's output; the head's input changes as the top trains
