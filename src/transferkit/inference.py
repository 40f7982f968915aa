"""The one inference layer every path shares: predict (torch and ONNX), evaluate and its test-time
augmentation, export's parity checks, serving and the frozen-part engine of training.

- which files to classify (`expand_inputs`, `model_kind`);
- reading a batch: `read_batch` preprocesses items one by one and keeps, per item, its error message;
  `Batch.kept` takes the labels (or anything else per item) of the readable ones, so a bad file in the
  middle of a chunk shifts nothing after it;
- probabilities for a list of files in chunks (`batched_proba`) and the output rows (`rows_from_probs`);
- the ONNX Runtime session (`ort_session`) and the parity of two runtimes' outputs (`parity`).

Torch-free: the ONNX deployment path (`onnx_predict.py`, `predict MODEL.onnx --engine onnx`) imports it
on a box without torch. Runtimes plug in as two callables: `preprocess(item)` (one decoded input, raising
on an unreadable file) and `infer(list of inputs)` (their (n, C) outputs).
"""

from __future__ import annotations

import numbers
import os
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .data.images import HEIF_EXTENSIONS, has_image_extension
from .errors import CheckpointError, DataError, UsageError
from .threads import named_pool

# A float export must match the eager model's probabilities to this (and every clear top-1 label).
PROB_TOLERANCE = 1e-3


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders walked (sorted) for image files as training's scan finds them. Missing paths are an
    error."""
    out: list[str] = []
    for item in inputs:
        if not str(item):  # Path("") is the working folder, whose every image was predicted
            raise UsageError("an empty path ('') names no file or folder")
        path = Path(item)
        if path.is_dir():
            out += _images_under(path)
        elif path.exists():
            out.append(str(path))
        else:
            raise UsageError(f"no such file or folder: {item}")
    if not out:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return out


def _images_under(folder: Path) -> list[str]:
    """The image files under a folder, walked as training's scan walks a class folder (data/folders/walk.py:
    symlinked folders followed once, hidden ones, links back up and run folders skipped), so that predict and
    evaluate see the images training saw; a file without an extension kept where Pillow identifies it. Files the
    scan would refuse (empty, unreadable) stay: their rows say why."""
    from .data.folders.problems import Problems
    from .data.folders.walk import folders_under

    return [os.path.join(root, name) for root, names in folders_under(folder, Problems(folder, strict=False))
            for name in names if _is_image_file(os.path.join(root, name), name)]


def _is_image_file(path: str, name: str) -> bool:
    """Not hidden, and an image extension, or none and a regular file Pillow identifies (a pipe would block). A
    HEIC/HEIF photo too, which its row says cannot be read here (it was left out unsaid)."""
    from .data.folders.checks import identifies_an_image

    if name.startswith("."):
        return False
    if has_image_extension(name) or os.path.splitext(name)[1].lower().lstrip(".") in HEIF_EXTENSIONS:
        return True
    return not os.path.splitext(name)[1].lstrip(".") and os.path.isfile(path) and identifies_an_image(path)


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
    """A whole number ≥ 1 (numpy's too), as an int; 1.0 was "must be ≥ 1, not 1.0"."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise UsageError(f"--top-k must be a whole number, not {top_k!r}")
    if top_k < 1:
        raise UsageError(f"--top-k must be ≥ 1, not {top_k!r}")
    return int(top_k)


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


# ---- reading a batch ---------------------------------------------------------------------------


@dataclass
class Batch:
    """What `read_batch` made of a chunk of items: the inputs of the readable ones (in order), the
    chunk indices they came from, and per item an error message or None."""

    inputs: list
    rows: list[int]
    errors: list[str | None]

    def kept(self, values) -> list:
        """The entries of a per-item list (labels, paths) that belong to the inputs, aligned with them."""
        return [values[i] for i in self.rows]


def read_batch(items, preprocess) -> Batch:
    """Preprocess each item; one that raises gets its message instead of stopping the others."""
    return _batch_of([_read_one(preprocess, item) for item in items])


def _read_one(preprocess, item) -> tuple[object, str | None]:
    try:
        return preprocess(item), None
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
        return None, str(exc) or type(exc).__name__  # Pillow's bare AssertionError left the row's error empty


def _batch_of(results: list[tuple[object, str | None]]) -> Batch:
    batch = Batch([], [], [error for _, error in results])
    for i, (value, error) in enumerate(results):
        if error is None:
            batch.inputs.append(value)
            batch.rows.append(i)
    return batch


READ_THREADS = min(4, os.cpu_count() or 1)


def read_batches(items, preprocess, batch_size: int = 32, threads: int | None = None, ahead: int = 2):
    """(start, Batch) for consecutive chunks of `batch_size` items, the next `ahead` chunks read on `threads`
    threads while the caller runs the network on this one (read_ahead; ELPV cells through a lite0 probe,
    2-core EPYC: benchmarks/RESULTS.md, predict_run_elpv2). One chunk or one thread: read here, in turn."""
    threads = READ_THREADS if threads is None else threads
    in_turn = threads <= 1 or len(items) <= batch_size
    for start, results in read_ahead(items, partial(_read_one, preprocess), batch_size, 0 if in_turn else threads,
                                     ahead):
        yield start, _batch_of(results)


def read_ahead(items, read, chunk: int, threads: int, ahead: int = 2, name: str = "transferkit-read"):
    """(start, [read(item) for each item of the chunk]) for consecutive chunks of `items` (a list or a range), in
    order. With threads ≥ 1 the next `ahead` chunks are read on that many named threads (threads.named_pool)
    while the caller works on this one: decoding and resizing are Pillow's and numpy's, which release the GIL.
    threads 0: read here, in turn. A stop (an error downstream, a closed generator) leaves nothing queued."""
    if threads < 1:
        for start in range(0, len(items), chunk):
            yield start, [read(item) for item in items[start:start + chunk]]
        return
    window = chunk * (ahead + 1)
    with named_pool(threads, name) as pool:
        queued = deque(pool.submit(read, item) for item in items[:window])
        try:
            for start in range(0, len(items), chunk):
                results = [queued.popleft().result() for _ in range(min(chunk, len(items) - start))]
                queued.extend(pool.submit(read, item) for item in items[start + window:start + window + len(results)])
                yield start, results
        finally:
            for future in queued:
                future.cancel()


def batched_proba(paths, n_classes: int, preprocess, infer, batch_size: int = 32, desc: str | None = None):
    """Outputs (N, n_classes) and per-path errors, for any runtime: `infer(inputs)` gives the (n, C)
    outputs of a chunk's readable inputs; a file that cannot be read gets a NaN row and its error. `desc`: a
    progress bar of images on a terminal (predicting a large folder takes minutes)."""
    probs = np.full((len(paths), n_classes), np.nan, dtype=np.float32)
    errors: list[str | None] = []
    bar = _progress_bar(desc, len(paths), batch_size)
    try:
        for start, batch in read_batches(paths, preprocess, batch_size):
            if batch.inputs:
                probs[[start + i for i in batch.rows]] = infer(batch.inputs)
            errors += batch.errors
            if bar is not None:
                bar.update(len(batch.errors))
    finally:
        if bar is not None:
            bar.close()
    return probs, errors


def table_rows(classifier, items, top_k: int) -> list[dict]:
    """One row per item (rows_from_probs) through the row protocol Predictor and OnnxClassifier share:
    `table_width`, `preprocess`, `table_of` (probabilities, and the novelty score where there is one) and
    `rows_of_table`; a progress bar on a terminal."""
    check_top_k(top_k)
    table, errors = batched_proba(items, classifier.table_width, classifier.preprocess, classifier.table_of,
                                  desc="predicting")
    return classifier.rows_of_table(items, table, errors, top_k)


def _progress_bar(desc: str | None, total: int, batch_size: int):
    """A bar where there is more than one batch, or None; none either on the torch-free deployment install,
    which has no tqdm."""
    if desc is None or total <= batch_size:
        return None
    try:
        from .engine.progress import progress
    except ImportError:
        return None
    return progress(None, desc=desc, total=total)


# ---- ONNX Runtime ----------------------------------------------------------------------------------


def ort_session(path, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session with every graph optimization. threads: intra-op threads (None: ORT's
    default, one per core). spinning=False: idle threads sleep instead of spinning, for sessions that share
    the cores with other work. A file ORT cannot load is a CheckpointError naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"{path} is not a loadable ONNX model ({exc})") from None


# ---- parity ----------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def parity(reference, candidate, logits: bool = True) -> dict:
    """How far one runtime's outputs are from the reference's on the same inputs (arrays or CPU tensors).

    Always: `images`, `max_abs_diff` and `relative_diff` (that difference over the reference's scale, at
    least 1: what the frozen-part engine's tolerance bounds). logits=True adds what an export must meet:
    the max abs difference of the probabilities, top-1 agreement, and the disagreements that are not
    near-ties (the reference's top-2 margin exceeds twice PROB_TOLERANCE)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        return {"images": len(candidate), "max_abs_diff": float("inf"), "relative_diff": float("inf"),
                "shape_mismatch": [list(reference.shape), list(candidate.shape)]}
    diff = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    scale = max(1.0, float(np.abs(reference).max()) if reference.size else 0.0)
    result = {"images": int(len(reference)), "max_abs_diff": diff, "relative_diff": diff / scale}
    if logits:
        result.update(_probability_parity(softmax(reference), softmax(candidate)))
    return result


def _probability_parity(p_ref: np.ndarray, p: np.ndarray) -> dict:
    top_ref, top = p_ref.argmax(1), p.argmax(1)
    ranked = np.sort(p_ref, axis=1)
    margin = ranked[:, -1] - ranked[:, -2] if p_ref.shape[1] > 1 else np.ones(len(p_ref))
    return {
        "max_abs_prob_diff": float(np.abs(p_ref - p).max()),
        "top1_agreement": float((top_ref == top).mean()),
        "clear_disagreements": int(((top_ref != top) & (margin > 2 * PROB_TOLERANCE)).sum()),
    }
