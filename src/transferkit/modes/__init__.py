"""Ways of training, one class each (modes/base.py's `Mode`): what is frozen, where batches come from,
the optimizer's parameter groups, and how the run goes (epochs, or one fit for a probe).

This module is the one place a mode is registered, and it is torch-free: config validation and the CLI
parser take their choices from `mode_names()` without importing a mode's class (`predict --engine onnx`
must not import torch). Built-in modes are listed in BUILTIN; installed packages add theirs under the
entry point group `transferkit.modes` (name = "module:Class"), and `register_mode` adds one in-process.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib import metadata

ENTRY_POINT_GROUP = "transferkit.modes"

# name -> (import path of the class, one line for --help). Adding a mode: a class in its own file, a line here.
BUILTIN = {
    "feature-extract": ("transferkit.modes.feature_extract:FeatureExtract", "only the new head trains"),
    "finetune": ("transferkit.modes.finetune:Finetune", "everything trains"),
    "partial": ("transferkit.modes.partial:Partial", "the top --unfreeze layer groups train with the head"),
    "linear-probe": ("transferkit.modes.linear_probe:LinearProbe",
                     "a CV-tuned logistic regression on the frozen backbone's pooled multi-stage features"),
}
_ADDED: dict[str, object] = {}  # register_mode: name -> class


@lru_cache(maxsize=1)
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def mode_names() -> tuple[str, ...]:
    """Every mode's name: built-in, registered in this process, then from installed packages."""
    return tuple(dict.fromkeys([*BUILTIN, *_ADDED, *_plugins()]))


def mode_help() -> str:
    """One line naming each mode and what it trains (the --mode help)."""
    described = {name: text for name, (_, text) in BUILTIN.items()}
    return "; ".join(f"{name}: {described.get(name, 'from a plugin')}" for name in mode_names())


def get_mode(name: str):
    """The class of mode `name` (imported now)."""
    from ..errors import UsageError

    if name in _ADDED:
        return _ADDED[name]
    path = BUILTIN[name][0] if name in BUILTIN else _plugins().get(name)
    if path is None:
        raise UsageError(f"--mode must be one of {', '.join(mode_names())}, not {name!r}")
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load mode {name!r} from {path}: {exc}") from None


def make_mode(cfg):
    """The mode object of a run (its options come from the config)."""
    return get_mode(cfg.mode)(cfg)


def unread_options(cfg, given) -> list[str]:
    """The flags among `given` (the options set explicitly) that cfg's mode does not read (Mode.unread_options),
    spelled as on the command line."""
    return ["--" + name.replace("_", "-") for name in make_mode(cfg).unread_options() if name in given]


def register_mode(cls):
    """Add a mode class (with its `name`) for this process; returns it, so it can decorate the class."""
    _ADDED[cls.name] = cls
    return cls
