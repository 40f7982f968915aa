"""Linear probes done right: pooled features of the last stages of a frozen backbone, standardized, and a
multinomial L2 logistic regression whose strength is chosen by k-fold cross-validation on training images.

`TapPooler` runs the backbone's stages (registry `stages`) once per image and returns, for each of the
top `taps` stage outputs, the channel means and the channel maxima, concatenated (Head2Toe, Evci et al.
2022, in its simplest form). Which columns a probe uses (how many stages, mean or mean+max) is a slice
of that one cached vector, so the search tries them all for one extraction.

`ProbeClassifier` is the deployed model: backbone stages → pooling → standardization → linear head, an
ordinary nn.Module (checkpoint, predict, evaluate, ONNX export, fine-tuning all take it as it is).

With `--probe-pixels` the probe also reads the image's raw pixels (`PixelBlock`: the channel mean at 32 × 32,
in the graph), for images much smaller than the network's input.

A multi-scale probe (`--probe-scales`) reads the image at the run's input size and, inside the graph, at
smaller sizes too (`Rescale`); one probe is fitted per scale and their logits are averaged, which is one
linear head over the concatenated features (`stack_fits`). Large images keep detail the network's own
input size throws away; the native size keeps the object scale the weights were trained at.

`--probe-head mlp` puts one hidden ReLU layer between the standardized features and the logits (`fit_mlp`):
the same features, a non-linear head, trained in seconds on the cached vectors; the search keeps it only
where it wins the same 3-fold CV as the linear probes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import logistic, signals
from ..threads import in_one_blas_thread
from .scores import cv_score

log = logging.getLogger(__name__)

# A class absent from a fit's images gets a bias this far below the lowest present one (fit_logistic): its
# probability is then e^-20 of the least likely class's, never predicted, and finite for ONNX and fine-tuning.
ABSENT_CLASS_MARGIN = 20.0
# fit_logistic's L-BFGS stop (gradient tolerance, scikit-learn's default) and an iteration cap that only a
# pathological fit reaches. A looser tol leaves weak-C fits unconverged, stopped early like a stronger penalty, so the
# grid's weak end is out of reach and a flat CV curve's tie follows the rounding. Nested CV on the training images
# only (benchmarks/probe_tolerance.py; RESULTS.md, notes of sessions 45-47): scikit-learn's solver at tol 1e-4 against
# 1e-3 +0.25 point on 10 feature sets of ELPV 2 classes and digits (-0.25 to +1.02) at 2.1x the CV's time, -0.20 on
# 4 of ELPV 4 classes (session 46). engine/logistic.py's preconditioned solver at the same tol (session 47), against
# scikit-learn's at 1e-4 on 13 sets of ELPV 2 and 4 classes and digits: +0.03 point (-0.25 to +0.30), the nested CV
# 1.6x as fast (median; 1.1-6.5x, 3.2x in all), its objective as close to the optimum; at tol 1e-5 +0.03 at 1.0x.
FIT_TOL, FIT_MAX_ITER = 1e-4, 3000
# The C sweep of cross_validate stops once this many C values in a row score below the best before them.
CV_PATIENCE = 2
# The probes' 3-fold CV runs once per this many training images, with other folds each time (fold seeds seed,
# seed + 1, ...), up to CV_MAX_REPEATS times, and pools the held-out answers: on few images the split alone moves
# a probe's CV by as much as candidates differ (244 ELPV cells, the search's probes: 0.6-1.6 points of standard
# deviation over five fold seeds; seed 0 alone ranked the eval crop 0.4 point above the whole frame, the five
# pooled put it 1.2 points below). Beyond ~1,000 images one split measures to about a point (benchmarks/RESULTS.md,
# notes of session 23).
CV_IMAGES_PER_SPLIT, CV_MAX_REPEATS = 1000, 5
# The CV fits a fold in the span of its training rows where they number at most this share of the features
# (in_row_space). One 3-fold CV over the C grid, ELPV cells' 4,048 features, 2-core EPYC, rows per fold: 163
# 0.31 s against 2.00 s on every feature, 326 0.58 / 2.32 s, 490 0.87 / 3.20 s, 653 1.18 / 2.35 s; but 816
# 4.84 / 2.57 s and 1,312 7.8 / 3.8 s (the basis costs more than it saves; benchmarks/RESULTS.md, session 23).
ROW_SPACE_SHARE = 1 / 8
# Where the strongest C of the grid scores best, cross_validate goes on to these multiples of it; where the weakest
# does, to these multiples of that. Converged fits reach the weak end: on digits' five feature sets the nested CV
# of benchmarks/probe_tolerance.py chose the grid's weakest C, 0.3, in 15 of 25 outer folds at tol 1e-6 and 8 at
# 1e-4; with this step, C 1 in 3 of those (session 46).
BELOW_THE_GRID = (0.3, 0.1, 0.03, 0.01)
ABOVE_THE_GRID = (10 / 3, 10, 100 / 3)
# --probe-head mlp: hidden width, epochs, batch, AdamW's peak rate (one-cycle) and decay, and the dropout on the
# input and on the hidden layer. One fixed recipe, no sweep (each fit costs seconds, not milliseconds). Measured by
# 3-fold CV on the training images only, on the ELPV cells' 4-view features (efficientnet_lite0, 6 stages, 4,048
# values; 2-core EPYC): the tuned logistic regression 0.8821 (2 classes) and 0.7962 (4 classes); this head at 15
# epochs 0.8821 and 0.8008 (25 s per CV); at 30 epochs the same within 0.4 point at twice the cost; at 10 epochs,
# or 128 units, 0.3-0.6 point lower on 2 classes.
MLP_HIDDEN, MLP_EPOCHS, MLP_BATCH = 256, 15, 256
MLP_LR, MLP_WEIGHT_DECAY, MLP_LABEL_SMOOTHING = 1e-3, 0.05, 0.1
MLP_DROPOUT = (0.2, 0.5)
# The MLP head reads its standardized inputs clipped to ±this many standard deviations. A feature nearly constant
# on the training images (a max-pooled channel that never fires there: std 1e-4) standardizes a new image's
# activation of 1 to 10,000, which a ReLU layer passes on unbounded (a test image's probability moved by 0.49
# from bf16 rounding of its cached features alone); a linear head's L2 penalty keeps such columns' weights
# small, an MLP's does not. Training rows are inside the bound by construction, save outliers.
MLP_INPUT_CLIP = 8.0


def _pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2:  # already pooled (the cache point of a backbone without stages)
        return x, x
    return x.mean((2, 3)), x.amax((2, 3))


class Rescale(nn.Module):
    """Resize a square image batch inside the graph: bicubic with antialiasing (as PIL resizes), written as
    two matrix products so every ONNX exporter and runtime takes it. The matrices follow from the sizes,
    so they are not saved with the weights."""

    def __init__(self, size_in: int, size_out: int):
        super().__init__()
        self.size_out = int(size_out)
        eye = torch.eye(size_in)[:, None, None, :]  # each input pixel's weight on each output pixel
        cols = nn.functional.interpolate(eye, size=(1, size_out), mode="bicubic", antialias=True,
                                         align_corners=False).reshape(size_in, size_out)
        self.register_buffer("cols", cols.contiguous(), persistent=False)
        self.register_buffer("rows", cols.t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


class ScaledPooler(nn.Module):
    """The TapPooler's vector of the input, then of the input at each smaller size, concatenated."""

    def __init__(self, pooler: "TapPooler", rescales: nn.ModuleList):
        super().__init__()
        self.pooler, self.rescales = pooler, rescales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pooler(x)] + [self.pooler(r(x)) for r in self.rescales], 1)


class PixelBlock(nn.Module):
    """The input's channel mean resized to `size` × `size` (antialiased bicubic, in the graph), flattened: the
    raw pixels as probe features. For images much smaller than the network's input (8 px digits, 25 px face
    crops, 28 px scans) the pixels are the whole signal, and ImageNet features of a 10-fold upsampled blur
    miss part of it: a linear probe over both beats either alone there (benchmarks/RESULTS.md)."""

    def __init__(self, input_size: int, size: int):
        super().__init__()
        self.resize = Rescale(input_size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(x.mean(1, keepdim=True)).flatten(1)


class WithPixels(nn.Module):
    """The pooled vector of `pooled`, then the PixelBlock's values, concatenated."""

    def __init__(self, pooled: nn.Module, pixels: PixelBlock):
        super().__init__()
        self.pooled, self.pixels = pooled, pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pooled(x), self.pixels(x)], 1)


class TapPooler(nn.Module):
    """Image batch → [mean(tap_1), max(tap_1), mean(tap_2), max(tap_2), ...] over the top `taps` stages."""

    def __init__(self, body: list[nn.Module], taps: int):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.taps = max(1, min(taps, len(body)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        first_tap = len(self.body) - self.taps
        for i, stage in enumerate(self.body):
            x = stage(x)
            if i >= first_tap:
                pooled += list(_pool(x))
        return torch.cat(pooled, 1)


def tap_body(model: nn.Module, spec) -> list[nn.Module]:
    """The modules whose outputs can be tapped, bottom to top: the registry's stages without the head
    stage; for a backbone without stages, the whole network up to its cache point as one stage."""
    if spec.stages is not None:
        return list(spec.stages(model))[:-1]
    from .runtime import FrozenPart

    return [FrozenPart(model, spec.cache_point)]


def tap_widths(pooler: TapPooler, example: torch.Tensor) -> list[int]:
    """Channels of each tap (same order as TapPooler's output), from one forward of a small example."""
    widths, first_tap = [], len(pooler.body) - pooler.taps
    x = example
    with torch.inference_mode():
        for i, stage in enumerate(pooler.body):
            x = stage(x)
            if i >= first_tap:
                widths.append(int(x.shape[1]))
    return widths


def feature_columns(widths: list[int], stages: int, pooling: str, pixels: int = 0) -> np.ndarray:
    """Columns of the TapPooler vector for the top `stages` taps and the pooling asked for; with `pixels`,
    also the PixelBlock's pixels × pixels values that follow the vector (WithPixels)."""
    cols, start = [], 0
    for i, w in enumerate(widths):
        if i >= len(widths) - stages:
            cols.append(np.arange(start, start + w))  # means
            if pooling == "meanmax":
                cols.append(np.arange(start + w, start + 2 * w))  # maxima
        start += 2 * w
    if pixels:
        cols.append(np.arange(start, start + pixels * pixels))
    return np.concatenate(cols)


# ---- fitting -----------------------------------------------------------------------------------


@dataclass
class ProbeFit:
    """A fitted probe: which columns, the standardization and the linear head (numpy, float32)."""

    columns: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (classes, features)
    bias: np.ndarray
    C: float | None  # the logistic regression's strength (None for an MLP head)
    hidden: tuple[np.ndarray, np.ndarray] | None = None  # an MLP head's hidden layer: weight (h, d), bias (h,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        z = (x[..., self.columns] - self.mean) / self.scale
        if self.hidden is not None:
            z = np.maximum(np.clip(z, -MLP_INPUT_CLIP, MLP_INPUT_CLIP) @ self.hidden[0].T + self.hidden[1], 0.0)
        return z @ self.weight.T + self.bias


def standardizer(x: np.ndarray, scale_floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and standard deviation; `scale_floor` raises deviations below that share of the
    median one to it, so a column that is nearly constant on these rows is not magnified (init_head_from_probe)."""
    mean = x.mean(0)
    scale = x.std(0)
    if scale_floor > 0:
        scale = np.maximum(scale, scale_floor * np.median(scale))
    return mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, warm=None, balanced: bool = False,
                 directions=None):
    """Multinomial L2 logistic regression (engine/logistic.py: scikit-learn's objective, preconditioned L-BFGS).
    x: standardized (n, d); warm: an earlier (weight, bias) of this function to start from; balanced: each class's
    rows weighted by the inverse of its count (--class-weights auto); directions: logistic.top_directions(x), where
    the caller fits the same rows again (the C grid of a CV fold), else found here. Returns (weight, bias) with one
    row per class of the run, also for a class absent from y (a CV fold or an inner split of a class with few
    images): a zero row whose bias is ABSENT_CLASS_MARGIN below the lowest, so it is never predicted and the head
    keeps the run's shape."""
    present, labels = np.unique(y, return_inverse=True)
    full_weight = np.zeros((n_classes, x.shape[1]), dtype=np.float32)
    if len(present) == 1:  # a CV fold of a folder with one or two images per class: nothing to separate
        full_bias = np.full(n_classes, -ABSENT_CLASS_MARGIN, dtype=np.float32)
        full_bias[present] = 0.0
        return full_weight, full_bias
    start = None
    if warm is not None:
        start = warm[0][present], warm[1][present]
        if len(present) == 2:  # the binomial form: one row, class 1's logit minus class 0's
            start = start[0][1:] - start[0][:1], start[1][1:] - start[1][:1]
    sample_weight = balanced_class_weights(y, n_classes)[y] if balanced else None
    weight, bias = logistic.solve(x, labels, C, len(present), sample_weight, start,
                                  logistic.top_directions(x) if directions is None else directions,
                                  tol=FIT_TOL, max_iter=FIT_MAX_ITER)
    if weight.shape[0] == 1:  # the binomial form, split evenly between the two classes
        weight = np.concatenate([-weight / 2, weight / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    full_bias = np.full(n_classes, bias.min() - ABSENT_CLASS_MARGIN, dtype=np.float32)
    full_weight[present], full_bias[present] = weight, bias
    return full_weight, full_bias


def _mlp_net(width: int, n_classes: int) -> nn.Sequential:
    """The head as trained: with dropout, which the deployed head (ProbeClassifier) leaves out."""
    return nn.Sequential(nn.Hardtanh(-MLP_INPUT_CLIP, MLP_INPUT_CLIP), nn.Dropout(MLP_DROPOUT[0]),
                         nn.Linear(width, MLP_HIDDEN), nn.ReLU(), nn.Dropout(MLP_DROPOUT[1]),
                         nn.Linear(MLP_HIDDEN, n_classes)).train()


def _mlp_step(net: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    loss = nn.functional.cross_entropy(net(x), y, weight=weight, label_smoothing=MLP_LABEL_SMOOTHING)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def mlp_step_seconds(width: int, n_classes: int) -> float:
    """Seconds of one MLP training step (a batch of MLP_BATCH rows of `width` features), timed on random data
    after a warm-up step: what the search plans an MLP head's fits with on this machine."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        net = _mlp_net(width, n_classes)
        optimizer = torch.optim.AdamW(net.parameters(), lr=MLP_LR)
        x, y = torch.randn(MLP_BATCH, width), torch.randint(0, n_classes, (MLP_BATCH,))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            _mlp_step(net, optimizer, x, y)
            times.append(time.perf_counter() - t)
    return min(times[1:])


# A fit's steps on real rows, with their gathers, the schedule and the scoring of its fold, took about this much
# longer than the same number of steps on random data (ELPV 4 classes, 2 views: 16 s against 12 planned).
MLP_FIT_OVERHEAD = 1.35


def mlp_fit_seconds(step_s: float, rows: int) -> float:
    """An MLP head's fit on `rows` rows, from the time of one step."""
    return step_s * -(-rows // MLP_BATCH) * MLP_EPOCHS * MLP_FIT_OVERHEAD


def fit_mlp(z: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, deadline: float | None = None,
            balanced: bool = False):
    """One hidden ReLU layer on standardized rows z (n, d), trained with AdamW on a one-cycle schedule (the
    MLP_* constants); balanced: the loss weighs classes by the inverse of their counts. Returns ((hidden weight,
    hidden bias), (weight, bias)) as float32 numpy arrays, or None as soon as its projected end passes `deadline`
    (perf_counter seconds). Seeded, and the caller's random state is left alone."""
    x, labels = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)), torch.from_numpy(y).long()
    weight = torch.from_numpy(balanced_class_weights(y, n_classes)) if balanced else None
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        net = _mlp_net(x.shape[1], n_classes)
        optimizer = torch.optim.AdamW(net.parameters(), lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
        steps = -(-len(x) // MLP_BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, MLP_LR, total_steps=MLP_EPOCHS * steps)
        for epoch in range(1, MLP_EPOCHS + 1):
            for batch in torch.randperm(len(x)).split(MLP_BATCH):
                _mlp_step(net, optimizer, x[batch], labels[batch], weight)
                schedule.step()
            signals.check_stop("the MLP head's training")
            now = time.perf_counter()
            if deadline is not None and now + (now - start) / epoch * (MLP_EPOCHS - epoch) > deadline:
                return None
    first, last = net[2], net[5]
    return ((first.weight.detach().numpy().copy(), first.bias.detach().numpy().copy()),
            (last.weight.detach().numpy().copy(), last.bias.detach().numpy().copy()))


@in_one_blas_thread
def fit_probe(x: np.ndarray, y: np.ndarray, columns: np.ndarray, C: float | None, n_classes: int,
              head: str = "linear", seed: int = 0, deadline: float | None = None,
              scale_floor: float = 0.0, balanced: bool = False) -> ProbeFit | None:
    """x: (n, views, d) training features; every view of an image is a training row. head: linear (the
    logistic regression at strength C) or mlp (fit_mlp; None where it passed `deadline`). scale_floor: as
    standardizer's; balanced: classes weighted by the inverse of their counts (--class-weights auto)."""
    rows = np.take(x, columns, axis=2).reshape(-1, len(columns))  # a copy, in row order: standardized in place
    labels = np.repeat(y, x.shape[1])
    mean, scale = standardizer(rows, scale_floor)
    rows -= mean  # in place: the fit peaks at ~3.5 times the features, not ~4.4 (search/costs.py FIT_MEMORY_COPIES)
    rows /= scale
    if head == "mlp":
        layers = fit_mlp(rows, labels, n_classes, seed, deadline, balanced)
        return None if layers is None else ProbeFit(columns, mean, scale, *layers[1], None, hidden=layers[0])
    weight, bias = fit_logistic(rows, labels, C, n_classes, balanced=balanced)
    return ProbeFit(columns, mean, scale, weight, bias, C)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (classes present × count) per class, as scikit-learn's class_weight="balanced" (0 for an absent one):
    --class-weights auto, for the loss of the modes that train in epochs and for a probe's MLP head alike."""
    counts = np.bincount(y, minlength=n_classes)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def stack_fits(fits: list[ProbeFit], width: int) -> ProbeFit:
    """One probe whose logits are the mean of `fits`' logits, each fit reading its own scale's block of a
    concatenated vector (blocks of `width` columns, in the order of `fits`). Linear heads only (config
    validation refuses --probe-head mlp with --probe-scale)."""
    return ProbeFit(
        columns=np.concatenate([f.columns + i * width for i, f in enumerate(fits)]),
        mean=np.concatenate([f.mean for f in fits]),
        scale=np.concatenate([f.scale for f in fits]),
        weight=np.concatenate([f.weight for f in fits], 1) / len(fits),
        bias=np.mean([f.bias for f in fits], 0).astype(np.float32),
        C=fits[0].C,
    )


def predict_proba(fit: ProbeFit, x: np.ndarray) -> np.ndarray:
    """x: (n, views, d) → class probabilities of the logits averaged over the views (test-time
    augmentation, as ProbeClassifier does it)."""
    logits = fit.logits(x).mean(1)
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


@dataclass
class CVResult:
    C: float
    score: float  # in the CV's metric (cv_score)
    per_C: dict = field(default_factory=dict)


@in_one_blas_thread
def cross_validate(x: np.ndarray, y: np.ndarray, columns: np.ndarray, n_classes: int, grid: list[float],
                   folds: int = 3, seed: int = 0, deadline: float | None = None, scale_floor: float = 0.0,
                   balanced: bool = False, metric: str = "accuracy") -> CVResult:
    """Stratified k-fold score (`metric`: cv_score) of the probe for each C of the grid (and below it, where its
    strongest C wins), repeated on few images (cv_splits; all views of an image stay in one fold; held-out images
    are scored on the average over their views). Stops early past `deadline`. balanced: the fits weigh classes
    by the inverse of their counts (--class-weights auto; TrainConfig.selection_metric then scores the balanced
    accuracy that weighting aims at: chosen by plain accuracy, a weighted probe drifts to the strength that
    undoes its weights)."""
    splits = cv_splits(y, folds, seed)
    prepared = []
    for train_idx, test_idx in splits:
        # copies (np.take keeps row order, which the solver's blocks of rows read): standardized
        rows = np.take(x[train_idx], columns, axis=2).reshape(-1, len(columns))
        test = x[test_idx][:, :, columns]  # in place, as fit_probe does
        mean, scale = standardizer(rows, scale_floor)
        for part in (rows, test):
            part -= mean
            part /= scale
        xtr, xte = in_row_space(rows, test)
        # the fold's preconditioner, found once for every C
        prepared.append((xtr, np.repeat(y[train_idx], x.shape[1]), xte, y[test_idx], logistic.top_directions(xtr)))
    per_C, warm = {}, [None] * len(splits)

    def score(C: float) -> None:
        pred = []
        for f, (xtr, ytr, xte, yte, directions) in enumerate(prepared):
            warm[f] = fit_logistic(xtr, ytr, C, n_classes, warm=warm[f], balanced=balanced, directions=directions)
            logits = xte @ warm[f][0].T + warm[f][1]
            pred.append(logits.mean(1).argmax(-1))
        per_C[C] = cv_score(np.concatenate(pred), np.concatenate([yte for *_, yte, _ in prepared]), metric, n_classes)
        signals.check_stop("the probe's cross-validation")  # Ctrl-C: a large CV takes tens of seconds

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    grid = sorted(grid)
    for C in grid:  # strong to weak regularization, each fold warm-started from the last C
        score(C)
        if late() or _past_the_peak(list(per_C.values())) or per_C[C] == 1.0:
            break  # (every image right: a weaker C can only tie, and ties go to the stronger one)
    best = max(per_C, key=lambda c: (per_C[c], -c))  # ties: the stronger regularization
    # An end of the grid scored best: the peak may lie beyond it (below: few images and many features; above: many
    # images or classes that separate cleanly), so go on past that end in the grid's 1-3 steps while each step
    # scores strictly better. Each step's folds start from the last C's fits.
    for C in _beyond_the_grid(grid, best) if per_C[best] < 1.0 else []:
        if late():
            break
        score(C)
        if per_C[C] <= per_C[best]:
            break
        best = C
    return CVResult(best, per_C[best], per_C)


def _beyond_the_grid(grid: list[float], best: float) -> list[float]:
    """The C values cross_validate goes on to where `best` is an end of the sorted grid (none otherwise)."""
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return []
    end, steps = (grid[0], BELOW_THE_GRID) if best == grid[0] else (grid[-1], ABOVE_THE_GRID)
    return [float(f"{end * f:.1g}") for f in steps]


def in_row_space(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides of a fold in an orthonormal basis of the span of its training rows, where they are few against
    the features (ROW_SPACE_SHARE): an L2-penalized linear model's weights lie in that span (a part outside it
    leaves every training logit alone and only adds to the penalty), so the fit there is the same model on a
    fraction of the columns (244 images, one view, 4,048 features: 163)."""
    if xtr.shape[0] > xtr.shape[1] * ROW_SPACE_SHARE:
        return xtr, xte
    basis, _ = np.linalg.qr(xtr.T)  # (features, rows)
    return xtr @ basis, xte @ basis


def _past_the_peak(scores: list[float]) -> bool:
    """Whether the C sweep's last CV_PATIENCE scores all fell below the best one before them: the accuracy
    against C rises to one peak and falls as the regularization weakens, and the weakest C values, still
    ahead, are the slowest fits (L-BFGS needs more iterations as the penalty shrinks)."""
    if len(scores) <= CV_PATIENCE:
        return False
    return max(scores[-CV_PATIENCE:]) < max(scores[:-CV_PATIENCE])


@in_one_blas_thread
def cross_validate_stacked(xs: list[np.ndarray], y: np.ndarray, columns: np.ndarray, Cs: list[float],
                           n_classes: int, folds: int = 3, seed: int = 0, balanced: bool = False,
                           metric: str = "accuracy") -> float:
    """Stratified k-fold score of the multi-scale probe: per fold, one probe per scale (features xs[i],
    strength Cs[i]) and their logits averaged; same folds and metric as cross_validate."""
    return _fold_score(y, folds, seed, lambda train, test: sum(
        fit_probe(x[train], y[train], columns, C, n_classes, balanced=balanced).logits(x[test])
        for x, C in zip(xs, Cs)), metric, n_classes)


def cross_validate_mlp(x: np.ndarray, y: np.ndarray, columns: np.ndarray, n_classes: int, folds: int = 3,
                       seed: int = 0, deadline: float | None = None, balanced: bool = False,
                       metric: str = "accuracy") -> float | None:
    """Stratified k-fold score of the MLP head on the same folds and metric as cross_validate; None where a
    fold's fit passed `deadline`."""
    def logits(train, test):
        fit = fit_probe(x[train], y[train], columns, None, n_classes, head="mlp", seed=seed, deadline=deadline,
                        balanced=balanced)
        if fit is None:
            raise _PastDeadline
        return fit.logits(x[test])

    try:
        return _fold_score(y, folds, seed, logits, metric, n_classes)
    except _PastDeadline:
        return None


class _PastDeadline(Exception):
    pass


def _fold_score(y: np.ndarray, folds: int, seed: int, logits_of, metric: str, n_classes: int) -> float:
    """cv_score over cv_splits' folds: logits_of(train indices, test indices) → (n_test, views, classes) logits
    of a model fitted on the train fold, averaged over the views."""
    splits = cv_splits(y, folds, seed)
    pred = [logits_of(train_idx, test_idx).mean(1).argmax(-1) for train_idx, test_idx in splits]
    return cv_score(np.concatenate(pred), np.concatenate([y[test_idx] for _, test_idx in splits]), metric, n_classes)


def cv_repeats(n_images: int) -> int:
    """How many times the probes' k-fold CV runs on this many images (see CV_IMAGES_PER_SPLIT)."""
    return max(1, min(CV_MAX_REPEATS, round(CV_IMAGES_PER_SPLIT / max(n_images, 1))))


def cv_splits(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) index pairs of cv_repeats(len(y)) stratified k-fold splits, fold seeds seed, seed + 1, …:
    every image is held out once per repeat."""
    return [split for r in range(cv_repeats(len(y))) for split in stratified_folds(y, folds, seed + r)]


def fold_count(y: np.ndarray, folds: int = 3) -> int:
    """The k of the stratified k-fold CV on labels y: `folds`, or fewer where no class has that many images."""
    return max(2, min(folds, int(np.bincount(y).max())))


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedKFold's (train, test) index pairs. A class with fewer images than folds is absent from
    some test folds; sklearn warns about it on every call (dozens of lines in one search), but the folds
    are still the right ones, so its warning is not passed on. Where every class has fewer images than
    folds (two images a class; 1,000 classes, the first 750 images a budget paid for), StratifiedKFold refuses:
    as many stratified folds as the largest class has images then, and where that is one image, shuffled plain
    folds, as many as there are images where that is fewer."""
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    if np.bincount(y).max() < 2:
        return list(KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(np.zeros(len(y))))
    folds = fold_count(y, folds)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


# ---- the deployed model ------------------------------------------------------------------------


class ProbeClassifier(nn.Module):
    """Backbone stages → pooled taps → the probe's columns → standardize → linear head; optionally the
    mean of the logits over dihedral views of the input (the probe's test-time augmentation)."""

    def __init__(self, pooler: TapPooler, n_features: int, n_classes: int, views=(0,), input_size: int = 0,
                 scales=(), pixels: int = 0, hidden: int = 0):
        super().__init__()
        self.pooler = pooler
        self.rescales = nn.ModuleList(Rescale(input_size, s) for s in scales)  # smaller sizes, in the graph
        self.pixels = PixelBlock(input_size, pixels) if pixels else None  # raw pixels after the pooled taps
        self.register_buffer("columns", torch.arange(n_features))  # which pooled values the probe reads
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))
        # --probe-head mlp: hidden ReLU units between the standardized features and the logits
        self.head = (nn.Sequential(nn.Hardtanh(-MLP_INPUT_CLIP, MLP_INPUT_CLIP), nn.Linear(n_features, hidden),
                                   nn.ReLU(), nn.Linear(hidden, n_classes)) if hidden
                     else nn.Linear(n_features, n_classes))
        self.views = tuple(int(v) for v in views)

    def load_fit(self, fit: ProbeFit) -> "ProbeClassifier":
        with torch.no_grad():
            self.columns.copy_(torch.as_tensor(fit.columns))
            self.feature_mean.copy_(torch.as_tensor(fit.mean))
            self.feature_scale.copy_(torch.as_tensor(fit.scale))
            layers = [self.head] if fit.hidden is None else [self.head[1], self.head[3]]
            pairs = [(fit.weight, fit.bias)] if fit.hidden is None else [fit.hidden, (fit.weight, fit.bias)]
            for layer, (weight, bias) in zip(layers, pairs):
                layer.weight.copy_(torch.as_tensor(weight))
                layer.bias.copy_(torch.as_tensor(bias))
        return self

    def pooled(self) -> nn.Module:
        """Image batch → the pooled vector the probe's columns index (every scale's, then the pixels)."""
        pooled = ScaledPooler(self.pooler, self.rescales) if len(self.rescales) else self.pooler
        return WithPixels(pooled, self.pixels) if self.pixels is not None else pooled

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardized(self.pooled()(x))

    def standardized(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled vector (as cached by the feature store) → the head's input: the probe's columns,
        standardized."""
        return (pooled.index_select(1, self.columns) - self.feature_mean) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..data.transforms import dihedral

        if len(self.views) == 1 and self.views[0] == 0:
            return self.head(self.features(x))
        logits = [self.head(self.features(dihedral(x, k))) for k in self.views]
        return torch.stack(logits).mean(0)


def rebuild_probe(model: nn.Module, spec, probe: dict, n_classes: int) -> ProbeClassifier:
    """The ProbeClassifier a checkpoint's `probe` metadata describes, around a freshly built backbone."""
    pooler = TapPooler(tap_body(model, spec), int(probe["taps"]))
    return ProbeClassifier(pooler, int(probe["n_features"]), n_classes, probe.get("views", (0,)),
                           int(probe.get("input_size", 0)), [int(s) for s in probe.get("scales", ())],
                           int(probe.get("pixels", 0)), int(probe.get("hidden", 0)))
