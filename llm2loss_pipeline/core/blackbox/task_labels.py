"""What the black box is asked to predict for each sample, by task kind (core/task.py).

The dataset label of a sample is
  - identity: the manifest's `identity` (what the pipeline always did);
  - attribute: 1 where the sample has the task's target attribute, else 0, read from the
    attribute table (tables/attributes.parquet, the `celeba_attributes` asset);
  - label: the manifest's `label` column (a table dataset's own labels), whole numbers.

The label map then turns dataset labels into output indices exactly as for identities: the
built-in model numbers the train split's distinct labels in sorted order (an attribute task is
always the two outputs 0 = without, 1 = with the target), and a user's model brings its own
map (black_box.label_map_path, keyed by dataset label).

The black box records the task it was fitted for (sidecar or reference.json), and the loss pass
scores that task, not whatever task its own run names: a loss shard must always be the loss of
the recorded model on the recorded labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm2loss_pipeline.core.blackbox.labels import LabelMapError, builtin_label_map
from llm2loss_pipeline.core.task import TaskConfig

ATTRIBUTE_LABEL_MAP: dict[int, int] = {0: 0, 1: 1}
"""An attribute task's built-in numbering: output 0 scores 'without', output 1 'with'."""

LABEL_COLUMN = "label"

IDENTITY_TASK = TaskConfig()
"""What runs without a task section (and what a record from before tasks was fitted for)."""


class TaskLabelError(ValueError):
    """The data has no labels for the configured task (a missing column, a bad value)."""


def needs_attributes(task: TaskConfig) -> bool:
    return task.kind == "attribute"


def dataset_labels(
    rows: pl.DataFrame,
    task: TaskConfig,
    attributes: pl.DataFrame | None = None,
    *,
    source: str = "the manifest",
    attributes_source: str = "the attribute table",
) -> np.ndarray:
    """The dataset label (int64) of each of `rows` (manifest rows), in their order."""
    if task.kind == "identity":
        return rows["identity"].cast(pl.Int64).to_numpy()
    if task.kind == "label":
        return _label_column(rows, source)
    return _attribute_labels(rows, task, attributes, attributes_source)


def _label_column(rows: pl.DataFrame, source: str) -> np.ndarray:
    if LABEL_COLUMN not in rows.columns:
        raise TaskLabelError(
            f"task.kind 'label' reads a {LABEL_COLUMN!r} column, and {source} has none "
            f"(its columns: {', '.join(rows.columns)}); give a dataset with a label column "
            "(dataset.source: table) or choose task.kind identity or attribute"
        )
    column = rows[LABEL_COLUMN]
    values = column.cast(pl.Int64, strict=False)
    bad = values.is_null()
    if column.dtype.is_float():  # 2.0 is a label, 2.5 is not (a cast would truncate it)
        bad = bad | (column != column.floor()).fill_null(True)
    bad = bad.arg_true()
    if len(bad):
        first = int(bad[0])
        raise TaskLabelError(
            f"{source} column {LABEL_COLUMN!r}: row {first} (sample {rows['sample_id'][first]}) "
            f"has {column[first]!r}, not a whole number; {len(bad)} such rows"
        )
    return values.to_numpy()


def _attribute_labels(
    rows: pl.DataFrame, task: TaskConfig, attributes: pl.DataFrame | None, source: str
) -> np.ndarray:
    target = str(task.target)
    if attributes is None:
        raise TaskLabelError(
            f"task.kind 'attribute' needs {source} (materialize celeba_attributes first)"
        )
    if target not in attributes.columns:
        names = [name for name in attributes.columns if name != "sample_id"]
        raise TaskLabelError(
            f"task.target {target!r} is not a column of {source}; its attributes are "
            f"{', '.join(names[:50])}{', ...' if len(names) > 50 else ''}"
        )
    joined = rows.select("sample_id").join(
        attributes.select("sample_id", pl.col(target).alias("_target")),
        on="sample_id",
        how="left",
        maintain_order="left",
    )
    missing = joined.filter(pl.col("_target").is_null())["sample_id"]
    if len(missing):
        raise TaskLabelError(
            f"{source} has no {target!r} value for {len(missing)} samples, e.g. "
            f"{', '.join(missing.head(5).to_list())}"
        )
    return joined["_target"].cast(pl.Boolean).cast(pl.Int64).to_numpy()


def builtin_task_label_map(task: TaskConfig, train_labels: np.ndarray) -> dict[int, int]:
    """The built-in model's label map for `task`, from the train split's dataset labels."""
    if task.kind != "attribute":
        return builtin_label_map(train_labels.tolist())
    present = set(np.unique(train_labels).tolist())
    if present != {0, 1}:
        lacking = "with" if 1 not in present else "without"
        raise LabelMapError(
            f"the train split has no image {lacking} {task.target}: a classifier of "
            f"task.target {task.target!r} needs both"
        )
    return dict(ATTRIBUTE_LABEL_MAP)


def task_json(task: TaskConfig) -> dict[str, Any]:
    return task.model_dump(mode="json")


def recorded_task(record: Mapping[str, Any] | None) -> TaskConfig:
    """The task a black box record (sidecar, reference.json) was fitted for; identity when the
    record predates tasks."""
    raw = (record or {}).get("task")
    return IDENTITY_TASK if raw is None else TaskConfig.model_validate(raw)


def task_version(sha256: str, task: TaskConfig) -> str:
    """The black box's data version: its content hash, joined with the task unless the task is
    identity (whose versions stay those of before tasks existed). Losses, heads and report are
    stale after a task change even where the model's bytes are the same (a user's model)."""
    if task == IDENTITY_TASK:
        return sha256
    text = json.dumps({"sha256": sha256, "task": task_json(task)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_attributes(path: Path, task: TaskConfig) -> pl.DataFrame | None:
    """The attribute table when `task` needs it (None otherwise); missing is an error naming it."""
    if not needs_attributes(task):
        return None
    if not path.exists():
        raise TaskLabelError(
            f"{path} is missing: task.kind 'attribute' reads its target from it; "
            "materialize celeba_attributes first"
        )
    return pl.read_parquet(path)


def recorded_labels(path: Path, rows: pl.DataFrame) -> np.ndarray:
    """The dataset labels that black_box_model recorded for an attribute task (`path`, written
    beside the model), for `rows`: the loss pass scores the labels the model was fitted for,
    without reading the attribute table itself (its lineage runs through the black box)."""
    if not path.exists():
        raise TaskLabelError(f"{path} is missing: rematerialize black_box_model")
    joined = rows.select("sample_id").join(
        pl.read_parquet(path), on="sample_id", how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("label").is_null())["sample_id"]
    if len(missing):
        raise TaskLabelError(
            f"{path} has no label for {len(missing)} samples of the manifest, e.g. "
            f"{', '.join(missing.head(5).to_list())}: rematerialize black_box_model"
        )
    return joined["label"].to_numpy()


def recorded_task_of(reference: Path, sidecar: Path) -> TaskConfig:
    """The task of the black box last materialized: its reference.json (a user's model or a loss
    table) when there is one, else the built-in model's sidecar; identity when neither says."""
    for path in (reference, sidecar):
        if path.exists():
            return recorded_task(json.loads(path.read_text()))
    return IDENTITY_TASK
