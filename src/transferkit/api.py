"""The Python API, mirroring the CLI:

    import transferkit as tk
    clf = tk.train("data/elpv", model="efficientnet_lite0", mode="feature-extract", epochs=15)
    clf.predict(["cell.png"])        # labels
    clf.run_dir_                     # the run folder (config, split, checkpoints, report)
    clf = tk.load("runs/...")        # a run folder or a .safetensors checkpoint

Mistakes raise transferkit.errors.UsageError worded with the argument names (epochs=, not --epochs).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import fields
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .errors import UsageError
from .engine.checkpoint import resolve_checkpoint
from .predict import Predictor, expand_inputs

log = logging.getLogger(__name__)


class Classifier:
    """A trained classifier. Learned attributes end in `_` (scikit-learn style)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        self.checkpoint_ = resolve_checkpoint(checkpoint)
        self.run_dir_ = self.checkpoint_.parent
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
    recipe and the search chooses the rest on the training images (search.py). The run folder is
    `clf.run_dir_` (and logged)."""
    from .search import train as train_run

    try:
        cfg = config or TrainConfig(data=str(data), **_known_options(options))
        metrics = train_run(cfg, given=options)
    except UsageError as exc:
        raise UsageError(api_wording(str(exc))) from None
    clf = Classifier(Path(metrics["run_dir"]))
    clf.metrics_ = metrics
    log.info("run folder: %s", clf.run_dir_)
    return clf


def _known_options(options: dict) -> dict:
    """A misspelled keyword gets the close name, as the CLI does for model names, not a bare TypeError."""
    valid = [f.name for f in fields(TrainConfig) if f.name != "data"]
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]}=?" if close else f" (valid: {', '.join(valid)})"
            raise UsageError(f"train() got an unknown argument {name}={options[name]!r}{hint}")
    return options


def api_wording(message: str) -> str:
    """The library's messages name command-line flags; in Python they are arguments: --epochs -> epochs,
    --overwrite -> overwrite=True, --no-cache -> cache=False. Quoted commands (`...`) stay as they are."""
    booleans = {f.name for f in fields(TrainConfig) if f.type in ("bool", bool)}

    def argument(match: re.Match) -> str:
        name = match.group(2).replace("-", "_")
        if name in booleans:
            return f"{name}={not match.group(1)}"
        return name

    parts = message.split("`")
    parts[::2] = [re.sub(r"--(no-)?([a-z][a-z0-9-]*)", argument, part) for part in parts[::2]]
    return "`".join(parts)


def load(run_or_checkpoint: str | Path, device: str = "cpu") -> Classifier:
    return Classifier(run_or_checkpoint, device=device)


def _as_list(paths) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]
