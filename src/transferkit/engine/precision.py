"""--precision auto|fp32|bf16: bfloat16 autocast where the device computes it natively, fp32 elsewhere.

Weights always stay fp32 (the optimizer updates fp32 master weights); autocast only runs the matmuls and
convolutions in bf16, with fp32 accumulation. Decided at run time: the same install runs on CPUs with
and without AVX512_BF16/AMX and on GPUs with and without bf16 tensor cores.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch

from ..config import PRECISIONS  # noqa: F401  (the choices, kept with the other options)

log = logging.getLogger(__name__)

# Max abs difference allowed between a bf16 engine and fp32 eager torch, relative to the output's scale
# (max(1, max |fp32 output|)). bf16 keeps 8 significant bits: each rounding of an input or weight is off
# by up to 2^-9 ≈ 0.2% of its value, and oneDNN/cuDNN accumulate in fp32, so error grows with depth, not
# with the reduction length. Measured on efficientnet_lite0's pooled features (32 random 224 px images,
# 2-core AVX512_BF16 EPYC, torch 2.14): max abs diff 1.8% of the scale, mean 0.04%. 5% leaves room for
# deeper backbones while a wrong kernel, layout or weight (differences the size of the scale) still fails.
# Real images stray further than random ones: on 32 ELPV cells the largest difference was 8.5% of the scale
# (mean 0.18%) on that CPU, and an H200's cuDNN strayed past the bound too (0.37-5.4 absolute), so the
# frozen part stays fp32 on ELPV (the engine choice says so in one line). Kept strict: features feed every
# later step.
BF16_PARITY_RTOL = 5e-2


def native_bf16(device: torch.device) -> bool:
    """True where the device computes bf16 in hardware: AVX512_BF16 or AMX on a CPU, Ampere+ on CUDA.
    (oneDNN also runs bf16 on plain AVX-512 by conversion, and that is slower than fp32.)"""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    try:
        if probes:
            return any(bool(p()) for p in probes)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # older torch: oneDNN's own answer
    except (AttributeError, RuntimeError):
        return False


def resolve(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for a --precision value on this device."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        log.info("--precision bf16 on %s without native bf16: emulated, likely slower than fp32", device.type)
    return precision


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in for a resolved precision."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def training_autocast(device: torch.device, precision: str):
    """autocast for a forward whose backward follows: on a CPU in bf16, depthwise convolutions' gradients are
    also computed in whichever dtype is faster for their shapes (engine/depthwise.py); elsewhere autocast alone."""
    from .depthwise import faster_depthwise_grads

    with autocast(device, precision), faster_depthwise_grads(device, precision):
        yield


def describe(precision: str, device: torch.device) -> dict:
    """For metrics.json: what was asked, what it meant on this device, and why."""
    from .depthwise import used

    info = {"requested": precision, "resolved": resolve(precision, device), "native_bf16": native_bf16(device)}
    depthwise = used()  # bf16 training on a CPU: depthwise gradients by the dtype measured faster (this process's)
    return {**info, "depthwise_gradients": depthwise} if depthwise else info
