"""Loading and running the DuckDB queries in `assets_sql/`, one query per file.

Safety rules, enforced here so that no caller has to remember them:
- Values (splits, attribute-name lists, k) and file paths are always bound as prepared-statement
  parameters (`$name`), never pasted into the SQL text. `read_parquet($path)` accepts a parameter,
  and a glob such as `.../per_sample_losses/*.parquet` reads every shard file.
- A column name can only reach SQL text through `quote_identifier`, which accepts nothing but the
  closed set the caller names (the dataset's attribute names). Attribute columns are otherwise
  chosen by `COLUMNS(lambda c: list_contains($attribute_names, c))`: a parameter, not SQL text.
- Query files are named by a plain `[a-z0-9_]` word, so a name cannot walk out of the folder.
- Python replacement scans are switched off, so a query can never pick up a Python variable that
  happens to share a table's name.

Where the files live: `assets_sql/` sits at the repository root, beside the package
(`Path(__file__).parents[2] / "assets_sql"`), which is what a source checkout or an editable
install sees. An installed wheel has no repository root, so the lookup falls back to
`llm2loss_pipeline/assets_sql` inside the package (`importlib.resources`); packaging must copy the
folder there (package data). `LLM2LOSS_SQL_DIR` overrides both, for tests and experiments.
"""

from __future__ import annotations

import functools
import glob
import importlib.resources
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from llm2loss_pipeline.core.storage import sidecar_path, verify_hashed

SQL_DIR_ENV = "LLM2LOSS_SQL_DIR"
_NAME = re.compile(r"^[a-z0-9_]+$")
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_COMMENT = re.compile(r"--[^\n]*")
_GLOB_CHARS = frozenset("*?[")

Params = Mapping[str, Any] | Sequence[Any] | None


class SqlError(RuntimeError):
    """A query could not be found, was given bad parameters, or failed in DuckDB."""


def sql_dir() -> Path:
    """The folder holding the `.sql` files (see the module docstring for the lookup order)."""
    override = os.environ.get(SQL_DIR_ENV)
    if override:
        folder = Path(override)
        if not folder.is_dir():
            raise SqlError(f"${SQL_DIR_ENV}={override} is not a folder")
        return folder
    beside_package = Path(__file__).resolve().parents[2] / "assets_sql"
    if beside_package.is_dir():
        return beside_package
    packaged = Path(str(importlib.resources.files("llm2loss_pipeline").joinpath("assets_sql")))
    if packaged.is_dir():
        return packaged
    raise SqlError(
        f"no assets_sql folder: looked in {beside_package} and {packaged}; "
        "reinstall the package or set LLM2LOSS_SQL_DIR"
    )


def load_sql(name: str) -> str:
    """The text of `assets_sql/<name>.sql`."""
    return _load_sql(str(sql_dir()), name)


@functools.lru_cache(maxsize=64)
def _load_sql(folder: str, name: str) -> str:
    if not _NAME.match(name):
        raise SqlError(f"query name {name!r} must be a plain word of [a-z0-9_] (no path, no .sql)")
    path = Path(folder) / f"{name}.sql"
    if not path.is_file():
        available = sorted(p.stem for p in Path(folder).glob("*.sql"))
        raise SqlError(f"{path} does not exist; available queries: {', '.join(available)}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SqlError(f"{path} is empty")
    return text


def query_parameters(name: str) -> set[str]:
    """The `$name` parameters a query file uses, outside its `--` comments."""
    return set(_PARAM.findall(_COMMENT.sub("", load_sql(name))))


def quote_identifier(name: str, allowed: Collection[str]) -> str:
    """`name` as a double-quoted SQL identifier, only if it is one of `allowed` (e.g. the
    dataset's attribute names).

    The closed set is the whole defence: anything else, e.g. `Male; DROP TABLE x`, is rejected
    before it can become SQL text.
    """
    if not isinstance(name, str) or name not in allowed:
        raise SqlError(
            f"{name!r} is not an allowed column name; expected one of the known names, "
            f"e.g. {next(iter(allowed), '?')!r}"
        )
    return '"' + name.replace('"', '""') + '"'


def connect(
    db_path: str | os.PathLike[str] | None = None, *, read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection: in memory when `db_path` is None, else the file (created if absent)."""
    # One thread: DuckDB's parallel aggregates add floating-point partial sums in whatever order
    # its threads finish, so avg/var_samp of the same rows could differ in the last bit from run
    # to run; the pipeline's tables are small enough that one thread costs nothing measurable.
    config = {"python_enable_replacements": False, "threads": 1}
    database = ":memory:" if db_path is None else str(db_path)
    try:
        con = duckdb.connect(database, read_only=read_only, config=config)
    except duckdb.Error as exc:
        raise SqlError(f"cannot open DuckDB database {database}: {exc}") from exc
    # a session setting (not a database one): keeps terminal progress bars out of logs
    con.execute("SET enable_progress_bar = false")
    return con


def parquet_source(path: str | os.PathLike[str]) -> str:
    """An absolute path (or glob) for `read_parquet`, checked to name at least one file.

    Every matched file that has a content-hash sidecar (the per-shard tables) is checked against
    it first, so a bit flipped on disk is an error naming the file, not a silently wrong value.
    """
    text = os.fspath(path)
    absolute = os.path.abspath(os.path.expanduser(text))
    if any(char in _GLOB_CHARS for char in absolute):
        files = sorted(glob.glob(absolute))
        if not files:
            raise SqlError(f"no Parquet file matches {absolute}")
    elif not os.path.isfile(absolute):
        raise SqlError(f"Parquet file {absolute} does not exist")
    else:
        files = [absolute]
    for file in files:
        _verify_content(Path(file))
    return absolute


def _verify_content(path: Path) -> None:
    # shard files must have a sidecar (an old one without gets one warning); others may
    if path.name.startswith("shard-") or sidecar_path(path).exists():
        verify_hashed(
            path, fix=f"Rematerialize it: llm2loss run --stage signals --shard {path.stem}"
        )


def shard_glob(folder: str | os.PathLike[str]) -> str:
    """The glob reading every shard file of a per-shard table folder."""
    return os.path.join(os.path.abspath(os.fspath(folder)), "*.parquet")


def bind_parameters(
    name: str, params: Params = None, tables: Mapping[str, str | os.PathLike[str]] | None = None
) -> dict[str, Any] | list[Any] | None:
    """Merge `params` with `tables` (parameter name -> Parquet path or glob, checked to exist)."""
    if tables:
        if params is not None and not isinstance(params, Mapping):
            raise SqlError(f"{name}.sql: `tables` needs named parameters, got a positional list")
        merged: dict[str, Any] = dict(params or {})
        for key, path in tables.items():
            if key in merged:
                raise SqlError(f"{name}.sql: parameter ${key} given both as a value and a table")
            merged[key] = parquet_source(path)
        return merged
    if params is None or isinstance(params, Mapping):
        return dict(params) if params is not None else None
    if isinstance(params, str | bytes):
        raise SqlError(f"{name}.sql: parameters must be a dict or a list, not a string")
    return list(params)


def relation(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: Params = None,
    tables: Mapping[str, str | os.PathLike[str]] | None = None,
) -> duckdb.DuckDBPyRelation:
    """The query `name` as a lazy DuckDB relation with its parameters bound."""
    # DuckDB rejects named values a query does not use, so one dict of inputs can serve every
    # query: keep what this query names (checking only those paths), fail on what it lacks.
    wanted = query_parameters(name)
    if tables:
        tables = {key: path for key, path in tables.items() if key in wanted}
    if isinstance(params, Mapping):
        params = {key: value for key, value in params.items() if key in wanted}
    bound = bind_parameters(name, params, tables)
    if isinstance(bound, dict) or bound is None:
        missing = wanted - set(bound or {})
        if missing:
            raise SqlError(f"{name}.sql needs parameter(s) ${', $'.join(sorted(missing))}")
        bound = bound or None
    try:
        return con.sql(load_sql(name), params=bound)
    except duckdb.Error as exc:
        raise SqlError(f"{sql_dir() / (name + '.sql')}: {exc}") from exc


def run_sql(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: Params = None,
    tables: Mapping[str, str | os.PathLike[str]] | None = None,
) -> pl.DataFrame:
    """Run `assets_sql/<name>.sql` with bound parameters and return its rows as polars.

    `params`: a dict for `$name` placeholders or a list for `?` placeholders.
    `tables`: parameter name -> Parquet file or glob; each is checked to exist, made absolute and
    bound like any other value (the SQL reads it with `read_parquet($name)`).
    Errors from DuckDB are re-raised as `SqlError` naming the query file.
    """
    rel = relation(con, name, params, tables)
    try:
        return rel.pl()
    except duckdb.Error as exc:
        raise SqlError(f"{sql_dir() / (name + '.sql')}: {exc}") from exc
