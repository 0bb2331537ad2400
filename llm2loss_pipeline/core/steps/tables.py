"""Reading the manifest and the per-shard tables that the steps share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.images import UnreadableImagesError, check_image
from llm2loss_pipeline.core.layout import Layout


class BadImagesError(UnreadableImagesError):
    """Unreadable images of one shard, every one named (`dataset.on_bad_image: fail`)."""

    def __init__(self, table: str, shard: str, bad: Sequence[tuple[str, str, str]]) -> None:
        super().__init__(f"{table} {shard}", bad, "nothing was written for this shard")


def fail_on_bad_images(
    table: str, shard: str, rows: pl.DataFrame, skipped: Sequence[str], on_bad_image: str
) -> None:
    """In `fail` mode, raise one error that lists every image a shard pass had to skip.

    The pass itself runs in skip mode, so the error names all bad images at once (with the
    reason each failed) rather than only the first one the loader met.
    """
    if on_bad_image != "fail" or not skipped:
        return
    paths = dict(zip(rows["sample_id"].to_list(), rows["path"].to_list(), strict=True))
    bad = [(sid, paths[sid], check_image(paths[sid]) or "could not be loaded") for sid in skipped]
    raise BadImagesError(table, shard, bad)


def read_manifest(layout: Layout) -> pl.DataFrame:
    if not layout.manifest.exists():
        raise FileNotFoundError(
            f"{layout.manifest} is missing: materialize dataset_manifest first (llm2loss run)"
        )
    return pl.read_parquet(layout.manifest)


def shard_rows(manifest: pl.DataFrame, shard: str) -> pl.DataFrame:
    rows = manifest.filter(pl.col("shard") == shard).sort("index")
    if rows.is_empty():
        known = manifest["shard"].unique().sort().to_list()
        raise ValueError(
            f"shard {shard!r} is not in the manifest (it has {known[0]} .. {known[-1]}); "
            "the manifest changed since the partition was created: rematerialize dataset_manifest"
        )
    return rows


def items_of(rows: pl.DataFrame) -> list[tuple[str, str]]:
    return list(zip(rows["sample_id"].to_list(), rows["path"].to_list(), strict=True))


def read_shards(layout: Layout, table: str, manifest: pl.DataFrame) -> pl.DataFrame:
    """All shards of a per-shard table that the current manifest names, in manifest order.

    Files of shards the manifest no longer has are ignored; a shard the manifest has but whose
    file is missing is an error that names it, since silently reading part of the data would
    bias every downstream number.
    """
    keys = manifest["shard"].unique(maintain_order=True).to_list()
    missing = [key for key in keys if not layout.shard_table(table, key).exists()]
    if missing:
        raise FileNotFoundError(
            f"{table} has no file for {len(missing)} of {len(keys)} shards "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): backfill them, e.g. "
            f"llm2loss run --stage signals --shard {missing[0]}"
        )
    frames = [_read_shard(layout.shard_table(table, key), table) for key in keys]
    order = manifest.select("sample_id", "index")
    return pl.concat(frames).join(order, on="sample_id", how="left").sort("index").drop("index")


def _read_shard(path: Path, table: str) -> pl.DataFrame:
    from llm2loss_pipeline.core.storage import StorageError

    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise StorageError(
            f"{path}: not a readable Parquet shard of {table} ({exc}); rematerialize it, e.g. "
            f"llm2loss run --stage signals --shard {path.stem}"
        ) from exc


def split_rows(frame: pl.DataFrame, split: str, setting: str) -> pl.DataFrame:
    """The rows of `split`; a ValueError naming the `setting` that chose it when under 10."""
    rows = frame.filter(pl.col("split") == split)
    if rows.height < 10:
        raise ValueError(
            f"{setting} is {split!r}, which has {rows.height} samples with both a loss and an "
            "embedding; at least 10 are needed (choose another split)"
        )
    return rows
