"""Schedules: retrain the built-in black box on a cron, off until someone turns it on.

Retraining is deterministic for a seed, so a scheduled retrain on unchanged data and settings
writes the same weights; it is meant for deployments whose data (the CelebA root, the generated
world's settings) changes underneath. The new materialization then propagates like any other
through the eager automation conditions: losses of every shard, heads, report.
"""

from __future__ import annotations

import os

import dagster as dg

from llm2loss_pipeline.defs.models.assets import black_box_model
from llm2loss_pipeline.defs.sensors import TRIGGER_TAG

RETRAIN_CRON_ENV = "LLM2LOSS_RETRAIN_CRON"
RETRAIN_TIMEZONE_ENV = "LLM2LOSS_RETRAIN_TIMEZONE"
DEFAULT_RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00
RETRAIN_SCHEDULE = "retrain_black_box"


def build_retrain_schedule(
    cron: str | None = None, *, timezone: str | None = None
) -> dg.ScheduleDefinition:
    """The retrain schedule; `cron`/`timezone` default to $LLM2LOSS_RETRAIN_CRON/_TIMEZONE."""
    cron = (cron or os.environ.get(RETRAIN_CRON_ENV) or DEFAULT_RETRAIN_CRON).strip()
    timezone = (timezone or os.environ.get(RETRAIN_TIMEZONE_ENV) or "UTC").strip()
    try:
        return dg.ScheduleDefinition(
            name=RETRAIN_SCHEDULE,
            cron_schedule=cron,
            execution_timezone=timezone,
            target=dg.AssetSelection.assets(black_box_model),
            default_status=dg.DefaultScheduleStatus.STOPPED,
            tags={TRIGGER_TAG: RETRAIN_SCHEDULE},
            description=(
                f"Retrains the built-in black box ({cron}, {timezone}; set ${RETRAIN_CRON_ENV}). "
                "Downstream losses, heads and report follow through the automation sensor."
            ),
        )
    except (dg.DagsterInvalidDefinitionError, ValueError) as exc:
        raise ValueError(
            f"retrain schedule: cron {cron!r} / timezone {timezone!r} is not valid "
            f"(${RETRAIN_CRON_ENV}, ${RETRAIN_TIMEZONE_ENV}): {exc}"
        ) from exc


def build_schedules() -> list[dg.ScheduleDefinition]:
    return [build_retrain_schedule()]
