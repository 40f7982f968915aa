"""Rungs 2-3 of the recipe search: partial and full fine-tuning from the best probe's head (LP-FT), each run on
an inner split of the training images and kept only where it is clearly better than the probe there."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..engine import signals
from ..engine.callbacks import Callback
from ..engine.scores import metric_words, paired_difference, standard_error
from . import costs, ladder, state
from .state import Candidate, Context, FIXED_OVERHEAD_S, FT_EPOCHS, INNER_FRACTION, PARTIAL_VIEWS, Search

log = logging.getLogger(__name__)


# Learning rates for fine-tuning that starts from the probe's head (LP-FT, Kumar et al. 2022: small steps keep
# the pretrained features the fitted head relies on). Measured on ELPV (benchmarks/RESULTS.md, "Notes on the
# recipe search (session 6)"): full fine-tuning at AdamW 5e-4 from a head at 0.85 val accuracy fell to 0.71
# after one epoch (training accuracy 0.68); at 1e-4 with each lower group at 0.8× the one above it (layer-wise
# decay, as timm and BEiT fine-tune), it stayed near it (0.849 after 2 epochs). Partial fine-tuning trains only
# the top groups, at the full rate.
FT_LR = {"finetune": 1e-4, "partial": 1e-3}
LOWER_LR_FACTOR = 0.8


def search_finetuning(search: Search, ctx: Context, probe: Candidate) -> Candidate | None:
    """LP-FT candidates scored on the inner hold-out; the winner if one beats the probe there."""
    cfg, given = search.cfg, search.given
    kinds = ladder.finetune_kinds(search, ctx)
    if not kinds or ((search.starved or state.one_image_a_class(ctx)) and "mode" not in given):
        return None  # starved: the rest goes to more images; one image a class: no hold-out can judge
    # Fine-tuning costs more and its hold-out score is noisier than the probe's 3-fold CV: it replaces the probe
    # only when it is clearly better on the inner hold-out (not_clearly_better). ELPV seed-sized (49 hold-out
    # images): partial 0.857 against the probe's 0.816, 2 images, chosen without a rule, scored 0.8301 on val
    # against the probe's 0.8497. A --mode that fine-tunes, given, asks for a fine-tuned model: the candidate of
    # that mode wins if it ran.
    y, judged = ctx.y[ctx.inner[1]], {"metric": search.metric, "seed": cfg.seed, "n_classes": len(ctx.scan.classes)}
    pending = 0.0 if "mode" in given else _probe_answers(search, ctx, probe, kinds)
    bar = -1.0 if "mode" in given else None if pending else \
        probe.holdout + standard_error(probe.holdout_pred, y, **judged)
    if bar is not None and bar >= 1.0:  # the probe is right on every inner hold-out image: nothing can score above
        why = "no fine-tuning: the probe is right on the whole inner hold-out"
        search.stopped = f"{search.stopped}; {why}" if search.stopped else why
        log.info("search: %s", why)
        return None
    best = None
    for kind in kinds:
        cand = _finetune_candidate(search, ctx, probe, kind, pending)  # skipped where the answers are owed
        if cand.score is None:
            continue
        why_not = None if "mode" in given else not_clearly_better(cand, probe, bar, y, **judged)
        if why_not is None and best is not None and cand.score <= best.score:
            why_not = f"not above {best.name}'s {best.score:.4f}"
        if why_not is None:
            best = cand
        else:
            cand.status = f"ran; {why_not}"
    if best is None and "mode" in given:
        log.warning("search: no %s run fitted in the budget, so the model is the probe; a larger --time-budget "
                    "(or --recipe tutorial) fine-tunes", cfg.mode)
    return best


def _probe_answers(search: Search, ctx: Context, probe: Candidate, kinds: list[str]) -> float:
    """The probe's answers on the inner hold-out, which every fine-tuning candidate is judged against: fitted now
    (probes.answer_hold_out; the ladder compares probes by CV alone, so no probe pays for this fit where nothing
    fine-tunes) where that fit, the cheapest candidate and a final run's fixed costs fit in what is left. Returns
    the seconds still owed for them: 0 once they are in, else the fit's estimate, and every candidate is then
    skipped with it."""
    from . import probes

    seconds = costs.hold_out_seconds(search, ctx, probe.settings)
    cheapest = min(_least_seconds(search, ctx, _finetune_settings(search, probe, kind)) for kind in kinds)
    reserve = costs.final_reserve(search, ctx, probe.settings)
    if seconds + cheapest + FIXED_OVERHEAD_S > search.left() or \
            not probes.answer_hold_out(search, ctx, probe, search.deadline - reserve):
        return max(seconds, 1.0)
    return 0.0


def _least_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """The least a fine-tuning candidate with these settings costs, before its step is timed: partial's
    activations, or ~3 forward passes per image for the other kinds' fewest epochs (the inner run and the refit)."""
    n, m = len(ctx.scan.train), len(ctx.scan.val)
    once = costs.activation_seconds(search, settings, n, m, ctx.cost)
    return once or (2 - INNER_FRACTION) * FT_EPOCHS[0] * 3 * n * costs.view_seconds(search, ctx)


def not_clearly_better(cand: Candidate, probe: Candidate, bar: float, y: np.ndarray, metric: str = "accuracy",
                        seed: int = 0, n_classes: int | None = None) -> str | None:
    """Why a fine-tuned candidate does not replace the probe, or None where it does. Two one-standard-error
    rules on the inner hold-out (labels y): its score must be above `bar` (the probe's + one standard error),
    and, image by image, it must beat the probe by more than one standard error of their difference were the
    two equally good. For accuracy that is the sign test's: the images only it gets right must outnumber those
    only the probe gets right by more than √(b + c). The second guards small hold-outs, where the first is a
    single image: 12 of 12 against the probe's 11 of 12 is no evidence. `n_classes`: the run's (macro-F1
    averages over them all); `seed`: the resampling's."""
    if cand.score <= bar:
        return f"not above the probe's hold-out {metric_words(metric)} + one standard error, {bar:.4f}"
    if cand.holdout_pred is None or probe.holdout_pred is None:
        return None
    if metric == "accuracy":
        cand_right, probe_right = cand.holdout_pred == y, probe.holdout_pred == y
        b, c = int((cand_right & ~probe_right).sum()), int((probe_right & ~cand_right).sum())
        if b - c <= np.sqrt(b + c):
            return (f"right on {b} hold-out images the probe gets wrong and wrong on {c} it gets right: "
                    f"a difference within one standard error (√{b + c} = {np.sqrt(b + c):.1f})")
        return None
    difference, spread = paired_difference(cand.holdout_pred, probe.holdout_pred, y, metric, seed, n_classes)
    if difference <= spread:
        return (f"{metric_words(metric)} {difference:+.4f} against the probe's on the same hold-out images: within "
                f"one standard error of a tie ({spread:.4f}: their answers swapped at random where they differ)")
    return None


def _finetune_settings(search: Search, probe: Candidate, kind: str) -> dict:
    """A fine-tuning recipe that holds across data sets (fastai/timm-style defaults): AdamW, cosine with a
    short warm-up, label smoothing, BatchNorm on its ImageNet statistics, the probe's crop and the
    augmentation its views showed to be safe; pieces given on the command line win."""
    dihedral = probe.settings.get("probe_views") in ("turns", "dihedral") or search.cfg.rotation_safe
    settings = {"mode": kind, "head_init": "probe", "batchnorm": "frozen", "optimizer": "adamw",
                "lr": FT_LR[kind], "lower_lr_factor": LOWER_LR_FACTOR if kind == "finetune" else 1.0,
                "weight_decay": 0.05, "scheduler": "cosine",
                "warmup_epochs": 0.3, "label_smoothing": 0.1, "batch_size": 32,
                # No weight average: on ELPV's inner hold-out it scored no better (RESULTS.md, session 33).
                "ema_epochs": 0.0,
                "augment": "dihedral" if dihedral else "light", "crop_fraction": probe.settings["crop_fraction"]}
    if "model" in probe.settings:  # the probe won on a stronger backbone: fine-tune that one
        settings["model"] = probe.settings["model"]
    if kind == "partial":
        kind_of_views = "dihedral" if dihedral else "random"
        settings.update(unfreeze=2, views=PARTIAL_VIEWS[kind_of_views], view_kind=kind_of_views)
    for key in list(settings):
        if key in search.given:
            settings[key] = getattr(search.cfg, key)
    return settings


def _finetune_candidate(search: Search, ctx: Context, probe: Candidate, kind: str,
                        pending: float = 0.0) -> Candidate:
    """`pending`: seconds the probe's inner hold-out answers still need (_probe_answers)."""
    settings = _finetune_settings(search, probe, kind)
    cand = search.add(Candidate(f"{kind} from the probe's head", kind, settings))
    cand.estimate_s = _least_seconds(search, ctx, settings)
    if pending:  # the probe's answers and the cheapest candidate did not fit together: this one does not either
        cand.status = (f"skipped: needs ~{cand.estimate_s:.0f}s after the probe's inner hold-out fit (~{pending:.0f}s) "
                       f"and with the final run, {search.left():.0f}s left")
        log.info("search: %s %s", cand.name, cand.status)
        return cand
    if not search.affords(cand, FIXED_OVERHEAD_S):  # even its least: no time spent timing a step
        return cand
    # Where it loses, the probe's final run follows its inner run (a --mode given: it cannot lose).
    probe_reserve = 0.0 if "mode" in search.given else costs.final_reserve(search, ctx, probe.settings)
    epochs = _planned_epochs(search, ctx, cand, probe_reserve)
    if epochs:
        settings["epochs"] = epochs
        _run_on_inner_split(search, ctx, cand, min(search.t0 + _inner_share(search), search.deadline - probe_reserve))
        if cand.score is not None:
            probe_text = "" if probe.holdout is None else f" (probe {probe.holdout:.4f})"  # a --mode given: not judged
            log.info("search: %s: inner hold-out %s %.4f at epoch %d%s, %.0fs", cand.name,
                     metric_words(search.metric), cand.score, settings["epochs"], probe_text, cand.seconds)
    return cand


def _planned_epochs(search: Search, ctx: Context, cand: Candidate, probe_reserve: float) -> int:
    """The epochs the candidate can afford, its step timed now (its estimate set from them); 0, with the candidate
    marked skipped, where not even FT_EPOCHS[0] and the refit fit."""
    n, m = len(ctx.scan.train), len(ctx.scan.val)
    once = costs.activation_seconds(search, cand.settings, n, m, ctx.cost)
    step_s = costs.step_seconds(search, ctx, cand.settings)
    per_epoch = step_s * n
    epochs = costs.affordable_epochs(search, per_epoch, val_pass=m * step_s / 3, once=once, probe_reserve=probe_reserve)
    if "epochs" in search.given:
        epochs = search.cfg.epochs if epochs >= FT_EPOCHS[0] else 0
    cand.estimate_s = once + (2 - INNER_FRACTION) * per_epoch * epochs  # the inner run and the refit
    if epochs >= FT_EPOCHS[0]:
        return epochs
    first = f"activations ~{once:.0f}s once, then " if once else ""
    cand.status = (f"skipped: {first}{FT_EPOCHS[0]} epochs (~{per_epoch:.0f}s each) and a refit do not fit in "
                   f"{search.left():.0f}s")
    log.info("search: %s %s", cand.name, cand.status)
    return 0


def _run_on_inner_split(search: Search, ctx: Context, cand: Candidate, deadline: float) -> None:
    """Trains the candidate on inner-train and scores it on the inner hold-out (carved from the training images):
    its score, best epoch (kept in its settings) and answers, or its failure in its status."""
    from ..engine.fit import fit

    t = time.perf_counter()
    inner_dir = Path(tempfile.mkdtemp(prefix=f"transferkit-inner-{cand.kind}-"))  # a throwaway run folder
    inner_cfg = state.candidate_config(search.cfg, cand.settings, inner_dir, best_metric=search.metric)
    answers = _HoldoutAnswers(len(ctx.inner[1]))
    try:
        metrics = fit(inner_cfg, scan=_inner_scan(ctx), deadline=deadline, figures=False, callbacks=[answers])
    except signals.Interrupted:
        raise  # the user's Ctrl-C stops the search, not just this candidate
    except Exception as exc:  # noqa: BLE001 - a failing candidate is recorded; the probe still stands
        cand.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("search: %s %s", cand.name, cand.status)
        return
    finally:
        shutil.rmtree(inner_dir, ignore_errors=True)
    cand.score = metrics["best_val_acc" if search.metric == "accuracy" else f"best_val_{search.metric}"]
    cand.settings["epochs"] = metrics["best_epoch"]
    cand.holdout_pred = answers.by_epoch.get(metrics["best_epoch"])
    cand.seconds, cand.status = time.perf_counter() - t, "ran"


class _HoldoutAnswers(Callback):
    """Each epoch's answers (class indices) for the inner hold-out images (the inner run's val split, in its
    order). Where the run could not read every one of them (a file changed since the scan), the rows no longer
    line up with the probe's: no answers, and only the score's bar decides."""

    def __init__(self, n: int):
        self.n, self.by_epoch = n, {}

    def on_epoch_end(self, trainer, row: dict, val: dict) -> None:
        if val.get("probs") is None or len(val["labels"]) != self.n:
            return
        pred = np.zeros(self.n, dtype=np.int64)
        pred[np.asarray(val["indices"])] = np.asarray(val["probs"]).argmax(1)
        self.by_epoch[row["epoch"]] = pred


def _inner_share(search: Search) -> float:
    # The inner run may use the part of the budget that leaves the same time again for the refit.
    now = time.perf_counter() - search.t0
    return now + (search.deadline - search.t0 - now - FIXED_OVERHEAD_S) * (1 - INNER_FRACTION) / (2 - INNER_FRACTION)


def _inner_scan(ctx: Context):
    """The training split cut in two: inner-train (80%) and an inner hold-out (20%) that plays val."""
    inner_train, inner_test = ctx.inner
    scan = copy.copy(ctx.scan)
    scan.train = [ctx.scan.train[i] for i in inner_train]
    scan.val = [ctx.scan.train[i] for i in inner_test]
    scan.split_source, scan.val_name = "inner hold-out of train", "hold-out"
    return scan
