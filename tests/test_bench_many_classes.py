"""benchmarks/many_classes.py: its generated folder has the classes and counts asked for, and is made once."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

_BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # its `common` helpers
_spec = importlib.util.spec_from_file_location("bench_many_classes", _BENCH / "many_classes.py")
many_classes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(many_classes)


def test_the_folder_has_every_class_in_both_splits_and_is_made_once(tmp_path):
    root = many_classes.generate(tmp_path / "data", classes=24, train_per_class=3, val_per_class=2)
    for split, per_class in (("train", 3), ("val", 2)):
        folders = sorted((root / split).iterdir())
        assert [f.name for f in folders] == [f"class{c:03d}" for c in range(24)]
        assert {len(list(f.glob("*.jpg"))) for f in folders} == {per_class}
    first = root / "train" / "class000" / "0.jpg"
    with Image.open(first) as image:
        assert image.size == (many_classes.SIDE, many_classes.SIDE) and image.mode == "RGB"
    stamp = first.stat().st_mtime_ns
    many_classes.generate(root, classes=24, train_per_class=3, val_per_class=2)
    assert first.stat().st_mtime_ns == stamp  # the marker: not made again


def test_classes_differ_in_colour_where_their_shape_is_the_same(tmp_path):
    """Classes 0 and 4 share a shape and differ in colour: their images' mean colours differ."""
    root = many_classes.generate(tmp_path / "data", classes=8, train_per_class=4, val_per_class=1)

    def mean_colour(c):
        return np.mean([np.asarray(Image.open(p), dtype=np.float32).mean((0, 1))
                        for p in (root / "train" / f"class{c:03d}").glob("*.jpg")], 0)

    assert np.abs(mean_colour(0) - mean_colour(4)).max() > 20
