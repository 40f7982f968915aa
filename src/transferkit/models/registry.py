"""Finding a backbone by name: the zoo's entries (models/zoo.py), entries registered at run time
(`register`), entry points of installed packages (group `transferkit.backbones`) and import paths
(`--model my_package.nets:tiny`). The record itself is models/spec.py's `BackboneSpec`.

A spec that came from outside the zoo carries its `source` ("module:attribute"); checkpoints store it, so
`load_checkpoint` rebuilds the network in a process that never saw the training command. Only modules
importable on this machine are imported: a checkpoint names code, it never carries any.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from importlib import metadata

from ..errors import UsageError
from ..preprocessing import Preprocessing  # noqa: F401  (re-exported: where callers looked for it before)
from .spec import BackboneSpec, GroupsFn, StagesFn, WeightsSource, named_groups, split_at_pools  # noqa: F401
from .zoo import BACKBONES, DEFAULT_MODEL  # noqa: F401

ENTRY_POINT_GROUP = "transferkit.backbones"

_REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in BACKBONES}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone for this process (a plugin's entry point or an import path does it across processes)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:  # an import path: the spec it names, once per process
        known = [spec for spec in _REGISTRY.values() if spec.source == name]
        return known[0] if known else register(load_spec(name))
    points = _entry_points()
    if name in points:
        return register(load_spec(points[name].value))
    close = difflib.get_close_matches(name, list_specs_names(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UsageError(
        f"unknown model {name!r}{hint} (choose from: {', '.join(list_specs_names())}; "
        "see `transferkit models`, or name your own as module:function)"
    )


def load_spec(path: str) -> BackboneSpec:
    """The spec at import path "module:attribute": a BackboneSpec, or a function of no arguments that
    returns one. The spec remembers the path so checkpoints can name it."""
    module_name, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"cannot load backbone {path!r}: {exc}") from None
    spec = found() if callable(found) and not isinstance(found, BackboneSpec) else found
    if not isinstance(spec, BackboneSpec):
        raise UsageError(f"backbone {path!r} is a {type(spec).__name__}, not a transferkit BackboneSpec")
    return spec if spec.source else dataclasses.replace(spec, source=path)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_specs_names() -> list[str]:
    return [*_REGISTRY, *(n for n in _entry_points() if n not in _REGISTRY)]


def list_specs() -> list[BackboneSpec]:
    return [get_spec(name) for name in list_specs_names()]
