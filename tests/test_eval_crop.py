"""The eval crop is torchvision's Resize + CenterCrop, pixel for pixel, however it is computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from transferkit.data.transforms import eval_crop
from transferkit.preprocessing import Preprocessing

SIZES = [(300, 300), (448, 448), (256, 256), (1000, 1000), (257, 257), (200, 200), (150, 150),  # square
         (279, 238), (448, 699), (700, 448), (640, 480), (333, 500)]  # not square
CROPS = [(224, 256), (224, 224), (256, 292), (300, 331), (224, 200)]  # (input size, shorter side)


def _reference(pre: Preprocessing):
    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[pre.interpolation]
    return T.Compose([T.Resize(pre.resize_size, interpolation=mode, antialias=True), T.CenterCrop(pre.input_size)])


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_crop_gives_resize_then_center_crop_exactly(interpolation):
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        for channels in (1, 3):
            shape = (height, width) if channels == 1 else (height, width, channels)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            for size, shorter in CROPS:
                pre = Preprocessing(size, shorter, interpolation, (0.5,) * 3, (0.5,) * 3)
                want, got = np.asarray(_reference(pre)(image)), np.asarray(eval_crop(pre)(image))
                assert got.shape == want.shape and np.array_equal(got, want), (width, height, channels, size, shorter)


def test_eval_crop_takes_tensors_as_torchvision_does():
    pre = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    pixels = torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8)
    assert torch.equal(eval_crop(pre)(pixels), _reference(pre)(pixels))


def test_a_square_image_is_cut_while_it_is_resized():
    """The fast path is taken where it can be (else the test above would pass on torchvision alone)."""
    from transferkit.data.images import _square_crop_box

    assert _square_crop_box(Image.new("L", (300, 300)), 256, 224) == (18.75, 18.75, 281.25, 281.25)
    assert _square_crop_box(Image.new("L", (300, 280)), 256, 224) is None
    assert _square_crop_box(Image.new("L", (256, 256)), 256, 224) is None  # already at size: cut only
