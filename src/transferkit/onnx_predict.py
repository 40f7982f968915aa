"""Deployment without torch: classify images with an exported .onnx model using only onnxruntime,
numpy and Pillow. Importing this module must never import torch (a test checks `sys.modules`).

The eval preprocessing is re-implemented from the recipe stored in the model's metadata, following
torchvision's steps on PIL images exactly: resize the shorter side to `resize_size` (longer side
truncated, as torchvision does), center crop `input_size` (offsets rounded as torchvision does),
scale to [0, 1], normalize.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .data.images import SIXTEEN_BIT_WHITE, center_crop, read_for_model
from .errors import CheckpointError
from .inference import batched_proba, expand_inputs, ort_session, rows_from_probs, softmax, table_rows

log = logging.getLogger(__name__)

METADATA_KEYS = ("classes", "preprocessing", "architecture")
PREPROCESSING_KEYS = {"input_size", "resize_size", "interpolation", "mean", "std"}  # what preprocess_pil reads


def preprocess_pil(img: Image.Image, pre: dict) -> np.ndarray:
    """RGB (or 8-bit grey, mode L) PIL image -> float32 (3, H, W), as torchvision's eval transform would
    produce it from the RGB image. A grey image is resized as one band and broadcast to three channels at
    the end: the same numbers (Pillow resamples every band alike; tested), a third of the resizing."""
    crop = pre["input_size"]
    img = center_crop(img, pre["resize_size"], crop, pre["interpolation"])
    # (x / 255 - mean) / std as one multiply-add per pixel, written straight into CHW order (a third of
    # the time of the step-by-step version; equal within float rounding, 5e-7).
    mean, std = np.asarray(pre["mean"], dtype=np.float32), np.asarray(pre["std"], dtype=np.float32)
    pixels = np.asarray(img)
    bands = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]  # (1, H, W) broadcasts
    out = np.empty((3, crop, crop), dtype=np.float32)
    np.multiply(bands, (1 / (255 * std))[:, None, None], out=out)
    out -= (mean / std)[:, None, None]
    return out


def read_metadata(session, path) -> dict:
    """The classes, preprocessing and architecture an export carries in its ONNX metadata_props."""
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in METADATA_KEYS if k not in props]
    if missing:
        raise CheckpointError(f"{path} lacks transferkit metadata ({', '.join(missing)}); "
                              "export it with `transferkit export RUN --format onnx`")
    try:
        classes, pre = json.loads(props["classes"]), json.loads(props["preprocessing"])
    except ValueError as exc:  # metadata edited by hand, or written by another tool under the same keys
        raise _damaged(path, str(exc)) from None
    if not isinstance(classes, list) or not isinstance(pre, dict) or not PREPROCESSING_KEYS <= set(pre):
        raise _damaged(path, "classes must be a list; preprocessing must name "  # was a KeyError in every row
                       + ", ".join(sorted(PREPROCESSING_KEYS)))
    return {"classes": classes, "preprocessing": pre, "architecture": props["architecture"]}


def _damaged(path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} has damaged transferkit metadata ({why}); export it again with "
                           "`transferkit export RUN --format onnx`")


class OnnxClassifier:
    """An exported model and the preprocessing it declares."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no ONNX model at {path} (make one with `transferkit export RUN --format onnx`)")
        self.session = ort_session(path, threads, spinning)
        meta = read_metadata(self.session, path)
        self.classes: list[str] = meta["classes"]
        self.preprocessing: dict = meta["preprocessing"]
        self.architecture: str = meta["architecture"]
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]

    def preprocess(self, item) -> np.ndarray:
        """A file path, or an image already in memory (a PIL image: the Python API) -> the model's input."""
        return self.preprocess_image(read_for_model(item, self.preprocessing["resize_size"], self.sixteen_bit_white))

    def preprocess_bytes(self, data: bytes, name: str) -> np.ndarray:
        """An image file held in memory (an upload) -> the model's input."""
        return self.preprocess_image(read_for_model(data, self.preprocessing["resize_size"], self.sixteen_bit_white,
                                                    name))

    @property
    def sixteen_bit_white(self) -> int:
        """The training data's white of 16-bit grey images (export.json says it where it is not 65535)."""
        return int(self.preprocessing.get("sixteen_bit_white", SIXTEEN_BIT_WHITE))

    def preprocess_image(self, img: Image.Image) -> np.ndarray:
        """A decoded RGB (or 8-bit grey) PIL image -> the model's input."""
        return preprocess_pil(img, self.preprocessing)

    def probs_of(self, arrays: list[np.ndarray]) -> np.ndarray:
        return softmax(self.logits(np.stack(arrays)))

    # The row protocol of transferkit.predict.Predictor (serve uses either): no novelty column here.
    @property
    def table_width(self) -> int:
        return len(self.classes)

    def table_of(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self.probs_of(arrays)

    def rows_of_table(self, paths, table: np.ndarray, errors, top_k: int) -> list[dict]:
        return rows_from_probs(paths, table, errors, self.classes, top_k)

    def predict_proba(self, paths: list, batch_size: int = 32):
        return batched_proba(paths, len(self.classes), self.preprocess, self.probs_of, batch_size)

    def predict_rows(self, items: list, top_k: int = 3) -> list[dict]:
        """Rows like `transferkit.predict.rows_from_probs` (path, label, probability, top_k, error)."""
        return table_rows(self, items, top_k)


def predict_rows(model_path: str | Path, paths: list[str], top_k: int = 3) -> list[dict]:
    """`OnnxClassifier.predict_rows` of the files in `paths` (folders walked)."""
    return OnnxClassifier(model_path).predict_rows(expand_inputs(paths), top_k)
