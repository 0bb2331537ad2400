"""A table dataset that is not CelebA-shaped runs the whole graph (issue 19, item 5).

The tiny world of configs/tiny.yaml, exported as a Parquet manifest a user could have written:
other names for a subset of its attributes (glasses, smile as 0/1, man as -1/1, hat, beard), a
text column expanded one-hot (hair), a `person` group column, and a label that is not the identity
(the age group, whose attribute is left out), diagnosed with `task: {kind: label}` and a probes
file for two of the attributes (the others are phrased from their names, and the report says so).
"""

from __future__ import annotations

import json

import dagster as dg
import duckdb
import polars as pl
import pytest
from safetensors import safe_open

from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
from llm2loss_pipeline.core.config import DatasetConfig, load_config, validate_config
from llm2loss_pipeline.core.encoder.text_index import TEXT_INDEX_DIR
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs
from llm2loss_pipeline.core.steps.data import apply_split_mode
from llm2loss_pipeline.core.world import generate_world
from llm2loss_pipeline.defs.runner import run_pipeline
from tests.test_pipeline_e2e import TINY, _shards

pytestmark = pytest.mark.slow

ATTRIBUTES = [
    "glasses",
    "smile",
    "man",
    "hat",
    "beard",
    "hair_black",
    "hair_blond",
    "hair_gray",
    "hair_other",
]
BUILT = ["smile", "man", "beard", "hair_black", "hair_blond", "hair_gray", "hair_other"]
PROBES = """\
glasses:
  positive: ["wearing:glasses", "with:spectacles"]
  negative: ["without:glasses"]
hat:
  positive: ["wearing a hat"]
  negative: ["bareheaded"]
"""


def export_world(folder, world) -> None:
    """The world as one Parquet manifest in a user's own words (see the module docstring)."""
    root = folder / "world"
    generate_world(world, root)
    tables = read_celeba(root)
    manifest = apply_split_mode(build_manifest(tables, 1024), DatasetConfig())
    a = tables.attributes
    hair = (
        pl.when(a["Black_Hair"])
        .then(pl.lit("black"))
        .when(a["Blond_Hair"])
        .then(pl.lit("blond"))
        .when(a["Gray_Hair"])
        .then(pl.lit("gray"))
        .otherwise(pl.lit("other"))
    )
    table = manifest.select(
        "sample_id",
        pl.format("world/img_align_celeba/{}", "sample_id").alias("file"),
        "split",
        pl.format("p{}", "identity").alias("person"),
    ).join(
        a.select(
            "sample_id",
            pl.when(pl.col("Young")).then(pl.lit("young")).otherwise(pl.lit("older")).alias("age"),
            pl.col("Eyeglasses").alias("glasses"),
            pl.col("Smiling").cast(pl.Int64).alias("smile"),
            pl.when(pl.col("Male")).then(1).otherwise(-1).alias("man"),
            pl.col("Wearing_Hat").alias("hat"),
            (~pl.col("No_Beard")).alias("beard"),
            hair.alias("hair"),
        ),
        on="sample_id",
    )
    table.write_parquet(folder / "faces.parquet")
    (folder / "probes.yaml").write_text(PROBES)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    tiny = load_config(TINY)
    export_world(folder, tiny.world)
    raw = tiny.model_dump(mode="json", exclude={"world", "home", "dataset"})
    raw["home"] = str(folder / "home")
    raw["dataset"] = {
        "table_path": "faces.parquet",  # source: table, inferred
        "path_column": "file",
        "label_column": "age",
        "group_column": "person",
        "probes_path": "probes.yaml",
        "shard_size": 128,
    }
    raw["task"] = {"kind": "label"}
    config = validate_config(raw, base_dir=folder)
    instance = dg.DagsterInstance.ephemeral()
    outcome = run_pipeline(config, instance=instance)
    return config, instance, Layout(folder.joinpath("home").resolve()), outcome


def test_the_data_step_reads_the_table(table_run) -> None:
    _, instance, layout, _ = table_run
    manifest = pl.read_parquet(layout.manifest)
    assert manifest.columns == ["sample_id", "index", "path", "split", "identity", "shard", "label"]
    assert set(manifest["label"].unique()) == {0, 1}  # older, young: sorted order
    event = instance.get_latest_materialization_event(dg.AssetKey("dataset_manifest"))
    assert event.asset_materialization.metadata["label_values"].value == ["older", "young"]
    assert manifest["identity"].n_unique() == 20  # the person column, the clusters
    attribute_set = json.loads((layout.tables / "attribute_set.json").read_text())
    assert attribute_set["attributes"] == attribute_set["diagnosed"] == ATTRIBUTES
    sources = {name: entry["source"] for name, entry in attribute_set["phrasings"].items()}
    assert sorted(n for n, s in sources.items() if s == "built") == sorted(BUILT)
    assert sources["glasses"] == sources["hat"] == "file"


def test_the_black_box_learns_the_label_column(table_run) -> None:
    _, _, layout, _ = table_run
    manifest = pl.read_parquet(layout.manifest)
    losses = _shards(layout, "per_sample_losses")
    joined = losses.join(
        manifest.select("sample_id", pl.col("label").alias("want")), on="sample_id"
    )
    assert joined.height == manifest.height
    assert (joined["label"] == joined["want"]).all()
    assert losses["loss"].is_finite().all()


def test_the_report_speaks_the_tables_attributes(table_run) -> None:
    _, instance, layout, outcome = table_run
    table = pl.read_parquet(layout.reports / "attribute_disparity.parquet")
    assert table["attribute"].to_list() == ATTRIBUTES
    headline = json.loads((layout.reports / "headline.json").read_text())
    assert headline["n_attributes"] == len(ATTRIBUTES)
    assert headline["n_built_phrasings"] == len(BUILT)
    html = (layout.reports / "report.html").read_text()
    summary = html.split("<ul class='headline'>")[1].split("</ul>")[0]
    assert "7 attribute(s) are asked about in words built from their column names" in summary
    assert "smile, man, beard, hair_black" in summary
    assert "Eyeglasses" not in html and "Blond_Hair" not in html
    # each group estimated from text too: the text puts every test image on one side of each
    # attribute, and one declared group is named the estimated worst, in the headline
    groups = pl.read_parquet(layout.reports / "groups.parquet")
    sides = groups.group_by("attribute").agg(pl.col("est_n").sum())["est_n"].unique().to_list()
    assert sides == [headline["n_eval_samples"]]
    assert groups["est_loss"].is_not_null().all() and groups["est_worst"].sum() == 1
    assert headline["worst_group_estimated_agrees"] in (0.0, 1.0)
    assert "worst groups estimated from text, without the attribute&#x27;s labels" in summary
    assert sorted(groups["est_rank"].drop_nulls()) == list(range(1, groups["est_rank"].count() + 1))
    # the probes file's words reached every step that phrases: the encoder step seeds the home's
    # text index with its prompts and the report adds its own. Only the file says "spectacles"
    # or "bareheaded", and no step asked with the words built from those two names
    (index,) = layout.home.joinpath(*TEXT_INDEX_DIR).glob("*.safetensors")
    with safe_open(str(index), framework="numpy") as handle:
        texts = set(json.loads(handle.metadata()["texts"]))
    assert any("spectacles" in t for t in texts) and any("bareheaded" in t for t in texts)
    built = {pair[0] for name in ("glasses", "hat") for pair in attribute_prompt_pairs(name)}
    assert not built & texts, sorted(built & texts)[:3]
    with duckdb.connect(str(layout.duckdb), read_only=True) as con:
        names = {
            row[0]
            for row in con.execute("SELECT DISTINCT attribute FROM attributes_long").fetchall()
        }
        assert names == set(ATTRIBUTES)
        assert con.execute("SELECT count(*) FROM attribute_disparity").fetchone()[0] == 9
    checks = {
        record.event_log_entry.dagster_event.event_specific_data.check_name: (
            record.event_log_entry.dagster_event.event_specific_data.metadata
        )
        for run in outcome.runs
        for record in instance.get_records_for_run(
            run_id=run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
    }
    # every attribute of the table has its row (at this size a leave-one-out calibration may
    # have no slope, whose NaNs the check reports: not what this test is about)
    complete = checks["report_is_complete"]
    assert complete["rows"].value == len(ATTRIBUTES) and complete["missing"].value == 0


def test_discovery_describes_samples_by_the_tables_attributes(table_run) -> None:
    _, _, layout, _ = table_run
    hypotheses = pl.read_parquet(layout.reports / "failure_hypotheses.parquet")
    stated = {
        part.strip().removeprefix("not ")
        for text in hypotheses["attributes"].drop_nulls()
        for part in text.split(",")
        if part.strip()
    }
    assert stated and stated <= set(ATTRIBUTES), stated
