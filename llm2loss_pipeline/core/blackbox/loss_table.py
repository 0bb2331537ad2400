"""A ready loss table: per-sample losses computed elsewhere, for a model that cannot run here.

The table (Parquet, or CSV with a header row) has `sample_id` and `loss`, and optionally
`predicted`, `label`, `p_true` and `true_class_auroc`; other columns are ignored. It must cover
the manifest exactly, once per sample, with finite non-negative losses. It comes back in the
schema of `compute_losses`, in manifest order: split from the manifest; label from the table, else
the manifest identity (or the task's label, see read_loss_table) mapped through `label_map` when
one is given, else the identity itself;
missing optional columns as nulls; correct derived where predicted and label are both known.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from llm2loss_pipeline.core.blackbox.losses import LOSS_SCHEMA, MAX_NAMED

OPTIONAL_INT = ("predicted", "label")
OPTIONAL_FLOAT = ("p_true", "true_class_auroc")
NEGATIVE_TOLERANCE = 1e-6
"""Float32 rounding can leave -log p a hair below zero for a certain prediction; that is 0."""


class LossTableError(ValueError):
    """A ready loss table is unreadable or does not match the manifest."""


def _some(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_NAMED])
    return f"{shown}{', ...' if len(values) > MAX_NAMED else ''} ({len(values)} in all)"


def _read(source: Path) -> pl.DataFrame:
    if not source.is_file():
        raise LossTableError(
            f"loss table {source.expanduser().resolve()} does not exist (black_box.loss_table_path)"
        )
    suffix = source.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(source)
        if suffix == ".csv":
            return pl.read_csv(source, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise LossTableError(f"loss table {source} could not be read: {exc}") from exc
    raise LossTableError(f"loss table {source}: expected a .parquet or .csv file")


def _cast(table: pl.DataFrame, column: str, dtype: pl.DataType, source: Path) -> pl.Series:
    try:
        return table[column].cast(dtype, strict=True)
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as exc:
        raise LossTableError(
            f"loss table {source}: column {column!r} ({table[column].dtype}) is not {dtype}"
        ) from exc


def read_loss_table(
    path: str | os.PathLike[str],
    manifest: pl.DataFrame,
    *,
    label_map: Mapping[int, int] | None = None,
    dataset_labels: np.ndarray | None = None,
) -> pl.DataFrame:
    """Read and validate a ready loss table against the manifest (see the module docstring).

    `dataset_labels` (one per manifest row) are the task's labels (core/blackbox/task_labels.py)
    where the task is not identity: they stand in for the identity, as the label the table's
    `label` column or the label map must agree with."""
    source = Path(path)
    table = _typed(_read(source), source)
    known = manifest.select("sample_id", "split", "identity", "index")
    if dataset_labels is not None:
        known = known.with_columns(pl.Series("identity", dataset_labels, dtype=pl.Int64))
    _check_sample_ids(table, known, source)
    table = _checked_values(table, source)
    joined = _with_labels(
        known.join(table, on="sample_id", how="left").sort("index"), label_map, source
    )
    for name in ("predicted", *OPTIONAL_FLOAT):
        if name not in joined.columns:
            joined = joined.with_columns(pl.lit(None, dtype=LOSS_SCHEMA[name]).alias(name))
    joined = joined.with_columns(correct=pl.col("predicted") == pl.col("label"))
    return joined.select([pl.col(name).cast(dtype) for name, dtype in LOSS_SCHEMA.items()])


def _typed(raw: pl.DataFrame, source: Path) -> pl.DataFrame:
    """The known columns of `raw`, each cast to its type (sample_id and loss required)."""
    missing = [name for name in ("sample_id", "loss") if name not in raw.columns]
    if missing:
        raise LossTableError(
            f"loss table {source} lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(raw.columns) or 'no columns'}"
        )
    table = pl.DataFrame({"sample_id": _cast(raw, "sample_id", pl.String(), source)})
    table = table.with_columns(loss=_cast(raw, "loss", pl.Float64(), source))
    for name in OPTIONAL_INT:
        if name in raw.columns:
            table = table.with_columns(_cast(raw, name, pl.Int64(), source).alias(name))
    for name in OPTIONAL_FLOAT:
        if name in raw.columns:
            table = table.with_columns(_cast(raw, name, pl.Float64(), source).alias(name))
    return table


def _check_sample_ids(table: pl.DataFrame, known: pl.DataFrame, source: Path) -> None:
    """Every sample id present once, and exactly the manifest's samples."""
    null_ids = table["sample_id"].is_null()
    if null_ids.any():
        rows = (null_ids.arg_true() + 2).to_list()  # +1 for 1-based, +1 for the header row
        raise LossTableError(f"loss table {source}: empty sample_id on rows {_some(rows)}")
    duplicated = (
        table.group_by("sample_id").len().filter(pl.col("len") > 1).sort("sample_id")["sample_id"]
    )
    if len(duplicated):
        raise LossTableError(
            f"loss table {source}: sample ids appear more than once: {_some(duplicated.to_list())}"
        )

    extra = table.join(known, on="sample_id", how="anti")["sample_id"]
    absent = known.join(table, on="sample_id", how="anti").sort("index")["sample_id"]
    if len(extra):
        raise LossTableError(
            f"loss table {source}: sample ids not in the manifest: {_some(extra.sort().to_list())}"
        )
    if len(absent):
        raise LossTableError(
            f"loss table {source}: manifest samples missing from the table: "
            f"{_some(absent.to_list())}"
        )


def _checked_values(table: pl.DataFrame, source: Path) -> pl.DataFrame:
    """Finite losses >= 0 (rounding below 0 clipped), p_true in [0, 1], classes >= 0."""
    loss = pl.col("loss")
    bad = table.filter(loss.is_null() | loss.is_nan() | loss.is_infinite())
    if len(bad):
        raise LossTableError(
            f"loss table {source}: missing, NaN or infinite loss for samples "
            f"{_some(bad['sample_id'].to_list())}"
        )
    negative = table.filter(loss < -NEGATIVE_TOLERANCE)
    if len(negative):
        raise LossTableError(
            f"loss table {source}: negative loss for samples "
            f"{_some(negative['sample_id'].to_list())}; a task loss is >= 0"
        )
    table = table.with_columns(loss.clip(lower_bound=0.0))
    if "p_true" in table.columns:
        p = pl.col("p_true")
        out_of_range = table.filter(p.is_not_null() & (p.is_nan() | (p < 0) | (p > 1)))
        if len(out_of_range):
            raise LossTableError(
                f"loss table {source}: p_true outside [0, 1] for samples "
                f"{_some(out_of_range['sample_id'].to_list())}"
            )
    if "predicted" in table.columns:
        negative_pred = table.filter(pl.col("predicted") < 0)
        if len(negative_pred):
            raise LossTableError(
                f"loss table {source}: negative predicted class for samples "
                f"{_some(negative_pred['sample_id'].to_list())}"
            )
    return table


def _with_labels(
    joined: pl.DataFrame, label_map: Mapping[int, int] | None, source: Path
) -> pl.DataFrame:
    """The true class of every sample: the label map's (checked against a label column), the
    table's label column, or the identity."""
    if label_map is not None:
        mapping = pl.DataFrame(
            {
                "identity": list(label_map.keys()),
                "_mapped": list(label_map.values()),
            },
            schema={"identity": pl.Int64, "_mapped": pl.Int64},
        )
        joined = joined.join(mapping, on="identity", how="left", maintain_order="left")
        unmapped = joined.filter(pl.col("_mapped").is_null())
        if len(unmapped):
            identities = unmapped["identity"].unique().sort().to_list()
            raise LossTableError(
                f"identities {_some(identities)} are not in the label map "
                f"(e.g. samples {', '.join(unmapped['sample_id'].head(5).to_list())})"
            )
        if "label" in joined.columns:
            differs = pl.col("label").is_not_null() & (pl.col("label") != pl.col("_mapped"))
            mismatch = joined.filter(differs)
            if len(mismatch):
                raise LossTableError(
                    f"loss table {source}: label disagrees with the label map for samples "
                    f"{_some(mismatch['sample_id'].to_list())}"
                )
        else:
            joined = joined.with_columns(label=pl.col("_mapped"))
    elif "label" not in joined.columns:
        joined = joined.with_columns(label=pl.col("identity"))
    return joined


def split_loss_table(frame: pl.DataFrame, manifest: pl.DataFrame, shard: str) -> pl.DataFrame:
    """The rows of one manifest shard, in manifest order (what one shard partition serves)."""
    members = manifest.filter(pl.col("shard") == shard).select("sample_id", "index")
    if members.is_empty():
        shards = manifest["shard"].unique().sort().to_list()
        raise LossTableError(
            f"shard {shard!r} is not in the manifest; its shards are {_some(shards)}"
        )
    return (
        frame.join(members, on="sample_id", how="inner")
        .sort("index")
        .drop("index")
        .select(list(LOSS_SCHEMA))
    )
