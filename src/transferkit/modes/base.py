"""`Mode`: one way of training. The loop (engine/trainer.py) asks its mode what to freeze, where batches
come from, which parameter groups the optimizer gets and how modules switch to training; a mode that is
not an epoch loop (the linear probe) replaces `train` as a whole. A new mode subclasses this in a file of
its own and is named in modes/__init__.py (or by an entry point).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.adapt import ParamPlan, plan_params, set_train_mode


class Mode:
    name = ""
    # Whether the network below the head takes gradient steps (the recipe search and reports read it).
    trains_backbone = False

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- what it reads -----------------------------------------------------------------------------

    def unread_options(self) -> tuple[str, ...]:
        """TrainConfig options this mode does not read (EpochLoopMode's, LinearProbe's): given explicitly
        with --recipe tutorial they are named in a warning (search/__init__.py) rather than dropped without a
        word. None by default: a plugin mode may read any option."""
        return ()

    # Why, in a few words, for that warning.
    unread_why = ""

    # ---- what trains ---------------------------------------------------------------------------

    def first_trainable_group(self, n_groups: int, spec) -> int:
        """Index of the lowest layer group that trains (groups 0 .. n_groups - 1, then the head at n_groups)."""
        return n_groups

    def freeze(self, model: nn.Module, spec) -> ParamPlan:
        """Set requires_grad on the model's parameters; return the plan of groups for logging and optimizers."""
        plan = plan_params(model, spec)
        first = self.first_trainable_group(len(plan.names) - 1, spec)
        for i, params in enumerate(plan.params):
            for _, p in params:
                p.requires_grad_(i >= first)
        return plan

    def check(self, spec) -> None:
        """freeze's checks on the network built on the meta device (no memory, no weights), so a bad option
        fails before any scanning or searching."""
        with torch.device("meta"):
            self.freeze(spec.build(), spec)

    def set_train_mode(self, model: nn.Module, spec) -> None:
        """How the whole network switches to training when image batches run through it."""
        set_train_mode(model)

    # ---- where batches come from -----------------------------------------------------------------

    def make_source(self, state):
        """Decoded image batches through the whole network (engine/sources.py)."""
        from ..data.transforms import eval_transform, train_transform
        from ..engine.sources import ImageBatchSource

        return ImageBatchSource(state, train_transform(state.pre, self.cfg.augment), eval_transform(state.pre))

    # ---- the optimizer -----------------------------------------------------------------------------

    def param_groups(self, plan: ParamPlan, lr: float) -> list[dict]:
        """One group per trainable layer group; lower groups get lr × lower_lr_factor^depth."""
        trainable = [(n, [p for _, p in ps if p.requires_grad]) for n, ps in zip(plan.names, plan.params)]
        trainable = [(n, ps) for n, ps in trainable if ps]
        return [{"params": params, "lr": lr * self.cfg.lower_lr_factor**depth, "name": name}
                for depth, (name, params) in enumerate(reversed(trainable))]

    # ---- the run -----------------------------------------------------------------------------------

    def callbacks(self) -> list:
        """Callbacks of this mode's own (engine/callbacks.py), run after the caller's and before the
        defaults: e.g. a gradual-unfreezing mode that unfreezes a group every few epochs."""
        return []

    def before_training(self, state) -> dict | None:
        """Before the first epoch of a new run: --head-init probe fits the head as a linear probe (LP-FT).
        Returns a record for metrics.json."""
        if self.cfg.head_init != "probe":
            return None
        from ..engine.probe_train import init_head_from_probe

        return init_head_from_probe(state)

    def train(self, state, t_start: float, **options) -> dict:
        """The epoch loop with its callbacks (engine/trainer.py); returns metrics.json's content.
        options: fit()'s resume, deadline, figures and callbacks."""
        from ..engine.trainer import Trainer

        return Trainer(state, t_start, **options).fit()


# Options only linear-probe reads.
PROBE_OPTIONS = ("probe_stages", "probe_pooling", "probe_views")


class EpochLoopMode(Mode):
    """The built-in modes that train in epochs (feature-extract, finetune, partial): what they leave alone."""

    unread_why = "the --probe-* options are --mode linear-probe's, --unfreeze partial's"

    def unread_options(self) -> tuple[str, ...]:
        """The --probe-* options (but --probe-c where --head-init probe fits a probe first) and --unfreeze."""
        return PROBE_OPTIONS + (() if self.cfg.head_init == "probe" else ("probe_c",)) + ("unfreeze",)
