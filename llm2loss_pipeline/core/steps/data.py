"""Dataset steps: the sample manifest (with the generated world when asked) and attributes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.attribute_set import (
    AttributeSet,
    build_attribute_set,
    write_attribute_set,
)
from llm2loss_pipeline.core.attributes import attribute_columns
from llm2loss_pipeline.core.celeba import PARTITION_FILE, build_manifest, read_celeba
from llm2loss_pipeline.core.config import DatasetConfig
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.probes_file import read_probes
from llm2loss_pipeline.core.steps.tables import remove_stale_shards
from llm2loss_pipeline.core.storage import sha256_file, write_parquet_atomic
from llm2loss_pipeline.core.table_source import TableSpec, read_table_source, table_manifest
from llm2loss_pipeline.core.task import TaskConfig
from llm2loss_pipeline.core.world import contact_sheet, generate_world
from llm2loss_pipeline.core.world.config import WorldConfig


@dataclass(frozen=True)
class DatasetResult:
    source: str
    root: Path
    manifest: pl.DataFrame
    manifest_sha256: str
    shard_keys: list[str]
    split_sizes: dict[str, int]
    n_identities: int
    contact_sheet: Path | None
    removed_shards: list[str] = field(default_factory=list)
    """one line per stale shard file removed (see tables.remove_stale_shards)"""
    label_values: list[str] = field(default_factory=list)
    """a table's label values in the order of their numbers in the manifest's `label` (when the
    label column is not integer)"""


@dataclass(frozen=True)
class AttributesResult:
    attributes: pl.DataFrame
    attributes_sha256: str
    rates_by_split: pl.DataFrame
    attribute_set: AttributeSet


def world_root(layout: Layout, world: WorldConfig) -> Path:
    """One folder per world configuration, so changing the config never overwrites a world."""
    digest = hashlib.sha256(world.model_dump_json().encode()).hexdigest()[:12]
    return layout.world_dir / digest


def dataset_root(layout: Layout, dataset: DatasetConfig, world: WorldConfig) -> Path:
    if dataset.source == "generated":
        return world_root(layout, world)
    if dataset.source == "table":
        return TableSpec.from_config(dataset).image_root
    if not dataset.celeba_root:
        raise ValueError("dataset.celeba_root must be set when dataset.source is 'celeba'")
    root = Path(dataset.celeba_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.celeba_root {root} is not a directory")
    return root


def prepare_dataset(
    layout: Layout,
    dataset: DatasetConfig,
    world: WorldConfig,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetResult:
    root = dataset_root(layout, dataset, world)
    sheet = None
    if dataset.source == "generated":
        generate_world(world, root, progress=progress)
        sheet = root / "contact_sheet.png"
        if not sheet.exists():
            contact_sheet(root, sheet)
    label_values: list[str] = []
    if dataset.source == "table":
        spec = TableSpec.from_config(dataset)
        listing = spec.table_path
        tables = read_table_source(spec)
        manifest, label_values = table_manifest(tables, dataset.shard_size), tables.label_values
    else:
        listing = root / PARTITION_FILE
        manifest = build_manifest(read_celeba(root), dataset.shard_size)
    manifest = apply_split_mode(manifest, dataset)
    # Existence only (a stat per image, ~1 s for CelebA); decoding is checked per shard.
    missing = [path for path in manifest["path"].to_list() if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {listing} are missing, e.g. {missing[:3]}"
        )
    write_parquet_atomic(manifest, layout.manifest)
    # Shard files of an earlier manifest would otherwise be read by every glob over the folder.
    removed = remove_stale_shards(layout, manifest)
    split_sizes = dict(manifest.group_by("split").len().sort("split").iter_rows())
    return DatasetResult(
        source=dataset.source,
        root=root,
        manifest=manifest,
        manifest_sha256=sha256_file(layout.manifest),
        shard_keys=manifest["shard"].unique(maintain_order=True).to_list(),
        split_sizes={str(key): int(value) for key, value in split_sizes.items()},
        n_identities=manifest["identity"].n_unique(),
        contact_sheet=sheet,
        removed_shards=removed,
        label_values=label_values,
    )


def apply_split_mode(manifest: pl.DataFrame, dataset: DatasetConfig) -> pl.DataFrame:
    """Re-split within identities when asked, or when the file's splits share no identities.

    An identity classifier has no defined loss on identities it never trained on, and CelebA's
    official partition is identity-disjoint; so by default each identity's images are re-split
    into train/valid/test (deterministically, by a hash of the sample id).
    """
    mode = dataset.split_mode
    if mode == "auto" and dataset.source == "table":
        mode = "file"  # a table's splits are its author's; re-splitting is asked for by name
    if mode == "auto":
        train_ids = set(manifest.filter(pl.col("split") == "train")["identity"].to_list())
        held_out = manifest.filter(pl.col("split") != "train")["identity"].unique().to_list()
        unseen = sum(identity not in train_ids for identity in held_out)
        mode = "within_identity" if held_out and unseen > len(held_out) / 2 else "file"
    if mode == "file":
        return manifest
    train_share, valid_share, _ = dataset.resplit_fractions
    # sha1 rather than polars' hash: the split must not change with the library version.
    keys = [int(hashlib.sha1(sid.encode()).hexdigest()[:12], 16) for sid in manifest["sample_id"]]
    ranked = manifest.with_columns(pl.Series("_key", keys, dtype=pl.Int64)).with_columns(
        _order=pl.col("_key").rank("ordinal").over("identity"),
        _count=pl.len().over("identity"),
    )
    position = (pl.col("_order") - 0.5) / pl.col("_count")
    split = (
        pl.when(position < train_share)
        .then(pl.lit("train"))
        .when(position < train_share + valid_share)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )
    return ranked.with_columns(split=split).drop("_key", "_order", "_count")


def read_attributes(layout: Layout, dataset: DatasetConfig, world: WorldConfig) -> pl.DataFrame:
    """The attribute table of the dataset: sample_id and one Boolean column per attribute."""
    if dataset.source == "table":
        return read_table_source(TableSpec.from_config(dataset)).attributes
    return read_celeba(dataset_root(layout, dataset, world)).attributes


def summarize_attributes(
    layout: Layout,
    dataset: DatasetConfig,
    world: WorldConfig,
    task: TaskConfig | None = None,
) -> AttributesResult:
    """Write the attribute table of the manifest's samples and the attribute set (which
    attributes are diagnosed, how each is phrased), and count it by split in DuckDB."""
    # lazy: pulls duckdb, +0.1 s on the Dagster definitions load (measured)
    from llm2loss_pipeline.core import sql

    if not layout.manifest.exists():
        raise FileNotFoundError(
            f"{layout.manifest} is missing: materialize dataset_manifest first (llm2loss run)"
        )
    attributes = read_attributes(layout, dataset, world)
    # Checked before anything is written: a bad probes file or task target fails this step.
    probes = read_probes(dataset.probes_path, attribute_columns(attributes.columns))
    attribute_set = build_attribute_set(attributes, task or TaskConfig(), probes)
    write_parquet_atomic(attributes, layout.attributes)
    set_path = write_attribute_set(layout, attribute_set)
    with sql.connect(None) as con:
        rates = sql.run_sql(
            con,
            "attribute_counts_by_split",
            {"attribute_names": list(attribute_set.attributes)},
            tables={"attributes": layout.attributes, "manifest": layout.manifest},
        )
    return AttributesResult(
        attributes=attributes,
        # Both files: a changed probes file or task target changes what the report asks.
        attributes_sha256=hashlib.sha256(
            (sha256_file(layout.attributes) + sha256_file(set_path)).encode()
        ).hexdigest(),
        rates_by_split=rates.pivot(on="split", index="attribute", values="rate"),
        attribute_set=attribute_set,
    )
