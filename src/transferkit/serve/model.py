"""The model a server holds, and its card (GET /model and the page).

The ONNX engine needs only onnxruntime, numpy and Pillow; the torch engine (a run folder or a
checkpoint) imports torch when it loads. The card reads what the run left beside the model: the
export's parity check (export.json) and the training metrics (metrics.json). A model copied alone to a
deployment box still serves; its card then says only what the ONNX file itself carries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UsageError
from ..run_folder import RunFolder, onnx_model_path

TRAINING_KEYS = ("mode", "best_val_acc", "best_val_acc_interval", "best_val_balanced_accuracy", "best_val_macro_f1",
                 "best_epoch", "epochs_run", "train_images", "val_images")


@dataclass
class ServedModel:
    classifier: object  # OnnxClassifier or Predictor: .classes, .preprocess_bytes(data, name), the row table (predict.py)
    engine: str
    path: Path
    card: dict
    lanes: int = 1  # forward passes the batcher may run side by side


def load_served_model(model: str | Path, engine: str | None = None, threads: int | None = None,
                      precision: str = "auto", lanes: int | None = None) -> ServedModel:
    from ..inference import model_kind

    path = Path(model)
    kind = model_kind(path)  # by content, as `transferkit predict` tells
    engine = engine or ("onnx" if kind == "onnx" else "torch")
    if engine == "onnx":
        from ..onnx_predict import OnnxClassifier

        path = onnx_model_path(path)
        lanes, threads = onnx_layout(lanes, threads)
        # No spinning: decoding and HTTP threads share the cores with inference (measured in
        # benchmarks/serve.py: with spinning, 16 clients got about 0.6x the throughput on a loaded 2-core box).
        # One session serves every lane: ONNX Runtime's run() may be called from several threads at once.
        clf = OnnxClassifier(path, threads=threads, spinning=False)
        facts = {"architecture": clf.architecture, "classes": clf.classes, "preprocessing": clf.preprocessing,
                 "lanes": lanes, "threads_per_lane": threads}
        run, export = _run_of_onnx(path)
    else:
        if kind == "onnx":
            raise UsageError(f"--engine torch needs a run folder or .safetensors checkpoint, not the ONNX model {path}")
        if (lanes or 1) > 1:
            raise UsageError("--lanes applies to the ONNX engine; the torch engine runs one forward pass at a time")
        lanes = 1
        from ..engine.checkpoint import resolve_checkpoint
        from ..predict import Predictor

        path = resolve_checkpoint(path)
        clf = Predictor(path, precision=precision)
        warm_up(clf)
        facts = {**{k: clf.meta[k] for k in ("architecture", "classes", "preprocessing")}, "precision": clf.precision}
        run = RunFolder(path.parent)
        export = RunFolder.read_json(run.export_record)
    card = {**facts, "engine": engine, "model": str(path), "model_date": _date_of(path),
            "export": _parity_of(export, path), **_training(run)}
    return ServedModel(clf, engine, path, card, lanes)


def warm_up(clf) -> None:
    """One forward pass on a blank image before the server listens: the kernels are set up and a frozen part's
    engine is exported and chosen (predict.FrozenSplit; ~1.5 s on a machine that has not chosen it yet) before
    the first request, not during it."""
    import torch

    size = clf.preprocessing.input_size
    clf.table_of([torch.zeros(3, size, size)])


def onnx_layout(lanes: int | None, threads: int | None) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for the ONNX engine; what is not given fills the cores. By default
    one single-threaded lane per core: on a CPU, passes side by side on small batches get more images
    through than one pass split over the cores (benchmarks/serve.py measures both layouts)."""
    cores = os.cpu_count() or 1
    if threads is None:
        threads = max(1, cores // lanes) if lanes else 1
    return lanes or max(1, cores // threads), threads


def _run_of_onnx(path: Path) -> tuple[RunFolder | None, dict | None]:
    """(run folder, export.json) for RUN/export/model.onnx; either may be gone on a deployment box."""
    export = RunFolder.read_json(path.parent / RunFolder.EXPORT_RECORD)
    checkpoint = Path(export["checkpoint"]) if export and export.get("checkpoint") else None
    for folder in ([checkpoint.parent] if checkpoint else []) + [path.parent.parent]:
        if RunFolder(folder).finished():
            return RunFolder(folder), export
    return None, export


def _parity_of(export: dict | None, model: Path) -> dict | None:
    """The export check of this very file: the float model's parity or the int8 model's agreement."""
    if not export:
        return None
    earlier = export.get("earlier")  # the folder's other formats, exported before the last one (export._record)
    for record in [export, *(earlier.values() if isinstance(earlier, dict) else [])]:
        if Path(record.get("path") or "").name == model.name:
            return {"format": record.get("format"), **record.get("parity", {})}
        int8 = record.get("int8") or {}
        if Path(int8.get("path") or "").name == model.name:  # None where the int8 model was refused and removed
            return {"format": "onnx int8", **int8}
    return None


def _training(run: RunFolder | None) -> dict:
    metrics = RunFolder.read_json(run.metrics) if run else None
    if not metrics:
        return {"training": None, "trained_date": None}
    return {"training": {k: metrics[k] for k in TRAINING_KEYS if k in metrics},
            "trained_date": _date_of(run.metrics)}


def _date_of(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
