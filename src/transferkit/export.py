"""Export a run for deployment (ONNX or TorchScript, optionally int8 ONNX) and prove it agrees with the
eager model on real validation images before anyone ships it.

Every export is run on up to `check_images` images of the run's validation split and compared with the
eager checkpoint; a float export must match the probabilities to `PROB_TOLERANCE` and every top-1 label
(except true near-ties), an int8 model must agree on at least `INT8_MIN_AGREEMENT` of the whole split.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError, UsageError
from .engine.runtime import onnx_export
from .inference import PROB_TOLERANCE, parity, read_batches
from .io import RunFolderError, atomic_write_json, why_not_writable
from .run_folder import RunFolder

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
OPSET = 17
INT8_MIN_AGREEMENT = 0.98
CALIBRATION_IMAGES = 64


def export_run(run: str | Path, fmt: str = "onnx", quantize: str | None = None, out: str | Path | None = None,
               check_images: int = 64, data: str | Path | None = None) -> dict:
    """Write RUN/export/model.{onnx,pt} (+ model.int8.onnx) and export.json with the parity numbers. The check
    images are the run's val split; `data`: where its data folder is now, where it has moved since the run."""
    from .engine.checkpoint import load_checkpoint, resolve_checkpoint

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize must be {' or '.join(QUANTIZATIONS)}, not {quantize!r}")
    if quantize is not None and fmt != "onnx":
        raise UsageError(f"--quantize {quantize} works with --format onnx only")
    checkpoint = resolve_checkpoint(run)
    training = None if out else RunFolder(checkpoint.parent).training_process()
    if training:  # RUN/export would hold an epoch's model that the run goes on to replace, passing for its last
        raise UsageError(f"{checkpoint.parent} is still training (process {training}): export it when the run ends, "
                         "or give --out to export this epoch's best as a snapshot")
    model, meta = load_checkpoint(checkpoint)
    out = Path(out) if out else RunFolder(checkpoint.parent).export_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder for the exported model")
    val = _split_items(checkpoint, meta, "val", data)
    x = _load_batch(_spread(val, check_images), meta)
    try:  # after the check images are found: a refused export leaves no empty folder
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way (a/file.txt/export), a read-only parent
        raise RunFolderError(f"cannot write in {out}: {why_not_writable(out, exc)}") from None
    eager = _torch_logits(model, x)
    if fmt == "onnx":
        path = export_onnx(model, meta, out / RunFolder.ONNX_MODEL, x[:1])
        exported = _onnx_logits(path, x.numpy())
    else:
        with _jit_deprecation_said_once():
            path = export_torchscript(model, meta, out / RunFolder.TORCHSCRIPT_MODEL, x[:1])
            exported = _torch_logits(torch.jit.load(str(path)), x)
    result = {"format": fmt, "path": str(path), "checkpoint": str(checkpoint), "bytes": path.stat().st_size,
              "parity": parity(eager, exported)}
    _require_parity(result["parity"], fmt)
    if quantize:
        result["int8"] = quantize_int8(path, out / RunFolder.INT8_MODEL, checkpoint, meta, val)
    atomic_write_json(out / RunFolder.EXPORT_RECORD, _record(out, result))  # a refused int8 attempt is recorded too
    if quantize and result["int8"]["refused"]:
        refusal = ExportError(result["int8"]["refused"])
        refusal.result = result  # the CLI prints the float model's check before the refusal
        raise refusal
    return result


def _record(out: Path, result: dict) -> dict:
    """export.json's content: this export's result, and under "earlier" the records of the folder's other
    formats whose files are still there (ONNX, then TorchScript into the same folder: serve's model card still
    finds the ONNX file's parity check)."""
    previous = RunFolder.read_json(out / RunFolder.EXPORT_RECORD) or {}
    records = {**previous.get("earlier", {}), previous.get("format"): {k: v for k, v in previous.items()
                                                                        if k != "earlier"}}
    kept = {fmt: rec for fmt, rec in records.items()
            if fmt not in (None, result["format"]) and isinstance(rec, dict)
            and (out / Path(str(rec.get("path"))).name).is_file()}
    return {**result, **({"earlier": kept} if kept else {})}


# ---- the two formats ---------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, meta: dict, path: Path, example: torch.Tensor) -> Path:
    """ONNX with a dynamic batch axis; classes, preprocessing and architecture in metadata_props."""
    try:
        onnx_export(model, example, path, input_name="image", output_name="logits", opset=OPSET)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; say which model failed
        raise ExportError(f"ONNX export of {meta['architecture']} failed: {str(exc).splitlines()[0]}") from exc
    set_onnx_metadata(path, _metadata(meta))
    return path


def set_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@contextmanager
def _jit_deprecation_said_once():
    """PyTorch deprecates TorchScript: trace, save and load each warn with a FutureWarning and a source line
    (four two-line warnings per export). The user gets one line instead, and the file works as before."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    deprecated = [w for w in caught if issubclass(w.category, FutureWarning) and "torch.jit" in str(w.message)]
    if deprecated:
        log.warning("PyTorch %s marks TorchScript (torch.jit) as deprecated; the file loads with torch.jit.load "
                    "today, and --format onnx is the longer-lived format", torch.__version__.split("+")[0])
    for w in caught:
        if w not in deprecated:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def export_torchscript(model: torch.nn.Module, meta: dict, path: Path, example: torch.Tensor) -> Path:
    """torch.jit.trace in eval mode; the metadata travels as _extra_files (read with torch.jit.load)."""
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example.clone(), check_trace=False)
    extra = {f"{key}.json": value for key, value in _metadata(meta).items()}
    torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def _metadata(meta: dict) -> dict[str, str]:
    return {"classes": json.dumps(meta["classes"]), "preprocessing": json.dumps(meta["preprocessing"]),
            "architecture": meta["architecture"]}


# ---- checking ----------------------------------------------------------------------------------


def _require_parity(result: dict, fmt: str) -> None:
    if result["max_abs_prob_diff"] > PROB_TOLERANCE or result["clear_disagreements"]:
        raise ExportError(
            f"the {fmt} export disagrees with the eager model on {result['images']} validation images: "
            f"max prob diff {result['max_abs_prob_diff']:.2e} (tolerance {PROB_TOLERANCE:.0e}), "
            f"top-1 agreement {result['top1_agreement']:.4f}"
        )


def _split_items(checkpoint: Path, meta: dict, split: str, moved_to=None) -> list[tuple[str, int]]:
    from .errors import DataError
    from .evaluate import manifest_items

    manifest = RunFolder(checkpoint.parent).split
    if not manifest.is_file():
        raise ExportError(f"cannot check the export: no {manifest.name} beside {checkpoint} (export a run folder)")
    try:
        items = manifest_items(manifest, meta["classes"], split, meta.get("config", {}).get("data"), moved_to)
    except DataError as exc:
        moved = "" if moved_to else "; where the run's data folder has moved, give its place now with --data DIR"
        raise ExportError(f"cannot check the export against real images: {exc}{moved}") from None
    if not items:
        raise ExportError(f"cannot check the export: the run's {split} split lists no readable images")
    return items


def _spread(items: list, n: int) -> list:
    """Up to n items spread evenly over the list (which is grouped by class)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _image_batches(items: list[tuple[str, int]], meta: dict, batch_size: int = 32):
    """(images, labels) per chunk of (path, label) items: the readable images, eval-transformed and stacked,
    with their own labels. An unreadable file is logged and drops out with its label only."""
    from .data.images import load_rgb
    from .data.transforms import eval_transform
    from .engine.checkpoint import preprocessing_of

    pre = preprocessing_of(meta)
    transform = eval_transform(pre)

    def read(item):
        return transform(load_rgb(item[0], shorter_side=pre.resize_size, sixteen_bit_white=pre.sixteen_bit_white))

    for start, batch in read_batches(items, read, batch_size):
        chunk = items[start:start + batch_size]
        for (path, _), error in zip(chunk, batch.errors):
            if error is not None:
                log.warning("skipping %s: %s", path, error)
        if batch.inputs:
            yield torch.stack(batch.inputs), [label for _, label in batch.kept(chunk)]


def _load_batch(items: list[tuple[str, int]], meta: dict) -> torch.Tensor:
    """Every readable image of `items` in one batch (the parity and calibration images)."""
    for images, _ in _image_batches(items, meta, batch_size=max(1, len(items))):
        return images
    raise ExportError("cannot check the export: none of the validation images could be read")


def _torch_logits(model, x: torch.Tensor, rows: int = 4) -> np.ndarray:
    """The model's logits, a few rows per call in channels_last (as predict runs it). The 64 check images in one
    NCHW call took 20 s for an 8-view probe (lite0, 512 forward passes) on a 2-core EPYC, most of it the kernel
    mapping pages for the large activations; 4 rows at a time 8.6 s."""
    with torch.inference_mode():
        return torch.cat([model(chunk.contiguous(memory_format=torch.channels_last)).float()
                          for chunk in x.split(rows)]).numpy()


def _onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    from .onnx_predict import OnnxClassifier

    return OnnxClassifier(path).logits(x)


# ---- int8 --------------------------------------------------------------------------------------


def quantize_int8(fp32: Path, path: Path, checkpoint: Path, meta: dict, val: list) -> dict:
    """Static QDQ int8 (per-channel weights, activations calibrated on training images), then accuracy,
    agreement, size and speed against the float model on the whole validation split."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name("model.prepared.onnx")
    calibration = _spread(_split_items(checkpoint, meta, "train"), CALIBRATION_IMAGES)
    reader = _CalibrationReader(_load_batch(calibration, meta).numpy())
    with _quiet_root_logging():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)
    set_onnx_metadata(path, _metadata(meta))
    report = {**compare_onnx(fp32, path, val, meta), "refused": None}
    if report["top1_agreement"] < INT8_MIN_AGREEMENT:
        path.unlink()  # a model that was refused must not sit beside the good one looking shippable
        report["path"] = None
        report["refused"] = (f"int8 model agrees with float on only {report['top1_agreement']:.4f} of "
                             f"{report['images']} validation images (need ≥ {INT8_MIN_AGREEMENT}); it was "
                             f"removed (attempt recorded in export.json); ship {fp32} instead")
    return report


@contextmanager
def _quiet_root_logging():
    """onnxruntime.quantization logs through the root logger (84 "Increased scale[...]" lines for a lite0);
    below ERROR those are dropped while it runs. A logger's filter sees only records logged on it, so
    transferkit's own loggers, which propagate to the root's handlers, are not affected."""
    root = logging.getLogger()

    def errors_only(record):
        return record.levelno >= logging.ERROR

    root.addFilter(errors_only)
    try:
        yield
    finally:
        root.removeFilter(errors_only)


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed images, a few per batch."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self._batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def compare_onnx(fp32: Path, int8: Path, items: list[tuple[str, int]], meta: dict, batch: int = 32) -> dict:
    """Accuracy of both models, their agreement, file size ratio and time ratio on the same batches."""
    from .onnx_predict import OnnxClassifier

    models = {"fp32": OnnxClassifier(fp32), "int8": OnnxClassifier(int8)}
    logits = {k: [] for k in models}
    seconds = dict.fromkeys(models, 0.0)
    labels = []
    for images, chunk_labels in _image_batches(items, meta, batch):
        x = images.numpy()
        labels += chunk_labels
        for name, clf in models.items():
            clf.logits(x[:1])  # warm-up so the first batch does not count session setup
            t0 = time.perf_counter()
            logits[name].append(clf.logits(x))
            seconds[name] += time.perf_counter() - t0
    if not labels:
        raise ExportError("cannot compare the int8 model: none of the validation images could be read")
    y = np.array(labels)
    fp, q = np.concatenate(logits["fp32"]), np.concatenate(logits["int8"])
    acc_fp, acc_q = float((fp.argmax(1) == y).mean()), float((q.argmax(1) == y).mean())
    return {
        **parity(fp, q),
        "accuracy_fp32": acc_fp,
        "accuracy_int8": acc_q,
        "accuracy_change": acc_q - acc_fp,
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": int8.stat().st_size,
        "size_ratio": int8.stat().st_size / fp32.stat().st_size,
        "seconds_fp32": seconds["fp32"],
        "seconds_int8": seconds["int8"],
        "speed_ratio": seconds["fp32"] / max(seconds["int8"], 1e-9),
        "path": str(int8),
    }


def format_export(result: dict) -> str:
    p = result["parity"]
    lines = [f"exported {result['format']} to {result['path']} ({result['bytes'] / 1e6:.1f} MB)",
             f"check on {p['images']} validation images: max |logit diff| {p['max_abs_diff']:.2e}, "
             f"max |prob diff| {p['max_abs_prob_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f}"]
    q = result.get("int8")
    if q:
        lines += [f"int8 model {q['path']}: accuracy {q['accuracy_int8']:.4f} vs {q['accuracy_fp32']:.4f} float "
                  f"({q['accuracy_change']:+.4f}), top-1 agreement {q['top1_agreement']:.4f} on {q['images']} "
                  f"validation images, size ×{q['size_ratio']:.2f}, speed ×{q['speed_ratio']:.2f}"]
    return "\n".join(lines)
