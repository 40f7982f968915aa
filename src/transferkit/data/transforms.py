"""Transforms derived from the backbone's own preprocessing, never guessed again downstream."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from ..config import AUGMENT_PRESETS
from ..errors import UsageError
from ..preprocessing import Preprocessing
from .images import center_crop

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _to_tensor(pre: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def resize_shorter(pre: Preprocessing) -> T.Resize:
    """Shorter side to pre.resize_size, aspect kept: the eval transform's first step, and what the
    decoded-image cache (data/decoded.py) stores, so both give the same pixels."""
    return T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation], antialias=True)


def eval_transform(pre: Preprocessing) -> T.Compose:
    return T.Compose([eval_crop(pre)] + _to_tensor(pre))


def eval_crop(pre: Preprocessing) -> "EvalCrop":
    """The eval transform's geometry alone, on a PIL image: its pixels (np.asarray; one channel for a grey
    image) as a CHW uint8 batch row go through normalize_batch to exactly what eval_transform gives."""
    return EvalCrop(pre)


class EvalCrop:
    """Resize the shorter side to pre.resize_size, then cut the centre pre.input_size square: torchvision's
    Resize + CenterCrop, pixel for pixel; a PIL image goes through images.center_crop (one Pillow call for a
    square image), tensors (the decoded-image store's pixels) and crops that pad through torchvision."""

    def __init__(self, pre: Preprocessing):
        self.pre = pre
        self.slow = T.Compose([resize_shorter(pre), T.CenterCrop(pre.input_size)])

    def __call__(self, image):
        pre = self.pre
        if isinstance(image, Image.Image) and pre.resize_size >= pre.input_size:
            return center_crop(image, pre.resize_size, pre.input_size, pre.interpolation)
        return self.slow(image)


def crop_pixels(crop: "EvalCrop", image) -> np.ndarray:
    """eval_crop's output for a decoded PIL image as the uint8 C×H×W row normalize_batch takes: one channel for an
    8-bit grey image (load_rgb's keep_gray: resized as one band, a third of the work), three for colour."""
    pixels = np.asarray(crop(image))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def normalize_batch(x: torch.Tensor, pre: Preprocessing, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N×C×H×W crops (C = 1 or 3) to the network's float input: the same float32 operations, in
    the same order, as eval_transform's ToDtype and Normalize (so the same values, bit for bit). `out`
    (N×3×H×W float32), where given, is written instead of fresh memory: a batch-sized allocation comes
    from the OS each time, and its page faults cost twice the arithmetic (2-core EPYC: 23 ms vs 10 ms for
    64 crops)."""
    channels = x.shape[1]
    out = torch.empty((x.shape[0], 3, *x.shape[2:])) if out is None else out
    torch.mul(x, 1.0 / 255, out=out[:, :channels])  # ToDtype(scale=True): to float32, then times 1/255
    if channels == 1:  # grey: the three equal channels of its RGB version
        out[:, 1:] = out[:, :1]
    mean = torch.as_tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
    return out.sub_(mean).div_(std)


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


@functools.cache
def dihedral_after(j: int, k: int) -> int:
    """The m with dihedral(dihedral(x, k), j) == dihedral(x, m) for every x: view j of view k."""
    square = np.arange(9).reshape(3, 3)
    target = dihedral(dihedral(square, k), j)
    return next(m for m in range(8) if np.array_equal(dihedral(square, m), target))


def dihedral(x, k: int):
    """The k-th of the 8 symmetries of the square (k=0 is identity), on the last two dims of a tensor or
    a numpy array (rot90 turns the same way in both)."""
    if isinstance(x, np.ndarray):
        return np.rot90(np.flip(x, -1) if k >= 4 else x, k % 4, axes=(-2, -1))
    if k >= 4:
        x = x.flip(-1)
    # torch.rot90 written as transposes and flips: the same values, and ops every ONNX exporter takes (the
    # TorchScript exporter has no rot90, and the probes' views are part of their exported graphs)
    turns = k % 4
    if turns == 1:
        return x.transpose(-2, -1).flip(-2)
    if turns == 2:
        return x.flip(-2).flip(-1)
    if turns == 3:
        return x.transpose(-2, -1).flip(-1)
    return x
