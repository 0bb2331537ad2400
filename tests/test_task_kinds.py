"""Task kinds of the built-in black box (core/task.py, core/blackbox/task_labels.py): each kind
trains on its own labels and its loss shards hold one row per sample with those labels; the task
is recorded with the model and decides its data version; a ready loss table follows the task.
Tiny: a 12-identity world of 32-pixel images, one epoch."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.blackbox.task_labels import (
    TaskLabelError,
    builtin_task_label_map,
    dataset_labels,
    recorded_task,
    task_version,
)
from llm2loss_pipeline.core.config import ConfigError, validate_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.preflight import output_count_problem, preflight
from llm2loss_pipeline.core.steps.black_box import fit_black_box, shard_losses, task_labels_path
from llm2loss_pipeline.core.steps.data import prepare_dataset, summarize_attributes
from llm2loss_pipeline.core.storage import sidecar_path, write_parquet_atomic
from llm2loss_pipeline.core.task import TaskConfig
from tests import fault_helpers as fh
from tests.test_user_model import ColourClassifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_WORLD = {"n_identities": 12, "images_per_identity": 6, "hard_attributes": {}}
ATTRIBUTE_TASK = TaskConfig(kind="attribute", target="Male")


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    config = fh.fast_config(
        tmp_path_factory.mktemp("tasks") / "home",
        world=TINY_WORLD,
        black_box={"epochs": 1},
    )
    layout = Layout.at(config.home)
    prepare_dataset(layout, config.dataset, config.world)
    summarize_attributes(layout, config.dataset, config.world)
    return config, layout


def _fit_and_score(config, layout, task):
    with fh.one_thread():
        fitted = fit_black_box(layout, config.black_box, config.devices.black_box, task=task)
        manifest = pl.read_parquet(layout.manifest)
        frames = [
            shard_losses(layout, shard, config.black_box, config.dataset, config.devices.losses)
            for shard in manifest["shard"].unique(maintain_order=True).to_list()
        ]
    return fitted, manifest, pl.concat([result.frame for result in frames])


def test_identity_task_is_the_default_and_keeps_its_data_version(tiny_home):
    config, layout = tiny_home
    fitted, manifest, losses = _fit_and_score(config, layout, TaskConfig())
    assert fitted.data_version == fitted.sha256  # as before tasks existed
    identities = sorted(manifest.filter(pl.col("split") == "train")["identity"].unique())
    assert fitted.metrics["n_train"] == manifest.filter(pl.col("split") == "train").height
    assert losses.height == manifest.height
    ordered = manifest.join(losses, on="sample_id").sort("index")
    expected = [identities.index(i) for i in ordered["identity"].to_list()]
    assert ordered["label"].to_list() == expected
    assert not task_labels_path(layout).exists()


def test_attribute_task_trains_two_outputs_on_the_target(tiny_home):
    config, layout = tiny_home
    fitted, manifest, losses = _fit_and_score(config, layout, ATTRIBUTE_TASK)
    assert fitted.task == ATTRIBUTE_TASK
    assert fitted.data_version != fitted.sha256  # the task is part of the version
    assert recorded_task(json.loads(sidecar_path(layout.black_box).read_text())) == ATTRIBUTE_TASK
    male = pl.read_parquet(layout.attributes).select("sample_id", "Male")
    scored = losses.join(male, on="sample_id")
    assert losses.height == manifest.height
    assert scored["label"].to_list() == scored["Male"].cast(pl.Int64).to_list()
    assert set(scored["predicted"].unique().to_list()) <= {0, 1}
    assert (scored["loss"] >= 0).all() and scored["loss"].is_finite().all()
    # true_class_auroc of a two-class model is 1 where the target outscores the other, else 0
    assert set(scored["true_class_auroc"].unique().to_list()) <= {0.0, 0.5, 1.0}
    # correct: the prediction is the true attribute value; the loss is -log p(true)
    assert (scored["correct"] == (scored["predicted"] == scored["label"])).all()
    assert np.allclose(scored["loss"].to_numpy(), -np.log(scored["p_true"].to_numpy()), atol=1e-5)


def test_label_task_reads_the_manifest_label_column(tmp_path, tiny_home):
    config, reference = tiny_home
    layout = fh.clone_home(reference, tmp_path / "home")
    manifest = pl.read_parquet(layout.manifest)
    # a table dataset's label: three classes that are not identities
    labelled = manifest.with_columns(label=(pl.col("identity") % 3) + 10)
    write_parquet_atomic(labelled, layout.manifest)
    _, manifest, losses = _fit_and_score(config, layout, TaskConfig(kind="label"))
    ordered = manifest.drop("label").join(losses, on="sample_id").sort("index")
    assert ordered["label"].to_list() == (ordered["identity"] % 3).to_list()  # 10,11,12 -> 0,1,2
    assert losses.height == manifest.height


def test_label_task_without_a_label_column_is_a_clear_error(tmp_path, tiny_home):
    config, reference = tiny_home
    layout = fh.clone_home(reference, tmp_path / "home")
    with pytest.raises(TaskLabelError, match=r"'label' column, and .*manifest.parquet has none"):
        fit_black_box(
            layout, config.black_box, config.devices.black_box, task=TaskConfig(kind="label")
        )


def test_label_column_must_hold_whole_numbers():
    rows = pl.DataFrame({"sample_id": ["a", "b", "c"], "label": [1.0, 2.5, 3.0]})
    with pytest.raises(TaskLabelError, match=r"row 1 \(sample b\) has 2.5, not a whole number"):
        dataset_labels(rows, TaskConfig(kind="label"))


def test_attribute_target_missing_from_the_attribute_table_names_it():
    rows = pl.DataFrame({"sample_id": ["a"], "identity": [1]})
    attributes = pl.DataFrame({"sample_id": ["a"], "Smiling": [True]})
    with pytest.raises(TaskLabelError, match=r"'Male' is not a column of .*attributes are Smiling"):
        dataset_labels(rows, ATTRIBUTE_TASK, attributes)


def test_attribute_label_map_needs_both_values_in_train():
    assert builtin_task_label_map(ATTRIBUTE_TASK, np.array([0, 1, 1])) == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="no image with Male"):
        builtin_task_label_map(ATTRIBUTE_TASK, np.array([0, 0]))


def test_task_version_is_the_sha_for_identity_and_differs_by_task():
    sha = "ab" * 32
    assert task_version(sha, TaskConfig()) == sha
    versions = {
        task_version(sha, TaskConfig(kind="attribute", target="Male")),
        task_version(sha, TaskConfig(kind="attribute", target="Smiling")),
        task_version(sha, TaskConfig(kind="label")),
    }
    assert len(versions) == 3 and sha not in versions


def test_a_ready_loss_table_takes_the_task_labels(tmp_path, tiny_home):
    config, reference = tiny_home
    layout = fh.clone_home(reference, tmp_path / "home")
    manifest = pl.read_parquet(layout.manifest)
    table = tmp_path / "losses.parquet"
    manifest.select("sample_id", loss=pl.lit(0.5), predicted=pl.lit(1)).write_parquet(table)
    settings = config.black_box.model_copy(
        update={"source": "loss_table", "loss_table_path": str(table)}
    )
    fitted = fit_black_box(layout, settings, config.devices.black_box, task=ATTRIBUTE_TASK)
    assert recorded_task(json.loads(layout.black_box_reference.read_text())) == ATTRIBUTE_TASK
    copy = pl.read_parquet(fitted.path).join(
        pl.read_parquet(layout.attributes).select("sample_id", "Male"), on="sample_id"
    )
    assert copy["label"].to_list() == copy["Male"].cast(pl.Int64).to_list()
    assert copy["correct"].to_list() == copy["Male"].to_list()  # predicted 1 everywhere


# ---- configuration --------------------------------------------------------------------------


def _config(tmp_path, **raw):
    return validate_config({"home": str(tmp_path / "home"), **raw}, source="test.yaml")


def test_preflight_rejects_a_target_that_is_not_an_attribute(tmp_path):
    config = _config(tmp_path, task={"kind": "attribute", "target": "Blonde"})
    with pytest.raises(ConfigError, match=r"task.target 'Blonde' is not an attribute"):
        preflight(config, "test.yaml")


def test_preflight_rejects_a_label_task_on_a_dataset_without_labels(tmp_path):
    with pytest.raises(ConfigError, match=r"task.kind 'label' reads a dataset's label column"):
        preflight(_config(tmp_path, task={"kind": "label"}), "test.yaml")


def test_preflight_rejects_a_spurious_world_for_identity_classification(tmp_path):
    world = {"spurious": {"target": "Blond_Hair", "attribute": "Male"}}
    with pytest.raises(ConfigError, match=r"world.spurious leaves some identities"):
        preflight(_config(tmp_path, world=world), "test.yaml")
    task = {"kind": "attribute", "target": "Blond_Hair"}
    assert preflight(_config(tmp_path, world=world, task=task), "test.yaml").task.target == (
        "Blond_Hair"
    )


def test_a_user_model_for_an_attribute_task_needs_two_outputs():
    config = validate_config({}, source="x")
    assert output_count_problem(2, config.dataset, config.world, ATTRIBUTE_TASK) is None
    problem = output_count_problem(5, config.dataset, config.world, ATTRIBUTE_TASK)
    assert problem is not None and "the model has 5 outputs" in problem


def two_output_model():
    """An entry point for an attribute task: two outputs (without, with)."""
    return ColourClassifier(num_classes=2)


def test_a_user_model_scores_the_attribute_task(tmp_path, tiny_home):
    config, reference = tiny_home
    layout = fh.clone_home(reference, tmp_path / "home")
    settings = config.black_box.model_copy(
        update={"source": "entry_point", "entry_point": "tests.test_task_kinds:two_output_model"}
    )
    with fh.one_thread():
        fitted = fit_black_box(layout, settings, config.devices.black_box, task=ATTRIBUTE_TASK)
        assert fitted.data_version != fitted.sha256
        assert recorded_task(json.loads(layout.black_box_reference.read_text())) == ATTRIBUTE_TASK
        manifest = pl.read_parquet(layout.manifest)
        shard = manifest["shard"][0]
        # the loss pass scores the recorded task whatever its own run config says
        frame = shard_losses(layout, shard, settings, config.dataset, config.devices.losses).frame
    male = pl.read_parquet(layout.attributes).select("sample_id", "Male")
    scored = frame.join(male, on="sample_id")
    assert scored.height == manifest.filter(pl.col("shard") == shard).height
    assert scored["label"].to_list() == scored["Male"].cast(pl.Int64).to_list()
