"""Training runs built on linear probes: `--mode linear-probe` (the probe is the model) and
`--head-init probe` (LP-FT: fine-tuning starts from the probe's head instead of a random one).

The tapped features come from engine/probe.py's TapPooler through the feature cache, so the recipe
search, a reproduced run and an LP-FT run on the same images and preprocessing share one extraction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError, UsageError
from ..preprocessing import Preprocessing
from .features import FeatureStore, View, cached_features, store_for
from .probe import (PixelBlock, ProbeClassifier, ProbeFit, Rescale, ScaledPooler, TapPooler, cross_validate,
                    feature_columns, fit_probe, predict_proba, stack_fits, tap_body, tap_widths)
from .runtime import FrozenEngine
from .scores import metric_words

log = logging.getLogger(__name__)

# Inverse L2 strengths swept by 3-fold CV (features are standardized, so one grid serves every backbone).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
# Dihedral view indices (data/transforms.dihedral): 1 turns by 90°, 4 is the horizontal mirror.
# turns: the image and its mirror, each also turned by 90°.
PROBE_VIEWS = {"none": (0,), "flip": (0, 4), "turns": (0, 4, 1, 5), "dihedral": tuple(range(8))}
# --probe-pixels: the side of the grey pixel block (engine/probe.py PixelBlock), the raw-pixel baselines' 32×32
PROBE_PIXELS = 32


@dataclass
class Taps:
    """The tapped-feature extractor of one run: pooler, runtime, cache and the width of each tap."""

    pooler: TapPooler
    engine: FrozenEngine
    store: FeatureStore
    widths: list[int]
    pre: Preprocessing
    scale: int | None = None  # the input is also read at this size, inside the graph (a second block)

    def features(self, paths: list[str], views, digests=None, workers: int = 0, desc: str = "features"):
        """(n_ok, len(views), d) float32 numpy array, the ok mask per path, and the cache stats."""
        x, ok, stats = cached_features(self.engine, self.store, paths, [View(v) for v in views], self.pre,
                                       workers=workers, desc=desc, digests=digests)
        return (None if x is None else x.float().numpy()), ok, stats

    def columns(self, stages: int | None, pooling: str, pixels: bool = False) -> np.ndarray:
        """The probe's columns of this vector; with `pixels`, also those of the pixel block appended after it
        (engine/probe.py WithPixels)."""
        return feature_columns(self.widths, min(stages or len(self.widths), len(self.widths)), pooling,
                               PROBE_PIXELS if pixels else 0)


def make_taps(model, spec, cfg, pre: Preprocessing, device, like: Taps | None = None,
              scale: int | None = None) -> Taps:
    """The taps of `model` under preprocessing `pre`. `like`: taps of the same model at the same input size
    under another crop, whose runtime (chosen, exported and checked once) is shared. `scale`: the vector
    is the taps of the input and of the input resized to `scale` inside the graph, as the deployed
    multi-scale probe computes them."""
    from .sources import feature_identity

    shared = like is not None and like.pre.input_size == pre.input_size and like.scale == scale
    pooler = like.pooler if shared else TapPooler(tap_body(model, spec), spec.probe_taps).eval()
    identity = feature_identity(spec, pre.to_dict(), cfg.weights, cfg.pretrained, cfg.seed)
    point = f"taps{pooler.taps}-meanmax" + (f"-and-{scale}px" if scale else "")
    store = store_for({**identity, "point": point})
    if shared:
        return Taps(pooler, like.engine, store, like.widths, pre, scale)
    widths = tap_widths(pooler, torch.zeros(1, 3, pre.input_size, pre.input_size, device=device))
    extractor = ScaledPooler(pooler, torch.nn.ModuleList([Rescale(pre.input_size, scale)])) if scale else pooler
    engine = FrozenEngine(extractor.to(device), device, cfg.engine, store.onnx_path, cfg.channels_last,
                          precision=cfg.precision)
    return Taps(pooler, engine, store, widths, pre, scale)


def make_pixel_taps(spec, cfg, pre: Preprocessing, device) -> Taps:
    """The pixel block (--probe-pixels) as a vector of its own, cached like the taps: two small matrix products
    per image, in torch fp32 as the deployed graph computes them (no engine to choose)."""
    from .sources import feature_identity

    identity = feature_identity(spec, pre.to_dict(), cfg.weights, cfg.pretrained, cfg.seed)
    store = store_for({**identity, "point": f"pixels{PROBE_PIXELS}"})
    block = PixelBlock(pre.input_size, PROBE_PIXELS).to(device)
    engine = FrozenEngine(block, device, "torch", None, channels_last=False, precision="fp32")
    return Taps(None, engine, store, [], pre)


def probe_model(taps: Taps, fit: ProbeFit, n_classes: int, views, pixels: bool = False) -> ProbeClassifier:
    scales = [taps.scale] if taps.scale else []
    return ProbeClassifier(taps.pooler, len(fit.columns), n_classes, views, taps.pre.input_size, scales,
                           PROBE_PIXELS if pixels else 0, _hidden_width(fit)).load_fit(fit)


def _hidden_width(fit: ProbeFit) -> int:
    return 0 if fit.hidden is None else int(fit.hidden[0].shape[0])


def probe_meta(taps: Taps, fit: ProbeFit, views, pixels: bool = False) -> dict:
    """What load_checkpoint needs to rebuild the probe (engine/checkpoint.py)."""
    meta = {"taps": taps.pooler.taps, "n_features": int(len(fit.columns)), "views": list(views), "C": fit.C}
    if taps.scale or pixels:  # the sizes the in-graph resizes are built for
        meta["input_size"] = taps.pre.input_size
    if taps.scale:
        meta["scales"] = [taps.scale]
    if pixels:
        meta["pixels"] = PROBE_PIXELS
    if fit.hidden is not None:
        meta["hidden"] = _hidden_width(fit)
    return meta


def choose_and_fit(x: np.ndarray, y: np.ndarray, columns: np.ndarray, n_classes: int, C: float | None,
                   seed: int = 0, head: str = "linear", scale_floor: float = 0.0,
                   balanced: bool = False, metric: str = "accuracy") -> tuple[ProbeFit, dict]:
    """The probe on all of x; C from 3-fold CV on x when not given (a linear head), by `metric`
    (TrainConfig.selection_metric). Returns the fit and the CV record. An MLP head (--probe-head mlp) has no
    strength to choose: its one recipe is fitted as it is. scale_floor: the standardization's
    (probe.standardizer), in the CV and the fit alike; balanced: classes weighted by the inverse of their counts
    (--class-weights auto), in the CV and the fit alike."""
    if head == "mlp":
        return (fit_probe(x, y, columns, None, n_classes, head="mlp", seed=seed, balanced=balanced),
                {"head": "mlp"})
    cv = None
    if C is None:
        if np.bincount(y).min() < 3:
            C, cv = 0.1, None  # too few images per class for 3 folds: a moderate default
        else:
            cv = cross_validate(x, y, columns, n_classes, list(C_GRID), seed=seed, scale_floor=scale_floor,
                                balanced=balanced, metric=metric)
            C = cv.C
    record = {"C": C, "cv_metric": metric, "cv_score": cv.score if cv else None, "cv_per_C": cv.per_C if cv else None}
    return fit_probe(x, y, columns, C, n_classes, scale_floor=scale_floor, balanced=balanced), record


# ---- --mode linear-probe ------------------------------------------------------------------------


def train_linear_probe(state) -> dict:
    """Fit the configured probe on the train split, score it once on val. Returns a record with the
    model, the val predictions and timings, for fit.py to write as a run."""
    cfg, scan = state.cfg, state.scan
    views = PROBE_VIEWS[cfg.probe_views]
    taps = make_taps(state.model, state.spec, cfg, state.pre, state.device)
    t0 = time.perf_counter()
    xtr, ok_tr, s1 = taps.features([p for p, _ in scan.train], views, scan.digests, desc="train features")
    if cfg.probe_scale:  # the second scale's training features, and val through the deployed graph
        small, both = _scale_taps(state, taps)
        xtr, ok_tr = _with_block(xtr, ok_tr, *small.features([p for p, _ in scan.train], views, scan.digests,
                                                                desc="train features, second scale")[:2])
        taps = both
    xva, ok_va, s2 = taps.features([p for p, _ in scan.val], views, scan.digests, desc="val features")
    if cfg.probe_pixels:  # the pixel block of the same images, after their taps (the deployed WithPixels)
        pixels = make_pixel_taps(state.spec, cfg, state.pre, state.device)
        xtr, ok_tr = _with_block(xtr, ok_tr, *pixels.features([p for p, _ in scan.train], views, scan.digests,
                                                                desc="train pixels")[:2])
        xva, ok_va = _with_block(xva, ok_va, *pixels.features([p for p, _ in scan.val], views, scan.digests,
                                                                desc="val pixels")[:2])
    if xtr is None or xva is None:
        raise DataError("no image could be read during feature extraction")
    ytr = np.array([y for (_, y), ok in zip(scan.train, ok_tr) if ok])
    yva = np.array([y for (_, y), ok in zip(scan.val, ok_va) if ok])
    extract_s = time.perf_counter() - t0
    fit, record = _fit_scales(cfg, taps, xtr, ytr, len(scan.classes))
    p_train, p_val = predict_proba(fit, xtr), predict_proba(fit, xva)
    standardized = [(x[:, 0, fit.columns] - fit.mean) / fit.scale for x in (xtr, xva)]  # what the head reads
    return {
        "head_inputs": tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in standardized),
        "model": probe_model(taps, fit, len(scan.classes), views, cfg.probe_pixels),
        "meta": probe_meta(taps, fit, views, cfg.probe_pixels),
        "train": (p_train, ytr), "val": (p_val, yva),
        "val_items": [it for it, ok in zip(scan.val, ok_va) if ok],
        "skipped": ok_tr.count(False) + ok_va.count(False),
        "record": {**record, "features": int(len(fit.columns)), "views": list(views), "extract_seconds": extract_s,
                   "cache": {"train": s1, "val": s2}, **taps.engine.info},
    }


def _scale_taps(state, taps: Taps) -> tuple[Taps, Taps]:
    """For --probe-scale: the taps at the smaller size (training features, PIL-resized like every other
    extraction, shared with the search's cache), and the two-scale taps of the deployed graph (val)."""
    scale, size = state.cfg.probe_scale, state.pre.input_size
    if scale >= size:
        raise UsageError(f"--probe-scale {scale} must be smaller than the input size {size} (--image-size)")
    pre = state.pre.at_size(scale)  # as the search's probes were made (its crop, its 16-bit white)
    small = make_taps(state.model, state.spec, state.cfg, pre, state.device, like=taps)
    both = make_taps(state.model, state.spec, state.cfg, state.pre, state.device, like=taps, scale=scale)
    return small, both


def _with_block(x, ok, x2, ok2):
    """Features of the images read at both scales: the second scale's block appended to each row."""
    if x is None or x2 is None:
        return None, [False] * len(ok)
    both = [a and b for a, b in zip(ok, ok2)]
    keep1 = [b for a, b in zip(ok, both) if a]
    keep2 = [b for a, b in zip(ok2, both) if a]
    return np.concatenate([x[keep1], x2[keep2]], 2), both


def _fit_scales(cfg, taps: Taps, x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[ProbeFit, dict]:
    """The probe, or with --probe-scale one probe per scale stacked into one head (logits averaged)."""
    columns = taps.columns(cfg.probe_stages, cfg.probe_pooling, cfg.probe_pixels)
    weighting = {"balanced": cfg.balanced_classes, "metric": cfg.selection_metric}
    if not cfg.probe_scale:
        return choose_and_fit(x, y, columns, n_classes, cfg.probe_c, cfg.seed, cfg.probe_head, **weighting)
    width = x.shape[2] // 2
    fit1, rec1 = choose_and_fit(x[:, :, :width], y, columns, n_classes, cfg.probe_c, cfg.seed, **weighting)
    fit2, rec2 = choose_and_fit(x[:, :, width:], y, columns, n_classes, cfg.probe_scale_c, cfg.seed, **weighting)
    return stack_fits([fit1, fit2], width), {**rec1, "scale": cfg.probe_scale, "scale_probe": rec2}


# ---- --head-init probe (LP-FT) ------------------------------------------------------------------

# The head's probe is fitted on the clean view, but fine-tuning feeds it augmented views (crops, flips, turns),
# where a channel that is all but silent on the clean view (a tenth of efficientnet_lite0's 1,280 on ELPV cells,
# standard deviation under a twelfth of the median) fires a little. Standardized by its own tiny deviation and
# folded into the head, that is tens of standard deviations and a huge logit: on the seed-sized ELPV subset
# the head that scores 0.85 on val started `--mode partial --augment light` at a train loss of 11.2 (at a
# learning rate of 1e-9, so the head as fitted), and the first steps followed that gradient. Deviations floored
# at a tenth of the median one: 0.56 and the same val score; on all of ELPV the partial candidate's first epoch
# ended at a train loss of 0.56 against 0.92 (benchmarks/RESULTS.md, notes of session 32). The linear probe
# itself is scored on the views it is fitted on and keeps the plain standardization (a floor did not move its CV).
HEAD_INIT_SCALE_FLOOR = 0.1


def init_head_from_probe(state) -> dict:
    """Set the model's head to a linear probe on the features it receives (the top stage's channel means,
    which is what the head sees after global pooling), fitted on the train split with C chosen by 3-fold
    CV; standardization is folded into the head's weights. Fine-tuning then starts from a head that
    already fits, so early gradients do not wreck the pretrained features (LP-FT)."""
    cfg, spec, scan = state.cfg, state.spec, state.scan
    head = state.model.get_submodule(spec.head)
    if spec.stages is None or not isinstance(head, torch.nn.Linear):
        raise UsageError(f"--head-init probe needs a backbone with stages and a linear head; {spec.name} has not")
    taps = make_taps(state.model, spec, cfg, state.pre, state.device)
    x, ok, _ = taps.features([p for p, _ in scan.train], (0,), scan.digests, desc="probe features")
    if x is None:
        raise DataError("no image could be read during feature extraction")
    y = np.array([lab for (_, lab), good in zip(scan.train, ok) if good])
    fit, record = choose_and_fit(x, y, taps.columns(1, "mean"), len(scan.classes), cfg.probe_c, cfg.seed,
                                 scale_floor=HEAD_INIT_SCALE_FLOOR, balanced=cfg.balanced_classes,
                                 metric=cfg.selection_metric)
    weight = fit.weight / fit.scale  # logits = W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight))
        head.bias.copy_(torch.as_tensor(fit.bias - weight @ fit.mean))
    log.info("head initialised from a linear probe (C=%g, 3-fold CV %s %s)", fit.C, metric_words(record["cv_metric"]),
             f"{record['cv_score']:.4f}" if record["cv_score"] is not None else "n/a")
    return record
