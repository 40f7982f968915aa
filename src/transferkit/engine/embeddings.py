"""Backbone embeddings of any list of images, read from (and added to) the feature cache that
feature-extract training uses: `transferkit data check` and a later `train` with the same backbone and
preprocessing share every image's features, so whichever runs first pays the one extraction."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..models.adapt import build_model
from ..models.registry import BackboneSpec, get_spec
from .environment import pick_device
from .features import FeatureStore, View, cached_features, default_workers, store_for
from .runtime import FrozenEngine, FrozenPart
from .sources import feature_identity

log = logging.getLogger(__name__)


def embed_images(paths: list[str], digests: dict[str, str] | None = None, model: str = "efficientnet_lite0",
                 image_size: int | None = None, crop_fraction: float | None = None,
                 device: str = "auto", engine: str = "auto",
                 sixteen_bit_white: int | None = None) -> tuple[np.ndarray | None, list[bool], dict]:
    """(features as float32 (n_ok, d), which paths worked, cache stats) for the eval view of each image,
    the same cache entries `transferkit train --model MODEL` (with these sizes) reads and writes."""
    spec = get_spec(model)
    pre = spec.preprocessing.at_size(image_size, crop_fraction).reading(sixteen_bit_white)
    store = store_for(feature_identity(spec, pre.to_dict(), None, pretrained=True, seed=0))
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
            # As CachedFeatureSource builds it with train's defaults (channels_last, --precision auto).
            self._engine = FrozenEngine(FrozenPart(model, self.spec.cache_point), self.device, self.engine,
                                        self.store.onnx_path, True, precision="auto")
        return self._engine(x)
