"""Estimated disparity: what the diagnosis heads say about each attribute, asked in text.

For an attribute with prompt pairs (positive_t, negative_t), t = 1..T, ensemble member m gives

    diff[m] = mean over t of ( score_m(positive_t) - score_m(negative_t) )

where score_m is the member's standardized loss estimate (higher = worse). diff > 0 means the
member expects the black box to do worse on faces with the attribute. Members are grouped as the
whole ensemble ("overall"), per head kind ("regressor", "ranker") and per kind x architecture
("regressor/linear", ...); each group summarises its members' diffs by mean, spread, quartiles and
P(diff > 0) (ties counting half).

Significance: "the disparity is nonzero" is tested per attribute and group from the members'
spread as a standard error (`core.stats.replicate_pvalue`: mean / std with M - 1 degrees of
freedom). Members train on bootstrap resamples and are grounded on bootstrap resamples of the
evaluation identities, so they are replicates of one estimate, not independent samples of it: a
one-sample t-test across them (mean / (std / sqrt(M))) called 40 of 40 attributes significant on
the default world, 6 of them with the wrong sign. p-values are corrected across the attributes of
a group (and, separately, across pairs) with Benjamini-Hochberg; `bh_significant` is q <= alpha.
These per-group figures still leave out the text side's error; the report's attribute claims add
it (core/report/calibration.py).

Zero-shot AUROC: the encoder alone as a classifier of the attribute, scoring image i by
mean over t of ( cos(img_i, positive_t) - cos(img_i, negative_t) ).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl

from llm2loss_pipeline.core.members import MemberGroup, MemberInfoLike
from llm2loss_pipeline.core.stats import (
    benjamini_hochberg,
    bh_adjust,
    prob_positive,
    replicate_pvalue,
)


class ScorerLike(Protocol):
    members: Sequence[Any]

    def score_texts(self, texts: Sequence[str]) -> np.ndarray: ...


PromptPairs = Callable[[str], Sequence[tuple[str, str]]]
EncodeTexts = Callable[[Sequence[str]], np.ndarray]
AurocFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class TextScores:
    """Member scores of a set of distinct texts, from one batched `score_texts` call."""

    texts: tuple[str, ...]
    matrix: np.ndarray  # [members, texts]

    def columns(self, texts: Sequence[str]) -> np.ndarray:
        """Scores [members, len(texts)] of the given texts (each must have been scored)."""
        index = {text: i for i, text in enumerate(self.texts)}
        try:
            positions = [index[text] for text in texts]
        except KeyError as exc:
            raise KeyError(f"text {exc.args[0]!r} was not scored") from exc
        return self.matrix[:, positions]


def score_texts_once(scorer: ScorerLike, texts: Sequence[str]) -> TextScores:
    """Score the distinct texts of `texts` with one batched call, checking shape and values."""
    unique = tuple(dict.fromkeys(texts))
    if not unique:
        raise ValueError("no texts to score")
    matrix = np.asarray(scorer.score_texts(list(unique)), dtype=np.float64)
    expected = (len(scorer.members), len(unique))
    if matrix.shape != expected:
        raise ValueError(
            f"score_texts returned shape {matrix.shape}, expected (members, texts) = {expected}"
        )
    if not np.all(np.isfinite(matrix)):
        member, column = np.argwhere(~np.isfinite(matrix))[0]
        raise ValueError(
            f"score_texts gave a non-finite score for member {int(member)} on text "
            f"{unique[int(column)]!r}"
        )
    return TextScores(unique, matrix)


def collect_prompt_pairs(
    attributes: Sequence[str], prompt_pairs: PromptPairs
) -> dict[str, list[tuple[str, str]]]:
    """attribute -> its (positive, negative) prompts, checked to be non-empty text pairs."""
    collected = {}
    for name in attributes:
        pairs = [tuple(pair) for pair in prompt_pairs(name)]
        if not pairs:
            raise ValueError(f"attribute_prompt_pairs({name!r}) returned no prompts")
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise ValueError(f"attribute_prompt_pairs({name!r}) gave a bad pair {pair!r}")
        collected[name] = pairs
    return collected  # type: ignore[return-value]


def member_diffs(
    scores: TextScores, pairs_by_item: Mapping[str, Sequence[tuple[str, str]]]
) -> np.ndarray:
    """[members, items]: per member, the mean over an item's pairs of score(pos) - score(neg)."""
    columns = []
    for pairs in pairs_by_item.values():
        positive = scores.columns([p for p, _ in pairs])
        negative = scores.columns([n for _, n in pairs])
        columns.append((positive - negative).mean(axis=1))
    return np.stack(columns, axis=1)


SUMMARY_SCHEMA: dict[str, Any] = {
    "group": pl.String,
    "kind": pl.String,
    "arch": pl.String,
    "n_members": pl.Int64,
    "mean": pl.Float64,
    "std": pl.Float64,
    "min": pl.Float64,
    "q1": pl.Float64,
    "median": pl.Float64,
    "q3": pl.Float64,
    "max": pl.Float64,
    "p_positive": pl.Float64,
    "p_value": pl.Float64,
    "q_value": pl.Float64,
    "bh_significant": pl.Boolean,
}


def summarize(
    diffs: np.ndarray,
    items: Sequence[str],
    groups: Sequence[MemberGroup],
    alpha: float = 0.05,
    item_column: str = "attribute",
) -> pl.DataFrame:
    """Long table: one row per (item, group) with the distribution of the members' diffs.

    Benjamini-Hochberg runs within each group across all `items`.
    """
    if diffs.shape[1] != len(items):
        raise ValueError(f"diffs has {diffs.shape[1]} columns for {len(items)} items")
    rows = []
    for group in groups:
        sub = diffs[list(group.positions), :]
        quartiles = np.quantile(sub, [0.0, 0.25, 0.5, 0.75, 1.0], axis=0)
        p_values = np.array([replicate_pvalue(sub[:, j]) for j in range(len(items))])
        q_values = bh_adjust(p_values)
        significant = benjamini_hochberg(p_values, alpha)
        positive = prob_positive(sub, axis=0)
        std = sub.std(axis=0, ddof=1) if sub.shape[0] > 1 else np.full(len(items), np.nan)
        for j, item in enumerate(items):
            rows.append(
                {
                    item_column: item,
                    "group": group.name,
                    "kind": group.kind,
                    "arch": group.arch,
                    "n_members": len(group.positions),
                    "mean": float(sub[:, j].mean()),
                    "std": float(std[j]),
                    "min": float(quartiles[0, j]),
                    "q1": float(quartiles[1, j]),
                    "median": float(quartiles[2, j]),
                    "q3": float(quartiles[3, j]),
                    "max": float(quartiles[4, j]),
                    "p_positive": float(positive[j]),
                    "p_value": float(p_values[j]),
                    "q_value": float(q_values[j]),
                    "bh_significant": bool(significant[j]),
                }
            )
    return pl.DataFrame(rows, schema={item_column: pl.String, **SUMMARY_SCHEMA})


def member_diffs_long(
    diffs: np.ndarray,
    items: Sequence[str],
    members: Sequence[MemberInfoLike],
    item_column: str = "attribute",
) -> pl.DataFrame:
    """Long table: one row per (item, member) with the member's diff, for plots and audits."""
    rows = [
        {
            item_column: item,
            "member": int(member.index),
            "kind": member.kind,
            "arch": member.arch,
            "seed": int(member.seed),
            "diff": float(diffs[m, j]),
        }
        for j, item in enumerate(items)
        for m, member in enumerate(members)
    ]
    schema = {item_column: pl.String, "member": pl.Int64, "kind": pl.String}
    schema |= {"arch": pl.String, "seed": pl.Int64, "diff": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def zero_shot_auroc(
    embeddings: np.ndarray,
    labels: Mapping[str, np.ndarray],
    pairs_by_attribute: Mapping[str, Sequence[tuple[str, str]]],
    encode_texts: EncodeTexts,
    auroc_fn: AurocFn,
) -> pl.DataFrame:
    """Per attribute: AUROC of mean_t [cos(img, pos_t) - cos(img, neg_t)] as its classifier.

    All prompts are encoded in one call. An attribute whose labels are all equal on the split has
    no defined AUROC (NaN). Columns: attribute, zero_shot_auroc, n_positive, n_negative.
    """
    images = np.asarray(embeddings, dtype=np.float64)
    if images.ndim != 2:
        raise ValueError(f"embeddings must be [samples, dim], got shape {images.shape}")
    norms = np.linalg.norm(images, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"image embedding {int(np.flatnonzero(norms == 0)[0])} is all zeros")
    images = images / norms
    texts = list(
        dict.fromkeys(t for pairs in pairs_by_attribute.values() for p in pairs for t in p)
    )
    encoded = np.asarray(encode_texts(texts), dtype=np.float64)
    if encoded.shape != (len(texts), images.shape[1]):
        raise ValueError(
            f"encode_texts returned shape {encoded.shape}, expected "
            f"(texts, dim) = {(len(texts), images.shape[1])}"
        )
    text_norms = np.linalg.norm(encoded, axis=1, keepdims=True)
    if np.any(text_norms == 0) or not np.all(np.isfinite(encoded)):
        bad = int(np.flatnonzero((text_norms[:, 0] == 0) | ~np.all(np.isfinite(encoded), 1))[0])
        raise ValueError(f"encode_texts gave a zero or non-finite embedding for {texts[bad]!r}")
    encoded = encoded / text_norms
    row = {text: i for i, text in enumerate(texts)}
    rows = []
    for name, pairs in pairs_by_attribute.items():
        # mean_t (img . pos_t - img . neg_t) = img . mean_t (pos_t - neg_t): one direction each.
        direction = np.mean([encoded[row[p]] - encoded[row[n]] for p, n in pairs], axis=0)
        y = np.asarray(labels[name], dtype=bool)
        if y.shape != (images.shape[0],):
            raise ValueError(f"labels of {name} have shape {y.shape}, expected {images.shape[:1]}")
        n_pos = int(y.sum())
        value = float("nan")
        if 0 < n_pos < y.size:
            value = float(auroc_fn(images @ direction, y))
        rows.append(
            {
                "attribute": name,
                "zero_shot_auroc": value,
                "n_positive": n_pos,
                "n_negative": int(y.size - n_pos),
            }
        )
    schema = {"attribute": pl.String, "zero_shot_auroc": pl.Float64}
    schema |= {"n_positive": pl.Int64, "n_negative": pl.Int64}
    return pl.DataFrame(rows, schema=schema)
