"""Novelty: how unlike the training images an image is, so an out-of-distribution input is flagged
instead of getting an ordinary-looking label.

The score of an image is the mean cosine distance of its embedding (the pooled input of the classifier
head) to its K nearest training embeddings: about 0 for a training image, small for images like the
training data, large for something else. The threshold is the PERCENTILE-th percentile of the held-out
val images' scores, so about 1% of images like the val split are flagged and a clearly foreign image
scores well above it. An image with a score above the threshold is `novel`.

Stored in RUN/novelty.safetensors (the reference embeddings as a tensor, the rest as JSON metadata;
nothing pickled), written at the end of a feature-extract training run from the cached features. Numpy
only, so the torch-free deployment path can use it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .run_folder import RunFolder

log = logging.getLogger(__name__)

FILE = RunFolder.NOVELTY  # RUN/novelty.safetensors
K = 5
PERCENTILE = 99.0
MAX_REFERENCE = 10_000  # training embeddings kept (a seeded sample beyond this): bounds file size and time


def pool(features) -> np.ndarray:
    """(N, C, ...) features -> (N, C) unit vectors (spatial positions averaged where there are any)."""
    x = np.asarray(features, dtype=np.float32)
    x = x.reshape(len(x), x.shape[1], -1).mean(axis=2) if x.ndim > 2 else x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class NoveltyReference:
    """Training embeddings and the calibrated threshold."""

    def __init__(self, reference: np.ndarray, threshold: float, k: int = K, info: dict | None = None):
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)
        self.threshold = float(threshold)
        self.k = min(k, len(self.reference))
        self.info = info or {}

    @classmethod
    def calibrate(cls, train_features, val_features, seed: int = 0) -> "NoveltyReference":
        train = np.asarray(train_features)
        if len(train) > MAX_REFERENCE:
            # Sample before pooling: pooling normalizes into a new array, and a copy of every training
            # feature was a run's peak memory at 70k images.
            keep = np.random.default_rng(seed).choice(len(train), MAX_REFERENCE, replace=False)
            train = train[np.sort(keep)]
        train = pool(train)
        ref = cls(train, threshold=0.0)
        val_scores = ref.score(val_features)
        ref.threshold = float(np.percentile(val_scores, PERCENTILE))
        ref.info = {"metric": f"mean cosine distance to the {ref.k} nearest training embeddings",
                    "threshold": f"{PERCENTILE:g}th percentile of {len(val_scores)} val images' scores",
                    "reference_images": len(train), "val_median": float(np.median(val_scores))}
        return ref

    def score(self, features) -> np.ndarray:
        emb = pool(features)
        scores = np.empty(len(emb), dtype=np.float32)
        for start in range(0, len(emb), 256):  # (256, reference) similarities at a time
            sims = emb[start:start + 256] @ self.reference.T
            nearest = -np.partition(-sims, self.k - 1, axis=1)[:, :self.k]
            scores[start:start + 256] = 1.0 - nearest.mean(axis=1)
        return scores

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        from .io import atomic_write

        meta = {"threshold": self.threshold, "k": self.k, "info": self.info}
        return atomic_write(path, lambda tmp: save_file({"reference": self.reference}, tmp,
                                                        metadata={"transferkit_novelty": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "NoveltyReference | None":
        """The reference in PATH; None where there is none or it cannot be read (novelty is then not reported)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = json.loads((fh.metadata() or {})["transferkit_novelty"])
                reference = fh.get_tensor("reference")
            return cls(reference, meta["threshold"], meta["k"], meta.get("info"))
        except Exception as exc:  # noqa: BLE001 - a damaged file costs the novelty column, not the predictions
            log.warning("novelty reference %s not used: %s", path, exc)
            return None
