"""How an image becomes a network's input tensor: the recipe its pretrained weights were trained with.

Torch-free and free of the model registry, so data/ (decoding, transforms) and the deployment path can
use it. The registry derives each backbone's recipe from what its weights declare: torchvision's
`Weights.transforms()` or a timm-style `pretrained_cfg` (see `from_pretrained_cfg`,
`from_torchvision_transforms`); checkpoints and exported models carry it as `to_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

SIXTEEN_BIT_WHITE = 65535  # white in a 16-bit image that uses all 16 bits (4095 where a 12-bit camera wrote it)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor (the weights' own recipe)."""

    input_size: int
    resize_size: int  # shorter side before the center crop at evaluation
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Not the weights' but the data's: the value that is white in its 16-bit grey images (4095 for a 12-bit
    # camera's frames), found by the scan (data/folders sixteen_bit_white) and kept with the run, so that
    # predict, serve and the export read new images as training did.
    sixteen_bit_white: int = SIXTEEN_BIT_WHITE

    @property
    def crop_fraction(self) -> float:
        return self.input_size / self.resize_size

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["sixteen_bit_white"] == SIXTEEN_BIT_WHITE:  # said only where it matters: cache keys of 8-bit data stay as they were
            del d["sixteen_bit_white"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            sixteen_bit_white=int(d.get("sixteen_bit_white", SIXTEEN_BIT_WHITE)),  # runs from before it was recorded
        )

    def at_size(self, input_size: int | None = None, crop_fraction: float | None = None) -> "Preprocessing":
        """Same recipe at another input resolution and/or crop fraction (default: keep both)."""
        input_size = input_size or self.input_size
        resize = int(math.floor(input_size / (crop_fraction or self.crop_fraction)))
        return replace(self, input_size=input_size, resize_size=resize)

    def reading(self, sixteen_bit_white: int | None) -> "Preprocessing":
        """The same recipe for data whose 16-bit images have this white (None: as they are)."""
        return self if sixteen_bit_white is None else replace(self, sixteen_bit_white=int(sixteen_bit_white))

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
