"""Finding a backbone by name: the zoo's entries (models/zoo.py), entries registered at run time
(`register`), entry points of installed packages (group `transferkit.backbones`) and import paths
(`--model my_package.nets:tiny`). The record itself is models/spec.py's `BackboneSpec`.

A spec that came from outside the zoo carries its `source` ("module:attribute"); checkpoints store it, so
`load_checkpoint` rebuilds the network in a process that never saw the training command. Only modules
importable on this machine are imported: a checkpoint names code, it never carries any. And it names only the
user's: a file from elsewhere could otherwise import any module and call any function of no arguments in the
standard library or an installed package (`tempfile:mkdtemp` made a folder on `tk.load`; see
`spec_named_by_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import site
import sys
import sysconfig
from importlib import machinery, metadata
from pathlib import Path

from ..errors import CheckpointError, UsageError
from ..preprocessing import Preprocessing  # noqa: F401  (re-exported: where callers looked for it before)
from .spec import BackboneSpec, GroupsFn, StagesFn, WeightsSource, named_groups, split_at_pools  # noqa: F401
from .zoo import BACKBONES, DEFAULT_MODEL  # noqa: F401

ENTRY_POINT_GROUP = "transferkit.backbones"
# Import paths (module:NAME) or modules a checkpoint may name although they live in the standard library or an
# installed package, comma-separated.
TRUSTED_ENV = "TRANSFERKIT_TRUSTED_BACKBONES"

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


def spec_named_by_checkpoint(name: str, source: str | None, checkpoint) -> BackboneSpec:
    """The backbone a checkpoint's metadata names: by zoo name, or by its import path where that is the user's
    own code: registered in this process or by an installed entry point, or a module outside the standard
    library, the installed packages and transferkit (a script folder on PYTHONPATH, the working folder), or
    listed in TRANSFERKIT_TRUSTED_BACKBONES. Anything else is refused before it is imported."""
    if not source:
        return get_spec(name)
    if not _is_users_code(source):
        raise CheckpointError(
            f"{checkpoint} names its backbone by import path {source!r}, in the standard library or an installed "
            f"package that registers no transferkit backbone; a file from elsewhere must not choose code to run. "
            f"If it is yours, set {TRUSTED_ENV}={source}")
    return get_spec(source)


def _is_users_code(source: str) -> bool:
    module = source.partition(":")[0]
    trusted = [t.strip() for t in os.environ.get(TRUSTED_ENV, "").split(",") if t.strip()]
    if any(source == t or module == t or module.startswith(t + ".") for t in trusted):
        return True
    if any(spec.source == source for spec in _REGISTRY.values()):
        return True
    if source in {ep.value for ep in _entry_points().values()}:  # an installed plugin's own backbone
        return True
    top = module.partition(".")[0]
    if top == "transferkit" or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return False
    found = machinery.PathFinder.find_spec(top)  # where it would come from, without importing it
    if found is None:
        return True  # not importable: get_spec says so in one line, and nothing runs
    origin = found.origin if found.has_location else None
    places = found.submodule_search_locations or ([origin] if origin else [])
    return bool(places) and not any(_inside(place, _installed_roots()) for place in places)


def _installed_roots() -> list[Path]:
    """Where the standard library and installed packages live (this environment's, the user's and the system's)."""
    paths = sysconfig.get_paths()
    roots = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    roots += getattr(site, "getsitepackages", lambda: [])() + [site.getusersitepackages()]
    return [Path(root).resolve() for root in roots]


def _inside(place: str, roots: list[Path]) -> bool:
    where = Path(place).resolve()
    return any(where == root or root in where.parents for root in roots)


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
