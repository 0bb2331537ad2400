"""The shared-deployment pieces for real: Postgres instance storage, Celery workers on Redis.

Each test skips, saying which, only when its service does not answer on 127.0.0.1. They use
their own resources and remove them: a fresh Postgres database per run, Redis databases 13/14
(flushed before and after), Celery workers started here and killed in finalizers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.runner import run_pipeline

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
PREPARE_ASSETS = {"dataset_manifest", "celeba_attributes", "black_box_model", "semantic_encoder"}
GPU_STEPS = {"black_box_model", "semantic_encoder", "per_sample_losses", "image_embeddings"}
SIGNALS_TABLES = ("per_sample_losses", "image_embeddings")
GPU_WORKERS = ("gpu0", "gpu1")
REDIS_BROKER_DB, REDIS_BACKEND_DB = 13, 14


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=2):
        return True
    return False


def _require(port: int, service: str) -> None:
    if not _answers(port):
        pytest.skip(f"{service} does not answer on {HOST}:{port}; start it to run this test")


# --- PostgreSQL instance storage ----------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    _require(5432, "PostgreSQL")
    import psycopg2

    name = f"llm2loss_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=HOST, port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        # The driver is explicit: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which
        # dagster-postgres does not install (it brings psycopg2).
        yield f"postgresql+psycopg2://postgres@{HOST}:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_prepare_stage_is_recorded_in_postgres(postgres_url, tmp_path, monkeypatch) -> None:
    import psycopg2
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {postgres_url}\ntelemetry:\n  enabled: false\n"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    config = load_config(TINY).model_copy(update={"home": str(tmp_path / "home")})
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        outcome = run_pipeline(config, ["prepare"], instance=instance)
        [run_id] = [run.run_id for run in outcome.runs]
        run = instance.get_run_by_id(run_id)
        assert run.job_name == "prepare" and run.is_success
        for name in PREPARE_ASSETS:
            record = instance.get_latest_materialization_event(dg.AssetKey(name))
            assert record is not None and record.run_id == run_id, name
        shards = instance.get_dynamic_partitions(SHARDS.name)
        assert len(shards) >= 2

    # The same facts straight from the tables, through a separate connection.
    dsn = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    with contextlib.closing(psycopg2.connect(dsn)) as con, con.cursor() as cursor:
        cursor.execute("SELECT pipeline_name, status FROM runs WHERE run_id = %s", (run_id,))
        assert cursor.fetchall() == [("prepare", "SUCCESS")]
        cursor.execute(
            "SELECT asset_key FROM event_logs "
            "WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,),
        )
        materialized = {json.loads(key)[0] for (key,) in cursor.fetchall()}
        assert materialized == PREPARE_ASSETS
        cursor.execute(
            "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s",
            (SHARDS.name,),
        )
        assert sorted(key for (key,) in cursor.fetchall()) == sorted(shards)


# --- Celery executor with a Redis broker --------------------------------------------------------


def _flush_redis() -> None:
    import redis

    for db in (REDIS_BROKER_DB, REDIS_BACKEND_DB):
        redis.Redis(host=HOST, port=6379, db=db).flushdb()


def _stop(process: subprocess.Popen) -> None:
    """Stop a worker: `dagster-celery` and its `celery` child share a process group (its pid).

    SIGINT, not SIGTERM: the wrapper then stops and reaps its child before it exits itself, so
    no worker is left behind, orphaned, after the test.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def celery_deployment(tmp_path) -> Iterator[dict]:
    _require(6379, "Redis")
    _flush_redis()
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    # Celery needs a persistent instance that every worker can open: SQLite files will do on one
    # host (a multi-host deployment uses Postgres, deploy/celery/dagster.yaml).
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # Create the storage schema once, before two workers race to create it.
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()
    run_config = tmp_path / "celery_run_config.yaml"
    run_config.write_text(
        "execution:\n  config:\n"
        f"    broker: redis://{HOST}:6379/{REDIS_BROKER_DB}\n"
        f"    backend: redis://{HOST}:6379/{REDIS_BACKEND_DB}\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_HOME": str(dagster_home),
        "LLM2LOSS_HOME": str(tmp_path / "home"),
        "LLM2LOSS_CONFIG": str(TINY),
        "LLM2LOSS_EXECUTOR": "celery",
        # One thread per worker process: two workers share this host's cores.
        "OMP_NUM_THREADS": "1",
        # `dagster-celery worker start` runs `celery` by name: the venv's must come first, also
        # when the tests run without an activated venv (`make test`).
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    token = uuid.uuid4().hex[:6]
    workers: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        # Two workers on the gpu queue, so that independent model steps (the black box and the
        # encoder; two shards) run at once, as on a deployment with two accelerators.
        roles = [("cpu", "dagster")] + [(role, "gpu") for role in GPU_WORKERS]
        for role, queue in roles:
            log = tmp_path / f"worker-{role}.log"
            command = [
                str(BIN / "dagster-celery"),
                "worker",
                "start",
                "-A",
                "dagster_celery.app",
                "-y",
                str(run_config),
                "-q",
                queue,
                "-n",
                f"llm2loss-{role}-{token}",
                # The default prefork pool runs tasks in daemonic processes, which may not start
                # the process pools that world drawing and data loading use: one task at a time
                # in the worker's own process instead (scale with more workers). `dagster-celery`
                # already prefetches one task only, so a busy worker leaves the next to an idle one.
                "--",
                "--pool=solo",
            ]
            with log.open("w") as out:
                process = subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            workers[role] = (process, log)
        for role, (process, log) in workers.items():
            _wait_until_ready(process, log, role)
        yield {"env": env, "run_config": run_config, "token": token, "home": dagster_home}
    finally:
        for process, _ in workers.values():
            _stop(process)
        _flush_redis()


def _wait_until_ready(process: subprocess.Popen, log: Path, role: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(
                f"the {role} Celery worker exited ({process.returncode}):\n{log.read_text()}"
            )
        time.sleep(0.5)
    pytest.fail(f"the {role} Celery worker was not ready in {timeout:.0f}s:\n{log.read_text()}")


def _dagster_command(deployment: dict, job: str, *extra: str) -> list[str]:
    return [
        str(BIN / "dagster"),
        "job",
        "execute",
        "-m",
        "llm2loss_pipeline.definitions",
        "-j",
        job,
        "-c",
        str(deployment["run_config"]),
        *extra,
    ]


def _dagster_job(deployment: dict, job: str, *extra: str) -> None:
    command = _dagster_command(deployment, job, *extra)
    done = subprocess.run(
        command, env=deployment["env"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, f"{job} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def _signals_at_once(deployment: dict, shards: list[str], log_dir: Path) -> None:
    """One `signals` run per shard, all submitted at once (as a backfill would)."""
    running = []
    for shard in shards:
        log = log_dir / f"signals-{shard}.log"
        tags = json.dumps({"dagster/partition": shard})
        with log.open("w") as out:
            process = subprocess.Popen(
                _dagster_command(deployment, "signals", "--tags", tags),
                env=deployment["env"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        running.append((process, log))
    for process, log in running:
        try:
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
        assert code == 0, f"signals failed:\n{log.read_text()[-4000:]}"


def _signals_outputs(home: Path, shards: list[str]) -> dict[str, str]:
    """sha256 of each shard's output files: the Parquet table and its sidecar, per asset."""
    hashes = {}
    for table in SIGNALS_TABLES:
        for shard in shards:
            for path in sorted((home / "tables" / table).glob(f"{shard}.*")):
                hashes[f"{table}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _workers_by_step(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Which Celery worker ran each step, from the engine events the workers write."""
    records = instance.get_records_for_run(
        run_id=run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
    ).records
    placed = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = event.engine_event_data.metadata if event.engine_event_data else {}
        if "Celery worker" in metadata:
            placed[event.step_key] = metadata["Celery worker"].value.split("@")[0]
    return placed


def test_celery_workers_run_the_prepare_and_signals_stages(celery_deployment, tmp_path) -> None:
    token = celery_deployment["token"]
    _dagster_job(celery_deployment, "prepare")
    with dg.DagsterInstance.from_config(str(celery_deployment["home"])) as instance:
        shards = instance.get_dynamic_partitions(SHARDS.name)
        assert len(shards) >= 2
        two = sorted(shards)[:2]
        _signals_at_once(celery_deployment, two, tmp_path)

        runs = instance.get_runs()
        assert sorted(run.job_name for run in runs) == ["prepare", "signals", "signals"]
        assert all(run.is_success for run in runs)
        signals_runs = {
            run.tags["dagster/partition"]: run for run in runs if run.job_name == "signals"
        }
        assert sorted(signals_runs) == two
        [prepare] = [run for run in runs if run.job_name == "prepare"]
        placed = _workers_by_step(instance, prepare.run_id)
        # Every step ran on a worker; model steps on a gpu queue's worker, the others on the
        # default queue's.
        assert set(placed) == PREPARE_ASSETS
        gpu_workers = {f"llm2loss-{role}-{token}" for role in GPU_WORKERS}
        for step, worker in placed.items():
            if step in GPU_STEPS:
                assert worker in gpu_workers, (step, worker)
            else:
                assert worker == f"llm2loss-cpu-{token}", (step, worker)
        shard_steps = {
            (shard, step): worker
            for shard, run in signals_runs.items()
            for step, worker in _workers_by_step(instance, run.run_id).items()
        }
        assert set(shard_steps) == {(s, a) for s in two for a in SIGNALS_TABLES}
        # The two shards' four steps were spread over both gpu workers.
        assert set(shard_steps.values()) == gpu_workers, shard_steps
        for name in SIGNALS_TABLES:
            assert set(instance.get_materialized_partitions(dg.AssetKey(name))) == set(two)

        # The same shards materialized in-process give the same bytes.
        home = Path(celery_deployment["env"]["LLM2LOSS_HOME"])
        on_workers = _signals_outputs(home, two)
        assert len(on_workers) == 2 * 2 * len(two)  # table + sidecar, per asset and shard
        for table in SIGNALS_TABLES:
            shutil.rmtree(home / "tables" / table)
        config = load_config(TINY).model_copy(update={"home": str(home)})
        import torch  # lazy: only this test needs it in the test process

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the workers run (OMP_NUM_THREADS=1)
        try:
            run_pipeline(config, ["signals"], shards=two, instance=instance)
        finally:
            torch.set_num_threads(threads)
        assert _signals_outputs(home, two) == on_workers
