"""Black-box steps: obtain the model under diagnosis, then its loss on every sample of a shard."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from llm2loss_pipeline.core.blackbox.checkpoint import (
    load_black_box,
    plot_training_curve,
    save_black_box,
)
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.labels import (
    builtin_label_map,
    label_map_from_json,
    label_map_to_json,
    map_labels,
    num_outputs_needed,
    read_label_map,
)
from llm2loss_pipeline.core.blackbox.loss_table import read_loss_table, split_loss_table
from llm2loss_pipeline.core.blackbox.losses import compute_losses
from llm2loss_pipeline.core.blackbox.task_labels import (
    IDENTITY_TASK,
    builtin_task_label_map,
    dataset_labels,
    needs_attributes,
    read_attributes,
    recorded_labels,
    recorded_task,
    task_json,
    task_version,
)
from llm2loss_pipeline.core.blackbox.train import train_classifier
from llm2loss_pipeline.core.blackbox.user_model import load_user_model
from llm2loss_pipeline.core.config import DatasetConfig
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.images import load_image
from llm2loss_pipeline.core.layout import LOSSES_TABLE, Layout
from llm2loss_pipeline.core.steps.tables import (
    fail_on_bad_images,
    items_of,
    read_manifest,
    shard_rows,
    write_shard,
)
from llm2loss_pipeline.core.storage import sha256_file, write_json_atomic, write_parquet_atomic
from llm2loss_pipeline.core.task import TaskConfig


@dataclass(frozen=True)
class BlackBoxResult:
    source: str
    path: Path
    sha256: str
    metrics: dict[str, float]
    curve: list[dict[str, Any]] = field(default_factory=list)
    curve_png: Path | None = None
    task: TaskConfig = IDENTITY_TASK

    @property
    def data_version(self) -> str:
        """What decides staleness downstream: the model's content and the task it is judged on."""
        return task_version(self.sha256, self.task)


@dataclass(frozen=True)
class LossShardResult:
    frame: pl.DataFrame
    path: Path
    sha256: str
    summary: dict[str, Any] = field(default_factory=dict)
    dropped: list[Any] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)


def _label_map(
    config: BlackBoxConfig, manifest: pl.DataFrame, task: TaskConfig, labels: Any
) -> dict[int, int]:
    """`labels`: the task's dataset label of every manifest row (task_labels.dataset_labels)."""
    if config.label_map_path:
        return read_label_map(config.label_map_path)
    if task == IDENTITY_TASK:
        return builtin_label_map(manifest.filter(pl.col("split") == "train")["identity"].to_list())
    return builtin_task_label_map(task, labels[(manifest["split"] == "train").to_numpy()])


def fit_black_box(
    layout: Layout,
    config: BlackBoxConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None = None,
    *,
    on_bad_image: str = "fail",
    task: TaskConfig = IDENTITY_TASK,
) -> BlackBoxResult:
    """`on_bad_image` is `dataset.on_bad_image`: fail listing every unreadable training image,
    or train without them and record them in the sidecar. `task` says what the model predicts
    (core/blackbox/task_labels.py); it is recorded with the model."""
    manifest = read_manifest(layout)
    labels = _dataset_labels(layout, manifest, task)
    _record_task_labels(layout, manifest, task, labels)
    if config.source == "builtin":
        return _train_builtin(
            layout, manifest, config, device, progress, on_bad_image, task, labels
        )
    if config.source == "loss_table":
        return _record_loss_table(layout, manifest, config, task, labels)
    return _record_user_model(layout, manifest, config, device, task, labels)


def task_labels_path(layout: Layout) -> Path:
    """An attribute task's labels as black_box_model read them (sample_id, label)."""
    return layout.black_box_dir / "task_labels.parquet"


def _record_task_labels(
    layout: Layout, manifest: pl.DataFrame, task: TaskConfig, labels: Any
) -> None:
    path = task_labels_path(layout)
    if not needs_attributes(task):
        path.unlink(missing_ok=True)  # the manifest holds identity and label tasks' labels
        return
    frame = pl.DataFrame(
        {"sample_id": manifest["sample_id"], "label": pl.Series(labels, dtype=pl.Int64)}
    )
    write_parquet_atomic(frame, path)


def _dataset_labels(layout: Layout, manifest: pl.DataFrame, task: TaskConfig) -> Any:
    return dataset_labels(
        manifest,
        task,
        read_attributes(layout.attributes, task),
        source=str(layout.manifest),
        attributes_source=str(layout.attributes),
    )


def _train_builtin(
    layout: Layout,
    manifest: pl.DataFrame,
    config: BlackBoxConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None,
    on_bad_image: str,
    task: TaskConfig,
    labels: Any,
) -> BlackBoxResult:
    label_map = _label_map(config, manifest, task, labels)
    num_classes = num_outputs_needed(label_map)
    manifest = manifest.with_columns(pl.Series("_task_label", labels, dtype=pl.Int64))
    train = manifest.filter(pl.col("split") == "train").sort("index")
    valid = manifest.filter(pl.col("split") == "valid").sort("index")
    model, result = train_classifier(
        items_of(train),
        map_labels(train["_task_label"].to_numpy(), label_map, sample_ids=train["sample_id"]),
        items_of(valid),
        map_labels(valid["_task_label"].to_numpy(), label_map, sample_ids=valid["sample_id"]),
        config,
        device,
        progress,
        num_classes=num_classes,
        on_bad_image=on_bad_image,
    )
    sidecar = save_black_box(
        model,
        layout.black_box,
        arch=config.arch,
        num_classes=num_classes,
        image_size=config.image_size,
        label_map=label_map,
        config=config,
        train_result=result,
        task=task_json(task),
    )
    layout.black_box_reference.unlink(missing_ok=True)
    curve_png = plot_training_curve(result, layout.black_box_curve)
    return BlackBoxResult(
        source="builtin",
        path=layout.black_box,
        sha256=sidecar["sha256"],
        metrics={
            **{
                key: value
                for key, value in sidecar["metrics"].items()
                if isinstance(value, int | float)
            },
            "n_skipped_images": len(result.skipped),
        },
        curve=[{k: v for k, v in row.items() if k != "lr"} for row in sidecar["curve"]],
        curve_png=curve_png,
        task=task,
    )


def _record_user_model(
    layout: Layout,
    manifest: pl.DataFrame,
    config: BlackBoxConfig,
    device: DeviceSpec,
    task: TaskConfig,
    labels: Any,
) -> BlackBoxResult:
    label_map = _label_map(config, manifest, task, labels)
    probe = load_image(manifest["path"][0])
    loaded = load_user_model(
        config, num_outputs_needed(label_map), probe_image=probe, device=device.torch_device()
    )
    digest = _state_digest(loaded.model)
    reference = {
        "source": config.source,
        "entry_point": config.entry_point,
        "torchscript_path": config.torchscript_path,
        "label_map": label_map_to_json(label_map),
        "weights_sha256": digest,
        "sha256": digest,
        "task": task_json(task),
    }
    path = write_json_atomic(layout.black_box_reference, reference)
    return BlackBoxResult(source=config.source, path=path, sha256=digest, metrics={}, task=task)


def _record_loss_table(
    layout: Layout, manifest: pl.DataFrame, config: BlackBoxConfig, task: TaskConfig, labels: Any
) -> BlackBoxResult:
    assert config.loss_table_path is not None  # guaranteed by BlackBoxConfig
    label_map = _label_map(config, manifest, task, labels) if config.label_map_path else None
    table = read_loss_table(
        config.loss_table_path,
        manifest,
        label_map=label_map,
        dataset_labels=None if task == IDENTITY_TASK else labels,
    )
    copy = write_parquet_atomic(table, layout.loss_table_copy)
    digest = sha256_file(copy)
    reference = {"source": "loss_table", "loss_table_path": config.loss_table_path}
    write_json_atomic(
        layout.black_box_reference, {**reference, "sha256": digest, "task": task_json(task)}
    )
    return BlackBoxResult(
        source="loss_table",
        path=copy,
        sha256=digest,
        metrics={"mean_loss": float(table["loss"].mean()), "n_samples": float(table.height)},
        task=task,
    )


def _state_digest(model: Any) -> str:
    """A content hash of a module's weights (names, dtypes, shapes and bytes), in a fixed order."""

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def materialized_config(layout: Layout, config: BlackBoxConfig) -> BlackBoxConfig:
    """`config` pointed at the black box that black_box_model last materialized.

    Loss runs must score the model version the graph recorded, not whatever source their own run
    config names: a run launched by automation after the registry sensor brought a new model
    carries the deployment's default `black_box` settings.
    """
    reference = layout.black_box_reference
    if not reference.exists():
        return config.model_copy(update={"source": "builtin"})
    recorded = json.loads(reference.read_text())
    keys = ("source", "entry_point", "torchscript_path", "loss_table_path")
    return config.model_copy(update={key: recorded.get(key) for key in keys})


def shard_losses(
    layout: Layout,
    shard: str,
    config: BlackBoxConfig,
    dataset: DatasetConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None = None,
) -> LossShardResult:
    config = materialized_config(layout, config)
    manifest = read_manifest(layout)
    rows = shard_rows(manifest, shard)
    dropped: list[Any] = []
    skipped: list[Any] = []
    if config.source == "loss_table":
        table = pl.read_parquet(_required(layout.loss_table_copy))
        frame = split_loss_table(table, manifest, shard)
    else:
        loaded, label_map, task = _load_black_box(layout, manifest, config, device)
        if needs_attributes(task):
            task_labels = recorded_labels(task_labels_path(layout), rows)
        else:
            task_labels = dataset_labels(rows, task, source=str(layout.manifest))
        labels = map_labels(task_labels, label_map, sample_ids=rows["sample_id"])
        result = compute_losses(
            loaded,
            items_of(rows),
            labels,
            rows["split"].to_list(),
            device_spec=device,
            on_bad_image="skip",  # bad images are listed all at once just below
            nonfinite=config.nonfinite,
            progress=progress,
            loss=config.loss,
            threads=config.cpu_threads,
        )
        fail_on_bad_images(LOSSES_TABLE, shard, rows, result.skipped, dataset.on_bad_image)
        frame, dropped, skipped = result.frame, list(result.dropped), list(result.skipped)
    path = write_shard(layout, LOSSES_TABLE, shard, frame, rows)  # with its sha256 sidecar
    return LossShardResult(
        frame=frame,
        path=path,
        sha256=sha256_file(path),
        summary=loss_summary(frame),
        dropped=dropped,
        skipped=skipped,
    )


def _required(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize black_box_model first")
    return path


def _load_black_box(
    layout: Layout, manifest: pl.DataFrame, config: BlackBoxConfig, device: DeviceSpec
) -> tuple[Any, dict[int, int], TaskConfig]:
    """The recorded model, its label map and the task it was fitted for (see task_labels)."""
    torch_device = device.torch_device()
    if config.source == "builtin":
        loaded = load_black_box(_required(layout.black_box), torch_device)
        assert loaded.label_map is not None
        return loaded, loaded.label_map, recorded_task(loaded.meta)
    reference = json.loads(_required(layout.black_box_reference).read_text())
    label_map = label_map_from_json(reference["label_map"])
    loaded = load_user_model(config, num_outputs_needed(label_map), device=torch_device)
    if _state_digest(loaded.model) != reference["weights_sha256"]:
        raise ValueError(
            f"the user model {config.entry_point or config.torchscript_path} changed since "
            "black_box_model was materialized: rematerialize black_box_model"
        )
    return loaded, label_map, recorded_task(reference)


def loss_summary(frame: pl.DataFrame) -> dict[str, Any]:
    by_split = frame.group_by("split").agg(pl.col("loss").mean()).sort("split")
    accuracy = frame["correct"].mean() if frame["correct"].null_count() < frame.height else None
    return {
        "mean_loss": float(frame["loss"].mean()) if frame.height else float("nan"),
        "accuracy": float(accuracy) if accuracy is not None else float("nan"),
        "mean_loss_by_split": {split: float(loss) for split, loss in by_split.iter_rows()},
    }
