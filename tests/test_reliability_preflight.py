"""Reliability, round two (issue 23), "checks that come too late", on every path into the graph.

- Runs that Dagster starts itself (the UI, the daemon, `dagster asset materialize`) get the same
  preflight as `llm2loss run`, before their first step does any work, checked once per run and
  on the run's own resources (launchpad edits included).
- A user model without a label map file must have one output per train identity; that count is
  now known before the dataset is prepared.
- The three limits set through the environment share one parser and one error format.

Each test failed on the code before the fix (the Dagster path had no preflight; the output count
was checked in black_box_model; the parsers worded their errors three ways).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest
import torch
import yaml
from torch import nn

from llm2loss_pipeline.core.config import ConfigError, PipelineConfig, validate_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.preflight import preflight
from llm2loss_pipeline.core.task import TaskConfig
from llm2loss_pipeline.defs import preflight as defs_preflight
from llm2loss_pipeline.defs.build import build_definitions

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
HERE = "tests.test_reliability_preflight"


def exits() -> nn.Module:
    sys.exit(3)


def five_outputs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))


def twenty_outputs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 20))


def _tiny(home: Path, entry_point: str | None = None) -> PipelineConfig:
    raw = yaml.safe_load(TINY.read_text())
    raw["home"] = str(home)
    if entry_point:
        raw["black_box"] = {"entry_point": f"{HERE}:{entry_point}", "image_size": 32}
    return validate_config(raw, source="tiny.yaml")


def _failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {
        event.step_key: event.step_failure_data.error.message
        for event in result.all_events
        if event.event_type_value == "STEP_FAILURE"
    }


def _started(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}


# ---- runs that Dagster starts: the preflight before the first step's work ---------------------


def test_a_dagster_run_checks_the_entry_point_before_its_first_step_does_anything(tmp_path):
    """As the UI's "Materialize all" or `dagster asset materialize` would: no `llm2loss run`."""
    config = _tiny(tmp_path / "home", "exits")
    result = (
        build_definitions(config)
        .resolve_job_def("prepare")
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    assert not result.success
    failures = _failures(result)
    assert list(failures) == ["dataset_manifest"]
    assert "calling exits() failed (it called sys.exit(3))" in failures["dataset_manifest"]
    assert "(with this run's resources): black_box: entry point" in failures["dataset_manifest"]
    assert "semantic_encoder" not in _started(result)
    assert not Layout.at(config.home).world_dir.exists()  # no world was drawn


def test_a_launchpad_edit_is_what_is_checked_even_when_the_run_starts_at_the_encoder(tmp_path):
    """The YAML's black box is fine; the run's edited one is not, and the run holds only the
    encoder (the manifest was materialized before): it fails before training."""
    config = _tiny(tmp_path / "home")
    edited = {"source": "entry_point", "entry_point": f"{HERE}:exits", "image_size": 32}
    result = (
        build_definitions(config)
        .resolve_job_def("prepare")
        .execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
            asset_selection=[dg.AssetKey("semantic_encoder")],
            run_config={"resources": {"black_box": {"config": edited}}},
        )
    )
    assert not result.success
    assert "calling exits() failed" in _failures(result)["semantic_encoder"]
    assert not Layout.at(config.home).encoder_dir.exists()


def test_the_preflight_runs_once_per_run_and_not_in_runs_llm2loss_run_checked(
    tmp_path, monkeypatch
):
    """Two model assets in one run: one check, and the run is tagged; a run that `llm2loss
    run` launched (tagged as checked) is not checked again by its assets."""
    from llm2loss_pipeline.core.steps import black_box as black_box_steps
    from llm2loss_pipeline.core.steps import encoder as encoder_steps

    checked: list[PipelineConfig] = []
    monkeypatch.setattr(defs_preflight, "preflight", lambda config, _s: checked.append(config))
    common = {"path": tmp_path / "model", "sha256": "0" * 64, "metrics": {}}
    monkeypatch.setattr(
        black_box_steps,
        "fit_black_box",
        lambda *a, **k: SimpleNamespace(
            source="builtin",
            curve=[],
            curve_png=None,
            task=TaskConfig(),
            data_version="0" * 64,
            **common,
        ),
    )
    monkeypatch.setattr(
        encoder_steps,
        "fit_encoder",
        lambda *a, **k: SimpleNamespace(
            mode="caption_tuned",
            embed_dim=8,
            load_snippet="",
            zero_shot_auroc={},
            train_precision="bf16",
            **common,
        ),
    )
    config = _tiny(tmp_path / "home")
    job = build_definitions(config).resolve_job_def("prepare")
    models = [dg.AssetKey("black_box_model"), dg.AssetKey("semantic_encoder")]
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(instance=instance, asset_selection=models)
    assert result.success
    assert checked == [config]  # the run's resources give back the whole configuration
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[defs_preflight.PREFLIGHT_TAG] == defs_preflight.PASSED
    tagged = {defs_preflight.PREFLIGHT_TAG: defs_preflight.PASSED}
    assert job.execute_in_process(instance=instance, asset_selection=models, tags=tagged).success
    assert len(checked) == 1


class _Launched(Exception):
    pass


def test_llm2loss_run_checks_before_writing_and_tags_its_runs(tmp_path, monkeypatch):
    from llm2loss_pipeline.defs import runner

    config = _tiny(tmp_path / "home", "exits")
    with pytest.raises(ConfigError, match=r"^run\.yaml: black_box: entry point .*sys.exit\(3\)"):
        runner.run_pipeline(config, ["prepare"], source="run.yaml")
    assert not (tmp_path / "home").exists()
    launched: list[dict[str, str]] = []

    def fake_execute(self, **kwargs):
        launched.append(kwargs["tags"])
        raise _Launched  # stop right after the launch

    monkeypatch.setattr(dg.JobDefinition, "execute_in_process", fake_execute)
    with pytest.raises(_Launched):
        runner.run_pipeline(
            _tiny(tmp_path / "home"), ["prepare"], instance=dg.DagsterInstance.ephemeral()
        )
    assert launched[0][defs_preflight.PREFLIGHT_TAG] == defs_preflight.PASSED


# ---- a user model without a label map: its output count before the run -----------------------


def test_a_user_model_without_a_label_map_needs_one_output_per_train_identity(tmp_path):
    with pytest.raises(ConfigError) as caught:
        preflight(_tiny(tmp_path / "home", "five_outputs"), "run.yaml")
    message = str(caught.value)
    assert message.startswith(
        "run.yaml: black_box: the model has 5 outputs, but black_box.label_map_path is not set, "
        "so the default label map gives each of the 20 identities of the train split of the "
        "generated world (world.n_identities: 20) its own output"
    ), message
    assert message.endswith("or give the model 20 outputs")
    config = _tiny(tmp_path / "home", "twenty_outputs")
    assert preflight(config) is config
    assert not (tmp_path / "home").exists()  # checked without preparing the dataset


@pytest.mark.parametrize("split_mode", ["auto", "file", "within_identity"])
def test_the_early_identity_count_is_the_manifests(tmp_path, split_mode):
    """The count the preflight predicts is the one black_box_model's label map will have."""
    from llm2loss_pipeline.core.blackbox.labels import builtin_label_map
    from llm2loss_pipeline.core.config import DatasetConfig
    from llm2loss_pipeline.core.preflight import train_identities
    from llm2loss_pipeline.core.steps.data import prepare_dataset
    from llm2loss_pipeline.core.world.config import WorldConfig

    world = WorldConfig(seed=3, n_identities=6, images_per_identity=4, image_size=16)
    layout = Layout.at(tmp_path / "home")
    generated = DatasetConfig(split_mode=split_mode)
    # The same images as a CelebA root whose official split is identity-disjoint (identities
    # 1-4 train, 5 valid, 6 test), so that `auto` re-splits within identities.
    root = prepare_dataset(layout, generated, world).root.rename(tmp_path / "celeba")
    pairs = [line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines()]
    codes = {identity: min(max(int(identity) - 4, 0), 2) for _, identity in pairs}
    partition = "".join(f"{name} {codes[identity]}\n" for name, identity in pairs)
    (root / "list_eval_partition.txt").write_text(partition)
    celeba = DatasetConfig(source="celeba", celeba_root=str(root), split_mode=split_mode)
    counts = []
    for dataset in (generated, celeba):
        predicted = train_identities(dataset, world)
        manifest = prepare_dataset(layout, dataset, world).manifest
        train = manifest.filter(pl.col("split") == "train")["identity"].to_list()
        assert predicted == sorted(builtin_label_map(train)), (dataset.source, split_mode)
        counts.append(len(predicted))
    assert counts == ([6, 4] if split_mode == "file" else [6, 6])


# ---- one parser for the numbers read from the environment -------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 7.0), ("", 7.0), ("  ", 7.0), ("3", 3.0), ("0.5", 0.5)]
)
def test_env_number_reads_a_positive_number_or_the_default(monkeypatch, raw, expected):
    from llm2loss_pipeline.core.env import env_number

    if raw is None:
        monkeypatch.delenv("LLM2LOSS_TEST_N", raising=False)
    else:
        monkeypatch.setenv("LLM2LOSS_TEST_N", raw)
    assert env_number("LLM2LOSS_TEST_N", 7.0, unit="seconds") == expected


@pytest.mark.parametrize("raw", ["0", "-2", "nan", "inf", "ten", "1e999"])
def test_env_number_refuses_what_is_not_a_positive_number_naming_the_variable(monkeypatch, raw):
    from llm2loss_pipeline.core.env import EnvNumberError, env_number

    monkeypatch.setenv("LLM2LOSS_TEST_N", raw)
    with pytest.raises(EnvNumberError) as caught:
        env_number("LLM2LOSS_TEST_N", 7.0, unit="seconds")
    assert str(caught.value) == (
        f"$LLM2LOSS_TEST_N={raw!r} must be a number of seconds greater than 0; "
        "unset it for the default (7)"
    )


def test_the_three_limits_share_the_parser_and_its_message(monkeypatch):
    from llm2loss_pipeline.core.images import MAX_PIXELS_ENV, max_image_pixels
    from llm2loss_pipeline.core.steps.encoder import CPU_THREADS_ENV, fixed_cpu_threads
    from llm2loss_pipeline.defs.runner import SLOT_WAIT_ENV, slot_wait_limit

    readers = [
        (MAX_PIXELS_ENV, max_image_pixels, "a whole number of pixels", 64 * 1024 * 1024),
        (CPU_THREADS_ENV, fixed_cpu_threads, "a whole number of threads", 2),
        (SLOT_WAIT_ENV, slot_wait_limit, "a number of seconds", 3600),
    ]
    for name, read, kind, default in readers:
        monkeypatch.delenv(name, raising=False)
        assert read() == default
        monkeypatch.setenv(name, "12")
        assert read() == 12
        for bad in ("0", "x"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ValueError) as caught:
                read()
            assert str(caught.value) == (
                f"${name}={bad!r} must be {kind} greater than 0; "
                f"unset it for the default ({default})"
            )
        monkeypatch.setenv(name, "2.5")
        if kind.startswith("a whole"):  # a count cannot be a fraction
            with pytest.raises(ValueError, match="must be a whole number"):
                read()
        else:
            assert read() == 2.5


def test_a_bad_limit_in_the_environment_fails_the_preflight_not_the_step(tmp_path, monkeypatch):
    """Read only by the step that needs it, `$LLM2LOSS_CPU_THREADS=two` failed at the encoder."""
    monkeypatch.setenv("LLM2LOSS_CPU_THREADS", "two")
    monkeypatch.setenv("LLM2LOSS_SLOT_WAIT_S", "-1")
    with pytest.raises(ConfigError) as caught:
        preflight(_tiny(tmp_path / "home"), "run.yaml")
    assert str(caught.value).splitlines() == [
        "environment variables that cannot be used",
        "  $LLM2LOSS_CPU_THREADS='two' must be a whole number of threads greater than 0; "
        "unset it for the default (2)",
        "  $LLM2LOSS_SLOT_WAIT_S='-1' must be a number of seconds greater than 0; "
        "unset it for the default (3600)",
    ]
