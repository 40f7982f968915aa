"""Conv → BN folding (models/batchnorm.py): same outputs as the unfolded network for every registered
backbone, frozen statistics in training, parameter names untouched, modules restored after training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from transferkit.config import TrainConfig
from transferkit.engine.fit import fit
from transferkit.models.adapt import build_model
from transferkit.models.batchnorm import Folding, conv_bn_pairs, freeze_statistics
from transferkit.models.registry import get_spec, list_specs_names


def _randomise_bn(model: nn.Module) -> None:
    # Fresh BN layers are identity maps (mean 0, var 1, γ 1, β 0): a wrong fold would go unnoticed.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


# The big networks take seconds each to build at random: `make test-fast` folds the small ones.
BIG = {"resnet34", "resnet50", "inception_v3", "vgg11_bn", "vgg16", "densenet121", "efficientnet_lite2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n
                                  for n in list_specs_names()])
def test_folded_equals_unfolded_for_every_backbone(name):
    spec = get_spec(name)
    model = build_model(spec, 3, pretrained=False).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 112 if name != "inception_v3" else 160, 112 if name != "inception_v3" else 160)
    folding = Folding(model)
    with torch.no_grad():
        plain = model(x)
        n = folding.fold()
        folded = model(x)
        folding.unfold()
        again = model(x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (n > 0) == has_bn
    scale = plain.abs().max().clamp_min(1.0)
    assert float((folded - plain).abs().max() / scale) < 1e-4
    assert torch.equal(again, plain)
    assert not any("forward" in vars(m) for m in model.modules())  # class forwards restored


def test_train_mode_batchnorm_is_not_folded_and_switching_is_caught():
    model = build_model(get_spec("resnet18"), 2, pretrained=False)
    folding = Folding(model)
    model.train()
    assert folding.fold() == 0  # batch statistics cannot be folded
    model.eval()
    assert folding.fold() == len(conv_bn_pairs(model)) == 20
    model.train()
    with pytest.raises(RuntimeError, match="fold"):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_frozen_statistics_train_gamma_beta_and_match_unfolded_gradients():
    torch.manual_seed(0)
    a = build_model(get_spec("efficientnet_lite0"), 2, pretrained=False)
    _randomise_bn(a)
    b = build_model(get_spec("efficientnet_lite0"), 2, pretrained=False)
    b.load_state_dict(a.state_dict())
    keys = list(a.state_dict())
    for model in (a, b):
        model.train()
        freeze_statistics(model)
    Folding(a).fold()
    assert list(a.state_dict()) == keys  # checkpoints and exports see the same names
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    for model in (a, b):
        nn.functional.cross_entropy(model(x), y).backward()
    bn_a, bn_b = a.get_submodule("bn1"), b.get_submodule("bn1")
    assert bn_a.weight.grad is not None and bn_a.weight.grad.abs().sum() > 0
    assert torch.allclose(bn_a.weight.grad, bn_b.weight.grad, rtol=1e-3, atol=1e-6)
    assert torch.allclose(a.conv_stem.weight.grad, b.conv_stem.weight.grad, rtol=1e-3, atol=1e-6)
    assert torch.equal(bn_a.running_mean, bn_b.running_mean)  # statistics did not move


@pytest.mark.slow
def test_finetune_with_frozen_batchnorm_keeps_statistics_and_restores_modules(tiny_folder, tmp_path):
    from transferkit.engine.checkpoint import load_checkpoint

    cfg = TrainConfig(data=str(tiny_folder), out=str(tmp_path / "run"), model="efficientnet_lite0", mode="finetune",
                      epochs=1, batch_size=4, lr=0.01, batchnorm="frozen", image_size=32)
    m = fit(cfg)
    assert m["epochs_run"] == 1
    start = build_model(get_spec("efficientnet_lite0"), 2, pretrained=True)
    model, _ = load_checkpoint(tmp_path / "run" / "best.safetensors")
    trained = model.state_dict()
    assert torch.equal(trained["bn1.running_mean"], start.state_dict()["bn1.running_mean"])
    assert not torch.equal(trained["bn1.weight"], start.state_dict()["bn1.weight"])
