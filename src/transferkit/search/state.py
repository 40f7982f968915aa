"""What every step of the recipe search shares: a candidate and its record, the search (its budget, its
measured rates, its candidates), and the context of one backbone over the training images."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..engine import signals
from ..engine.scores import cv_score, metric_words

log = logging.getLogger(__name__)


FIXED_OVERHEAD_S = 8.0  # the final run's model build, checkpoint, figures and report (measured: 4-7 s)
INNER_FRACTION = 0.2  # share of the training images held out to score fine-tuning candidates
FT_EPOCHS = (2, 8)  # fewest worth trying, most worth paying for
PARTIAL_VIEWS = {"random": 4, "dihedral": 8}  # cached views per image for partial fine-tuning, by view kind
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
    # probes: the score on the fine-tuning candidates' inner hold-out; only the probe they are judged against has
    # one (probes.answer_hold_out)
    holdout: float | None = None
    # Its answer (a class index) for each inner hold-out image: fine-tuning is compared with the probe image by
    # image (finetuning.not_clearly_better). Not recorded in search.json.
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
    # The estimated seconds of the chosen probe's run on every training image, where the budget fitted it on fewer,
    # and the memory that run needs, where the memory held fewer (final_run.grown_scan)
    all_images_s: float | None = None
    all_images_bytes: int | None = None

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


@dataclass
class Context:
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
        from ..engine.features import default_workers

        return default_workers(accelerator=self.device.type != "cpu")

    @classmethod
    def build(cls, cfg, scan):
        from ..data.folders import subsample_order
        from ..engine.environment import pick_device
        from ..engine.fit import set_seed
        from ..models.registry import get_spec

        set_seed(cfg.seed)
        spec, device = get_spec(cfg.model), pick_device(cfg.device)
        y = np.array([label for _, label in scan.train])
        order = subsample_order(y, cfg.seed)  # extraction order: any prefix is a seeded stratified subsample
        short = _median_shorter_side([scan.train[i][0] for i in order[:32]])
        ctx = cls(cfg, scan, spec, None, device, y, inner_split(y, cfg.seed), order, short)
        ctx.model = ctx._build_model()
        return ctx

    def _build_model(self):
        import torch

        from ..models.adapt import build_model

        cfg = self.cfg
        model = build_model(self.spec, len(self.scan.classes), pretrained=cfg.pretrained, weights_path=cfg.weights)
        model.eval().to(self.device)
        if self.device.type == "cpu" and cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def sibling(self, spec, cost: float) -> "Context":
        """Another backbone over the same training images (subsample, order and inner split included), its
        network built when its first features are asked for."""
        cfg = copy.deepcopy(self.cfg)
        cfg.model = spec.name
        return Context(cfg, self.scan, spec, None, self.device, self.y, self.inner, self.order, self.shorter_side,
                        cost=cost, sibling_of_first=True)

    @property
    def small_images(self) -> bool:
        """Small enough (PIXELS_MAX_SHARE of the input) that the probes' CV also tries their raw pixels."""
        return 0 < self.shorter_side <= self.pre(None).input_size * PIXELS_MAX_SHARE

    def pre(self, crop, size=None):  # noqa: D102
        return self.spec.preprocessing.at_size(size or self.cfg.image_size, crop).reading(self.cfg.sixteen_bit_white)

    def taps_for(self, crop, size=None):
        from ..engine.probe_train import make_taps

        if self.model is None:
            self.model = self._build_model()
        if (crop, size) not in self.taps:
            like = next(iter(self.taps.values()), None)  # same network and size: one runtime for every crop
            taps = make_taps(self.model, self.spec, self.cfg, self.pre(crop, size), self.device, like)
            if (like is None and self.sibling_of_first) or (like is not None and taps.engine is not like.engine):
                # a new runtime (another size, or another backbone's first) is chosen, exported and checked on
                # its first batch: not in the timed chunks (the first backbone's is timed by costs.measure_rate)
                taps.features([p for p, _ in self.scan.train[:8]], (0,), self.scan.digests, desc="warm-up")
            self.taps[crop, size] = taps
        return self.taps[crop, size]


def inner_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of inner-train and the inner hold-out (stratified where every class can give one)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts.min() >= 2 and len(y) * INNER_FRACTION >= len(counts) else None
    inner = train_test_split(np.arange(len(y)), test_size=INNER_FRACTION, random_state=seed, stratify=stratify)
    return np.sort(inner[0]), np.sort(inner[1])


def _median_shorter_side(paths: list[str]) -> int:
    from PIL import Image

    from ..data.images import quiet_pillow

    sides = []
    for path in paths:
        try:
            with quiet_pillow(), Image.open(path) as image:  # reads the header only (Pillow's warnings kept quiet)
                sides.append(min(image.size))
        except OSError:
            continue
    return int(np.median(sides)) if sides else 0


def better(best: Candidate | None, cand: Candidate | None) -> Candidate:
    if cand is None or cand.score is None:
        return best
    return cand if best is None or cand.score > best.score else best


def cv_name(search: Search) -> str:
    """What the probes' CV scores (search.metric)."""
    return f"CV {metric_words(search.metric)}"


def one_image_a_class(ctx: Context) -> bool:
    """Every class has a single training image: each CV fold (and an inner hold-out) then scores images whose
    class its training part lacks, so every candidate scores 0 and no comparison says anything (the probes stop
    at the first, and nothing fine-tunes)."""
    return int(np.bincount(ctx.y).max()) < 2


def answered(search: Search, ctx: Context, cand: Candidate, pred: np.ndarray) -> None:
    """A probe's predictions for the inner hold-out images, scored in the search's metric."""
    cand.answered(pred, ctx.y[ctx.inner[1]], search.metric, len(ctx.scan.classes))


def probe_text(s: dict) -> str:
    pixels = " and the raw pixels" if s.get("probe_pixels") else ""
    return f"{s['probe_pooling']} pooling of {s['probe_stages']} stages{pixels}, C={s['probe_c']:g}"


def candidate_config(base: TrainConfig, settings: dict, out: Path, **extra) -> TrainConfig:
    cfg = copy.deepcopy(base)
    known = {f.name for f in fields(TrainConfig)}
    for key, value in {**settings, **extra}.items():
        if key in known:
            setattr(cfg, key, value)
    cfg.recipe, cfg.out = "tutorial", str(out)
    return cfg
