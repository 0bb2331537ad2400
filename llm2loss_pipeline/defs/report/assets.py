"""The attribute disparity report: measured vs text-estimated disparity on every diagnosed
attribute (CelebA's 40, or a table dataset's own columns)."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
from pathlib import Path

import dagster as dg
import polars as pl

from llm2loss_pipeline.core.steps import report as steps
from llm2loss_pipeline.defs.automation import FOLLOW_UPSTREAM
from llm2loss_pipeline.defs.data.assets import OWNERS, celeba_attributes
from llm2loss_pipeline.defs.diagnosis.assets import diagnosis_heads
from llm2loss_pipeline.defs.metadata import float_metadata, table_value
from llm2loss_pipeline.defs.models.assets import semantic_encoder
from llm2loss_pipeline.defs.resources import ReportResource, StorageResource
from llm2loss_pipeline.defs.signals.assets import image_embeddings, per_sample_losses

CORRELATION_COLUMNS = {
    "group": "the heads: overall, a kind (regressor, ranker) or kind/arch; direct = paper's",
    "estimate": "signed (worse with > 0) or absolute estimated disparity",
    "measure": "what the measured disparity is computed from",
    "n": "attributes in the correlation (small groups left out)",
    "pearson": "Pearson r",
    "pearson_p": "p-value of Pearson r",
    "spearman": "Spearman rho",
    "spearman_p": "p-value of Spearman rho",
    "kendall": "Kendall tau",
    "kendall_p": "p-value of Kendall tau",
    "note": "what was left out, and why",
}
TABLE4_COLUMNS = {
    "attribute": "attribute (a column of the attribute table)",
    "n_true": "evaluation samples with the attribute",
    "n_false": "evaluation samples without it",
    "loss_true": "mean loss with the attribute",
    "loss_false": "mean loss without it",
    "gap_loss": "measured loss gap, with - without (positive = worse with it)",
    "gap_loss_low": "measured gap, 90% interval low (identity-clustered)",
    "gap_loss_high": "measured gap, 90% interval high",
    "gap_loss_p": "Welch p-value of the measured gap",
    "est_mean": "estimated disparity, ensemble mean (estimate units)",
    "est_gap": "estimated gap in loss units",
    "est_gap_low": "estimated gap, 90% interval low",
    "est_gap_high": "estimated gap, 90% interval high",
    "est_p_worse": "P(the real gap is above zero)",
    "claim": "worse with / better with (Benjamini-Hochberg) or cannot tell",
    "zero_shot_auroc": "how well the encoder alone tells the attribute apart",
    "small_group": "a side has too few samples: greyed, left out of correlations",
}
P_VALUES = ("pearson_p", "spearman_p", "kendall_p", "gap_loss_p")


def report_tables(reports: Path) -> dict[str, dg.TableMetadataValue]:
    """Tables 2 (loss), 3 and 4 of the report as Dagster tables, from its Parquet files."""
    correlations = pl.read_parquet(reports / "correlations.parquet")
    table2 = correlations.filter((pl.col("table") == "table2") & (pl.col("measure") == "loss"))
    table4 = pl.read_parquet(reports / "attribute_disparity.parquet")
    return {
        "table2": table_value(table2, CORRELATION_COLUMNS, P_VALUES),
        "table3": table_value(
            correlations.filter(pl.col("table") == "table3"), CORRELATION_COLUMNS, P_VALUES
        ),
        "table4": table_value(
            table4.sort("est_mean", descending=True, nulls_last=True), TABLE4_COLUMNS, P_VALUES
        ),
    }


def report_metadata(
    estimator: str, result: steps.DisparityReportResult, reports: Path
) -> dict[str, dg.MetadataValue]:
    """The report's materialization metadata. Plots are linked as files: embedding them put
    about 450 KB of base64 into every materialization event."""
    metadata = {
        "estimator": dg.MetadataValue.text(estimator),
        "report_html": dg.MetadataValue.path(str(result.html_path)),
        "duckdb": dg.MetadataValue.path(str(result.duckdb_path)),
        "duckdb_views": dg.MetadataValue.json(result.views),
        "top_attributes_by_estimated_disparity": dg.MetadataValue.json(result.top_attributes),
        **report_tables(reports),
        **float_metadata(result.headline),
    }
    for name, path in result.plots.items():
        metadata[f"plot_{name}"] = dg.MetadataValue.path(str(path))
    return metadata


@dg.asset(
    deps=[
        diagnosis_heads,
        per_sample_losses,
        image_embeddings,
        celeba_attributes,
        semantic_encoder,
    ],
    group_name="report",
    kinds={"duckdb", "html"},
    owners=OWNERS,
    code_version="report-v2",  # v2: the grounded estimator is the default
    automation_condition=FOLLOW_UPSTREAM,
    description=(
        "For each diagnosed attribute (CelebA's 40 or a table's own columns, minus an attribute "
        "task's target): the black box's measured disparity (DuckDB over losses and "
        "attributes), the disparity estimated from text by the heads, and the encoder's zero-shot "
        "AUROC; their correlations (the paper's Tables 2-4), intersectional pairs, "
        "Benjamini-Hochberg control. Writes report.html and DuckDB views."
    ),
)
def attribute_disparity_report(
    context: dg.AssetExecutionContext, storage: StorageResource, report: ReportResource
) -> dg.MaterializeResult:
    spec = report.spec()
    result = steps.make_report(storage.layout(), spec, log=context.log.info)
    metadata = report_metadata(spec.estimator, result, result.html_path.parent)
    return dg.MaterializeResult(data_version=dg.DataVersion(result.sha256), metadata=metadata)
