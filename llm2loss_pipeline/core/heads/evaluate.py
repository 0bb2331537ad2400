"""Held-out evaluation of the heads: does each member order unseen samples by their actual loss?

Per member: Spearman and Kendall (tau-b) between its output and the actual loss, and pairwise
ranking accuracy, the probability that of two samples with different losses the one with the higher
loss gets the higher output (ties in the output count one half). The accuracy is estimated on
`n_pairs` random pairs drawn with a fixed seed, so it is reproducible and O(n_pairs).

Per group (each kind, each architecture, overall): the same metrics for the mean-ensemble, the mean
of the group's standardised member outputs (ensemble.py explains the units), and the mean and
minimum of its members' Spearman.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble
from llm2loss_pipeline.core.heads.scaling import check_losses

N_PAIRS = 200_000
PAIR_SEED = 0


def _nan_safe(value: float) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def rank_metrics(
    scores: np.ndarray, losses: np.ndarray, *, n_pairs: int = N_PAIRS, seed: int = PAIR_SEED
) -> dict[str, float]:
    """Spearman, Kendall tau-b and pairwise accuracy of `scores` against `losses` (both 1-D)."""
    scores = np.asarray(scores, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan, as we want
        spearman = stats.spearmanr(scores, losses).statistic
        kendall = stats.kendalltau(scores, losses).statistic
    return {
        "spearman": _nan_safe(spearman),
        "kendall": _nan_safe(kendall),
        "pairwise_accuracy": pairwise_accuracy(scores, losses, n_pairs=n_pairs, seed=seed),
    }


def pairwise_accuracy(
    scores: np.ndarray, losses: np.ndarray, *, n_pairs: int = N_PAIRS, seed: int = PAIR_SEED
) -> float:
    n = len(losses)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # j != i
    dl = np.sign(losses[i] - losses[j])
    keep = dl != 0
    if not keep.any():
        return float("nan")
    ds = np.sign(scores[i] - scores[j])[keep]
    agree = (ds == dl[keep]).astype(np.float64) + 0.5 * (ds == 0)
    return float(agree.mean())


def _check(ensemble: HeadEnsemble, emb: np.ndarray, losses: Any) -> np.ndarray:
    losses_arr = check_losses(losses)
    if len(losses_arr) != len(emb):
        raise ValueError(
            f"{len(emb)} embeddings but {len(losses_arr)} losses: they must be the same samples"
        )
    return losses_arr


def evaluate_members(ensemble: HeadEnsemble, emb: np.ndarray, losses: Any) -> list[dict[str, Any]]:
    """One dict per member: index, kind, arch, seed, spearman, kendall, pairwise_accuracy, n."""
    losses_arr = _check(ensemble, emb, losses)
    outputs = ensemble.predict(emb)
    return [
        {**m.to_dict(), **rank_metrics(outputs[m.index], losses_arr), "n": len(losses_arr)}
        for m in ensemble.members
    ]


def evaluate_ensemble(ensemble: HeadEnsemble, emb: np.ndarray, losses: Any) -> dict[str, Any]:
    """{"members": evaluate_members(...), "groups": {regressor, ranker, linear, mlp, overall}}."""
    losses_arr = _check(ensemble, emb, losses)
    members = evaluate_members(ensemble, emb, losses_arr)
    z = ensemble.standardized(emb)
    groups: dict[str, list[int]] = {}
    for m in ensemble.members:
        groups.setdefault(m.kind, []).append(m.index)
    for m in ensemble.members:
        groups.setdefault(m.arch, []).append(m.index)
    groups["overall"] = [m.index for m in ensemble.members]
    summary: dict[str, Any] = {}
    for name, rows in groups.items():
        spearmans = np.array([members[r]["spearman"] for r in rows])
        ensemble_metrics = rank_metrics(z[rows].mean(axis=0), losses_arr)
        summary[name] = {
            "n_members": len(rows),
            "ensemble_spearman": ensemble_metrics["spearman"],
            "ensemble_kendall": ensemble_metrics["kendall"],
            "ensemble_pairwise_accuracy": ensemble_metrics["pairwise_accuracy"],
            "member_spearman_mean": float(np.nanmean(spearmans)) if len(rows) else float("nan"),
            "member_spearman_min": float(np.nanmin(spearmans)) if len(rows) else float("nan"),
        }
    return {"members": members, "groups": summary, "n": len(losses_arr)}
