import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.results.plots import (
    plot_compare,
    plot_confusion,
    plot_history,
    plot_image_grid,
    plot_top_losses,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def assert_real_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 5, "image is (nearly) one colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_plot_history(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.2 / e, "val_acc": 1 - 0.6 / e}
        for e in range(1, 6)
    ]
    history[2]["val_loss"] = None  # a missing value must be skipped, not crash
    out = plot_history(history, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    assert_real_png(out)


def test_plot_confusion_with_hostile_class_names(tmp_path):
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]  # last class absent: row of zeros
    out = plot_confusion(cm, ["cat", "$dog$_1", "<fox>"], tmp_path / "confusion.png")
    assert_real_png(out)
    assert_real_png(plot_confusion(cm, ["a", "b", "c"], tmp_path / "raw.png", normalize=False))
    with pytest.raises(ValueError):
        plot_confusion(cm, ["a", "b"], tmp_path / "bad.png")


@pytest.mark.parametrize("as_tensor", [True, False])
def test_plot_image_grid_undoes_normalisation(tmp_path, as_tensor):
    rng = np.random.default_rng(0)
    raw = rng.uniform(size=(5, 3, 24, 24)).astype(np.float32)
    normed = (raw - np.array(MEAN, dtype=np.float32)[:, None, None]) / np.array(STD, dtype=np.float32)[:, None, None]
    images = torch.from_numpy(normed) if as_tensor else normed
    out = plot_image_grid(images, ["cat", "dog", "cat", "fox", "dog"], tmp_path / "batch_grid.png", MEAN, STD, ncols=3)
    assert_real_png(out)


def test_plot_top_losses_skips_unreadable(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)).save(path)
        items.append({"path": str(path), "true": "cat", "predicted": "dog", "probability_of_predicted": 0.9 - i / 10})
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    items.append({"path": str(tmp_path / "broken.jpg"), "true": "a", "predicted": "b", "probability_of_predicted": 0.5})
    items.append({"path": str(tmp_path / "missing.png"), "true": "a", "predicted": "b", "probability_of_predicted": 0.5})
    out = plot_top_losses(items, tmp_path / "top_losses.png", image_size=64)
    assert_real_png(out)


def test_plot_top_losses_with_nothing_readable(tmp_path):
    out = plot_top_losses([{"path": str(tmp_path / "nope.png")}], tmp_path / "top.png")
    assert out.is_file()


def test_plot_compare(tmp_path):
    curves = {"pretrained": [0.8, 0.9, 0.93, 0.94], "scratch": [0.5, 0.6, 0.66, 0.7]}
    out = plot_compare(curves, tmp_path / "compare.png", title="pretrained vs scratch")
    assert_real_png(out)


def test_plot_image_grid_shows_original_colours(tmp_path):
    # Mid-grey normalised with ImageNet stats is dark and bluish; undone it is grey again.
    grey = np.full((1, 3, 32, 32), 0.5, dtype=np.float32)
    normed = (grey - np.array(MEAN, dtype=np.float32)[:, None, None]) / np.array(STD, dtype=np.float32)[:, None, None]
    out = plot_image_grid(torch.from_numpy(normed), ["grey"], tmp_path / "grey.png", MEAN, STD)
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    is_grey = (np.abs(pixels - 128) <= 2).all(axis=1)
    assert is_grey.mean() > 0.3


def test_thumbnails_follow_exif_orientation_and_shrink_large_jpegs(tmp_path):
    """Top-loss pictures are shown as a viewer shows the file (EXIF turn applied), from a reduced-scale decode."""
    from transferkit.results.plots import _load_thumbnail

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored landscape, shown portrait
    path = tmp_path / "turned.jpg"
    Image.new("RGB", (1600, 1200), (200, 40, 40)).save(path, "JPEG", exif=exif)
    thumb = _load_thumbnail(path, 64)
    assert thumb.shape == (64, 48, 3)
    assert _load_thumbnail(tmp_path / "missing.jpg", 64) is None
