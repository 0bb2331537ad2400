"""The groups estimated from text: which group is worst, without the groups' labels.

The measured group table (`core.report.groups`) needs every image's attribute labels. A user who
asks "is my Blond_Hair classifier worst on blond men?" often has the task's labels (the losses
need them) but not the attribute's. Here each group is found by text instead:

1. the images the text puts on an attribute's positive side are those whose grounded dual score
   (`Grounding.attribute_scores`, the report's zero-shot classifier of that probe) lies above the
   threshold that best splits the pool's scores into two clusters (one-dimensional two-means, as
   Otsu's threshold does for grey levels). No label and no prevalence is needed; a probe that
   separates the images well (Male: zero-shot AUROC 0.99) gives two clear clusters;
2. an attribute task's target is the task's own label, known wherever a loss is, so its side of a
   cell is read from the labels;
3. member m's estimate of a group is the mean of its standardised loss estimate h_m over the
   images so assigned, under its bootstrap weights of the pool (`Grounding.weights`), so the
   members' spread carries the pool's sampling noise as well as the heads'.

The declared groups (report.group_by) the text gives at least `min_group_size` images are ranked by
their estimate, without a label of the attribute; the headline names the first three. On
configs/spurious.yaml the first is blond men, as measured, on world seeds 0, 7 and 13. On the
reporting worlds 2009-2016 (80 groups each) the estimates' Spearman with the population's group
losses is 0.67 (the measured test split's: 0.83), and the population's worst group is among the
first three on 7 of 8 worlds (bench/RESULTS.md, "Stop 25"). A ranking, not a probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from llm2loss_pipeline.core.report.grounded import Grounding
from llm2loss_pipeline.core.stats import MIN_PAIRS, correlations

ESTIMATE_SCHEMA: dict[str, pl.DataType] = {
    "est_n": pl.Int64(),
    "est_loss": pl.Float64(),
    "est_loss_q1": pl.Float64(),
    "est_loss_q3": pl.Float64(),
    "est_rank": pl.Int64(),
    "est_worst": pl.Boolean(),
}
"""The columns `estimate_groups` adds: images the text assigns to the group, the members' mean
estimate (the heads' standardised loss, in member standard deviations), its quartiles over the
members, its rank among the declared groups the text gives enough images (1: the estimated
worst; null for the others) and whether it is the estimated worst."""

_SPLIT_ITERATIONS = 100
ESTIMATED_WORST = "worst groups estimated from text"
"""How the sentence naming the estimated worst groups starts (the HTML headline finds it so)."""
N_NAMED = 3
"""Groups the sentence names, worst first. On the reporting worlds 2009-2016 the population's
worst group was the estimate's first on 3 of 8 and among its first three on 7 (all but the world
with nothing planted); on the tuning worlds 1001-1008, 4 and 6 of 8 (bench/RESULTS.md, "Stop
25"): one name would be wrong more often than right."""
ORDINALS = ("first", "second", "third")
assert len(ORDINALS) == N_NAMED, "one ordinal per group named"


def two_means_threshold(scores: np.ndarray) -> float:
    """The threshold between the two clusters of one-dimensional `scores`: the midpoint of the
    two sides' means, iterated from the median until it no longer moves (Lloyd's algorithm with
    two clusters). Scores all on one side of every split give the median."""
    x = np.asarray(scores, dtype=np.float64)
    threshold = float(np.median(x))
    for _ in range(_SPLIT_ITERATIONS):
        low, high = x[x <= threshold], x[x > threshold]
        if low.size == 0 or high.size == 0:
            return float(np.median(x))
        moved = (float(low.mean()) + float(high.mean())) / 2
        if moved == threshold:
            break
        threshold = moved
    return threshold


def text_membership(scores: np.ndarray) -> np.ndarray:
    """[n, k] booleans: per column of `scores` [n, k], the images above its two-means threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.array([two_means_threshold(scores[:, k]) for k in range(scores.shape[1])])
    return scores > thresholds


def estimate_groups(
    table: pl.DataFrame,
    grounding: Grounding,
    pool_ids: Sequence[object],
    frame: pl.DataFrame,
    target: str | None,
    min_group_size: int,
) -> pl.DataFrame:
    """`table` (the measured groups) with `ESTIMATE_SCHEMA`'s columns. `frame` maps sample_id to
    the target's labels (an attribute task); the pool `pool_ids` are the grounding's images, in
    its order. A group whose attribute has no probe in `grounding` gets null estimates."""
    column_of = {name: k for k, name in enumerate(grounding.attributes)}
    sides = text_membership(grounding.attribute_scores())
    target_values = None
    if target is not None:
        by_sample = dict(zip(frame["sample_id"].to_list(), frame[target].to_list(), strict=True))
        missing = [sample for sample in pool_ids if by_sample.get(sample) is None]
        if missing:
            raise ValueError(
                f"pool image {missing[0]!r} has no label of the task's target {target!r} "
                f"({len(missing)} such images)"
            )
        target_values = np.array([bool(by_sample[sample]) for sample in pool_ids])
    scores, weights = grounding.member_scores, grounding.weights
    rows: list[dict[str, object]] = []
    for group in table.iter_rows(named=True):
        k = column_of.get(group["attribute"])
        if k is None:
            rows.append({"est_n": None, "est_loss": None, "est_loss_q1": None, "est_loss_q3": None})
            continue
        mask = sides[:, k] == bool(group["value"])
        if target_values is not None and group["target_value"] is not None:
            mask &= target_values == bool(group["target_value"])
        rows.append({"est_n": int(mask.sum()), **_member_summary(scores, weights, mask)})
    estimates = pl.DataFrame(
        rows,
        schema={k: v for k, v in ESTIMATE_SCHEMA.items() if k not in ("est_rank", "est_worst")},
    )
    out = pl.concat([table, estimates], how="horizontal")
    eligible = (
        out["declared"]
        & out["est_loss"].is_not_null()
        & (out["est_n"].fill_null(0) >= min_group_size)
    ).to_numpy()
    values = np.where(eligible, out["est_loss"].fill_null(-np.inf).to_numpy(), -np.inf)
    rank = np.full(out.height, None, dtype=object)
    for position, i in enumerate(np.argsort(-values, kind="stable")[: int(eligible.sum())]):
        rank[i] = position + 1
    return out.with_columns(
        pl.Series("est_rank", rank.tolist(), dtype=pl.Int64),
        pl.Series("est_worst", (rank == 1).tolist(), dtype=pl.Boolean),
    )


def _member_summary(scores: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> dict[str, object]:
    """Each member's weighted mean of its scores over the masked images; their mean and quartiles
    (nulls where no member drew an image of the group)."""
    w = weights[:, mask]
    totals = w.sum(axis=1)
    drawn = totals > 0
    if not drawn.any():
        return {"est_loss": None, "est_loss_q1": None, "est_loss_q3": None}
    means = (w[drawn] * scores[drawn][:, mask]).sum(axis=1) / totals[drawn]
    q1, q3 = np.quantile(means, [0.25, 0.75])
    return {"est_loss": float(means.mean()), "est_loss_q1": float(q1), "est_loss_q3": float(q3)}


def estimate_agreement(table: pl.DataFrame) -> dict[str, float]:
    """Headline numbers: whether the estimated worst group is the measured one (1 or 0), the
    measured worst group's rank among the estimates (NaN where either is missing), and the
    Spearman correlation of the estimates with the measured mean loss over the declared groups
    that are not small (NaN below 3 of them)."""
    nan = float("nan")
    measured = table.filter(pl.col("worst"))["est_rank"].to_list()
    rank = float(measured[0]) if measured and measured[0] is not None else nan
    agrees = float(rank == 1) if math.isfinite(rank) else nan
    rows = table.filter(
        pl.col("declared") & ~pl.col("small_group") & pl.col("est_loss").is_not_null()
    )
    spearman = nan
    if rows.height >= MIN_PAIRS:
        spearman = correlations(
            rows["est_loss"].to_numpy(), rows["mean_loss"].to_numpy()
        ).spearman.coefficient
    return {
        "worst_group_estimated_agrees": agrees,
        "worst_group_estimated_rank": rank,
        "group_spearman_estimated": spearman,
    }


def estimated_worst_sentence(table: pl.DataFrame) -> str | None:
    """'worst groups estimated from text, without the attribute's labels: blond men (...), then
    ...', the first `N_NAMED`, and where among them the measured worst group is; None when no
    group could be estimated."""
    if "est_rank" not in table.columns:
        return None
    named = table.filter(pl.col("est_rank") <= N_NAMED).sort("est_rank").to_dicts()
    if not named:
        return None
    first, rest = named[0], named[1:]
    words = (
        f"{first['group']} (the heads' loss {float(first['est_loss']):+.2f} member sd, quartiles "
        f"{float(first['est_loss_q1']):+.2f} to {float(first['est_loss_q3']):+.2f}; the text puts "
        f"{first['est_n']} images there)"
    )
    if rest:
        words += ", then " + ", ".join(
            f"{row['group']} ({float(row['est_loss']):+.2f})" for row in rest
        )
    measured = table.filter(pl.col("worst")).to_dicts()
    if not measured:
        verdict = "no measured group is large enough to compare"
    elif measured[0]["est_rank"] is not None and measured[0]["est_rank"] <= len(named):
        verdict = f"the measured worst group is the {ORDINALS[measured[0]['est_rank'] - 1]} of them"
    else:
        verdict = f"the measured worst group ({measured[0]['group']}) is not among them"
    return f"{ESTIMATED_WORST}, without the attribute's labels: {words}; {verdict}"
