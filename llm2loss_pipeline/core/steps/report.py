"""Report step: measured vs text-estimated disparity on every attribute, and its checks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from llm2loss_pipeline.core.attribute_set import diagnosed_attributes, with_home_phrasings
from llm2loss_pipeline.core.config import ReportConfig
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.query import Diagnoser
from llm2loss_pipeline.core.report.calibration import CLAIM_SCHEMA
from llm2loss_pipeline.core.steps.diagnosis import read_kind_metrics
from llm2loss_pipeline.core.storage import sha256_file

HEADLINE_KEYS = (
    "spearman_signed_overall",
    "spearman_signed_regressor",
    "spearman_signed_ranker",
    "spearman_signed_direct",
    "pearson_signed_overall",
    "kendall_signed_overall",
    "spearman_abs_overall",
    "spearman_zero_shot_vs_gt_rmm_loss",
    "zero_shot_mean_auroc",
    "pair_spearman_signed_overall",
    "n_bh_significant",
    "n_measured_significant",
    "claim_precision_measured",
    "interval_coverage_measured",
    "n_small_groups",
)
"""What `llm2loss run` prints at the end; the full set is in reports/headline.json."""


@dataclass(frozen=True)
class DisparityReportResult:
    html_path: Path
    duckdb_path: Path
    sha256: str
    headline: dict[str, float]
    top_attributes: list[str]
    markdown: dict[str, str]
    plots: dict[str, Path] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)


@with_home_phrasings  # a probes file's phrasings, for every probe the report asks
def make_report(
    layout: Layout, config: ReportConfig, log: Callable[[str], None] | None = None
) -> DisparityReportResult:
    # lazy: the report pulls scipy, matplotlib and duckdb, which the Dagster definitions load
    # does not otherwise import (measured: +490 modules, about +3 s with scipy.stats alone)
    from llm2loss_pipeline.core.report import (
        build_report_from_config,
        markdown_tables,
        publish_views,
    )

    diagnoser = Diagnoser.load(layout.home)
    result = build_report_from_config(
        layout, diagnoser, diagnoser.encode_texts, config, out_dir=layout.reports, log=log
    )
    published = publish_views(layout.duckdb, layout, member_metrics=layout.member_metrics)
    html = result.files["report_html"]
    return DisparityReportResult(
        html_path=html,
        duckdb_path=published.db_path,
        sha256=sha256_file(layout.attribute_table),
        headline=dict(result.headline),
        top_attributes=list(result.top_attributes),
        markdown=markdown_tables(result),
        plots={name: path for name, path in result.files.items() if str(path).endswith(".png")},
        views=sorted(published.views),
    )


def _attribute_table(layout: Layout) -> pl.DataFrame:
    path = layout.attribute_table
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize attribute_disparity_report first")
    return pl.read_parquet(path)


def _nan_by_design(column: str) -> pl.Expr:
    """Rows where `column` is empty on purpose: a probe that does not pick out its attribute is
    not tested (no q-value), and a calibration whose slope is not positive has no loss units
    (core/report/calibration.py)."""
    if column not in CLAIM_SCHEMA or column in ("est_p_worse",):
        return pl.lit(False)
    untested = ~pl.col("probe_resolves") if column == "est_q_value" else pl.lit(False)
    no_units = ~(pl.col("calibration_slope") > 0) if column != "est_z" else pl.lit(False)
    return untested | no_units.fill_null(True)


def check_complete(layout: Layout) -> CheckOutcome:
    """One row per diagnosed attribute, and every number finite where its group is measurable."""
    table = _attribute_table(layout)
    expected = diagnosed_attributes(layout)
    missing = sorted(set(expected) - set(table["attribute"].to_list()))
    measurable = table.filter(~pl.col("small_group"))
    numeric = [
        name
        for name, dtype in measurable.schema.items()
        if dtype.is_float() and name != "zero_shot_auroc"
    ]
    bad = {
        name: measurable.filter(~pl.col(name).is_finite() & ~_nan_by_design(name))[
            "attribute"
        ].to_list()
        for name in numeric
    }
    bad = {name: rows for name, rows in bad.items() if rows}
    passed = table.height == len(expected) and not missing and not bad
    message = (
        f"{table.height} rows, all finite"
        if passed
        else f"{table.height} rows; missing {missing}; non-finite {bad}"
    )
    return CheckOutcome(
        passed,
        message,
        {"rows": table.height, "non_finite_columns": len(bad), "missing": len(missing)},
    )


def check_group_sizes(layout: Layout, min_group_size: int) -> CheckOutcome:
    table = _attribute_table(layout)
    small = table.filter(pl.col("small_group"))["attribute"].to_list()
    return CheckOutcome(
        passed=not small,
        message=(
            f"every attribute has at least {min_group_size} samples on both sides"
            if not small
            else f"{len(small)} attribute(s) have a group under {min_group_size} samples and are "
            f"marked small_group in the report: {', '.join(small)}"
        ),
        metadata={"n_small_groups": len(small), "min_group_size": min_group_size},
    )


def check_heads_floor(layout: Layout, floor: float) -> CheckOutcome:
    rows = read_kind_metrics(layout)
    below = {
        row["group"]: row["ensemble_spearman"]
        for row in rows
        if not (row["ensemble_spearman"] >= floor)  # NaN counts as below
    }
    values = {row["group"]: row["ensemble_spearman"] for row in rows}
    return CheckOutcome(
        passed=not below,
        message=(
            f"held-out ensemble Spearman is at least {floor} for every head group"
            if not below
            else f"held-out ensemble Spearman under {floor}: "
            + ", ".join(f"{group} {_fmt(value)}" for group, value in below.items())
        ),
        metadata={f"spearman_{group}": float(value) for group, value in values.items()},
    )


def check_trust(layout: Layout, floor: float) -> CheckOutcome:
    """The trust check of the headline: of the report's claims, the share the labelled attributes
    confirm (each attribute judged leave-one-out); NaN (no claim) passes."""

    headline = json.loads(layout.headline.read_text())
    precision = headline.get("claim_precision_measured")
    coverage = headline.get("interval_coverage_measured")
    claims = int(headline.get("n_claims") or 0)
    value = float("nan") if precision is None else float(precision)
    passed = claims == 0 or value >= floor
    return CheckOutcome(
        passed=passed,
        message=(
            "no attribute is claimed worse or better: nothing to confirm"
            if claims == 0
            else f"{_fmt(value)} of {claims} claims are confirmed by the measured gaps "
            f"({'at least' if passed else 'under'} the floor {floor})"
        ),
        metadata={
            "n_claims": claims,
            "claim_precision_measured": value,
            "interval_coverage_measured": float("nan") if coverage is None else float(coverage),
            "trust_floor": floor,
        },
    )


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"
