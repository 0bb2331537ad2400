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

The estimated worst group is the declared group (report.group_by) with the highest estimate among
those the text gives at least `min_group_size` images, chosen without a label of the attribute.
On configs/spurious.yaml it is blond men, as measured (bench/RESULTS.md, "Stop 25").
"""

from __future__ import annotations

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
    "est_worst": pl.Boolean(),
}
"""The columns `estimate_groups` adds: images the text assigns to the group, the members' mean
estimate (the heads' standardised loss, in member standard deviations), its quartiles over the
members, and the estimated worst declared group."""

_SPLIT_ITERATIONS = 100
ESTIMATED_WORST = "worst group estimated from text"
"""How the sentence naming the estimated worst group starts (the HTML headline finds it so)."""


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
    member = {name: k for k, name in enumerate(grounding.attributes)}
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
        k = member.get(group["attribute"])
        if k is None:
            rows.append({"est_n": None, "est_loss": None, "est_loss_q1": None, "est_loss_q3": None})
            continue
        mask = sides[:, k] == bool(group["value"])
        if target_values is not None and group["target_value"] is not None:
            mask &= target_values == bool(group["target_value"])
        rows.append({"est_n": int(mask.sum()), **_member_summary(scores, weights, mask)})
    estimates = pl.DataFrame(
        rows, schema={k: v for k, v in ESTIMATE_SCHEMA.items() if k != "est_worst"}
    )
    out = pl.concat([table, estimates], how="horizontal")
    eligible = (
        out["declared"]
        & out["est_loss"].is_not_null()
        & (out["est_n"].fill_null(0) >= min_group_size)
    ).to_numpy()
    worst = np.zeros(out.height, dtype=bool)
    if eligible.any():
        values = np.where(eligible, out["est_loss"].fill_null(-np.inf).to_numpy(), -np.inf)
        worst[int(np.argmax(values))] = True
    return out.with_columns(pl.Series("est_worst", worst, dtype=pl.Boolean))


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
    """Headline numbers: whether the estimated worst group is the measured one (1 or 0; NaN when
    either is missing) and the Spearman correlation of the estimates with the measured mean loss
    over the declared groups that are not small (NaN below 3 of them)."""
    nan = float("nan")
    estimated = table.filter(pl.col("est_worst"))["group"].to_list()
    measured = table.filter(pl.col("worst"))["group"].to_list()
    agrees = float(estimated == measured) if estimated and measured else nan
    rows = table.filter(
        pl.col("declared") & ~pl.col("small_group") & pl.col("est_loss").is_not_null()
    )
    spearman = nan
    if rows.height >= MIN_PAIRS:
        spearman = correlations(
            rows["est_loss"].to_numpy(), rows["mean_loss"].to_numpy()
        ).spearman.coefficient
    return {"worst_group_estimated_agrees": agrees, "group_spearman_estimated": spearman}


def estimated_worst_sentence(table: pl.DataFrame) -> str | None:
    """'estimated from text, without the attribute's labels: blond men (...)', saying whether it
    is the measured worst group; None when no group could be estimated."""
    if "est_worst" not in table.columns:
        return None
    chosen = table.filter(pl.col("est_worst")).to_dicts()
    if not chosen:
        return None
    row = chosen[0]
    measured = table.filter(pl.col("worst")).to_dicts()
    if measured and measured[0]["group"] == row["group"]:
        verdict = "the same group as measured"
    elif measured:
        verdict = f"not the measured worst group ({measured[0]['group']})"
    else:
        verdict = "no measured group is large enough to compare"
    return (
        f"{ESTIMATED_WORST}, without the attribute's labels: {row['group']} "
        f"(the heads' loss {float(row['est_loss']):+.2f} member sd, quartiles "
        f"{float(row['est_loss_q1']):+.2f} to {float(row['est_loss_q3']):+.2f}; the text puts "
        f"{row['est_n']} images there); {verdict}"
    )
