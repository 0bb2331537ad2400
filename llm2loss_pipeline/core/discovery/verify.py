"""Checking a description on real samples: which samples it matches, and are they worse?

Matching. A description t matches the samples whose image embedding is most similar to its text
embedding: cosine similarity on the modality-gap-centred sphere the heads use (raw CLIP-style
cosines carry a per-image offset along the image-text gap that has nothing to do with t). The
rule is top-k: the `fraction` most similar samples of the split, at least `min_matches`. A
threshold on the similarity distribution was the alternative; it was not chosen because texts
differ in how spread their similarities are, so one threshold matches 2 samples for one text and
half the split for another, and neither tests anything. With top-k every hypothesis is tested on
groups of the same size and p-values are comparable across candidates. The price is that a rare
group (rarer than `fraction`) is diluted with near misses, which makes its test conservative.

Measuring. Matched samples' losses against the rest of the split: the difference of means (in
loss units and in standard deviations of the split's losses), the probability that a matched
sample has the higher loss (AUROC, the Mann-Whitney U over n_matched x n_rest), and the one-sided
Mann-Whitney p-value (alternative: matched losses are larger). Rank-based, because losses are
heavy-tailed and a few very wrong samples should not make or break a group.

Identities. The Mann-Whitney test counts every image as independent, but images of one identity
share its traits, and a matched set of 30 images from 10-16 identities can be worse because two
or three of those people are hard for the model, whatever the words name. Such sets passed the
test on the reporting worlds while the group they name was no worse in the population (bench/
RESULTS.md, "Discovery against population truth"). `clustered_p_values` is the same question
asked with identities as clusters: the difference of the matched and unmatched samples' mean
loss *ranks* (the Mann-Whitney statistic, up to scale) over its cluster-robust standard error
(core/stats.py `clustered_mean_gap`, the sandwich error the population truth's interval uses),
one-sided, against Student's t with (identities - 1) degrees of freedom. With one sample per
cluster it is a Welch-type test on ranks, close to Mann-Whitney's normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from llm2loss_pipeline.core.stats import clustered_mean_gap


def match_count(n_samples: int, fraction: float, min_matches: int) -> int:
    k = max(min_matches, math.ceil(fraction * n_samples))
    if k >= n_samples:
        raise ValueError(
            f"matching {k} of {n_samples} samples leaves none to compare with: the split is too "
            "small for discovery.min_matches / discovery.match_fraction"
        )
    return k


def top_matches(similarity: np.ndarray, k: int) -> np.ndarray:
    """Indices [T, k] of the k most similar samples of each text (similarity is [n, T]),
    most similar first; ties go to the earlier sample."""
    order = np.argsort(-similarity, axis=0, kind="stable")[:k]
    return order.T.copy()


@dataclass(frozen=True)
class Measured:
    gap: float
    """mean loss of the matched samples minus that of the rest"""
    gap_std: float
    """the same in standard deviations of the split's losses"""
    auc: float
    """P(matched loss > rest loss), ties counted half"""
    p_value: float
    """one-sided Mann-Whitney U: matched losses are stochastically larger"""
    n_matched: int
    n_rest: int


def measure(losses: np.ndarray, matched: np.ndarray) -> Measured:
    losses = np.asarray(losses, dtype=np.float64)
    inside = np.zeros(losses.shape[0], dtype=bool)
    inside[matched] = True
    a, b = losses[inside], losses[~inside]
    if a.size == 0 or b.size == 0:
        raise ValueError("a measured gap needs matched and unmatched samples")
    spread = float(losses.std())
    gap = float(a.mean() - b.mean())
    if np.ptp(losses) == 0:  # all losses equal: nothing can be worse
        return Measured(gap, 0.0, 0.5, 1.0, int(a.size), int(b.size))
    test = sps.mannwhitneyu(a, b, alternative="greater")
    return Measured(
        gap=gap,
        gap_std=gap / spread if spread > 0 else 0.0,
        auc=float(test.statistic) / (a.size * b.size),
        p_value=float(test.pvalue),
        n_matched=int(a.size),
        n_rest=int(b.size),
    )


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 0.0


def clustered_p_values(
    losses: np.ndarray, matches: np.ndarray, clusters: np.ndarray | None = None
) -> np.ndarray:
    """[T]: one-sided p-values that each row of `matches` [T, k] has larger losses than the rest,
    with the samples of one cluster (an identity; None: every sample its own) correlated (module
    docstring). 1.0 where all losses are equal or nothing varies between clusters."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[0]
    if clusters is None:
        clusters = np.arange(n)
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
        raise ValueError(f"{clusters.shape[0]} clusters for {n} samples")
    matches = np.asarray(matches)
    inside = np.zeros((n, matches.shape[0]), dtype=bool)
    inside[matches.T, np.arange(matches.shape[0])[None, :]] = True
    if matches.shape[0] == 0 or np.ptp(losses) == 0:
        return np.ones(matches.shape[0])
    ranks = sps.rankdata(losses) / n  # mid-ranks: ties count half, as in Mann-Whitney
    gap, se = clustered_mean_gap(ranks, inside, clusters)
    n_clusters = np.unique(clusters).size
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, gap / se, np.where(gap > 0, np.inf, -np.inf))
    p = sps.t.sf(t, df=max(n_clusters - 1, 1))
    return np.where(np.isfinite(gap), p, 1.0)
