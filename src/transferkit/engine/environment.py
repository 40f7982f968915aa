"""Where a run ran: recorded with every run and benchmark so numbers can be compared honestly."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from ..errors import UsageError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    # torch knows more device types (mps, meta, xpu) than transferkit runs on: each failed inside torch, in
    # training after the run folder had its first files
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return device


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


_MEMINFO = "/proc/meminfo"
# A cgroup's (container's, job scheduler's) memory limit and usage, v2 then v1, and the statistic of page cache
# the kernel reclaims first, which usage counts but allocations can take back.
_CGROUPS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def available_memory() -> int | None:
    """Bytes this process may still allocate: the machine's available memory (Linux: MemAvailable; elsewhere the
    free physical pages), or less where its cgroup's limit leaves less; None where neither is known."""
    sizes = []
    try:
        with open(_MEMINFO, encoding="utf-8") as fh:
            sizes += [int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):  # not on this system (macOS has no SC_AVPHYS_PAGES)
            pass
    for limit_file, usage_file, stat_file, reclaimable in _CGROUPS:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            sizes.append(int(limit) - usage + _stat_value(stat_file, reclaimable))
        break
    return max(0, min(sizes)) if sizes else None


def _stat_value(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


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
