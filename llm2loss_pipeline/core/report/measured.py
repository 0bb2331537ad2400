"""Measured disparity: how the black box actually performs with and without each attribute.

Everything here goes through the SQL in `assets_sql/` over the Parquet files under
`LLM2LOSS_HOME`. Performance is measured three ways per group:

- mean loss: the mean per-sample cross-entropy;
- accuracy: the fraction of samples whose top-1 identity is right;
- AUROC: the mean over the group's samples of `true_class_auroc`, the one-vs-rest ranking AUROC of
  the sample's true identity among all identity logits (the fraction of other identities whose
  logit is below the true one's, ties counting half).

The Rawlsian max-min gap (GT-RMM) of a metric is |perf(True) - perf(False)|. The signed gap is
oriented so that positive always means "worse with the attribute": loss(True) - loss(False),
accuracy(False) - accuracy(True), AUROC(False) - AUROC(True).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from scipy import stats as sps

from llm2loss_pipeline.core.attributes import attribute_columns
from llm2loss_pipeline.core.layout import EMBEDDINGS_TABLE, LOSSES_TABLE, Layout
from llm2loss_pipeline.core.sql import parquet_source, run_sql, shard_glob

METRICS = ("loss", "accuracy", "auroc")
"""Performance metrics, each with a `<metric>_true`/`<metric>_false`, `gap_<metric>` and
`gt_rmm_<metric>` column in the measured table."""


class ReportInputError(ValueError):
    """An input table of the report is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class EvalInputs:
    """The Parquet inputs of the report; per-shard tables are read through a glob."""

    manifest: str
    attributes: str
    losses: str
    embeddings: str | None = None

    @classmethod
    def from_layout(cls, layout: Layout) -> EvalInputs:
        embeddings_dir = layout.shard_dir(EMBEDDINGS_TABLE)
        return cls(
            manifest=str(layout.manifest),
            attributes=str(layout.attributes),
            losses=shard_glob(layout.shard_dir(LOSSES_TABLE)),
            embeddings=shard_glob(embeddings_dir) if embeddings_dir.is_dir() else None,
        )

    def attribute_names(self) -> tuple[str, ...]:
        """The attribute columns of the attribute table, in its order."""
        if not Path(self.attributes).is_file():
            raise ReportInputError(f"{self.attributes}: the attribute table is missing")
        return attribute_columns(pl.read_parquet_schema(self.attributes))

    def tables(self) -> dict[str, str]:
        """Query parameter name -> Parquet path or glob (checked to exist when a query runs)."""
        tables = {"manifest": self.manifest, "attributes": self.attributes, "losses": self.losses}
        if self.embeddings is not None:
            tables["embeddings"] = self.embeddings
        return tables


def known_attributes(inputs: EvalInputs, attributes: Sequence[str] | None) -> tuple[str, ...]:
    """`attributes`, each checked to be a column of the attribute table; None: all of them."""
    names = inputs.attribute_names()
    if attributes is None:
        return names
    for name in attributes:
        if name not in names:
            raise ReportInputError(
                f"{inputs.attributes}: no attribute column {name!r}; the table's attributes are "
                f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
            )
    return tuple(attributes)


def _is_number(column_type: str) -> bool:
    return column_type in {"FLOAT", "DOUBLE", "REAL"} or column_type.startswith("DECIMAL")


_REQUIRED: dict[str, dict[str, tuple[str, Callable[[str], bool]]]] = {
    "manifest": {
        "sample_id": ("VARCHAR", lambda t: t == "VARCHAR"),
        "split": ("VARCHAR", lambda t: t == "VARCHAR"),
    },
    "losses": {
        "sample_id": ("VARCHAR", lambda t: t == "VARCHAR"),
        "split": ("VARCHAR", lambda t: t == "VARCHAR"),
        "loss": ("a floating-point number", _is_number),
        "correct": ("BOOLEAN", lambda t: t == "BOOLEAN"),
        "true_class_auroc": ("a floating-point number", _is_number),
    },
    "embeddings": {
        "sample_id": ("VARCHAR", lambda t: t == "VARCHAR"),
        "embedding": ("a list of floats", lambda t: t.endswith("]")),
    },
}


def check_columns(
    con: duckdb.DuckDBPyConnection, table: str, source: str, attributes: Sequence[str] = ()
) -> None:
    """Raise a `ReportInputError` naming the file if a required column is missing or mistyped."""
    schema = run_sql(con, "parquet_columns", tables={"path": source})
    types = dict(zip(schema["column_name"].to_list(), schema["column_type"].to_list(), strict=True))
    required = dict(_REQUIRED.get(table, {}))
    if table == "attributes":
        required["sample_id"] = ("VARCHAR", lambda t: t == "VARCHAR")
        for name in attributes:
            required[name] = ("BOOLEAN", lambda t: t == "BOOLEAN")
    for column, (expected, accepts) in required.items():
        if column not in types:
            raise ReportInputError(
                f"{source}: column {column!r} is missing (the {table} table needs it; "
                f"found {', '.join(list(types)[:8]) or 'no columns'}"
                f"{', ...' if len(types) > 8 else ''})"
            )
        if not accepts(types[column]):
            raise ReportInputError(
                f"{source}: column {column!r} has type {types[column]}, expected {expected}"
            )


def check_inputs(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str,
    attributes: Sequence[str] | None = None,
) -> dict[str, int]:
    """Validate the report's inputs for one split; return the coverage counts.

    Fails, naming the file and the first offending sample, on: missing files or columns, NULL
    attribute labels, duplicate loss rows, loss rows whose sample is not in the manifest or whose
    split disagrees with it, evaluation samples without a loss or without attributes.
    """
    sources = {"manifest": inputs.manifest, "attributes": inputs.attributes}
    sources["losses"] = inputs.losses
    for table, source in sources.items():
        try:
            resolved = parquet_source(source)
        except Exception as exc:
            raise ReportInputError(f"the {table} table is not available: {exc}") from exc
        if table == "attributes" and attributes is None:
            attributes = inputs.attribute_names()
        check_columns(con, table, resolved, attributes if table == "attributes" else ())
    assert attributes is not None  # set with the attribute table's check above
    params = {"split": split, "attribute_names": list(attributes)}
    nulls = run_sql(con, "attribute_nulls", params, inputs.tables()).row(0, named=True)
    if nulls["n_null"]:
        raise ReportInputError(
            f"{inputs.attributes}: {nulls['n_null']} attribute label(s) are NULL, first "
            f"{nulls['first_attribute']} of sample {nulls['first_sample_id']}"
        )
    cov = run_sql(con, "eval_coverage", params, inputs.tables()).row(0, named=True)
    problems = [
        (
            "n_duplicate_losses",
            f"{cov['first_duplicate_loss_file']}: sample {cov['first_duplicate_loss']} has "
            "more than one loss row",
        ),
        (
            "n_losses_not_in_manifest",
            f"{cov['first_loss_not_in_manifest_file']}: sample "
            f"{cov['first_loss_not_in_manifest']} is not in {inputs.manifest}",
        ),
        (
            "n_split_mismatch",
            f"{inputs.losses}: sample {cov['first_split_mismatch']} has a different split "
            f"than in {inputs.manifest}",
        ),
        (
            "n_missing_losses",
            f"{inputs.losses}: sample {cov['first_missing_loss']} of split {split!r} has no "
            "loss row (were all shards computed?)",
        ),
        (
            "n_missing_attributes",
            f"{inputs.attributes}: sample {cov['first_missing_attributes']} has a loss but "
            "no attribute row",
        ),
    ]
    for key, message in problems:
        if cov[key]:
            raise ReportInputError(f"{message} ({cov[key]} such sample(s) in all)")
    if not cov["n_losses"]:
        raise ReportInputError(
            f"{inputs.losses}: no per-sample losses for split {split!r} "
            f"({cov['n_manifest']} samples of that split in {inputs.manifest})"
        )
    return {key: int(value) for key, value in cov.items() if key.startswith("n_")}


def _welch_p(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int) -> float:
    """Two-sided Welch t-test p-value of equal means, from group summaries; NaN if undefined."""
    values = (mean_a, var_a, mean_b, var_b)
    if n_a < 2 or n_b < 2 or not all(math.isfinite(v) for v in values):
        return float("nan")
    if var_a == 0 and var_b == 0:
        return 1.0 if mean_a == mean_b else 0.0
    result = sps.ttest_ind_from_stats(
        mean_a, math.sqrt(var_a), n_a, mean_b, math.sqrt(var_b), n_b, equal_var=False
    )
    return float(result.pvalue)


def fill_groups(
    groups: pl.DataFrame, attributes: Sequence[str]
) -> dict[tuple[str, bool], Mapping[str, float]]:
    """(attribute, value) -> metrics, with every absent group present as n = 0 and NaN metrics."""
    empty = {"n": 0, "mean_loss": math.nan, "loss_variance": math.nan}
    empty |= {"accuracy": math.nan, "auroc": math.nan}
    found = {(row["attribute"], bool(row["value"])): row for row in groups.iter_rows(named=True)}
    return {
        (name, value): found.get((name, value), empty)
        for name in attributes
        for value in (True, False)
    }


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def measured_attribute_table(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str = "test",
    min_group_size: int = 20,
    attributes: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One row per attribute (in the given order) with the black box's performance on `split`.

    Columns: attribute, n_true, n_false, small_group (either side has fewer than
    `min_group_size` samples; such rows are kept and flagged), loss/accuracy/auroc _true and
    _false, loss_var_true/false, gap_<metric> (positive = worse with the attribute),
    gt_rmm_<metric> = |gap|, gap_loss_p (Welch t-test of equal mean loss).
    """
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be at least 1, got {min_group_size}")
    attributes = known_attributes(inputs, attributes)
    params = {"split": split, "attribute_names": list(attributes)}
    groups = fill_groups(run_sql(con, "group_metrics", params, inputs.tables()), attributes)
    rows = []
    for name in attributes:
        yes, no = groups[(name, True)], groups[(name, False)]
        row: dict[str, object] = {
            "attribute": name,
            "n_true": int(yes["n"]),
            "n_false": int(no["n"]),
            "small_group": min(int(yes["n"]), int(no["n"])) < min_group_size,
        }
        for metric, column in (("loss", "mean_loss"), ("accuracy", "accuracy"), ("auroc", "auroc")):
            row[f"{metric}_true"] = _none_to_nan(yes[column])
            row[f"{metric}_false"] = _none_to_nan(no[column])
        row["loss_var_true"] = _none_to_nan(yes["loss_variance"])
        row["loss_var_false"] = _none_to_nan(no["loss_variance"])
        row["gap_loss"] = row["loss_true"] - row["loss_false"]  # type: ignore[operator]
        row["gap_accuracy"] = row["accuracy_false"] - row["accuracy_true"]  # type: ignore[operator]
        row["gap_auroc"] = row["auroc_false"] - row["auroc_true"]  # type: ignore[operator]
        for metric in METRICS:
            row[f"gt_rmm_{metric}"] = abs(row[f"gap_{metric}"])  # type: ignore[arg-type]
        row["gap_loss_p"] = _welch_p(
            row["loss_true"],  # type: ignore[arg-type]
            row["loss_var_true"],  # type: ignore[arg-type]
            row["n_true"],  # type: ignore[arg-type]
            row["loss_false"],  # type: ignore[arg-type]
            row["loss_var_false"],  # type: ignore[arg-type]
            row["n_false"],  # type: ignore[arg-type]
        )
        rows.append(row)
    return pl.DataFrame(rows, schema=_MEASURED_SCHEMA)


_MEASURED_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "attribute": pl.String,
    "n_true": pl.Int64,
    "n_false": pl.Int64,
    "small_group": pl.Boolean,
    "loss_true": pl.Float64,
    "loss_false": pl.Float64,
    "accuracy_true": pl.Float64,
    "accuracy_false": pl.Float64,
    "auroc_true": pl.Float64,
    "auroc_false": pl.Float64,
    "loss_var_true": pl.Float64,
    "loss_var_false": pl.Float64,
    "gap_loss": pl.Float64,
    "gap_accuracy": pl.Float64,
    "gap_auroc": pl.Float64,
    "gt_rmm_loss": pl.Float64,
    "gt_rmm_accuracy": pl.Float64,
    "gt_rmm_auroc": pl.Float64,
    "gap_loss_p": pl.Float64,
}


def load_zero_shot_inputs(
    con: duckdb.DuckDBPyConnection,
    inputs: EvalInputs,
    split: str = "test",
    attributes: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(sample ids, embeddings [N, d] float32, attribute -> bool labels [N]) for one split."""
    if inputs.embeddings is None:
        raise ReportInputError("no image embeddings table: the zero-shot AUROC needs one")
    check_columns(con, "embeddings", parquet_source(inputs.embeddings))
    attributes = known_attributes(inputs, attributes)
    params = {"split": split, "attribute_names": list(attributes)}
    frame = run_sql(con, "zero_shot_inputs", params, inputs.tables())
    ids = frame["sample_id"].to_list()
    if not ids:
        raise ReportInputError(f"{inputs.embeddings}: no image embeddings for split {split!r}")
    lengths = frame["embedding"].list.len().to_numpy()
    if np.any(lengths != lengths[0]) or lengths[0] == 0:
        bad = int(np.flatnonzero(lengths != lengths[0])[0]) if np.any(lengths != lengths[0]) else 0
        raise ReportInputError(
            f"{inputs.embeddings}: sample {ids[bad]} has an embedding of length "
            f"{int(lengths[bad])}, expected {int(lengths[0])} like sample {ids[0]}"
        )
    flat = frame["embedding"].explode().to_numpy().astype(np.float32, copy=False)
    embeddings = flat.reshape(len(ids), int(lengths[0]))
    if not np.all(np.isfinite(embeddings)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(embeddings), axis=1))[0])
        raise ReportInputError(f"{inputs.embeddings}: sample {ids[bad]} has a non-finite embedding")
    labels = {name: frame[name].to_numpy().astype(bool) for name in attributes}
    return ids, embeddings, labels
