"""`dataset.source: table`: your own images, listed in one Parquet or CSV file.

One row per image. The columns, each renamed by a `dataset.*_column` key:

    sample_id   unique, non-empty text (a number is read as its text)
    path        the image file, relative to `dataset.image_root` (default: the table's folder)
    split       train, valid or test
    label       optional: what `task.kind: label` predicts (integers as they are; any other
                values numbered in sorted order)
    group       optional (`dataset.group_column`): the cluster a sample belongs to, e.g. the
                person; it takes the identity's place, so the report's intervals resample
                groups. Unset, every sample is its own group.
    attributes  every other column, or the `dataset.attribute_columns` list:
                bool, 0/1 or -1/1 (1 is true; a column holding -1 reads as -1/1), or text,
                expanded one-hot: column `hair` with value `dark brown` becomes the attribute
                `hair_dark_brown`. Names (a boolean column's own name too) keep letters, digits
                and `_`; every run of other characters becomes one `_`.

The reader produces the same two tables as the CelebA reader (`celeba.build_manifest` and the
attribute table), so every step after the data step runs unchanged. Every bad value is an error
that names the file, the row (1-based, data rows only) and for CSV the line, and the column.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from llm2loss_pipeline.core.attributes import SPLIT_NAMES

TABLE_SUFFIXES = (".parquet", ".csv")
RESERVED_NAMES = frozenset(
    {
        "sample_id",
        "index",
        "path",
        "split",
        "identity",
        "shard",
        "label",
        "loss",
        "predicted",
        "correct",
        "p_true",
        "true_class_auroc",
        "embedding",
    }
)
"""Columns of the manifest and the per-sample tables that the report joins with the attributes:
an attribute of the same name would be shadowed in those joins."""
QUOTED = 120
MAX_VALUES = 64
"""Distinct values of a text attribute column at most: more is most likely not an attribute (a
file name, a caption) and would flood the report with one-hot attributes."""


class TableFormatError(ValueError):
    """A table manifest is missing, unreadable, or has a bad value (file, row, column named)."""


@dataclass(frozen=True)
class TableSpec:
    """Which file, and which of its columns play which part (DatasetConfig's table keys)."""

    table_path: Path
    image_root: Path
    id_column: str = "sample_id"
    path_column: str = "path"
    split_column: str = "split"
    label_column: str = "label"
    group_column: str | None = None
    attribute_columns: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, dataset: Any) -> TableSpec:
        if not dataset.table_path:
            raise TableFormatError("dataset.table_path must be set when dataset.source is 'table'")
        table = Path(dataset.table_path).expanduser().resolve()
        root = Path(dataset.image_root).expanduser().resolve() if dataset.image_root else None
        return cls(
            table_path=table,
            image_root=root or table.parent,
            id_column=dataset.id_column,
            path_column=dataset.path_column,
            split_column=dataset.split_column,
            label_column=dataset.label_column,
            group_column=dataset.group_column,
            attribute_columns=(
                tuple(dataset.attribute_columns) if dataset.attribute_columns is not None else None
            ),
        )


@dataclass(frozen=True)
class TableTables:
    """What the reader gives: the manifest (CelebA's columns, plus `label` when the file has
    one), the attribute table (sample_id + one Boolean column per attribute), both sorted by
    sample_id, and which attribute came from which column."""

    manifest: pl.DataFrame
    attributes: pl.DataFrame
    origins: dict[str, str]
    """attribute name -> 'column' (a boolean column) or 'column=value' (one-hot)"""
    label_values: list[str]
    """the label values in output order when the label column is not integer; else []"""


def sanitise(text: str) -> str:
    """An attribute name: letters, digits and `_`, each other run turned into one `_`."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", text.strip()).strip("_")


def _quoted(value: object) -> str:
    text = repr(value)
    return text if len(text) <= QUOTED else f"{text[:QUOTED]}... ({len(text) - QUOTED} more)"


class _Where:
    """Names a data row in errors: 'file row N (line L), column C'."""

    def __init__(self, path: Path, is_csv: bool) -> None:
        self.path, self.is_csv = path, is_csv
        self._lines: list[int] | None = None

    def line_of(self, row: int) -> int:
        """The line a 0-based data row starts on (quoted cells may hold newlines)."""
        if self._lines is None:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                starts, line = [], reader.line_num + 1
                for _ in reader:
                    starts.append(line)
                    line = reader.line_num + 1
            self._lines = starts
        return self._lines[row] if row < len(self._lines) else row + 2

    def error(self, row: int | None, column: str | None, message: str) -> TableFormatError:
        parts = [str(self.path)]
        if row is not None:
            line = f" (line {self.line_of(row)})" if self.is_csv else ""
            parts.append(f"row {row + 1}{line}")
        if column is not None:
            parts.append(f"column {column!r}")
        return TableFormatError(f"{', '.join(parts)}: {message}")


def _read_file(path: Path) -> tuple[pl.DataFrame, bool]:
    if not path.is_file():
        raise TableFormatError(f"{path}: no such table file (dataset.table_path)")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TableFormatError(f"{path}: expected a .parquet or .csv file (dataset.table_path)")
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path), False
        # Every cell as text: the reader types each column itself, so that a bad cell is an
        # error naming its row instead of a column silently read as text.
        frame = pl.read_csv(path, infer_schema=False, encoding="utf8")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise TableFormatError(f"{path}: cannot be read as a table ({exc})") from None
    return frame, True


def _text_cells(frame: pl.DataFrame, column: str, where: _Where) -> pl.Series:
    """The column as stripped text, with an empty or missing cell an error."""
    series = frame[column].cast(pl.String).str.strip_chars()
    empty = series.is_null() | (series == "")
    if empty.any():
        raise where.error(int(empty.arg_true()[0]), column, "the value is empty")
    return series


def _required(frame: pl.DataFrame, column: str, key: str, where: _Where) -> None:
    if column not in frame.columns:
        raise where.error(
            None,
            None,
            f"no column {column!r} (dataset.{key}); the file's columns are {frame.columns[:20]}",
        )


def _codes(values: pl.Series) -> tuple[pl.Series, list[str]]:
    """Integers as they are; any other values numbered 0.. in sorted order (and their names)."""
    if values.dtype.is_integer():
        return values.cast(pl.Int64), []
    text = values.cast(pl.String)
    as_int = text.str.strip_chars().cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return as_int, []
    names = sorted(text.unique().to_list())
    lookup = {name: index for index, name in enumerate(names)}
    return text.replace_strict(lookup, return_dtype=pl.Int64), names


def _boolean_column(frame: pl.DataFrame, column: str, where: _Where) -> pl.Series | None:
    """The column as booleans when it is bool, numeric or boolean text; None when it is text
    to expand one-hot. A numeric column outside 0/1 or -1/1 is an error at its first bad row."""
    series = frame[column]
    missing = series.is_null()
    if series.dtype.is_float():
        missing = missing | series.is_nan()
    if missing.any():
        raise where.error(int(missing.arg_true()[0]), column, "the value is empty")
    if series.dtype == pl.Boolean:
        return series
    if series.dtype == pl.String:
        text = series.str.strip_chars().str.to_lowercase()
        if (text == "").any():
            raise where.error(int((text == "").arg_true()[0]), column, "the value is empty")
        numbers = text.cast(pl.Float64, strict=False)
        flags = text.is_in(["true", "false"])
        if numbers.null_count() == 0:
            series = numbers
        elif flags.all():
            return text == "true"
        elif numbers.null_count() < len(numbers) or flags.any():
            # Mostly numbers (or true/false) with a stray word: a typo, not a category.
            kind = numbers.is_not_null() if numbers.null_count() < len(numbers) else flags
            row, other = int((~kind).arg_true()[0]), int(kind.arg_true()[0])
            raise where.error(
                row,
                column,
                f"value {_quoted(frame[column][row])} is not a boolean, while row {other + 1} "
                f"holds {_quoted(frame[column][other])}: a boolean column holds 0/1, -1/1 or "
                "true/false, a text column (expanded one-hot) names its values",
            )
        else:
            return None
    if not series.dtype.is_numeric():
        raise where.error(
            None, column, f"has type {series.dtype}; expected bool, 0/1, -1/1 or text"
        )
    numbers = series.cast(pl.Float64)
    allowed = [-1.0, 1.0] if (numbers == -1).any() else [0.0, 1.0]
    bad = ~numbers.is_in(allowed)
    if bad.any():
        row = int(bad.arg_true()[0])
        why = (
            f"; the column also holds -1 (row {int((numbers == -1).arg_true()[0]) + 1}), "
            "so it reads as -1/1"
            if allowed[0] == -1
            else ""
        )
        raise where.error(
            row,
            column,
            f"value {_quoted(frame[column][row])} is not a boolean: expected 0/1 or -1/1{why} "
            "(a column of other numbers is not expanded one-hot; write it as text to do so)",
        )
    return numbers == 1.0


def _attribute_table(
    frame: pl.DataFrame, columns: list[str], where: _Where
) -> tuple[dict[str, pl.Series], dict[str, str]]:
    values: dict[str, pl.Series] = {}
    origins: dict[str, str] = {}

    def add(name: str, origin: str, series: pl.Series) -> None:
        if not name or not re.match(r"[A-Za-z0-9]", name):
            raise where.error(
                None,
                origin.partition("=")[0],
                f"gives the attribute name {name!r}, which is "
                "empty after keeping letters, digits and _; rename the column or value",
            )
        if name in RESERVED_NAMES:
            raise where.error(
                None,
                origin.partition("=")[0],
                f"gives the attribute {name!r}, a name the pipeline's own tables use; rename it",
            )
        if name in origins:
            raise where.error(
                None,
                origin.partition("=")[0],
                f"gives the attribute {name!r}, which {origins[name]!r} gives too; "
                "rename one of them",
            )
        values[name] = series.alias(name)
        origins[name] = origin

    for column in columns:
        flags = _boolean_column(frame, column, where)
        if flags is not None:
            add(sanitise(column), column, flags)
            continue
        text = _text_cells(frame, column, where)
        distinct = sorted(text.unique().to_list())
        if len(distinct) > MAX_VALUES:
            raise where.error(
                None,
                column,
                f"has {len(distinct)} distinct text values (e.g. {_quoted(distinct[0])}); a text "
                f"attribute is expanded one-hot and may have at most {MAX_VALUES}: give its "
                "role (dataset.*_column) or list the attribute columns (dataset.attribute_columns)",
            )
        for value in distinct:
            add(sanitise(f"{column}_{value}"), f"{column}={value}", text == value)
    return values, origins


def read_table_source(spec: TableSpec) -> TableTables:
    """Read and check the table; the manifest's `path` is absolute (image_root joined)."""
    frame, is_csv = _read_file(spec.table_path)
    where = _Where(spec.table_path, is_csv)
    if frame.height == 0:
        raise where.error(None, None, "the table has no rows")
    keys = {
        "id_column": spec.id_column,
        "path_column": spec.path_column,
        "split_column": spec.split_column,
    }
    for key, column in keys.items():
        _required(frame, column, key, where)
    if spec.group_column is not None:
        _required(frame, spec.group_column, "group_column", where)
    has_label = spec.label_column in frame.columns
    roles = {*keys.values(), spec.label_column, spec.group_column}
    if spec.attribute_columns is not None:
        for column in spec.attribute_columns:
            _required(frame, column, "attribute_columns", where)
            if column in roles:
                raise where.error(
                    None, column, "is listed in dataset.attribute_columns and has another role"
                )
        attribute_columns = list(spec.attribute_columns)
    else:
        attribute_columns = [column for column in frame.columns if column not in roles]
    if not attribute_columns:
        raise where.error(None, None, "no attribute columns (every column has another role)")

    ids = _text_cells(frame, spec.id_column, where)
    duplicated = ids.is_duplicated()
    if duplicated.any():
        rows = [
            int(i)
            for i in duplicated.arg_true()
            if ids[int(i)] == ids[int(duplicated.arg_true()[0])]
        ]
        raise where.error(
            rows[1],
            spec.id_column,
            f"sample id {_quoted(ids[rows[0]])} is also on row {rows[0] + 1}",
        )
    paths = _text_cells(frame, spec.path_column, where)
    splits = _text_cells(frame, spec.split_column, where)
    bad = ~splits.is_in(list(SPLIT_NAMES))
    if bad.any():
        row = int(bad.arg_true()[0])
        raise where.error(
            row, spec.split_column, f"split {_quoted(splits[row])} is not train, valid or test"
        )
    columns: dict[str, pl.Series] = {
        "sample_id": ids.alias("sample_id"),
        "path": pl.Series(
            "path", [os.path.join(spec.image_root, p) for p in paths.to_list()], dtype=pl.String
        ),
        "split": splits.alias("split"),
    }
    if spec.group_column is not None:
        columns["identity"] = _codes(_text_cells(frame, spec.group_column, where))[0]
    label_values: list[str] = []
    if has_label:
        label, label_values = _codes(_text_cells(frame, spec.label_column, where))
        columns["label"] = label.alias("label")
    values, origins = _attribute_table(frame, attribute_columns, where)

    table = pl.DataFrame({**columns, **values}).sort("sample_id")
    if "identity" not in table.columns:
        # No clusters given: every sample is its own (the rank after sorting, stable).
        table = table.with_columns(identity=pl.int_range(0, pl.len(), dtype=pl.Int64))
    manifest = table.select(
        "sample_id",
        "path",
        "split",
        pl.col("identity").cast(pl.Int64),
        *(["label"] if has_label else []),
    )
    attributes = table.select("sample_id", *values)
    return TableTables(manifest, attributes, origins, label_values)


def table_manifest(tables: TableTables, shard_size: int) -> pl.DataFrame:
    """The manifest in `celeba.build_manifest`'s columns and order (+ `label` when given)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    index = pl.int_range(0, pl.len(), dtype=pl.Int64)
    extra = ["label"] if "label" in tables.manifest.columns else []
    return tables.manifest.select(
        pl.col("sample_id"),
        index.alias("index"),
        pl.col("path"),
        pl.col("split"),
        pl.col("identity"),
        pl.format("shard-{}", (index // shard_size).cast(pl.String).str.zfill(5)).alias("shard"),
        *extra,
    )
