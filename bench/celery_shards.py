"""Signals shards on Celery workers: byte-identical to the in-process run, and how much faster
two workers are than one.

On a world `--scale` times the base configuration's images per identity (same identities), the
`prepare` stage is materialized once, then every shard of the `signals` job (per-sample losses
and image embeddings) runs three ways on the same homes:

  a. in-process: `run_pipeline(config, ["signals"])`, shard after shard (what `llm2loss run` does);
  b. Celery, ONE worker serving both queues (`dagster`, `gpu`);
  c. Celery, TWO such workers.

In b and c every shard's run is submitted at once (one `dagster job execute` per shard, forked
from one process that imported the code once, so 14 runs do not hold 14 copies of torch), so the
workers take the shards' steps in parallel. Before each mode the shard outputs are deleted;
after it every output file (Parquet shards and their sha256 sidecars) is hashed, and the hashes
must be equal across the modes. Per mode it prints wall seconds, CPU seconds (the bench's
children, including the submitting runs, plus the workers' processes) and the load average.

`--train-images K` takes the black box and the encoder from a world with K images per identity
(trained first, in its own home, by bench/scale.py's stage children) instead of training them on
the large world: the signals stage only applies them, and the same identities give the same
classes (bench/scale.py's `--after-encoder-only`). Then `prepare` materializes only the data
assets (`dataset_manifest`, `celeba_attributes`), and the checkpoints are copied in.

    nice -n 5 .venv/bin/python bench/celery_shards.py --scale 4 --train-images 8 --home /tmp/cs

Needs Redis on 127.0.0.1:6379; uses its databases 11 and 12 (the tests use 13 and 14), flushed
before and after. Workers run with OMP_NUM_THREADS=1, `--pool=solo`, and are killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
REDIS_BROKER_DB, REDIS_BACKEND_DB = 11, 12
OUTPUT_TABLES = ("per_sample_losses", "image_embeddings")
DATA_ASSETS = ("dataset_manifest", "celeba_attributes")
MODES = {"a": "in-process", "b": "Celery, 1 worker", "c": "Celery, 2 workers"}
CLOCK = os.sysconf("SC_CLK_TCK")


# ---- children: prepare, in-process signals, submit all shard runs ------------------------------


def child_prepare(args: argparse.Namespace) -> None:
    import dagster as dg

    from llm2loss_pipeline.core.config import load_config
    from llm2loss_pipeline.defs.build import build_definitions
    from llm2loss_pipeline.defs.runner import run_pipeline

    config = load_config(args.world_config)
    with dg.DagsterInstance.get() as instance:
        if not args.reuse:
            run_pipeline(config, ["prepare"], instance=instance)
            return
        job = build_definitions(config).resolve_job_def("prepare")
        outcome = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(name) for name in DATA_ASSETS]
        )
        assert outcome.success


def child_inprocess(args: argparse.Namespace) -> None:
    import dagster as dg

    from llm2loss_pipeline.core.config import load_config
    from llm2loss_pipeline.defs.runner import run_pipeline

    with dg.DagsterInstance.get() as instance:
        run_pipeline(load_config(args.world_config), ["signals"], instance=instance)


def child_submit(args: argparse.Namespace) -> None:
    """Every shard's `signals` run at once, each the CLI's `dagster job execute` in a fork."""
    from dagster._cli.job import job_execute_command

    import llm2loss_pipeline.definitions  # noqa: F401  (imported once, shared by the forks)

    pids = {}
    for shard in args.shards.split(","):
        cli = [
            *("-m", "llm2loss_pipeline.definitions", "-j", "signals", "-c", args.run_config),
            *("--tags", json.dumps({"dagster/partition": shard, "bench/mode": args.mode})),
        ]
        pid = os.fork()
        if pid == 0:  # the fork runs one run's coordinator, then leaves without cleanup
            code = 1
            try:
                job_execute_command.main(args=cli, standalone_mode=False)
                code = 0
            finally:
                os._exit(code)
        pids[pid] = shard
    failed = []
    for pid, shard in pids.items():
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status):
            failed.append(shard)
    if failed:
        raise SystemExit(f"signals runs failed for shards {failed}")


CHILDREN = {"prepare": child_prepare, "inprocess": child_inprocess, "submit": child_submit}


# ---- parent ------------------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _child(name: str, env: dict, args: argparse.Namespace, *extra: str) -> tuple[float, float]:
    """Run a child mode, its output into a log; (wall, CPU seconds including its children)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    command += ["--world-config", str(args.world_config), *extra]
    log = args.home / f"{name}-{time.strftime('%H%M%S')}.log"
    started, cpu = time.perf_counter(), _children_cpu()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"child {name} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started, _children_cpu() - cpu


def _group_cpu(pgid: int) -> float:
    """CPU seconds of the live processes of a process group, with their reaped children."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5, pgrp
                total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK


def _flush_redis() -> None:
    import redis

    for db in (REDIS_BROKER_DB, REDIS_BACKEND_DB):
        redis.Redis(host=HOST, port=6379, db=db).flushdb()


def _start_worker(name: str, env: dict, run_config: Path, log: Path) -> subprocess.Popen:
    command = [
        *(str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app"),
        *("-y", str(run_config), "-q", "dagster,gpu", "-n", name),
        # solo: one task at a time in the worker's own process (the prefork pool's daemonic
        # processes may not start the process pools that data loading uses). `dagster-celery`
        # starts celery with --prefetch-multiplier=1: a busy worker leaves the next task to an
        # idle one.
        *("--", "--pool=solo"),
    ]
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_ready(process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"worker exited ({process.returncode}):\n{log.read_text()}")
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready in {timeout:.0f} s:\n{log.read_text()}")


def _stop_worker(process: subprocess.Popen) -> None:
    """SIGINT to the group (the wrapper reaps its `celery` child), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def output_hashes(home: Path) -> dict[str, str]:
    hashes = {}
    for table in OUTPUT_TABLES:
        for path in sorted((home / "tables" / table).glob("*")):
            hashes[f"{table}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _clear_outputs(home: Path) -> None:
    for table in OUTPUT_TABLES:
        shutil.rmtree(home / "tables" / table, ignore_errors=True)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _run_ids(dagster_home: Path) -> set[str]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {run.run_id for run in instance.get_runs()}


def _runs_summary(dagster_home: Path, before: set[str], n_shards: int) -> dict:
    """The runs not in `before`: after checking that there is one per shard and each succeeded,
    the steps each Celery worker ran and when the steps ran."""
    import dagster as dg

    kinds = dg.DagsterEventType
    counts: dict[str, int] = {}
    starts, ends, run_starts, busy = [], [], [], 0.0
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = [run for run in instance.get_runs() if run.run_id not in before]
        assert len(runs) == n_shards and all(run.is_success for run in runs), [
            (run.tags.get("dagster/partition"), run.status) for run in runs
        ]
        for run in runs:
            started: dict[str, float] = {}
            for record in instance.get_records_for_run(run_id=run.run_id).records:
                entry = record.event_log_entry
                event = entry.dagster_event
                if event is None:
                    continue
                if event.event_type == kinds.RUN_START:
                    run_starts.append(entry.timestamp)
                elif event.event_type == kinds.STEP_START:
                    started[entry.step_key] = entry.timestamp
                    starts.append(entry.timestamp)
                elif event.event_type == kinds.STEP_SUCCESS:
                    busy += entry.timestamp - started[entry.step_key]
                    ends.append(entry.timestamp)
                elif event.event_type == kinds.ENGINE_EVENT:
                    data = event.engine_event_data
                    if data and "Celery worker" in data.metadata:
                        worker = data.metadata["Celery worker"].value.split("@")[0]
                        counts[worker] = counts.get(worker, 0) + 1
    return {
        "steps_per_worker": counts,
        # from the first run's start: when the first step started, when the last one ended
        "first_step_s": round(min(starts) - min(run_starts), 1),
        "last_step_end_s": round(max(ends) - min(run_starts), 1),
        # first step start to last step end: the part that more workers can shorten
        "steps_phase_s": round(max(ends) - min(starts), 1),
        "step_seconds_sum": round(busy, 1),
    }


def _world_config(args: argparse.Namespace, home: Path) -> Path:
    import yaml

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    world = raw.setdefault("world", {})
    world["images_per_identity"] = world.get("images_per_identity", 30) * args.scale
    raw["home"] = str(home)
    path = args.home / "world.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _train_small_world(args: argparse.Namespace, identities: int) -> Path:
    """Black box and encoder of a smaller world with the same identities (bench/scale.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale

    home = args.home / f"train-{args.train_images}"
    shutil.rmtree(home, ignore_errors=True)
    spawn_args = argparse.Namespace(threads=1, config=str(args.config))
    for stage in ("world", "black_box", "encoder"):
        row = scale._spawn(stage, home, identities, args.train_images, spawn_args)
        print(f"  training world ({args.train_images} images per identity) {stage}: {row}")
    return home


def run_mode(mode: str, tag: str, args: argparse.Namespace, env: dict, shards: list[str]) -> dict:
    """One mode; `tag` marks its runs (a mode may repeat)."""
    home, dagster_home = args.home / "world", args.home / "dagster"
    _clear_outputs(home)
    load_before, earlier_runs = _loadavg(), _run_ids(dagster_home)
    workers: list[subprocess.Popen] = []
    try:
        if mode == "a":
            wall, cpu = _child("inprocess", env, args)
            worker_cpu = 0.0
        else:
            _flush_redis()
            token = uuid.uuid4().hex[:6]
            for index in range(1 if mode == "b" else 2):
                log = args.home / f"worker-{tag}-{index}.log"
                workers.append(_start_worker(f"w{index}-{token}", env, args.run_config, log))
                _wait_ready(workers[-1], log)
            before = sum(_group_cpu(worker.pid) for worker in workers)
            wall, cpu = _child(
                "submit",
                env,
                args,
                *("--shards", ",".join(shards), "--mode", tag),
                *("--run-config", str(args.run_config)),
            )
            worker_cpu = sum(_group_cpu(worker.pid) for worker in workers) - before
    finally:
        for worker in workers:
            _stop_worker(worker)
        if mode != "a":
            _flush_redis()
    row = {
        "mode": mode,
        "what": MODES[mode],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu + worker_cpu, 1),
        "worker_cpu_s": round(worker_cpu, 1),
        "load_before": load_before,
        "load_after": _loadavg(),
        **_runs_summary(dagster_home, earlier_runs, len(shards)),
        "hashes": output_hashes(home),
    }
    print(
        f"  {mode} ({MODES[mode]}): {row['wall_s']} s wall, {row['cpu_s']} s CPU "
        f"(workers {row['worker_cpu_s']} s), load {load_before} -> {row['load_after']}, "
        f"steps {row['first_step_s']} -> {row['last_step_end_s']} s after the first run's "
        f"start, {row['step_seconds_sum']} step seconds, per worker {row['steps_per_worker']}, "
        f"{len(row['hashes'])} output files",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/llm2loss-celery-shards"))
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--scale", type=int, default=4, help="times the config's images each")
    parser.add_argument(
        "--train-images",
        type=int,
        default=0,
        help="take black box and encoder from a world with this many images per identity "
        "(0: train them on the world itself, in `prepare`)",
    )
    parser.add_argument("--modes", default="a,b,c", help="in order; a mode may repeat")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--world-config", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](args)
        return 0

    import yaml

    args.home = args.home.resolve()
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    home, dagster_home = args.home / "world", args.home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    args.world_config = _world_config(args, home)
    args.run_config = args.home / "celery_run_config.yaml"
    args.run_config.write_text(
        "execution:\n  config:\n"
        f"    broker: redis://{HOST}:6379/{REDIS_BROKER_DB}\n"
        f"    backend: redis://{HOST}:6379/{REDIS_BACKEND_DB}\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DAGSTER_HOME": str(dagster_home),
        "LLM2LOSS_HOME": str(home),
        "LLM2LOSS_CONFIG": str(args.world_config),
        "LLM2LOSS_EXECUTOR": "celery",  # the in-process mode runs execute_in_process regardless
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    world = yaml.safe_load(args.world_config.read_text())["world"]
    started = time.perf_counter()
    if args.train_images:
        trained = _train_small_world(args, world.get("n_identities", 120))
        wall, cpu = _child("prepare", env, args, "--reuse")
        for name in ("black_box", "encoder"):
            shutil.copytree(trained / "models" / name, home / "models" / name)
    else:
        wall, cpu = _child("prepare", env, args)
    import polars as pl

    n_images = pl.read_parquet(home / "tables" / "manifest.parquet").height
    shards = sorted(pl.read_parquet(home / "tables" / "manifest.parquet")["shard"].unique())
    print(
        f"prepare: {n_images:,} images in {len(shards)} shards, {wall:.0f} s wall, {cpu:.0f} s "
        f"CPU (whole setup {time.perf_counter() - started:.0f} s); load {_loadavg()}",
        flush=True,
    )
    rows = [
        run_mode(mode, f"{mode}{index}", args, env, shards)
        for index, mode in enumerate(args.modes.split(","))
    ]
    reference = rows[0]["hashes"]
    identical = all(row["hashes"] == reference for row in rows) and len(reference) > 0
    summary = {
        "n_images": n_images,
        "n_shards": len(shards),
        "rows": rows,
        "byte_identical": identical,
    }
    print(f"\n{n_images:,} images, {len(shards)} shards, {len(reference)} output files per mode")
    print(
        "| mode | wall s | CPU s (workers) | steps phase s | sum of step s | load before -> "
        "after | steps per worker |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['mode']}: {row['what']} | {row['wall_s']} | {row['cpu_s']} "
            f"({row['worker_cpu_s']}) | {row['steps_phase_s']} | {row['step_seconds_sum']} | "
            f"{row['load_before']} -> {row['load_after']} | {row['steps_per_worker'] or '-'} |"
        )
    for key, what in (("wall_s", "wall"), ("steps_phase_s", "steps phase")):
        means = {}
        for mode in ("b", "c"):
            values = [row[key] for row in rows if row["mode"] == mode]
            means[mode] = sum(values) / len(values) if values else None
        if means["b"] and means["c"]:
            summary[f"speedup_{key}"] = round(means["b"] / means["c"], 2)
            print(
                f"speed-up of c over b, {what} (mean {means['b']:.1f} s / {means['c']:.1f} s): "
                f"{summary[f'speedup_{key}']:.2f}x"
            )
    print(f"outputs byte-identical across modes: {identical}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
