"""Small metrics shared by the encoder evaluation and the report, vectorised with numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start index of each run of equal values, and the run each sorted position belongs to
    new_run = np.empty(len(values), dtype=bool)
    new_run[:1] = True
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_ends = np.append(run_starts[1:], len(values))  # exclusive
    run_mean_rank = (run_starts + 1 + run_ends) / 2.0  # mean of start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_mean_rank[run_id]
    return ranks


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counted as one half (Mann-Whitney U / (n_pos * n_neg)).

    NaN when either class is absent, since the question has no answer then.
    """
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels_arr = np.asarray(labels).reshape(-1)
    if scores_arr.shape != labels_arr.shape:
        raise ValueError(
            f"auroc: {scores_arr.size} scores but {labels_arr.size} labels; they must pair up"
        )
    if np.isnan(scores_arr).any():
        where = np.flatnonzero(np.isnan(scores_arr))[:5].tolist()
        raise ValueError(f"auroc: scores contain NaN at positions {where}")
    positive = labels_arr.astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores_arr)
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))
