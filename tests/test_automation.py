"""Automation: the model registry sensor, the declarative conditions it relies on, the schedule.

Everything here is evaluated with Dagster's own test helpers (`build_sensor_context`,
`evaluate_automation_conditions`, `build_schedule_context`) on a throwaway instance; no asset runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.definitions import build_definitions, defs
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.schedules import (
    DEFAULT_RETRAIN_CRON,
    RETRAIN_CRON_ENV,
    RETRAIN_SCHEDULE,
    build_retrain_schedule,
)
from llm2loss_pipeline.defs.sensors import (
    AUTOMATION_SENSOR,
    MODEL_REGISTRY_SENSOR,
    MODEL_SHA256_TAG,
    MODEL_VERSION_TAG,
    REGISTRY_ENV,
    build_model_registry_sensor,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BLACK_BOX = dg.AssetKey("black_box_model")


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def _tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None):
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))


def _write(path: Path, data: bytes, mtime: float | None = None) -> str:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return hashlib.sha256(data).hexdigest()


# --- the model registry sensor ------------------------------------------------------------------


def test_registry_sensor_is_off_and_explains_itself_without_a_registry(
    instance, monkeypatch
) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    sensor = build_model_registry_sensor()
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    result = _tick(sensor, instance, None)
    assert result.run_requests == []
    assert REGISTRY_ENV in result.skip_message


def test_registry_sensor_runs_by_default_when_the_env_names_a_folder(
    instance, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "missing"))
    sensor = build_model_registry_sensor()
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    result = _tick(sensor, instance, None)
    assert result.run_requests == []
    assert "missing is not a folder" in result.skip_message
    (tmp_path / "missing").mkdir()
    result = _tick(sensor, instance, None)
    assert result.skip_message.startswith("no checkpoint (.pt, .safetensors)")


def test_each_new_model_version_is_requested_once(instance, tmp_path) -> None:
    sensor = build_model_registry_sensor(tmp_path, settle_seconds=0)
    first = _tick(sensor, instance, None)
    assert first.run_requests == [] and first.skip_message.startswith("no checkpoint")

    sha_v1 = _write(tmp_path / "model-v1.pt", b"torchscript archive v1", mtime=1_000_000)
    (tmp_path / ".model-v2.pt.x1y2.tmp").write_bytes(b"half written")  # an atomic writer's temp
    new = _tick(sensor, instance, first.cursor)
    assert len(new.run_requests) == 1
    request = new.run_requests[0]
    assert request.asset_selection == [BLACK_BOX]
    assert request.run_key == sha_v1
    settings = request.run_config["resources"]["black_box"]["config"]
    assert settings["source"] == "torchscript"
    assert settings["torchscript_path"] == str(tmp_path / "model-v1.pt")
    assert request.tags[MODEL_SHA256_TAG] == sha_v1
    assert request.tags[MODEL_VERSION_TAG] == sha_v1[:12]
    cursor = json.loads(new.cursor)
    assert cursor["versions"] == [sha_v1]
    assert next(iter(cursor["files"].values()))["size"] == len(b"torchscript archive v1")

    same = _tick(sensor, instance, new.cursor)
    assert same.run_requests == [] and same.skip_message.startswith("no new model version")

    # Touched, or copied under another name: the same bytes are the same version.
    os.utime(tmp_path / "model-v1.pt", (2_000_000, 2_000_000))
    shutil.copy(tmp_path / "model-v1.pt", tmp_path / "model-v1-copy.pt")
    touched = _tick(sensor, instance, same.cursor)
    assert touched.run_requests == []
    assert len(json.loads(touched.cursor)["files"]) == 2

    sha_v2 = _write(tmp_path / "model-v1.pt", b"torchscript archive v2, retrained", mtime=3e6)
    changed = _tick(sensor, instance, touched.cursor)
    assert [r.run_key for r in changed.run_requests] == [sha_v2]
    assert json.loads(changed.cursor)["versions"] == [sha_v1, sha_v2]
    # Rolling back to v1's bytes is not a new version (the run key would be refused anyway).
    _write(tmp_path / "model-v1.pt", b"torchscript archive v1", mtime=4e6)
    assert _tick(sensor, instance, changed.cursor).run_requests == []


def test_several_new_versions_in_one_tick_request_only_the_newest(instance, tmp_path) -> None:
    sensor = build_model_registry_sensor(tmp_path, settle_seconds=0)
    sha_old = _write(tmp_path / "b-older.pt", b"older", mtime=1_000_000)
    (tmp_path / "sub").mkdir()
    sha_new = _write(tmp_path / "sub" / "a-newer.pt", b"newer", mtime=2_000_000)
    result = _tick(sensor, instance, None)
    assert [r.run_key for r in result.run_requests] == [sha_new]
    config = result.run_requests[0].run_config["resources"]["black_box"]["config"]
    assert config["torchscript_path"] == str(tmp_path / "sub" / "a-newer.pt")
    assert set(json.loads(result.cursor)["versions"]) == {sha_old, sha_new}
    assert _tick(sensor, instance, result.cursor).run_requests == []


def test_a_file_still_being_written_waits_for_a_later_tick(instance, tmp_path) -> None:
    sensor = build_model_registry_sensor(tmp_path, settle_seconds=3600)
    _write(tmp_path / "model.pt", b"being copied")
    waiting = _tick(sensor, instance, None)
    assert waiting.run_requests == []
    assert "waiting for 1 file(s) still being written" in waiting.skip_message
    assert json.loads(waiting.cursor)["files"] == {}


def test_safetensors_files_are_reported_not_requested(instance, tmp_path) -> None:
    """No black_box source loads a bare weights file, so the sensor names it and runs nothing."""
    sensor = build_model_registry_sensor(tmp_path, settle_seconds=0)
    _write(tmp_path / "user-model.safetensors", b"safetensors weights", mtime=1e6)
    result = _tick(sensor, instance, None)
    assert result.run_requests == []
    assert "user-model.safetensors" in result.skip_message
    assert "no 'checkpoint' source" in result.skip_message


def test_a_corrupt_cursor_is_an_error_that_says_how_to_reset_it(instance, tmp_path) -> None:
    sensor = build_model_registry_sensor(tmp_path, settle_seconds=0)
    with pytest.raises(Exception, match=r"unreadable cursor.*Set cursor value"):
        _tick(sensor, instance, '{"format": 99}')


def test_the_requested_run_config_is_valid_and_keeps_other_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path))
    tiny = load_config(TINY)
    tiny = tiny.model_copy(
        update={"black_box": tiny.black_box.model_copy(update={"label_map_path": "/m/labels.json"})}
    )
    tiny_defs = build_definitions(tiny)
    # The sensor registered in the Definitions: it reads $LLM2LOSS_MODEL_REGISTRY.
    sensor = tiny_defs.get_repository_def().get_sensor_def(MODEL_REGISTRY_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    _write(tmp_path / "f.pt", b"weights", mtime=1e6)
    with dg.instance_for_test() as instance:
        request = _tick(sensor, instance, None).run_requests[0]
    job = tiny_defs.resolve_implicit_global_asset_job_def()
    resolved = dg.validate_run_config(job, request.run_config)["resources"]["black_box"]["config"]
    assert resolved["source"] == "torchscript"
    assert resolved["torchscript_path"] == str(tmp_path / "f.pt")
    # Run config replaces a resource's values as a whole: the deployment's settings must ride along.
    assert resolved["image_size"] == 32 and resolved["label_map_path"] == "/m/labels.json"


def test_sensors_and_schedule_are_registered() -> None:
    repo = defs.get_repository_def()
    sensors = {sensor.name: sensor for sensor in repo.sensor_defs}
    assert set(sensors) == {MODEL_REGISTRY_SENSOR, AUTOMATION_SENSOR}
    automation = sensors[AUTOMATION_SENSOR]
    assert isinstance(automation, dg.AutomationConditionSensorDefinition)
    # Dagster's own default_automation_condition_sensor starts stopped; ours runs by default.
    assert automation.default_status == dg.DefaultSensorStatus.RUNNING
    targeted = automation.asset_selection.resolve(defs.resolve_asset_graph())
    assert {"per_sample_losses", "image_embeddings", "diagnosis_heads"} <= {
        key.to_user_string() for key in targeted
    }
    assert repo.get_schedule_def(RETRAIN_SCHEDULE).default_status == (
        dg.DefaultScheduleStatus.STOPPED
    )


# --- declarative automation ---------------------------------------------------------------------


def _materialize(instance: dg.DagsterInstance, name: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=partition))


def _requested(result, name: str) -> set[str | None]:
    return set(result.get_requested_partitions(dg.AssetKey(name)))


def test_a_new_black_box_requests_losses_not_embeddings_and_vice_versa(instance) -> None:
    shards = ["shard-00000", "shard-00001", "shard-00002"]
    instance.add_dynamic_partitions(SHARDS.name, shards)
    for name in ("dataset_manifest", "celeba_attributes", "black_box_model", "semantic_encoder"):
        _materialize(instance, name)
    for shard in shards:
        _materialize(instance, "per_sample_losses", shard)
        _materialize(instance, "image_embeddings", shard)
    _materialize(instance, "diagnosis_heads")
    _materialize(instance, "attribute_disparity_report")

    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert settled.total_requested == 0  # everything is up to date

    _materialize(instance, "black_box_model")  # a new model version
    after_model = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=settled.cursor
    )
    assert _requested(after_model, "per_sample_losses") == set(shards)
    assert _requested(after_model, "image_embeddings") == set()
    # The heads wait for the new losses: none of their own inputs has changed yet.
    assert _requested(after_model, "diagnosis_heads") == set()

    again = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=after_model.cursor
    )
    assert again.total_requested == 0  # requested once, not on every tick

    for shard in shards:
        _materialize(instance, "per_sample_losses", shard)
    after_losses = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=again.cursor
    )
    assert _requested(after_losses, "diagnosis_heads") == {None}
    assert _requested(after_losses, "attribute_disparity_report") == {None}
    assert _requested(after_losses, "image_embeddings") == set()
    _materialize(instance, "diagnosis_heads")
    _materialize(instance, "attribute_disparity_report")
    quiet = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=after_losses.cursor
    )
    assert quiet.total_requested == 0

    _materialize(instance, "semantic_encoder")  # a new encoder
    after_encoder = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=quiet.cursor
    )
    assert _requested(after_encoder, "image_embeddings") == set(shards)
    assert _requested(after_encoder, "per_sample_losses") == set()
    assert _requested(after_encoder, "diagnosis_heads") == {None}  # the encoder is its input too


def test_automation_waits_for_missing_upstreams(instance) -> None:
    instance.add_dynamic_partitions(SHARDS.name, ["shard-00000"])
    _materialize(instance, "black_box_model")  # but no dataset manifest yet
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert _requested(result, "per_sample_losses") == set()


# --- the retrain schedule -----------------------------------------------------------------------


def test_retrain_schedule_requests_the_black_box_only(instance, monkeypatch) -> None:
    monkeypatch.delenv(RETRAIN_CRON_ENV, raising=False)
    schedule = build_retrain_schedule()
    assert schedule.cron_schedule == DEFAULT_RETRAIN_CRON
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    when = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
    requests = schedule.evaluate_tick(context).run_requests
    assert len(requests) == 1
    job = dg.Definitions(
        assets=defs.resolve_asset_graph().assets_defs, schedules=[schedule]
    ).resolve_job_def(schedule.job_name)
    assert job.asset_layer.selected_asset_keys == {BLACK_BOX}
    assert requests[0].tags["llm2loss/trigger"] == RETRAIN_SCHEDULE


def test_retrain_cron_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(RETRAIN_CRON_ENV, "30 1 * * *")
    assert build_retrain_schedule().cron_schedule == "30 1 * * *"
    monkeypatch.setenv(RETRAIN_CRON_ENV, "every sunday")
    with pytest.raises(ValueError, match=f"'every sunday'.*\\${RETRAIN_CRON_ENV}"):
        build_retrain_schedule()
