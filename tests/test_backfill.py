"""Backfills on the tiny world: some shards, then the rest, from Python and from the Dagster CLI.

One module-scoped home: `llm2loss run --stage prepare` (a real subprocess, as a user would run it)
writes the data and models and registers the shard partitions in a file-backed DAGSTER_HOME. The
staged backfill (one shard, a diagnose that is refused, the rest, a diagnose that succeeds) runs
once in the `backfilled` fixture, and the tests assert on what it recorded; the tests that install
a new model version work on a copy of the home and instance. So no test depends on which tests
ran before it (checked in both orders and one at a time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import sha256_file
from llm2loss_pipeline.definitions import build_definitions
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.runner import StageFailed, run_pipeline
from llm2loss_pipeline.defs.sensors import MODEL_SHA256_TAG, build_model_registry_sensor

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TABLES = ("per_sample_losses", "image_embeddings")
LOSSES = dg.AssetKey("per_sample_losses")


def _env(home: Path, dagster_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LLM2LOSS_HOME": str(home),
        "LLM2LOSS_CONFIG": str(TINY),
        "DAGSTER_HOME": str(dagster_home),
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("backfill")
    home, dagster_home = root / "home", root / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # SQLite storage
    env = _env(home, dagster_home)
    prepare = ["run", "--config", str(TINY), "--stage", "prepare", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "llm2loss_pipeline.cli", *prepare],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    config = load_config(TINY).model_copy(update={"home": str(home)})
    shards = instance.get_dynamic_partitions(SHARDS.name)
    assert len(shards) >= 3, shards  # 300 images in shards of 128
    yield config, instance, Layout(home.resolve()), shards, env
    instance.dispose()


def _materialized(instance: dg.DagsterInstance, key: dg.AssetKey) -> set[str]:
    return set(instance.get_materialized_partitions(key))


@dataclass(frozen=True)
class Backfill:
    """What the staged backfill saw at each stage."""

    after_first_shard: set[str]
    refusal: str
    heads_after_refusal: bool
    after_all_shards: dict[str, set[str]]


@pytest.fixture(scope="module")
def backfilled(prepared) -> Backfill:
    config, instance, layout, shards, _ = prepared
    run_pipeline(config, ["signals"], shards=shards[:1], instance=instance)
    after_first = _materialized(instance, LOSSES)
    with pytest.raises(StageFailed) as failure:
        run_pipeline(config, ["diagnose"], instance=instance)
    heads_after_refusal = (layout.heads_dir / "ensemble.json").exists()
    run_pipeline(config, ["signals"], shards=shards[1:], instance=instance)
    after_all = {table: _materialized(instance, dg.AssetKey(table)) for table in TABLES}
    run_pipeline(config, ["diagnose"], instance=instance)
    return Backfill(after_first, str(failure.value), heads_after_refusal, after_all)


def test_the_encoder_says_which_precision_it_trained_in(prepared) -> None:
    """The tiny config names `device: cpu` without a precision, so fp32 whatever the CPU; the
    metadata and the checkpoint's sidecar agree (`auto`, the default: test_device_precision.py)."""
    config, instance, layout, _, _ = prepared
    assert config.devices.encoder.precision == "fp32"
    record = instance.get_latest_materialization_event(dg.AssetKey("semantic_encoder"))
    assert record.asset_materialization.metadata["train_precision"].value == "fp32"
    sidecar = json.loads((layout.encoder_dir / "encoder.json").read_text())
    assert sidecar["metrics"]["train_precision"] == "fp32"


def test_diagnose_waits_until_every_shard_is_backfilled(prepared, backfilled) -> None:
    _, _, _, shards, _ = prepared
    assert backfilled.after_first_shard == {shards[0]}
    # It names the shards still missing, and the command that backfills them.
    message = backfilled.refusal
    assert f"{len(shards) - 1} of {len(shards)} shards" in message
    for shard in shards[1:]:
        assert shard in message
    assert f"llm2loss run --stage signals --shard {shards[1]}" in message
    assert not backfilled.heads_after_refusal


def test_backfilling_the_rest_lets_diagnose_see_the_whole_table(prepared, backfilled) -> None:
    _, instance, layout, shards, _ = prepared
    assert backfilled.after_all_shards == {table: set(shards) for table in TABLES}

    manifest = pl.read_parquet(layout.manifest)
    heads = instance.get_latest_materialization_event(dg.AssetKey("diagnosis_heads"))
    meta = {key: value.value for key, value in heads.asset_materialization.metadata.items()}
    by_split = dict(manifest.group_by("split").len().iter_rows())
    assert meta["n_train"] == by_split[meta["train_split"]]
    assert meta["n_eval"] == by_split[meta["eval_split"]]
    extra = json.loads((layout.heads_dir / "ensemble.json").read_text())["extra"]
    assert (extra["n_train"], extra["n_eval"]) == (meta["n_train"], meta["n_eval"])
    with duckdb.connect(str(layout.duckdb), read_only=True) as con:
        rows, shards_seen = con.execute(
            "SELECT count(*), count(DISTINCT sample_id) FROM per_sample_losses"
        ).fetchone()
    assert rows == shards_seen == manifest.height


def test_rerunning_a_shard_rewrites_identical_bytes(prepared, backfilled) -> None:
    config, instance, layout, shards, _ = prepared
    key = shards[1]
    before = {table: sha256_file(layout.shard_table(table, key)) for table in TABLES}
    runs_before = len(instance.get_runs())
    run_pipeline(config, ["signals"], shards=[key], instance=instance)
    assert len(instance.get_runs()) == runs_before + 1
    assert {table: sha256_file(layout.shard_table(table, key)) for table in TABLES} == before


def test_cli_backfill_of_one_partition(prepared, backfilled) -> None:
    _, instance, layout, shards, env = prepared
    key = shards[-1]
    before = sha256_file(layout.shard_table("per_sample_losses", key))
    command = [
        str(Path(sys.executable).with_name("dagster")),
        "asset",
        "materialize",
        "-m",
        "llm2loss_pipeline.definitions",
        "--select",
        "per_sample_losses",
        "--partition",
        key,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": key}), limit=1)
    assert runs and runs[0].is_success
    assert runs[0].asset_selection == {LOSSES}
    record = instance.get_latest_materialization_event(LOSSES)
    assert record is not None and record.run_id == runs[0].run_id
    assert record.asset_materialization.partition == key
    assert sha256_file(layout.shard_table("per_sample_losses", key)) == before


# --- a new model version from the registry, on the backfilled home ------------------------------


def _scripted_model(path: Path, num_classes: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes)
    )
    torch.jit.save(torch.jit.script(model.eval()), str(path))


@pytest.fixture()
def sandbox(prepared, backfilled, tmp_path):
    """A copy of the backfilled home and Dagster instance: a new black box version installed
    here would change every later test's losses on the shared one."""
    config, _, layout, shards, env = prepared
    home, dagster_home = tmp_path / "home", tmp_path / "dagster"
    shutil.copytree(layout.home, home, symlinks=True)
    shutil.copytree(env["DAGSTER_HOME"], dagster_home, symlinks=True)
    copy = dg.DagsterInstance.from_config(str(dagster_home))
    moved = config.model_copy(update={"home": str(home)})
    yield moved, copy, Layout(home.resolve()), shards, _env(home, dagster_home)
    copy.dispose()


def _registry_run(prepared, tmp_path: Path) -> tuple[dg.RunRequest, dg.ExecuteInProcessResult]:
    config, instance, layout, _, _ = prepared
    manifest = pl.read_parquet(layout.manifest)
    n_classes = manifest.filter(pl.col("split") == "train")["identity"].n_unique()
    tmp_path.mkdir(parents=True, exist_ok=True)
    _scripted_model(tmp_path / "identity-v2.pt", n_classes, seed=3)
    sensor = build_model_registry_sensor(tmp_path, black_box=config.black_box, settle_seconds=0)
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    [request] = tick.run_requests
    job = build_definitions(config).resolve_implicit_global_asset_job_def()
    outcome = job.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        asset_selection=request.asset_selection,
        tags=request.tags,
    )
    return request, outcome


def test_a_registry_version_materializes_the_black_box_from_that_file(sandbox, tmp_path) -> None:
    _, instance, _, _, _ = sandbox
    request, outcome = _registry_run(sandbox, tmp_path / "registry")
    assert outcome.success
    record = instance.get_latest_materialization_event(dg.AssetKey("black_box_model"))
    assert record.run_id == outcome.run_id
    assert record.asset_materialization.metadata["source"].value == "torchscript"
    run = instance.get_run_by_id(outcome.run_id)
    assert run.tags[MODEL_SHA256_TAG] == request.run_key
    assert run.asset_selection == {dg.AssetKey("black_box_model")}


def test_losses_launched_by_automation_use_the_registry_version(sandbox, tmp_path) -> None:
    config, instance, layout, shards, _ = sandbox
    request, outcome = _registry_run(sandbox, tmp_path / "registry")
    assert outcome.success
    key = shards[0]
    # What the automation sensor launches: the losses with the deployment's run config.
    run_pipeline(config, ["signals"], shards=[key], instance=instance)
    automated = pl.read_parquet(layout.shard_table("per_sample_losses", key))
    # What they should equal: the losses of the registry version itself.
    settings = request.run_config["resources"]["black_box"]["config"]
    pointed = config.model_copy(update={"black_box": config.black_box.model_validate(settings)})
    run_pipeline(pointed, ["signals"], shards=[key], instance=instance)
    expected = pl.read_parquet(layout.shard_table("per_sample_losses", key))
    assert automated["loss"].to_list() == expected["loss"].to_list()
