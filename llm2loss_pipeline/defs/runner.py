"""Materialize the whole graph from the command line, recorded in the Dagster instance.

Runs go into the instance under DAGSTER_HOME, so `dagster dev` afterwards shows every
materialization, its metadata and lineage exactly as if the UI had launched it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from llm2loss_pipeline.core.config import PipelineConfig
from llm2loss_pipeline.core.env import SLOT_WAIT_S
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.preflight import preflight
from llm2loss_pipeline.core.storage import (
    _alive,
    _host,
    ensure_writable_dir,
    home_lock,
    resolve_home,
    write_text_atomic,
)
from llm2loss_pipeline.defs.build import build_definitions
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.preflight import PASSED, PREFLIGHT_TAG

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


RUN_PID_TAG = "llm2loss/pid"
RUN_HOST_TAG = "llm2loss/host"
SLOT_WAIT_ENV = SLOT_WAIT_S.name
DEFAULT_SLOT_WAIT_S = SLOT_WAIT_S.default
"""How long a step may wait for a slot of a concurrency pool (e.g. `gpu`) before the run gives
up with a message naming the pool and the runs holding it; `$LLM2LOSS_SLOT_WAIT_S` sets it."""
_LIVE_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def config_description(config: PipelineConfig) -> str:
    """Which config and command a run is: shown to a second run that finds the home taken."""
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
    command = " ".join(["llm2loss", *sys.argv[1:]]) if sys.argv else "llm2loss"
    return f"config {digest}, command: {command[:200]}"


def slot_wait_limit(value: float | None = None) -> float:
    """`value`, else `$LLM2LOSS_SLOT_WAIT_S`, else `DEFAULT_SLOT_WAIT_S` (seconds, > 0)."""
    if value is not None:
        return float(value)
    return SLOT_WAIT_S.read()


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
    slot_wait_s: float | None = None,
    source: str = "<config>",
) -> PipelineRun:
    """Run the stages in order; `shards` limits the signals stage (default: all shards).

    First `config` passes core.preflight.preflight (`source` names it in errors), before anything
    is written; its runs are tagged as checked, so their assets do not check again.

    The run owns its home for its whole duration (`storage.home_lock`): a second run on the
    same home fails at once with the first one's pid and config instead of mixing artifacts.
    Runs of this home whose process is gone are marked failed and their pool slots freed first;
    a step waits at most `slot_wait_s` (default `$LLM2LOSS_SLOT_WAIT_S`) for a pool slot.
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    # Before any step: a wrong path, device or user model fails now, naming its key, not after
    # the steps before the one that needs it.
    preflight(config, source)
    layout = Layout(resolve_home(config.home))
    ensure_writable_dir(layout.home)
    wait_limit = slot_wait_limit(slot_wait_s)
    with home_lock(layout.home, config_description(config)):
        if instance is None:
            use_dagster_home(layout)
            instance = dg.DagsterInstance.get()
        for line in reconcile_dead_runs(instance):
            (on_message or logging.getLogger(__name__).warning)(line)
        return _run_stages(
            config, stages, shards, instance, layout, on_message, on_stage, wait_limit
        )


def _run_stages(
    config: PipelineConfig,
    stages: Sequence[str],
    shards: Sequence[str] | None,
    instance: dg.DagsterInstance,
    layout: Layout,
    on_message: Callable[[str], None] | None,
    on_stage: Callable[[str, str | None, int, int], None] | None,
    wait_limit: float,
) -> PipelineRun:
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
                watch = SlotWatch(instance, wait_limit, on_message)
                result.runs.append(_execute(job, instance, stage, key, run_config, watch))
        else:
            if on_stage:
                on_stage(stage, None, 0, 1)
            watch = SlotWatch(instance, wait_limit, on_message)
            result.runs.append(_execute(job, instance, stage, None, run_config, watch))
    return result


def _execute(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    stage: str,
    partition: str | None,
    run_config: dict | None,
    watch: SlotWatch,
) -> StageRun:
    started = time.monotonic()
    run_id = str(uuid.uuid4())  # known before the run starts, so the watch can find it
    # The pid and host let a later run tell that this one's process is gone (reconcile_dead_runs).
    tags = {RUN_PID_TAG: str(os.getpid()), RUN_HOST_TAG: _host(), PREFLIGHT_TAG: PASSED}
    try:
        with watch.watching(run_id):
            outcome = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                partition_key=partition,
                raise_on_error=False,
                run_id=run_id,
                tags=tags,
            )
    except _SlotWaitAborted:
        pass  # Dagster usually catches it and records the run as failed; handled just below
    except BaseException:
        _fail_run(instance, run_id, "llm2loss run was interrupted")
        raise
    stop = watch.aborted
    if stop is not None:
        _fail_run(instance, run_id, stop.reason)
        if stop.interrupted:
            raise KeyboardInterrupt(stop.reason)
        where = f" (shard {partition})" if partition else ""
        raise StageFailed(f"stage {stage}{where}, run {run_id}: {stop.reason}")
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


# ---- runs whose process is gone, and waiting for concurrency slots ---------------------------


def reconcile_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs that `llm2loss run` started on this host whose process is gone, and
    free the pool slots of every finished or dead run; one line per run fixed.

    A SIGKILLed in-process run never reports its end: before, it stayed STARTED and kept its
    `gpu` slot forever, and every later run with a pool limit waited for that slot forever.
    Runs launched otherwise (UI, daemon) carry no pid tag and are left to Dagster's own
    run monitoring, except that slots of runs already finished are freed.
    """
    lines: list[str] = []
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=_LIVE_STATUSES, tags={RUN_HOST_TAG: _host()})
    )
    for record in records:
        run = record.dagster_run
        pid = run.tags.get(RUN_PID_TAG, "")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        _fail_run(instance, run.run_id, f"its process {pid} is gone (killed?)")
        lines.append(f"run {run.run_id} ({run.job_name}): process {pid} is gone; marked failed")
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return lines
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        holders = info.active_run_ids | {step.run_id for step in info.pending_steps}
        for run_id in sorted(holders):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                freed = storage.free_concurrency_slots_for_run(run_id)
                if freed:
                    lines.append(f"pool {pool!r}: freed the slot(s) of ended run {run_id}")
    return lines


def _fail_run(instance: dg.DagsterInstance, run_id: str, why: str) -> None:
    """Record `run_id` as failed (if it has not ended) and free its concurrency slots."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_failed(run, message=f"llm2loss (pid {os.getpid()}): {why}")
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


class _SlotWaitAborted(Exception):  # raised into the main thread by SlotWatch
    def __init__(self, reason: str, interrupted: bool) -> None:
        super().__init__(reason)
        self.reason, self.interrupted = reason, interrupted


class SlotWatch:
    """Watches an in-process run while one of its steps waits for a concurrency-pool slot.

    Dagster's in-process executor polls for a slot in a loop with SIGINT captured (it only
    acts on it between steps), so a wait for a slot that never frees ignored Ctrl-C and never
    ended. This watch (a thread) says what the run waits for, and when the wait passes
    `limit_s` or Ctrl-C was pressed, it raises an exception in the main thread (through SIGUSR1)
    that ends the wait; the run is then marked failed and its pending claims freed.
    """

    POLL_S = 0.5
    REPEAT_S = 60.0

    def __init__(
        self,
        instance: dg.DagsterInstance,
        limit_s: float,
        on_message: Callable[[str], None] | None = None,
    ) -> None:
        self.instance, self.limit_s = instance, limit_s
        self.say = on_message or logging.getLogger(__name__).warning
        self._stop = threading.Event()
        self._abort: _SlotWaitAborted | None = None
        self.can_raise = False

    def watching(self, run_id: str) -> _Watching:
        self._abort = None
        return _Watching(self, run_id)

    @property
    def aborted(self) -> _SlotWaitAborted | None:
        """Why the watch ended the last run's wait, or None if it did not."""
        return self._abort

    def blocked_on(self, run_id: str) -> list[tuple[str, str]]:
        """(pool, description of who holds it) for each pool in which `run_id` waits."""
        storage = self.instance.event_log_storage
        if not storage.supports_global_concurrency_limits:
            return []
        waiting = []
        for pool in sorted(storage.get_concurrency_keys()):
            info = storage.get_concurrency_info(pool)
            pending = [s for s in info.pending_steps if s.run_id == run_id]
            if pending and all(step.assigned_timestamp is None for step in pending):
                holders = ", ".join(
                    f"run {slot.run_id} step {slot.step_key}" for slot in info.claimed_slots
                )
                waiting.append(
                    (
                        pool,
                        f"{info.active_slot_count} of {info.slot_count} slots "
                        f"held by {holders or 'nobody'}",
                    )
                )
        return waiting

    def loop(self, run_id: str, main: int) -> None:
        since: float | None = None
        said = 0.0
        while not self._stop.wait(self.POLL_S):
            try:
                blocked = self.blocked_on(run_id)
            except Exception:  # a storage hiccup must not end the run
                continue
            if not blocked:
                since = None
                continue
            now = time.monotonic()
            since = since or now
            pools = "; ".join(f"pool {pool!r} ({held})" for pool, held in blocked)
            if now - said >= self.REPEAT_S:
                said = now
                self.say(
                    f"waiting for a slot: {pools}. Giving up after {self.limit_s:.0f} s "
                    f"(${SLOT_WAIT_ENV}); Ctrl-C stops the wait"
                )
            if _interrupt_captured():
                self._raise(main, f"interrupted while waiting for a slot: {pools}", True)
                return
            if now - since > self.limit_s:
                self._raise(
                    main,
                    f"gave up after waiting {self.limit_s:.0f} s for a slot: {pools}. A run "
                    "that was killed keeps its slot until `llm2loss run` starts again (it frees "
                    "the slots of runs whose process is gone) or the run is terminated in the "
                    f"UI; raise the wait with ${SLOT_WAIT_ENV} or the pool limit with "
                    "`dagster instance concurrency set POOL N`",
                    False,
                )
                return

    def _raise(self, main: int, reason: str, interrupted: bool) -> None:
        self._abort = _SlotWaitAborted(reason, interrupted)
        if self.can_raise:  # without our handler, SIGUSR1 would end the whole process
            signal.pthread_kill(main, signal.SIGUSR1)
        else:
            self.say(f"{reason} (cannot stop the wait from here: not run in the main thread)")


class _Watching:
    def __init__(self, watch: SlotWatch, run_id: str) -> None:
        self.watch, self.run_id = watch, run_id
        self._thread: threading.Thread | None = None
        self._previous: object = None

    def __enter__(self) -> _Watching:
        # Signal handlers can only be set in the main thread; elsewhere the watch only reports.
        main = threading.current_thread() is threading.main_thread()
        if main:
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        self.watch.can_raise = main
        self.watch._stop.clear()
        self._thread = threading.Thread(
            target=self.watch.loop,
            args=(self.run_id, threading.main_thread().ident),
            name=f"slot-watch-{self.run_id[:8]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _on_signal(self, _signo: int, _frame: object) -> None:
        if self.watch._abort is not None:
            raise self.watch._abort

    def __exit__(self, *_exc: object) -> None:
        self.watch._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.watch.can_raise:
            signal.signal(signal.SIGUSR1, self._previous or signal.SIG_DFL)  # type: ignore[arg-type]


def _interrupt_captured() -> bool:
    """Whether Ctrl-C arrived while Dagster holds SIGINT (it records it and acts between steps).

    Dagster's flag is private API (`dagster._utils.interrupts`); if it moves, the watch still
    enforces the time limit.
    """
    try:
        # lazy: a private Dagster module; if it moves, this watch degrades instead of the import
        from dagster._utils.interrupts import check_captured_interrupt
    except ImportError:  # pragma: no cover - depends on Dagster's internals
        return False
    return check_captured_interrupt()
