"""Turn an ImageNet network into one for the user's classes: new head(s), freeze policy, layer groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import WeightsError
from .spec import BackboneSpec
from .weights import load_pretrained_state

log = logging.getLogger(__name__)


def build_model(
    spec: BackboneSpec,
    num_classes: int,
    pretrained: bool = True,
    weights_path: str | None = None,
) -> nn.Module:
    """The backbone with ImageNet weights (unless from scratch) and new head(s) for `num_classes`."""
    torch_state = torch.random.get_rng_state()
    model = spec.build()
    if pretrained or weights_path:
        state = load_pretrained_state(spec, list(model.state_dict()), weights_path)
        _load_backbone_state(model, state, spec)
    # Building draws random numbers; keep the caller's seed stream the same whatever the backbone.
    torch.random.set_rng_state(torch_state)
    for head in filter(None, (spec.head, spec.aux_head)):
        replace_layer(model, head, num_classes)
    return model


def _load_backbone_state(model: nn.Module, state: dict, spec: BackboneSpec) -> None:
    own = model.state_dict()
    heads = tuple(h + "." for h in filter(None, (spec.head, spec.aux_head)))
    # A file saved from a fine-tuned model has a head of another size: it is replaced anyway.
    state = {k: v for k, v in state.items() if not (k.startswith(heads) and own.get(k, v).shape != v.shape)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit {spec.name}: {str(exc).splitlines()[1:2]}") from None
    missing = [k for k in missing if not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit {spec.name}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def replace_layer(model: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Swap a Linear or 1×1 Conv2d classifier for a freshly initialised one with `num_classes` outputs."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
    else:
        raise TypeError(f"don't know how to replace a {type(old).__name__} head at {name}")
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return new


@dataclass
class ParamPlan:
    """Which parameters belong to which group, bottom to top, with the head(s) last."""

    names: list[str]  # group names: "group0", ..., "head"
    params: list[list[tuple[str, nn.Parameter]]]

    def trainable_groups(self) -> list[str]:
        return [n for n, ps in zip(self.names, self.params) if any(p.requires_grad for _, p in ps)]

    def count(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for ps in self.params for _, p in ps if p.requires_grad or not trainable_only)


def plan_params(model: nn.Module, spec: BackboneSpec) -> ParamPlan:
    groups = spec.groups(model)
    heads = [h for h in (spec.head, spec.aux_head) if h]
    names = [f"group{i}" for i in range(len(groups))] + ["head"]
    buckets: list[list] = [[] for _ in names]
    for pname, p in model.named_parameters():
        buckets[_group_index(pname, groups, heads)].append((pname, p))
    return ParamPlan(names, buckets)


def _group_index(pname: str, groups: list[list[str]], heads: list[str]) -> int:
    if any(pname.startswith(h + ".") for h in heads):
        return len(groups)
    best, best_len = None, -1
    for i, group in enumerate(groups):
        for prefix in group:
            if pname.startswith(prefix + ".") and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise ValueError(f"parameter {pname} is in no layer group; fix the registry entry")
    return best


def check_freeze(spec: BackboneSpec, mode: str, unfreeze: int) -> None:
    """The mode's freeze checks on the network built on the meta device, so a bad --unfreeze fails before
    any scanning or searching."""
    _mode(mode, unfreeze).check(spec)


def apply_freeze(model: nn.Module, spec: BackboneSpec, mode: str, unfreeze: int = 0) -> ParamPlan:
    """Set requires_grad as mode `mode` trains (modes/): feature-extract the head(s), finetune everything,
    partial the top `unfreeze` groups and the head(s). Returns the parameter plan."""
    return _mode(mode, unfreeze).freeze(model, spec)


def _mode(name: str, unfreeze: int):
    from ..config import TrainConfig
    from ..modes import make_mode

    return make_mode(TrainConfig(data="", mode=name, unfreeze=unfreeze))


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers whose parameters are all frozen stay in eval mode, so their
    running statistics are not overwritten by the new data's batch statistics (a frozen layer must not
    change at all)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
