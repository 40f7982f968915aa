"""`--recipe auto`: the best recipe this tool can find within a time budget, chosen on training images only.

A ladder of candidates from cheap to expensive, each reusing the caches of the ones before it:
  1. linear probes (engine/probe.py) on pooled multi-stage features: the backbone's eval crop, then the
     whole frame; then the mirror view, then the 8 dihedral views (where --rotation-safe says so, or where
     the probe on the image and its mirror turned by 90° too won the CV); then the best probe's features with
     an MLP head in place of the logistic regression (engine/probe.py fit_mlp); then, where the images are large
     enough, a two-scale probe (the best views read at 4/3 of the input size too, one probe per scale, logits
     averaged); then the best crop and views on a stronger backbone of the same family (the registry's
     `stronger`), which fine-tuning and the final run use where it wins; pooling, stages and C by 3-fold CV;
  2. partial fine-tuning of the top groups on cached activations, from the probe's head (LP-FT);
  3. full fine-tuning with frozen BatchNorm, from the probe's head (LP-FT).
Costs are measured (extraction rate on the first images, a training step's rate on two batches) and a
candidate runs only when it and the final refit fit in what is left of the budget. On a large folder the
candidates are compared on a seeded subsample (SEARCH_MAX_IMAGES per default budget), and a winning probe is
then fitted on as many training images as the time left pays for. Fine-tuning candidates
are scored on an inner hold-out of the training split, against the best probe scored on the same images.
Every comparison scores accuracy, or the balanced accuracy or macro-F1 that --best-metric (or --class-weights
auto: balanced accuracy) asks for (TrainConfig.selection_metric).
The val split is read once: by the final run, which refits the winner on all training images (or, on a large
folder, as many as the budget pays for) and is an ordinary run folder, plus search.json (every candidate, its
score, time and why it stopped) and the one command that reproduces the choice without the search.

The package, in the order a search runs: state.py (a candidate, the search's clock and record, the context every
candidate shares), ladder.py (which rungs and settings the options and the data allow), costs.py (every time
and memory estimate the plan and the budget checks use), features.py (the training features, extracted in
chunks against the deadline), probes.py (rung 1), finetuning.py (rungs 2-3), final_run.py (the winner refitted,
val read once, search.json and the reproduce command). This module runs them in that order.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from pathlib import Path

from ..config import TrainConfig, parse_duration
from ..errors import UsageError
from ..modes import make_mode, unread_options
from ..engine import signals
from ..engine.optim import schedule_warnings
from ..engine.scores import metric_words
from . import costs, features, final_run, finetuning, probes
from .state import FIXED_OVERHEAD_S, Context, Search

log = logging.getLogger(__name__)


def _check_probe_stages(spec, stages: int | None) -> None:
    """--probe-stages beyond the stages the backbone taps would pool them all while config.yaml and the reproduce
    command said the number given."""
    if stages is not None and stages > spec.probe_taps:
        raise UsageError(f"--probe-stages must be between 1 and {spec.probe_taps} for {spec.name} "
                         f"(it taps {spec.probe_taps} stage{'s' if spec.probe_taps > 1 else ''})")


def train(cfg: TrainConfig, given=(), resume: bool = False) -> dict:
    """The one entry for training: the search for --recipe auto, else the configured run (engine/fit.py).
    `given`: the options set explicitly (each fixes its piece of the recipe)."""
    from ..caches import cap_setting
    from ..engine.fit import fit, refuse_to_overwrite
    from ..models.adapt import check_freeze
    from ..models.registry import get_spec
    from ..engine import distributed
    from ..run_folder import claimed

    if not resume:  # what can be refused is refused before any search time is spent
        cfg.validate()
        cap_setting()
        spec = get_spec(cfg.model)
        check_freeze(spec, cfg.mode, cfg.unfreeze)
        _check_probe_stages(spec, cfg.probe_stages)
    # The whole search holds --out, not just its final run (under torchrun rank 0 alone: fit).
    with claimed(Path(cfg.out)) if cfg.out and distributed.is_main() else nullcontext():
        if cfg.out and not resume:
            refuse_to_overwrite(Path(cfg.out), cfg.overwrite)
        if cfg.recipe == "auto" and not resume:
            return run(cfg, set(given))
        mode = make_mode(cfg)
        unread = [] if resume else unread_options(cfg, given)
        if unread:
            log.warning("%s: not read by --mode %s (%s)", ", ".join(unread), cfg.mode, mode.unread_why)
        if not resume and "scheduler" not in mode.unread_options():  # a linear probe's were named just above
            for line in schedule_warnings(cfg, given):
                log.warning("%s", line)
        reads_budget = "time_budget" not in mode.unread_options()  # a linear probe has no epochs to stop
        deadline = _configured_run_deadline(cfg, given) if reads_budget and not resume else None
        return fit(cfg, resume=resume, deadline=deadline)


def _configured_run_deadline(cfg: TrainConfig, given) -> float | None:
    """A --time-budget given with --recipe tutorial bounds the configured run's epochs as it bounds the search's
    final run (engine/callbacks.py Deadline: the epoch under way is the last once the next would end past it).
    Not given, the seeds' epochs all run (the tutorial recipe stays the seeds' run). (A resumed run goes on to its
    epochs, and a mode that does not read the budget, a linear probe, gets none: train.)"""
    if "time_budget" not in given:
        return None
    log.info("--time-budget %s: the run stops early, before an epoch that would end past it (of --epochs %d)",
             cfg.time_budget, cfg.epochs)
    return time.perf_counter() + parse_duration(cfg.time_budget) - FIXED_OVERHEAD_S


def run(cfg: TrainConfig, given: set[str]) -> dict:
    """Search, refit the winner on all training images, evaluate it once on val; return its metrics."""
    from ..data.folders import check_subsample, scan_dataset
    from ..engine.fit import advise_on_imbalance, default_run_dir
    from ..models.registry import get_spec

    cfg = copy.deepcopy(cfg)  # the caller's config is not changed
    cfg.validate()
    get_spec(cfg.model)  # an unknown model fails before any scanning
    t0 = time.perf_counter()
    from ..engine.progress import time_bar

    budget = parse_duration(cfg.time_budget)
    search = Search(cfg, set(given), t0 + budget, t0, bar=time_bar(budget, "search"))
    scan = scan_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict,
                        group_duplicates=cfg.group_duplicates)
    for line in scan.summary_lines():
        log.warning(line)
    search.cfg.keep_bit_depth(scan.sixteen_bit_white)  # every candidate and the final run read images alike
    advise_on_imbalance(scan, search.metric)
    check_subsample(cfg.train_subsample, scan)
    if cfg.best_metric in ("loss", "last") and "best_metric" in given:
        # The search compares its candidates by a score of their answers (CV folds, a hold-out), and its final
        # run is one probe fit or a fine-tuning's last epoch: the option would otherwise go without a word.
        log.warning("--best-metric %s: the recipe search chooses by %s on the training images and keeps its run's "
                    "last state (with --recipe tutorial, --best-metric picks the epoch)", cfg.best_metric,
                    metric_words(search.metric))
    out = Path(cfg.out or default_run_dir(cfg).with_name(default_run_dir(cfg).name.replace(cfg.mode, "auto")))
    try:
        context = Context.build(cfg, scan)
        _compare_on_enough_images(search, context, budget)
        winner, context = probes.search_probes(search, context)  # the context of the winner's backbone
        winner = finetuning.search_finetuning(search, context, winner) or winner
    except signals.Interrupted as exc:  # inside a candidate's throwaway run: its resume command means nothing
        search.bar.close()
        raise signals.Interrupted("interrupted during the recipe search; the features computed so far stay in the "
                                  "cache, so the same command starts again from them", exc.exit_code - 128) from None
    if search.subsample and not cfg.train_subsample:
        search.compared_on = search.subsample
        if winner.kind == "probe":
            context.scan = final_run.grown_scan(search, winner, context, scan)
    final = final_run.final_config(search, winner, out)
    scan = context.scan  # all training images, or the subsample the budget allowed
    del context  # its model and runtimes: the final run builds its own
    search.bar.close()
    metrics = final_run.refit(search, winner, final, scan)
    final_run.write_search(search, winner, final, metrics)
    return metrics


def _compare_on_enough_images(search: Search, context: Context, budget: float) -> None:
    """The training images the candidates are compared on: those --train-subsample asks for, else on a large
    folder a seeded random subsample of as many as the budget and the memory allow (costs.compared_on,
    costs.compared_memory_holds), and never fewer than COMPARED_PER_CLASS per class."""
    cfg, scan = search.cfg, context.scan
    by_budget = costs.compared_on(budget, len(scan.classes))
    # no fewer than COMPARED_PER_CLASS per class, as by the budget: on fewer the comparisons say nothing
    floor = costs.COMPARED_PER_CLASS * len(scan.classes)
    compare_on = min(by_budget, max(costs.compared_memory_holds(search, context), floor))
    if cfg.train_subsample:  # the images asked for, for the search and the final model
        if cfg.train_subsample < len(scan.train):
            features.keep_subsample(search, context, cfg.train_subsample, asked=True)
    elif len(scan.train) > compare_on:
        log.warning("search: the recipes are compared on a random %d of the %d training images%s; a chosen probe "
                    "is then fitted on as many as the budget allows", compare_on, len(scan.train),
                    " (what the memory holds)" if compare_on < by_budget else "")
        features.keep_subsample(search, context, compare_on, asked=True)
    search.compared_target = len(context.scan.train)
