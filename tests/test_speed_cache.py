"""The feature cache: a rerun recomputes nothing, a changed file or preprocessing is recomputed, and
training on cached features gives what the uncached path gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from transferkit.config import TrainConfig
from transferkit.data.transforms import dihedral, normalize_batch
from transferkit.engine.fit import fit

# fp32: the two paths below are compared to 1e-4; bf16 (--precision auto on a CPU with native bf16)
# meets its own, looser bound (tests/test_precision.py).
FAST = dict(model="efficientnet_lite0", epochs=1, engine="torch", workers=0, precision="fp32")


def _stats(metrics: dict) -> tuple[int, int]:
    src = metrics["source"]
    return src["train"]["hits"] + src["val"]["hits"], src["train"]["computed"] + src["val"]["computed"]


@pytest.mark.slow
def test_rerun_hits_and_changes_miss(tiny_folder: Path, tmp_path: Path):
    run = lambda name, **kw: fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / name), **{**FAST, **kw}))
    assert _stats(run("a")) == (0, 24)
    assert _stats(run("b", lr=0.01)) == (24, 0)  # a new head or learning rate costs no backbone time
    changed = next((tiny_folder / "train" / "ants").glob("*.png"))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(changed)
    assert _stats(run("c")) == (23, 1)
    assert _stats(run("d", image_size=64)) == (0, 24)  # preprocessing is part of the key


@pytest.mark.slow
def test_cached_training_equals_uncached(tiny_folder: Path, tmp_path: Path):
    # views=1, no augmentation and one batch per epoch: the two paths see the same inputs in each step.
    common = dict(FAST, epochs=2, views=1, augment="none", batch_size=16, optimizer="adam", lr=0.01)
    outs = {}
    for cache in (True, False):
        m = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / f"c{cache}"), cache=cache, **common))
        outs[cache] = (m, load_file(str(tmp_path / f"c{cache}" / "last.safetensors")))
    assert outs[True][0]["source"]["kind"] == "cached-features"
    assert outs[False][0]["source"]["kind"] == "image-batches"
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(outs[True][1][name], outs[False][1][name], atol=1e-4), name
    ev = [json.loads((tmp_path / f"c{c}" / "evaluation.json").read_text()) for c in (True, False)]
    assert ev[0]["accuracy"] == ev[1]["accuracy"]


def test_streamed_crops_give_the_eval_transforms_pixels_bit_for_bit(tmp_path: Path):
    """Extraction streams uint8 crops (grey ones as one channel) and normalizes whole batches; what the
    network sees must be exactly what eval_transform (predict, evaluate, export) gives each file, also
    in a batch that mixes grey and colour files and for a backbone whose mean differs per channel."""
    from transferkit.data.images import load_rgb
    from transferkit.data.transforms import eval_transform
    from transferkit.engine.features import FileViewDataset, View, _collate, _DecodedAhead
    from transferkit.models.registry import get_spec

    rng = np.random.default_rng(0)
    files = {"grey.png": rng.integers(0, 256, (70, 90), dtype=np.uint8),
             "colour.png": rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),
             "grey-alpha.png": rng.integers(0, 256, (60, 60, 2), dtype=np.uint8)}  # LA: composited, RGB
    paths = []
    for name, pixels in files.items():
        Image.fromarray(pixels).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    views = [View(0), View(5)]
    for model in ("efficientnet_lite0", "resnet18"):
        pre = get_spec(model).preprocessing
        dataset = FileViewDataset([(p, views) for p in paths], pre)
        assert dataset[0][0].dtype == np.uint8 and dataset[0][0].shape[1] == 1  # grey stays one channel
        for batch in ([dataset[0]], [dataset[0], dataset[1], dataset[2]]):
            x, items, errors = _collate(batch)
            got = normalize_batch(x, pre, out=torch.full((len(x), 3, *x.shape[2:]), float("nan")))
            want = torch.stack([dihedral(eval_transform(pre)(load_rgb(paths[i])), v.index)
                                for i in items for v in views])
            assert not errors and torch.equal(got, want), model
        # Threads decode ahead and hand the batches over in order.
        streamed = list(_DecodedAhead(dataset, per_batch=2, threads=2, ahead=1))
        assert [items for _, items, _ in streamed] == [[0, 1], [2]]
        assert torch.equal(torch.cat([x for x, _, _ in streamed]), _collate([dataset[i] for i in range(3)])[0])


def test_crops_of_one_network_share_its_onnx_export_and_engine_choice(tmp_path, monkeypatch):
    """The export and the measured engine choice depend on the network and its input size, not on the crop
    (resize size) or the cached dtype: a second crop or the search's final run exports and measures nothing."""
    from transferkit.engine.features import store_for

    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path))
    pre = {"input_size": 224, "resize_size": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    base = {"model": "efficientnet_lite0", "weights": "pretrained", "preprocessing": pre, "point": "taps6-meanmax"}
    store = store_for(base)
    whole_frame = store_for({**base, "preprocessing": {**pre, "resize_size": 224}})
    assert whole_frame.root != store.root and whole_frame.onnx_path == store.onnx_path
    assert store_for({**base, "dtype": "float16"}).onnx_path == store.onnx_path
    assert store_for({**base, "point": "stages[:7]"}).onnx_path != store.onnx_path
    assert store_for({**base, "preprocessing": {**pre, "input_size": 300}}).onnx_path != store.onnx_path
    assert store.onnx_path.parent.is_dir() and store.onnx_path.name == "frozen.onnx"
