"""Per-group accuracy and the worst group: the group-robustness view of the measured side.

A fairness engineer's first question about a classifier is its worst-group accuracy (CelebA's
Blond_Hair benchmark: about 0.47 on blond men under plain training). The groups are
  - for an attribute task (task.target T): the 2x2 cells T x A for every other attribute A,
    (T=1, A=1), (T=1, A=0), (T=0, A=1), (T=0, A=0);
  - for other tasks: each attribute's two values, (A=1) and (A=0).
Per group: n, the identities it spans, accuracy and mean loss, each with an identity-clustered
standard error (images of one person are not independent: the cluster-robust variance of a mean,
G/(G-1) * sum over identities of the squared summed residuals, over n^2).

The worst group is the standard one of the group-robustness literature: the lowest accuracy
among groups of at least `min_group_size` samples from at least two identities (the highest mean
loss where no accuracy is known, e.g. a loss table without predictions). With 2 x 39 cells that
minimum can be a slice of a few identities whose low accuracy is partly chance, so each group
also carries the upper bound of its 90% interval (`accuracy_upper`, accuracy + 1.645 se, at
most 1), and
the sentence says it. Ranking by that bound instead was tried on configs/spurious.yaml and is
no better: it favours large groups barely below average ('blond people without straight hair',
0.91, n=132) over small bad ones (bench/RESULTS.md, "Spurious correlation").

`report.group_by` names the attributes whose cells are the groups (`declared`), as the benchmark
declares its spurious attribute (CelebA: Blond_Hair x Male, four groups): the worst group is then
the worst declared one, and the sentence also names the lowest of all cells when it is another
(a slice such as 'blond people with goatee', 6 identities, that a scan of 156 cells turns up).
Empty (the default): every attribute's cells are declared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from llm2loss_pipeline.core.report.grounded import Grounding
from llm2loss_pipeline.core.report.group_estimates import (
    estimate_agreement,
    estimate_groups,
    estimated_worst_sentence,
)
from llm2loss_pipeline.core.task import TaskConfig

GROUP_SCHEMA: dict[str, pl.DataType] = {
    "group": pl.String(),
    "target": pl.String(),
    "target_value": pl.Boolean(),
    "attribute": pl.String(),
    "value": pl.Boolean(),
    "n": pl.Int64(),
    "n_identities": pl.Int64(),
    "accuracy": pl.Float64(),
    "accuracy_se": pl.Float64(),
    "mean_loss": pl.Float64(),
    "mean_loss_se": pl.Float64(),
    "accuracy_upper": pl.Float64(),
    "mean_loss_lower": pl.Float64(),
    "small_group": pl.Boolean(),
    "declared": pl.Boolean(),
    "worst": pl.Boolean(),
}

Z_BOUND = 1.645
"""One side of a two-sided 90% normal interval, the report's level for measured gaps."""

ADJECTIVES = {
    "Blond_Hair": "blond",
    "Black_Hair": "black-haired",
    "Brown_Hair": "brown-haired",
    "Gray_Hair": "gray-haired",
    "Bald": "bald",
    "Young": "young",
    "Chubby": "chubby",
    "Smiling": "smiling",
    "Attractive": "attractive",
    "Pale_Skin": "pale-skinned",
    "Blurry": "blurry",
}
"""Attributes that read well as an adjective before a noun ('blond men'); the rest read as
'with X' / 'without X'."""
NOUNS = {"Male": ("men", "women")}
"""Attributes that name who the people are (positive, negative)."""


def describe(conditions: Sequence[tuple[str, bool]]) -> str:
    """Plain words for a group given as (attribute, value) conditions: [(Blond_Hair, True),
    (Male, True)] -> 'blond men'; [(Eyeglasses, False)] -> 'people without eyeglasses'."""
    noun = "people"
    adjectives: list[str] = []
    phrases: list[str] = []
    for name, value in conditions:
        if name in NOUNS:
            noun = NOUNS[name][0 if value else 1]
        elif name in ADJECTIVES:
            adjectives.append(ADJECTIVES[name] if value else f"non-{ADJECTIVES[name]}")
        else:
            phrases.append(_phrase(name, value))
    text = " ".join([*adjectives, noun])
    return f"{text} {' and '.join(phrases)}" if phrases else text


def _phrase(name: str, value: bool) -> str:
    """'with X' / 'without X' from a column name, read the way the name means it: a negated name
    ('No_Beard') flips the two (not 'without no beard'), a 'Wearing_' one keeps its verb."""
    words = name.replace("_", " ").lower()
    if words.startswith("no ") and len(words) > 3:
        return f"{'without' if value else 'with'} {words[3:]}"
    if words.startswith("wearing ") and len(words) > 8:
        return words if value else f"not {words}"
    return f"{'with' if value else 'without'} {words}"


def clustered_mean(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """The mean of `values` and its cluster-robust standard error (NaN with fewer than two
    clusters, where it is not defined)."""
    y = np.asarray(values, dtype=np.float64)
    if y.size == 0:
        return float("nan"), float("nan")
    mean = float(y.mean())
    _, index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(index.max()) + 1
    if n_clusters < 2:
        return mean, float("nan")
    sums = np.bincount(index, weights=y - mean, minlength=n_clusters)
    variance = n_clusters / (n_clusters - 1) * float((sums**2).sum()) / y.size**2
    return mean, float(np.sqrt(variance))


def group_table(
    frame: pl.DataFrame,
    attributes: Sequence[str],
    task: TaskConfig,
    min_group_size: int,
    group_by: Sequence[str] = (),
) -> pl.DataFrame:
    """One row per group (see the module docstring); `frame` holds the evaluation split's
    samples: loss, correct (may be null), identity (else each sample is its own cluster), the
    boolean `attributes` and, for an attribute task, the target column. `group_by`: the
    attributes whose cells are declared groups (empty: all)."""
    target = task.target if task.kind == "attribute" else None
    if target is not None and target not in frame.columns:
        raise ValueError(f"the evaluation table has no column for task.target {target!r}")
    unknown = [name for name in group_by if name not in attributes or name == target]
    if unknown:
        raise ValueError(
            f"report.group_by names {unknown}, not among the diagnosed attributes (the task's "
            f"target excluded): {list(a for a in attributes if a != target)}"
        )
    clusters = (
        frame["identity"].to_numpy()
        if "identity" in frame.columns
        else np.arange(frame.height, dtype=np.int64)
    )
    loss = frame["loss"].to_numpy().astype(np.float64)
    correct = frame["correct"]
    known = correct.is_not_null().to_numpy()
    hits = correct.fill_null(False).to_numpy().astype(np.float64)
    target_values = (True, False) if target is not None else (None,)
    rows = []
    for name in attributes:
        if name == target:
            continue
        column = frame[name].to_numpy().astype(bool)
        for target_value in target_values:
            for value in (True, False):
                mask = column == value
                conditions = [(name, value)]
                if target is not None:
                    mask &= frame[target].to_numpy().astype(bool) == target_value
                    conditions = [(target, bool(target_value)), (name, value)]
                rows.append(
                    _group_row(conditions, mask, loss, hits, known, clusters, target, target_value)
                )
    table = pl.DataFrame(
        rows, schema={k: v for k, v in GROUP_SCHEMA.items() if k not in ("declared", "worst")}
    )
    small = (pl.col("n") < min_group_size) | (pl.col("n_identities") < 2)
    declared = pl.col("attribute").is_in(list(group_by)) if group_by else pl.lit(True)
    bounds = {
        "accuracy_upper": pl.min_horizontal(
            pl.col("accuracy") + Z_BOUND * pl.col("accuracy_se"), pl.lit(1.0)
        ),
        "mean_loss_lower": pl.col("mean_loss") - Z_BOUND * pl.col("mean_loss_se"),
    }
    table = table.with_columns(small_group=small, declared=declared, **bounds).select(
        [name for name in GROUP_SCHEMA if name != "worst"]
    )
    return with_worst(table)


def _group_row(
    conditions: list[tuple[str, bool]],
    mask: np.ndarray,
    loss: np.ndarray,
    hits: np.ndarray,
    known: np.ndarray,
    clusters: np.ndarray,
    target: str | None,
    target_value: bool | None,
) -> dict[str, object]:
    name, value = conditions[-1]
    scored = mask & known
    accuracy, accuracy_se = (
        clustered_mean(hits[scored], clusters[scored])
        if scored.any()
        else (float("nan"), float("nan"))
    )
    mean_loss, loss_se = clustered_mean(loss[mask], clusters[mask])
    return {
        "group": describe(conditions),
        "target": target,
        "target_value": target_value,
        "attribute": name,
        "value": value,
        "n": int(mask.sum()),
        "n_identities": int(np.unique(clusters[mask]).size),
        "accuracy": accuracy,
        "accuracy_se": accuracy_se,
        "mean_loss": mean_loss,
        "mean_loss_se": loss_se,
        "small_group": False,
    }


def with_worst(table: pl.DataFrame) -> pl.DataFrame:
    """`table` sorted worst first (lowest accuracy, then highest mean loss; small groups last),
    with `worst` marking the first declared row that is not a small group."""
    by_accuracy = table["accuracy"].is_not_nan().any()
    if by_accuracy:
        keys = ["small_group", "accuracy", "mean_loss"]
        descending = [False, False, True]
    else:
        keys = ["small_group", "mean_loss"]
        descending = [False, True]
    ordered = table.sort(keys, descending=descending, nulls_last=True, maintain_order=True)
    eligible = (~ordered["small_group"] & ordered["declared"]).to_list()
    first = eligible.index(True) if True in eligible else -1
    worst = [i == first for i in range(ordered.height)]
    return ordered.with_columns(pl.Series("worst", worst, dtype=pl.Boolean))


def worst_group(table: pl.DataFrame) -> dict[str, object] | None:
    """The worst declared group's row, or None when every declared group is small."""
    rows = table.filter(pl.col("worst")).to_dicts()
    return rows[0] if rows else None


def lowest_cell(table: pl.DataFrame) -> dict[str, object] | None:
    """The worst row that is not small, declared or not (`table` is sorted worst first)."""
    rows = table.filter(~pl.col("small_group")).head(1).to_dicts()
    return rows[0] if rows else None


def _group_words(row: dict[str, object]) -> str:
    return (
        f"{row['group']}, accuracy {float(row['accuracy']):.2f} "  # type: ignore[arg-type]
        f"(90% upper bound {float(row['accuracy_upper']):.2f}; n={row['n']}, "  # type: ignore[arg-type]
        f"{row['n_identities']} identities; mean loss {float(row['mean_loss']):.3f})"  # type: ignore[arg-type]
    )


def worst_group_sentence(
    row: dict[str, object] | None, lowest: dict[str, object] | None = None, n_cells: int = 0
) -> str:
    """'worst group: blond men, accuracy 0.47 (n=66, 11 identities)'; `lowest`, the lowest of
    all `n_cells` cells when it is not the worst declared group, is named after it."""
    if row is None:
        return "worst group: none (every group is below the minimum size)"
    sentence = f"worst group: {_group_words(row)}"
    if lowest is not None and lowest["group"] != row["group"]:
        sentence += (
            f"; the lowest of all {n_cells} cells, not a declared group (report.group_by): "
            f"{_group_words(lowest)}"
        )
    return sentence


def report_groups(
    eval_frame: pl.DataFrame,
    attributes: Sequence[str],
    task: TaskConfig,
    min_group_size: int,
    attribute_table: str,
    group_by: Sequence[str] = (),
    grounding: tuple[Grounding, Sequence[object]] | None = None,
) -> tuple[pl.DataFrame, dict[str, float], list[str]]:
    """The report's group table, its headline numbers and its sentences (the worst group, then
    the one estimated from text). An attribute task's target is not among the diagnosed
    attributes, so its column is read from `attribute_table` (the attribute Parquet file).
    `grounding`: the grounded estimator's pool and its sample ids, for the groups estimated from
    text (`core.report.group_estimates`); None leaves them out."""
    frame = eval_frame
    target = task.target if task.kind == "attribute" else None
    if target is not None and target not in frame.columns:
        column = pl.read_parquet(attribute_table, columns=["sample_id", target])
        frame = frame.join(column, on="sample_id", how="left", maintain_order="left")
    table = group_table(frame, attributes, task, min_group_size, group_by)
    if grounding is not None:
        table = estimate_groups(table, *grounding, frame, target, min_group_size)
    row = worst_group(table)
    nan = float("nan")
    headline = {
        "worst_group_accuracy": float(row["accuracy"]) if row else nan,  # type: ignore[arg-type]
        "worst_group_accuracy_se": float(row["accuracy_se"]) if row else nan,  # type: ignore[arg-type]
        "worst_group_mean_loss": float(row["mean_loss"]) if row else nan,  # type: ignore[arg-type]
        "worst_group_n": float(row["n"]) if row else nan,  # type: ignore[arg-type]
        "n_groups": float(table.height),
    }
    sentences = [worst_group_sentence(row, lowest_cell(table) if group_by else None, table.height)]
    if grounding is not None:
        headline.update(estimate_agreement(table))
        estimated = estimated_worst_sentence(table)
        if estimated is not None:
            sentences.append(estimated)
    return table, headline, sentences
