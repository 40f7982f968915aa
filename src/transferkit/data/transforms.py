"""Transforms derived from the backbone's own preprocessing, never guessed again downstream."""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from ..config import AUGMENT_PRESETS
from ..errors import UsageError
from ..models.registry import Preprocessing

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _to_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def resize_shorter(pre: Preprocessing) -> T.Resize:
    """Shorter side to pre.resize_size, aspect kept: the eval transform's first step, and what the
    decoded-image cache (data/decoded.py) stores, so both give the same pixels."""
    return T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation], antialias=True)


def eval_transform(pre: Preprocessing) -> T.Compose:
    return T.Compose([resize_shorter(pre), T.CenterCrop(pre.input_size)] + _to_tensor(pre))


def train_transform(pre: Preprocessing, augment: str = "standard") -> T.Compose:
    """none: the eval transform; light: mild crops + flip; standard: the seeds' RandomResizedCrop + flip;
    strong: standard + colour jitter and small rotations; dihedral: mild near-square crops + any of the
    square's 8 symmetries (for rotation-safe images: cells, tiles, micrographs, aerial views)."""
    if augment not in AUGMENT_PRESETS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, not {augment!r}")
    if augment == "none":
        return eval_transform(pre)
    interp = _INTERPOLATION[pre.interpolation]
    if augment == "dihedral":
        crop = T.RandomResizedCrop(pre.input_size, scale=(0.64, 1.0), ratio=(0.9, 1.1), interpolation=interp,
                                   antialias=True)
        return T.Compose([crop, T.ToImage(), RandomDihedral()] + _to_tensor(pre)[1:])
    scale = (0.5, 1.0) if augment == "light" else (0.08, 1.0)
    steps = [T.RandomResizedCrop(pre.input_size, scale=scale, interpolation=interp, antialias=True),
             T.RandomHorizontalFlip()]
    if augment == "strong":
        steps += [T.ColorJitter(0.3, 0.3, 0.3), T.RandomRotation(10)]
    return T.Compose(steps + _to_tensor(pre))


class RandomDihedral(torch.nn.Module):
    """One of the square's 8 symmetries, uniformly (on a CHW tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dihedral(x, int(torch.randint(8, ())))


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k=0 is identity), on the last two dims."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))
