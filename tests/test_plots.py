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


def test_small_pictures_get_cells_wide_enough_for_their_titles(tmp_path):
    """32-px images made 38-px cells whose titles kept 8 characters ("ants / …": the prediction cut off); they are
    enlarged by whole pixels into cells of at least 128 px."""
    rng = np.random.default_rng(2)
    items = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(path)
        items.append({"path": str(path), "true": "ants", "predicted": "bees", "probability_of_predicted": 0.6})
    with Image.open(plot_top_losses(items, tmp_path / "top_losses.png")) as img:
        assert img.width >= 4 * 128
        pixels = np.asarray(img.convert("RGB"))
    first = pixels[:, : img.width // 4]
    assert len(np.unique(first.reshape(-1, 3), axis=0)) > 20  # the picture is there, enlarged


def test_a_title_of_wide_letters_stays_over_its_own_picture(tmp_path):
    grey = np.zeros((2, 3, 64, 64), dtype=np.float32)
    out = plot_image_grid(grey, ["W" * 40, ""], tmp_path / "grid.png", (0.5,) * 3, (1.0,) * 3, ncols=2)
    pixels = np.asarray(Image.open(out).convert("L"))
    title_band = pixels[:18]
    assert title_band[:, : pixels.shape[1] // 2].min() < 100  # the title is drawn...
    assert title_band[:, pixels.shape[1] // 2:].min() > 200  # ...and none of it over the second picture


def test_confusion_axis_labels_tell_apart_names_alike_in_their_first_characters(tmp_path, monkeypatch):
    """Names were cut to their first 20 characters: two classes that differ after them had the same label."""
    from matplotlib.axes import Axes

    seen = []
    real = Axes.set_yticks
    monkeypatch.setattr(Axes, "set_yticks", lambda ax, ticks, labels=None, **kw: (seen.append(labels),
                                                                                   real(ax, ticks, labels, **kw)))
    classes = ["photos_of_category_number_1", "photos_of_category_number_2", "photos_of_category_number_3", "cat",
               "\u202ebee"]  # a right-to-left override was obeyed: "eeb"
    plot_confusion(np.eye(5), classes, tmp_path / "confusion.png")
    assert len(set(seen[-1])) == 5 and seen[-1][-2:] == ["cat", "[U+202E]bee"]
    assert all(len(label) <= 20 for label in seen[-1])


def test_a_character_the_font_lacks_is_no_warning(tmp_path):
    """A class named "bees 🐝" printed matplotlib's UserWarning, with plots.py's path, in a run's output."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(np.eye(2), ["bees 🐝", "ants 🐜"], tmp_path / "confusion.png")
        plot_compare({"bees 🐝": [0.5, 0.6]}, tmp_path / "compare.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]
