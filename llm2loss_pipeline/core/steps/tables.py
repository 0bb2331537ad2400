"""Reading the manifest and the per-shard tables that the steps share."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.images import UnreadableImagesError, check_image
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import (
    StorageError,
    read_hash_sidecar,
    sidecar_path,
    verify_hashed,
    write_parquet_hashed,
)

log = logging.getLogger(__name__)
SHARD_GLOB = "shard-*.parquet"


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
    frames = [
        _read_shard(layout.shard_table(table, key), table, shard_rows(manifest, key))
        for key in keys
    ]
    order = manifest.select("sample_id", "index")
    return pl.concat(frames).join(order, on="sample_id", how="left").sort("index").drop("index")


def rows_digest(rows: pl.DataFrame) -> str:
    """sha256 of a shard's manifest rows (sample id and image path, in order): which samples a
    shard file was computed for, so a file from another dataset or shard size is recognised."""
    digest = hashlib.sha256()
    for sample_id, path in zip(rows["sample_id"].to_list(), rows["path"].to_list(), strict=True):
        digest.update(f"{sample_id}\t{path}\n".encode())
    return digest.hexdigest()


def write_shard(
    layout: Layout, table: str, shard: str, frame: pl.DataFrame, rows: pl.DataFrame
) -> Path:
    """Write one shard of a per-shard table with its sidecar (content sha256, manifest rows)."""
    meta = {"table": table, "shard": shard, "manifest_rows_sha256": rows_digest(rows)}
    path, _ = write_parquet_hashed(frame, layout.shard_table(table, shard), meta)
    return path


def _rerun(path: Path) -> str:
    return f"rematerialize it: llm2loss run --stage signals --shard {path.stem}"


def _read_shard(path: Path, table: str, rows: pl.DataFrame) -> pl.DataFrame:
    meta = verify_hashed(path, fix=_rerun(path))
    if meta is not None and meta.get("manifest_rows_sha256") not in (None, rows_digest(rows)):
        raise StorageError(
            f"{path} was computed for other samples than the manifest's {path.stem} (another "
            f"dataset or shard size); nothing was read from it: {_rerun(path)}"
        )
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise StorageError(
            f"{path}: not a readable Parquet shard of {table} ({exc}); {_rerun(path)}"
        ) from exc
    except BaseException as exc:  # polars reports some malformed files as a Rust panic
        if not _is_panic(exc):
            raise
        raise StorageError(f"{path}: polars cannot decode it ({exc}); {_rerun(path)}") from None
    foreign = _foreign_ids(frame, rows)
    if foreign:
        raise StorageError(
            f"{path} holds {len(foreign)} sample(s) that the manifest does not put in "
            f"{path.stem} (e.g. {foreign[0]}): it is from another dataset or shard size; "
            f"{_rerun(path)}"
        )
    return frame


def _is_panic(exc: BaseException) -> bool:
    return type(exc).__name__ == "PanicException"


def _foreign_ids(frame: pl.DataFrame, rows: pl.DataFrame) -> list[str]:
    if "sample_id" not in frame.columns:
        return []
    expected = set(rows["sample_id"].to_list())
    return [sid for sid in frame["sample_id"].cast(pl.Utf8).to_list() if sid not in expected]


def remove_stale_shards(layout: Layout, manifest: pl.DataFrame) -> list[str]:
    """Delete shard files that do not belong to `manifest`; one line per file, saying why.

    A shard is stale when the manifest has no shard of its name (e.g. after `shard_size` grew),
    or when it was computed for other rows than the manifest's shard of that name (its sidecar
    says so, or, without a sidecar, it holds a sample id the manifest puts elsewhere). Left in
    place, a glob over the folder would read it and mix another dataset's values into the
    report, possibly under colliding sample ids.
    """
    if not layout.tables.is_dir():
        return []
    groups = {key: frame for (key,), frame in manifest.sort("index").group_by("shard")}
    removed: list[str] = []
    for folder in sorted(p for p in layout.tables.iterdir() if p.is_dir()):
        for path in sorted(folder.glob(SHARD_GLOB)):
            why = _stale_reason(path, groups.get(path.stem))
            if why is None:
                continue
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            line = f"removed stale shard {path} ({why})"
            log.info(line)
            removed.append(line)
    return removed


def _stale_reason(path: Path, rows: pl.DataFrame | None) -> str | None:
    if rows is None:
        return f"the manifest has no shard {path.stem}"
    try:
        meta = read_hash_sidecar(path)
    except StorageError:
        return "its sidecar is unreadable"
    if meta is not None:
        if meta.get("manifest_rows_sha256") != rows_digest(rows):
            return f"computed for other samples than the manifest's {path.stem}"
        return None
    try:
        ids = pl.read_parquet(path, columns=["sample_id"])
    except BaseException as exc:  # an unreadable old shard is as stale as a foreign one
        if not isinstance(exc, Exception) and not _is_panic(exc):
            raise
        return "not readable, and no sidecar"
    if _foreign_ids(ids, rows):
        return f"holds samples that the manifest puts outside {path.stem}"
    return None


def split_rows(frame: pl.DataFrame, split: str, setting: str) -> pl.DataFrame:
    """The rows of `split`; a ValueError naming the `setting` that chose it when under 10."""
    rows = frame.filter(pl.col("split") == split)
    if rows.height < 10:
        raise ValueError(
            f"{setting} is {split!r}, which has {rows.height} samples with both a loss and an "
            "embedding; at least 10 are needed (choose another split)"
        )
    return rows
