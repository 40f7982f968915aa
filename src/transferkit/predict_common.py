"""The torch-free half of prediction, shared by the torch path (`predict.py`) and the ONNX deployment
path (`onnx_predict.py`): which files to classify, and how probabilities become output rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data.images import IMAGE_EXTENSIONS
from .errors import DataError, UsageError


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders walked (sorted) for image files. Missing paths are an error."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [str(Path(root) / f) for f in sorted(files)
                        if Path(f).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not f.startswith(".")]
        elif path.exists():
            out.append(str(path))
        else:
            raise UsageError(f"no such file or folder: {item}")
    if not out:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return out


def model_kind(path: str | Path) -> str:
    """What a model file is, by its content: "run" (a folder), "safetensors", "onnx" or "torchscript"."""
    import zipfile

    path = Path(path)
    if path.is_dir():
        return "run"
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return "unknown"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:  # TorchScript archives hold compiled code; torch.save zips do not
            return "torchscript" if any("/code/" in n or n.startswith("code/") for n in zf.namelist()) else "zip"
    # ONNX: a protobuf ModelProto, which starts with field 1 (ir_version, a varint): tag byte 0x08.
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be ≥ 1, not {top_k!r}")
    return top_k


def rows_from_probs(paths, probs, errors, classes, top_k: int, novelty=None, threshold: float | None = None
                    ) -> list[dict]:
    """One row per image, the same for every consumer (CLI csv/json, API, serving): path, label,
    probability, top_k, error, and novelty (score, novelty.py) and novel (score > threshold), both None
    where the model has no novelty reference or the file could not be read."""
    rows = []
    k = min(check_top_k(top_k), len(classes))
    for i, (path, p, err) in enumerate(zip(paths, probs, errors)):
        if err is not None:
            rows.append({"path": path, "label": None, "probability": None, "top_k": [], "error": err,
                         "novelty": None, "novel": None})
            continue
        order = np.argsort(-p)[:k]
        score = None if novelty is None else float(novelty[i])
        rows.append({
            "path": path,
            "label": classes[order[0]],
            "probability": float(p[order[0]]),
            "top_k": [{"label": classes[j], "probability": float(p[j])} for j in order],
            "error": None,
            "novelty": score,
            "novel": None if score is None else bool(score > threshold),
        })
    return rows


def batched_proba(paths, n_classes: int, preprocess, infer, batch_size: int = 32):
    """Probabilities (N, C) and per-path errors, for any runtime.

    `preprocess(path)` decodes one image into the runtime's input (raising on an unreadable file);
    `infer(list of inputs)` returns their (n, C) probabilities. A file that cannot be read gets a
    NaN row and its error message instead of stopping the others.
    """
    probs = np.full((len(paths), n_classes), np.nan, dtype=np.float32)
    errors: list[str | None] = []
    for start in range(0, len(paths), batch_size):
        inputs, rows, chunk_errors = preprocess_each(paths[start:start + batch_size], preprocess)
        if inputs:
            probs[[start + i for i in rows]] = infer(inputs)
        errors += chunk_errors
    return probs, errors


def preprocess_each(items, preprocess) -> tuple[list, list[int], list[str | None]]:
    """(inputs, the indices they came from, per item an error message or None)."""
    inputs, rows, errors = [], [], [None] * len(items)
    for i, item in enumerate(items):
        try:
            inputs.append(preprocess(item))
            rows.append(i)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            errors[i] = str(exc)
    return inputs, rows, errors
