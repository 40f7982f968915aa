"""How an image becomes a network's input tensor: the recipe its pretrained weights were trained with.

Torch-free and free of the model registry, so data/ (decoding, transforms) and the deployment path can
use it. The registry derives each backbone's recipe from what its weights declare: torchvision's
`Weights.transforms()` or a timm-style `pretrained_cfg` (see `from_pretrained_cfg`,
`from_torchvision_transforms`); checkpoints and exported models carry it as `to_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor (the weights' own recipe)."""

    input_size: int
    resize_size: int  # shorter side before the center crop at evaluation
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop_fraction(self) -> float:
        return self.input_size / self.resize_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )

    def at_size(self, input_size: int | None = None, crop_fraction: float | None = None) -> "Preprocessing":
        """Same recipe at another input resolution and/or crop fraction (default: keep both)."""
        input_size = input_size or self.input_size
        resize = int(math.floor(input_size / (crop_fraction or self.crop_fraction)))
        return Preprocessing(input_size, resize, self.interpolation, self.mean, self.std)

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict) -> "Preprocessing":
        """timm's pretrained_cfg (input_size (C, H, W), crop_pct, interpolation, mean, std), resized as
        timm's eval transform does: shorter side floor(size / crop_pct), then the center crop."""
        size = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct", 0.875))
        return cls(size, int(math.floor(size / crop_pct)), str(cfg.get("interpolation", "bilinear")),
                   tuple(float(x) for x in cfg["mean"]), tuple(float(x) for x in cfg["std"]))

    @classmethod
    def from_torchvision_transforms(cls, transforms) -> "Preprocessing":
        """torchvision's `Weights.transforms()` (an ImageClassification preset): its crop, resize,
        interpolation and normalization, read from the preset itself."""
        return cls(int(transforms.crop_size[0]), int(transforms.resize_size[0]), transforms.interpolation.value,
                   tuple(float(x) for x in transforms.mean), tuple(float(x) for x in transforms.std))
