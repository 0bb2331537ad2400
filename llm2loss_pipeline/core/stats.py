"""Correlations with p-values, and the Benjamini-Hochberg false discovery rate procedure.

The report correlates 40 estimated disparities with 40 measured ones (the paper's Table 2) and
tests 40 attributes at once, so both need to be right at small n and explicit about missing values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as sps

MIN_PAIRS = 3


class Coefficient(NamedTuple):
    """A correlation coefficient with its two-sided p-value (NaN when undefined)."""

    coefficient: float
    p_value: float


@dataclass(frozen=True)
class Correlations:
    """Pearson, Spearman and Kendall (tau-b) between two series, over `n` complete pairs.

    A constant series has no defined correlation: its coefficients and p-values are NaN rather
    than an error, so that one degenerate column does not stop a report.
    """

    pearson: Coefficient
    spearman: Coefficient
    kendall: Coefficient
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "pearson": self.pearson.coefficient,
            "pearson_p": self.pearson.p_value,
            "spearman": self.spearman.coefficient,
            "spearman_p": self.spearman.p_value,
            "kendall": self.kendall.coefficient,
            "kendall_p": self.kendall.p_value,
        }


def _as_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def complete_pairs(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`x` and `y` without the positions where either is NaN (or infinite)."""
    xs, ys = _as_vector(x, "x"), _as_vector(y, "y")
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def correlations(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlations:
    """Pearson, Spearman and Kendall tau-b of `x` against `y`, each with a two-sided p-value.

    Pairs where either value is NaN or infinite are dropped; fewer than 3 remaining pairs is an
    error that says how many there were.
    """
    xs, ys = complete_pairs(x, y)
    n = int(xs.size)
    if n < MIN_PAIRS:
        raise ValueError(
            f"correlations need at least {MIN_PAIRS} complete (non-NaN) pairs, got {n} "
            f"of {np.asarray(x).size}"
        )
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        undefined = Coefficient(float("nan"), float("nan"))
        return Correlations(undefined, undefined, undefined, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        pearson = sps.pearsonr(xs, ys)
        spearman = sps.spearmanr(xs, ys)
        kendall = sps.kendalltau(xs, ys)
    return Correlations(
        pearson=Coefficient(float(pearson.statistic), float(pearson.pvalue)),
        spearman=Coefficient(float(spearman.statistic), float(spearman.pvalue)),
        kendall=Coefficient(float(kendall.statistic), float(kendall.pvalue)),
        n=n,
    )


def bh_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order.

    q_(i) = min over j >= i of m * p_(j) / j, capped at 1, where p_(1) <= ... <= p_(m) are the
    sorted p-values and m counts the finite ones. NaN p-values (a test that could not be run) are
    left out of m and get a NaN q-value.
    """
    p = _as_vector(p_values, "p_values")
    if np.any((p < 0) | (p > 1)):
        bad = int(np.flatnonzero((p < 0) | (p > 1))[0])
        raise ValueError(f"p-value at position {bad} is {p[bad]}, outside [0, 1]")
    q = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return q
    order = finite[np.argsort(p[finite], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q[order] = np.minimum(ranked, 1.0)
    return q


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at FDR level `alpha`.

    Rejects the k smallest p-values, for the largest k with p_(k) <= k * alpha / m; equivalently
    q <= alpha with `bh_adjust`. NaN p-values are never rejected and do not count towards m.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    q = bh_adjust(p_values)
    return np.where(np.isfinite(q), q <= alpha, False)


def one_sample_t_pvalue(values: np.ndarray) -> float:
    """Two-sided p-value of a one-sample t-test of mean zero; explicit at the degenerate ends.

    With no spread, identical nonzero values are certain (p = 0) and all-zero values show
    nothing (p = 1); fewer than two finite values give NaN.
    """
    finite, degenerate = _finite_or_degenerate(values)
    if degenerate is not None:
        return degenerate
    return float(sps.ttest_1samp(finite, 0.0).pvalue)


def _finite_or_degenerate(values: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The finite values, and the p-value of a test of mean zero where it needs no test: NaN
    under two values; with no spread, 0 for identical nonzero values and 1 for all zeros."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size < 2:
        return finite, float("nan")
    # spread at rounding level (members that agree up to float error) counts as no spread
    scale = float(np.abs(finite).max())
    if np.ptp(finite) <= 1e-12 * scale or scale == 0:
        return finite, 1.0 if abs(float(finite.mean())) <= 1e-12 * scale or scale == 0 else 0.0
    return finite, None


def prob_positive(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """The fraction of values above zero, counting exact zeros as half."""
    array = np.asarray(values, dtype=np.float64)
    return np.mean((array > 0) + 0.5 * (array == 0), axis=axis)


def replicate_pvalue(values: np.ndarray) -> float:
    """Two-sided p-value that the quantity whose replicates are `values` is zero.

    The members of a bootstrap ensemble are replicates of one fit on one data set: their spread
    already is the standard error of the estimate, so the statistic is mean / std, not
    mean / (std / sqrt(M)) as a one-sample t-test would have it (that made 20 members look
    sqrt(20) times surer than the data allow). A t distribution with M - 1 degrees of freedom
    keeps the p-value honest when the replicates are few. The degenerate ends are explicit as in
    `one_sample_t_pvalue`.
    """
    finite, degenerate = _finite_or_degenerate(values)
    if degenerate is not None:
        return degenerate
    z = abs(float(finite.mean())) / float(finite.std(ddof=1))
    return float(2.0 * sps.t.sf(z, df=finite.size - 1))


def clustered_mean_gap(
    values: np.ndarray, groups: np.ndarray, clusters: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per column k of `groups` [n, K] (bool): mean(values | True) - mean(values | False) and its
    standard error, with samples of one cluster (an identity) allowed to be correlated.

    The standard error is the cluster-robust (sandwich) one of the difference of two means:
    var = G / (G - 1) * sum over clusters c of (sum over i in c of u_i)^2, with
    u_i = a_i (y_i - mean_a) / n_a - (1 - a_i) (y_i - mean_b) / n_b. Images of one identity share
    the identity's traits, so treating them as independent (Welch) understates the error.
    A column with an empty side gets NaN for both.
    """
    y = np.asarray(values, dtype=np.float64)
    a = np.asarray(groups, dtype=bool)
    if a.ndim == 1:
        a = a[:, None]
    if y.ndim != 1 or a.shape[0] != y.size or np.asarray(clusters).shape != y.shape:
        raise ValueError(
            f"values {y.shape}, groups {a.shape} and clusters {np.asarray(clusters).shape} "
            "must describe the same samples"
        )
    _, index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(index.max()) + 1 if index.size else 0
    n_a = a.sum(axis=0).astype(np.float64)
    n_b = y.size - n_a
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = (a * y[:, None]).sum(axis=0) / n_a
        mean_b = (~a * y[:, None]).sum(axis=0) / n_b
        u = a * (y[:, None] - mean_a) / n_a - ~a * (y[:, None] - mean_b) / n_b
    sums = np.zeros((n_clusters, a.shape[1]))
    np.add.at(sums, index, np.nan_to_num(u))
    factor = n_clusters / (n_clusters - 1) if n_clusters > 1 else np.nan
    se = np.sqrt(factor * (sums**2).sum(axis=0))
    empty = (n_a == 0) | (n_b == 0)
    gap = np.where(empty, np.nan, mean_a - mean_b)
    return gap, np.where(empty, np.nan, se)
