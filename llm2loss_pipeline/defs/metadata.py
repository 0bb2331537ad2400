"""Turning step results into Dagster metadata: tables, schemas, plots."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

# the one markdown-table renderer lives in core (the report uses it too); assets import it here
from llm2loss_pipeline.core.markdown import markdown_table as markdown_table

_POLARS_TO_TYPE = {
    "String": "string",
    "Utf8": "string",
    "Int64": "int",
    "Int32": "int",
    "Float64": "float",
    "Float32": "float",
    "Boolean": "bool",
}


def column_schema(frame: Any) -> dg.TableSchema:
    """The `dagster/column_schema` of a polars DataFrame."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, _POLARS_TO_TYPE.get(str(dtype).split("(")[0], str(dtype)))
            for name, dtype in frame.schema.items()
        ]
    )


def table_metadata(frame: Any, path: Path | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dagster/row_count": frame.height,
        "dagster/column_schema": column_schema(frame),
    }
    if path is not None:
        meta["path"] = dg.MetadataValue.path(str(path))
    return meta


def png_markdown(path: Path, alt: str) -> dg.MetadataValue:
    """An inline PNG, so the plot shows in the asset's metadata panel without a file server."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def float_metadata(values: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """Headline numbers as float metadata, so the UI charts them across materializations."""
    return {
        name: dg.MetadataValue.float(float(value))
        for name, value in values.items()
        if isinstance(value, int | float) and value == value
    }
