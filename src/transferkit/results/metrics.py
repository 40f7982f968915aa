"""Classification metrics for an evaluated split, as a JSON-ready dict.

Everything sklearn already computes comes from sklearn; only the pieces it lacks
(multiclass top-label calibration error, the top-losses list, the text table) live here.
Every function takes `labels=range(C)` so a split missing a class still yields a full-size
confusion matrix and per-class table instead of crashing or silently shrinking.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

log = logging.getLogger(__name__)

# Probabilities are clipped to this before taking logs so a confident miss gives a large
# finite loss, not inf (inf is not valid JSON).
_EPS = 1e-12


def _prepare(y_true: Any, probs: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and return (int labels, row-normalised float64 probabilities)."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N={y.shape[0]}, got {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} classes")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}], got [{y.min()}, {y.max()}]")
    # float32 softmax rows can miss 1.0 by more than sklearn's tolerance; renormalise once here.
    p = np.clip(p, 0.0, None)
    sums = p.sum(axis=1, keepdims=True)
    p = np.divide(p, sums, out=np.full_like(p, 1.0 / p.shape[1]), where=sums > 0)
    return y, p


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins.

    sklearn's calibration_curve is binary-only, hence this small implementation:
    sum over bins of |accuracy - mean confidence| weighted by the bin's share of samples.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _prepare(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bins are (lo, hi]; the first also takes exactly 0. searchsorted on the inner edges
    # gives the bin index directly and never produces an out-of-range bin for conf == 1.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Binary AUC on probs[:, 1], or OvR macro AUC; None when it is undefined."""
    n_classes = p.shape[1]
    present = np.unique(y)
    if len(present) < 2 or (n_classes > 2 and len(present) < n_classes):
        # AUC needs both sides of every one-vs-rest split; a missing class leaves it undefined.
        return None
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def _top_losses(
    y: np.ndarray, p: np.ndarray, classes: Sequence[str], paths: Sequence[Any], k: int
) -> list[dict]:
    """The k samples with the highest cross-entropy, worst first."""
    if len(paths) != len(y):
        raise ValueError(f"got {len(paths)} paths for {len(y)} samples")
    rows = np.arange(len(y))
    p_true = p[rows, y]
    losses = -np.log(np.clip(p_true, _EPS, 1.0))
    pred = p.argmax(axis=1)
    # Stable sort on -loss keeps equal losses in input order, so output is deterministic.
    order = np.argsort(-losses, kind="stable")[: max(k, 0)]
    return [
        {
            "index": int(i),
            "path": str(paths[i]),
            "true": str(classes[y[i]]),
            "predicted": str(classes[pred[i]]),
            "probability_of_predicted": float(p[i, pred[i]]),
            "probability_of_true": float(p_true[i]),
            "loss": float(losses[i]),
        }
        for i in order
    ]


def accuracy_interval(accuracy: float | None, n: int, confidence: float = 0.95) -> dict | None:
    """{confidence, low, high, images}: the Wilson score interval of an accuracy measured on n images, i.e.
    where the same model's accuracy on another n such images may plausibly land (ELPV's 656 val images at
    0.855: 0.826-0.880; the seed-sized 153 at 0.850: 0.784-0.898). Differences inside it are not evidence that
    one run is better."""
    from scipy.stats import binomtest  # imported by sklearn.metrics already

    if accuracy is None or n <= 0:
        return None
    interval = binomtest(int(round(accuracy * n)), n).proportion_ci(confidence, method="wilson")
    return {"confidence": confidence, "low": float(interval.low), "high": float(interval.high), "images": n}


def format_interval(interval: dict, digits: int = 4) -> str:
    """An accuracy_interval as `low-high`, for tables and the console."""
    return f"{interval['low']:.{digits}f}-{interval['high']:.{digits}f}"


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's balanced accuracy: recall averaged over the classes present in y. It warns when a
    prediction names a class absent from y, which is expected for a small split (an inner hold-out,
    a val split without every class): not worth a line on the user's screen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def classification_metrics(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    paths: Sequence[Any] | None = None,
    top_k_losses: int = 16,
    n_bins: int = 15,
) -> dict:
    """All evaluation numbers for one split as a JSON-serializable dict.

    `y_true` holds class indices (N,), `probs` softmax probabilities (N, C) with C == len(classes).
    `top_losses` is included only when `paths` is given.
    """
    classes = [str(c) for c in classes]
    y, p = _prepare(y_true, probs, n_classes=len(classes))
    labels = list(range(len(classes)))
    pred = p.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    balanced = balanced_accuracy(y, pred)

    result: dict[str, Any] = {
        "n": int(len(y)),
        "classes": classes,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        ],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "roc_auc": _roc_auc(y, p),
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
        "log_loss": float(log_loss(y, np.clip(p, _EPS, 1.0), labels=labels)),
    }
    if paths is not None:
        result["top_losses"] = _top_losses(y, p, classes, paths, top_k_losses)
    log.debug("metrics on %d samples: accuracy %.4f", result["n"], result["accuracy"])
    return result


def evaluation_summary(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    paths: Sequence[Any] | None = None,
    split: str | None = None,
    top_k_losses: int = 16,
    n_bins: int = 15,
    *,
    checkpoint: Any = None,
    skipped: Sequence[dict] = (),
    tta: dict | None = None,
    trained_on: dict | None = None,
    features: dict | None = None,
) -> dict:
    """What evaluation.json holds, in one shape whether training (its best epoch on val) or `evaluate`
    wrote it: classification_metrics plus where the numbers come from: the split, the checkpoint (relative to
    the folder evaluation.json is in, where it lies inside it: a run folder may move), the unreadable files skipped ({"path", "error"}), the test-time augmentation ({"kind", "views"}, and with
    views the accuracy without them), the images the run trained on ({"left_out", "included", "known"})
    and the cached features used ({"cached", "computed"}, or None).

    The report reads this file; keeping its shape defined here means the engine and the
    report cannot drift apart.
    """
    summary = classification_metrics(y_true, probs, classes, paths, top_k_losses=top_k_losses, n_bins=n_bins)
    summary["accuracy_interval"] = accuracy_interval(summary["accuracy"], summary["n"])
    summary.update(split=split, checkpoint=None if checkpoint is None else str(checkpoint), skipped=list(skipped),
                   tta=tta or {"kind": "none", "views": 1}, trained_on=trained_on, features=features)
    return summary


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and {"low", "high"} <= set(value):  # accuracy_interval
        return format_interval(value, digits)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


CLASS_COLUMN = 40  # a 210-character class name padded every row of the table to 250 columns: each wrapped


def _clip(name: str, limit: int = CLASS_COLUMN) -> str:
    """`name` in at most `limit` characters, its start and end kept (names alike often differ at the end)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table: overall numbers, then one row per class."""
    overall = [
        ("samples", metrics.get("n")),
        ("accuracy", metrics.get("accuracy")),
        ("95% interval", metrics.get("accuracy_interval")),
        ("balanced accuracy", metrics.get("balanced_accuracy")),
        ("macro F1", metrics.get("macro_f1")),
        ("ROC-AUC", metrics.get("roc_auc")),
        ("ECE", metrics.get("ece")),
        ("log loss", metrics.get("log_loss")),
    ]
    label_width = max(len(name) for name, _ in overall)
    lines = [f"{name:<{label_width}}  {_fmt(value)}" for name, value in overall]

    per_class = metrics.get("per_class") or []
    if per_class:
        headers = ["class", "precision", "recall", "f1", "support"]
        rows = [
            [_clip(str(r["class"])), _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), str(r["support"])]
            for r in per_class
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        # Class names left-aligned, numbers right-aligned so decimals line up.
        def fmt_row(cells: list[str]) -> str:
            first = f"{cells[0]:<{widths[0]}}"
            rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
            return "  ".join([first, *rest])

        lines += ["", fmt_row(headers), "  ".join("-" * w for w in widths)]
        lines += [fmt_row(row) for row in rows]
    return "\n".join(lines)
