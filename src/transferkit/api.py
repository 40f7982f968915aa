"""The Python API, mirroring the CLI:

    import transferkit as tk
    clf = tk.train("data/elpv", model="efficientnet_lite0", mode="feature-extract", epochs=15)
    clf.predict(["cell.png"])        # labels
    clf = tk.load("runs/...")        # a run folder or a .safetensors checkpoint
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import TrainConfig
from .engine.checkpoint import resolve_checkpoint
from .predict import Predictor, expand_inputs


class Classifier:
    """A trained classifier. Learned attributes end in `_` (scikit-learn style)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        self.checkpoint_ = resolve_checkpoint(checkpoint)
        self._predictor = Predictor(self.checkpoint_, device=device)
        self.classes_ = self._predictor.classes
        self.preprocessing_ = self._predictor.preprocessing
        self.meta_ = self._predictor.meta
        self.metrics_: dict | None = None

    @property
    def model_(self):
        return self._predictor.model

    def predict_proba(self, paths) -> np.ndarray:
        probs, errors = self._predictor.predict_proba(expand_inputs(_as_list(paths)))
        return probs

    def predict(self, paths) -> list[str | None]:
        return [row["label"] for row in self.predict_table(paths, top_k=1)]

    def predict_table(self, paths, top_k: int = 3) -> list[dict]:
        return self._predictor.predict_rows(expand_inputs(_as_list(paths)), top_k=top_k)


def train(data: str | Path, config: TrainConfig | None = None, **options) -> Classifier:
    """Train on an image folder; options are TrainConfig's fields (e.g. time_budget="5m", recipe="tutorial",
    model=, mode=, epochs=, out=). With the default recipe="auto" the options given fix their pieces of the
    recipe and the search chooses the rest on the training images (search.py)."""
    from .search import train as train_run

    cfg = config or TrainConfig(data=str(data), **options)
    metrics = train_run(cfg, given=options)
    clf = Classifier(Path(metrics["run_dir"]))
    clf.metrics_ = metrics
    return clf


def load(run_or_checkpoint: str | Path, device: str = "cpu") -> Classifier:
    return Classifier(run_or_checkpoint, device=device)


def _as_list(paths) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]
