"""Prediction with a trained checkpoint: images or folders in, one row per image out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.images import read_for_model
from .data.transforms import crop_pixels, eval_crop, normalize_batch
from .engine import precision as precisions
from .engine.checkpoint import load_checkpoint, preprocessing_of, resolve_checkpoint
from .models.batchnorm import Folding
from .models.registry import get_spec
from .novelty import NoveltyReference
from .inference import batched_proba, expand_inputs, rows_from_probs, table_rows  # noqa: F401
from .run_folder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class FrozenSplit:
    """A trained model whose backbone stayed as it was (a feature-extract run; a linear probe at one scale,
    without pixels), cut where training cached its features: `frozen` computes them (images → features),
    `identity` is the feature store they were cached under, and the trained rest turns the features of the
    model's own dihedral `views` of an image into its logits (a probe averages its views' logits)."""

    frozen: nn.Module
    identity: dict
    views: tuple[int, ...]
    head: nn.Module
    standardize: Callable = lambda features: features

    def head_inputs(self, features_by_view: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.standardize(f.float()) for f in features_by_view]

    def logits(self, head_inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.head(z).flatten(1) for z in head_inputs]).mean(0)


def frozen_split(model: nn.Module, meta: dict) -> FrozenSplit | None:
    """The FrozenSplit of a checkpoint's model, or None (fine-tuned backbones, multi-scale and pixel probes,
    runs that cached nothing, a --weights file no longer there)."""
    from .engine.probe import ProbeClassifier
    from .engine.runtime import FrozenPart
    from .engine.sources import feature_identity

    config, probe = meta.get("config", {}), meta.get("probe")
    weights = config.get("weights")
    if not config.get("cache", True) or (weights and not Path(weights).is_file()):
        return None
    spec = get_spec(meta["architecture"])
    identity = feature_identity(spec, meta["preprocessing"], weights, config.get("pretrained", True),
                                config.get("seed", 0))
    if meta.get("mode") == "feature-extract":
        return FrozenSplit(FrozenPart(model, spec.cache_point), identity, (0,), model.get_submodule(spec.cache_point))
    if not isinstance(model, ProbeClassifier) or not isinstance(probe, dict) or probe.get("scales") or \
            probe.get("pixels"):
        return None  # a two-scale or pixel probe caches its vector in parts
    return FrozenSplit(model.pooler, {**identity, "point": f"taps{model.pooler.taps}-meanmax"}, model.views,
                       model.head, model.standardized)


def run_precision(checkpoint: str | Path, device: torch.device) -> str:
    """What `--precision auto` means for a trained run: the precision its reported numbers were computed in, so
    that predicting its val images gives its val accuracy. bf16 only where the run trained and scored in bf16
    and this device computes bf16 natively; fp32 where its frozen part ran on an fp32 engine (the engine choice
    refuses bf16 features that stray past their parity bound: on ELPV cells a probe run predicted in bf16 scored
    0.8643 on the val images its run reported at 0.8674) and where the run folder does not say (a copied
    checkpoint, an unfinished run)."""
    metrics = RunFolder.read_json(RunFolder(resolve_checkpoint(checkpoint).parent).metrics) or {}
    trained = _field(metrics, "precision", "resolved")
    frozen = _field(metrics, "source", "engine")  # features and activations: the engine that made them
    in_bf16 = trained == "bf16" and (frozen is None or str(frozen).endswith("bf16"))
    return precisions.resolve("auto", device) if in_bf16 else "fp32"


def _field(metrics: dict, section: str, key: str):
    """metrics.json's section[key], None where the file does not have it as written (a hand-edited `"precision":
    "bf16"` was an AttributeError traceback)."""
    part = metrics.get(section)
    return part.get(key) if isinstance(part, dict) else None


class Predictor:
    """A checkpoint ready to classify images, with the preprocessing it was trained with."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", precision: str = "auto"):
        self.model, self.meta = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.precision = (run_precision(checkpoint, self.device) if precision == "auto"
                          else precisions.resolve(precision, self.device))  # engine/precision.py
        self.model.to(self.device)
        self.classes: list[str] = self.meta["classes"]
        self.preprocessing = preprocessing_of(self.meta)
        self.crop = eval_crop(self.preprocessing)
        self._folding = Folding(self.model)
        # The run's novelty reference (novelty.py), where its training wrote one; it compares the input
        # of the classifier head, caught by a hook on the head during the forward pass.
        self.novelty = NoveltyReference.load(RunFolder(resolve_checkpoint(checkpoint).parent).novelty)
        # A linear probe's head reads the standardized pooled features; its first call is the image itself.
        head = "head" if isinstance(self.meta.get("probe"), dict) else get_spec(self.meta["architecture"]).cache_point
        self._head = self.model.get_submodule(head) if self.novelty is not None else None
        # evaluate's cached path reads both: the same split, and the same engine for the features it lacks
        self.split, self.frozen_engine = self._frozen_engine()

    def _frozen_engine(self):
        """A run whose backbone stayed frozen runs, on a CPU, its frozen part on the engine its training chose
        on this machine (the same export and choice, from the feature cache; measured anew elsewhere), and the
        trained rest in torch: the default ELPV probe's 656 val images × 8 views took 61.7 s in eager fp32 torch,
        34.8 s this way (benchmarks/predict_run.py). (None, None): the whole model runs eagerly."""
        split = frozen_split(self.model, self.meta) if self.device.type == "cpu" else None
        if split is None:
            return None, None
        from .engine.features import frozen_onnx_path
        from .engine.runtime import FrozenEngine

        try:
            onnx_path = frozen_onnx_path(split.identity)
        except OSError as exc:  # no writable cache folder: eager torch, as before
            log.debug("no engine folder for the frozen part (%s); the whole model runs in torch", exc)
            return None, None
        return split, FrozenEngine(split.frozen, self.device, "auto", onnx_path, precision=self.precision)

    @torch.inference_mode()
    def predict_proba(self, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, list[str | None]]:
        """Probabilities (N, C) and, per path, an error message when it could not be read (row is NaN)."""
        return batched_proba(paths, len(self.classes), self.preprocess, self.probs_of, batch_size)

    def preprocess(self, item) -> torch.Tensor:
        """A file path, or an image already in memory (a PIL image: the Python API) -> the model's input."""
        pre = self.preprocessing
        return self.preprocess_image(read_for_model(item, pre.resize_size, pre.sixteen_bit_white))

    def preprocess_bytes(self, data: bytes, name: str) -> torch.Tensor:
        """An image file held in memory (an upload) -> the model's input."""
        pre = self.preprocessing
        return self.preprocess_image(read_for_model(data, pre.resize_size, pre.sixteen_bit_white, name))

    def preprocess_image(self, img) -> torch.Tensor:
        """A decoded RGB (or 8-bit grey) PIL image -> its eval crop, uint8 3×H×W, as the training extraction
        crops it (transforms.crop_pixels); the forward pass normalizes whole batches (normalize_batch: the eval
        transform's numbers, bit for bit). Pillow and numpy only, which release the GIL, so the readers of the
        next batch run on threads beside the network (inference.read_batches)."""
        # a copy (Pillow's pixels are read-only); a grey image's one band is seen as three channels
        return torch.tensor(crop_pixels(self.crop, img)).expand(3, -1, -1)

    @torch.inference_mode()
    def probs_of(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self._forward(tensors)[0]

    def _forward(self, tensors: list[torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        """Probabilities and the classifier head's input (for novelty), from one forward pass."""
        # BatchNorm folded into the convs for the call only (same outputs, faster); the model itself
        # stays as loaded for whoever exports it. On a CPU a channels_last batch alone (weights left as
        # they are) runs oneDNN's faster kernels: lite0 21 -> 36 images/s on 2 cores.
        x = torch.stack(tensors)
        if x.dtype == torch.uint8:  # crops from preprocess
            x = normalize_batch(x, self.preprocessing)
        x = x.to(self.device)
        if self.frozen_engine is not None:  # its engine takes the batch as it is (ONNX Runtime: NCHW)
            logits, head_input = self._split_forward(x)
            return F.softmax(logits.float(), dim=1).cpu().numpy(), head_input.float().cpu()
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        seen = []
        hook = self._head and self._head.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        self._folding.fold()
        try:
            with precisions.autocast(self.device, self.precision):
                logits = self.model(x)
        finally:
            self._folding.unfold()
            if hook:
                hook.remove()
        return F.softmax(logits.float(), dim=1).cpu().numpy(), (seen[0].float().cpu() if seen else None)

    def _split_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the head's input (of the model's first view) with the frozen part on its engine: outside
        autocast, which the engine applies itself where it chose bf16 (its parity reference is fp32)."""
        from .data.transforms import dihedral

        inputs = self.split.head_inputs([self.frozen_engine(dihedral(x, k)) for k in self.split.views])
        with precisions.autocast(self.device, self.precision):
            return self.split.logits(inputs), inputs[0]

    # The rows' table: probabilities, plus the novelty score as a last column where the run has a novelty
    # reference, from one forward pass. Every consumer (predict, the API, serve's batcher) fills a table of
    # `table_width` columns with `table_of` and turns it into rows with `rows_of_table`.
    @property
    def table_width(self) -> int:
        return len(self.classes) + (self.novelty is not None)

    @torch.inference_mode()
    def table_of(self, tensors: list[torch.Tensor]) -> np.ndarray:
        probs, head_inputs = self._forward(tensors)
        if self.novelty is None:
            return probs
        return np.concatenate([probs, self.novelty.score(head_inputs.numpy())[:, None]], axis=1)

    def rows_of_table(self, paths, table: np.ndarray, errors, top_k: int) -> list[dict]:
        if self.novelty is None:
            return rows_from_probs(paths, table, errors, self.classes, top_k)
        return rows_from_probs(paths, table[:, :-1], errors, self.classes, top_k,
                               novelty=table[:, -1], threshold=self.novelty.threshold)

    def predict_rows(self, paths: list[str], top_k: int = 3) -> list[dict]:
        return table_rows(self, paths, top_k)
