"""The recipe search's estimates: seconds of each candidate and of the final run, from the rates measured on
this machine (extraction, the probes' CV, a training step), and the memory that bounds how many images are
compared and fitted. The plan the search prints is made of them."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from ..config import DEFAULT_TIME_BUDGET, parse_duration
from . import ladder, state
from .ladder import POOLING_STAGES
from .state import Context, FIXED_OVERHEAD_S, FT_EPOCHS, INNER_FRACTION, PARTIAL_VIEWS, Search

log = logging.getLogger(__name__)


# On a large folder the candidates are compared on a seeded stratified random subsample of this many training
# images per default budget (4 minutes: 3-fold CV on 2,000 images measures an accuracy to about ±1 point; a larger
# budget compares on proportionally more, fine-tuning candidates included), and the chosen probe is then fitted on
# as many as the time left pays for (successive halving in its simplest form: explore on few, spend the rest on the
# winner).
# Comparing them on every image the budget can extract leaves no time to compare: tried on a 20,000-image folder
# (10 classes, 2-core EPYC, default budget) with the CV alone capped, the first probe kept 6,000 training images
# and no other candidate fitted, while on 2,000 the whole frame beat the eval crop by 5.5 points of CV and a
# stronger backbone by 3 more (benchmarks/RESULTS.md, notes of session 16).
SEARCH_MAX_IMAGES = 2000
# ...but no fewer than this many per class: with many classes a probe's accuracy climbs steeply with the images
# per class (a 100-class folder, 1-view probe, 3-fold CV: 0.36 on 250 images, 0.70 on 1,000, 0.86 on 2,000,
# 0.92 on 3,000), so comparing recipes on a handful per class compares nothing that matters.
COMPARED_PER_CLASS = 20
# Share of the time left after the search that the final run's extra images may take (their extraction has no
# deadline of its own: rates vary on a busy machine).
GROWTH_SHARE = 0.8
# ...and the memory they may take: the final run holds its training images' features (every view, the widest vector
# it reads: 4,048 floats a view on lite0), and its fit's peak takes 2.1-2.6 times as much again (the columns taken
# and standardized, the solver's work: benchmarks/probe_memory.py, fit_probe on 20,000 × 1 and 5,000 × 8 views of
# 4,048 float32 features, 2 and 50 classes), and the val features with their predictions.
# The grown images are capped so that all of it stays within MEMORY_SHARE of the memory available when the search
# ends: with a GPU's extraction rate, or a long budget on a large folder, time alone would grow an 8-view probe past
# the machine's memory (8 views of a million images: 130 GB of features).
FIT_MEMORY_COPIES, MEMORY_SHARE = 4, 0.5  # the features and 3 times as much again
# The images the candidates are compared on are capped the same way: the search holds their features in every view
# and crop it extracts, and a CV's peak takes 3.8-4.2 times the features of its rows again (the folds' standardized
# rows and fits; benchmarks/probe_memory.py, which also measures the fit's multiple above). Binds only on long
# budgets (4 minutes compare on 2,000 images: ~2.1 GB at 8 views, with a second scale's and backbone's features).
CV_MEMORY_COPIES = 5
# A probe's CV (both poolings over the C grid, 3 folds) costs as much as this many fits on all of its images at
# the chosen C: measured 6.5-6.6 on ELPV's 1,968 training images with 1, 2 and 4 views (CV 6.5-19.2 s against
# 1.0-2.9 s for the fit; a throwaway timing of engine/probe.py cross_validate and fit_probe).
FITS_PER_CV = 6
# The MLP step's fits, in fits on all of the probe's rows: 3 CV folds of 2/3 of them (per repeat of the CV: see
# engine/probe.py cv_repeats; the final run's fit is in its reserve, an inner hold-out fit in fine-tuning's estimate).
MLP_CV_FITS = 3 * 2 / 3


def growth_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """Where the first probe was starved of images: what the final run of a probe with these settings spends on
    the images compared that the search did not extract (their features in every view, their share of the fit),
    at the share of the time left that final_run.grown_scan gives them."""
    if not search.starved:
        return 0.0
    missing = search.compared_target - len(ctx.scan.train)
    if missing <= 0:
        return 0.0
    return missing * final_seconds_per_image(search, ctx, settings) / GROWTH_SHARE


def final_seconds_per_image(search: Search, ctx: Context, settings: dict) -> float:
    """What one more training image costs the final run of a probe with these settings: its features in every
    view and its share of the fit."""
    from ..engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    return views * _final_view_seconds(search, ctx, settings) + fit_seconds(search, ctx, settings) / len(ctx.scan.train)


def measure_rate(search: Search, ctx: Context, crop) -> None:
    """Extraction rate (views/s, decoding included), timed on training images after a warm-up batch
    (the first batch also pays for the ONNX export and the parity check), for the plan."""
    paths = [p for p, _ in ctx.scan.train]
    taps = ctx.taps_for(crop)
    # The warm-up (timed too, for sets of fewer than 65 images), then two timed chunks decoded by the search's
    # own threads, the fastest kept: the chunk right after the warm-up still paid several times the steady cost
    # (2-core EPYC, ONNX Runtime: 28 images/s, then 105, the rate the candidates ran at).
    rates, cached, first_s = [], 0, 0.0
    for timed in (paths[:64], paths[64:128], paths[128:192]):
        if timed:
            t = time.perf_counter()
            _, _, stats = taps.features(timed, (0,), ctx.scan.digests, ctx.decode_threads, desc="timing")
            first_s = first_s or time.perf_counter() - t
            rates.append(len(timed) / max(time.perf_counter() - t, 1e-3))
            cached += stats["hits"]
    search.rate = max(rates[1:] or rates)
    search.setup_s = max(0.0, first_s - min(len(paths), 64) / search.rate)  # ONNX export, engine choice
    # Features already in the cache are read, not computed: the rate then says little of the views and sizes
    # not cached yet (each extraction re-measures it as its chunks run, and stops where it would overrun).
    _log_plan(search, ctx, f"; {cached} of the {min(len(paths), 192)} timed images were cached" if cached else "")


def _log_plan(search: Search, ctx: Context, note: str = "") -> None:
    """The ladder with an estimate for each step, from the measured rate (steps run while they fit); the steps
    the given options rule out are not listed."""
    from ..engine.probe import fold_count
    from ..engine.probe_train import PROBE_VIEWS

    n, m = len(ctx.scan.train), len(ctx.scan.val)
    per_view = n / search.rate
    cv, splits = cv_seconds(search, ctx, 1), cv_repeats(ctx)
    folds = fold_count(ctx.y)
    log.info("plan: %d train / %d val images; extraction %.0f images/s (measured%s); budget %.0fs, %.0fs left%s",
             n, m, search.rate, note, search.deadline - search.t0, search.left(),
             f"; the probes' {folds}-fold CV runs on {splits} splits (few images)" if splits > 1 else "")
    crops, view_sets = ladder.probe_ladder(search, ctx)
    first = len(PROBE_VIEWS[view_sets[0]])
    steps = [(f"probe, crop {'own' if c is None else c}, {first} view{'s' * (first > 1)}", first * (per_view + cv))
             for c in crops]
    described = {"flip": "probe + mirror view", "turns": "probe + views turned by 90° (2 more)",
                 "dihedral": "probe, 8 dihedral views"}
    for before, view_set in zip(view_sets, view_sets[1:]):  # each pays for its new views and its CV
        k, new = len(PROBE_VIEWS[view_set]), len(PROBE_VIEWS[view_set]) - len(PROBE_VIEWS[before])
        steps.append((described[view_set], new * per_view + k * cv))
    if ladder.tries_mlp(search):
        from ..engine.probe import mlp_fit_seconds

        steps.append(("the best probe with an MLP head, per view",
                      mlp_fit_seconds(mlp_step_seconds(search, ctx), n) * mlp_fits(ctx)))
    size = None if "image_size" in search.given else ladder.larger_size(ctx)
    if size is not None:
        steps.append((f"probe at {size}+{ctx.pre(None).input_size} px, the best crop, per view",
                      two_scale_seconds(search, ctx, size, 1)))
    for spec, cost in ladder.stronger_options(search, ctx)[:1]:  # the others are cheaper, tried where it does not fit
        steps.append((f"probe on {spec.name}, the best crop, per view", search.setup_s * cost + cost * per_view + cv))
    refit = 2 - INNER_FRACTION  # the inner run and the refit on all images
    activations = activation_seconds(search, {"mode": "partial", "views": PARTIAL_VIEWS["random"]}, n, m)
    fine_tuning = {"partial": ("partial fine-tuning from the probe, inner hold-out + refit", activations),
              "finetune": ("full fine-tuning from the probe, inner hold-out + refit", refit * 2 * 3 * n / search.rate)}
    steps += [fine_tuning[kind] for kind in ladder.finetune_kinds(search, ctx)]
    for i, (name, seconds) in enumerate(steps, 1):
        log.info("plan: %d. %-60s ~%4.0fs%s", i, name, seconds, " and up (timed before it runs)" if "fine" in name else "")
    log.info("plan: then the final run on all training images, val scored once (~%.0fs per view)", m / search.rate)


def final_reserve(search: Search, ctx: Context, settings: dict) -> float:
    """Seconds the final run of a probe with these settings needs: its val pass over every view (at both
    scales for a two-scale probe), its fit and the write-up, and where the search was starved of images, the
    features and fit of the rest of the images compared."""
    return (val_pass_seconds(search, ctx, settings) + fit_seconds(search, ctx, settings) + FIXED_OVERHEAD_S
            + growth_seconds(search, ctx, settings))


def val_pass_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """The final run's pass over the val images, every view of a probe with these settings."""
    from ..engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    return views * len(ctx.scan.val) * _final_view_seconds(search, ctx, settings)


def cv_repeats(ctx: Context) -> int:
    """How many 3-fold splits the probes' CV pools on ctx's training images (engine/probe.py cv_repeats)."""
    from ..engine.probe import cv_repeats as repeats_for

    return repeats_for(len(ctx.scan.train))


def mlp_fits(ctx: Context) -> float:
    """The MLP step's fits, in fits on all of its rows (MLP_CV_FITS)."""
    return MLP_CV_FITS * cv_repeats(ctx)


def mlp_step_seconds(search: Search, ctx: Context) -> float:
    """One MLP training step on this machine, timed once per search over the widest vector a probe can read
    (every tap, mean and max, the pixels where the probes try them): the plan and every MLP estimate use it."""
    from ..engine.probe import mlp_step_seconds

    if search.mlp_step_s is None:
        search.mlp_step_s = mlp_step_seconds(_widest_vector(search, ctx), len(ctx.scan.classes))
    return search.mlp_step_s


def _widest_vector(search: Search, ctx: Context) -> int:
    """Columns of the widest vector a probe of this search reads: every tap, mean and max, and the pixels where the
    probes try them (the first probe's crop: its taps exist by then)."""
    taps = ctx.taps_for(ladder.probe_ladder(search, ctx)[0][0])
    return len(taps.columns(None, "meanmax", ladder.tries_pixels(search, ctx)))


def missing_views(ctx: Context, crop, views, size=None) -> list:
    """The views of `crop` at input `size` not extracted yet: what a candidate's extraction, and so its
    estimate, pays for (ctx.feats is keyed by crop and size)."""
    return [v for v in views if v not in ctx.feats.get((crop, size), {})]


def view_seconds(search: Search, ctx: Context, size=None) -> float:
    """Seconds to extract one view of one image on ctx's backbone at input `size` (default: its own)."""
    return ctx.cost * pixel_ratio(ctx, size) / search.rate


def _final_view_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """Seconds per view of one image through a probe with these settings, as its final run computes it: at its
    input size, and for a two-scale probe at the backbone's own size too (inside the graph)."""
    seconds = view_seconds(search, ctx, settings.get("image_size"))
    if "probe_scale" in settings:
        seconds += view_seconds(search, ctx)
    return seconds


def cv_seconds(search: Search, ctx: Context, views: int, images: int | None = None) -> float:
    """The probes' CV on ctx's training images (the first `images` of them) and this many views: from the last
    CV's measured cost per row it fitted (each repeat of the folds fits every row again: few images pool several
    splits), else a prior."""
    from ..engine.probe import cv_repeats as repeats_for

    images = len(ctx.scan.train) if images is None else images
    rows = views * images * repeats_for(images)
    if search.cv_row_s is not None:  # measured on rows of the same kind: it includes their fixed costs
        return search.cv_row_s * rows
    # Before the first CV is timed: ~3 s per view for 2,000 images × 4,048 features and 2 classes (2-core
    # CPU), no less than for 200 images (each fit has a fixed cost), times _class_factor.
    return 3.0 * max(rows, views * 200) / 2000 * len(POOLING_STAGES) * _class_factor(len(ctx.scan.classes))


def _class_factor(n_classes: int) -> float:
    """How much longer the probes' CV takes with this many classes than with two (the multinomial fit's gradient
    grows with the classes, its iterations do not). Measured (throwaway script, engine/probe.py cross_validate on
    2,000 images' 4,048 features of a 100-class folder, classes merged for fewer; 2-core EPYC): 2 classes 2.6 s,
    5 6.1, 10 5.9, 25 6.6, 50 8.8, 100 14.4. The factor stays above those ratios (2 to 4 classes: as before)."""
    return min(n_classes / 2, 2 + n_classes / 20)


def pixel_ratio(ctx: Context, size) -> float:
    """Cost of an extraction at input `size` against one at the backbone's own size."""
    return 1.0 if size is None else (size / ctx.pre(None).input_size) ** 2


def two_scale_seconds(search: Search, ctx: Context, size: int, views: int) -> float:
    """The two-scale probe's estimate: the views at the larger size (the native ones are cached), then the
    larger size's CV over the C grid and the pair's, whose six fits (two per fold) start cold: about 1.7×
    (ELPV 4 classes) and 3× (2 classes) the best probe's CV over both poolings (each candidate's time less its
    extraction at the measured rate, 20m budgets), so 2.5×; counted as one CV, the 4-class run planned 350 s
    and took 531."""
    return views * len(ctx.scan.train) * view_seconds(search, ctx, size) + 2.5 * cv_seconds(search, ctx, views)


def compared_on(budget_s: float, n_classes: int = 2) -> int:
    """How many training images the candidates are compared on, at most: SEARCH_MAX_IMAGES per default budget,
    and no fewer than COMPARED_PER_CLASS per class."""
    scaled = int(SEARCH_MAX_IMAGES * max(1.0, budget_s / parse_duration(DEFAULT_TIME_BUDGET)))
    return max(scaled, COMPARED_PER_CLASS * n_classes)


def compared_memory_holds(search: Search, ctx: Context) -> int:
    """Training images the probes can be compared on within MEMORY_SHARE of the memory available now: their features
    in the ladder's largest view set (and one view of every other crop), the widest vector, the CV's copies
    (CV_MEMORY_COPIES), and as many views again twice: the two-scale probe's larger input and a stronger backbone
    hold theirs beside the first's; unbounded where the available memory is not known."""
    from ..engine.probe_train import PROBE_VIEWS

    budget = _memory_budget()
    if budget is None:
        return 1 << 62
    crops, view_sets = ladder.probe_ladder(search, ctx)
    views = max(len(PROBE_VIEWS[v]) for v in view_sets)
    image_bytes = (views * (3 + CV_MEMORY_COPIES) + len(crops) - 1) * _widest_vector(search, ctx) * 4  # float32
    return max(1, int(budget / image_bytes))


def images_memory_holds(ctx: Context, settings: dict, n_val: int) -> int:
    """Training images the final run of a probe with these settings can hold and fit within MEMORY_SHARE of the
    memory available now (final_run_bytes, the val images first); unbounded where that memory is not known."""
    budget = _memory_budget()
    if budget is None:
        return 1 << 62
    return max(0, int((budget - final_run_bytes(ctx, settings, 0, n_val)) / final_run_bytes(ctx, settings, 1, 0)))


def _memory_budget() -> float | None:
    """MEMORY_SHARE of the memory available now (engine/environment.py); None where it is not known."""
    from ..engine.environment import available_memory

    available = available_memory()
    return None if available is None else MEMORY_SHARE * available


def final_run_bytes(ctx: Context, settings: dict, n_train: int, n_val: int) -> int:
    """Peak memory of the final run of a probe with these settings on this many images: the training images'
    features and the fit's copies (FIT_MEMORY_COPIES), the val images' features and their predictions; every view,
    the widest vector the probe reads."""
    from ..engine.probe_train import PROBE_VIEWS

    taps = ctx.taps_for(settings["crop_fraction"], settings.get("image_size"))
    width = len(taps.columns(None, "meanmax", bool(settings.get("probe_pixels"))))
    scales = 2 if settings.get("probe_scale") else 1  # a two-scale probe reads both sizes' vectors
    image_bytes = len(PROBE_VIEWS[settings["probe_views"]]) * width * scales * 4  # float32
    return (n_train * FIT_MEMORY_COPIES + 2 * n_val) * image_bytes


def fit_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """One fit of a probe with these settings on all of ctx's training images: an MLP head's from its timed
    training step, a logistic regression's from the CV's measured cost (see FITS_PER_CV; the CV repeats its
    folds on few images)."""
    from ..engine.probe import mlp_fit_seconds
    from ..engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    if settings.get("probe_head") == "mlp":
        return mlp_fit_seconds(mlp_step_seconds(search, ctx), views * len(ctx.scan.train))
    return cv_seconds(search, ctx, views) / (FITS_PER_CV * cv_repeats(ctx))


def hold_out_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """A probe's fit on the inner-train images (1 - INNER_FRACTION of them), one per scale: what its answers on
    the inner hold-out cost where a fine-tuning candidate is to be judged against them."""
    scales = 2 if settings.get("probe_scale") else 1
    return fit_seconds(search, ctx, settings) * (1 - INNER_FRACTION) * scales


def step_seconds(search: Search, ctx: Context, settings: dict) -> float:
    """Seconds per training image, timed on a throwaway copy of the model set up as the run will train it:
    the mode's frozen groups, BatchNorm frozen and folded as the recipe keeps it, channels_last, the run's
    precision and batch size. (A plain train-mode copy at batch 16 took ~3× the real step on ELPV: the
    search then planned 2 fine-tuning epochs where 5 fitted.)"""
    import torch

    from ..engine import precision as precisions
    from ..models.adapt import set_train_mode
    from ..models.batchnorm import Folding, freeze_statistics
    from ..modes import make_mode

    cfg = state.candidate_config(search.cfg, settings, Path(tempfile.gettempdir()))
    model = copy.deepcopy(ctx.model)
    make_mode(cfg).freeze(model, ctx.spec)
    batch = min(cfg.batch_size, len(ctx.scan.train))
    if settings["mode"] == "partial":  # only the top groups and the head run per step (cached below)
        from ..engine.activations import split_stages

        _, model, _ = split_stages(model, ctx.spec, cfg.unfreeze)
        x = torch.randn(batch, *_activation_shape(ctx, cfg.unfreeze))
    else:
        size = ctx.pre(settings["crop_fraction"]).input_size
        x = torch.randn(batch, 3, size, size)
    if ctx.device.type == "cpu" and cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(ctx.device)
    set_train_mode(model)
    if cfg.batchnorm == "frozen":
        freeze_statistics(model)
    Folding(model).fold()  # BN in eval mode runs folded into its conv, as in the run (models/batchnorm.py)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    precision = precisions.resolve(cfg.precision, ctx.device)
    times = []
    for _ in range(4):  # the first calls also build oneDNN's kernels: take the fastest of the rest
        t = time.perf_counter()
        with precisions.training_autocast(ctx.device, precision):
            out = model(x)
        (out[0] if isinstance(out, tuple) else out).float().logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[2:]) / len(x) * 1.15  # + data loading and the per-epoch evaluation share


def _activation_shape(ctx: Context, unfreeze: int) -> tuple:
    """The cached input of the top `unfreeze` groups: the candidate's own cut (a given --unfreeze 1 timed its
    top on the output of the cut at 2 and failed on the channels)."""
    import torch

    from ..engine.activations import split_stages

    prefix, _, _ = split_stages(ctx.model, ctx.spec, unfreeze)
    size = ctx.pre(None).input_size
    with torch.inference_mode():  # the probe image where the model's weights are (a GPU run's too)
        return tuple(prefix(torch.zeros(1, 3, size, size, device=ctx.device)).shape[1:])


def activation_seconds(search: Search, settings: dict, n: int, m: int, cost: float = 1.0) -> float:
    """partial: the frozen groups run once per (training image, view) and once per val image before the
    first epoch, and the epochs then train on those activations. The inner run computes them for its part
    of train and the refit for the rest (engine/activations.py caches them by content), so the pair pays for
    them once, not per epoch. Other kinds: 0. `cost`: the backbone's (Context.cost)."""
    return (settings["views"] * n + m) * cost / search.rate if settings["mode"] == "partial" else 0.0


def affordable_epochs(search: Search, per_epoch: float, val_pass: float, once: float = 0.0,
                       probe_reserve: float = 0.0) -> int:
    """Epochs E such that the inner run (80% of train) and the refit (100%) both fit, with what they pay
    `once` (partial's activations), the final val pass and write-up, in what is left; and, where the candidate
    loses, the inner run and the probe's final run (`probe_reserve` seconds)."""
    if_won = (search.left() - FIXED_OVERHEAD_S - 2 * val_pass - once) / (per_epoch * (2 - INNER_FRACTION))
    if_lost = (search.left() - probe_reserve - once) / (per_epoch * (1 - INNER_FRACTION))
    return int(max(0.0, min(FT_EPOCHS[1], if_won, if_lost)))
