"""Failure discovery: descriptions in language where the black box is worse, with evidence."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
from typing import Any

import dagster as dg

from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.query import Diagnoser
from llm2loss_pipeline.core.steps import discovery as steps
from llm2loss_pipeline.defs.automation import FOLLOW_UPSTREAM
from llm2loss_pipeline.defs.data.assets import OWNERS
from llm2loss_pipeline.defs.diagnosis.assets import diagnosis_heads
from llm2loss_pipeline.defs.metadata import markdown_table, png_markdown, table_metadata
from llm2loss_pipeline.defs.models.assets import semantic_encoder
from llm2loss_pipeline.defs.report.assets import attribute_disparity_report
from llm2loss_pipeline.defs.resources import (
    DiscoveryResource,
    ProposerResource,
    StorageResource,
)
from llm2loss_pipeline.defs.signals.assets import image_embeddings, per_sample_losses


@dg.asset(
    # The report is a dependency: discovery asks as the report's probes and calibration do, tests
    # its declared groups within each class of an attribute task, rewrites the DuckDB file with
    # the report's views plus its own, and writes its page next to report.html.
    deps=[
        diagnosis_heads,
        image_embeddings,
        per_sample_losses,
        semantic_encoder,
        attribute_disparity_report,
    ],
    group_name="report",
    kinds={"pytorch", "duckdb", "html"},
    owners=OWNERS,
    code_version="discovery-v3",
    automation_condition=FOLLOW_UPSTREAM,
    description=(
        "Candidate descriptions (attribute phrases, pairs, triples, a user vocabulary, optionally "
        "a language model's proposals; for an attribute task, the report's declared groups within "
        "each class of its labels) scored by the heads, verified on matched evaluation "
        "samples (Mann-Whitney, Benjamini-Hochberg), weighted by each sample's influence on the "
        "estimate; ranked failure hypotheses with proponents and counter-examples."
    ),
)
def failure_hypotheses(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    discovery: DiscoveryResource,  # type: ignore[valid-type]
    discovery_proposer: ProposerResource,  # type: ignore[valid-type]
) -> dg.MaterializeResult:
    config = DiscoveryConfig(**discovery.spec().model_dump(), proposer=discovery_proposer.spec())
    layout = storage.layout()
    diagnoser = Diagnoser.load(layout.home)
    result = steps.run_discovery(layout, config, diagnoser, log=context.log.info)
    metadata: dict[str, Any] = {
        **table_metadata(result.hypotheses, result.hypotheses_path),
        **result.counts,
        "top_hypotheses": dg.MetadataValue.md(markdown_table(steps.top_rows(result.hypotheses))),
        "evidence_table": dg.MetadataValue.path(str(result.evidence_path)),
        "discovery_html": dg.MetadataValue.path(str(result.html_path)),
        "duckdb_views": dg.MetadataValue.json(result.views),
        "shared_by_modes": dg.MetadataValue.md(
            "\n".join(f"- {trait.sentence()}" for trait in result.shared) or "(none)"
        ),
    }
    for rank, path in sorted(result.sheets.items())[:3]:
        metadata[f"evidence_{rank:02d}"] = png_markdown(path, f"hypothesis {rank}")
    return dg.MaterializeResult(data_version=dg.DataVersion(result.sha256), metadata=metadata)
