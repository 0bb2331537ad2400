"""The whole graph on the tiny world, materialized in-process through a Dagster instance.

One module-scoped run (configs/tiny.yaml) serves every assertion; the lineage test at the end
re-materializes single assets on the same instance, so it runs last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import sha256_file
from llm2loss_pipeline.definitions import ASSETS, build_definitions
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.runner import run_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = load_config(TINY).model_copy(update={"home": str(home)})
    instance = dg.DagsterInstance.ephemeral()
    messages: list[str] = []
    outcome = run_pipeline(config, instance=instance, on_message=messages.append)
    return config, instance, Layout(home.resolve()), outcome, messages


def _shards(layout: Layout, table: str) -> pl.DataFrame:
    return pl.concat(
        [pl.read_parquet(path) for path in sorted(layout.shard_dir(table).glob("*.parquet"))]
    )


def test_every_stage_ran_and_progress_was_logged(tiny) -> None:
    _, instance, _, outcome, messages = tiny
    stages = [run.stage for run in outcome.runs]
    n_shards = len(instance.get_dynamic_partitions(SHARDS.name))
    assert n_shards >= 2
    assert stages == ["prepare"] + ["signals"] * n_shards + ["diagnose"]
    assert any("black box training" in message for message in messages)
    assert any("encoder training" in message for message in messages)


def test_tables_cover_the_manifest(tiny) -> None:
    _, _, layout, _, _ = tiny
    manifest = pl.read_parquet(layout.manifest)
    losses = _shards(layout, "per_sample_losses")
    embeddings = _shards(layout, "image_embeddings")
    assert losses.height == manifest.height == embeddings.height
    assert set(losses["sample_id"]) == set(manifest["sample_id"])
    assert losses.columns == [
        "sample_id",
        "split",
        "label",
        "loss",
        "predicted",
        "correct",
        "p_true",
        "true_class_auroc",
    ]
    assert losses["loss"].is_finite().all()
    by_split = dict(losses.group_by("split").agg(pl.col("loss").mean()).iter_rows())
    assert by_split["train"] < by_split["valid"]
    assert by_split["train"] < by_split["test"]


def test_embeddings_are_normalised_with_the_recorded_dimension(tiny) -> None:
    _, _, layout, _, _ = tiny
    matrix = _shards(layout, "image_embeddings")["embedding"].to_numpy()
    sidecar = json.loads((layout.encoder_dir / "encoder.json").read_text())
    assert matrix.dtype == np.float32
    assert matrix.shape[1] == sidecar["embed_dim"]
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


def test_checkpoints_load_back_and_reproduce_outputs(tiny) -> None:
    from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box
    from llm2loss_pipeline.core.device import DeviceSpec
    from llm2loss_pipeline.core.encoder import embed_images, load_encoder

    _, _, layout, _, _ = tiny
    manifest = pl.read_parquet(layout.manifest).head(8)
    items = list(zip(manifest["sample_id"], manifest["path"], strict=True))
    encoder = load_encoder(layout.encoder_dir)
    again = embed_images(encoder, items, DeviceSpec(device="cpu"))
    stored = _shards(layout, "image_embeddings").filter(pl.col("sample_id").is_in(again.sample_ids))
    stored = stored.sort("sample_id")["embedding"].to_numpy()
    np.testing.assert_allclose(again.embeddings, stored, atol=1e-6)
    loaded = load_black_box(layout.black_box)
    assert loaded.meta["num_classes"] == pl.read_parquet(layout.manifest)["identity"].n_unique()


def test_heads_and_report(tiny) -> None:
    _, _, layout, _, _ = tiny
    index = json.loads((layout.heads_dir / "ensemble.json").read_text())
    assert len(index["members"]) == 8  # 2 kinds x 2 archs x 2 seeds in tiny.yaml
    table = pl.read_parquet(layout.reports / "attribute_disparity.parquet")
    assert table.height == 40
    html = (layout.reports / "report.html").read_text()
    # every attribute's row shows the published group sizes
    for row in table.iter_rows(named=True):
        cells = f"<td>{row['attribute']}</td><td>{row['n_true']}</td><td>{row['n_false']}</td>"
        assert re.search(r'<tr(?: class="[^"]*")?>' + re.escape(cells), html), cells
    headline = json.loads((layout.reports / "headline.json").read_text())
    assert headline["n_attributes"] == 40
    with duckdb.connect(str(layout.duckdb), read_only=True) as con:
        count = con.execute("SELECT count(*) FROM per_sample_losses").fetchone()[0]
        assert count == pl.read_parquet(layout.manifest).height
        rows = con.execute("SELECT count(*) FROM attribute_disparity").fetchone()[0]
        assert rows == 40


def test_asset_checks_ran(tiny) -> None:
    _, instance, _, _, _ = tiny
    records = instance.get_records_for_run(
        run_id=tiny[3].runs[-1].run_id,
        of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION,
    ).records
    results = {
        record.event_log_entry.dagster_event.event_specific_data.check_name: (
            record.event_log_entry.dagster_event.event_specific_data.passed
        )
        for record in records
    }
    assert {"report_is_complete", "report_group_sizes", "heads_validation_floor"} <= set(results)
    assert results["report_is_complete"] is True
    # The tiny world is too small for the other two to pass (planted_tiny.yaml is the world where
    # every check passes, tests/test_planted_e2e.py): each warns exactly when its condition holds.
    from llm2loss_pipeline.core.steps.diagnosis import read_kind_metrics

    config, _, layout, _, _ = tiny
    table = pl.read_parquet(layout.reports / "attribute_disparity.parquet")
    assert results["report_group_sizes"] == (not table["small_group"].any())
    floor = config.report.head_spearman_floor
    spearman = [row["ensemble_spearman"] for row in read_kind_metrics(layout)]
    assert spearman and results["heads_validation_floor"] == all(s >= floor for s in spearman)


def test_cli_compare_and_rank_on_the_materialized_home(tiny) -> None:
    _, _, layout, _, _ = tiny
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "llm2loss_pipeline.cli"]
    done = subprocess.run(
        [
            *cli,
            "compare",
            "face of an old man",
            "face of a young woman",
            "--home",
            str(layout.home),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)["results"]
    # the CLI says what the Python API says on the same home, member by member
    from llm2loss_pipeline import Diagnoser

    diagnoser = Diagnoser.load(str(layout.home), device="cpu")
    expected = diagnoser.compare("face of an old man", "face of a young woman")
    diffs = np.array([member["diff"] for member in result["members"]])
    np.testing.assert_allclose(diffs, expected.diffs, rtol=1e-5, atol=1e-6)
    assert len(diffs) == 8
    assert result["p_a_worse"] == pytest.approx(expected.p_a_worse, abs=1e-9)
    assert result["verdict"] == expected.verdict
    share = float(np.mean((diffs > 0) + 0.5 * (diffs == 0)))
    assert result["members_a_worse"] == pytest.approx(share)
    for group, stats in result["groups"].items():
        members = [m["diff"] for m in result["members"] if group in ("overall", m["kind"])]
        assert stats["n"] == len(members) and stats["mean"] == pytest.approx(np.mean(members))
    texts = ["face of a person wearing eyeglasses", "face of a smiling person", "face of a child"]
    ranked = subprocess.run(
        [*cli, "rank", "--file", "-", "--home", str(layout.home), "--json"],
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ranked.returncode == 0, ranked.stderr
    rows = json.loads(ranked.stdout)["results"]
    in_process = diagnoser.rank(texts)
    assert [row["text"] for row in rows] == [row["text"] for row in in_process]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    means = [row["mean"] for row in rows]
    assert means == sorted(means, reverse=True)
    np.testing.assert_allclose(means, [row["mean"] for row in in_process], rtol=1e-5, atol=1e-6)
    # the report is built, so rank answers as compare does: two texts ranked are one comparison
    assert json.loads(ranked.stdout)["calibrated"] is True
    assert [row["p_worse"] for row in rows] == pytest.approx(
        [row["p_worse"] for row in in_process], abs=1e-6
    )
    pair = ["face of an old man", "face of a young woman"]
    by_text = {row["text"]: row for row in diagnoser.rank(pair)}
    assert by_text["face of an old man"]["p_worse"] == pytest.approx(expected.p_a_worse, abs=1e-6)
    assert by_text["face of a young woman"]["p_worse"] == pytest.approx(
        1 - expected.p_a_worse, abs=1e-6
    )
    empty = subprocess.run(
        [*cli, "compare", "", "face", "--home", str(layout.home)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert empty.returncode == 2 and "empty" in empty.stderr.lower()


def test_rerunning_a_shard_is_byte_identical(tiny) -> None:
    config, instance, layout, _, _ = tiny
    key = instance.get_dynamic_partitions(SHARDS.name)[0]
    before = {
        table: sha256_file(layout.shard_table(table, key))
        for table in ("per_sample_losses", "image_embeddings")
    }
    run_pipeline(config, ["signals"], shards=[key], instance=instance)
    after = {table: sha256_file(layout.shard_table(table, key)) for table in before}
    assert after == before


def test_lineage_black_box_stales_losses_not_embeddings(tiny) -> None:
    config, instance, _, _, _ = tiny
    key = instance.get_dynamic_partitions(SHARDS.name)[0]

    def status(asset: str, partition: str | None = None) -> StaleStatus:
        resolver = get_stale_status_resolver(instance, ASSETS)
        return resolver.get_status(dg.AssetKey(asset), partition)

    assert status("per_sample_losses", key) == StaleStatus.FRESH
    assert status("image_embeddings", key) == StaleStatus.FRESH

    def rematerialize(base, section: str, seed: int, asset: str):
        """`base` with a new seed in one section, and `asset` materialized under it."""
        changed = base.model_copy(
            update={section: getattr(base, section).model_copy(update={"seed": seed})}
        )
        build_definitions(changed).resolve_job_def("prepare").execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(asset)]
        )
        return changed

    retrained = rematerialize(config, "black_box", 11, "black_box_model")
    assert status("per_sample_losses", key) == StaleStatus.STALE
    assert status("image_embeddings", key) == StaleStatus.FRESH

    run_pipeline(retrained, ["signals"], instance=instance)
    assert status("per_sample_losses", key) == StaleStatus.FRESH
    rematerialize(retrained, "encoder", 5, "semantic_encoder")
    assert status("image_embeddings", key) == StaleStatus.STALE
    assert status("per_sample_losses", key) == StaleStatus.FRESH
