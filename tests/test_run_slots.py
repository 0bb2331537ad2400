"""A killed run must not hold a concurrency-pool slot forever, and waiting for one must end.

Before: with `dagster instance concurrency set gpu 1`, a SIGKILLed `llm2loss run` stayed STARTED
with its `gpu` slot, and every later run waited for that slot forever, ignoring Ctrl-C.
Now `run_pipeline` marks runs whose process is gone as failed and frees their slots, and a step
waiting for a slot says for what, gives up after `LLM2LOSS_SLOT_WAIT_S`, and stops on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from llm2loss_pipeline.defs import runner

REPO = Path(__file__).resolve().parents[1]

# A one-asset job in the `gpu` pool, whose single slot a live "other" run holds.
WAITER = textwrap.dedent(
    """
    import os, sys, uuid
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRun
    from llm2loss_pipeline.defs import runner

    @dg.asset(pool="gpu")
    def on_gpu():
        return 1

    instance = dg.DagsterInstance.from_config(sys.argv[1])
    job = dg.Definitions(
        assets=[on_gpu], jobs=[dg.define_asset_job("j", selection=[on_gpu])]
    ).resolve_job_def("j")
    watch = runner.SlotWatch(instance, float(sys.argv[2]), lambda line: print(line, flush=True))
    try:
        runner._execute(job, instance, "prepare", None, None, watch)
    except runner.StageFailed as exc:
        print("STAGE FAILED:", exc, flush=True)
        sys.exit(2)
    """
)


def _instance_with_held_slot(home: Path, holder_pid: int) -> tuple[dg.DagsterInstance, str]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("")
    instance = dg.DagsterInstance.from_config(str(home))
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    holder = str(uuid.uuid4())
    tags = {runner.RUN_PID_TAG: str(holder_pid), runner.RUN_HOST_TAG: runner._host()}
    instance.add_run(
        DagsterRun(job_name="other", run_id=holder, status=dg.DagsterRunStatus.STARTED, tags=tags)
    )
    claim = instance.event_log_storage.claim_concurrency_slot("gpu", holder, "other_step", 0)
    assert claim.is_claimed
    return instance, holder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _start_waiter(home: Path, limit_s: float) -> subprocess.Popen[str]:
    script = home.parent / "waiter.py"
    script.write_text(WAITER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), str(home), str(limit_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )


def _waiter_runs(instance: dg.DagsterInstance) -> list[DagsterRun]:
    return [run for run in instance.get_runs() if run.job_name == "j"]


def test_a_dead_runs_slot_is_freed_and_the_run_marked_failed(tmp_path: Path):
    instance, dead = _instance_with_held_slot(tmp_path / "dagster", _dead_pid())
    live = str(uuid.uuid4())  # a run of this very process: alive, left alone
    tags = {runner.RUN_PID_TAG: str(os.getpid()), runner.RUN_HOST_TAG: runner._host()}
    instance.add_run(
        DagsterRun(job_name="live", run_id=live, status=dg.DagsterRunStatus.STARTED, tags=tags)
    )
    dead_pid = instance.get_run_by_id(dead).tags[runner.RUN_PID_TAG]
    lines = runner.reconcile_dead_runs(instance)
    assert lines == [f"run {dead} (other): process {dead_pid} is gone; marked failed"]
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(live).status == dg.DagsterRunStatus.STARTED
    assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
    assert runner.reconcile_dead_runs(instance) == []  # nothing left to fix


def test_waiting_for_a_slot_says_for_what_and_gives_up(tmp_path: Path):
    home = tmp_path / "dagster"
    instance, holder = _instance_with_held_slot(home, os.getpid())
    started = time.monotonic()
    waiter = _start_waiter(home, 3)
    try:
        output, _ = waiter.communicate(timeout=120)
    finally:
        waiter.kill()
    assert waiter.returncode == 2, output
    assert time.monotonic() - started < 60
    assert (
        f"waiting for a slot: pool 'gpu' (1 of 1 slots held by run {holder} step other_step)"
        in output
    )
    assert "STAGE FAILED: stage prepare, run " in output
    assert "gave up after waiting 3 s for a slot: pool 'gpu'" in output
    [run] = _waiter_runs(instance)
    assert run.status == dg.DagsterRunStatus.FAILURE
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert info.active_run_ids == {holder}
    assert {step.run_id for step in info.pending_steps} == {holder}  # the waiter's claim is gone


def test_ctrl_c_ends_a_wait_for_a_slot(tmp_path: Path):
    home = tmp_path / "dagster"
    instance, _ = _instance_with_held_slot(home, os.getpid())
    waiter = _start_waiter(home, 600)
    try:
        assert waiter.stdout is not None
        deadline = time.monotonic() + 120
        for line in waiter.stdout:
            if line.startswith("waiting for a slot") or time.monotonic() > deadline:
                break
        waiter.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        output, _ = waiter.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the run ignored Ctrl-C while waiting for a slot")
    finally:
        waiter.kill()
    assert time.monotonic() - interrupted_at < 15
    assert "KeyboardInterrupt: interrupted while waiting for a slot: pool 'gpu'" in output
    [run] = _waiter_runs(instance)
    assert run.status == dg.DagsterRunStatus.FAILURE
