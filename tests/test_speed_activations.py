"""Cached activations for partial mode: the registry's stages compose to the model, only the unfrozen
groups change, and training on cached activations gives what running the whole network gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transferkit.config import TrainConfig
from transferkit.engine.activations import CachedActivationSource
from transferkit.engine.fit import fit, make_source, prepare
from transferkit.engine.sources import ImageBatchSource
from transferkit.models.adapt import build_model
from transferkit.models.registry import get_spec


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_stages_compose_to_the_model(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_model(spec, 3, pretrained=False).eval()
    stages = spec.stages(model)
    assert len(stages) == len(spec.groups(model)) + 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = x
        for stage in stages:
            y = stage(y)
        assert torch.allclose(y, model(x), atol=1e-5)


@pytest.mark.slow
def test_cached_partial_trains_the_right_params_and_matches_uncached(tiny_folder: Path, tmp_path: Path):
    common = dict(model="efficientnet_lite0", mode="partial", unfreeze=2, epochs=2, views=1, augment="none",
                  batch_size=16, optimizer="sgd", lr=0.01, engine="torch", workers=0, cache_dtype="float32",
                  precision="fp32")  # compared to 1e-4
    weights = {}
    for cache in (True, False):
        m = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / f"p{cache}"), cache=cache, **common))
        assert m["source"]["kind"] == ("cached-activations" if cache else "image-batches")
        weights[cache] = load_file(str(tmp_path / f"p{cache}" / "last.safetensors"))
    start = build_model(get_spec("efficientnet_lite0"), 2, pretrained=True).state_dict()
    trained = ("blocks.6.", "conv_head.", "bn2.", "classifier.")
    for name, before in start.items():
        after = weights[True][name]
        if name.startswith(trained):
            assert torch.allclose(after, weights[False][name], atol=1e-4), name
        else:  # frozen groups, BatchNorm statistics included, are untouched
            assert torch.equal(after, before), name
    changed = [n for n in start if n.startswith(trained) and not torch.equal(weights[True][n], start[n])]
    assert any(n.startswith("blocks.6.") for n in changed) and "classifier.weight" in changed


@pytest.mark.parametrize("model, cache, expected", [
    ("squeezenet1_0", True, ImageBatchSource),  # no stages in the registry
    ("resnet18", False, ImageBatchSource),  # --no-cache
    ("resnet18", True, CachedActivationSource),
])
def test_partial_source_choice(tiny_folder: Path, tmp_path: Path, model, cache, expected):
    cfg = TrainConfig(data=str(tiny_folder), model=model, mode="partial", unfreeze=1, cache=cache,
                      pretrained=False, workers=0, out=str(tmp_path / "s"))
    assert type(make_source(prepare(cfg))) is expected


def test_partial_trains_its_conv_groups_on_every_thread(tiny_folder: Path, tmp_path: Path):
    """The one-thread rule of the linear head on cached features does not reach the cached-activation
    source: its trainable top groups are convolutions, and one thread would halve their speed."""
    cfg = TrainConfig(data=str(tiny_folder), model="resnet18", mode="partial", unfreeze=1, pretrained=False,
                      workers=0, out=str(tmp_path / "s"))
    source = make_source(prepare(cfg))
    threads = torch.get_num_threads()
    with source.compute_threads():
        assert torch.get_num_threads() == threads
