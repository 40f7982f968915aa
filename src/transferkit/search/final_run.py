"""The end of the recipe search: the winner's config, its refit on the training images (val read once, here),
search.json and the one command that reproduces the choice without the search."""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import fields
from pathlib import Path

from ..config import TrainConfig
from ..engine import signals
from ..engine.scores import metric_words
from ..io import atomic_write_json
from ..run_folder import RunFolder
from . import costs, state
from .costs import GROWTH_SHARE
from .state import Candidate, Context, FIXED_OVERHEAD_S, Search

log = logging.getLogger(__name__)


# Pieces of the recipe the search chooses; given explicitly, each stays as given.
PROBE_PIECES = ("model", "crop_fraction", "probe_views", "probe_stages", "probe_pooling", "probe_c", "image_size",
                "probe_scale", "probe_scale_c", "probe_pixels", "probe_head")


def grown_scan(search: Search, winner: Candidate, ctx: Context, full):
    """The split for the final run of a probe chosen on a subsample: the subsample grown (along the same seeded
    order, so it keeps the images the search extracted) by as many training images as GROWTH_SHARE of the time
    left pays for: their features in the winner's views and scales, and the larger fit."""
    from ..data.folders import subsample_train

    s, n, total = winner.settings, len(ctx.scan.train), len(full.train)
    val_pass = costs.val_pass_seconds(search, ctx, s)
    spare = (search.left() - val_pass - FIXED_OVERHEAD_S) * GROWTH_SHARE - costs.fit_seconds(search, ctx, s)
    per_image = costs.final_seconds_per_image(search, ctx, s)
    by_time = n + max(0, int(spare / per_image))
    by_memory = costs.images_memory_holds(ctx, s, len(full.val))
    grown = min(total, by_time, max(n, by_memory))
    if grown < total:  # what the reproduce command takes without --train-subsample: told, so the user can choose
        search.all_images_s = total * per_image + val_pass + FIXED_OVERHEAD_S
    memory_bound = by_memory < min(total, by_time)
    if memory_bound:  # and the memory it needs, where that is what stopped the growth
        search.all_images_bytes = costs.final_run_bytes(ctx, s, total, len(full.val))
    if grown <= n:
        return ctx.scan
    search.subsample = grown if grown < total else None
    limit = "what the memory holds" if memory_bound else "what the budget allows"
    log.info("search: the chosen probe is fitted on %s", f"{grown} of the {total} training images ({limit})"
             if grown < total else f"all {total} training images")
    return subsample_train(full, grown, search.cfg.seed)  # the final run's --train-subsample takes the same images


def final_config(search: Search, winner: Candidate, out: Path) -> TrainConfig:
    subsample = {"train_subsample": search.subsample} if search.subsample else {}  # for the reproduce command
    if winner.kind == "probe":
        # a linear winner has the linear head, also where --probe-head mlp was given and no MLP head was fitted
        settings = {"probe_head": "linear", **{k: winner.settings[k] for k in PROBE_PIECES if k in winner.settings}}
        if settings["probe_head"] == "mlp":
            settings.pop("probe_c", None)  # the linear probe's strength it was built on: an MLP head has none
        # A probe is one fit: a given --ema-epochs was for a fine-tuning the search might have chosen (a linear
        # probe's config refuses it, which ended the run after the whole search).
        return state.candidate_config(search.cfg, settings, out, mode="linear-probe", ema_epochs=0.0, **subsample)
    return state.candidate_config(search.cfg, winner.settings, out, best_metric="last", **subsample)


def refit(search: Search, winner: Candidate, final: TrainConfig, scan) -> dict:
    from ..engine.fit import fit

    images = f"the {len(scan.train)} training images of the subsample" if search.subsample else \
        f"all {len(scan.train)} training images"
    log.info("search: refitting the chosen recipe on %s; val is scored once, now", images)
    try:
        return fit(final, scan=scan, deadline=search.deadline - FIXED_OVERHEAD_S)
    except signals.Interrupted:  # the run folder is continued with --resume: what the search found stays beside it
        if Path(final.out).is_dir():
            _save_search_record(search, winner, final)
        raise


def reproduce_command(cfg: TrainConfig) -> str:
    """`transferkit train` with every piece that differs from the tutorial defaults: no search."""
    defaults = TrainConfig(data=cfg.data)
    args = ["transferkit", "train", cfg.data, "--recipe", "tutorial"]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in ("data", "recipe", "time_budget", "out") or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return shlex.join(args + ["--out", cfg.out + "-reproduced"])


def _metric_text(search: Search) -> str:
    """What the selection was scored by, where that is not accuracy, and which option asked for it."""
    if search.metric == "accuracy":
        return ""
    asked = "--best-metric" if search.cfg.best_metric == search.metric else "--class-weights auto"
    return f", scored by {metric_words(search.metric)}: {asked}"


def _repeats_text(repeats: int) -> str:
    return f", {repeats} splits with other folds pooled" if repeats > 1 else ""


def _save_search_record(search: Search, winner: Candidate, final: TrainConfig, metrics: dict | None = None) -> dict:
    """Write the final run's search.json and return it: every candidate, the choice, its reproduce command and,
    once the final run has scored it, its val metrics."""
    record = {
        "budget_seconds": search.deadline - search.t0,
        "wall_seconds": time.perf_counter() - search.t0,
        "extraction_images_per_second": search.rate,
        "train_subsample": search.subsample,
        "all_images_seconds_estimate": search.all_images_s,
        "all_images_memory_bytes_estimate": search.all_images_bytes,
        "compared_on_images": search.compared_on,
        "metric": search.metric,
        "stopped": search.stopped,
        "selection": f"3-fold CV on train (probes{_repeats_text(search.cv_repeats)}{_metric_text(search)}); an inner "
                     "20% hold-out of train (fine-tuning); val read once, by the final run",
        "candidates": [c.record() for c in search.candidates],
        "chosen": winner.name,
        "chosen_settings": winner.settings,
        "reproduce": reproduce_command(final),
    }
    if metrics is not None:
        record["val"] = {k: metrics.get(k) for k in ("best_val_acc", "best_val_balanced_accuracy", "best_val_macro_f1")}
    atomic_write_json(RunFolder(final.out).search, record)
    return record


def write_search(search: Search, winner: Candidate, final: TrainConfig, metrics: dict) -> None:
    record = _save_search_record(search, winner, final, metrics)
    metrics["search"] = {k: record[k] for k in ("chosen", "reproduce", "wall_seconds", "train_subsample",
                                                 "all_images_seconds_estimate", "all_images_memory_bytes_estimate")}
    from ..results.report import write_report

    write_report(final.out, announce=False)  # again, now with the Search section
    log.info("search: chose %s; reproduce without the search: %s", winner.name, record["reproduce"])
