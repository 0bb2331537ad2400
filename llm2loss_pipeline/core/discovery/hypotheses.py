"""From candidate descriptions to a ranked table of failure hypotheses, with their evidence.

For every candidate t:

1. Estimate (the heads). Each member's standardised output at the text, minus that member's mean
   output over the evaluation split's images: "how many standard deviations worse than the
   population the member expects inputs like t to be". The ensemble gives its mean, quartiles
   and P(worse), the share of members above the population mean. `p_estimate` is the one-sided
   sign test of that share against 1/2 (informative only: members are not independent draws).
2. Verify (real samples, verify.py): the matched samples' losses against the rest.
3. Weigh (influence.py): each matched sample's influence on the ensemble's estimate for t.
   Proponents are the matched samples that push the estimate up most; counter-examples are the
   matched samples that pull it down (negative influence: their loss is lower than the heads
   predict), most negative first, topped up with the matched samples whose loss is below the
   rest's median (lowest first) when fewer pull it down. `n_supporting` counts matched samples
   with positive influence; `influence_weighted_gap` is the matched-vs-rest loss gap with each
   matched sample weighted by |influence|, i.e. measured where the estimate comes from.

Kept when both say worse: ensemble mean above the population, P(worse) >= `min_p_worse`, matched
samples worse on average and by rank (AUROC > 1/2), and the Mann-Whitney p-value significant
after Benjamini-Hochberg control at `alpha` across all candidates (`q_value`). BH is applied to
the sample evidence only: the estimate side is a gate, because a sign test over 8 or 20
correlated members cannot carry a false discovery rate over thousands of candidates.

Ranking. Kept hypotheses first, by measured AUROC (the effect on real samples, scale-free), then
the rest by q-value. Near duplicates ("gray hair" and "gray hair and a goatee" match mostly the
same samples) would fill the top of the table with one finding, so a kept hypothesis whose
matched samples overlap a better-ranked kept one by more than `max_overlap` (Jaccard) is moved
after every distinct kept one and names it in `redundant_with`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy import stats as sps

from llm2loss_pipeline.core.discovery.candidates import Candidate
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.influence import (
    InfluenceInputs,
    member_influences,
    pool_members,
)
from llm2loss_pipeline.core.discovery.verify import jaccard, match_count, measure, top_matches
from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.stats import bh_adjust

INFLUENCE_BUDGET = 20_000_000
"""Influence values computed at once (members x samples x texts), to bound memory."""

HYPOTHESIS_COLUMNS = (
    "rank",
    "description",
    "source",
    "attributes",
    "kept",
    "estimated_gap",
    "estimated_q1",
    "estimated_q3",
    "p_worse",
    "p_estimate",
    "measured_gap",
    "measured_gap_std",
    "measured_auc",
    "p_value",
    "q_value",
    "confidence",
    "n_matched",
    "n_supporting",
    "influence_weighted_gap",
    "redundant_with",
)


@dataclass(frozen=True)
class EvalData:
    """The evaluation split as discovery sees it: raw (L2-normalised) image embeddings."""

    sample_ids: list[str]
    embeddings: np.ndarray
    losses: np.ndarray


@dataclass(frozen=True)
class Discovery:
    hypotheses: pl.DataFrame
    """one row per candidate, ranked; columns HYPOTHESIS_COLUMNS"""
    evidence: pl.DataFrame
    """rank, description, role (proponent / counter_example), position, sample_id, loss,
    similarity, influence; for kept hypotheses"""
    n_candidates: int
    n_kept: int


def _estimates(
    ensemble: HeadEnsemble, text_x: np.ndarray, image_x: np.ndarray
) -> dict[str, np.ndarray]:
    population = ensemble.standardized(image_x).mean(axis=1)  # [M]
    members = ensemble.standardized(text_x) - population[:, None]  # [M, T]
    above = (members > 0).sum(axis=0)
    n_members = members.shape[0]
    p_estimate = np.array([sps.binomtest(int(k), n_members, 0.5, "greater").pvalue for k in above])
    return {
        "estimated_gap": members.mean(axis=0),
        "estimated_q1": np.quantile(members, 0.25, axis=0),
        "estimated_q3": np.quantile(members, 0.75, axis=0),
        "p_worse": above / n_members,
        "p_estimate": p_estimate,
    }


def _influences(
    ensemble: HeadEnsemble,
    inputs: InfluenceInputs,
    text_x: np.ndarray,
    damping: float,
    progress: Callable[[str], None] | None,
) -> np.ndarray:
    """Pooled influence [n_eval, T], in chunks of texts that fit INFLUENCE_BUDGET."""
    n, n_texts = inputs.sample_x.shape[0], text_x.shape[0]
    chunk = max(1, INFLUENCE_BUDGET // max(1, len(ensemble) * n))
    pooled = np.zeros((n, n_texts))
    for start in range(0, n_texts, chunk):
        block = text_x[start : start + chunk]
        pooled[:, start : start + chunk] = pool_members(
            member_influences(ensemble, inputs, block, damping=damping)
        )
        if progress is not None and n_texts > chunk:
            progress(f"influence: {min(start + chunk, n_texts)}/{n_texts} descriptions")
    return pooled


def discover(
    candidates: Sequence[Candidate],
    text_embeddings: np.ndarray,
    ensemble: HeadEnsemble,
    gap: ModalityGap,
    eval_data: EvalData,
    train_embeddings: np.ndarray,
    config: DiscoveryConfig,
    *,
    train_losses: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> Discovery:
    """Score, verify, weigh and rank every candidate (module docstring).

    `text_embeddings` [T, d] are the candidates' raw text embeddings; `train_embeddings` the heads'
    training images (raw), for the linear heads' Hessian; `train_losses` their losses, whose
    samples serve as the rankers' reference partners (default: the evaluation split's).
    """
    if len(candidates) != len(text_embeddings):
        raise ValueError(f"{len(candidates)} candidates but {len(text_embeddings)} text embeddings")
    if not candidates:
        raise ValueError("no candidate descriptions to test")
    losses = np.asarray(eval_data.losses, dtype=np.float64)
    n = losses.shape[0]
    if len(eval_data.sample_ids) != n or eval_data.embeddings.shape[0] != n:
        raise ValueError("eval sample ids, embeddings and losses must be the same samples")
    text_x = gap.text(text_embeddings)
    image_x = gap.image(eval_data.embeddings)
    train_x = gap.image(train_embeddings)

    estimates = _estimates(ensemble, text_x, image_x)
    similarity = image_x.astype(np.float64) @ text_x.astype(np.float64).T  # [n, T]
    matches = top_matches(similarity, match_count(n, config.match_fraction, config.min_matches))
    measured = [measure(losses, row) for row in matches]

    rng = np.random.default_rng(0)
    if train_losses is not None:
        ref_pool_x, ref_pool_loss = train_x, np.asarray(train_losses, dtype=np.float64)
    else:
        ref_pool_x, ref_pool_loss = image_x, losses
    ref = rng.choice(
        ref_pool_x.shape[0], min(config.ranker_partners, ref_pool_x.shape[0]), replace=False
    )
    inputs = InfluenceInputs(
        train_x=train_x,
        sample_x=image_x,
        sample_loss=losses,
        ref_x=ref_pool_x[np.sort(ref)],
        ref_loss=ref_pool_loss[np.sort(ref)],
    )
    influence = _influences(ensemble, inputs, text_x, config.damping, progress)

    p_values = np.array([m.p_value for m in measured])
    q_values = bh_adjust(p_values)
    rows: list[dict[str, Any]] = []
    for t, candidate in enumerate(candidates):
        m = measured[t]
        matched = matches[t]
        weights = np.abs(influence[matched, t])
        rest_mean = (losses.sum() - losses[matched].sum()) / (n - matched.size)
        weighted_gap = (
            float(np.sum(weights * (losses[matched] - rest_mean)) / weights.sum())
            if weights.sum() > 0
            else float("nan")
        )
        est = {key: float(values[t]) for key, values in estimates.items()}
        kept = bool(
            est["estimated_gap"] > 0
            and est["p_worse"] >= config.min_p_worse
            and m.gap > 0
            and m.auc > 0.5
            and q_values[t] <= config.alpha
        )
        rows.append(
            {
                "description": candidate.text,
                "source": candidate.source,
                "attributes": candidate.attributes,
                "kept": kept,
                **est,
                "measured_gap": m.gap,
                "measured_gap_std": m.gap_std,
                "measured_auc": m.auc,
                "p_value": m.p_value,
                "q_value": float(q_values[t]),
                "confidence": float(min(est["p_worse"], 1.0 - q_values[t])),
                "n_matched": m.n_matched,
                "n_supporting": int(np.sum(influence[matched, t] > 0)),
                "influence_weighted_gap": weighted_gap,
                "_index": t,
            }
        )
    order = _rank(rows, matches, config.max_overlap)
    ranked = []
    for position, index in enumerate(order):
        row = dict(rows[index])
        row["rank"] = position + 1
        ranked.append(row)
    table = pl.DataFrame(
        [{key: row.get(key) for key in HYPOTHESIS_COLUMNS} for row in ranked],
        schema_overrides={"redundant_with": pl.String},
    )
    evidence = _evidence(ranked, matches, similarity, influence, losses, eval_data, config)
    return Discovery(table, evidence, len(candidates), int(table["kept"].sum()))


def _rank(rows: list[dict[str, Any]], matches: np.ndarray, max_overlap: float) -> list[int]:
    kept = sorted(
        (i for i, row in enumerate(rows) if row["kept"]),
        key=lambda i: (-rows[i]["measured_auc"], rows[i]["q_value"], i),
    )
    distinct: list[int] = []
    redundant: list[int] = []
    for i in kept:
        twin = next((j for j in distinct if jaccard(matches[i], matches[j]) > max_overlap), None)
        if twin is None:
            distinct.append(i)
        else:
            rows[i]["redundant_with"] = rows[twin]["description"]
            redundant.append(i)
    rest = sorted(
        (i for i, row in enumerate(rows) if not row["kept"]),
        key=lambda i: (
            rows[i]["q_value"] if np.isfinite(rows[i]["q_value"]) else 2.0,
            -rows[i]["estimated_gap"],
            i,
        ),
    )
    return distinct + redundant + rest


def _evidence(
    ranked: list[dict[str, Any]],
    matches: np.ndarray,
    similarity: np.ndarray,
    influence: np.ndarray,
    losses: np.ndarray,
    eval_data: EvalData,
    config: DiscoveryConfig,
) -> pl.DataFrame:
    records: list[dict[str, Any]] = []
    for row in ranked:
        if not row["kept"]:
            continue
        t = row["_index"]
        matched = matches[t]
        values = influence[matched, t]
        by_influence = np.argsort(-values, kind="stable")
        proponents = [k for k in by_influence if values[k] > 0][: config.n_evidence]
        counter = [k for k in by_influence[::-1] if values[k] < 0][: config.n_evidence]
        if len(counter) < config.n_evidence:
            # a group the heads underrate everywhere has no negative influence; its easiest
            # matched samples still show what the description also covers
            rest = np.setdiff1d(np.arange(losses.size), matched)
            easy = [
                k
                for k in np.argsort(losses[matched], kind="stable")
                if losses[matched][k] <= np.median(losses[rest])
            ]
            counter += [k for k in easy if k not in counter and k not in proponents]
            counter = counter[: config.n_evidence]
        for role, picks in (("proponent", proponents), ("counter_example", counter)):
            for position, k in enumerate(picks):
                sample = int(matched[k])
                records.append(
                    {
                        "rank": row["rank"],
                        "description": row["description"],
                        "role": role,
                        "position": position + 1,
                        "sample_id": eval_data.sample_ids[sample],
                        "loss": float(losses[sample]),
                        "similarity": float(similarity[sample, t]),
                        "influence": float(values[k]),
                    }
                )
    schema = {
        "rank": pl.Int64,
        "description": pl.String,
        "role": pl.String,
        "position": pl.Int64,
        "sample_id": pl.String,
        "loss": pl.Float64,
        "similarity": pl.Float64,
        "influence": pl.Float64,
    }
    return pl.DataFrame(records, schema=schema)
