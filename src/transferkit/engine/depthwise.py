"""Depthwise convolutions' gradients under CPU bf16 autocast, each in whichever of bf16 and fp32 is faster here.

Efficient/MobileNet-style backbones spend most of a CPU training step in the backward pass of their depthwise
convolutions, and oneDNN's bf16 kernels for it are much slower than its fp32 ones for some layer shapes and
faster for others, while the bf16 forward is fast. Measured on a 2-core EPYC with AVX512_BF16 (efficientnet_lite0,
batch 32, channels_last): the weight gradient of a 5×5 depthwise layer on 7×7 maps 52 ms in bf16 against 9 ms in
fp32; the input gradient of a strided 3×3 layer on 113×113 maps 137 ms against 61; but a 3×3 layer's input gradient
on 56×56 maps 6 ms in bf16 against 32 in fp32. No fixed rule fits every layer, or every CPU.

So where a training forward runs under CPU bf16 autocast, `faster_depthwise_grads()` routes each depthwise
convolution through `DepthwiseConv`: the forward exactly as autocast runs it (bf16), and each gradient (input,
weight) computed in the dtype measured faster for that layer's shapes on this machine. Both dtypes are timed on
the first batch that reaches a shape (each run twice, the second timed: the first builds oneDNN's kernel); the
choice is kept per machine in the cache (`depthwise-grads.json` beside the feature stores), so a machine's later
runs, and a resumed run, compute every gradient the same way without measuring. Elsewhere (fp32, CUDA, inference,
frozen layers) nothing changes.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_choices: dict[str, str] | None = None  # this machine's: "input|weight shapes…" → "bf16" or "fp32"
_key = ""  # the machine key they are kept under (environment.machine_key), read with them
_used: dict[str, str] = {}  # the gradients this process computed, by the same keys


class DepthwiseConv(torch.autograd.Function):
    """conv2d with groups == input channels in x's dtype (bf16); its backward computes each gradient in the
    dtype chosen for the layer's shapes (`_in_faster_dtype`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, x.shape[1])
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding,
                        dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        shapes = f"x={list(x.shape)} w={list(weight.shape)} stride={stride} padding={padding} dilation={dilation}"

        grads = {}  # the incoming gradient in each dtype a computation asks for, cast once

        def gradient(which: int, dtype):  # aten's backward for one of (input, weight), in `dtype`
            mask = [which == 0, which == 1, False]
            # the tensor whose gradient is asked for is only read for its shape and layout
            inputs = (torch.empty_like(x, dtype=dtype), weight.to(dtype)) if which == 0 else \
                     (x.to(dtype), torch.empty_like(weight, dtype=dtype))
            if dtype not in grads:
                grads[dtype] = grad.to(dtype)
            return torch.ops.aten.convolution_backward(grads[dtype], *inputs, None, stride, padding, dilation,
                                                       False, [0, 0], groups, mask)[which]

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _in_faster_dtype(f"input {shapes}", lambda dtype: gradient(0, dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _in_faster_dtype(f"weight {shapes}", lambda dtype: gradient(1, dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _in_faster_dtype(key: str, compute) -> torch.Tensor:
    """compute(dtype) in the dtype chosen for `key` on this machine; measured (and saved) the first time."""
    choices = _machine_choices()
    if key in choices:
        _used[key] = choices[key]
        return compute(DTYPES[choices[key]])
    seconds, results = {}, {}
    for name, dtype in DTYPES.items():
        compute(dtype)  # the first call builds oneDNN's kernel for these shapes
        t = time.perf_counter()
        results[name] = compute(dtype)
        seconds[name] = time.perf_counter() - t
    choices[key] = _used[key] = min(seconds, key=seconds.get)
    _save(key, choices[key])
    return results[choices[key]]


def _choice_file():
    from ..caches import DEPTHWISE_FILE, feature_root

    return feature_root() / DEPTHWISE_FILE


def _machine_key() -> str:
    from .environment import machine_key

    return machine_key(torch.device("cpu"))


def _valid(entry) -> dict[str, str]:
    """A machine's entry of the cache file, without anything damaged in it (measured again)."""
    return {k: v for k, v in entry.items() if v in DTYPES} if isinstance(entry, dict) else {}


def _machine_choices() -> dict[str, str]:
    global _choices, _key
    if _choices is None:
        from ..io import read_json_object

        _key = _machine_key()
        _choices = _valid(read_json_object(_choice_file()).get(_key))
    return _choices


def _save(key: str, choice: str) -> None:
    """Into this machine's entry of the cache file, merged with what other processes saved meanwhile."""
    from ..io import update_json_object

    if not update_json_object(_choice_file(), _key, lambda entry: {**_valid(entry), key: choice}):
        log.debug("depthwise gradient choice not saved in %s", _choice_file())


def used() -> dict[str, int]:
    """How many of the depthwise gradients (per layer shape) this process computed in each dtype, for metrics.json."""
    return {name: sum(choice == name for choice in _used.values()) for name in DTYPES} if _used else {}


def forget_choices() -> None:
    """Read the cache file again on the next choice (tests; another TRANSFERKIT_FEATURE_CACHE)."""
    global _choices
    _choices = None


class _RouteDepthwise(TorchFunctionMode):
    """Sends conv2d calls that are depthwise and need a gradient to DepthwiseConv; every other call as it was."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            routed = _depthwise(*args, **kwargs)
            if routed is not None:
                return routed
        return func(*args, **kwargs)


def _depthwise(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """DepthwiseConv's output for a conv2d call it can take, else None."""
    if (groups == 1 or x.dim() != 4 or groups != x.shape[1] or weight.shape[0] != groups
            or isinstance(padding, str) or not (x.requires_grad or weight.requires_grad)):
        return None
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    with torch.autocast("cpu", enabled=False):
        return DepthwiseConv.apply(x.to(torch.bfloat16), weight, bias, pair(stride), pair(padding), pair(dilation))


def faster_depthwise_grads(device: torch.device, precision: str):
    """The context a training forward runs in, inside its autocast: on a CPU in bf16 with gradients on, depthwise
    convolutions take DepthwiseConv; elsewhere nothing."""
    if device.type == "cpu" and precision == "bf16" and torch.is_grad_enabled():
        return _RouteDepthwise()
    return nullcontext()
