"""The Python API, mirroring the CLI:

    import transferkit as tk
    clf = tk.train("data/elpv", model="efficientnet_lite0", mode="feature-extract", epochs=15)
    clf.predict(["cell.png"])        # labels; also folders, PIL images and numpy arrays (H×W or H×W×3/4)
    clf.run_dir_                     # the run folder (config, split, checkpoints, report)
    clf = tk.load("runs/...")        # a run folder, a .safetensors checkpoint or an exported .onnx model
    clf = tk.resume("runs/...")      # continue an interrupted run (the CLI's `train --resume`)
    clf.evaluate("more/labelled")    # the CLI's `evaluate`: metrics dict, RUN/evaluation.json and figures
    clf.export("onnx")               # the CLI's `export`: RUN/export/model.onnx, parity-checked

Mistakes raise transferkit.errors.UsageError worded with the argument names (epochs=, not --epochs).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .errors import CheckpointError, TransferkitError, UsageError
from .engine.checkpoint import resolve_checkpoint
from .inference import model_kind
from .predict import Predictor, expand_inputs
from .preprocessing import Preprocessing
from .io import read_json_object
from .run_folder import RunFolder

log = logging.getLogger(__name__)


class Classifier:
    """A trained classifier. Learned attributes end in `_` (scikit-learn style)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        if not isinstance(device, str):  # torch's own TypeError, or a CUDA index 0 taken on a box without one
            raise UsageError(f"device must be text (auto, cpu, cuda or cuda:N), not {device!r}")
        self.checkpoint_ = resolve_checkpoint(_path("checkpoint", checkpoint))
        self.run_dir_ = self.checkpoint_.parent
        kind = model_kind(self.checkpoint_)
        if kind == "torchscript":  # was "not a safetensors checkpoint (... header too large)"
            raise CheckpointError(f"{self.checkpoint_} is a TorchScript export (torch.jit.load reads it); tk.load "
                                  "takes a run folder, its .safetensors checkpoint or an exported .onnx model")
        if kind == "onnx":
            self._predictor = _onnx_predictor(self.checkpoint_, device)
            self.meta_ = {"format": "onnx", "architecture": self._predictor.architecture,
                          "classes": self._predictor.classes, "preprocessing": self._predictor.preprocessing}
            self.preprocessing_ = Preprocessing.from_dict(self._predictor.preprocessing)
        else:
            from .engine.environment import pick_device

            with _api_wording():  # one line for a device that is not there or not a device, as the CLI's
                device = str(pick_device(device))
            self._predictor = Predictor(self.checkpoint_, device=device)
            self.meta_ = self._predictor.meta
            self.preprocessing_ = self._predictor.preprocessing
        self.classes_ = self._predictor.classes
        # The training run's summary (metrics.json) where this is the run's own best checkpoint.
        self.metrics_: dict | None = None
        if self.checkpoint_.name == RunFolder.BEST:
            self.metrics_ = read_json_object(RunFolder(self.run_dir_).metrics) or None

    def __repr__(self) -> str:
        val = self.meta_.get("val", {}).get("val_acc")
        shown = f", val_acc={val:.4f}" if isinstance(val, float) else ""
        kind = "format='onnx'" if self._is_onnx else f"mode={self.meta_.get('mode')!r}"
        return (f"Classifier({str(self.checkpoint_)!r}, model={self.meta_.get('architecture')!r}, {kind}, "
                f"classes={self.classes_!r}{shown})")

    def __reduce__(self):
        """Pickled (joblib, multiprocessing) as what it was loaded from, and loaded again from there when unpickled:
        the torch model's frozen-part engine and an ONNX Runtime session do not pickle (a PicklingError)."""
        device = "cpu" if self._is_onnx else str(self._predictor.device)
        return Classifier, (self.checkpoint_.resolve(), device), {"metrics_": self.metrics_}

    @property
    def model_(self):
        """The torch module; for an exported .onnx model, its ONNX Runtime session."""
        return self._predictor.session if self._is_onnx else self._predictor.model

    @property
    def _is_onnx(self) -> bool:
        return self.meta_.get("format") == "onnx"

    def predict_proba(self, images) -> np.ndarray:
        """Probabilities (N, classes); a row of NaN where an image could not be read."""
        items, _ = _items(images)
        probs, errors = self._predictor.predict_proba(items)
        return probs

    def predict(self, images) -> list[str | None]:
        return [row["label"] for row in self.predict_table(images, top_k=1)]

    def predict_table(self, images, top_k: int = 3) -> list[dict]:
        """One row per image as `transferkit predict` writes it; `path` is "<image N>" for one held in memory."""
        items, names = _items(images)
        with _api_wording():
            rows = self._predictor.predict_rows(items, top_k=top_k)
        for row, name in zip(rows, names):
            row["path"] = name
        return rows

    def evaluate(self, data, tta: str | None = None, include_train: bool = False, out=None) -> dict:
        """The CLI's `evaluate`: metrics on a labelled folder (DATA/<class>/* or DATA/val/<class>/*) or a split
        CSV, leaving out images this run trained on unless include_train; also writes evaluation.json,
        confusion.png and top_losses.png to `out` (default: the run folder)."""
        from .evaluate import evaluate_run

        self._needs_checkpoint("evaluate")
        _path("data", data)
        _path("out", out, optional=True)
        if not isinstance(include_train, (bool, np.bool_)):  # "no" would be true, and score the training images
            raise UsageError(f"include_train must be True or False, not {include_train!r}")
        if isinstance(tta, bool):  # as the CLI's bare --tta: auto; False as none (it was refused)
            tta = "auto" if tta else None
        with _api_wording():
            return evaluate_run(self.checkpoint_, data, tta=tta, out=out, include_train=include_train)

    def export(self, format: str = "onnx", quantize: str | None = None, out=None, data=None) -> dict:
        """The CLI's `export`: RUN/export/model.onnx (or model.pt for format="torchscript"; quantize="int8"
        adds model.int8.onnx), checked against the eager model on the run's val images (data: where the run's
        data folder is now, if it has moved); returns what export.json records."""
        from .export import export_run

        self._needs_checkpoint("export")
        _path("out", out, optional=True)
        _path("data", data, optional=True)
        with _api_wording():
            return export_run(self.checkpoint_, format, quantize=quantize, out=out, data=data)

    def _needs_checkpoint(self, what: str) -> None:
        if self._is_onnx:
            raise UsageError(f"{what} needs the run folder or its .safetensors checkpoint, not the exported "
                             f"{self.checkpoint_.name}: tk.load(RUN).{what}(...)")


def train(data: str | Path | None = None, config: TrainConfig | None = None, *, verbose: bool = True,
          **options) -> Classifier:
    """Train on an image folder; options are TrainConfig's fields (e.g. time_budget="5m", recipe="tutorial",
    model=, mode=, epochs=, out=). With the default recipe="auto" the options given fix their pieces of the
    recipe and the search chooses the rest on the training images (search/). `config`: a TrainConfig to
    start from (not changed); `data` and the options override its fields. The run folder is `clf.run_dir_`.
    verbose: say what the run does on stderr, as the CLI does (_messages)."""
    from .search import train as train_run

    with _messages(verbose), _api_wording():
        if config is None and data is None:
            raise UsageError("train() needs the data folder (or config=)")
        cfg = _configured(config, data, options)
        if cfg.data == "":  # Path(""): the working folder, each of its subfolders taken for a class
            raise UsageError("data must name the data folder, not ''")
        metrics = train_run(cfg, given=options)
        return _trained(metrics)


def resume(run: str | Path, *, verbose: bool = True, **options) -> Classifier:
    """Continue an interrupted run from RUN/last.safetensors with the options in RUN/config.yaml (options
    given must equal the saved ones: a run is one config); the run then ends as an uninterrupted one would."""
    with _messages(verbose), _api_wording():
        metrics = resume_run(_path("run", run), options)
        return _trained(metrics)


def resume_run(run: str | Path, options: dict) -> dict:
    """`resume` up to the finished run's metrics (the CLI's `train --resume`, which prints them). Every
    rank of a distributed run calls it; ranks other than 0 get {"written": False}."""
    from .search import train as train_run

    folder = RunFolder(run)
    cfg = TrainConfig.from_yaml(folder.resumable_config())
    saved = cfg.to_dict()
    moved = _data_moved_to(options.get("data"), saved["data"])
    differ = [k for k, v in _known_options(options).items()
              if not _same_option(k, v, saved[k]) and not (k == "data" and moved)]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} (saved: {saved.get(k)})" for k in differ)
        raise UsageError(f"--resume continues {run} with the options in its {folder.CONFIG}; drop or match {shown}")
    if not moved and saved["data"] and not Path(saved["data"]).exists():
        raise UsageError(f"--resume: the run's data folder {saved['data']} does not exist any more; if it has moved, "
                         f"give its new place (`transferkit train --resume {run} NEW_PLACE`; in Python "
                         f"`tk.resume(run, data=NEW_PLACE)`)")
    cfg = replace(cfg, out=str(run), **({"data": moved} if moved else {}))  # either folder may have moved since
    cfg.check_paths()
    if moved:
        from .engine import distributed
        from .io import atomic_write_text

        log.warning("--resume: the data folder %s is gone; reading the run's images in %s from here on",
                    saved["data"], moved)
        if distributed.is_main():  # later commands (export, evaluate of the split) find the images there too
            atomic_write_text(folder.config, cfg.to_yaml())
    return train_run(cfg, resume=True)


def _data_moved_to(given, saved) -> str | None:
    """The data folder given to a resumed run in place of its saved one, where that one is gone (split.csv lists
    the images relative to it, and the caches know them by content), else None; check_paths checks it."""
    # absolute: config.yaml records it for commands run from other folders
    return os.path.abspath(given) if given and saved and not Path(saved).exists() else None


def _same_option(key: str, given, saved) -> bool:
    if key in ("data", "out", "weights") and given and saved:
        return Path(given).resolve() == Path(saved).resolve()
    return given == saved


def _configured(config: TrainConfig | None, data, options: dict) -> TrainConfig:
    """A new TrainConfig: `config`'s fields (or the defaults), then `data` and the options; paths as text (what
    config.yaml can hold) and numpy numbers as Python's (a sweep over np.arange), the rest as given for validate."""
    known = {name: _plain(value) for name, value in _known_options(options).items()}
    if config is None:
        return TrainConfig(data=_plain(data), **known)
    if not isinstance(config, TrainConfig):
        raise UsageError(f"config must be a transferkit.TrainConfig (TrainConfig.from_yaml(PATH) reads a config "
                         f"file), not {type(config).__name__}")
    cfg = replace(config, **known, **({"data": _plain(data)} if data is not None else {}))
    return replace(cfg, **{f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)})


def _plain(value):
    """A path as text and a numpy scalar as the Python number it holds; anything else as it is."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value.item() if isinstance(value, np.generic) else value


def _path(name: str, value, optional: bool = False):
    """A path argument (str or os.PathLike; also None where `optional`) as given; anything else is a UsageError
    naming it, not pathlib's TypeError from inside."""
    if not isinstance(value, (str, os.PathLike)) and not (optional and value is None):
        raise UsageError(f"{name} must be a path (str or pathlib.Path), not {value!r}")
    return value


def _trained(metrics: dict) -> Classifier:
    clf = Classifier(Path(metrics["run_dir"]))
    clf.metrics_ = metrics
    log.info("best val acc %.4f; run folder: %s", metrics["best_val_acc"], clf.run_dir_)
    return clf


@contextmanager
def _messages(verbose: bool):
    """What the run does (the scan, the search's plan and candidates, the result) on stderr, as the CLI prints
    it, where the program calling has not set up logging: without a handler Python shows warnings only, and a
    notebook user would wait minutes before a word. A program that has set up logging keeps its own handlers."""
    if not isinstance(verbose, (bool, np.bool_)):  # "no" was true
        raise UsageError(f"verbose must be True or False, not {verbose!r}")
    logger = logging.getLogger("transferkit")
    if not verbose or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level or logging.INFO)  # a level the program set stays
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def _api_wording():
    """An error of ours raised inside is reworded for Python: argument names, not flags (api_wording). The same
    exception, its class and attributes kept: a CheckpointError said "--resume: RUN already finished"."""
    try:
        yield
    except TransferkitError as exc:
        exc.args = (api_wording(str(exc)),)
        raise


def _known_options(options: dict) -> dict:
    """A misspelled keyword gets the close name, as the CLI does for model names, not a bare TypeError."""
    valid = [f.name for f in fields(TrainConfig)]
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]}=?" if close else f" (valid: {', '.join(valid)})"
            raise UsageError(f"got an unknown argument {name}={options[name]!r}{hint}")
    return options


def api_wording(message: str) -> str:
    """The library's messages name command-line flags; in Python they are arguments: --epochs -> epochs,
    --overwrite -> overwrite=True, --no-cache -> cache=False. Quoted commands (`...`) stay as they are."""
    booleans = {f.name for f in fields(TrainConfig) if f.type in ("bool", bool)}

    def argument(match: re.Match) -> str:
        name = match.group(2).replace("-", "_")
        if name in booleans:
            return f"{name}={not match.group(1)}"
        return name

    parts = message.split("`")
    parts[::2] = [re.sub(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)", argument, part) for part in parts[::2]]
    return "`".join(parts)


def load(run_or_checkpoint: str | Path, device: str = "cpu") -> Classifier:
    """A run folder, a .safetensors checkpoint, or an exported .onnx model (predicts with ONNX Runtime alone)."""
    return Classifier(_path("run_or_checkpoint", run_or_checkpoint), device=device)


def _onnx_predictor(path: Path, device: str):
    from .onnx_predict import OnnxClassifier

    if device != "cpu":
        raise UsageError(f"device={device!r} is for a run folder or checkpoint; an ONNX model runs on ONNX "
                         "Runtime's CPU provider")
    return OnnxClassifier(path)


def _items(images) -> tuple[list, list[str]]:
    """What Predictor reads (file paths, folders walked; PIL images), and a name per item for the rows. `images`:
    one of, or a list of: a path (file or folder), a PIL image, a numpy array (H×W grey, H×W×3 RGB, H×W×4 RGBA;
    uint8, or floats in 0-1; H×W uint16 is 16-bit grey), or a batch of arrays (N×H×W×C)."""
    from PIL import Image

    # An array: numpy's, or one that converts to it (a torch tensor, which was iterated: a 3×H×W one made 3 grey
    # images). A 1-D array of paths (a pandas column of them: df["path"].values) is a list.
    listed = getattr(getattr(images, "dtype", None), "kind", "") in ("O", "U", "S") and images.ndim == 1
    one = isinstance(images, (str, os.PathLike, Image.Image, bytes)) or (_is_array(images) and images.ndim < 4
                                                                          and not listed)
    if not one and not hasattr(images, "__iter__"):
        raise UsageError(f"images must be a path, a PIL image, a numpy array or a list of them, not {images!r}")
    items, names, paths, pil_ids = [], [], [], set()

    def flush_paths():
        for path in expand_inputs(paths) if paths else []:
            items.append(path)
            names.append(path)
        paths.clear()

    for item in [images] if one else list(images):
        if isinstance(item, (str, os.PathLike)):
            if os.fspath(item) == "":  # Path(""): the working folder, whose every image was predicted
                raise UsageError("images holds an empty path ''")
            paths.append(os.fspath(item))
            continue
        if not isinstance(item, Image.Image) and not _is_array(item):
            hint = " (a file's bytes: PIL.Image.open(io.BytesIO(data)))" if isinstance(item, bytes) else ""
            raise UsageError(f"images holds a path, a PIL image or a numpy array each, not {type(item).__name__}"
                             f"{hint}")
        if isinstance(item, Image.Image) and 0 in item.size:  # Pillow resizes it to a blank crop, then classified
            raise UsageError(f"an image has no pixels: size {item.size[0]}×{item.size[1]}")
        flush_paths()  # files in the order given, each folder expanded in place
        if isinstance(item, Image.Image):
            if id(item) in pil_ids:  # decoded before the reader threads start; one given once is decoded there
                _decoded(item)
            pil_ids.add(id(item))
        items.append(item if isinstance(item, Image.Image) else _array_image(item))
        names.append(f"<image {len(names)}>")
    flush_paths()
    return items, names


def _decoded(image) -> None:
    """A lazily opened PIL image (Image.open) given more than once, decoded here: the reader threads decoding one
    image object at once raced on its file, and a row came back an error with no words."""
    try:
        image.load()
    except Exception:  # noqa: BLE001 - a damaged file: the reader decodes it again, and its row says why
        pass


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "ndim"))


def _array_image(array):
    """A numpy image as a PIL image, the way it would have been saved to a file."""
    from PIL import Image

    try:
        a = np.asarray(array)
    except (TypeError, RuntimeError, ValueError) as exc:  # a torch tensor on a GPU, or one that requires grad
        raise UsageError(f"cannot read this {type(array).__name__} as an image array ({str(exc).splitlines()[0]}); "
                         "pass it as a numpy array (tensor.detach().cpu().numpy())") from None
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise UsageError(f"an image array is H×W (grey) or H×W×3/4 (RGB/RGBA, channels last), not shape {a.shape}; "
                         "several images: a list of arrays, or one N×H×W×C array")
    if a.size == 0:
        raise UsageError(f"an image array has no pixels: shape {a.shape}")
    if a.dtype == np.bool_ or a.dtype.kind not in "uif":
        raise UsageError(f"an image array holds numbers (uint8 0-255, or floats 0-1), not {a.dtype}")
    if a.dtype.kind == "u" and a.dtype.itemsize == 2 and a.ndim == 2:  # 16-bit grey (as cv2 or tifffile read it)
        # as its PNG reads, against the run's 16-bit white: 60000 was refused, a dark 100 taken for 8-bit 100
        return Image.fromarray(a.astype(np.uint16))  # mode I;16 (native byte order)
    if a.dtype.kind == "f" and not np.isfinite(a).all():  # NaN pixels were read as black, an all-NaN image
        raise UsageError(f"an image array holds {np.count_nonzero(~np.isfinite(a))} NaN or infinite values of "
                         f"{a.size}; fill or drop them first")  # as "spans nan to nan" with numpy's warning
    if a.dtype != np.uint8:
        low, high = float(a.min()), float(a.max())
        if a.dtype.kind == "f" and 0.0 <= low and high <= 1.0:
            a = np.rint(a * 255.0)
        elif not (a.dtype.kind in "iu" and 0 <= low and high <= 255):
            raise UsageError(f"an image array holds uint8 0-255 or floats 0-1; this {a.dtype} one spans "
                             f"{low:g} to {high:g}")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))
