"""Backbone embeddings of any list of images, read from (and added to) the feature cache that
feature-extract training uses: `transferkit data check` and a later `train` with the same backbone and
preprocessing share every image's features, so whichever runs first pays the one extraction."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data.folders import file_sha256
from ..models.adapt import build_model
from ..models.registry import BackboneSpec, Preprocessing, get_spec
from .environment import pick_device
from .features import FeatureStore, View, cached_features, default_workers, store_for
from .runtime import FrozenEngine, FrozenPart

log = logging.getLogger(__name__)


def weights_source(spec: BackboneSpec, weights: str | None = None, pretrained: bool = True, seed: int = 0) -> str:
    """What the backbone's weights are, for cache keys."""
    if weights:
        return f"file:{file_sha256(weights)}"
    if pretrained:
        return f"pretrained:{spec.weights.url or spec.weights.package}"
    return f"scratch:seed{seed}"  # random weights differ by seed


def feature_identity(spec: BackboneSpec, pre: Preprocessing, weights: str | None = None,
                     pretrained: bool = True, seed: int = 0) -> dict:
    """What a cached feature depends on besides the image: backbone, its weights, preprocessing, point."""
    return {"model": spec.name, "weights": weights_source(spec, weights, pretrained, seed),
            "preprocessing": pre.to_dict(), "point": spec.cache_point}


def frozen_extractor(model: torch.nn.Module, spec: BackboneSpec, device: torch.device, store: FeatureStore,
                     engine: str = "auto", channels_last: bool = True, precision: str = "auto") -> FrozenEngine:
    """The network up to the cache point, on ONNX Runtime when usable (engine/runtime.py); `precision` as
    `train --precision` (the default matches train's, so both write the same cache entries)."""
    frozen = FrozenPart(model, spec.cache_point)
    return FrozenEngine(frozen, device, engine, store.root / "frozen.onnx", channels_last, precision=precision)


def embed_images(paths: list[str], digests: dict[str, str] | None = None, model: str = "efficientnet_lite0",
                 image_size: int | None = None, crop_fraction: float | None = None,
                 device: str = "auto", engine: str = "auto") -> tuple[np.ndarray | None, list[bool], dict]:
    """(features as float32 (n_ok, d), which paths worked, cache stats) for the eval view of each image,
    the same cache entries `transferkit train --model MODEL` (with these sizes) reads and writes."""
    spec = get_spec(model)
    pre = spec.preprocessing.at_size(image_size, crop_fraction)
    store = store_for(feature_identity(spec, pre))
    torch_device = pick_device(device)
    # Built lazily inside the extractor: a fully cached call never loads the weights.
    extractor = _LazyExtractor(spec, torch_device, store, engine)
    features, ok, stats = cached_features(extractor, store, list(paths), [View(0)], pre,
                                          workers=default_workers(), desc="check features", digests=digests)
    stats = {**stats, "model": spec.name, "preprocessing": pre.to_dict(), "cache": str(Path(store.root))}
    if features is None:
        return None, ok, stats
    return features[:, 0].reshape(features.shape[0], -1).float().numpy(), ok, stats


class _LazyExtractor:
    def __init__(self, spec: BackboneSpec, device: torch.device, store: FeatureStore, engine: str):
        self.spec, self.device, self.store, self.engine = spec, device, store, engine
        self._engine: FrozenEngine | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._engine is None:
            model = build_model(self.spec, num_classes=2).to(self.device)  # the head is never run
            self._engine = frozen_extractor(model, self.spec, self.device, self.store, self.engine)
        return self._engine(x)
