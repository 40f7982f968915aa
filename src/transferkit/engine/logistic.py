"""The probe's L2 logistic regression, solved by L-BFGS on a preconditioned, cache-blocked objective.

The objective is scikit-learn's LogisticRegression's, so C means what it means there: the mean of the (sample-weighted)
log-losses plus ||W||² / (2 C Σ weights), the intercepts unpenalized; one weight row (the binomial form) for two
classes, one per class (multinomial) for more. The optimizer is scipy's L-BFGS-B, as scikit-learn runs it. Two things
make it faster than scikit-learn's solver on the probe's features, which are wide (4,048 columns), many rows (images ×
views) and strongly correlated:

- Preconditioning (`directions`): L-BFGS runs in coordinates w = P v in which the data's top eigen-directions (the
  few that carry most of the variance of standardized, correlated features) are shrunk to the curvature of the rest,
  so far fewer iterations reach the same gradient tolerance.
- One pass over the rows per evaluation (`BLOCK_VALUES`): the logits, the loss and the gradient are computed a block
  of rows at a time while the block is in cache, instead of two full passes.

Measured on one CV fold of ELPV's 4-view features (5,248 rows × 4,048, 2-core EPYC, one BLAS thread, the C grid
warm-started as cross_validate runs it): 4 classes 30.0 s with scikit-learn at tol 1e-4 against 5.8 s here at the
same tol and 12.3 s at tol 1e-5 (its objective then 10-100× closer to the optimum than scikit-learn's); 2 classes
4.3 s against 1.5 s and 2.5 s (benchmarks/RESULTS.md, notes of session 47).
"""

from __future__ import annotations

import numpy as np

# Top eigen-directions flattened by the preconditioner, found by randomized range finding with this many extra
# columns and power iterations (a few passes over the rows, once per CV fold: ~0.25 s for 5,248 × 4,048).
DIRECTIONS, OVERSAMPLE, POWER_ITERATIONS = 32, 10, 2
# The largest curvature of the log-loss per unit of a direction's variance: p(1 - p) <= 1/4.
LOSS_CURVATURE = 0.25
# Rows per block: the most whose product with the weights (rows × classes × columns) stays within this many values,
# between MIN_BLOCK and MAX_BLOCK rows. OpenBLAS multiplies such small products with a kernel ~1.5-2× as fast as its
# general one (2-core EPYC, 5,248 × 4,048 float32, one thread, one evaluation: 4 classes 9.6-11 ms at 32-48 rows
# against 16-18 ms at 64-256; 10 classes 14.5 ms at 24 rows against 24-27 ms at 32-64); where even MIN_BLOCK rows
# exceed it (many classes), MAX_BLOCK.
BLOCK_VALUES, MIN_BLOCK, MAX_BLOCK = 900_000, 16, 64


def top_directions(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The DIRECTIONS leading eigenvectors (columns) and eigenvalues of x.T @ x / len(x), or None where x is too
    narrow or too short for a preconditioner to help."""
    n, d = x.shape
    width = min(DIRECTIONS + OVERSAMPLE, d, n)
    if width <= OVERSAMPLE:
        return None
    basis = np.random.default_rng(seed).standard_normal((d, width)).astype(x.dtype)
    for _ in range(POWER_ITERATIONS + 1):
        basis, _ = np.linalg.qr(x.T @ (x @ basis))
    projected = x @ basis
    values, vectors = np.linalg.eigh((projected.T @ projected).astype(np.float64) / n)
    top = np.argsort(values)[::-1][: width - OVERSAMPLE]
    return basis.astype(np.float64) @ vectors[:, top], values[top]


def solve(x: np.ndarray, labels: np.ndarray, C: float, classes: int, sample_weight: np.ndarray | None = None,
          warm: tuple[np.ndarray, np.ndarray] | None = None, directions=None, tol: float = 1e-5,
          max_iter: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) minimizing the objective above. labels: 0..classes-1, every one present; weight has one row
    for two classes (class 1's logit minus class 0's), else one per class. warm: a start in that same form."""
    from scipy.optimize import minimize

    objective = _Objective(np.ascontiguousarray(x, dtype=np.float32), labels, C, classes, sample_weight,
                           directions)
    rows, width = objective.rows, x.shape[1]
    start = np.zeros(rows * (width + 1))
    if warm is not None:
        start = np.concatenate([objective.to_v(np.asarray(warm[0], np.float64)).ravel(),
                                np.asarray(warm[1], np.float64)])
    # scikit-learn's L-BFGS-B settings for this solver (maxls, ftol), at our gradient tolerance
    result = minimize(objective, start, method="L-BFGS-B", jac=True,
                      options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    weight = objective.to_w(result.x[: rows * width].reshape(rows, width))
    return weight.astype(np.float32), result.x[rows * width:].astype(np.float32)


class _Objective:
    """The loss and its gradient in the preconditioned coordinates v (w = P v; P = I + U diag(s - 1) U', U the top
    directions, s shrinking each to the curvature of the last)."""

    def __init__(self, x, labels, C, classes, sample_weight, directions):
        self.x, self.binary = x, classes == 2
        self.rows = 1 if self.binary else classes
        n, width = x.shape
        weight = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
        self.penalty = 1.0 / (C * weight.sum())
        self.row_weight = (weight / weight.sum()).astype(np.float32)[:, None]
        self.target = (labels[:, None] == 1 if self.binary else np.eye(classes)[labels]).astype(np.float32)
        self.block = min(MAX_BLOCK, BLOCK_VALUES // (self.rows * width)) if self.rows * width * MIN_BLOCK <= \
            BLOCK_VALUES else MAX_BLOCK
        self.directions = None
        if directions is not None:
            vectors, values = directions
            floor = LOSS_CURVATURE * values[-1] + self.penalty
            self.directions = (vectors, np.sqrt(floor / (LOSS_CURVATURE * values + self.penalty)))

    def to_w(self, v: np.ndarray) -> np.ndarray:
        return self._along_directions(v, 1)

    def to_v(self, w: np.ndarray) -> np.ndarray:
        return self._along_directions(w, -1)

    def _along_directions(self, m: np.ndarray, power: int) -> np.ndarray:
        """m with its component along each top direction scaled by shrink**power (P m for 1, P⁻¹ m for -1)."""
        if self.directions is None:
            return m
        vectors, shrink = self.directions
        return m + ((m @ vectors) * (shrink ** power - 1)) @ vectors.T

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        width = self.x.shape[1]
        weight = self.to_w(theta[: self.rows * width].reshape(self.rows, width))
        weight_t, bias = np.ascontiguousarray(weight.T, dtype=np.float32), theta[self.rows * width:].astype(np.float32)
        loss, grad_w, grad_b = 0.0, np.zeros((self.rows, width), np.float32), np.zeros(self.rows)
        for start in range(0, len(self.x), self.block):  # one pass: each block's rows are read while in cache
            rows = self.x[start:start + self.block]
            logits = rows @ weight_t + bias
            losses, probabilities = self._losses(logits, self.target[start:start + self.block])
            row_weight = self.row_weight[start:start + self.block]
            loss += float((row_weight * losses).sum(dtype=np.float64))
            residual = row_weight * (probabilities - self.target[start:start + self.block])
            grad_w += residual.T @ rows
            grad_b += residual.sum(0, dtype=np.float64)
        loss += 0.5 * self.penalty * float((weight * weight).sum())
        grad_v = self.to_w(grad_w + self.penalty * weight)  # P is symmetric: the gradient in v is P times w's
        return loss, np.concatenate([grad_v.ravel(), grad_b])

    def _losses(self, logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's log-loss and predicted probabilities (of class 1 in the binomial form)."""
        if self.binary:
            return np.logaddexp(0, logits) - target * logits, 0.5 * (1 + np.tanh(0.5 * logits))
        top = logits.max(1, keepdims=True)
        exp = np.exp(logits - top)
        total = exp.sum(1, keepdims=True)
        return top + np.log(total) - (logits * target).sum(1, keepdims=True), exp / total
