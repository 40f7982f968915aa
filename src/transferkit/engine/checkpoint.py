"""Checkpoints: weights as safetensors, metadata as JSON (inside the safetensors header and beside it).

Loading never unpickles: a checkpoint is tensors plus text. Everything needed to rebuild the model and
its preprocessing is in the metadata, so evaluate/predict/export never guess.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import CheckpointError
from ..io import atomic_write, atomic_write_json
from ..models.adapt import build_model
from ..models.registry import spec_named_by_checkpoint
from ..preprocessing import Preprocessing
from ..run_folder import RunFolder

FORMAT = "transferkit-checkpoint"
VERSION = 1
RESUME_PREFIX = "resume."  # `last` also holds optimizer/RNG tensors under this prefix (engine/resume.py)
REQUIRED_META = {"architecture": str, "classes": list, "preprocessing": dict}


def save_checkpoint(path: str | Path, model: nn.Module | dict, meta: dict, extra: dict | None = None) -> Path:
    """`model`: the module, or a state dict of it (the best epoch's weights, kept in memory)."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    # Shared/non-contiguous tensors are not allowed in safetensors; clone to be safe.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"transferkit": json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its best checkpoint; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        folder, path = path, RunFolder(path).best
        exported = sorted(folder.glob("*.onnx")) if not path.exists() else []
        if exported:  # RUN/export given for the run: "no checkpoint at RUN/export/best.safetensors" named no way on
            raise CheckpointError(f"{folder} holds an exported model, not a run: pass {exported[0]}")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (pass a run folder or a .safetensors file)")
    return path


def read_meta(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("transferkit")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from None
    if not raw:
        raise CheckpointError(f"{path} has no transferkit metadata; was it written by transferkit?")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a transferkit checkpoint (its metadata is not transferkit's)")
    wrong = [k for k, kind in REQUIRED_META.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise CheckpointError(f"{path} has broken metadata ({', '.join(wrong)} missing or of the wrong type)")
    return meta


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model (no pretrained download: the checkpoint has every weight) in eval mode."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    spec = spec_named_by_checkpoint(meta["architecture"], meta.get("architecture_source"), path)
    model = build_model(spec, len(meta["classes"]), pretrained=False)
    if isinstance(meta.get("probe"), dict):  # --mode linear-probe: the probe around the backbone
        from .probe import rebuild_probe

        model = rebuild_probe(model, spec, meta["probe"], len(meta["classes"]))
    try:
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(RESUME_PREFIX)}
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match {spec.name}: {str(exc).splitlines()[0]}") from None
    return model.eval(), meta


def preprocessing_of(meta: dict) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])
