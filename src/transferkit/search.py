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
"""

from __future__ import annotations

import copy
import logging
import shlex
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .config import DEFAULT_TIME_BUDGET, TrainConfig, parse_duration
from .engine import signals
from .engine.callbacks import Callback
from .engine.scores import cv_score, metric_words, paired_difference, standard_error
from .io import atomic_write_json
from .run_folder import RunFolder

log = logging.getLogger(__name__)

FIXED_OVERHEAD_S = 8.0  # the final run's model build, checkpoint, figures and report (measured: 4-7 s)
INNER_FRACTION = 0.2  # share of the training images held out to score fine-tuning candidates
FT_EPOCHS = (2, 8)  # fewest worth trying, most worth paying for
PARTIAL_VIEWS = {"random": 4, "dihedral": 8}  # cached views per image for partial fine-tuning, by view kind
# Learning rates for fine-tuning that starts from the probe's head (LP-FT, Kumar et al. 2022: small steps keep
# the pretrained features the fitted head relies on). Measured on ELPV (benchmarks/RESULTS.md, "Notes on the
# recipe search (session 6)"): full fine-tuning at AdamW 5e-4 from a head at 0.85 val accuracy fell to 0.71
# after one epoch (training accuracy 0.68); at 1e-4 with each lower group at 0.8× the one above it (layer-wise
# decay, as timm and BEiT fine-tune), it stayed near it (0.849 after 2 epochs). Partial fine-tuning trains only
# the top groups, at the full rate.
FT_LR = {"finetune": 1e-4, "partial": 1e-3}
LOWER_LR_FACTOR = 0.8
# Pieces of the recipe the search chooses; given explicitly, each stays as given.
PROBE_PIECES = ("model", "crop_fraction", "probe_views", "probe_stages", "probe_pooling", "probe_c", "image_size",
                "probe_scale", "probe_scale_c", "probe_pixels", "probe_head")
# The two-scale probe reads images at this multiple of the input size (FixRes, Touvron et al. 2019: a network
# sees objects larger at test time than in its training crops, so a larger test input suits it)...
LARGER_INPUT = 4 / 3
# ...where the images have that many pixels (upsampling adds no detail) and it differs enough to matter;
# images up to LARGER_INPUT_MAX × the input are read at their own size (no resampling to blur fine detail).
LARGER_INPUT_MIN, LARGER_INPUT_MAX = 1.15, 1.5
# A stronger backbone's cost is first guessed from its multiply-accumulates, times this (see _stronger_backbone).
STRONGER_COST_MARGIN = 1.1
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
# engine/probe.py cv_repeats), then the inner run on 1 - INNER_FRACTION of them (the final run's is in its reserve).
MLP_CV_FITS, MLP_INNER_FITS = 3 * 2 / 3, 1 - INNER_FRACTION
# (pooling, top stages; None = every tap), the usual winner first: the CV stops where the budget does
POOLING_STAGES = (("meanmax", None), ("mean", 1))
# Images whose shorter side is at most this share of the network's input (upsampled 2× or more) are small enough
# that their raw pixels may carry what ImageNet features of the upsampled blur miss: the probes' CV then also
# tries every stage's features with the pixels (--probe-pixels).
PIXELS_MAX_SHARE = 0.5


@dataclass
class Candidate:
    name: str
    kind: str  # probe | partial | finetune
    settings: dict
    estimate_s: float = 0.0
    # In the search's metric (TrainConfig.selection_metric): 3-fold CV (probes) or inner hold-out (fine-tuning)
    score: float | None = None
    holdout: float | None = None  # probes: the score on the fine-tuning candidates' inner hold-out
    # Its answer (a class index) for each inner hold-out image: fine-tuning is compared with the probe image by
    # image (_not_clearly_better). Not recorded in search.json.
    holdout_pred: np.ndarray | None = field(default=None, repr=False)
    seconds: float = 0.0
    started_at: float | None = None  # seconds into the search
    status: str = "planned"  # ran | skipped: <why> | failed: <why>

    def answered(self, pred: np.ndarray, y: np.ndarray, metric: str, n_classes: int) -> None:
        """A probe's answers on the inner hold-out (labels y), and its score there."""
        self.holdout_pred, self.holdout = pred, cv_score(pred, y, metric, n_classes)

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "settings", "estimate_s", "score", "holdout",
                                               "seconds", "started_at", "status")}


@dataclass
class Search:
    cfg: TrainConfig
    given: set
    deadline: float
    t0: float
    candidates: list[Candidate] = field(default_factory=list)
    rate: float = 0.0  # feature views per second of the first backbone at its own input size, measured
    cv_row_s: float | None = None  # seconds of probe cross-validation per (image, view), measured
    mlp_step_s: float | None = None  # seconds of one MLP head training step (engine/probe.py), measured
    bar: object = None  # engine/progress.time_bar over the budget
    feats_done: bool = False  # the first extraction (which never stops) is behind us
    subsample: int | None = None  # training images of the final model, where fewer than all
    compared_on: int | None = None  # training images the candidates were compared on, where fewer than all
    setup_s: float = 0.0  # the first backbone's ONNX export and engine choice, measured with the rate
    stopped: str | None = None  # why the ladder ended before its last step, where it did
    starved: bool = False  # the budget paid for the first probe's features of only some of the images compared
    compared_target: int = 0  # training images the candidates were to be compared on (all, or the subsample asked)
    cv_repeats: int = 1  # 3-fold splits the last probe CV pooled (engine/probe.py cv_repeats): search.json
    all_images_s: float | None = None  # estimated seconds of the chosen probe's run on every training image, where
    # the budget fitted it on fewer
    all_images_bytes: int | None = None  # and the memory that run needs, where the memory held fewer (_grown_scan)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def metric(self) -> str:
        """What the candidates are compared by (TrainConfig.selection_metric)."""
        return self.cfg.selection_metric

    def add(self, cand: Candidate) -> Candidate:
        signals.check_stop("the recipe search")  # Ctrl-C: stop before the next candidate
        cand.started_at = time.perf_counter() - self.t0
        self.candidates.append(cand)
        if self.bar is not None:
            self.bar.n = min(cand.started_at, self.bar.total)
            self.bar.set_description(f"search: {cand.name}")
        return cand

    def affords(self, cand: Candidate, reserve: float, cut_down: bool = False) -> bool:
        """Whether the candidate's estimate and the final run's `reserve` fit in what is left; if not,
        the candidate is marked skipped with the numbers, or, for a cut-down try of a step already marked
        skipped (fewer views), dropped from the record without a line."""
        if cand.estimate_s + reserve <= self.left():
            return True
        if cut_down:
            self.candidates.remove(cand)
            return False
        cand.status = f"skipped: needs ~{cand.estimate_s + reserve:.0f}s with the final run, {self.left():.0f}s left"
        log.info("search: %s %s", cand.name, cand.status)
        return False


def train(cfg: TrainConfig, given=(), resume: bool = False) -> dict:
    """The one entry for training: the search for --recipe auto, else the configured run (engine/fit.py).
    `given`: the options set explicitly (each fixes its piece of the recipe)."""
    from .caches import cap_setting
    from .engine.fit import fit, refuse_to_overwrite
    from .models.adapt import check_freeze
    from .models.registry import get_spec
    from .engine import distributed
    from .run_folder import claimed

    if not resume:  # what can be refused is refused before any search time is spent
        cfg.validate()
        cap_setting()
        check_freeze(get_spec(cfg.model), cfg.mode, cfg.unfreeze)
    # The whole search holds --out, not just its final run (under torchrun rank 0 alone: fit).
    with claimed(Path(cfg.out)) if cfg.out and distributed.is_main() else nullcontext():
        if cfg.out and not resume:
            refuse_to_overwrite(Path(cfg.out), cfg.overwrite)
        if cfg.recipe == "auto" and not resume:
            return run(cfg, set(given))
        return fit(cfg, resume=resume)


def run(cfg: TrainConfig, given: set[str]) -> dict:
    """Search, refit the winner on all training images, evaluate it once on val; return its metrics."""
    from .data.folders import check_subsample, scan_dataset
    from .engine.fit import advise_on_imbalance, default_run_dir

    from .models.registry import get_spec

    cfg = copy.deepcopy(cfg)  # the caller's config is not changed
    cfg.validate()
    get_spec(cfg.model)  # an unknown model fails before any scanning
    t0 = time.perf_counter()
    from .engine.progress import time_bar

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
        context = _Context.build(cfg, scan)
        by_budget = _compared_on(budget, len(scan.classes))
        # no fewer than COMPARED_PER_CLASS per class, as by the budget: on fewer the comparisons say nothing
        floor = COMPARED_PER_CLASS * len(scan.classes)
        compare_on = min(by_budget, max(_compared_memory_holds(search, context), floor))
        if cfg.train_subsample:  # the images asked for, for the search and the final model
            if cfg.train_subsample < len(scan.train):
                _keep_subsample(search, context, cfg.train_subsample, asked=True)
        elif len(scan.train) > compare_on:
            log.warning("search: the recipes are compared on a random %d of the %d training images%s; a chosen probe "
                        "is then fitted on as many as the budget allows", compare_on, len(scan.train),
                        " (what the memory holds)" if compare_on < by_budget else "")
            _keep_subsample(search, context, compare_on, asked=True)
        search.compared_target = len(context.scan.train)
        winner, context = _search_probes(search, context)  # the context of the winner's backbone
        winner = _search_finetuning(search, context, winner) or winner
    except signals.Interrupted as exc:  # inside a candidate's throwaway run: its resume command means nothing
        search.bar.close()
        raise signals.Interrupted("interrupted during the recipe search; the features computed so far stay in the "
                                  "cache, so the same command starts again from them", exc.exit_code - 128) from None
    if search.subsample and not cfg.train_subsample:
        search.compared_on = search.subsample
        if winner.kind == "probe":
            context.scan = _grown_scan(search, winner, context, scan)
    final = _final_config(search, winner, out)
    scan = context.scan  # all training images, or the subsample the budget allowed
    del context  # its model and runtimes: the final run builds its own
    search.bar.close()
    metrics = _refit(search, winner, final, scan)
    _write_search(search, winner, final, metrics)
    return metrics


# ---- what every candidate shares ------------------------------------------------------------------


@dataclass
class _Context:
    cfg: TrainConfig
    scan: object
    spec: object
    model: object
    device: object
    y: np.ndarray
    inner: tuple[np.ndarray, np.ndarray]  # train-split indices: inner-train, inner hold-out
    order: np.ndarray  # a seeded permutation of the training images
    shorter_side: int = 0  # median shorter side of the training images (a sample's headers), in pixels
    taps: dict = field(default_factory=dict)  # (crop, input size) → Taps
    feats: dict = field(default_factory=dict)  # (crop, input size) → {view: (n, d) array}
    # Seconds per view against the first backbone's at its own input size (search.rate is in those views).
    cost: float = 1.0
    sibling_of_first: bool = False  # another backbone than the run's (see `sibling`), timed by nobody yet

    @property
    def decode_threads(self) -> int:
        from .engine.features import default_workers

        return default_workers(accelerator=self.device.type != "cpu")

    @classmethod
    def build(cls, cfg, scan):
        from .data.folders import subsample_order
        from .engine.environment import pick_device
        from .engine.fit import set_seed
        from .models.registry import get_spec

        set_seed(cfg.seed)
        spec, device = get_spec(cfg.model), pick_device(cfg.device)
        y = np.array([label for _, label in scan.train])
        order = subsample_order(y, cfg.seed)  # extraction order: any prefix is a seeded stratified subsample
        short = _median_shorter_side([scan.train[i][0] for i in order[:32]])
        ctx = cls(cfg, scan, spec, None, device, y, _inner_split(y, cfg.seed), order, short)
        ctx.model = ctx._build_model()
        return ctx

    def _build_model(self):
        import torch

        from .models.adapt import build_model

        cfg = self.cfg
        model = build_model(self.spec, len(self.scan.classes), pretrained=cfg.pretrained, weights_path=cfg.weights)
        model.eval().to(self.device)
        if self.device.type == "cpu" and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def sibling(self, spec, cost: float) -> "_Context":
        """Another backbone over the same training images (subsample, order and inner split included), its
        network built when its first features are asked for."""
        cfg = copy.deepcopy(self.cfg)
        cfg.model = spec.name
        return _Context(cfg, self.scan, spec, None, self.device, self.y, self.inner, self.order, self.shorter_side,
                        cost=cost, sibling_of_first=True)

    @property
    def small_images(self) -> bool:
        """Small enough (PIXELS_MAX_SHARE of the input) that the probes' CV also tries their raw pixels."""
        return 0 < self.shorter_side <= self.pre(None).input_size * PIXELS_MAX_SHARE

    def pre(self, crop, size=None):  # noqa: D102
        return self.spec.preprocessing.at_size(size or self.cfg.image_size, crop).reading(self.cfg.sixteen_bit_white)

    def taps_for(self, crop, size=None):
        from .engine.probe_train import make_taps

        if self.model is None:
            self.model = self._build_model()
        if (crop, size) not in self.taps:
            like = next(iter(self.taps.values()), None)  # same network and size: one runtime for every crop
            taps = make_taps(self.model, self.spec, self.cfg, self.pre(crop, size), self.device, like)
            if (like is None and self.sibling_of_first) or (like is not None and taps.engine is not like.engine):
                # a new runtime (another size, or another backbone's first) is chosen, exported and checked on
                # its first batch: not in the timed chunks (the first backbone's is timed by _measure_rate)
                taps.features([p for p, _ in self.scan.train[:8]], (0,), self.scan.digests, desc="warm-up")
            self.taps[crop, size] = taps
        return self.taps[crop, size]


def _tries_pixels(search: Search, ctx: _Context) -> bool:
    """Whether the probes' CV tries the raw pixels: as --probe-pixels says where given, else on small images."""
    return search.cfg.probe_pixels if "probe_pixels" in search.given else ctx.small_images


def _with_pixel_features(search: Search, ctx: _Context, crop, views, x: np.ndarray) -> np.ndarray:
    """x (n, views, d) with the pixel block of the same images and views appended (engine/probe.py PixelBlock),
    kept beside the taps' features (ctx.feats) so each crop and view is read once. A pass of its own: the
    pixel block is tried on small images only, whose decoding is cheap (digits: 0.9 s for 1,347 images), and it
    keeps the taps' cached vector the same for every run."""
    from .engine.probe_train import make_pixel_taps

    have = ctx.feats.setdefault((crop, "pixels"), {})
    todo = [v for v in views if v not in have]  # after the first extraction: any subsample is already made
    if todo:
        taps = make_pixel_taps(ctx.spec, ctx.cfg, ctx.pre(crop), ctx.device)
        got, ok, _ = taps.features([p for p, _ in ctx.scan.train], todo, ctx.scan.digests, ctx.decode_threads,
                                   desc="search pixels")
        _all_read(got, ok)
        have.update({v: got[:, i] for i, v in enumerate(todo)})
    return np.concatenate([x, np.stack([have[v] for v in views], 1)], 2)


def _all_read(x, ok) -> None:
    """The search needs every training image: one unreadable file ends it with a pointer to the run that lists it."""
    from .errors import DataError

    if x is None or not all(ok):
        raise DataError("some training images could not be read during the search; run `transferkit train "
                        "--recipe tutorial` to see which (or remove them)")


def _inner_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of inner-train and the inner hold-out (stratified where every class can give one)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts.min() >= 2 and len(y) * INNER_FRACTION >= len(counts) else None
    inner = train_test_split(np.arange(len(y)), test_size=INNER_FRACTION, random_state=seed, stratify=stratify)
    return np.sort(inner[0]), np.sort(inner[1])


# ---- 1. linear probes -------------------------------------------------------------------------------


def _search_probes(search: Search, ctx: _Context) -> tuple[Candidate, _Context]:
    """The best probe, and the context of its backbone (the one given, or a stronger one that won)."""
    cfg, given = search.cfg, search.given
    crops, views = _probe_ladder(search, ctx)
    _measure_rate(search, ctx, crops[0])
    best = None
    for crop in crops:  # eval crop, then the whole frame, on view 0
        if _perfect(best):
            return _stopped_at(search, best), ctx
        best = _better(best, _probe_candidate(search, ctx, crop, views[0]))
    if search.starved:  # the later steps run only where the final run's growth to every image compared still fits
        _starved_note(search)
    crop = best.settings["crop_fraction"]
    for view_set in views[1:]:  # then more views of the better crop, while they pay
        if _perfect(best):
            return _stopped_at(search, best), ctx
        if view_set == "dihedral" and not cfg.rotation_safe and best.settings["probe_views"] != "turns":
            continue  # turning the image by 90° did not help (or did not fit): the other turns will not either
        cand = _probe_candidate(search, ctx, crop, view_set, options=_carried_pooling(best))
        if cand.score is not None and cand.score <= best.score and not cfg.rotation_safe:
            break  # a view that does not pay (a mirrored digit is another digit): turning it will not either
        best = _better(best, cand)
    if _perfect(best):
        return _stopped_at(search, best), ctx
    mlp = _mlp_candidate(search, ctx, best)
    if _asked_mlp_fitted(search, mlp):  # asked for: the later probes are linear ones
        return mlp, ctx
    best = _better(best, mlp)
    if _perfect(best):
        return _stopped_at(search, best), ctx
    if "image_size" not in given:
        best = _better(best, _two_scale_candidate(search, ctx, best))
        if _perfect(best):
            return _stopped_at(search, best), ctx
    return _stronger_backbone(search, ctx, best)


def _stronger_backbone(search: Search, ctx: _Context, best: Candidate) -> tuple[Candidate, _Context]:
    """The best probe's crop and views on a stronger backbone of the same family (the registry's `stronger`,
    strongest first: the first whose weights are at hand and whose estimate fits), scored by the same 3-fold CV.
    Linear probes on a better ImageNet model usually transfer better (Kornblith et al. 2019); it costs more per
    image (2-core EPYC, ONNX Runtime, ELPV's 8 views: lite2 at 2.4× lite0's time), so it comes last among the
    probes: where it ran before the two-scale probe, ELPV 4 classes at 20m spent 354 s on a lite2 probe that
    lost the CV (0.7881 against 0.7978) and then had no time for the two-scale one, which wins there. Where it
    wins, the fine-tuning candidates and the final run use that backbone. Returns the better probe and the
    context of its backbone."""
    options = _stronger_options(search, ctx)
    for view_set in _view_sets_down_from(search, best) if options else []:
        for spec, cost in options:
            other = ctx.sibling(spec, cost)
            cand, reserve = _planned_probe(search, other, best.settings["crop_fraction"], view_set,
                                           setup_s=search.setup_s * cost)
            # Where it loses, the best probe's final run follows it, and that may cost more than its own
            # (ELPV 4 at 20m: a lite1 probe on 4 views reserved for its own val pass, then the two-scale
            # probe's 8 views at 300+224 px ran 10% past the budget).
            reserve = max(reserve, _final_reserve(search, ctx, best.settings))
            if not search.affords(cand, reserve, cut_down=view_set != best.settings["probe_views"]):
                continue  # a cheaper one may fit
            rate = search.rate  # in the first backbone's views
            _run_probe(search, other, cand, reserve)  # its export and engine choice (taps_for's warm-up) included
            if _better(best, cand) is cand:
                return cand, other
            search.rate = rate  # measured through the other backbone's guessed cost: keep the first one's
            return best, ctx
    return best, ctx


def _view_sets_down_from(search: Search, best: Candidate) -> list[str]:
    """The best probe's view set, then the one inside it with half its views (the sets are nested), for a
    costlier probe that may not fit with all of those views; only the best's where the views were given.
    No fewer: each doubling of the views gained ~0.4-0.6 points of CV on ELPV, which a second scale or a
    stronger backbone may make up once, not twice (ELPV 2 classes, default budget: on the image alone, the
    two-scale probe scored 0.8694 and lite1 0.8709 against 0.8826 for the 4-view probe, 76 s for nothing)."""
    from .engine.probe_train import PROBE_VIEWS

    mine = best.settings["probe_views"]
    if "probe_views" in search.given:
        return [mine]
    return [mine] + [name for name, views in PROBE_VIEWS.items() if len(views) * 2 == len(PROBE_VIEWS[mine])]


def _stronger_options(search: Search, ctx: _Context) -> list[tuple]:
    """(spec, cost per view against the first backbone) of each stronger backbone the search may try, strongest
    first: none where the backbone, its weights or its input size were given."""
    from .models.registry import get_spec
    from .models.weights import weights_available

    if {"model", "weights", "image_size"} & search.given or not search.cfg.pretrained or not ctx.spec.macs:
        return []
    options = []
    for spec in map(get_spec, ctx.spec.stronger):
        if spec.macs and weights_available(spec)[0]:
            # multiply-accumulates undercount what a larger backbone costs on a CPU (lite2: 2.2× lite0's, timed
            # 2.4× on ELPV): the margin keeps the plan on the safe side until its extraction times the real rate
            options.append((spec, ctx.cost * spec.macs / ctx.spec.macs * STRONGER_COST_MARGIN))
    return options


def _probe_ladder(search: Search, ctx: _Context) -> tuple[list, list[str]]:
    """The crops and view sets the probes climb through, each as given where it was."""
    cfg, given = search.cfg, search.given
    crops = [cfg.crop_fraction] if "crop_fraction" in given else _crop_options(ctx)
    if "probe_views" in given:
        return crops, [cfg.probe_views]
    # declared rotation-safe: from the mirror straight to all 8 views
    return crops, ["none", "flip", "dihedral"] if cfg.rotation_safe else ["none", "flip", "turns", "dihedral"]


def _perfect(best: Candidate | None) -> bool:
    """A probe right on every training image in the CV: no candidate can score above it, and a candidate must
    to win, so the probe ladder ends there (easy sets: seconds instead of minutes)."""
    return best is not None and best.score is not None and best.score >= 1.0


def _stopped_at(search: Search, best: Candidate) -> Candidate:
    search.stopped = f"{best.name} scores 1.0 on the 3-fold CV: no other probe could score above it"
    log.info("search: %s", search.stopped)
    return best


def _starved_note(search: Search) -> None:
    """The budget paid for the first probe on only some of the images compared: every later step of the ladder
    reserves the final run's features and fit of the rest (_growth_seconds), so more images come first and
    comparing more candidates on too few second. A 100-class folder of 3,000 training images at
    --time-budget 60s: the first probe on 1,250 (CV 0.73), then the whole frame on the same 1,250 (20 s) and a
    final fit on them scored 0.844 on val; the first probe fitted on all 3,000 instead, 0.946 (one probe on every
    image without a search: 0.951). A 300-class folder of 6,000 at the default budget, where the CV's prior had
    stopped the first extraction at 2,250, ended the ladder there and left 147 of its 240 s unused."""
    search.stopped = (f"the budget paid for the first probe's features of {search.subsample} of the training "
                      f"images: the later steps ran only where fitting the chosen probe on more still fitted")
    log.info("search: %s", search.stopped)


def _growth_seconds(search: Search, ctx: _Context, settings: dict) -> float:
    """Where the first probe was starved of images: what the final run of a probe with these settings spends on
    the images compared that the search did not extract (their features in every view, their share of the fit),
    at the share of the time left that _grown_scan gives them."""
    if not search.starved:
        return 0.0
    missing = search.compared_target - len(ctx.scan.train)
    if missing <= 0:
        return 0.0
    return missing * _final_seconds_per_image(search, ctx, settings) / GROWTH_SHARE


def _final_seconds_per_image(search: Search, ctx: _Context, settings: dict) -> float:
    """What one more training image costs the final run of a probe with these settings: its features in every
    view and its share of the fit."""
    from .engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    return views * _final_view_seconds(search, ctx, settings) + _fit_seconds(search, ctx, settings) / len(ctx.scan.train)


def _mlp_asked(search: Search) -> bool:
    return "probe_head" in search.given and search.cfg.probe_head == "mlp"


def _asked_mlp_fitted(search: Search, mlp: Candidate | None) -> bool:
    """Whether --probe-head mlp was given and the MLP candidate scored; given and not fitted says so."""
    if not _mlp_asked(search):
        return False
    if mlp is not None and mlp.score is not None:
        return True
    log.warning("search: no MLP head fitted in the budget, so the model is the linear probe; a larger "
                "--time-budget (or --recipe tutorial --mode linear-probe --probe-head mlp) fits one")
    return False


def _crop_options(ctx: _Context) -> list:
    own = ctx.spec.preprocessing.crop_fraction
    return [None, 1.0] if own < 0.999 else [None]


def _measure_rate(search: Search, ctx: _Context, crop) -> None:
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


def _log_plan(search: Search, ctx: _Context, note: str = "") -> None:
    """The ladder with an estimate for each step, from the measured rate (steps run while they fit); the steps
    the given options rule out are not listed."""
    from .engine.probe import fold_count
    from .engine.probe_train import PROBE_VIEWS

    n, m = len(ctx.scan.train), len(ctx.scan.val)
    per_view = n / search.rate
    cv, splits = _cv_seconds(search, ctx, 1), _cv_repeats(ctx)
    folds = fold_count(ctx.y)
    log.info("plan: %d train / %d val images; extraction %.0f images/s (measured%s); budget %.0fs, %.0fs left%s",
             n, m, search.rate, note, search.deadline - search.t0, search.left(),
             f"; the probes' {folds}-fold CV runs on {splits} splits (few images)" if splits > 1 else "")
    crops, view_sets = _probe_ladder(search, ctx)
    first = len(PROBE_VIEWS[view_sets[0]])
    steps = [(f"probe, crop {'own' if c is None else c}, {first} view{'s' * (first > 1)}", first * (per_view + cv))
             for c in crops]
    described = {"flip": "probe + mirror view", "turns": "probe + views turned by 90° (2 more)",
                 "dihedral": "probe, 8 dihedral views"}
    for before, view_set in zip(view_sets, view_sets[1:]):  # each pays for its new views and its CV
        k, new = len(PROBE_VIEWS[view_set]), len(PROBE_VIEWS[view_set]) - len(PROBE_VIEWS[before])
        steps.append((described[view_set], new * per_view + k * cv))
    if _tries_mlp(search):
        from .engine.probe import mlp_fit_seconds

        steps.append(("the best probe with an MLP head, per view",
                      mlp_fit_seconds(_mlp_step_seconds(search, ctx), n) * _mlp_fits(ctx)))
    size = None if "image_size" in search.given else _larger_size(ctx)
    if size is not None:
        steps.append((f"probe at {size}+{ctx.pre(None).input_size} px, the best crop, per view",
                      _two_scale_seconds(search, ctx, size, 1)))
    for spec, cost in _stronger_options(search, ctx)[:1]:  # the others are cheaper, tried where it does not fit
        steps.append((f"probe on {spec.name}, the best crop, per view", search.setup_s * cost + cost * per_view + cv))
    refit = 2 - INNER_FRACTION  # the inner run and the refit on all images
    activations = _activation_seconds(search, {"mode": "partial", "views": PARTIAL_VIEWS["random"]}, n, m)
    ladder = {"partial": ("partial fine-tuning from the probe, inner hold-out + refit", activations),
              "finetune": ("full fine-tuning from the probe, inner hold-out + refit", refit * 2 * 3 * n / search.rate)}
    steps += [ladder[kind] for kind in _finetune_kinds(search, ctx)]
    for i, (name, seconds) in enumerate(steps, 1):
        log.info("plan: %d. %-60s ~%4.0fs%s", i, name, seconds, " and up (timed before it runs)" if "fine" in name else "")
    log.info("plan: then the final run on all training images, val scored once (~%.0fs per view)", m / search.rate)


def _probe_candidate(search: Search, ctx: _Context, crop, view_set: str, options=None) -> Candidate:
    cand, reserve = _planned_probe(search, ctx, crop, view_set)
    first = len(search.candidates) == 1  # the one probe every search runs, whatever the budget
    if first or search.affords(cand, reserve):
        _run_probe(search, ctx, cand, reserve, options)
    return cand


def _carried_pooling(best: Candidate) -> list:
    """The (pooling, stages, pixels) option a view step's CV scores: the one its crop's best probe chose, as the
    step keeps that crop. On ELPV the other option (the top tap's 1,280 means against mean+max of six taps, 4,048
    features) never won past the first view, yet took about a fifth of each CV, and the 8-view step missed the
    default budget by 4 s (benchmarks/RESULTS.md, notes of session 23). The best probe chose among
    _pooling_options, so pieces given on the command line are already in its choice."""
    s = best.settings
    return [(s["probe_pooling"], s["probe_stages"], s["probe_pixels"])]


def _planned_probe(search: Search, ctx: _Context, crop, view_set: str, setup_s: float = 0.0):
    """A probe candidate with its estimate (`setup_s` on top: a new backbone's export and engine choice), and
    the reserve its final run needs: the val pass and the write-up."""
    from .engine.probe_train import PROBE_VIEWS

    views = PROBE_VIEWS[view_set]
    settings = {"crop_fraction": crop, "probe_views": view_set}
    if ctx.spec.name != search.cfg.model:
        settings["model"] = ctx.spec.name
    backbone = f" {ctx.spec.name}" if "model" in settings else ""
    name = f"probe{backbone} crop={'own' if crop is None else crop} views={view_set}"
    cand = search.add(Candidate(name, "probe", settings))
    missing = _missing_views(ctx, crop, views)
    n = len(ctx.scan.train)
    cv = _cv_seconds(search, ctx, len(views))
    cand.estimate_s = setup_s + len(missing) * n * _view_seconds(search, ctx) + cv
    reserve = _final_reserve(search, ctx, settings)
    log.debug("search: %s: %d views × %d images at %.0f views/s + CV ~%.0fs; reserve %.0fs",
              name, len(missing), n, 1 / _view_seconds(search, ctx), cv, reserve)
    return cand, reserve


def _final_reserve(search: Search, ctx: _Context, settings: dict) -> float:
    """Seconds the final run of a probe with these settings needs: its val pass over every view (at both
    scales for a two-scale probe), its fit and the write-up, and where the search was starved of images, the
    features and fit of the rest of the images compared."""
    return (_val_pass_seconds(search, ctx, settings) + _fit_seconds(search, ctx, settings) + FIXED_OVERHEAD_S
            + _growth_seconds(search, ctx, settings))


def _val_pass_seconds(search: Search, ctx: _Context, settings: dict) -> float:
    """The final run's pass over the val images, every view of a probe with these settings."""
    from .engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    return views * len(ctx.scan.val) * _final_view_seconds(search, ctx, settings)


def _run_probe(search: Search, ctx: _Context, cand: Candidate, reserve: float, options=None) -> None:
    from .engine.probe_train import PROBE_VIEWS

    t = time.perf_counter()
    x = _probe_features(search, ctx, cand.settings["crop_fraction"], PROBE_VIEWS[cand.settings["probe_views"]],
                        reserve)
    if x is None:
        cand.seconds, cand.status = time.perf_counter() - t, "stopped: extraction ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return
    _score_probe(search, ctx, cand, x, reserve, options)
    cand.seconds = time.perf_counter() - t
    cand.status = "ran"
    log.info("search: %s: %s %.4f (%s, %.0fs)", cand.name, _cv_name(search), cand.score,
             _probe_text(cand.settings), cand.seconds)


def _probe_features(search: Search, ctx: _Context, crop, views, reserve: float) -> np.ndarray | None:
    """The training features a probe on these views reads (with the pixel block where the probes try it), or
    None where their extraction had to stop."""
    x = _train_features(search, ctx, crop, views, reserve)
    if x is not None and _tries_pixels(search, ctx):
        x = _with_pixel_features(search, ctx, crop, views, x)
    return x


def _mlp_candidate(search: Search, ctx: _Context, best: Candidate) -> Candidate | None:
    """The best probe's features with an MLP head (engine/probe.py fit_mlp) in place of the logistic
    regression: no extraction, only its fits (3 CV folds, then the inner hold-out), planned from one timed
    training step. Scored by the same 3-fold CV; it keeps the linear probe's settings (crop, views, pooling,
    stages and C), so the later probes build on them as on the linear one's."""
    from .engine.probe import cross_validate_mlp, fit_probe, mlp_fit_seconds, predict_proba
    from .engine.probe_train import PROBE_VIEWS

    if best.score is None or not _tries_mlp(search):
        return None
    s = best.settings
    settings = {**{k: v for k, v in s.items() if k != "cv_per_C"}, "probe_head": "mlp"}
    cand = search.add(Candidate(f"{best.name} head=mlp", "probe", settings))
    views = PROBE_VIEWS[s["probe_views"]]
    rows = len(ctx.scan.train) * len(views)
    step_s = _mlp_step_seconds(search, ctx)
    cand.estimate_s = mlp_fit_seconds(step_s, rows) * _mlp_fits(ctx)
    reserve = _final_reserve(search, ctx, settings)  # where it loses, the linear probe's smaller one follows
    if not search.affords(cand, reserve):
        return cand
    t, n_classes, seed = time.perf_counter(), len(ctx.scan.classes), search.cfg.seed
    x = _probe_features(search, ctx, s["crop_fraction"], views, reserve)  # cached by the probe it builds on
    columns = ctx.taps_for(s["crop_fraction"]).columns(s["probe_stages"], s["probe_pooling"], s["probe_pixels"])
    deadline, (inner_train, inner_test) = search.deadline - reserve, ctx.inner
    balanced = search.cfg.balanced_classes
    score = cross_validate_mlp(x, ctx.y, columns, n_classes, seed=seed, deadline=deadline, balanced=balanced,
                               metric=search.metric)
    fit = None if score is None else fit_probe(x[inner_train], ctx.y[inner_train], columns, None, n_classes,
                                               head="mlp", seed=seed, deadline=deadline, balanced=balanced)
    cand.seconds = time.perf_counter() - t
    if fit is None:
        cand.status = "stopped: its fits ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return cand
    cand.score, cand.status = score, "ran"
    _answered(search, ctx, cand, predict_proba(fit, x[inner_test]).argmax(1))
    log.info("search: %s: %s %.4f (the linear head's %.4f), %.0fs", cand.name, _cv_name(search), score,
             best.score, cand.seconds)
    return cand


def _tries_mlp(search: Search) -> bool:
    """Whether the ladder has the MLP step: not where --probe-head linear was given, nor where a --mode that
    fine-tunes was (the probes then only start and judge the fine-tuning, which takes a linear head)."""
    from .modes import get_mode

    cfg, given = search.cfg, search.given
    if "probe_head" in given:
        return cfg.probe_head == "mlp"
    return "mode" not in given or not get_mode(cfg.mode).trains_backbone


def _cv_repeats(ctx: _Context) -> int:
    """How many 3-fold splits the probes' CV pools on ctx's training images (engine/probe.py cv_repeats)."""
    from .engine.probe import cv_repeats

    return cv_repeats(len(ctx.scan.train))


def _mlp_fits(ctx: _Context) -> float:
    """The MLP step's fits, in fits on all of its rows (MLP_CV_FITS)."""
    return MLP_CV_FITS * _cv_repeats(ctx) + MLP_INNER_FITS


def _mlp_step_seconds(search: Search, ctx: _Context) -> float:
    """One MLP training step on this machine, timed once per search over the widest vector a probe can read
    (every tap, mean and max, the pixels where the probes try them): the plan and every MLP estimate use it."""
    from .engine.probe import mlp_step_seconds

    if search.mlp_step_s is None:
        search.mlp_step_s = mlp_step_seconds(_widest_vector(search, ctx), len(ctx.scan.classes))
    return search.mlp_step_s


def _widest_vector(search: Search, ctx: _Context) -> int:
    """Columns of the widest vector a probe of this search reads: every tap, mean and max, and the pixels where the
    probes try them (the first probe's crop: its taps exist by then)."""
    taps = ctx.taps_for(_probe_ladder(search, ctx)[0][0])
    return len(taps.columns(None, "meanmax", _tries_pixels(search, ctx)))


def _missing_views(ctx: _Context, crop, views, size=None) -> list:
    """The views of `crop` at input `size` not extracted yet: what a candidate's extraction, and so its
    estimate, pays for (ctx.feats is keyed by crop and size)."""
    return [v for v in views if v not in ctx.feats.get((crop, size), {})]


def _view_seconds(search: Search, ctx: _Context, size=None) -> float:
    """Seconds to extract one view of one image on ctx's backbone at input `size` (default: its own)."""
    return ctx.cost * _pixels(ctx, size) / search.rate


def _final_view_seconds(search: Search, ctx: _Context, settings: dict) -> float:
    """Seconds per view of one image through a probe with these settings, as its final run computes it: at its
    input size, and for a two-scale probe at the backbone's own size too (inside the graph)."""
    seconds = _view_seconds(search, ctx, settings.get("image_size"))
    if "probe_scale" in settings:
        seconds += _view_seconds(search, ctx)
    return seconds


def _cv_seconds(search: Search, ctx: _Context, views: int, images: int | None = None) -> float:
    """The probes' CV on ctx's training images (the first `images` of them) and this many views: from the last
    CV's measured cost per row it fitted (each repeat of the folds fits every row again: few images pool several
    splits), else a prior."""
    from .engine.probe import cv_repeats

    images = len(ctx.scan.train) if images is None else images
    rows = views * images * cv_repeats(images)
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


def _train_features(search: Search, ctx: _Context, crop, views, reserve: float, size=None) -> np.ndarray | None:
    """(n, views, d) features of the training images, extracted in chunks (a random order) while the
    projected end of the extraction leaves `reserve` seconds; None where it had to stop. The first probe
    never stops: it keeps the chunks done in time and the search goes on with that subsample."""
    have = ctx.feats.setdefault((crop, size), {})
    todo = _missing_views(ctx, crop, views, size)
    if todo:
        first = not search.feats_done
        got = _extract_chunks(search, ctx, ctx.taps_for(crop, size), todo, reserve, keep_partial=first,
                              cost=ctx.cost * _pixels(ctx, size))
        if got is None:
            return None
        if first and len(got[todo[0]]) < len(ctx.scan.train):
            _keep_subsample(search, ctx, len(got[todo[0]]))
        have.update(got)
        search.feats_done = True
    return np.stack([have[v] for v in views], 1)


def _extract_chunks(search: Search, ctx: _Context, taps, todo, reserve: float, keep_partial: bool, cost: float = 1.0):
    """`cost`: seconds per view of this extraction against one of the first backbone at its own size (the
    views search.rate counts)."""
    paths = [ctx.scan.train[i][0] for i in ctx.order]
    size = max(128, -(-len(paths) // 8))
    parts, t0 = [], time.perf_counter()
    for start in range(0, len(paths), size):
        if parts:  # project from the rate seen so far (a busy machine, a new decode)
            search.rate = start * len(todo) * cost / max(time.perf_counter() - t0, 1e-3)
            # The first probe goes on while the next chunk and a CV on the images so far fit (a 100-class
            # folder at 60 s: all or the first chunk stopped at 250 of 2,000 images, CV 0.36); the others
            # run on every image or not at all.
            end = min(len(paths), start + size) if keep_partial else len(paths)
            ahead = (end - start) * len(todo) * cost / search.rate
            if ahead + _cv_seconds(search, ctx, len(todo), end) + reserve > search.left():
                if not keep_partial:
                    return None
                break
        chunk = paths[start:start + size]
        x, ok, _ = taps.features(chunk, todo, ctx.scan.digests, ctx.decode_threads, "search features")
        _all_read(x, ok)
        parts.append(x)
    x = np.concatenate(parts)
    inverse = np.argsort(ctx.order[: len(x)])  # back to the scan's order (of the images done)
    return {v: x[inverse, i] for i, v in enumerate(todo)}


def _keep_subsample(search: Search, ctx: _Context, n: int, asked: bool = False) -> None:
    """Only the first n training images in the search's random order (data/folders.py subsample_order): the
    budget allowed features of no more, or the caller asked for n (--train-subsample, or the comparison
    subsample of a large folder, which says so itself). The search and the final run go on
    with those, and the reproduce command names n: `transferkit train --train-subsample n` keeps the same
    images, since the search's order stays that of one seeded permutation of all of them."""
    keep = np.sort(ctx.order[:n])  # positions in the current list
    if not asked:
        log.warning("search: the budget allows the first probe features of %d of %d training images; it is scored "
                    "on that random subsample, then fitted on as many as the time left pays for (a larger "
                    "--time-budget uses them all)", n, len(ctx.scan.train))
    rank = np.empty(len(ctx.order), dtype=np.int64)
    rank[ctx.order] = np.arange(len(ctx.order))
    ctx.scan = copy.copy(ctx.scan)
    ctx.scan.train = [ctx.scan.train[i] for i in keep]
    ctx.y = ctx.y[keep]
    ctx.order = np.argsort(rank[keep])  # the same order, over the images kept
    ctx.inner = _inner_split(ctx.y, ctx.cfg.seed)
    search.subsample = n
    search.starved = search.starved or not asked


def _score_probe(search: Search, ctx: _Context, cand: Candidate, x: np.ndarray, reserve: float,
                 options=None) -> None:
    """Pooling/stages (those of `options`, else every one that is not given) and C by 3-fold CV on train,
    stopping where only `reserve` seconds would be left (the C grid runs from strong to weak regularization, the
    slow end last); then the inner hold-out score, for comparing with fine-tuning."""
    from .engine.probe import cross_validate, fit_probe, predict_proba
    from .engine.probe_train import C_GRID

    cfg, given, taps = search.cfg, search.given, ctx.taps_for(cand.settings["crop_fraction"])
    options = options or _pooling_options(search, ctx)
    grid = [cfg.probe_c] if "probe_c" in given else list(C_GRID)
    n_classes = len(ctx.scan.classes)
    deadline = search.deadline - reserve
    # What search.json reports: the CV's own images (a subsample taken mid-search, where the budget allowed no
    # more features, pools more splits than the full set would have)
    search.cv_repeats = _cv_repeats(ctx)
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
    s = cand.settings
    inner_train, inner_test = ctx.inner
    fit = fit_probe(x[inner_train], ctx.y[inner_train],
                    taps.columns(s["probe_stages"], s["probe_pooling"], s["probe_pixels"]), s["probe_c"], n_classes,
                    balanced=cfg.balanced_classes)
    _answered(search, ctx, cand, predict_proba(fit, x[inner_test]).argmax(1))


def _pooling_options(search: Search, ctx: _Context) -> list[tuple]:
    """Every (pooling, stages, pixels) a probe's CV may score, less what was given."""
    cfg, given = search.cfg, search.given
    options = [(cfg.probe_pooling, cfg.probe_stages)] if {"probe_pooling", "probe_stages"} & given else POOLING_STAGES
    options = [(pooling, stages, False) for pooling, stages in options]
    if "probe_pixels" in given:
        options = [(pooling, stages, cfg.probe_pixels) for pooling, stages, _ in options]
    elif ctx.small_images:  # small images: the first option's features with the raw pixels too
        options.append((*options[0][:2], True))
    return options


def _two_scale_candidate(search: Search, ctx: _Context, best: Candidate) -> Candidate | None:
    """The best probe's views read at a larger input size too, one probe per scale and their logits
    averaged (engine/probe.py stack_fits), scored by the same 3-fold CV as every probe. Where that does not
    fit in the time left, the same with half of those views (_view_sets_down_from), still compared by CV with
    the best probe on all its views: a second scale may pay more than the extra views (ELPV 2 classes at the
    default budget: the 4 views at two scales needed ~202 s of 112 left)."""
    size, native = _larger_size(ctx), ctx.pre(None).input_size
    if best.settings.get("probe_pixels"):
        return None  # small images (the pixels won): nothing to read at a larger size
    if size is None:
        log.info("search: no two-scale probe: the training images are not much larger than %d px", native)
        return None
    first = None  # on all the best probe's views: recorded, as skipped where nothing fits
    for view_set in _view_sets_down_from(search, best):
        cand, reserve = _planned_two_scale(search, ctx, best, view_set, size)
        reserve = max(reserve, _final_reserve(search, ctx, best.settings))  # on fewer views it may lose to best
        first = first or cand
        if search.affords(cand, reserve, cut_down=view_set != best.settings["probe_views"]):
            _run_two_scale(search, ctx, cand, best, reserve)
            return cand
    return first


def _planned_two_scale(search: Search, ctx: _Context, best: Candidate, view_set: str, size: int):
    """A two-scale candidate on `view_set` of the best probe's crop, with its estimate and its final run's
    reserve: the val pass at both scales, and the write-up."""
    from .engine.probe_train import PROBE_VIEWS

    s, native = best.settings, ctx.pre(None).input_size
    crop, views = s["crop_fraction"], PROBE_VIEWS[view_set]
    name = f"probe crop={'own' if crop is None else crop} views={view_set} at {size}+{native} px"
    settings = {k: s[k] for k in ("model", "crop_fraction", "probe_pooling", "probe_stages") if k in s}
    cand = search.add(Candidate(name, "probe", {**settings, "probe_views": view_set, "image_size": size,
                                                "probe_scale": native, "probe_scale_c": s["probe_c"]}))
    cand.estimate_s = _two_scale_seconds(search, ctx, size, len(views))
    return cand, _final_reserve(search, ctx, cand.settings)


def _run_two_scale(search: Search, ctx: _Context, cand: Candidate, best: Candidate, reserve: float) -> None:
    """Extract the larger scale's views, then score the pair by 3-fold CV and on the inner hold-out. The native
    scale keeps the best probe's C (chosen on the same images, with these views or more of them)."""
    from .engine.probe import cross_validate, cross_validate_stacked, fit_probe
    from .engine.probe_train import C_GRID, PROBE_VIEWS

    s, t = cand.settings, time.perf_counter()
    crop, views, size = s["crop_fraction"], PROBE_VIEWS[s["probe_views"]], s["image_size"]
    x_large = _train_features(search, ctx, crop, views, reserve, size=size)
    if x_large is None:
        cand.seconds, cand.status = time.perf_counter() - t, "stopped: extraction ran slower than planned"
        log.info("search: %s %s", cand.name, cand.status)
        return
    x_native = _train_features(search, ctx, crop, views, reserve)
    columns = ctx.taps_for(crop).columns(s["probe_stages"], s["probe_pooling"])
    grid = [search.cfg.probe_c] if "probe_c" in search.given else list(C_GRID)
    n_classes, seed, deadline = len(ctx.scan.classes), search.cfg.seed, search.deadline - reserve
    weighting = {"balanced": search.cfg.balanced_classes, "metric": search.metric}
    large = cross_validate(x_large, ctx.y, columns, n_classes, grid, seed=seed, deadline=deadline, **weighting)
    Cs = [large.C, s["probe_scale_c"]]
    s.update(probe_c=large.C, cv_at_larger_size=large.score)
    cand.score = cross_validate_stacked([x_large, x_native], ctx.y, columns, Cs, n_classes, seed=seed, **weighting)
    inner_train, inner_test = ctx.inner
    logits = sum(fit_probe(x[inner_train], ctx.y[inner_train], columns, C, n_classes, balanced=weighting["balanced"])
                 .logits(x[inner_test]) for x, C in zip((x_large, x_native), Cs))
    _answered(search, ctx, cand, logits.mean(1).argmax(-1))
    cand.seconds, cand.status = time.perf_counter() - t, "ran"
    log.info("search: %s: %s %.4f (%d px alone %.4f; best so far %.4f), %.0fs", cand.name, _cv_name(search),
             cand.score,
             size, large.score, best.score, cand.seconds)


def _pixels(ctx: _Context, size) -> float:
    """Cost of an extraction at input `size` against one at the backbone's own size."""
    return 1.0 if size is None else (size / ctx.pre(None).input_size) ** 2


def _two_scale_seconds(search: Search, ctx: _Context, size: int, views: int) -> float:
    """The two-scale probe's estimate: the views at the larger size (the native ones are cached), then the
    larger size's CV over the C grid and the pair's, whose six fits (two per fold) start cold: about 1.7×
    (ELPV 4 classes) and 3× (2 classes) the best probe's CV over both poolings (each candidate's time less its
    extraction at the measured rate, 20m budgets), so 2.5×; counted as one CV, the 4-class run planned 350 s
    and took 531."""
    return views * len(ctx.scan.train) * _view_seconds(search, ctx, size) + 2.5 * _cv_seconds(search, ctx, views)


def _larger_size(ctx: _Context) -> int | None:
    """The two-scale probe's larger input: the training images' own shorter side (median of a sample) where
    that is at most LARGER_INPUT_MAX × the backbone's input, else LARGER_INPUT × it; None where it would not
    be LARGER_INPUT_MIN × larger."""
    native = ctx.pre(None).input_size
    short = ctx.shorter_side
    size = short if short <= native * LARGER_INPUT_MAX else int(native * LARGER_INPUT) // 8 * 8
    return size if size >= native * LARGER_INPUT_MIN else None


def _median_shorter_side(paths: list[str]) -> int:
    from PIL import Image

    sides = []
    for path in paths:
        try:
            with Image.open(path) as image:  # reads the header only
                sides.append(min(image.size))
        except OSError:
            continue
    return int(np.median(sides)) if sides else 0


def _compared_on(budget_s: float, n_classes: int = 2) -> int:
    """How many training images the candidates are compared on, at most: SEARCH_MAX_IMAGES per default budget,
    and no fewer than COMPARED_PER_CLASS per class."""
    scaled = int(SEARCH_MAX_IMAGES * max(1.0, budget_s / parse_duration(DEFAULT_TIME_BUDGET)))
    return max(scaled, COMPARED_PER_CLASS * n_classes)


def _grown_scan(search: Search, winner: Candidate, ctx: _Context, full):
    """The split for the final run of a probe chosen on a subsample: the subsample grown (along the same seeded
    order, so it keeps the images the search extracted) by as many training images as GROWTH_SHARE of the time
    left pays for: their features in the winner's views and scales, and the larger fit."""
    from .data.folders import subsample_train

    s, n, total = winner.settings, len(ctx.scan.train), len(full.train)
    val_pass = _val_pass_seconds(search, ctx, s)
    spare = (search.left() - val_pass - FIXED_OVERHEAD_S) * GROWTH_SHARE - _fit_seconds(search, ctx, s)
    per_image = _final_seconds_per_image(search, ctx, s)
    by_time = n + max(0, int(spare / per_image))
    by_memory = _images_memory_holds(ctx, s, len(full.val))
    grown = min(total, by_time, max(n, by_memory))
    if grown < total:  # what the reproduce command takes without --train-subsample: told, so the user can choose
        search.all_images_s = total * per_image + val_pass + FIXED_OVERHEAD_S
    memory_bound = by_memory < min(total, by_time)
    if memory_bound:  # and the memory it needs, where that is what stopped the growth
        search.all_images_bytes = _final_run_bytes(ctx, s, total, len(full.val))
    if grown <= n:
        return ctx.scan
    search.subsample = grown if grown < total else None
    limit = "what the memory holds" if memory_bound else "what the budget allows"
    log.info("search: the chosen probe is fitted on %s", f"{grown} of the {total} training images ({limit})"
             if grown < total else f"all {total} training images")
    return subsample_train(full, grown, search.cfg.seed)  # the final run's --train-subsample takes the same images


def _compared_memory_holds(search: Search, ctx: _Context) -> int:
    """Training images the probes can be compared on within MEMORY_SHARE of the memory available now: their features
    in the ladder's largest view set (and one view of every other crop), the widest vector, the CV's copies
    (CV_MEMORY_COPIES), and as many views again twice: the two-scale probe's larger input and a stronger backbone
    hold theirs beside the first's; unbounded where the available memory is not known."""
    from .engine.probe_train import PROBE_VIEWS

    budget = _memory_budget()
    if budget is None:
        return 1 << 62
    crops, view_sets = _probe_ladder(search, ctx)
    views = max(len(PROBE_VIEWS[v]) for v in view_sets)
    image_bytes = (views * (3 + CV_MEMORY_COPIES) + len(crops) - 1) * _widest_vector(search, ctx) * 4  # float32
    return max(1, int(budget / image_bytes))


def _images_memory_holds(ctx: _Context, settings: dict, n_val: int) -> int:
    """Training images the final run of a probe with these settings can hold and fit within MEMORY_SHARE of the
    memory available now (_final_run_bytes, the val images first); unbounded where that memory is not known."""
    budget = _memory_budget()
    if budget is None:
        return 1 << 62
    return max(0, int((budget - _final_run_bytes(ctx, settings, 0, n_val)) / _final_run_bytes(ctx, settings, 1, 0)))


def _memory_budget() -> float | None:
    """MEMORY_SHARE of the memory available now (engine/environment.py); None where it is not known."""
    from .engine.environment import available_memory

    available = available_memory()
    return None if available is None else MEMORY_SHARE * available


def _final_run_bytes(ctx: _Context, settings: dict, n_train: int, n_val: int) -> int:
    """Peak memory of the final run of a probe with these settings on this many images: the training images'
    features and the fit's copies (FIT_MEMORY_COPIES), the val images' features and their predictions; every view,
    the widest vector the probe reads."""
    from .engine.probe_train import PROBE_VIEWS

    taps = ctx.taps_for(settings["crop_fraction"], settings.get("image_size"))
    width = len(taps.columns(None, "meanmax", bool(settings.get("probe_pixels"))))
    scales = 2 if settings.get("probe_scale") else 1  # a two-scale probe reads both sizes' vectors
    image_bytes = len(PROBE_VIEWS[settings["probe_views"]]) * width * scales * 4  # float32
    return (n_train * FIT_MEMORY_COPIES + 2 * n_val) * image_bytes


def _fit_seconds(search: Search, ctx: _Context, settings: dict) -> float:
    """One fit of a probe with these settings on all of ctx's training images: an MLP head's from its timed
    training step, a logistic regression's from the CV's measured cost (see FITS_PER_CV; the CV repeats its
    folds on few images)."""
    from .engine.probe import mlp_fit_seconds
    from .engine.probe_train import PROBE_VIEWS

    views = len(PROBE_VIEWS[settings["probe_views"]])
    if settings.get("probe_head") == "mlp":
        return mlp_fit_seconds(_mlp_step_seconds(search, ctx), views * len(ctx.scan.train))
    return _cv_seconds(search, ctx, views) / (FITS_PER_CV * _cv_repeats(ctx))


def _better(best: Candidate | None, cand: Candidate | None) -> Candidate:
    if cand is None or cand.score is None:
        return best
    return cand if best is None or cand.score > best.score else best


def _cv_name(search: Search) -> str:
    """What the probes' CV scores (search.metric)."""
    return f"CV {metric_words(search.metric)}"


def _answered(search: Search, ctx: _Context, cand: Candidate, pred: np.ndarray) -> None:
    """A probe's predictions for the inner hold-out images, scored in the search's metric."""
    cand.answered(pred, ctx.y[ctx.inner[1]], search.metric, len(ctx.scan.classes))


def _probe_text(s: dict) -> str:
    pixels = " and the raw pixels" if s.get("probe_pixels") else ""
    return f"{s['probe_pooling']} pooling of {s['probe_stages']} stages{pixels}, C={s['probe_c']:g}"


# ---- 2-3. fine-tuning from the probe's head ----------------------------------------------------------


def _search_finetuning(search: Search, ctx: _Context, probe: Candidate) -> Candidate | None:
    """LP-FT candidates scored on the inner hold-out; the winner if one beats the probe there."""
    cfg, given = search.cfg, search.given
    kinds = _finetune_kinds(search, ctx)
    if not kinds or (search.starved and "mode" not in given):  # starved: the rest goes to more images
        return None
    # Fine-tuning costs more and its hold-out score is noisier than the probe's 3-fold CV: it replaces the probe
    # only when it is clearly better on the inner hold-out (_not_clearly_better). ELPV seed-sized (49 hold-out
    # images): partial 0.857 against the probe's 0.816, 2 images, chosen without a rule, scored 0.8301 on val
    # against the probe's 0.8497. A --mode that fine-tunes, given, asks for a fine-tuned model: the candidate of
    # that mode wins if it ran.
    y, judged = ctx.y[ctx.inner[1]], {"metric": search.metric, "seed": cfg.seed, "n_classes": len(ctx.scan.classes)}
    bar = -1.0 if "mode" in given else probe.holdout + standard_error(probe.holdout_pred, y, **judged)
    if bar >= 1.0:  # the probe is right on every inner hold-out image: no fine-tuning score can be above it
        why = "no fine-tuning: the probe is right on the whole inner hold-out"
        search.stopped = f"{search.stopped}; {why}" if search.stopped else why
        log.info("search: %s", why)
        return None
    best = None
    for kind in kinds:
        cand = _finetune_candidate(search, ctx, probe, kind)
        if cand.score is None:
            continue
        why_not = None if "mode" in given else _not_clearly_better(cand, probe, bar, y, **judged)
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


def _finetune_kinds(search: Search, ctx: _Context) -> list[str]:
    """The fine-tuning candidates the search may try: none where a --mode given keeps the backbone frozen or the
    backbone has no stages (LP-FT needs them: engine/probe_train.py), only the --mode given where it trains."""
    from .modes import get_mode

    cfg = search.cfg
    if not ctx.spec.stages or ("mode" in search.given and not get_mode(cfg.mode).trains_backbone):
        return []
    return [cfg.mode] if "mode" in search.given else ["partial", "finetune"]


def _not_clearly_better(cand: Candidate, probe: Candidate, bar: float, y: np.ndarray, metric: str = "accuracy",
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


def _finetune_candidate(search: Search, ctx: _Context, probe: Candidate, kind: str) -> Candidate:
    from .engine.fit import fit

    settings = _finetune_settings(search, probe, kind)
    cand = search.add(Candidate(f"{kind} from the probe's head", kind, settings))
    n, m = len(ctx.scan.train), len(ctx.scan.val)
    once = _activation_seconds(search, settings, n, m, ctx.cost)
    # At the least: partial's activations, or ~3 forward passes per step for the other kinds. If even that
    # cannot fit, don't spend time timing a step.
    cand.estimate_s = once or (2 - INNER_FRACTION) * FT_EPOCHS[0] * 3 * n * _view_seconds(search, ctx)
    if not search.affords(cand, FIXED_OVERHEAD_S):
        return cand
    step_s = _step_seconds(search, ctx, settings)
    per_epoch = step_s * n
    # Where it loses, the probe's final run follows its inner run (a --mode given: it cannot lose).
    probe_reserve = 0.0 if "mode" in search.given else _final_reserve(search, ctx, probe.settings)
    epochs = _affordable_epochs(search, per_epoch, val_pass=m * step_s / 3, once=once, probe_reserve=probe_reserve)
    if "epochs" in search.given:
        epochs = search.cfg.epochs if epochs >= FT_EPOCHS[0] else 0
    cand.estimate_s = once + (2 - INNER_FRACTION) * per_epoch * epochs  # the inner run and the refit
    if epochs < FT_EPOCHS[0]:
        first = f"activations ~{once:.0f}s once, then " if once else ""
        cand.status = (f"skipped: {first}{FT_EPOCHS[0]} epochs (~{per_epoch:.0f}s each) and a refit do not fit in "
                       f"{search.left():.0f}s")
        log.info("search: %s %s", cand.name, cand.status)
        return cand
    settings["epochs"] = epochs
    t = time.perf_counter()
    inner_dir = Path(tempfile.mkdtemp(prefix=f"transferkit-inner-{kind}-"))  # a throwaway run folder
    inner_cfg = _candidate_config(search.cfg, settings, inner_dir, best_metric=search.metric)
    answers = _HoldoutAnswers(len(ctx.inner[1]))
    deadline = min(search.t0 + _inner_share(search), search.deadline - probe_reserve)
    try:
        metrics = fit(inner_cfg, scan=_inner_scan(ctx), deadline=deadline, figures=False, callbacks=[answers])
    except signals.Interrupted:
        raise  # the user's Ctrl-C stops the search, not just this candidate
    except Exception as exc:  # noqa: BLE001 - a failing candidate is recorded; the probe still stands
        cand.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("search: %s %s", cand.name, cand.status)
        return cand
    finally:
        shutil.rmtree(inner_dir, ignore_errors=True)
    # the inner hold-out, carved from the training images
    cand.score = metrics["best_val_acc" if search.metric == "accuracy" else f"best_val_{search.metric}"]
    settings["epochs"] = metrics["best_epoch"]
    cand.holdout_pred = answers.by_epoch.get(metrics["best_epoch"])
    cand.seconds, cand.status = time.perf_counter() - t, "ran"
    log.info("search: %s: inner hold-out %s %.4f at epoch %d (probe %.4f), %.0fs", cand.name,
             metric_words(search.metric), cand.score, metrics["best_epoch"], probe.holdout, cand.seconds)
    return cand


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


def _step_seconds(search: Search, ctx: _Context, settings: dict) -> float:
    """Seconds per training image, timed on a throwaway copy of the model set up as the run will train it:
    the mode's frozen groups, BatchNorm frozen and folded as the recipe keeps it, channels_last, the run's
    precision and batch size. (A plain train-mode copy at batch 16 took ~3× the real step on ELPV: the
    search then planned 2 fine-tuning epochs where 5 fitted.)"""
    import torch

    from .engine import precision as precisions
    from .models.adapt import set_train_mode
    from .models.batchnorm import Folding, freeze_statistics
    from .modes import make_mode

    cfg = _candidate_config(search.cfg, settings, Path(tempfile.gettempdir()))
    model = copy.deepcopy(ctx.model)
    make_mode(cfg).freeze(model, ctx.spec)
    batch = min(cfg.batch_size, len(ctx.scan.train))
    if settings["mode"] == "partial":  # only the top groups and the head run per step (cached below)
        from .engine.activations import split_stages

        _, model, _ = split_stages(model, ctx.spec, cfg.unfreeze)
        x = torch.randn(batch, *_activation_shape(ctx))
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


def _activation_shape(ctx: _Context) -> tuple:
    import torch

    from .engine.activations import split_stages

    prefix, _, _ = split_stages(ctx.model, ctx.spec, 2)
    size = ctx.pre(None).input_size
    with torch.inference_mode():  # the probe image where the model's weights are (a GPU run's too)
        return tuple(prefix(torch.zeros(1, 3, size, size, device=ctx.device)).shape[1:])


def _activation_seconds(search: Search, settings: dict, n: int, m: int, cost: float = 1.0) -> float:
    """partial: the frozen groups run once per (training image, view) and once per val image before the
    first epoch, and the epochs then train on those activations. The inner run computes them for its part
    of train and the refit for the rest (engine/activations.py caches them by content), so the pair pays for
    them once, not per epoch. Other kinds: 0. `cost`: the backbone's (_Context.cost)."""
    return (settings["views"] * n + m) * cost / search.rate if settings["mode"] == "partial" else 0.0


def _affordable_epochs(search: Search, per_epoch: float, val_pass: float, once: float = 0.0,
                       probe_reserve: float = 0.0) -> int:
    """Epochs E such that the inner run (80% of train) and the refit (100%) both fit, with what they pay
    `once` (partial's activations), the final val pass and write-up, in what is left; and, where the candidate
    loses, the inner run and the probe's final run (`probe_reserve` seconds)."""
    if_won = (search.left() - FIXED_OVERHEAD_S - 2 * val_pass - once) / (per_epoch * (2 - INNER_FRACTION))
    if_lost = (search.left() - probe_reserve - once) / (per_epoch * (1 - INNER_FRACTION))
    return int(max(0.0, min(FT_EPOCHS[1], if_won, if_lost)))


def _inner_share(search: Search) -> float:
    # The inner run may use the part of the budget that leaves the same time again for the refit.
    now = time.perf_counter() - search.t0
    return now + (search.deadline - search.t0 - now - FIXED_OVERHEAD_S) * (1 - INNER_FRACTION) / (2 - INNER_FRACTION)


def _inner_scan(ctx: _Context):
    """The training split cut in two: inner-train (80%) and an inner hold-out (20%) that plays val."""
    inner_train, inner_test = ctx.inner
    scan = copy.copy(ctx.scan)
    scan.train = [ctx.scan.train[i] for i in inner_train]
    scan.val = [ctx.scan.train[i] for i in inner_test]
    scan.split_source, scan.val_name = "inner hold-out of train", "hold-out"
    return scan


# ---- the final run -----------------------------------------------------------------------------------


def _candidate_config(base: TrainConfig, settings: dict, out: Path, **extra) -> TrainConfig:
    cfg = copy.deepcopy(base)
    known = {f.name for f in fields(TrainConfig)}
    for key, value in {**settings, **extra}.items():
        if key in known:
            setattr(cfg, key, value)
    cfg.recipe, cfg.out = "tutorial", str(out)
    return cfg


def _final_config(search: Search, winner: Candidate, out: Path) -> TrainConfig:
    subsample = {"train_subsample": search.subsample} if search.subsample else {}  # for the reproduce command
    if winner.kind == "probe":
        settings = {k: winner.settings[k] for k in PROBE_PIECES if k in winner.settings}
        if settings.get("probe_head") == "mlp":
            settings.pop("probe_c", None)  # the linear probe's strength it was built on: an MLP head has none
        return _candidate_config(search.cfg, settings, out, mode="linear-probe", **subsample)
    return _candidate_config(search.cfg, winner.settings, out, best_metric="last", **subsample)


def _refit(search: Search, winner: Candidate, final: TrainConfig, scan) -> dict:
    from .engine.fit import fit

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


def _write_search(search: Search, winner: Candidate, final: TrainConfig, metrics: dict) -> None:
    record = _save_search_record(search, winner, final, metrics)
    metrics["search"] = {k: record[k] for k in ("chosen", "reproduce", "wall_seconds", "train_subsample",
                                                 "all_images_seconds_estimate", "all_images_memory_bytes_estimate")}
    from .results.report import write_report

    write_report(final.out, announce=False)  # again, now with the Search section
    log.info("search: chose %s; reproduce without the search: %s", winner.name, record["reproduce"])
