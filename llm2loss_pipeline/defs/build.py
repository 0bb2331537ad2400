"""The assets, checks, jobs and automation of one configuration, as a Dagster Definitions.

`build_definitions` lives here, inside the Dagster layer, so that both the code location
(`llm2loss_pipeline/definitions.py`, loaded by `dagster dev -w workspace.yaml`) and the engine
behind `llm2loss run` (`defs/runner.py`) use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from llm2loss_pipeline.core.config import PipelineConfig
from llm2loss_pipeline.defs.data.assets import celeba_attributes, dataset_manifest
from llm2loss_pipeline.defs.diagnosis.assets import diagnosis_heads
from llm2loss_pipeline.defs.executors import executor_from_env
from llm2loss_pipeline.defs.jobs import JOBS
from llm2loss_pipeline.defs.models.assets import black_box_model, semantic_encoder
from llm2loss_pipeline.defs.report.assets import attribute_disparity_report
from llm2loss_pipeline.defs.report.checks import (
    heads_validation_floor,
    report_group_sizes,
    report_is_complete,
    report_trust,
)
from llm2loss_pipeline.defs.report.discovery import failure_hypotheses
from llm2loss_pipeline.defs.resources import build_resources
from llm2loss_pipeline.defs.schedules import build_schedules
from llm2loss_pipeline.defs.sensors import build_sensors
from llm2loss_pipeline.defs.signals.assets import image_embeddings, per_sample_losses

ASSETS = [
    dataset_manifest,
    celeba_attributes,
    black_box_model,
    semantic_encoder,
    per_sample_losses,
    image_embeddings,
    diagnosis_heads,
    attribute_disparity_report,
    failure_hypotheses,
]
CHECKS = [report_is_complete, report_group_sizes, heads_validation_floor, report_trust]


def build_definitions(
    config: PipelineConfig | None = None, *, loggers: Mapping[str, Any] | None = None
) -> dg.Definitions:
    config = config or PipelineConfig()
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=JOBS,
        sensors=build_sensors(config.black_box),
        schedules=build_schedules(),
        resources=build_resources(config),
        loggers=dict(loggers) if loggers else None,
        executor=executor_from_env(),
    )
