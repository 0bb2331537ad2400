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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


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
