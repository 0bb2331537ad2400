"""failure_hypotheses materialized on the tiny world, then asked for from the CLI and the API."""

from __future__ import annotations

import json
import os

import dagster as dg
import duckdb
import polars as pl
import pytest

from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.defs.report.discovery import failure_hypotheses
from llm2loss_pipeline.defs.resources import build_resources
from tests import fault_helpers as fh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config, reference = fh.reference_home()
    models = ("encoder", "heads", "per_sample_losses", "image_embeddings")
    layout = fh.clone_home(reference, tmp_path_factory.mktemp("discovery") / "home", models)
    with fh.one_thread():
        result = dg.materialize(
            [failure_hypotheses],
            resources=build_resources(config.model_copy(update={"home": str(layout.home)})),
        )
    assert result.success
    return layout, result


def test_the_asset_writes_the_ranked_table_evidence_sheets_and_views(home) -> None:
    layout, result = home
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["n_candidates"].value > 40
    top = metadata["top_hypotheses"].value
    assert "| True |" not in top and "| None |" not in top
    table = pl.read_parquet(layout.reports / "failure_hypotheses.parquet")
    assert table.height == metadata["n_candidates"].value
    assert table["rank"].to_list() == list(range(1, table.height + 1))
    kept = table.filter(pl.col("kept"))
    assert metadata["n_kept"].value == kept.height
    # kept on its matched samples, or on the labels alone: its images show its words and the
    # people they name are worse at the family-wise level alpha / candidates
    alone = (kept["q_value"] > 0.05) | (kept["measured_gap"] <= 0)
    on_samples = kept.filter(~alone)
    # the tiny home has a report: the estimate is compare's, gated at min_p_worse
    assert (on_samples["p_worse"] >= DiscoveryConfig().min_p_worse).all()
    on_labels = kept.filter(alone)
    assert (on_labels["labelled_p"] <= 0.05 / table.height).all()
    assert (on_labels["wording"] == "supported").all() and (on_labels["labelled_gap"] > 0).all()
    heads = on_labels.filter(pl.col("verdict") == "mode")["reason"]
    assert heads.str.starts_with("kept on the labels: its images show its words").all()
    assert kept["rank"].to_list() == list(range(1, kept.height + 1))  # kept ones come first
    modes = table.filter(pl.col("verdict") == "mode")
    assert metadata["n_modes"].value == modes.height
    # the tiny world may have no mode at all: then the table says it is empty
    assert ("| rank | mode | verdict | shown_as |" in top) == (modes.height > 0)
    assert modes["rank"].to_list() == list(range(1, modes.height + 1))  # modes lead
    assert modes["mode"].to_list() == list(range(1, modes.height + 1))
    assert int(modes["n_variants"].sum()) == kept.height - modes.height
    assert set(table.filter(pl.col("verdict") == "folded")["folded_under"]) <= set(
        modes["description"]
    )
    assert table["reason"].null_count() == 0
    # the tiny world has labels: every kept description's words are checked against them
    assert set(kept["wording"]) <= {"supported", "reworded", "words not supported by the images"}
    evidence = pl.read_parquet(layout.reports / "failure_evidence.parquet")
    assert set(evidence["rank"]) <= set(kept["rank"])
    sheets = sorted((layout.reports / "discovery").glob("hypothesis-*.png"))
    assert len(sheets) == min(5, modes.height)
    html = (layout.reports / "discovery.html").read_text()
    assert "Failure discovery" in html and html.count("data:image/png;base64,") == len(sheets)
    assert 'href="report.html"' in html
    with duckdb.connect(str(layout.duckdb), read_only=True) as con:
        (count,) = con.execute("SELECT count(*) FROM failure_hypotheses").fetchone()
        assert count == table.height
        con.execute("SELECT sample_id, influence FROM failure_evidence").fetchall()
        con.execute("SELECT count(*) FROM per_sample_losses").fetchall()  # the report's views too
    shared = metadata["shared_by_modes"].value  # what most modes' images show, or "(none)"
    assert shared == "(none)" or (modes.height >= 3 and shared.startswith("- "))
    assert not fh.leftovers(layout.home)


def test_cli_discover_prints_json_and_a_table(home, capsys, tmp_path) -> None:
    from llm2loss_pipeline.cli import main

    layout, _ = home
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("face of a person wearing eyeglasses and a hat\n")
    with fh.one_thread():
        assert (
            main(
                [
                    "discover",
                    "--home",
                    str(layout.home),
                    "--top",
                    "3",
                    "--json",
                    "--vocab",
                    str(vocab),
                ]
            )
            == 0
        )
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == min(3, out["n_modes"]) and out["n_candidates"] > 40
    assert all(row["verdict"] == "mode" for row in out["results"])
    for trait in out["shared"]:  # values most modes share: at least three, of the modes there are
        assert 3 <= len(trait["modes"]) <= out["n_modes"] and trait["sentence"]
        assert set(trait["modes"]) <= set(range(1, out["n_modes"] + 1))
    (mine,) = out["vocabulary"]  # the user's line is always there, with its verdict and reason
    assert mine["description"] == "face of a person wearing eyeglasses and a hat"
    assert mine["verdict"] in ("mode", "folded", "dropped", "off-domain") and mine["reason"]
    with fh.one_thread():
        args = ["discover", "--home", str(layout.home), "--vocab", str(vocab)]
        assert main([*args, "--top", "2"]) == 0
        text = capsys.readouterr().out
        assert "distinct failure modes" in text and "your vocabulary (1):" in text
        assert "kept only when the heads' estimate and the matched samples both say" in text
        assert main([*args, "--only-vocab"]) == 0
    text = capsys.readouterr().out
    assert "distinct failure modes" not in text
    assert "face of a person wearing eyeglasses and a hat" in text


def test_cli_discover_errors_are_one_clear_line(home, capsys, tmp_path) -> None:
    from llm2loss_pipeline.cli import main

    layout, _ = home
    assert main(["discover", "--home", str(tmp_path / "empty")]) == 2
    assert "run `llm2loss run`" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with fh.one_thread():
        assert main(["discover", "--home", str(layout.home), "--vocab", str(empty)]) == 2
    assert f"{empty}: the vocabulary file has no description" in capsys.readouterr().err
    assert main(["discover", "--home", str(layout.home), "--top", "0"]) == 2


def test_diagnoser_discover_returns_the_ranked_table(home) -> None:
    from llm2loss_pipeline import Diagnoser

    layout, _ = home
    diagnoser = Diagnoser.load(layout.home)
    with fh.one_thread():
        report = diagnoser.discover(top=4, vocab=["face of a person wearing eyeglasses"])
    assert report.table.height == 4 and report.table["rank"].to_list() == [1, 2, 3, 4]
    assert set(report.evidence["rank"]) <= set(report.kept["rank"])
    assert report.n_candidates > 40
    with pytest.raises(ValueError, match="vocabulary entry 1 is empty"):
        diagnoser.discover(vocab=["  "])
    with pytest.raises(ValueError, match="top must be at least 1"):
        diagnoser.discover(top=0)
    bare = Layout.at(layout.home.parent / "bare")
    with pytest.raises(Exception, match="not materialized yet; run `llm2loss run`"):
        diagnoser.discover(home=bare.home)


OFF_DOMAIN = ("face of a cat", "a photo of a car", "a spaceship in orbit")
IN_DOMAIN = ("a person with gray hair", "face of an elderly man with a white beard")


def test_off_domain_vocabulary_is_reported_and_paraphrases_are_not(home) -> None:
    """Issue 18, item 3, on the tiny face world: the rule of core/discovery/modes.py, whose
    statistic (the share of the text's direction the attribute probes span) is a property of the
    wording, pinned on the frozen sentence model every world's encoder carries."""
    from llm2loss_pipeline import Diagnoser

    layout, _ = home
    diagnoser = Diagnoser.load(layout.home)
    with fh.one_thread():
        report = diagnoser.discover(top=None, vocab=[*OFF_DOMAIN, *IN_DOMAIN])
    rows = {
        row["description"]: row for row in report.table.to_dicts() if row["source"] == "vocabulary"
    }
    assert set(rows) == {*OFF_DOMAIN, *IN_DOMAIN}
    for text in OFF_DOMAIN:
        assert rows[text]["verdict"] == "off-domain" and not rows[text]["kept"], text
        assert rows[text]["probe_share"] < 0.55, (text, rows[text]["probe_share"])
        assert "off-domain: describes little the labelled attributes" in rows[text]["reason"]
    for text in IN_DOMAIN:
        assert rows[text]["verdict"] != "off-domain", (text, rows[text]["reason"])
        assert rows[text]["probe_share"] > 0.65, (text, rows[text]["probe_share"])
    # the attribute probes themselves are not judged by it
    attribute = report.table.filter(report.table["source"] == "attribute")
    assert "off-domain" not in set(attribute["verdict"])
