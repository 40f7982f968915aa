"""The run configuration: one typed dataclass, validated once, saved as YAML beside the run.

Torch-free on purpose: the CLI builds its parser from these fields and choices, and the deployment path
(`predict`/`serve` with ONNX Runtime) must start on a box without torch. The modules that implement
a choice import its names from here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import UsageError
from .preprocessing import SIXTEEN_BIT_WHITE
from .modes import mode_names  # torch-free: the names, not the classes

SENSOR_BITS = (8, 10, 12, 14, 16)  # the bit depths cameras write into 16-bit files (--bit-depth)

AUGMENT_PRESETS = ("none", "light", "standard", "strong", "dihedral")  # data/transforms.py
VIEW_KINDS = ("dihedral", "random")
BATCHNORM_MODES = ("train", "frozen")  # models/batchnorm.py
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("step", "cosine", "onecycle", "none")
BEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "loss", "last")  # last: no selection on val
RECIPES = ("auto", "tutorial")
HEAD_INITS = ("random", "probe")
POOLINGS = ("mean", "meanmax")
PROBE_VIEWS = ("none", "flip", "turns", "dihedral")
PROBE_HEADS = ("linear", "mlp")
DEFAULT_TIME_BUDGET = "4m"  # keeps a no-flag ELPV run (2,624 images) within 5 minutes on a 2-core CPU
ENGINES = ("auto", "torch", "onnxruntime")
SCALE_LR = ("none", "linear")
CACHE_DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "fp32", "bf16")  # engine/precision.py


DEFAULT_VAL_FRACTION = 0.2  # of a folder without val/, held out for validation (--val-fraction)
CLASS_WEIGHTS = ("none", "auto")
# Whole-number options and their least value (those that may be None are checked only when set); the bools' and
# the other numbers' checks are TrainConfig's.
WHOLE_NUMBER_MINIMUMS = {"epochs": 1, "batch_size": 1, "views": 1, "step_size": 1, "patience": 0, "unfreeze": 0,
                         "train_subsample": 1, "workers": 0, "probe_stages": 1, "probe_scale": 32, "image_size": 32}
# Input sides above this are typos, not resolutions: the largest ImageNet CNNs run at 600-800 px, and
# --image-size 100000 grew to 11 GB in one convolution that ignored Ctrl-C for minutes.
WHOLE_NUMBER_MAXIMUMS = {"probe_scale": 2048, "image_size": 2048}


def option_choices() -> dict[str, tuple]:
    """Each TrainConfig option that takes one of a few values, and those values: what validate checks and
    what the CLI's --help lists (cli.py), in one place. A function, since plugins add modes."""
    return {"recipe": RECIPES, "mode": mode_names(), "head_init": HEAD_INITS, "probe_pooling": POOLINGS,
            "probe_views": PROBE_VIEWS, "probe_head": PROBE_HEADS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
            "augment": AUGMENT_PRESETS, "view_kind": VIEW_KINDS, "best_metric": BEST_METRICS,
            "class_weights": CLASS_WEIGHTS, "engine": ENGINES, "precision": PRECISIONS, "scale_lr": SCALE_LR,
            "cache_dtype": CACHE_DTYPES, "batchnorm": BATCHNORM_MODES}


@dataclass
class TrainConfig:
    data: str
    # auto: search for the best recipe within --time-budget (search/), choosing on training images only;
    # tutorial: train exactly as configured, the seed tutorials' values where nothing is given.
    recipe: str = "auto"
    time_budget: str = DEFAULT_TIME_BUDGET
    rotation_safe: bool = False  # the images have no "up": the search may use all 8 dihedral views
    model: str = "efficientnet_lite0"
    mode: str = "feature-extract"
    unfreeze: int = 2  # partial mode: how many top layer groups train
    epochs: int = 15
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.001  # the seeds' SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "step"
    step_size: int = 7  # the seeds' StepLR(step_size=7, gamma=0.1)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    lower_lr_factor: float = 1.0  # each group below the head trains at this × the one above it
    label_smoothing: float = 0.0
    ema_epochs: float = 0.0  # evaluate and keep a moving average of the weights over about this many epochs (0: off)
    augment: str = "standard"
    views: int = 1  # feature-extract: cached views per training image (view 0 is the eval crop)
    view_kind: str = "dihedral"  # extra views: the square's symmetries, or random train augmentations
    image_size: int | None = None  # override the backbone's input size (keeps its crop fraction)
    crop_fraction: float | None = None  # eval crop / resize (1.0 = no crop, for objects filling the frame)
    bit_depth: int | None = None  # bits a 16-bit grey image's values use (None: found by the scan, data/folders/)
    cache: bool = True  # feature-extract: run the frozen backbone once per image and cache features
    decoded_cache: bool = True  # image training: decode + resize each image once into a memory-mapped store
    cache_dtype: str = "float16"  # partial mode: dtype of cached activations of the frozen groups
    val_fraction: float = DEFAULT_VAL_FRACTION
    # a seeded stratified random N of the training images (the first N of one seeded order, data/folders/
    # subsample_order: a smaller subsample is inside a larger one); the recipe search names it in its reproduce
    # command when its budget allowed fewer
    train_subsample: int | None = None
    group_duplicates: bool = True  # a split made here keeps copies of one picture on one side
    seed: int = 0
    pretrained: bool = True
    weights: str | None = None
    best_metric: str = "accuracy"
    patience: int = 0  # early stopping: epochs without improvement (0 = off)
    class_weights: str = "none"  # none | auto
    balanced_sampler: bool = False
    strict: bool = False
    workers: int | None = None  # DataLoader workers (None = chosen for the core count)
    device: str = "auto"
    scale_lr: str = "none"  # several processes: linear = lr × number of data-parallel ranks
    engine: str = "auto"  # frozen-part runtime for feature extraction
    precision: str = "auto"  # auto: bf16 autocast where the device has native bf16, else fp32
    channels_last: bool = True
    batchnorm: str = "train"  # frozen: BN keeps ImageNet statistics (γ, β learn) and folds into convs
    compile: bool = False
    head_init: str = "random"  # probe: start the head from a CV-tuned linear probe (LP-FT, Kumar et al. 2022)
    probe_stages: int | None = None  # linear-probe: pooled features of the top N stages (default: all tapped)
    probe_pooling: str = "meanmax"  # linear-probe: channel means, or means and maxima
    probe_views: str = "none"  # linear-probe: train on and average over none, flip, or all 8 dihedral views
    probe_c: float | None = None  # linear-probe: inverse L2 strength (default: chosen by 3-fold CV on train)
    # linear-probe: also read each image at this smaller size (resized inside the model), fit a second probe
    # there and average the two probes' logits (a two-scale ensemble); its strength like probe_c's
    probe_scale: int | None = None
    probe_scale_c: float | None = None
    # linear-probe: also the image's raw pixels (channel mean at 32×32, in the model) as features, for images
    # much smaller than the network's input
    probe_pixels: bool = False
    probe_head: str = "linear"  # linear-probe: logistic regression, or one hidden layer (engine/probe.py fit_mlp)
    tensorboard: bool = False
    out: str | None = None
    overwrite: bool = False  # replace a run already in `out` (finished or interrupted)

    def keep_bit_depth(self, found_white: int | None) -> None:
        """The scan's white of 16-bit grey images (data/folders sixteen_bit_white) where --bit-depth was not
        given and it is not 16-bit's: kept in the config, so a resumed run and the reproduce command read the
        images as this run did."""
        if self.bit_depth is None and found_white not in (None, SIXTEEN_BIT_WHITE):
            self.bit_depth = found_white.bit_length()

    @property
    def sixteen_bit_white(self) -> int | None:
        """The value that is white in a 16-bit grey image (None: the reader's default, SIXTEEN_BIT_WHITE)."""
        return None if self.bit_depth is None else (1 << self.bit_depth) - 1

    def validate(self) -> "TrainConfig":
        """Every option checked before any time is spent: a user's mistake is one line (UsageError)."""
        self._check_types()
        for name, allowed in option_choices().items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{_flag(name)} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        parse_duration(self.time_budget)
        self._check_ranges()
        self._check_combinations()
        if self.tensorboard:
            from .engine.tensorboard import require_tensorboard

            require_tensorboard()  # before any training time is spent
        return self

    def _check_ranges(self) -> None:
        for name, low in WHOLE_NUMBER_MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < low:  # None: an optional option left to its default
                raise UsageError(f"--{_flag(name)} must be ≥ {low}, not {value}")
        for name, high in WHOLE_NUMBER_MAXIMUMS.items():
            value = getattr(self, name)
            if value is not None and value > high:
                raise UsageError(f"--{_flag(name)} must be ≤ {high} pixels, not {value}")
        if not 0 < self.lr < float("inf"):
            raise UsageError(f"--lr must be > 0 (and finite), not {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")
        if not 0 < self.lower_lr_factor <= 1:
            raise UsageError(f"--lower-lr-factor must be in (0, 1], not {self.lower_lr_factor}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if not all(0 <= x < float("inf") for x in (self.weight_decay, self.momentum, self.warmup_epochs,
                                                      self.ema_epochs)):  # nan passed a `< 0` check
            raise UsageError("--weight-decay, --momentum, --warmup-epochs and --ema-epochs must be ≥ 0 (and finite)")
        if self.momentum >= 1:  # the step's running sum would grow without bound
            raise UsageError(f"--momentum must be in [0, 1), not {self.momentum}")
        if not 0 < self.gamma < float("inf"):
            raise UsageError(f"--gamma must be > 0 (StepLR multiplies the lr by it), not {self.gamma}")
        if not 0 <= self.seed < 2**32:  # a whole number: _check_types
            raise UsageError(f"--seed must be a whole number from 0 to 2**32 - 1, not {self.seed!r}")
        if self.bit_depth is not None and self.bit_depth not in SENSOR_BITS:
            raise UsageError(f"--bit-depth must be one of {', '.join(map(str, SENSOR_BITS))}, not {self.bit_depth}")
        if self.crop_fraction is not None and not 0.3 <= self.crop_fraction <= 1:
            raise UsageError(f"--crop-fraction must be between 0.3 and 1, not {self.crop_fraction}")
        for name in ("probe_c", "probe_scale_c"):
            c = getattr(self, name)
            if c is not None and not 0 < c < float("inf"):
                raise UsageError(f"--{_flag(name)} must be > 0, not {c}")

    def _check_combinations(self) -> None:
        """Options that are valid alone but not together."""
        if self.view_kind == "dihedral" and self.views > 8:
            raise UsageError("--views must be between 1 and 8 with --view-kind dihedral (a square has 8 symmetries)")
        one_fit = self.recipe == "tutorial" and self.mode == "linear-probe"
        trains_in_epochs = self.recipe == "tutorial" and self.mode != "linear-probe"
        if self.ema_epochs and one_fit:
            raise UsageError("--ema-epochs goes with a mode that trains in epochs (a linear probe is one fit)")
        if self.probe_scale is not None and not one_fit:
            raise UsageError("--probe-scale goes with --recipe tutorial --mode linear-probe (the auto recipe "
                             "chooses the scales itself)")
        if self.probe_pixels and (trains_in_epochs or self.probe_scale is not None):
            raise UsageError("--probe-pixels goes with --mode linear-probe (or the auto recipe), without --probe-scale")
        if self.probe_head == "mlp" and (trains_in_epochs or self.probe_scale is not None or self.probe_c is not None):
            raise UsageError("--probe-head mlp goes with --mode linear-probe (or the auto recipe), without "
                             "--probe-scale or --probe-c (the two-scale probe and C are the linear head's)")

    @property
    def balanced_classes(self) -> bool:
        """--class-weights auto: each class counts alike, in the loss (engine/trainer.py), in a probe's fit
        (engine/probe.py) and, unless --best-metric names another score, in what its CV chooses by
        (selection_metric)."""
        return self.class_weights == "auto"

    @property
    def selection_metric(self) -> str:
        """What a CV on the training images (a probe's strength, the recipe search's candidates) and the search's
        inner hold-out choose by: the --best-metric a run picks its epoch by, where that is a score of the
        answers (balanced_accuracy, macro_f1); else balanced accuracy under --class-weights auto; else accuracy."""
        if self.best_metric in ("balanced_accuracy", "macro_f1"):
            return self.best_metric
        return "balanced_accuracy" if self.balanced_classes else "accuracy"

    def _check_types(self) -> None:
        """Each option of the kind its field holds (a config file or the Python API can give any value): "3" for
        epochs ended in a TypeError comparing it with 1. Whole numbers pass as floats; a bool is none of
        these, and true or false only."""
        kinds = {"int": (int,), "float": (int, float), "str": (str, os.PathLike)}  # paths: data, out, weights
        for f in fields(self):
            value, (kind, optional) = getattr(self, f.name), _kind_of(f)
            if kind not in kinds or (optional and value is None) or f.name == "time_budget":  # 300 is 300 s
                continue
            if isinstance(value, bool) or not isinstance(value, kinds[kind]):
                wanted = {"int": "a whole number", "float": "a number", "str": "text"}[kind]
                raise UsageError(f"--{_flag(f.name)} must be {wanted}, not {value!r}")
        bad = [f.name for f in fields(self) if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool)]
        if bad:
            raise UsageError(f"{', '.join(bad)} must be true or false")

    def check_paths(self) -> None:
        """Folders and files the config names exist and are of the right kind (exit code 2)."""
        if self.data is None or self.data == "":  # "": Path("") is the working folder
            raise UsageError("train needs a DATA folder: give it on the command line or as data: in the config")
        self._check_types()  # a config file's `data: 5` or `out: [a]` is not a path
        data = Path(self.data)
        if not data.exists():
            raise UsageError(f"DATA folder {data} does not exist")
        if not data.is_dir():
            archive = any(data.name.lower().endswith(s) for s in (".zip", ".tar", ".tgz", ".tar.gz", ".tar.xz", ".7z"))
            raise UsageError(f"DATA {data} is {'an archive: unpack it and pass the folder' if archive else 'a file'}"
                             "; expected a folder of class folders (DATA/<class>/*.jpg)")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UsageError(f"--out {self.out} is a file; expected a run folder (new or existing)")
        if self.weights and not Path(self.weights).is_file():
            raise UsageError(f"--weights {self.weights} is not a file (expected a .safetensors or .pth file)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(d) - known)  # str: `1: 2` or `null: x` in a config file
        if unknown:
            raise UsageError(f"unknown config keys: {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
        return cls(**{"data": None, **d})  # a config without data: (DATA on the command line); check_paths

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(cls.read_yaml(path))

    @staticmethod
    def read_yaml(path: str | Path) -> dict:
        """A config file's fields as it sets them (numbers written without a dot read as numbers); one-line errors
        for a file that is not a YAML mapping. from_dict refuses unknown keys."""
        try:
            d = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError:  # an image or a checkpoint given as the config
            raise UsageError(f"cannot read config {path}: not a UTF-8 text (YAML) file") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read config {path}: {yaml_problem(exc)}") from None
        if not isinstance(d, dict):
            raise UsageError(f"config {path} must be a mapping of option: value")
        return {key: _yaml_number(key, value) for key, value in d.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so
    `epochs: 1` ... `epochs: 20` trained 20 epochs with no word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def yaml_problem(exc: Exception) -> str:
    """A YAML (or read) error in one line: PyYAML's own message spans five, with a caret under the spot."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _kind_of(field: dataclasses.Field) -> tuple[str, bool]:
    """A TrainConfig field's kind ("int", "float", "str", "bool") and whether it may be None."""
    kind, _, rest = str(field.type).partition(" | ")
    return kind, rest == "None"


def _yaml_number(key, value):
    """YAML 1.1 reads `lr: 1e-3` (no dot) as the text "1e-3": a number where the option holds one."""
    field = next((f for f in fields(TrainConfig) if f.name == key), None)
    if field is not None and _kind_of(field)[0] == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # validate names the option
    return value


def parse_duration(text) -> float:
    """'90s', '10m', '1h', '1h30m' or a number of seconds → seconds."""
    import re

    spec = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", spec)
    if not spec or parts is None or not any(parts.groups()):
        raise UsageError(f"--time-budget must be a duration such as 90s, 10m or 1h, not {text!r}")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds < 1:
        raise UsageError(f"--time-budget must be at least 1s, not {text!r}")
    return seconds


def _flag(name: str) -> str:
    """A TrainConfig field's command-line spelling, without the dashes: probe_scale_c -> probe-scale-c."""
    return name.replace("_", "-")


# `transferkit data check` (datacheck.py): its thresholds live here, torch-free, because the CLI parser
# shows their defaults.
@dataclass
class Thresholds:
    near_cosine: float = 0.90  # embedding cosine for a near-duplicate candidate
    near_pixel: float = 0.99  # thumbnail correlation (best mild crop) that confirms it
    outlier_z: float = 5.0  # robust z-score of the kNN distance
    folds: int = 5  # k of the k-fold linear probe
    top: int = 50  # findings of each kind listed in check.json / check.html (all are counted)

    def validate(self) -> "Thresholds":
        for name in ("near_cosine", "near_pixel"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be between -1 and 1, not {getattr(self, name)}")
        if not self.outlier_z > 0:  # not `<= 0`: nan passes that, and then no image is ever an outlier
            raise UsageError(f"--outlier-z must be > 0, not {self.outlier_z}")
        if self.folds < 2:
            raise UsageError(f"--folds must be ≥ 2, not {self.folds}")
        if self.top < 1:
            raise UsageError(f"--top must be ≥ 1, not {self.top}")
        return self
