"""Depthwise convolutions' gradients under CPU bf16 autocast (engine/depthwise.py): routed only where they apply,
each gradient as close to fp32 as autocast's own, the per-shape choice measured once and kept per machine."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import timm
import torch
import torch.nn as nn

from transferkit.engine import depthwise
from transferkit.engine.precision import training_autocast

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path))
    depthwise.forget_choices()
    yield tmp_path / "depthwise-grads.json"
    depthwise.forget_choices()


def _lite0() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3).train()
    return model.to(memory_format=torch.channels_last)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, context=nullcontext) -> dict[str, torch.Tensor]:
    """Parameter gradients of one loss, its forward in `context()` (fp32 by default)."""
    model.zero_grad(set_to_none=True)
    with context():
        out = model(x)
    nn.functional.cross_entropy(out.float(), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _routed():
    return training_autocast(CPU, "bf16")


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    return {k: float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) for k in want}


def _mobile_block() -> nn.Module:
    """Stem, a strided 5×5 depthwise conv, a pointwise one, a 3×3 depthwise one, a head: shallow enough that
    bf16 rounding stays at the percent level (a deep random-init network amplifies it past any useful bound)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16), nn.ReLU6(),
                         nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).to(memory_format=torch.channels_last)


def test_gradients_stay_as_close_to_fp32_as_autocasts_own(cache):
    model = _mobile_block()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0])
    reference = _grads(model, x, y)
    plain = _relative_errors(_grads(model, x, y, lambda: torch.autocast("cpu", dtype=torch.bfloat16)), reference)
    routed = _relative_errors(_grads(model, x, y, _routed), reference)
    assert routed.keys() == reference.keys()  # every parameter still gets its gradient
    for name in reference:  # bf16 rounding (0.3-5% here), no worse than autocast's own; a wrong one is off by ~100%
        assert routed[name] < 1.5 * plain[name] + 0.01, (name, routed[name], plain[name])
    (mine,) = json.loads(cache.read_text()).values()  # one machine's entry
    assert set(mine.values()) <= {"bf16", "fp32"}
    assert sorted(k.split()[0] for k in mine) == ["input", "input", "weight", "weight"]  # 2 depthwise layers
    assert sum(depthwise.used().values()) >= 4  # what metrics.json reports (engine/precision.py describe)


def test_a_kept_choice_is_reused_without_measuring(cache, monkeypatch):
    model = _lite0()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1])
    _grads(model, x, y, _routed)
    kept = json.loads(cache.read_text())
    (key,) = kept
    for forced in ("fp32", "bf16"):  # as another process on this machine reads it
        kept[key] = {k: forced for k in kept[key]}
        cache.write_text(json.dumps(kept))
        depthwise.forget_choices()
        monkeypatch.setattr(depthwise, "_save", lambda *a: pytest.fail("measured again"))
        calls = []
        real = torch.ops.aten.convolution_backward

        def counting(grad, *args, real=real):
            calls.append(grad.dtype)
            return real(grad, *args)

        monkeypatch.setattr(torch.ops.aten, "convolution_backward", counting)
        _grads(model, x, y, _routed)
        monkeypatch.setattr(torch.ops.aten, "convolution_backward", real)
        assert calls and set(calls) == {depthwise.DTYPES[forced]}  # one call per gradient, in the kept dtype


def test_a_damaged_choice_file_is_measured_again(cache):
    cache.write_text("{not json")
    model = _lite0()
    _grads(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), _routed)
    assert json.loads(cache.read_text())  # rewritten whole


def test_only_depthwise_convolutions_that_need_a_gradient_are_routed(cache):
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    full = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with training_autocast(CPU, "bf16"):
        assert type(dw(x).grad_fn).__name__ == "DepthwiseConvBackward"
        assert type(full(x).grad_fn).__name__ != "DepthwiseConvBackward"
        frozen = x.detach()
        dw.requires_grad_(False)
        assert dw(frozen).grad_fn is None  # nothing to differentiate: autocast's own conv
        dw.requires_grad_(True)
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), training_autocast(CPU, precision):
            assert dw(x).grad_fn is None
    with training_autocast(CPU, "fp32"):
        assert type(dw(x).grad_fn).__name__ != "DepthwiseConvBackward"
    assert not cache.exists() or json.loads(cache.read_text())  # nothing half-written


def test_strided_and_biased_depthwise_gradients_match_fp32(cache):
    torch.manual_seed(1)
    for stride, padding, bias in ((2, 0, True), (1, 2, False), (2, 1, True)):
        conv = nn.Conv2d(16, 16, 5 if padding != 1 else 3, stride=stride, padding=padding, groups=16, bias=bias)
        x = torch.randn(3, 16, 19, 19).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn_like(conv(x))
        want = torch.autograd.grad(conv(x), [x, *conv.parameters()], g)
        with training_autocast(CPU, "bf16"):
            out = conv(x)
        assert type(out.grad_fn).__name__ == "DepthwiseConvBackward"
        got = torch.autograd.grad(out.float(), [x, *conv.parameters()], g)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert float((a - b).norm() / b.norm()) < 0.02


def test_a_bf16_finetune_of_lite0_uses_and_records_them(cache, tmp_path):
    from conftest import make_image_folder

    from transferkit.config import TrainConfig
    from transferkit.engine.fit import fit

    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=32)
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="efficientnet_lite0", pretrained=False,
                        image_size=64, mode="finetune", epochs=1, batch_size=4, workers=0, precision="bf16",
                        recipe="tutorial", batchnorm="frozen"))
    counts = m["precision"]["depthwise_gradients"]
    assert set(counts) == {"bf16", "fp32"} and sum(counts.values()) >= 2 * 16  # lite0: 16 depthwise layers
    assert cache.is_file()  # kept for the machine's next runs
