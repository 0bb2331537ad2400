"""The attribute disparity report: measured vs text-estimated disparity on all 40 attributes."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
import dagster as dg

from llm2loss_pipeline.core.steps import report as steps
from llm2loss_pipeline.defs.automation import FOLLOW_UPSTREAM
from llm2loss_pipeline.defs.data.assets import OWNERS, celeba_attributes
from llm2loss_pipeline.defs.diagnosis.assets import diagnosis_heads
from llm2loss_pipeline.defs.metadata import float_metadata, png_markdown
from llm2loss_pipeline.defs.models.assets import semantic_encoder
from llm2loss_pipeline.defs.resources import ReportResource, StorageResource
from llm2loss_pipeline.defs.signals.assets import image_embeddings, per_sample_losses


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
        "For each of the 40 attributes: the black box's measured disparity (DuckDB over losses and "
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
    metadata = {
        "estimator": dg.MetadataValue.text(spec.estimator),
        "report_html": dg.MetadataValue.path(str(result.html_path)),
        "duckdb": dg.MetadataValue.path(str(result.duckdb_path)),
        "duckdb_views": dg.MetadataValue.json(result.views),
        "top_attributes_by_estimated_disparity": dg.MetadataValue.json(result.top_attributes),
        **{name: dg.MetadataValue.md(table) for name, table in result.markdown.items()},
        **float_metadata(result.headline),
    }
    for name, path in result.plots.items():
        metadata[f"plot_{name}"] = png_markdown(path, name)
    return dg.MaterializeResult(data_version=dg.DataVersion(result.sha256), metadata=metadata)
