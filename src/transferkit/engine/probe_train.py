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
from ..models.registry import Preprocessing
from .features import FeatureStore, View, cached_features, store_for
from .probe import (ProbeClassifier, ProbeFit, TapPooler, cross_validate, feature_columns, fit_probe,
                    predict_proba, tap_body, tap_widths)
from .runtime import FrozenEngine

log = logging.getLogger(__name__)

# Inverse L2 strengths swept by 3-fold CV (features are standardized, so one grid serves every backbone).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
# Dihedral view indices (data/transforms.dihedral): 4 is the horizontal mirror.
PROBE_VIEWS = {"none": (0,), "flip": (0, 4), "dihedral": tuple(range(8))}


@dataclass
class Taps:
    """The tapped-feature extractor of one run: pooler, runtime, cache and the width of each tap."""

    pooler: TapPooler
    engine: FrozenEngine
    store: FeatureStore
    widths: list[int]
    pre: Preprocessing

    def features(self, paths: list[str], views, digests=None, workers: int = 0, desc: str = "features"):
        """(n_ok, len(views), d) float32 numpy array, the ok mask per path, and the cache stats."""
        x, ok, stats = cached_features(self.engine, self.store, paths, [View(v) for v in views], self.pre,
                                       workers=workers, desc=desc, digests=digests)
        return (None if x is None else x.float().numpy()), ok, stats

    def columns(self, stages: int | None, pooling: str) -> np.ndarray:
        return feature_columns(self.widths, min(stages or len(self.widths), len(self.widths)), pooling)


def make_taps(model, spec, cfg, pre: Preprocessing, device, like: Taps | None = None) -> Taps:
    """The taps of `model` under preprocessing `pre`. `like`: taps of the same model at the same input size
    under another crop, whose runtime (chosen, exported and checked once) is shared."""
    from .sources import feature_identity

    shared = like is not None and like.pre.input_size == pre.input_size
    pooler = like.pooler if shared else TapPooler(tap_body(model, spec), spec.probe_taps).eval()
    identity = feature_identity(spec, pre.to_dict(), cfg.weights, cfg.pretrained, cfg.seed)
    store = store_for({**identity, "point": f"taps{pooler.taps}-meanmax"})
    if shared:
        return Taps(pooler, like.engine, store, like.widths, pre)
    widths = tap_widths(pooler, torch.zeros(1, 3, pre.input_size, pre.input_size, device=device))
    engine = FrozenEngine(pooler, device, cfg.engine, store.root / "frozen.onnx", cfg.channels_last,
                          precision=cfg.precision)
    return Taps(pooler, engine, store, widths, pre)


def probe_model(taps: Taps, fit: ProbeFit, n_classes: int, views) -> ProbeClassifier:
    return ProbeClassifier(taps.pooler, len(fit.columns), n_classes, views).load_fit(fit)


def probe_meta(taps: Taps, fit: ProbeFit, views) -> dict:
    """What load_checkpoint needs to rebuild the probe (engine/checkpoint.py)."""
    return {"taps": taps.pooler.taps, "n_features": int(len(fit.columns)), "views": list(views), "C": fit.C}


def choose_and_fit(x: np.ndarray, y: np.ndarray, columns: np.ndarray, n_classes: int, C: float | None,
                   seed: int = 0) -> tuple[ProbeFit, dict]:
    """The probe on all of x; C from 3-fold CV on x when not given. Returns the fit and the CV record."""
    cv = None
    if C is None:
        if np.bincount(y).min() < 3:
            C, cv = 0.1, None  # too few images per class for 3 folds: a moderate default
        else:
            cv = cross_validate(x, y, columns, n_classes, list(C_GRID), seed=seed)
            C = cv.C
    record = {"C": C, "cv_accuracy": cv.accuracy if cv else None, "cv_per_C": cv.per_C if cv else None}
    return fit_probe(x, y, columns, C, n_classes), record


# ---- --mode linear-probe ------------------------------------------------------------------------


def train_linear_probe(state) -> dict:
    """Fit the configured probe on the train split, score it once on val. Returns a record with the
    model, the val predictions and timings, for fit.py to write as a run."""
    cfg, scan = state.cfg, state.scan
    views = PROBE_VIEWS[cfg.probe_views]
    taps = make_taps(state.model, state.spec, cfg, state.pre, state.device)
    t0 = time.perf_counter()
    xtr, ok_tr, s1 = taps.features([p for p, _ in scan.train], views, scan.digests, desc="train features")
    xva, ok_va, s2 = taps.features([p for p, _ in scan.val], views, scan.digests, desc="val features")
    if xtr is None or xva is None:
        raise DataError("no image could be read during feature extraction")
    ytr = np.array([y for (_, y), ok in zip(scan.train, ok_tr) if ok])
    yva = np.array([y for (_, y), ok in zip(scan.val, ok_va) if ok])
    extract_s = time.perf_counter() - t0
    columns = taps.columns(cfg.probe_stages, cfg.probe_pooling)
    fit, record = choose_and_fit(xtr, ytr, columns, len(scan.classes), cfg.probe_c, cfg.seed)
    p_train, p_val = predict_proba(fit, xtr), predict_proba(fit, xva)
    standardized = [(x[:, 0, fit.columns] - fit.mean) / fit.scale for x in (xtr, xva)]  # what the head reads
    return {
        "head_inputs": tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in standardized),
        "model": probe_model(taps, fit, len(scan.classes), views),
        "meta": probe_meta(taps, fit, views),
        "train": (p_train, ytr), "val": (p_val, yva),
        "val_items": [it for it, ok in zip(scan.val, ok_va) if ok],
        "skipped": ok_tr.count(False) + ok_va.count(False),
        "record": {**record, "features": int(len(columns)), "views": list(views), "extract_seconds": extract_s,
                   "cache": {"train": s1, "val": s2}, **taps.engine.info},
    }


# ---- --head-init probe (LP-FT) ------------------------------------------------------------------


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
    fit, record = choose_and_fit(x, y, taps.columns(1, "mean"), len(scan.classes), cfg.probe_c, cfg.seed)
    weight = fit.weight / fit.scale  # logits = W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight))
        head.bias.copy_(torch.as_tensor(fit.bias - weight @ fit.mean))
    log.info("head initialised from a linear probe (C=%g, 3-fold CV accuracy %s)", fit.C,
             f"{record['cv_accuracy']:.4f}" if record["cv_accuracy"] is not None else "n/a")
    return record
