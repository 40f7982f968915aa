"""How a model's answers on held-out images are scored, and how noisy those scores are.

The probes' cross-validation (engine/probe.py) and the recipe search's inner hold-out (search/finetuning.py) score answers
as the run's val split is scored (results/metrics.py): accuracy, balanced accuracy or macro-F1
(TrainConfig.selection_metric). The search compares a fine-tuned candidate with the probe on the same hold-out
images, so it also needs each score's standard error and the spread of a paired difference under a tie.
Numpy only: these run thousands of times per comparison.
"""

from __future__ import annotations

import numpy as np

# Draws of the resampling that measures a hold-out score's spread where no formula gives it (the metrics other
# than accuracy): ~30 ms for 400 hold-out images.
RESAMPLES = 1000


def metric_words(metric: str) -> str:
    """A metric's name in messages and reports: "balanced accuracy", "macro-F1"."""
    return {"macro_f1": "macro-F1"}.get(metric, metric.replace("_", " "))


def cv_score(pred: np.ndarray, y: np.ndarray, metric: str = "accuracy", n_classes: int | None = None) -> float:
    """Held-out predictions scored as the run's val split is (results/metrics.py): accuracy, the share right;
    balanced_accuracy, the mean of the classes' shares right (the classes present in y); macro_f1, the F1 of
    every one of the n_classes averaged (a class never predicted nor present counts 0, as on val)."""
    if metric == "accuracy":
        return float((pred == y).mean())
    if metric == "balanced_accuracy":
        return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
    if metric == "macro_f1":
        k = n_classes or int(max(y.max(), pred.max())) + 1
        confusion = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        right = np.diag(confusion)
        # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + present); 0 where neither
        return float(np.mean(2 * right / np.maximum(confusion.sum(0) + confusion.sum(1), 1)))
    raise ValueError(f"unknown metric {metric!r}")


def holdout_standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n images (binomial)."""
    return float(np.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1)))


def standard_error(pred: np.ndarray, y: np.ndarray, metric: str, seed: int, n_classes: int | None = None) -> float:
    """Standard error of the score of answers `pred` on images labelled y: the binomial one for accuracy, a seeded
    bootstrap of the images for the other metrics."""
    if metric == "accuracy":
        return holdout_standard_error(cv_score(pred, y), len(y))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y), (RESAMPLES, len(y)))
    return float(np.std([cv_score(pred[d], y[d], metric, n_classes) for d in draws]))


def paired_difference(pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray, metric: str, seed: int,
                      n_classes: int | None = None) -> tuple[float, float]:
    """A's score minus B's on the same images, and that difference's standard deviation were A and B equally good:
    their answers swapped at random on the images where they differ (a paired permutation test; for accuracy its
    spread is the sign test's √(b + c) images)."""
    observed = cv_score(pred_a, y, metric, n_classes) - cv_score(pred_b, y, metric, n_classes)
    rng = np.random.default_rng(seed)
    swaps = rng.random((RESAMPLES, len(y))) < 0.5
    null = [cv_score(np.where(swap, pred_b, pred_a), y, metric, n_classes)
            - cv_score(np.where(swap, pred_a, pred_b), y, metric, n_classes) for swap in swaps]
    return float(observed), float(np.std(null))
