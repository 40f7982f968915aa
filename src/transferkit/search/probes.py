"""Rung 1 of the recipe search: linear probes up the crops and views, the MLP head, the two-scale probe and
the stronger backbones, each scored by 3-fold CV on the training images."""

from __future__ import annotations

import logging
import time

import numpy as np

from . import costs, features, ladder, state
from .state import Candidate, Context, Search

log = logging.getLogger(__name__)


def search_probes(search: Search, ctx: Context) -> tuple[Candidate, Context]:
    """The best probe, and the context of its backbone (the one given, or a stronger one that won)."""
    cfg, given = search.cfg, search.given
    crops, views = ladder.probe_ladder(search, ctx)
    costs.measure_rate(search, ctx, crops[0])
    best = None
    for crop in crops:  # eval crop, then the whole frame, on view 0
        if _perfect(best):
            return _stopped_before_mlp(search, ctx, best), ctx
        best = state.better(best, _probe_candidate(search, ctx, crop, views[0]))
        if state.one_image_a_class(ctx):
            return _stopped_uncomparable(search, best), ctx
    if search.starved:  # the later steps run only where the final run's growth to every image compared still fits
        _starved_note(search)
    crop = best.settings["crop_fraction"]
    for view_set in views[1:]:  # then more views of the better crop, while they pay
        if _perfect(best):
            return _stopped_before_mlp(search, ctx, best), ctx
        if view_set == "dihedral" and not cfg.rotation_safe and best.settings["probe_views"] != "turns":
            continue  # turning the image by 90° did not help (or did not fit): the other turns will not either
        cand = _probe_candidate(search, ctx, crop, view_set, options=ladder.carried_pooling(best))
        if cand.score is not None and cand.score <= best.score and not cfg.rotation_safe:
            break  # a view that does not pay (a mirrored digit is another digit): turning it will not either
        best = state.better(best, cand)
    if _perfect(best):
        return _stopped_before_mlp(search, ctx, best), ctx
    mlp = _mlp_candidate(search, ctx, best)
    if _asked_mlp_fitted(search, mlp):  # asked for: the later probes are linear ones
        return mlp, ctx
    best = state.better(best, mlp)
    if _perfect(best):
        return _stopped_at(search, best), ctx
    if "image_size" not in given:
        best = state.better(best, _two_scale_candidate(search, ctx, best))
        if _perfect(best):
            return _stopped_at(search, best), ctx
    return stronger_backbone(search, ctx, best)


def stronger_backbone(search: Search, ctx: Context, best: Candidate) -> tuple[Candidate, Context]:
    """The best probe's crop and views on a stronger backbone of the same family (the registry's `stronger`,
    strongest first: the first whose weights are at hand and whose estimate fits), scored by the same 3-fold CV.
    Linear probes on a better ImageNet model usually transfer better (Kornblith et al. 2019); it costs more per
    image (2-core EPYC, ONNX Runtime, ELPV's 8 views: lite2 at 2.4× lite0's time), so it comes last among the
    probes: where it ran before the two-scale probe, ELPV 4 classes at 20m spent 354 s on a lite2 probe that
    lost the CV (0.7881 against 0.7978) and then had no time for the two-scale one, which wins there. Where it
    wins, the fine-tuning candidates and the final run use that backbone. Returns the better probe and the
    context of its backbone."""
    options = ladder.stronger_options(search, ctx)
    for view_set in ladder.view_sets_down_from(search, best) if options else []:
        for spec, cost in options:
            other = ctx.sibling(spec, cost)
            cand, reserve = _planned_probe(search, other, best.settings["crop_fraction"], view_set,
                                           setup_s=search.setup_s * cost)
            # Where it loses, the best probe's final run follows it, and that may cost more than its own
            # (ELPV 4 at 20m: a lite1 probe on 4 views reserved for its own val pass, then the two-scale
            # probe's 8 views at 300+224 px ran 10% past the budget).
            reserve = max(reserve, costs.final_reserve(search, ctx, best.settings))
            if not search.affords(cand, reserve, cut_down=view_set != best.settings["probe_views"]):
                continue  # a cheaper one may fit
            rate = search.rate  # in the first backbone's views
            _run_probe(search, other, cand, reserve)  # its export and engine choice (taps_for's warm-up) included
            if state.better(best, cand) is cand:
                return cand, other
            search.rate = rate  # measured through the other backbone's guessed cost: keep the first one's
            return best, ctx
    return best, ctx


def _perfect(best: Candidate | None) -> bool:
    """A probe right on every training image in the CV: no candidate can score above it, and a candidate must
    to win, so the probe ladder ends there (easy sets: seconds instead of minutes)."""
    return best is not None and best.score is not None and best.score >= 1.0


def _stopped_uncomparable(search: Search, best: Candidate) -> Candidate:
    """Two photos of a folder of smoke-test images: the ladder had ranked its candidates on those zeros (a 2-class
    folder of 2 images a class chose an MLP head of a million weights on a tie-break) and then fine-tuned towards
    a hold-out of one image. The first probe is kept, and the log says why nothing else ran."""
    search.stopped = (f"every class has one training image, so no cross-validation can compare recipes (each "
                      f"fold's images belong to classes its training part lacks); {best.name} is kept")
    log.warning("search: %s", search.stopped)
    return best


def _stopped_at(search: Search, best: Candidate) -> Candidate:
    search.stopped = f"{best.name} scores 1.0 on the 3-fold CV: no other probe could score above it"
    log.info("search: %s", search.stopped)
    return best


def _stopped_before_mlp(search: Search, ctx: Context, best: Candidate) -> Candidate:
    """A perfect probe before the MLP step ends the ladder; a --probe-head mlp given still gets its head on that
    probe's features (a given flag fixes its piece of the recipe)."""
    best = _stopped_at(search, best)
    mlp = _mlp_candidate(search, ctx, best) if ladder.mlp_asked(search) else None
    return mlp if _asked_mlp_fitted(search, mlp) else best


def _starved_note(search: Search) -> None:
    """The budget paid for the first probe on only some of the images compared: every later step of the ladder
    reserves the final run's features and fit of the rest (costs.growth_seconds), so more images come first and
    comparing more candidates on too few second. A 100-class folder of 3,000 training images at
    --time-budget 60s: the first probe on 1,250 (CV 0.73), then the whole frame on the same 1,250 (20 s) and a
    final fit on them scored 0.844 on val; the first probe fitted on all 3,000 instead, 0.946 (one probe on every
    image without a search: 0.951). A 300-class folder of 6,000 at the default budget, where the CV's prior had
    stopped the first extraction at 2,250, ended the ladder there and left 147 of its 240 s unused."""
    search.stopped = (f"the budget paid for the first probe's features of {search.subsample} of the training "
                      f"images: the later steps ran only where fitting the chosen probe on more still fitted")
    log.info("search: %s", search.stopped)


def _asked_mlp_fitted(search: Search, mlp: Candidate | None) -> bool:
    """Whether --probe-head mlp was given and the MLP candidate scored; given and not fitted says so."""
    if not ladder.mlp_asked(search):
        return False
    if mlp is not None and mlp.score is not None:
        return True
    log.warning("search: no MLP head fitted in the budget, so the model is the linear probe; a larger "
                "--time-budget (or --recipe tutorial --mode linear-probe --probe-head mlp) fits one")
    return False


def _probe_candidate(search: Search, ctx: Context, crop, view_set: str, options=None) -> Candidate:
    cand, reserve = _planned_probe(search, ctx, crop, view_set)
    first = len(search.candidates) == 1  # the one probe every search runs, whatever the budget
    if first or search.affords(cand, reserve):
        _run_probe(search, ctx, cand, reserve, options)
    return cand


def _planned_probe(search: Search, ctx: Context, crop, view_set: str, setup_s: float = 0.0):
    """A probe candidate with its estimate (`setup_s` on top: a new backbone's export and engine choice), and
    the reserve its final run needs: the val pass and the write-up."""
    from ..engine.probe_train import PROBE_VIEWS

    views = PROBE_VIEWS[view_set]
    settings = {"crop_fraction": crop, "probe_views": view_set}
    if ctx.spec.name != search.cfg.model:
        settings["model"] = ctx.spec.name
    backbone = f" {ctx.spec.name}" if "model" in settings else ""
    name = f"probe{backbone} crop={'own' if crop is None else crop} views={view_set}"
    cand = search.add(Candidate(name, "probe", settings))
    missing = costs.missing_views(ctx, crop, views)
    n = len(ctx.scan.train)
    cv = costs.cv_seconds(search, ctx, len(views))
    cand.estimate_s = setup_s + len(missing) * n * costs.view_seconds(search, ctx) + cv
    reserve = costs.final_reserve(search, ctx, settings)
    log.debug("search: %s: %d views × %d images at %.0f views/s + CV ~%.0fs; reserve %.0fs",
              name, len(missing), n, 1 / costs.view_seconds(search, ctx), cv, reserve)
    return cand, reserve


def _run_probe(search: Search, ctx: Context, cand: Candidate, reserve: float, options=None) -> None:
    from ..engine.probe_train import PROBE_VIEWS

    t = time.perf_counter()
    x = features.probe_features(search, ctx, cand.settings["crop_fraction"], PROBE_VIEWS[cand.settings["probe_views"]],
                        reserve)
    if x is None:
        cand.seconds, cand.status = time.perf_counter() - t, "stopped: extraction ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return
    _score_probe(search, ctx, cand, x, reserve, options)
    cand.seconds = time.perf_counter() - t
    cand.status = "ran"
    log.info("search: %s: %s %.4f (%s, %.0fs)", cand.name, state.cv_name(search), cand.score,
             state.probe_text(cand.settings), cand.seconds)


def _mlp_candidate(search: Search, ctx: Context, best: Candidate) -> Candidate | None:
    """The best probe's features with an MLP head (engine/probe.py fit_mlp) in place of the logistic
    regression: no extraction, only its fits (3 CV folds), planned from one timed training step. Scored by the
    same 3-fold CV; it keeps the linear probe's settings (crop, views, pooling, stages and C), so the later probes
    build on them as on the linear one's."""
    from ..engine.probe import cross_validate_mlp, mlp_fit_seconds
    from ..engine.probe_train import PROBE_VIEWS

    if best.score is None or not ladder.tries_mlp(search):
        return None
    s = best.settings
    settings = {**{k: v for k, v in s.items() if k != "cv_per_C"}, "probe_head": "mlp"}
    cand = search.add(Candidate(f"{best.name} head=mlp", "probe", settings))
    views = PROBE_VIEWS[s["probe_views"]]
    rows = len(ctx.scan.train) * len(views)
    step_s = costs.mlp_step_seconds(search, ctx)
    cand.estimate_s = mlp_fit_seconds(step_s, rows) * costs.mlp_fits(ctx)
    reserve = costs.final_reserve(search, ctx, settings)  # where it loses, the linear probe's smaller one follows
    if not search.affords(cand, reserve):
        return cand
    t, n_classes, seed = time.perf_counter(), len(ctx.scan.classes), search.cfg.seed
    x = features.probe_features(search, ctx, s["crop_fraction"], views, reserve)  # cached by the probe it builds on
    columns = ctx.taps_for(s["crop_fraction"]).columns(s["probe_stages"], s["probe_pooling"], s["probe_pixels"])
    score = cross_validate_mlp(x, ctx.y, columns, n_classes, seed=seed, deadline=search.deadline - reserve,
                               balanced=search.cfg.balanced_classes, metric=search.metric)
    cand.seconds = time.perf_counter() - t
    if score is None:
        cand.status = "stopped: its fits ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return cand
    cand.score, cand.status = score, "ran"
    log.info("search: %s: %s %.4f (the linear head's %.4f), %.0fs", cand.name, state.cv_name(search), score,
             best.score, cand.seconds)
    return cand


def _score_probe(search: Search, ctx: Context, cand: Candidate, x: np.ndarray, reserve: float,
                 options=None) -> None:
    """Pooling/stages (those of `options`, else every one that is not given) and C by 3-fold CV on train,
    stopping where only `reserve` seconds would be left (the C grid runs from strong to weak regularization, the
    slow end last). Its inner hold-out answers wait for a fine-tuning candidate to be judged against them
    (answer_hold_out)."""
    from ..engine.probe import cross_validate
    from ..engine.probe_train import C_GRID

    cfg, given, taps = search.cfg, search.given, ctx.taps_for(cand.settings["crop_fraction"])
    options = options or ladder.pooling_options(search, ctx)
    grid = [cfg.probe_c] if "probe_c" in given else list(C_GRID)
    n_classes = len(ctx.scan.classes)
    deadline = search.deadline - reserve
    # What search.json reports: the CV's own images (a subsample taken mid-search, where the budget allowed no
    # more features, pools more splits than the full set would have)
    search.cv_repeats = costs.cv_repeats(ctx)
    t = time.perf_counter()
    for pooling, stages, pixels in options:
        if cand.score is not None and time.perf_counter() > deadline:
            break
        columns = taps.columns(stages, pooling, pixels)
        cv = cross_validate(x, ctx.y, columns, n_classes, grid, seed=cfg.seed, deadline=deadline,
                            balanced=cfg.balanced_classes, metric=search.metric)
        if cand.score is None or cv.score > cand.score:
            cand.score = cv.score
            cand.settings.update(probe_pooling=pooling, probe_stages=stages or len(taps.widths), probe_c=cv.C,
                                 probe_pixels=pixels, cv_per_C=cv.per_C)
    search.cv_row_s = (time.perf_counter() - t) / (x.shape[0] * x.shape[1] * search.cv_repeats)


def _two_scale_candidate(search: Search, ctx: Context, best: Candidate) -> Candidate | None:
    """The best probe's views read at a larger input size too, one probe per scale and their logits
    averaged (engine/probe.py stack_fits), scored by the same 3-fold CV as every probe. Where that does not
    fit in the time left, the same with half of those views (ladder.view_sets_down_from), still compared by CV with
    the best probe on all its views: a second scale may pay more than the extra views (ELPV 2 classes at the
    default budget: the 4 views at two scales needed ~202 s of 112 left)."""
    size, native = ladder.larger_size(ctx), ctx.pre(None).input_size
    if best.settings.get("probe_pixels"):
        return None  # small images (the pixels won): nothing to read at a larger size
    if size is None:
        log.info("search: no two-scale probe: the training images are not much larger than %d px", native)
        return None
    first = None  # on all the best probe's views: recorded, as skipped where nothing fits
    for view_set in ladder.view_sets_down_from(search, best):
        cand, reserve = _planned_two_scale(search, ctx, best, view_set, size)
        reserve = max(reserve, costs.final_reserve(search, ctx, best.settings))  # on fewer views it may lose to best
        first = first or cand
        if search.affords(cand, reserve, cut_down=view_set != best.settings["probe_views"]):
            _run_two_scale(search, ctx, cand, best, reserve)
            return cand
    return first


def _planned_two_scale(search: Search, ctx: Context, best: Candidate, view_set: str, size: int):
    """A two-scale candidate on `view_set` of the best probe's crop, with its estimate and its final run's
    reserve: the val pass at both scales, and the write-up."""
    from ..engine.probe_train import PROBE_VIEWS

    s, native = best.settings, ctx.pre(None).input_size
    crop, views = s["crop_fraction"], PROBE_VIEWS[view_set]
    name = f"probe crop={'own' if crop is None else crop} views={view_set} at {size}+{native} px"
    settings = {k: s[k] for k in ("model", "crop_fraction", "probe_pooling", "probe_stages") if k in s}
    cand = search.add(Candidate(name, "probe", {**settings, "probe_views": view_set, "image_size": size,
                                                "probe_scale": native, "probe_scale_c": s["probe_c"]}))
    cand.estimate_s = costs.two_scale_seconds(search, ctx, size, len(views))
    return cand, costs.final_reserve(search, ctx, cand.settings)


def _run_two_scale(search: Search, ctx: Context, cand: Candidate, best: Candidate, reserve: float) -> None:
    """Extract the larger scale's views, then score the pair by 3-fold CV. The native scale keeps the best
    probe's C (chosen on the same images, with these views or more of them)."""
    from ..engine.probe import cross_validate, cross_validate_stacked
    from ..engine.probe_train import C_GRID, PROBE_VIEWS

    s, t = cand.settings, time.perf_counter()
    crop, views, size = s["crop_fraction"], PROBE_VIEWS[s["probe_views"]], s["image_size"]
    x_large = features.train_features(search, ctx, crop, views, reserve, size=size)
    if x_large is None:
        cand.seconds, cand.status = time.perf_counter() - t, "stopped: extraction ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return
    x_native = features.train_features(search, ctx, crop, views, reserve)
    columns = ctx.taps_for(crop).columns(s["probe_stages"], s["probe_pooling"])
    grid = [search.cfg.probe_c] if "probe_c" in search.given else list(C_GRID)
    n_classes, seed, deadline = len(ctx.scan.classes), search.cfg.seed, search.deadline - reserve
    weighting = {"balanced": search.cfg.balanced_classes, "metric": search.metric}
    large = cross_validate(x_large, ctx.y, columns, n_classes, grid, seed=seed, deadline=deadline, **weighting)
    Cs = [large.C, s["probe_scale_c"]]
    s.update(probe_c=large.C, cv_at_larger_size=large.score)
    cand.score = cross_validate_stacked([x_large, x_native], ctx.y, columns, Cs, n_classes, seed=seed, **weighting)
    cand.seconds, cand.status = time.perf_counter() - t, "ran"
    log.info("search: %s: %s %.4f (%d px alone %.4f; best so far %.4f), %.0fs", cand.name, state.cv_name(search),
             cand.score, size, large.score, best.score, cand.seconds)


def answer_hold_out(search: Search, ctx: Context, probe: Candidate, deadline: float) -> bool:
    """Fit the probe as its settings say (its C, its MLP head or its two scales) on the inner-train images and
    record its answers on the inner hold-out, which fine-tuning candidates are judged against: done only where
    one is (finetuning.py), since the ladder's probes are compared by CV alone. ctx: the probe's backbone's, whose
    features are cached. False where an MLP head's fit would end past `deadline`."""
    from ..engine.probe import fit_probe
    from ..engine.probe_train import PROBE_VIEWS

    s, (inner_train, inner_test) = probe.settings, ctx.inner
    crop, views = s["crop_fraction"], PROBE_VIEWS[s["probe_views"]]
    fitting = {"n_classes": len(ctx.scan.classes), "balanced": search.cfg.balanced_classes}
    if s.get("probe_scale"):  # one probe per scale, their logits summed
        columns = ctx.taps_for(crop).columns(s["probe_stages"], s["probe_pooling"])
        scales = [(features.train_features(search, ctx, crop, views, 0.0, size=s["image_size"]), s["probe_c"]),
                  (features.train_features(search, ctx, crop, views, 0.0), s["probe_scale_c"])]
    else:
        columns = ctx.taps_for(crop).columns(s["probe_stages"], s["probe_pooling"], s["probe_pixels"])
        scales = [(features.probe_features(search, ctx, crop, views, 0.0), s.get("probe_c"))]
    head = s.get("probe_head", "linear")
    logits = 0.0
    for x, C in scales:
        fit = fit_probe(x[inner_train], ctx.y[inner_train], columns, None if head == "mlp" else C, head=head,
                        seed=search.cfg.seed, deadline=deadline, **fitting)
        if fit is None:
            return False
        logits = logits + fit.logits(x[inner_test])
    state.answered(search, ctx, probe, logits.mean(1).argmax(-1))
    return True
