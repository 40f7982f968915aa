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


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_a_strip_is_not_enlarged_whole_to_cut_its_centre(interpolation, monkeypatch):
    """An 8×60,000 px strip (a 4 KB PNG) was resized whole to 256×1,920,000 px before its centre was cut: 2.2 GB and
    4.6 s to predict one file, and 8×1,000,000 px ran out of memory. Now only the crop's square is resampled, with
    nearly the pixels of the whole resize."""
    from transferkit.data import images

    yy, xx = np.mgrid[0:60000, 0:8].astype(np.float32)
    strip = Image.fromarray((128 + 100 * np.sin(yy / 3 + xx / 2)).astype(np.uint8))  # smooth, not noise
    pre = Preprocessing(224, 256, interpolation, (0.5,) * 3, (0.5,) * 3)
    want = np.asarray(_reference(pre)(strip.crop((0, 29000, 8, 31000))), dtype=np.int16)  # the centre, resized alike
    asked = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: asked.append(size) or resize(self, size, *a, **k))
    got = np.asarray(eval_crop(pre)(strip), dtype=np.int16)
    assert got.shape == (224, 224) and max(w * h for w, h in asked) <= 224 * 224
    assert np.abs(got - want).mean() < 0.5 and np.abs(got - want).max() <= 2
    for size in ((4000, 20), (20, 4000), (640, 480)):  # wide, tall, a photo (its exact path): the same crop still
        image = Image.new("RGB", size, (10, 200, 30))
        assert np.asarray(eval_crop(pre)(image)).shape == (224, 224, 3)
