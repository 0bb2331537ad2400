"""Intersectional disparity: pairs of attributes, each split into four cells.

For a pair (A, B) the cells are TT (A and B), TF (A, not B), FT (not A, B) and FF (neither).
Measured: the black box's mean loss, accuracy and AUROC per cell (pair_cells.sql). Estimated: per
member, the mean over templates of the score of the composed prompt of each cell (e.g.
"face of an old man"). Two disparities per pair, each both measured and estimated:

- signed = loss(TT) - loss(FF): positive = worse on faces with both attributes than with neither;
  the estimated one has a member distribution (quartiles, P(>0), t-test, BH across pairs);
- gap = worst cell - best cell, over the cells with at least `min_group_size` samples (the same
  cells for the estimate), with the worst cell named on both sides so they can be compared.

A pair is `small_group` when its TT or FF cell has fewer than `min_group_size` samples.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence

import duckdb
import numpy as np
import polars as pl

from llm2loss_pipeline.core.members import MemberGroup
from llm2loss_pipeline.core.report.estimated import (
    TextScores,
    member_diffs_long,
    summarize,
)
from llm2loss_pipeline.core.report.measured import (
    EvalInputs,
    known_attributes,
    measured_attribute_table,
)
from llm2loss_pipeline.core.sql import run_sql

CELLS: tuple[tuple[str, bool, bool], ...] = (
    ("TT", True, True),
    ("TF", True, False),
    ("FT", False, True),
    ("FF", False, False),
)
CELL_NAMES = tuple(cell for cell, _, _ in CELLS)

ComposePrompt = Callable[..., str]


def pair_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]} & {pair[1]}"


def validate_pairs(
    pairs: Sequence[Sequence[str]], attributes: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Pairs of two different attributes, without repeats (in either order); with `attributes`
    (the dataset's diagnosed attributes), each name must be one of them."""
    seen: set[frozenset[str]] = set()
    result = []
    for position, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"pair {position} is {pair!r}; expected two attribute names")
        a, b = (_known(position, name, attributes) for name in pair)
        if a == b:
            raise ValueError(f"pair {position} names {a!r} twice")
        key = frozenset((a, b))
        if key in seen:
            raise ValueError(f"pair {position} ({a}, {b}) is listed twice")
        seen.add(key)
        result.append((a, b))
    return result


def _known(position: int, name: object, attributes: Sequence[str] | None) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"pair {position}: {name!r} is not an attribute name")
    if attributes is not None and name not in attributes:
        close = difflib.get_close_matches(name, list(attributes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"report.pairs: pair {position} names {name!r}, which is not a diagnosed attribute of "
            f"this dataset{hint}; its attributes are {', '.join(list(attributes)[:12])}"
            f"{', ...' if len(attributes) > 12 else ''}"
        )
    return name


WORST_ATTRIBUTES = 3
"""How many of the attributes measured worst seed the default pairs."""


def frequent_pairs(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str,
    k: int = 10,
    attributes: Sequence[str] | None = None,
    min_group_size: int = 20,
) -> list[tuple[str, str]]:
    """The default `k` pairs on `split`: about half built from the attributes measured worst,
    the rest the pairs whose positives co-occur most often; each pair in the order of
    `attributes` (None: every attribute of the table, in its order: CelebA's for CelebA).

    Only the most frequent pairs would be common attributes (Smiling & Mouth_Slightly_Open),
    which says little about where the model fails; pairs of the worst attributes show whether
    their failures compound. A worst pair needs `min_group_size` samples with both attributes,
    so its TT cell is measurable.
    """
    if k < 1:
        raise ValueError(f"the number of pairs must be at least 1, got {k}")
    attributes = known_attributes(inputs, attributes)
    order = {name: i for i, name in enumerate(attributes)}
    n_all = len(attributes) * (len(attributes) - 1) // 2
    params = {"split": split, "k": n_all, "attribute_names": list(attributes)}
    frame = run_sql(con, "frequent_pairs", params, inputs.tables())
    counts = [((a, b) if order[a] < order[b] else (b, a), int(n)) for a, b, n in frame.iter_rows()]
    ranked = worst_measured(con, inputs, split, attributes, min_group_size, n=len(attributes))
    chosen = _worst_pairs(counts, ranked, (k + 1) // 2, min_group_size)
    for pair, _ in counts:
        if len(chosen) >= k:
            break
        if pair not in chosen:
            chosen.append(pair)
    return chosen


def worst_measured(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str,
    attributes: Sequence[str] | None = None,
    min_group_size: int = 20,
    n: int = WORST_ATTRIBUTES,
) -> list[str]:
    """The `n` attributes with the largest measured loss gap (worse with them) among those with
    at least `min_group_size` samples on both sides."""
    table = measured_attribute_table(con, inputs, split, min_group_size, attributes)
    usable = table.filter(~pl.col("small_group") & pl.col("gap_loss").is_finite())
    return usable.sort("gap_loss", descending=True)["attribute"].head(n).to_list()


def _worst_pairs(
    counts: Sequence[tuple[tuple[str, str], int]], ranked: Sequence[str], k: int, min_both: int
) -> list[tuple[str, str]]:
    """Up to `k` pairs holding one of the WORST_ATTRIBUTES first of `ranked` (worst first) that
    have a partner with `min_both` samples of both. The worst attributes take turns, worst
    first, each adding its next partner: other worst attributes first, then the most frequent.
    A rare attribute with no such partner is passed over, as its TT cell could not be measured."""
    usable = [(pair, n) for pair, n in counts if n >= min_both]
    paired = {name for pair, _ in usable for name in pair}
    worst = [name for name in ranked if name in paired][:WORST_ATTRIBUTES]
    both_worst = set(worst)
    ordered = [
        pair for pair, n in sorted(usable, key=lambda i: (not set(i[0]) <= both_worst, -i[1]))
    ]
    partners = {name: [pair for pair in ordered if name in pair] for name in worst}
    chosen: list[tuple[str, str]] = []
    for turn in range(max((len(p) for p in partners.values()), default=0)):
        for name in worst:
            mine = partners[name]
            if len(chosen) < k and turn < len(mine) and mine[turn] not in chosen:
                chosen.append(mine[turn])
    return chosen


CELL_SCHEMA = {
    "pair": pl.String,
    "attribute_a": pl.String,
    "attribute_b": pl.String,
    "cell": pl.String,
    "value_a": pl.Boolean,
    "value_b": pl.Boolean,
    "n": pl.Int64,
    "mean_loss": pl.Float64,
    "accuracy": pl.Float64,
    "auroc": pl.Float64,
    "small_group": pl.Boolean,
}


def measured_pair_cells(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str,
    pairs: Sequence[tuple[str, str]],
    min_group_size: int = 20,
    attributes: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Long table: four rows per pair (cells TT, TF, FT, FF), empty cells as n = 0."""
    if not pairs:
        return pl.DataFrame(schema=CELL_SCHEMA)
    attributes = known_attributes(inputs, attributes)
    params = {
        "split": split,
        "attribute_names": list(attributes),
        "first": [a for a, _ in pairs],
        "second": [b for _, b in pairs],
    }
    frame = run_sql(con, "pair_cells", params, inputs.tables())
    found = {
        (row["attribute_a"], row["attribute_b"], bool(row["value_a"]), bool(row["value_b"])): row
        for row in frame.iter_rows(named=True)
    }
    rows = []
    for a, b in pairs:
        for cell, value_a, value_b in CELLS:
            hit = found.get((a, b, value_a, value_b))
            n = int(hit["n"]) if hit else 0
            rows.append(
                {
                    "pair": pair_name((a, b)),
                    "attribute_a": a,
                    "attribute_b": b,
                    "cell": cell,
                    "value_a": value_a,
                    "value_b": value_b,
                    "n": n,
                    "mean_loss": _number(hit, "mean_loss"),
                    "accuracy": _number(hit, "accuracy"),
                    "auroc": _number(hit, "auroc"),
                    "small_group": n < min_group_size,
                }
            )
    return pl.DataFrame(rows, schema=CELL_SCHEMA)


def _number(hit: dict | None, key: str) -> float:
    """A cell's metric, NaN (shown as missing) for an empty cell or a metric the loss table
    cannot give: a ready loss table with only `sample_id, loss` has no accuracy or AUROC."""
    value = hit.get(key) if hit else None
    return math.nan if value is None else float(value)


def pair_cell_prompts(
    pairs: Sequence[tuple[str, str]], compose: ComposePrompt, templates: Sequence[str]
) -> dict[str, dict[str, list[str]]]:
    """pair -> cell -> the composed prompt of that cell under each template."""
    if not templates:
        raise ValueError("at least one prompt template is needed for the pairs")
    prompts: dict[str, dict[str, list[str]]] = {}
    for a, b in pairs:
        prompts[pair_name((a, b))] = {
            cell: [compose({a: value_a, b: value_b}, template) for template in templates]
            for cell, value_a, value_b in CELLS
        }
    return prompts


def estimated_pair_cells(
    scores: TextScores, prompts: Mapping[str, Mapping[str, Sequence[str]]]
) -> np.ndarray:
    """[members, pairs, 4 cells]: each member's mean score over a cell's templates."""
    return np.stack(
        [
            np.stack([scores.columns(cells[c]).mean(axis=1) for c in CELL_NAMES], axis=1)
            for cells in prompts.values()
        ],
        axis=1,
    )


def _gap(values: np.ndarray, usable: np.ndarray) -> tuple[float, str | None, str | None]:
    """(worst - best, worst cell, best cell) over the usable cells; NaN with fewer than two."""
    if usable.sum() < 2:
        return math.nan, None, None
    positions = np.flatnonzero(usable)
    worst = positions[int(np.argmax(values[positions]))]
    best = positions[int(np.argmin(values[positions]))]
    return float(values[worst] - values[best]), CELL_NAMES[worst], CELL_NAMES[best]


def group_gaps(
    cells_est: np.ndarray, cells: pl.DataFrame, pairs: Sequence[str], groups: Sequence[MemberGroup]
) -> pl.DataFrame:
    """Per (pair, group): gap and worst cell of the group's mean cell estimates."""
    rows = []
    for p, name in enumerate(pairs):
        usable = ~cells.filter(pl.col("pair") == name)["small_group"].to_numpy()
        for group in groups:
            mean_cells = cells_est[list(group.positions), p, :].mean(axis=0)
            gap, worst, _ = _gap(mean_cells, usable)
            rows.append({"pair": name, "group": group.name, "gap": gap, "worst_cell": worst})
    schema = {"pair": pl.String, "group": pl.String, "gap": pl.Float64, "worst_cell": pl.String}
    return pl.DataFrame(rows, schema=schema)


def pair_tables(
    cells: pl.DataFrame,
    cells_est: np.ndarray,
    pairs: Sequence[tuple[str, str]],
    members: Sequence,
    groups: Sequence[MemberGroup],
    alpha: float = 0.05,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(pair table: one wide row per pair; estimates per pair and group; member diffs)."""
    names = [pair_name(pair) for pair in pairs]
    tt, ff = CELL_NAMES.index("TT"), CELL_NAMES.index("FF")
    signed = cells_est[:, :, tt] - cells_est[:, :, ff]  # [members, pairs]
    estimates = summarize(signed, names, groups, alpha, item_column="pair")
    estimates = estimates.join(group_gaps(cells_est, cells, names, groups), on=["pair", "group"])
    diffs = member_diffs_long(signed, names, members, item_column="pair")
    overall = {
        row["pair"]: row
        for row in estimates.filter(pl.col("group") == "overall").iter_rows(named=True)
    }
    ensemble_cells = cells_est.mean(axis=0)  # [pairs, 4]
    rows = []
    for p, (name, (a, b)) in enumerate(zip(names, pairs, strict=True)):
        block = cells.filter(pl.col("pair") == name)
        by_cell = {row["cell"]: row for row in block.iter_rows(named=True)}
        row: dict[str, object] = {"pair": name, "attribute_a": a, "attribute_b": b}
        for cell in CELL_NAMES:
            row[f"n_{cell}"] = by_cell[cell]["n"]
        for cell in CELL_NAMES:
            row[f"loss_{cell}"] = by_cell[cell]["mean_loss"]
        for cell in CELL_NAMES:
            row[f"accuracy_{cell}"] = by_cell[cell]["accuracy"]
        for cell in CELL_NAMES:
            row[f"auroc_{cell}"] = by_cell[cell]["auroc"]
        for c, cell in enumerate(CELL_NAMES):
            row[f"est_{cell}"] = float(ensemble_cells[p, c])
        usable = ~block["small_group"].to_numpy()
        losses = np.array([by_cell[cell]["mean_loss"] for cell in CELL_NAMES], dtype=np.float64)
        gap, worst, best = _gap(losses, usable & np.isfinite(losses))
        est = overall[name]
        row |= {
            "small_group": bool(by_cell["TT"]["small_group"] or by_cell["FF"]["small_group"]),
            "n_small_cells": int((~usable).sum()),
            "measured_signed": by_cell["TT"]["mean_loss"] - by_cell["FF"]["mean_loss"],
            "measured_gap": gap,
            "worst_cell_measured": worst,
            "best_cell_measured": best,
            "est_signed_mean": est["mean"],
            "est_signed_q1": est["q1"],
            "est_signed_median": est["median"],
            "est_signed_q3": est["q3"],
            "est_p_positive": est["p_positive"],
            "est_p_value": est["p_value"],
            "est_q_value": est["q_value"],
            "bh_significant": est["bh_significant"],
            "est_gap": est["gap"],
            "worst_cell_estimated": est["worst_cell"],
        }
        row["worst_cell_agrees"] = (
            None if worst is None or est["worst_cell"] is None else worst == est["worst_cell"]
        )
        rows.append(row)
    return pl.DataFrame(rows, schema=_pair_schema()), estimates, diffs


def _pair_schema() -> dict[str, type[pl.DataType]]:
    schema: dict[str, type[pl.DataType]] = {
        "pair": pl.String,
        "attribute_a": pl.String,
        "attribute_b": pl.String,
    }
    for prefix, dtype in (
        ("n", pl.Int64),
        ("loss", pl.Float64),
        ("accuracy", pl.Float64),
        ("auroc", pl.Float64),
        ("est", pl.Float64),
    ):
        for cell in CELL_NAMES:
            schema[f"{prefix}_{cell}"] = dtype
    schema |= {
        "small_group": pl.Boolean,
        "n_small_cells": pl.Int64,
        "measured_signed": pl.Float64,
        "measured_gap": pl.Float64,
        "worst_cell_measured": pl.String,
        "best_cell_measured": pl.String,
        "est_signed_mean": pl.Float64,
        "est_signed_q1": pl.Float64,
        "est_signed_median": pl.Float64,
        "est_signed_q3": pl.Float64,
        "est_p_positive": pl.Float64,
        "est_p_value": pl.Float64,
        "est_q_value": pl.Float64,
        "bh_significant": pl.Boolean,
        "est_gap": pl.Float64,
        "worst_cell_estimated": pl.String,
        "worst_cell_agrees": pl.Boolean,
    }
    return schema
