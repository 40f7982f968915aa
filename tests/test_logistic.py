"""engine/logistic.py: the probe's logistic regression reaches scikit-learn's optimum for the same C, faster."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from transferkit.engine import logistic, probe


def _correlated(n: int, d: int, classes: int, seed: int = 0, factors=(8, 6, 4, 3, 2, 1.5)):
    """Standardized rows whose columns share a few strong factors of these scales (as pooled CNN features do), and
    labels that depend on them."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, len(factors))) * factors
    x = factors @ rng.standard_normal((factors.shape[1], d)) + rng.standard_normal((n, d))
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    scores = factors[:, :classes] + 2 * rng.standard_normal((n, classes))
    return x, scores.argmax(1)


def _objective(x, labels, weight, bias, C, sample_weight=None):
    """scikit-learn's objective for LogisticRegression(C), in float64."""
    sw = np.ones(len(x)) if sample_weight is None else sample_weight
    z = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    if weight.shape[0] == 1:
        losses = np.logaddexp(0, z[:, 0]) - labels * z[:, 0]
    else:
        top = z.max(1, keepdims=True)
        losses = (top + np.log(np.exp(z - top).sum(1, keepdims=True)))[:, 0] - z[np.arange(len(z)), labels]
    return (sw * losses).sum() / sw.sum() + (weight.astype(np.float64) ** 2).sum() / (2 * C * sw.sum())


@pytest.mark.parametrize("classes, balanced", [(2, False), (4, False), (3, True)])
def test_the_solver_reaches_scikit_learns_optimum(classes, balanced):
    x, labels = _correlated(600, 120, classes)
    if balanced:  # unequal classes, weighted by the inverse of their counts as --class-weights auto asks
        keep = np.flatnonzero((labels != 0) | (np.arange(len(labels)) % 4 == 0))
        x, labels = x[keep], labels[keep]
    counts = np.bincount(labels)
    sw = (len(labels) / (classes * counts))[labels] if balanced else None
    C = 0.05
    exact = LogisticRegression(C=C, tol=1e-10, max_iter=20_000).fit(x.astype(np.float64), labels, sample_weight=sw)
    weight, bias = logistic.solve(x, labels, C, classes, sw, directions=logistic.top_directions(x))
    assert weight.shape == exact.coef_.shape
    best = _objective(x, labels, exact.coef_, exact.intercept_, C, sw)
    assert _objective(x, labels, weight, bias, C, sw) - best < 1e-5 * best
    theirs = exact.predict_proba(x)
    z = x @ weight.T + bias
    ours = 1 / (1 + np.exp(-z[:, 0])) if classes == 2 else np.exp(z - z.max(1, keepdims=True))
    ours = np.stack([1 - ours, ours], 1) if classes == 2 else ours / ours.sum(1, keepdims=True)
    assert np.abs(ours - theirs).max() < 2e-3


def test_the_preconditioner_finds_the_same_optimum_in_fewer_evaluations(monkeypatch):
    """Flattening the top eigen-directions changes the path, not the answer; on correlated columns it is the
    difference between a few dozen evaluations and hundreds."""
    x, labels = _correlated(800, 200, 3, seed=1, factors=(30, 20, 15, 10, 8, 6, 4, 3, 2, 1.5))
    calls = []
    real_call = logistic._Objective.__call__
    monkeypatch.setattr(logistic._Objective, "__call__", lambda self, theta: calls.append(1) or real_call(self, theta))
    C = 0.3
    fits = {}
    for name, directions in (("plain", None), ("preconditioned", logistic.top_directions(x))):
        calls.clear()
        fits[name] = logistic.solve(x, labels, C, 3, directions=directions, tol=1e-6)
        fits[name + " evaluations"] = len(calls)
    plain, preconditioned = (_objective(x, labels, *fits[k], C) for k in ("plain", "preconditioned"))
    assert abs(plain - preconditioned) < 1e-6 * plain
    assert fits["preconditioned evaluations"] * 2 < fits["plain evaluations"]


def test_the_blocked_gradient_is_the_gradient_in_preconditioned_coordinates():
    """Loss and gradient in v (w = P v), summed block by block, against finite differences of the loss."""
    x, labels = _correlated(150, 40, 3, seed=2)
    objective = logistic._Objective(x, labels, 0.1, 3, None, logistic.top_directions(x))
    assert objective.block < len(x)  # several blocks
    theta = np.random.default_rng(0).standard_normal(3 * 41) * 0.05
    loss, grad = objective(theta)
    for i in (0, 7, 50, 3 * 40 + 1):  # weights of each class, and a bias
        step = np.zeros_like(theta)
        step[i] = 1e-3
        numeric = (objective(theta + step)[0] - objective(theta - step)[0]) / 2e-3
        assert abs(numeric - grad[i]) < 1e-3 * max(1.0, abs(grad[i]))
    assert np.allclose(objective.to_v(objective.to_w(theta[:120].reshape(3, 40))), theta[:120].reshape(3, 40))


def test_the_probe_fit_warm_starts_and_keeps_absent_classes_out():
    """fit_logistic in the run's shape: a warm start from the full-size rows, the binomial form split evenly, and
    a class missing from the rows never predicted."""
    x, labels = _correlated(300, 30, 2, seed=3)
    weight, bias = probe.fit_logistic(x, labels + 1, 0.1, 3)  # classes 1 and 2 of 3
    assert weight.shape == (3, 30) and np.allclose(weight[1], -weight[2]) and not weight[0].any()
    assert (x @ weight.T + bias).argmax(1).min() >= 1
    again = probe.fit_logistic(x, labels + 1, 0.1, 3, warm=(weight, bias))
    assert np.abs(again[0] - weight).max() < 1e-3 * np.abs(weight).max()
