"""16-bit grey images from a 12-bit camera (values up to 4095) are read with 4095 as white, by training and by
everything that reads new images for the run, exactly as their 8-bit versions would be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from transferkit.config import TrainConfig
from transferkit.engine.fit import fit


def _folders(root: Path) -> tuple[Path, Path]:
    """The same pictures twice: as a 12-bit camera writes them (16-bit PNGs, values 0-4095) and scaled to 8 bits."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, name in enumerate(("cracked", "intact")):
            for i in range(n):
                values = rng.integers(0, 1500, (40, 40))
                values[::4] += 2500 if c else 0  # stripes tell the classes apart
                for bits, pixels in ((12, values.astype(np.uint16)),
                                     (8, np.rint(values * (255 / 4095)).astype(np.uint8))):
                    path = root / f"data{bits}" / split / name / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(path)
    return root / "data12", root / "data8"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bits")
    data12, data8 = _folders(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_FEATURE_CACHE", str(root / "cache"))
        metrics = {bits: fit(TrainConfig(data=str(data), out=str(root / f"run{bits}"), epochs=2, lr=0.01,
                                         image_size=64, engine="torch", precision="fp32"))
                   for bits, data in ((12, data12), (8, data8))}
    return root, data12, data8, metrics


def test_twelve_bit_images_train_as_their_8_bit_versions(runs):
    root, _, _, metrics = runs
    assert yaml.safe_load((root / "run12" / "config.yaml").read_text())["bit_depth"] == 12
    assert yaml.safe_load((root / "run8" / "config.yaml").read_text())["bit_depth"] is None
    def learned(m):  # every number of each epoch but its time
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in m["history"]]

    assert learned(metrics[12]) == learned(metrics[8])


def test_a_run_predicts_new_twelve_bit_images_as_it_trained(runs):
    from transferkit.predict import Predictor

    root, data12, data8, _ = runs
    predictor = Predictor(root / "run12")
    assert predictor.preprocessing.sixteen_bit_white == 4095
    eight_bit = Predictor(root / "run8")
    for name in ("cracked/0.png", "intact/1.png"):
        want = eight_bit.preprocess(str(data8 / "val" / name))
        assert torch.equal(predictor.preprocess(str(data12 / "val" / name)), want)
        assert torch.equal(predictor.preprocess(Image.open(data12 / "val" / name)), want)  # an image in memory
        assert torch.equal(predictor.preprocess_bytes((data12 / "val" / name).read_bytes(), name), want)


def test_bit_depth_given_reads_the_images_so(tmp_path):
    data12, _ = _folders(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path / "cache"))
        fit(TrainConfig(data=str(data12), out=str(tmp_path / "run"), epochs=1, image_size=64, bit_depth=16,
                        engine="torch", precision="fp32"))
    from transferkit.predict import Predictor

    assert Predictor(tmp_path / "run").preprocessing.sixteen_bit_white == 65535


def test_bit_depth_must_be_a_sensor_s():
    from transferkit.errors import UsageError

    with pytest.raises(UsageError, match="--bit-depth must be one of 8, 10, 12, 14, 16"):
        TrainConfig(data="x", bit_depth=11).validate()


def test_the_run_s_figures_and_report_show_twelve_bit_images_at_full_brightness(runs):
    import json

    from transferkit.results.plots import _load_thumbnail

    root, data12, data8, _ = runs
    assert json.loads((root / "run12" / "evaluation.json").read_text())["sixteen_bit_white"] == 4095
    thumbnail = _load_thumbnail(data12 / "val" / "intact" / "0.png", 40, 4095)
    assert np.array_equal(thumbnail[..., 0], np.asarray(Image.open(data8 / "val" / "intact" / "0.png")))


def test_a_sixteen_bit_image_is_read_with_the_white_given():
    from transferkit.data.images import to_rgb

    values = np.array([[0, 4095, 2048, 65535]], dtype=np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(values), sixteen_bit_white=4095))[0, :, 0].tolist() == [0, 255, 128, 255]
    assert np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0].tolist() == [0, 16, 8, 255]


def test_data_check_pages_show_twelve_bit_images_at_full_brightness(runs):
    import base64
    import io
    import re

    from transferkit.results.check_html import _figure, _Pictures

    _, data12, data8, _ = runs
    html = _figure(_Pictures(data12, 4095), {"path": "val/intact/0.png", "class": "intact", "split": "val"})
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert np.array_equal(shown, np.asarray(Image.open(data8 / "val" / "intact" / "0.png")))


def test_a_32_bit_grey_image_takes_the_data_s_white_too():
    from transferkit.data.images import to_rgb

    dark = Image.fromarray(np.array([[0, 200, 4095]], dtype=np.int32), "I")  # a dark 12-bit frame read as mode I
    assert np.asarray(to_rgb(dark, sixteen_bit_white=4095))[0, :, 0].tolist() == [0, 12, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 200]], dtype=np.int32), "I")))[0, :, 0].tolist() == [0, 200]
