"""Materialize the whole graph from the command line, recorded in the Dagster instance.

Runs go into the instance under DAGSTER_HOME, so `dagster dev` afterwards shows every
materialization, its metadata and lineage exactly as if the UI had launched it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from llm2loss_pipeline.core.config import PipelineConfig, check_paths
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import ensure_writable_dir, resolve_home, write_text_atomic

STAGES = ("prepare", "signals", "diagnose")
_SHOWN_EVENTS = {
    "STEP_START": "started",
    "STEP_SUCCESS": "done",
    "STEP_FAILURE": "FAILED",
    "ASSET_CHECK_EVALUATION": "check evaluated",
}


@dataclass
class StageRun:
    stage: str
    partition: str | None
    run_id: str
    seconds: float


@dataclass
class PipelineRun:
    layout: Layout
    runs: list[StageRun] = field(default_factory=list)


class StageFailed(RuntimeError):
    """A run failed; the message names the asset, the shard and where to look."""


def use_dagster_home(layout: Layout) -> str:
    """DAGSTER_HOME defaults inside the artifact root, so nothing is written elsewhere."""
    home = Path(os.environ.get("DAGSTER_HOME") or layout.dagster_home).resolve()
    ensure_writable_dir(home)
    config = home / "dagster.yaml"
    if not config.exists():
        # An explicit (empty) instance config: embedded SQLite storage under DAGSTER_HOME.
        write_text_atomic(config, "# Embedded SQLite instance storage (see deploy/ for Postgres)\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return str(home)


def run_pipeline(
    config: PipelineConfig,
    stages: Sequence[str] = STAGES,
    *,
    shards: Sequence[str] | None = None,
    instance: dg.DagsterInstance | None = None,
    on_message: Callable[[str], None] | None = None,
    on_stage: Callable[[str, str | None, int, int], None] | None = None,
) -> PipelineRun:
    """Run the stages in order; `shards` limits the signals stage (default: all shards)."""
    from llm2loss_pipeline.defs.build import build_definitions
    from llm2loss_pipeline.defs.partitions import SHARDS

    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    # Before any step: a wrong data or model path fails now, naming its key, not minutes later.
    check_paths(config)
    layout = Layout(resolve_home(config.home))
    ensure_writable_dir(layout.home)
    if instance is None:
        use_dagster_home(layout)
        instance = dg.DagsterInstance.get()
    loggers = {"console": _message_logger(on_message)} if on_message else None
    # An in-process run only starts the loggers its run config names.
    run_config = {"loggers": {"console": {}}} if on_message else None
    defs = build_definitions(config, loggers=loggers)
    result = PipelineRun(layout)

    for stage in STAGES:
        if stage not in stages:
            continue
        job = defs.resolve_job_def(stage)
        if stage == "signals":
            keys = list(shards) if shards else instance.get_dynamic_partitions(SHARDS.name)
            if not keys:
                raise StageFailed(
                    "no shards are registered: materialize the dataset first (llm2loss run)"
                )
            missing = sorted(set(keys) - set(instance.get_dynamic_partitions(SHARDS.name)))
            if missing:
                raise StageFailed(f"unknown shard(s) {missing}; known: llm2loss shards")
            for index, key in enumerate(keys):
                if on_stage:
                    on_stage(stage, key, index, len(keys))
                result.runs.append(_execute(job, instance, stage, key, run_config))
        else:
            if on_stage:
                on_stage(stage, None, 0, 1)
            result.runs.append(_execute(job, instance, stage, None, run_config))
    return result


def _execute(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    stage: str,
    partition: str | None,
    run_config: dict | None,
) -> StageRun:
    started = time.monotonic()
    outcome = job.execute_in_process(
        run_config=run_config, instance=instance, partition_key=partition, raise_on_error=False
    )
    if not outcome.success:
        raise StageFailed(_failure_message(outcome, stage, partition))
    return StageRun(stage, partition, outcome.run_id, time.monotonic() - started)


def _failure_message(outcome: dg.ExecuteInProcessResult, stage: str, partition: str | None) -> str:
    where = f" for shard {partition}" if partition else ""
    for event in outcome.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.step_failure_data.error
            cause = error.cause.message.strip() if error and error.cause else ""
            message = (error.message.strip() if error else "unknown error") + (
                f"\n  caused by: {cause}" if cause else ""
            )
            rerun = f"llm2loss run --stage {stage}" + (f" --shard {partition}" if partition else "")
            return (
                f"asset step {event.step_key}{where} failed in run {outcome.run_id}:\n  {message}\n"
                f"Fix the cause, then rerun with: {rerun} "
                "(the run's full log is in the Dagster UI: llm2loss ui)"
            )
    return f"stage {stage}{where} failed in run {outcome.run_id} (see llm2loss ui)"


def _message_logger(on_message: Callable[[str], None]) -> dg.LoggerDefinition:
    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            meta = getattr(record, "dagster_meta", None) or {}
            event = meta.get("dagster_event")
            step = meta.get("step_key") or ""
            if event is not None:
                if event.event_type_value in _SHOWN_EVENTS:
                    on_message(f"{step}: {_SHOWN_EVENTS[event.event_type_value]}")
            elif record.levelno >= logging.INFO:
                on_message(f"{step}: {meta.get('orig_message', record.getMessage())}")

    @dg.logger(description="Forwards asset log lines to the llm2loss CLI's progress display.")
    def forward(_init_context: dg.InitLoggerContext) -> logging.Logger:
        log = logging.getLogger("llm2loss.cli")
        log.setLevel(logging.DEBUG)  # Dagster's step events are DEBUG records
        log.propagate = False
        log.handlers = [_Forward()]
        return log

    return forward
