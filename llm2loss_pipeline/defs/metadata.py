"""Turning step results into Dagster metadata: tables, schemas, plots."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

# the one markdown-table renderer lives in core (the report uses it too); assets import it here
from llm2loss_pipeline.core.markdown import cell
from llm2loss_pipeline.core.markdown import markdown_table as markdown_table

DIGITS = 4
"""Floats in table metadata are rounded: the UI shows every digit it is given."""

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
        columns=[dg.TableColumn(name, _column_type(dtype)) for name, dtype in frame.schema.items()]
    )


def table_metadata(frame: Any, path: Path | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dagster/row_count": frame.height,
        "dagster/column_schema": column_schema(frame),
    }
    if path is not None:
        meta["path"] = dg.MetadataValue.path(str(path))
    return meta


def table_value(
    frame: Any, columns: Mapping[str, str], p_values: Sequence[str] = ()
) -> dg.TableMetadataValue:
    """A table the Dagster UI shows as a table, with a schema: `columns` (name -> description)
    picks and orders the columns (those missing from `frame` are left out); `p_values` are
    shown as text, 3 decimals or e-notation under 1e-3, as in the report; other floats are
    rounded to DIGITS; NaN is empty."""
    names = [name for name in columns if name in frame.columns]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(
                name,
                "string" if name in p_values else _column_type(frame.schema[name]),
                description=columns[name],
            )
            for name in names
        ]
    )
    records = [
        dg.TableRecord({name: _record_value(row[name], name in p_values) for name in names})
        for row in frame.select(names).iter_rows(named=True)
    ]
    return dg.MetadataValue.table(records, schema)


def _column_type(dtype: Any) -> str:
    return _POLARS_TO_TYPE.get(str(dtype).split("(")[0], str(dtype))


def _record_value(value: Any, p_value: bool) -> str | int | float | bool | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if p_value:
        return None if value is None else cell(float(value))
    return round(value, DIGITS) if isinstance(value, float) else value


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
