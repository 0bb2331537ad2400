"""Publish DuckDB views over the pipeline's Parquet files, for people who want to query them.

`$LLM2LOSS_HOME/llm2loss.duckdb` holds only views (no data): each is `SELECT * FROM
read_parquet('<absolute path or shard glob>')`, so a later shard or a rewritten report shows up
without republishing. Open it with `duckdb $LLM2LOSS_HOME/llm2loss.duckdb` and e.g.
`SELECT attribute, gap_loss, est_mean FROM attribute_disparity ORDER BY est_mean DESC`.

Only one process may write a DuckDB file, and per-shard work runs in many processes at once, so
this is the single writer: it builds a fresh database under a temporary name beside the target and
renames it over `llm2loss.duckdb` (atomic on POSIX). Readers holding the old file keep reading it.

The view bodies are the queries of `assets_sql/` bound with their parameters; DuckDB itself
writes the bound paths into the stored view definitions, so no path is pasted into SQL here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.attributes import attribute_columns
from llm2loss_pipeline.core.layout import EMBEDDINGS_TABLE, LOSSES_TABLE, Layout
from llm2loss_pipeline.core.sql import SqlError, connect, parquet_source, relation, shard_glob
from llm2loss_pipeline.core.storage import atomic_path

MEMBER_METRICS_FILE = "member_metrics.parquet"


@dataclass(frozen=True)
class PublishResult:
    db_path: Path
    views: dict[str, str] = field(default_factory=dict)
    """view name -> the Parquet file or glob it reads"""
    skipped: dict[str, str] = field(default_factory=dict)
    """view name -> why it was not created (its input does not exist yet)"""


def view_sources(
    layout: Layout, reports_dir: Path | None = None, member_metrics: Path | None = None
) -> dict[str, tuple[str, str, dict]]:
    """view name -> (query file, source path or glob, extra parameters), in publishing order."""
    reports = Path(reports_dir) if reports_dir is not None else layout.reports
    metrics = member_metrics or layout.heads_dir / MEMBER_METRICS_FILE
    # Every attribute of the table (the task's target too): the view shows the data as it is.
    columns = pl.read_parquet_schema(layout.attributes) if layout.attributes.is_file() else {}
    names = {"attribute_names": list(attribute_columns(columns))}
    return {
        "manifest": ("read_table", str(layout.manifest), {}),
        "attributes": ("read_table", str(layout.attributes), {}),
        "attributes_long": ("attributes_long", str(layout.attributes), names),
        "per_sample_losses": ("read_table", shard_glob(layout.shard_dir(LOSSES_TABLE)), {}),
        "image_embeddings": ("read_table", shard_glob(layout.shard_dir(EMBEDDINGS_TABLE)), {}),
        "attribute_disparity": ("read_table", str(reports / "attribute_disparity.parquet"), {}),
        "pair_disparity": ("read_table", str(reports / "pair_disparity.parquet"), {}),
        "correlations": ("read_table", str(reports / "correlations.parquet"), {}),
        # the task's groups (attribute value x value cells, worst first; core/report/groups.py)
        "groups": ("read_table", str(reports / "groups.parquet"), {}),
        "member_metrics": ("read_table", str(metrics), {}),
    }


def publish_views(
    db_path: str | os.PathLike[str] | None,
    layout: Layout,
    *,
    reports_dir: str | os.PathLike[str] | None = None,
    member_metrics: str | os.PathLike[str] | None = None,
) -> PublishResult:
    """(Re)write the DuckDB file of views; inputs that do not exist yet are skipped and listed.

    db_path: the database to write (default `layout.duckdb`).
    reports_dir: where the report's Parquet tables are (default `layout.reports`).
    member_metrics: the heads' per-member metrics table (default
        `<heads_dir>/member_metrics.parquet`).
    """
    target = Path(db_path) if db_path is not None else layout.duckdb
    sources = view_sources(
        layout,
        Path(reports_dir) if reports_dir is not None else None,
        Path(member_metrics) if member_metrics is not None else None,
    )
    views: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with atomic_path(target) as tmp:
        tmp.unlink()  # DuckDB refuses an existing empty file; it creates its own
        wal = Path(f"{tmp}.wal")
        try:
            con = connect(tmp)
            try:
                for view, (query, source, params) in sources.items():
                    try:
                        resolved = parquet_source(source)
                    except SqlError as exc:
                        skipped[view] = str(exc)
                        continue
                    relation(con, query, params, {_path_param(query): resolved}).create_view(
                        view, replace=True
                    )
                    views[view] = resolved
                con.execute("CHECKPOINT")
            finally:
                con.close()
        finally:
            wal.unlink(missing_ok=True)
    return PublishResult(target, views, skipped)


def _path_param(query: str) -> str:
    return "attributes" if query == "attributes_long" else "path"
