"""Everything a run can check before it starts: `preflight`.

`llm2loss run`, `llm2loss check-config` and the first assets of a run that Dagster starts
(defs/preflight.py) call it, so that a wrong path, a missing GPU, a user model that does not
load, is not deterministic or has the wrong number of outputs, or an empty split fails in
seconds, naming the key, instead of in the step that needs it after the steps before it.

A user model (entry point or TorchScript) without `black_box.label_map_path` is scored with the
default label map: one output per identity of the train split, in identity order. How many that
is was known only once the manifest existed, so a model with the wrong output count failed in
black_box_model, after the world was drawn (and, in the same run, often after the encoder had
trained). The train identities follow from the dataset's two small text files (or, for the
generated world, from its plan) and the split mode, without decoding an image; this module works
them out the same way the manifest does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES, SPLIT_NAMES
from llm2loss_pipeline.core.blackbox.labels import (
    LabelMapError,
    num_outputs_needed,
    read_label_map,
)
from llm2loss_pipeline.core.celeba import (
    IDENTITY_FILE,
    PARTITION_FILE,
    CelebaFormatError,
    read_identity_file,
    read_partition_file,
)
from llm2loss_pipeline.core.config import (
    ConfigError,
    DatasetConfig,
    PipelineConfig,
    check_paths,
    device_problems,
)
from llm2loss_pipeline.core.env import env_problems
from llm2loss_pipeline.core.probes import ProbesFileError
from llm2loss_pipeline.core.probes_file import read_probes
from llm2loss_pipeline.core.table_source import TableFormatError, TableSpec, read_table_source
from llm2loss_pipeline.core.task import TaskConfig
from llm2loss_pipeline.core.world import plan_world
from llm2loss_pipeline.core.world.config import WorldConfig


def preflight(config: PipelineConfig, source: str = "<config>") -> PipelineConfig:
    """`config` if a run can start with it: its paths exist, its CUDA devices are here, the
    `$LLM2LOSS_...` limits (core/env.py) are usable numbers, and the user's model (entry point or
    TorchScript) loads, runs on a probe image, has as many outputs as its label map needs and,
    for an entry point, returns the same weights twice. Else one ConfigError naming the file and
    the key.

    A run otherwise meets these only when the step that needs them starts, after the data
    preparation and encoder training before it."""
    check_paths(config, source)
    problems = device_problems(config)
    if problems:
        raise ConfigError("\n".join([f"{source}: devices that cannot be used", *problems]))
    problems = env_problems()  # else read only by the step that needs one, after the others
    if problems:
        raise ConfigError("\n".join(["environment variables that cannot be used", *problems]))
    _check_file_splits(config, source)
    _check_table(config, source)
    _check_task(config, source)
    if config.black_box.source in ("entry_point", "torchscript"):
        _check_user_model(config, source)
    return config


def _check_user_model(config: PipelineConfig, source: str) -> None:
    # lazy: torch (+920 modules, 2.9 s), only for a user's own model
    from llm2loss_pipeline.core.blackbox.user_model import UserModelError, check_user_model

    black_box = config.black_box
    try:
        needed = (
            num_outputs_needed(read_label_map(black_box.label_map_path))
            if black_box.label_map_path
            else None
        )
        meta = check_user_model(black_box, config.devices.black_box.torch_device(), needed)
        # Without a label map file the count comes from the dataset's train identities, which
        # black_box_model would learn only after the dataset is prepared.
        problem = (
            output_count_problem(
                int(meta["num_classes"]), config.dataset, config.world, config.task
            )
            if needed is None and meta is not None
            else None
        )
    except (UserModelError, LabelMapError, CelebaFormatError, TableFormatError) as exc:
        raise ConfigError(f"{source}: black_box: {exc}") from None
    if problem:
        raise ConfigError(f"{source}: black_box: {problem}")


CELEBA_SHAPED = ("generated", "celeba")
"""Dataset sources whose attributes are CelebA's 40; other sources' columns are known only once
their table is read (the black box step then names a missing target or label column)."""


def _check_task(config: PipelineConfig, source: str) -> None:
    """The task fits the data: an attribute task's target is an attribute of it, a label task
    has a label column, and a spurious world (some identities keep no train image) is not used
    for identity classification."""
    task, dataset = config.task, config.dataset
    if dataset.source in CELEBA_SHAPED:
        if task.kind == "attribute" and task.target not in CELEBA_ATTRIBUTES:
            raise ConfigError(
                f"{source}: task.target {task.target!r} is not an attribute of the "
                f"{dataset.source} dataset; expected one of the 40 CelebA names, e.g. 'Blond_Hair'"
            )
        if task.kind == "label":
            raise ConfigError(
                f"{source}: task.kind 'label' reads a dataset's label column, and the "
                f"{dataset.source} dataset has none; use dataset.source table, or task.kind "
                "identity or attribute"
            )
    spurious = config.world.spurious
    if dataset.source == "generated" and spurious is not None and task.kind == "identity":
        raise ConfigError(
            f"{source}: world.spurious leaves some identities without train images, so an "
            f"identity classifier has no output for them; set task: {{kind: attribute, "
            f"target: {spurious.target}}}"
        )


def _check_table(config: PipelineConfig, source: str) -> None:
    """A table dataset reads without a bad row, and what the task and the probes file name is
    in it: its bad rows, a missing target or label column, a probes entry for no attribute would
    otherwise show only when the data step runs."""
    dataset, task = config.dataset, config.task
    if dataset.source != "table":
        if dataset.source in CELEBA_SHAPED:
            _check_probes(config, source, CELEBA_ATTRIBUTES)
        return
    if not dataset.group_column and (
        task.kind == "identity" or dataset.split_mode == "within_identity"
    ):
        what = "task.kind identity" if task.kind == "identity" else "split_mode within_identity"
        raise ConfigError(
            f"{source}: {what} needs dataset.group_column, the column that says who is in each "
            "image; without it every sample is its own identity"
        )
    try:
        tables = read_table_source(TableSpec.from_config(dataset))
    except TableFormatError as exc:
        raise ConfigError(f"{source}: dataset.table_path: {exc}") from None
    names = tables.attributes.columns[1:]
    _check_probes(config, source, names)
    if task.kind == "attribute" and task.target not in names:
        raise ConfigError(
            f"{source}: task.target {task.target!r} is not an attribute of "
            f"{dataset.table_path}; its attributes are {', '.join(names[:12])}"
            f"{', ...' if len(names) > 12 else ''}"
        )
    if task.kind == "label" and "label" not in tables.manifest.columns:
        raise ConfigError(
            f"{source}: task.kind 'label' reads the column dataset.label_column "
            f"({dataset.label_column!r}), which {dataset.table_path} does not have"
        )


def _check_probes(config: PipelineConfig, source: str, attributes: Sequence[str]) -> None:
    try:
        read_probes(config.dataset.probes_path, attributes)
    except ProbesFileError as exc:
        raise ConfigError(f"{source}: dataset.probes_path: {exc}") from None


def _check_file_splits(config: PipelineConfig, source: str) -> None:
    """With `split_mode: file`, every split the file names must hold images: the black box trains
    on train, the encoder is evaluated on valid and the report measures on test, and an empty
    one failed only after training ("retrieval_accuracy needs at least one image")."""
    dataset = config.dataset
    if dataset.source != "celeba" or dataset.split_mode != "file" or not dataset.celeba_root:
        return
    path = Path(dataset.celeba_root) / PARTITION_FILE
    try:
        present = set(read_partition_file(path)["split"].unique().to_list())
    except CelebaFormatError as exc:
        raise ConfigError(f"{source}: dataset.celeba_root: {exc}") from None
    empty = [name for name in SPLIT_NAMES if name not in present]
    if empty:
        codes = ", ".join(f"{SPLIT_NAMES.index(name)} ({name})" for name in empty)
        raise ConfigError(
            f"{source}: dataset.split_mode is file, but {path} has no rows with code {codes}; "
            "every split needs images (train fits the models, valid evaluates the encoder, "
            "test is measured): add them, or set split_mode: within_identity"
        )


def train_identities(dataset: DatasetConfig, world: WorldConfig) -> list[int]:
    """The distinct identities of the train split, sorted, as `dataset_manifest` will split them
    (the CelebA files or the generated world's plan, then `dataset.split_mode`)."""
    # lazy: the data step imports torch (+920 modules, 3 s), which a config check rarely needs
    from llm2loss_pipeline.core.steps.data import apply_split_mode

    if dataset.source == "generated":
        plan = plan_world(world)
        frame = pl.DataFrame(
            {
                "sample_id": [plan.filename(i) for i in range(len(plan.images))],
                "split": [SPLIT_NAMES[image.split] for image in plan.images],
                "identity": [image.identity for image in plan.images],
            },
            schema={"sample_id": pl.String, "split": pl.String, "identity": pl.Int64},
        )
    elif dataset.source == "table":
        frame = read_table_source(TableSpec.from_config(dataset)).manifest
    else:
        root = Path(dataset.celeba_root or ".")
        frame = read_partition_file(root / PARTITION_FILE).join(
            read_identity_file(root / IDENTITY_FILE), on="sample_id", how="inner"
        )
    train = apply_split_mode(frame, dataset).filter(pl.col("split") == "train")
    return sorted({int(identity) for identity in train["identity"].to_list()})


def output_count_problem(
    outputs: int, dataset: DatasetConfig, world: WorldConfig, task: TaskConfig | None = None
) -> str | None:
    """Why a user model with `outputs` outputs does not fit the default label map, or None."""
    if task is not None and task.kind == "attribute":
        if outputs == 2:
            return None
        return (
            f"the model has {outputs} outputs, but an attribute task (task.target "
            f"{task.target}) scores two: output 0 without, output 1 with the attribute; give "
            'the model two outputs or set black_box.label_map_path ({"0": i, "1": j})'
        )
    if task is not None and task.kind == "label":
        return None  # the label column's classes are known once the table is read
    needed = len(train_identities(dataset, world))
    if outputs == needed:
        return None
    where = (
        f"the generated world (world.n_identities: {world.n_identities})"
        if dataset.source == "generated"
        else f"{Path(dataset.celeba_root or '.') / IDENTITY_FILE}"
    )
    return (
        f"the model has {outputs} outputs, but black_box.label_map_path is not set, so the "
        f"default label map gives each of the {needed} identities of the train split of {where} "
        f"its own output (in identity order) and needs {needed}; set black_box.label_map_path "
        "to a file mapping each identity to the model's output index, or give the model "
        f"{needed} outputs"
    )
