"""Discovery's tables as DuckDB views beside the report's, in the same single-writer file.

The report's `publish_views` rebuilds `llm2loss.duckdb` from a fixed list of views; discovery runs
after the report (the asset depends on it), so it rebuilds the same file with the report's views
plus `failure_hypotheses` and `failure_evidence`, under a temporary name renamed into place, as
the report does: a reader never sees a file without the report's views.
"""

from __future__ import annotations

from pathlib import Path

from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.report.publish import PublishResult, publish_views
from llm2loss_pipeline.core.sql import connect, parquet_source, relation
from llm2loss_pipeline.core.storage import atomic_path


def publish_with_discovery(
    layout: Layout, tables: dict[str, Path], member_metrics: Path | None = None
) -> PublishResult:
    """Rewrite `layout.duckdb` with the report's views and one view per entry of `tables`."""
    with atomic_path(layout.duckdb) as tmp:
        tmp.unlink()
        base = publish_views(tmp, layout, member_metrics=member_metrics)
        views = dict(base.views)
        con = connect(tmp)
        try:
            for name, path in tables.items():
                source = parquet_source(path)
                relation(con, "read_table", {}, {"path": source}).create_view(name, replace=True)
                views[name] = source
            con.execute("CHECKPOINT")
        finally:
            con.close()
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    return PublishResult(layout.duckdb, views, dict(base.skipped))
