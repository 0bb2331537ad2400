"""The DuckDB queries in assets_sql/, checked against plain polars on a tiny synthetic world."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.report.publish import publish_views
from llm2loss_pipeline.core.sql import (
    SqlError,
    connect,
    load_sql,
    quote_identifier,
    run_sql,
    shard_glob,
    sql_dir,
)

N = 300
NAMES = {"attribute_names": list(CELEBA_ATTRIBUTES)}


def write_world(home: Path, n: int = N, seed: int = 0, n_shards: int = 3) -> Layout:
    """manifest, attributes, per-shard losses and embeddings for `n` random samples."""
    rng = np.random.default_rng(seed)
    layout = Layout.at(home)
    ids = [f"{i + 1:06d}.jpg" for i in range(n)]
    splits = rng.choice(["train", "valid", "test"], size=n, p=[0.5, 0.2, 0.3])
    shards = [f"shard-{i * n_shards // n:05d}" for i in range(n)]
    manifest = pl.DataFrame(
        {
            "sample_id": ids,
            "index": pl.Series(range(n), dtype=pl.Int64),
            "path": [f"img/{s}" for s in ids],
            "split": splits.tolist(),
            "identity": pl.Series(rng.integers(0, 12, n), dtype=pl.Int64),
            "shard": shards,
        }
    )
    layout.tables.mkdir(parents=True, exist_ok=True)
    manifest.write_parquet(layout.manifest)
    rates = np.linspace(0.03, 0.9, len(CELEBA_ATTRIBUTES))
    attributes = pl.DataFrame(
        {"sample_id": ids}
        | {
            name: (rng.random(n) < rate).tolist()
            for name, rate in zip(CELEBA_ATTRIBUTES, rates, strict=True)
        }
    )
    attributes.write_parquet(layout.attributes)
    losses = pl.DataFrame(
        {
            "sample_id": ids,
            "split": splits.tolist(),
            "label": pl.Series(manifest["identity"], dtype=pl.Int64),
            "loss": rng.gamma(1.5, 1.0, n),
            "predicted": pl.Series(rng.integers(0, 12, n), dtype=pl.Int64),
            "correct": (rng.random(n) < 0.6).tolist(),
            "p_true": rng.random(n),
            "true_class_auroc": rng.uniform(0.5, 1.0, n),
        }
    )
    embeddings = rng.normal(size=(n, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    frame = pl.DataFrame({"sample_id": ids, "shard": shards, "embedding": list(embeddings)})
    for shard in sorted(set(shards)):
        mask = pl.Series(shards) == shard
        for table, data in (("per_sample_losses", losses), ("image_embeddings", frame)):
            folder = layout.shard_dir(table)
            folder.mkdir(parents=True, exist_ok=True)
            part = data.filter(mask)
            if table == "image_embeddings":
                part = part.select("sample_id", "embedding")
            part.write_parquet(folder / f"{shard}.parquet")
    return layout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    layout = write_world(home)
    tables = {
        "manifest": layout.manifest,
        "attributes": layout.attributes,
        "losses": shard_glob(layout.shard_dir("per_sample_losses")),
        "embeddings": shard_glob(layout.shard_dir("image_embeddings")),
    }
    return layout, tables


@pytest.fixture()
def con():
    connection = connect(None)
    yield connection
    connection.close()


def _long(layout: Layout) -> pl.DataFrame:
    return pl.read_parquet(layout.attributes).unpivot(
        index="sample_id", variable_name="attribute", value_name="value"
    )


def test_attributes_long_row_count_and_values(world, con):
    layout, tables = world
    got = run_sql(con, "attributes_long", NAMES, tables)
    assert got.height == N * 40
    assert set(got["attribute"].unique()) == set(CELEBA_ATTRIBUTES)
    expected = _long(layout)
    joined = got.join(expected, on=["sample_id", "attribute"], suffix="_expected")
    assert joined.height == N * 40
    assert (joined["value"] == joined["value_expected"]).all()


def test_attribute_counts_by_split_matches_polars(world, con):
    layout, tables = world
    got = run_sql(con, "attribute_counts_by_split", NAMES, tables)
    manifest = pl.read_parquet(layout.manifest).select("sample_id", "split")
    expected = (
        _long(layout)
        .join(manifest, on="sample_id")
        .group_by("attribute", "split")
        .agg(
            pl.len().alias("n_expected"),
            pl.col("value").sum().alias("positive_expected"),
            pl.col("value").mean().alias("rate_expected"),
        )
    )
    assert got.height == 40 * 3
    joined = got.join(expected, on=["attribute", "split"])
    assert joined.height == 120
    assert (joined["n"] == joined["n_expected"]).all()
    assert (joined["n_positive"] == joined["positive_expected"]).all()
    np.testing.assert_allclose(joined["rate"], joined["rate_expected"])


def _expected_group_metrics(layout: Layout, split: str) -> pl.DataFrame:
    losses = pl.read_parquet(layout.shard_dir("per_sample_losses") / "*.parquet")
    return (
        _long(layout)
        .join(losses.filter(pl.col("split") == split), on="sample_id")
        .group_by("attribute", "value")
        .agg(
            pl.len().alias("n_e"),
            pl.col("loss").mean().alias("loss_e"),
            pl.col("loss").var(ddof=1).alias("var_e"),
            pl.col("correct").cast(pl.Float64).mean().alias("acc_e"),
            pl.col("true_class_auroc").mean().alias("auroc_e"),
        )
    )


@pytest.mark.parametrize("split", ["test", "valid"])
def test_group_metrics_matches_polars(world, con, split):
    layout, tables = world
    got = run_sql(con, "group_metrics", {**NAMES, "split": split}, tables)
    expected = _expected_group_metrics(layout, split)
    joined = got.join(expected, on=["attribute", "value"])
    assert joined.height == got.height == expected.height
    assert (joined["n"] == joined["n_e"]).all()
    for a, b in (("mean_loss", "loss_e"), ("accuracy", "acc_e"), ("auroc", "auroc_e")):
        np.testing.assert_allclose(joined[a], joined[b], rtol=1e-12)
    np.testing.assert_allclose(
        joined["loss_variance"].fill_null(np.nan), joined["var_e"].fill_null(np.nan), rtol=1e-9
    )
    n_split = pl.read_parquet(layout.manifest).filter(pl.col("split") == split).height
    per_attribute = got.group_by("attribute").agg(pl.col("n").sum())
    assert (per_attribute["n"] == n_split).all()


def test_split_parameter_is_used(world, con):
    _, tables = world
    test = run_sql(con, "group_metrics", {**NAMES, "split": "test"}, tables)
    train = run_sql(con, "group_metrics", {**NAMES, "split": "train"}, tables)
    none = run_sql(con, "group_metrics", {**NAMES, "split": "no-such-split"}, tables)
    assert test["n"].sum() != train["n"].sum()
    assert none.height == 0
    # only the listed attribute columns are used
    two = run_sql(con, "attributes_long", {"attribute_names": ["Male", "Young"]}, tables)
    assert set(two["attribute"]) == {"Male", "Young"} and two.height == 2 * N


def test_pair_cells_and_frequent_pairs(world, con):
    layout, tables = world
    params = {
        **NAMES,
        "split": "test",
        "first": ["Male", "Young"],
        "second": ["Eyeglasses", "Male"],
    }
    cells = run_sql(con, "pair_cells", params, tables)
    n_test = pl.read_parquet(layout.manifest).filter(pl.col("split") == "test").height
    sums = cells.group_by("attribute_a", "attribute_b").agg(pl.col("n").sum())
    assert sorted(sums["n"].to_list()) == [n_test, n_test]
    attributes = pl.read_parquet(layout.attributes)
    test_ids = pl.read_parquet(layout.manifest).filter(pl.col("split") == "test")["sample_id"]
    test_attributes = attributes.filter(pl.col("sample_id").is_in(test_ids.implode()))
    both = test_attributes.filter(pl.col("Male") & pl.col("Eyeglasses")).height
    row = cells.filter(
        (pl.col("attribute_a") == "Male") & pl.col("value_a") & pl.col("value_b")
        & (pl.col("attribute_b") == "Eyeglasses")
    )  # fmt: skip
    assert row["n"].to_list() == ([both] if both else [])

    top = run_sql(con, "frequent_pairs", {**NAMES, "split": "test", "k": 5}, tables)
    counts = {
        (a, b): int((test_attributes[a] & test_attributes[b]).sum())
        for a, b in itertools.combinations(sorted(CELEBA_ATTRIBUTES), 2)
    }
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5]
    got = [((r["attribute_a"], r["attribute_b"]), r["n_both"]) for r in top.iter_rows(named=True)]
    assert got == expected


def test_eval_join_and_zero_shot_inputs(world, con):
    layout, tables = world
    joined = run_sql(con, "eval_join", {**NAMES, "split": "test"}, tables)
    n_test = pl.read_parquet(layout.manifest).filter(pl.col("split") == "test").height
    assert joined.height == n_test
    assert {"loss", "identity", "true_class_auroc", *CELEBA_ATTRIBUTES} <= set(joined.columns)
    inputs = run_sql(con, "zero_shot_inputs", {**NAMES, "split": "test"}, tables)
    assert inputs["sample_id"].to_list() == joined["sample_id"].to_list()
    assert inputs["embedding"].list.len().unique().to_list() == [8]


def test_quote_identifier_accepts_only_known_names():
    assert quote_identifier("Male", CELEBA_ATTRIBUTES) == '"Male"'
    assert quote_identifier("5_o_Clock_Shadow", CELEBA_ATTRIBUTES) == '"5_o_Clock_Shadow"'
    for bad in ("Male; DROP TABLE x", 'Male"', "male", "", None, "sample_id"):
        with pytest.raises(SqlError, match="not an allowed column name"):
            quote_identifier(bad, CELEBA_ATTRIBUTES)  # type: ignore[arg-type]
    assert quote_identifier("sample_id", allowed={"sample_id"}) == '"sample_id"'


def test_load_sql_names_and_errors(con, world):
    _, tables = world
    assert "UNPIVOT" in load_sql("attributes_long")
    assert (sql_dir() / "group_metrics.sql").is_file()
    for bad in ("../pyproject", "group_metrics.sql", "Group", "a/b"):
        with pytest.raises(SqlError, match="plain word"):
            load_sql(bad)
    with pytest.raises(SqlError, match=r"does not exist; available queries: .*group_metrics"):
        load_sql("no_such_query")
    with pytest.raises(SqlError, match=r"group_metrics.sql needs parameter\(s\) \$split"):
        run_sql(con, "group_metrics", NAMES, tables)
    with pytest.raises(SqlError, match=r"no Parquet file matches .*nowhere"):
        run_sql(con, "read_table", tables={"path": "/nowhere/*.parquet"})
    with pytest.raises(SqlError, match="does not exist"):
        run_sql(con, "read_table", tables={"path": "/nowhere/x.parquet"})
    with pytest.raises(SqlError, match="both as a value and a table"):
        run_sql(con, "read_table", {"path": "x"}, {"path": tables["manifest"]})


def test_values_are_bound_not_pasted(world, con):
    _, tables = world
    # a hostile split value is just a string that matches nothing
    hostile = "test' OR '1'='1"
    got = run_sql(con, "group_metrics", {**NAMES, "split": hostile}, tables)
    assert got.height == 0
    hostile_names = ["Male; DROP TABLE x", "Male"]
    got = run_sql(con, "attributes_long", {"attribute_names": hostile_names}, tables)
    assert set(got["attribute"]) == {"Male"}


def test_connect_disables_python_replacement_scans(con):
    manifest = pl.DataFrame({"a": [1]})  # noqa: F841 - must not be visible to SQL
    with pytest.raises(duckdb.Error):
        con.sql("SELECT * FROM manifest").fetchall()


def test_publish_views_fresh_connection(world, tmp_path):
    layout, _ = world
    reports = tmp_path / "reports"
    reports.mkdir()
    pl.DataFrame({"attribute": list(CELEBA_ATTRIBUTES), "gap": [0.1] * 40}).write_parquet(
        reports / "attribute_disparity.parquet"
    )
    db = tmp_path / "out" / "llm2loss.duckdb"
    result = publish_views(db, layout, reports_dir=reports)
    assert result.db_path == db and db.is_file()
    assert {"manifest", "attributes", "attributes_long", "per_sample_losses"} <= set(result.views)
    assert {"pair_disparity", "member_metrics", "correlations"} <= set(result.skipped)
    assert all(os.path.isabs(path) for path in result.views.values())
    assert sorted(p.name for p in db.parent.iterdir()) == ["llm2loss.duckdb"]  # no temp left

    fresh = duckdb.connect(str(db), read_only=True)
    try:
        count = lambda view: fresh.execute(f"SELECT count(*) FROM {view}").fetchone()[0]  # noqa: E731
        assert count("manifest") == N
        assert count("attributes") == N
        assert count("attributes_long") == N * 40
        assert count("per_sample_losses") == N
        assert count("image_embeddings") == N
        assert count("attribute_disparity") == 40
        by_split = dict(fresh.execute("SELECT split, count(*) FROM manifest GROUP BY 1").fetchall())
    finally:
        fresh.close()
    expected = pl.read_parquet(layout.manifest)["split"].value_counts()
    assert by_split == dict(expected.iter_rows())

    # republishing replaces the file and picks up new inputs
    pl.DataFrame({"pair": ["A & B"]}).write_parquet(reports / "pair_disparity.parquet")
    again = publish_views(db, layout, reports_dir=reports)
    assert "pair_disparity" in again.views
    fresh = duckdb.connect(str(db), read_only=True)
    try:
        assert fresh.execute("SELECT count(*) FROM pair_disparity").fetchone()[0] == 1
    finally:
        fresh.close()
