"""Where a run ran: recorded with every run and benchmark so numbers can be compared honestly."""

from __future__ import annotations

import os
import platform

import torch

from ..errors import UsageError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}") from None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels are fastest (and whether bf16 is native)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "asimd",
              "sve")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return [platform.machine()]


def machine_key(device: torch.device) -> str:
    """What makes one engine faster than another here: the processor, its features, the thread count and
    the runtimes' versions. A decision measured under one key is reused only under the same key."""
    parts = [cpu_model(), ",".join(cpu_flags()), f"threads={torch.get_num_threads()}", f"torch={torch.__version__}"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    try:
        from importlib.metadata import version

        parts.append(f"onnxruntime={version('onnxruntime')}")
    except Exception:  # noqa: BLE001 - not installed
        pass
    return " | ".join(parts)


def describe_environment(device: torch.device | None = None) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else "cpu",
        "cpu_flags": cpu_flags(),
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
