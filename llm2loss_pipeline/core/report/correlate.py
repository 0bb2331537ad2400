"""The paper's correlation tables, computed over attributes (and over pairs).

Every row has the same columns: table, group, estimate, measure, n, pearson(_p), spearman(_p),
kendall(_p), note. Attributes flagged `small_group` are left out of every correlation (their
measured gaps are noise) and the `note` says how many were left out; a correlation that cannot be
computed (fewer than 3 usable attributes, or a constant column) is a row of NaNs with the reason.

- table1 (paper Table 1): disparity over-estimation vs zero-shot AUROC. Estimated and measured
  disparities are on different scales (standardized loss vs loss), so over-estimation is defined
  on z-scores across attributes: z(|estimated|) - z(|measured|).
- table2 (paper Table 2): estimated vs measured disparity, per member group, `signed`
  (estimated mean diff vs the signed gap) and `absolute` (|estimated| vs GT-RMM), for the loss,
  accuracy and AUROC measures (the loss measure is the headline).
- table3 (paper Table 3): zero-shot AUROC vs measured |disparity| (GT-RMM).
- pairs: the same as table2 across attribute pairs, `signed` (TT - FF) and `gap` (worst - best).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from llm2loss_pipeline.core.members import MemberGroup
from llm2loss_pipeline.core.report.measured import METRICS
from llm2loss_pipeline.core.stats import complete_pairs, correlations

SMALL_N = 10
"""Below this many points the asymptotic p-values (Spearman's t, Kendall's normal) are rough;
the row's note says so."""

CORRELATION_SCHEMA = {
    "table": pl.String,
    "group": pl.String,
    "estimate": pl.String,
    "measure": pl.String,
    "n": pl.Int64,
    "pearson": pl.Float64,
    "pearson_p": pl.Float64,
    "spearman": pl.Float64,
    "spearman_p": pl.Float64,
    "kendall": pl.Float64,
    "kendall_p": pl.Float64,
    "note": pl.String,
}


def correlation_row(
    table: str,
    group: str,
    estimate: str,
    measure: str,
    x: np.ndarray,
    y: np.ndarray,
    note: str = "",
) -> dict[str, object]:
    row: dict[str, object] = {"table": table, "group": group, "estimate": estimate}
    row["measure"] = measure
    try:
        result = correlations(x, y)
    except ValueError as exc:
        nan = float("nan")
        row |= {"n": int(complete_pairs(x, y)[0].size), "note": _join(note, str(exc))}
        row |= dict.fromkeys(("pearson", "pearson_p", "spearman", "spearman_p"), nan)
        row |= dict.fromkeys(("kendall", "kendall_p"), nan)
        return row
    row |= result.as_dict()
    if result.n < SMALL_N:
        note = _join(note, f"only {result.n} points: p-values are rough approximations")
    if not np.isfinite(result.spearman.coefficient):
        note = _join(note, "a column is constant: correlation undefined")
    row["note"] = note
    return row


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def _usable(frame: pl.DataFrame, what: str) -> tuple[pl.DataFrame, str]:
    small = int(frame["small_group"].sum())
    note = f"{small} small-group {what}(s) left out" if small else ""
    return frame.filter(~pl.col("small_group")), note


def _column(frame: pl.DataFrame, name: str) -> np.ndarray:
    return frame[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def table2(
    measured: pl.DataFrame, estimates: pl.DataFrame, groups: Sequence[MemberGroup]
) -> pl.DataFrame:
    """Estimated vs measured disparity per member group (measured: one row per attribute)."""
    base, note = _usable(measured, "attribute")
    rows = []
    for group in groups:
        est = estimates.filter(pl.col("group") == group.name).select("attribute", "mean")
        joined = base.join(est, on="attribute", how="left")
        signed = _column(joined, "mean")
        for metric in METRICS:
            gap = _column(joined, f"gap_{metric}")
            rmm = _column(joined, f"gt_rmm_{metric}")
            rows.append(correlation_row("table2", group.name, "signed", metric, signed, gap, note))
            rows.append(
                correlation_row("table2", group.name, "absolute", metric, np.abs(signed), rmm, note)
            )
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def table3(table: pl.DataFrame) -> pl.DataFrame:
    """Zero-shot AUROC vs GT-RMM of each metric (attribute table with `zero_shot_auroc`)."""
    base, note = _usable(table, "attribute")
    zero_shot = _column(base, "zero_shot_auroc")
    rows = [
        correlation_row(
            "table3",
            "encoder",
            "zero_shot_auroc",
            metric,
            zero_shot,
            _column(base, f"gt_rmm_{metric}"),
            note,
        )
        for metric in METRICS
    ]
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def _zscore(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size < 2 or np.std(finite) == 0:
        return np.full(values.shape, np.nan)
    return (values - finite.mean()) / finite.std()


def table1(
    table: pl.DataFrame, estimates: pl.DataFrame, groups: Sequence[MemberGroup]
) -> pl.DataFrame:
    """Over-estimation z(|est|) - z(GT-RMM loss) vs zero-shot AUROC, per member group."""
    base, note = _usable(table, "attribute")
    zero_shot = _column(base, "zero_shot_auroc")
    rows = []
    for group in groups:
        est = estimates.filter(pl.col("group") == group.name).select("attribute", "mean")
        joined = base.select("attribute").join(est, on="attribute", how="left")
        over = _zscore(np.abs(_column(joined, "mean"))) - _zscore(_column(base, "gt_rmm_loss"))
        rows.append(
            correlation_row("table1", group.name, "overestimation", "loss", over, zero_shot, note)
        )
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def pair_correlations(
    pair_table: pl.DataFrame, pair_estimates: pl.DataFrame, groups: Sequence[MemberGroup]
) -> pl.DataFrame:
    """Estimated vs measured pair disparity, per member group: signed (TT - FF) and gap."""
    base, note = _usable(pair_table, "pair")
    rows = []
    for group in groups:
        est = pair_estimates.filter(pl.col("group") == group.name).select("pair", "mean", "gap")
        joined = base.join(est, on="pair", how="left")
        rows.append(
            correlation_row(
                "pairs",
                group.name,
                "signed",
                "loss",
                _column(joined, "mean"),
                _column(joined, "measured_signed"),
                note,
            )
        )
        rows.append(
            correlation_row(
                "pairs",
                group.name,
                "gap",
                "loss",
                _column(joined, "gap"),
                _column(joined, "measured_gap"),
                note,
            )
        )
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)
