"""The preflight of `llm2loss run` for runs that Dagster starts itself (UI, daemon, `dagster asset
materialize`).

`llm2loss run` checks the configuration before any step (core.preflight.preflight: paths, CUDA
devices, the user's model and its output count), but a run launched from the UI went straight
to its steps, so a broken entry point failed only in black_box_model, after the world was drawn
and often after the encoder had trained. Dagster has no hook that runs before a run's first step,
so the assets that start a graph (the data and model assets) call `preflight_once` first. It
checks the run's own resources (the launchpad's edits included), once per run: the first step
that passes tags the run, and the later steps of that run skip it. `llm2loss run` checks before
it launches, and tags its runs so.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from llm2loss_pipeline.core.config import ConfigError, DevicesConfig, PipelineConfig
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.preflight import preflight
from llm2loss_pipeline.defs.resources import DEVICE_KEYS

PREFLIGHT_TAG = "llm2loss/preflight"
PASSED = "passed"
SETTINGS_KEYS = frozenset(
    {
        "storage",
        "dataset",
        "world",
        "task",
        "black_box",
        "encoder",
        "heads",
        "report",
        "discovery",
        "discovery_proposer",
        *DEVICE_KEYS.values(),
    }
)
"""Every resource that holds a configuration section: what the preflight reads."""


def config_of(resources: Any) -> PipelineConfig:
    """The PipelineConfig that a run's resources hold (the YAML file's values with the run's
    launchpad edits), for checks that need the whole configuration."""
    settings = resources.discovery.spec()
    return PipelineConfig(
        home=resources.storage.home or None,
        dataset=resources.dataset.spec(),
        world=resources.world.spec(),
        task=resources.task.spec(),
        black_box=resources.black_box.spec(),
        encoder=resources.encoder.spec(),
        heads=resources.heads.spec(),
        report=resources.report.spec(),
        discovery=DiscoveryConfig(
            **settings.model_dump(), proposer=resources.discovery_proposer.spec()
        ),
        devices=DevicesConfig(
            **{section: getattr(resources, key).spec() for section, key in DEVICE_KEYS.items()}
        ),
    )


def preflight_once(context: dg.AssetExecutionContext) -> None:
    """Run core.preflight.preflight on this run's configuration unless the run already passed it;
    a problem fails the step (no retry: rerunning cannot fix a configuration)."""
    run = context.instance.get_run_by_id(context.run_id)
    if run is not None and run.tags.get(PREFLIGHT_TAG) == PASSED:
        return
    source = os.environ.get("LLM2LOSS_CONFIG") or "<embedded default>"
    try:
        preflight(config_of(context.resources), f"{source} (with this run's resources)")
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    context.instance.add_run_tags(context.run_id, {PREFLIGHT_TAG: PASSED})
    context.log.info("preflight passed: paths, devices and the black box can be used")
