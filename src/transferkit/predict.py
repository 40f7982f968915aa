"""Prediction with a trained checkpoint: images or folders in, one row per image out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import IMAGE_EXTENSIONS, load_rgb
from .data.transforms import eval_transform
from .engine.checkpoint import load_checkpoint, preprocessing_of
from .errors import DataError, UsageError

log = logging.getLogger(__name__)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders walked (sorted) for image files. Missing paths are an error."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [str(Path(root) / f) for f in sorted(files)
                        if Path(f).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not f.startswith(".")]
        elif path.exists():
            out.append(str(path))
        else:
            raise UsageError(f"no such file or folder: {item}")
    if not out:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return out


class Predictor:
    """A checkpoint ready to classify images, with the preprocessing it was trained with."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        self.model, self.meta = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.classes: list[str] = self.meta["classes"]
        self.preprocessing = preprocessing_of(self.meta)
        self.transform = eval_transform(self.preprocessing)

    @torch.inference_mode()
    def predict_proba(self, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[str | None]]:
        """Probabilities (N, C) and, per path, an error message when it could not be read (row is NaN)."""
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(paths)
        for start in range(0, len(paths), batch_size):
            tensors, rows = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    tensors.append(self.transform(load_rgb(paths[i])))
                    rows.append(i)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                    errors[i] = str(exc)
            if tensors:
                logits = self.model(torch.stack(tensors).to(self.device))
                probs[rows] = F.softmax(logits.float(), dim=1).cpu().numpy()
        return probs, errors

    def predict_rows(self, paths: list[str], top_k: int = 3) -> list[dict]:
        probs, errors = self.predict_proba(paths)
        return rows_from_probs(paths, probs, errors, self.classes, top_k)


def rows_from_probs(paths, probs, errors, classes, top_k: int) -> list[dict]:
    rows = []
    k = max(1, min(top_k, len(classes)))
    for path, p, err in zip(paths, probs, errors):
        if err is not None:
            rows.append({"path": path, "label": None, "probability": None, "top_k": [], "error": err})
            continue
        order = np.argsort(-p)[:k]
        rows.append({
            "path": path,
            "label": classes[order[0]],
            "probability": float(p[order[0]]),
            "top_k": [{"label": classes[j], "probability": float(p[j])} for j in order],
            "error": None,
        })
    return rows
