"""Grounded text estimates: ask the heads about the images a text describes.

The paper's estimate (`direct`) feeds the text embedding itself to the heads:
diff[m] = h_m(positive) - h_m(negative). The heads were fitted on image embeddings, so along any
direction in which the images do not vary they are unconstrained, and a text direction has large
components there (the modality gap is not only an offset). On the generated world this made
"young" look worse than "old" although the young are measured better.

The grounded estimate keeps the text as the question but answers it on images, with no label and
no loss of theirs:

1. each probe gives a text direction, delta = mean over templates of (f(positive) - f(negative)),
   in the heads' input space (`ModalityGap.text`);
2. the direction is replaced by its dual against the other probes' directions: the vector whose
   dot product with delta is 1 and with every other probe direction is 0 (ridge-regularised). A
   face described as "with gray hair" also reads as "old" to a sentence model; the dual keeps the
   part only gray hair explains, which is the better classifier of the attribute (mean zero-shot
   AUROC 0.785 -> 0.835 on the generated world);
3. every pool image gets the score s_i = x_i . dual, standardised over the pool;
4. member m's estimate is the covariance over the pool of its standardised loss estimate h_m(x_i)
   and s_i: how many member standard deviations the estimated loss rises per standard deviation of
   "looks like the positive text". Positive means worse on the positive side, as for `direct`.

Measured on the generated world (bench/report_estimators.py; bench/RESULTS.md, "Grounded"):
Spearman of estimated vs measured signed disparity over the 40 attributes 0.44 (direct) -> 0.88
(grounded) on the default world and 0.17 -> 0.72 with world seed 1, where the same covariance with
the true labels instead of s reaches 0.96 and 0.85.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

ESTIMATORS = ("grounded", "direct")
TextFeatures = Callable[[Sequence[str]], np.ndarray]


def text_directions(
    features: TextFeatures, pairs_by_item: Mapping[str, Sequence[tuple[str, str]]]
) -> np.ndarray:
    """[items, d]: per item, the mean over its pairs of features(positive) - features(negative)."""
    texts = list(dict.fromkeys(t for pairs in pairs_by_item.values() for p in pairs for t in p))
    encoded = np.asarray(features(texts), dtype=np.float64)
    if encoded.ndim != 2 or encoded.shape[0] != len(texts):
        raise ValueError(f"text features have shape {encoded.shape} for {len(texts)} texts")
    row = {text: i for i, text in enumerate(texts)}
    return np.stack(
        [
            np.mean([encoded[row[p]] - encoded[row[n]] for p, n in pairs], axis=0)
            for pairs in pairs_by_item.values()
        ]
    )


def dual_directions(directions: np.ndarray, ridge: float) -> np.ndarray:
    """[k, d]: each direction's dual against the other k - 1 (one solve for all)."""
    directions = np.asarray(directions, dtype=np.float64)
    if directions.ndim != 2 or len(directions) == 0:
        raise ValueError(f"directions must be [k, d] with k >= 1, got {directions.shape}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    flat = np.flatnonzero(np.linalg.norm(directions, axis=1) <= 1e-12)
    if flat.size:
        raise ValueError(
            f"probe {int(flat[0])} has no direction: its positive and negative texts map to the "
            "same point (are they identical?)"
        )
    gram = directions @ directions.T
    scale = ridge * np.trace(gram) / len(directions)
    try:
        return np.linalg.solve(gram + scale * np.eye(len(directions)), directions)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"the {len(directions)} probe directions are linearly dependent; use a dual ridge > 0"
        ) from exc


def standardized_scores(pool: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """[n, k]: the pool's scores along each direction, centred and scaled to unit variance."""
    scores = np.asarray(pool, dtype=np.float64) @ np.asarray(directions, dtype=np.float64).T
    centred = scores - scores.mean(axis=0)
    spread = centred.std(axis=0)
    flat = np.flatnonzero(spread <= 1e-12)
    if flat.size:
        raise ValueError(
            f"direction {int(flat[0])} gives every pool image the same score: it cannot ground "
            "an estimate (is the pool a single image, or the probe's two texts identical?)"
        )
    return centred / spread


def pool_weights(
    n_members: int, n_pool: int, seed: int | None, groups: np.ndarray | None = None
) -> np.ndarray:
    """[members, n]: each member's bootstrap counts of the pool (all ones when seed is None).

    A member's spread then carries the pool's sampling noise as well as the heads' own, so a
    disparity seen on few images is not called certain because twenty members agree on them.
    With `groups` (an identity per image) the resample draws whole groups: images of one
    identity share its traits, so resampling them one by one would understate the noise of a
    disparity that a few identities carry.
    """
    if n_pool < 1:
        raise ValueError(f"a grounding pool needs images, got {n_pool}")
    if seed is None:
        return np.ones((n_members, n_pool))
    if groups is None:
        index, n_groups = np.arange(n_pool), n_pool
    else:
        groups = np.asarray(groups)
        if groups.shape != (n_pool,):
            raise ValueError(f"groups has shape {groups.shape} for {n_pool} pool images")
        _, index = np.unique(groups, return_inverse=True)
        n_groups = int(index.max()) + 1
    counts = np.stack(
        [
            np.random.default_rng([seed, member]).multinomial(
                n_groups, np.full(n_groups, 1 / n_groups)
            )
            for member in range(n_members)
        ]
    )
    weights = counts[:, index].astype(np.float64)
    empty = weights.sum(axis=1) == 0
    weights[empty] = 1.0  # a resample that drew no image at all (tiny pools) keeps them all
    return weights


def grounded_diffs(
    member_scores: np.ndarray,
    pool: np.ndarray,
    directions: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """[members, k]: how each member's score co-varies over the pool with each direction's score.

    member_scores: [members, n] standardised loss estimates of the n pool images;
    pool: [n, d] the same images in the heads' input space; directions: [k, d];
    weights: [members, n] non-negative pool weights per member (default: all equal).
    """
    if len(pool) < 2:
        raise ValueError(f"grounding needs at least 2 pool images, got {len(pool)}")
    return covariance_with(member_scores, standardized_scores(pool, directions), weights)


def covariance_with(
    member_scores: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """[members, k]: weighted covariance of each member's scores [members, n] with each column
    of `scores` [n, k], the column standardised under the member's weights."""
    member_scores = np.asarray(member_scores, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if member_scores.ndim != 2 or scores.ndim != 2 or member_scores.shape[1] != len(scores):
        raise ValueError(
            f"member scores have shape {member_scores.shape} for {scores.shape[0]} pool images"
        )
    if weights is None:
        weights = np.ones_like(member_scores)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != member_scores.shape or np.any(weights < 0) or np.any(weights.sum(1) == 0):
        raise ValueError(f"weights must be non-negative, not all zero, shape {member_scores.shape}")
    share = weights / weights.sum(axis=1, keepdims=True)
    mean_text = share @ scores  # [members, k]
    spread = np.sqrt(np.maximum(share @ scores**2 - mean_text**2, 1e-24))
    mean_score = (share * member_scores).sum(axis=1, keepdims=True)
    covariance = (share * member_scores) @ scores - mean_score * mean_text
    return covariance / spread


class GroundingScorer(Protocol):
    """What a scorer needs for grounded estimates (`Diagnoser` has all three)."""

    def text_features(self, texts: Sequence[str]) -> np.ndarray: ...

    def image_features(self, embeddings: np.ndarray) -> np.ndarray: ...

    def score_features(self, features: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Grounding:
    """The pool, its member scores and the probe directions: everything grounded estimates read.

    pool: [n, d] pool images in the heads' input space; member_scores: [members, n];
    directions: [attributes, d] plain probe directions; duals: the same, each against the others.
    """

    attributes: tuple[str, ...]
    pool: np.ndarray
    member_scores: np.ndarray
    directions: np.ndarray
    duals: np.ndarray
    ridge: float
    weights: np.ndarray

    @classmethod
    def build(
        cls,
        scorer: Any,
        embeddings: np.ndarray,
        prompts_by_attribute: Mapping[str, Sequence[tuple[str, str]]],
        ridge: float,
        bootstrap_seed: int | None = 0,
        groups: np.ndarray | None = None,
    ) -> Grounding:
        missing = [
            name
            for name in ("text_features", "image_features", "score_features")
            if not callable(getattr(scorer, name, None))
        ]
        if missing:
            raise TypeError(
                f"the grounded estimator needs a scorer with {', '.join(missing)} (as Diagnoser "
                "has); use estimator='direct' for one that only scores texts"
            )
        pool = np.asarray(scorer.image_features(embeddings), dtype=np.float64)
        member_scores = np.asarray(scorer.score_features(pool), dtype=np.float64)
        directions = text_directions(scorer.text_features, prompts_by_attribute)
        return cls(
            attributes=tuple(prompts_by_attribute),
            pool=pool,
            member_scores=member_scores,
            directions=directions,
            duals=dual_directions(directions, ridge),
            ridge=ridge,
            weights=pool_weights(len(member_scores), len(pool), bootstrap_seed, groups),
        )

    def attribute_diffs(self) -> np.ndarray:
        """[members, attributes]: the grounded estimate of every attribute."""
        return grounded_diffs(self.member_scores, self.pool, self.duals, self.weights)

    def attribute_scores(self) -> np.ndarray:
        """[n, attributes]: the pool's standardised dual scores (a zero-shot classifier each)."""
        return standardized_scores(self.pool, self.duals)

    def pair_cells(
        self, pairs: Sequence[tuple[str, str]], cells: Sequence[tuple[str, bool, bool]]
    ) -> np.ndarray:
        """[members, pairs, cells]: per cell (name, value_a, value_b), its grounded estimate.

        A cell's score is +-z_a +-z_b, the two attributes' standardised dual scores with the
        cell's signs, so both conditions weigh the same. A composed sentence ("face of a young
        person with a beard") lets the attribute a sentence model finds more salient dominate:
        on the generated world the pairs' Spearman was 0.22 with composed sentences and 0.60
        with composed scores (bench/RESULTS.md).
        """
        if not pairs:
            return np.zeros((len(self.member_scores), 0, len(cells)))
        position = {name: i for i, name in enumerate(self.attributes)}
        unknown = [name for pair in pairs for name in pair if name not in position]
        if unknown:
            raise ValueError(f"pair attribute {unknown[0]!r} has no probe in this report")
        z = self.attribute_scores()
        out = np.empty((len(self.member_scores), len(pairs), len(cells)))
        for p, (a, b) in enumerate(pairs):
            signs = np.array([[1 if va else -1, 1 if vb else -1] for _, va, vb in cells])
            scores = z[:, [position[a], position[b]]] @ signs.T  # [n, cells]
            if np.any(scores.std(axis=0) <= 1e-12):
                raise ValueError(f"pair {a} & {b}: its two probe scores cancel on every image")
            out[:, p, :] = covariance_with(self.member_scores, scores, self.weights)
        return out


def in_probe_basis(
    directions: np.ndarray, probe_directions: np.ndarray, probe_duals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Free-text directions [q, d] given the report's treatment of its probes.

    Each direction t is written as a combination of the probe directions with the report's own
    regularisation, c = duals @ t (the duals are (G + ridge)^-1 D, so for a probe's direction c is
    nearly that probe's unit vector), and answered along c @ duals: the same decorrelated scores
    the report uses, so "a person with silver hair" vs "... whose hair is not gray" is asked the
    way the report asks Gray_Hair, and `compare` and the report agree on it. (An unregularised
    least-squares c was tried first: the 40 probe directions are close to collinear, so a single
    wording's c spread over many attributes and its answers agreed in sign with the population
    truth on 46% of 100 questions on the tuning worlds 1001-1002.) Returns
    (directions [q, d] to ground on, explained [q]: the share of |t|^2 the probes span). A text
    pair whose difference the probes barely span (a cat vs a dog, on faces) differs in little
    that the labelled images vary along; `explained` lets the caller say so.
    """
    return probe_basis(probe_directions, probe_duals)(directions)


def probe_basis(
    probe_directions: np.ndarray, probe_duals: np.ndarray
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`in_probe_basis` with the probes' side (a k x k solve, tens of milliseconds) done once,
    for a caller that asks many times (a query session: core/query.py)."""
    d = np.asarray(probe_directions, dtype=np.float64)
    duals = np.asarray(probe_duals, dtype=np.float64)
    gram = d @ d.T
    ridge = 1e-6 * np.trace(gram) / len(d)
    solver = np.linalg.solve(gram + ridge * np.eye(len(d)), d)  # [k, dim]

    def apply(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(directions, dtype=np.float64)
        projected = (t @ solver.T) @ d  # the least-squares part of t the probes span
        norms = np.einsum("qd,qd->q", t, t)
        explained = np.where(norms > 0, np.einsum("qd,qd->q", projected, projected) / norms, 0.0)
        return (t @ duals.T) @ duals, np.minimum(explained, 1.0)

    return apply
