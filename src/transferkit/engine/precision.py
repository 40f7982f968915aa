"""--precision auto|fp32|bf16: bfloat16 autocast where the device computes it natively, fp32 elsewhere.

Weights always stay fp32 (the optimizer updates fp32 master weights); autocast only runs the matmuls and
convolutions in bf16, with fp32 accumulation. Decided at run time: the same install runs on CPUs with
and without AVX512_BF16/AMX and on GPUs with and without bf16 tensor cores.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from ..config import PRECISIONS  # noqa: F401  (the choices, kept with the other options)

log = logging.getLogger(__name__)

# Max abs difference allowed between a bf16 engine and fp32 eager torch, relative to the output's scale
# (max(1, max |fp32 output|)). bf16 keeps 8 significant bits: each rounding of an input or weight is off
# by up to 2^-9 ≈ 0.2% of its value, and oneDNN/cuDNN accumulate in fp32, so error grows with depth, not
# with the reduction length. Measured on efficientnet_lite0's pooled features (32 random 224 px images,
# 2-core AVX512_BF16 EPYC, torch 2.14): max abs diff 1.8% of the scale, mean 0.04%. 5% leaves room for
# deeper backbones while a wrong kernel, layout or weight (differences the size of the scale) still fails.
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


def describe(precision: str, device: torch.device) -> dict:
    """For metrics.json: what was asked, what it meant on this device, and why."""
    return {"requested": precision, "resolved": resolve(precision, device), "native_bf16": native_bf16(device)}


CHOICES_FILE = "training-precision.json"  # in the cache folder: one measured choice per machine and workload


def training_precision(requested: str, model: torch.nn.Module, batch: tuple, device: torch.device,
                       workload: str, cache_dir=None, batchnorm_frozen: bool = False) -> tuple[str, dict]:
    """The precision a training run uses, and what decided it (for metrics.json).

    fp32 or bf16 asked for: that. auto: fp32 where the device has no native bf16; where it has, the faster of
    the two for a training step of this model at this batch shape, timed on a copy of the model (2-core EPYC
    with AVX512_BF16, lite0 finetune at 224 px: bf16 was 1.7x faster on one machine and 0.87x on another), once
    per machine and `workload` (the choice is kept in cache_dir/CHOICES_FILE)."""
    from .environment import machine_key

    resolved = resolve(requested, device)
    info = {"requested": requested, "resolved": resolved, "native_bf16": native_bf16(device), "choice": "asked"}
    if requested != "auto" or resolved != "bf16":
        info["choice"] = "asked" if requested != "auto" else "device"
        return resolved, info
    key = f"{machine_key(device)} | {workload} | batch={list(batch)}"
    known = _read_choices(cache_dir)
    if isinstance(known.get(key), dict) and known[key].get("precision") in ("fp32", "bf16"):
        info.update(resolved=known[key]["precision"], choice="cached", step_seconds=known[key].get("step_seconds"))
        return info["resolved"], info
    seconds = {p: _step_seconds(model, batch, device, p, batchnorm_frozen) for p in ("fp32", "bf16")}
    best = min(seconds, key=seconds.get)
    info.update(resolved=best, choice="measured", step_seconds=seconds)
    log.info("training runs in %s (a step: %s)", best, ", ".join(f"{p} {s:.2f}s" for p, s in seconds.items()))
    known[key] = {"precision": best, "step_seconds": seconds}
    _write_choices(cache_dir, known)
    return best, info


def _step_seconds(model: torch.nn.Module, batch: tuple, device: torch.device, precision: str,
                  batchnorm_frozen: bool) -> float:
    """Fastest of two timed forward + backward passes (after a warm-up that builds the kernels) on a throwaway
    copy of the model in training mode, on random images of the run's batch shape."""
    import copy
    import time

    from ..models.batchnorm import freeze_statistics

    net = copy.deepcopy(model).train()
    if batchnorm_frozen:
        freeze_statistics(net)
    x = torch.randn(*batch, device=device)
    if device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast(device, precision):
            out = net(x)
        (out[0] if isinstance(out, tuple) else out).float().logsumexp(1).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    del net
    return min(times[1:])


def _read_choices(cache_dir) -> dict:
    import json
    from pathlib import Path

    try:
        known = json.loads((Path(cache_dir) / CHOICES_FILE).read_text()) if cache_dir else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_choices(cache_dir, known: dict) -> None:
    from pathlib import Path

    from ..io import atomic_write_json

    if not cache_dir:
        return
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cache_dir) / CHOICES_FILE, known)
    except Exception as exc:  # noqa: BLE001 - a read-only cache costs a measurement next time, no more
        log.info("could not keep the training precision choice (%s)", exc)
