"""The report as a person reads it (issue 21, items 3 and 4): tables in the order the text names
them, a Table 4 that fits a 1400 px window, a bar chart coloured by the claim, a scatter whose
labels do not pile up, small pair cells marked, default pairs that include the attribute measured
worst, and Dagster metadata as tables and file links instead of markdown and base64.

Built on the planted world of test_report (Eyeglasses and Wearing_Hat cost loss; Bald is rare).
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.report import plots
from llm2loss_pipeline.core.report.intersectional import frequent_pairs
from llm2loss_pipeline.core.report.measured import EvalInputs
from llm2loss_pipeline.core.sql import connect
from tests.test_report import RARE, FakeScorer, run, write_planted_world

# an attribute of rate 0.15 (index 0 mod 5), so it is in none of the most frequent pairs
HIDDEN_WORST = CELEBA_ATTRIBUTES[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    layout = write_planted_world(home)
    result = run(layout, home / "reports", n_pairs=4)
    return layout, result, result.files["report_html"].read_text()


def _table_after(page: str, marker: str) -> str:
    start = page.index(marker)
    return page[page.index("<table>", start) : page.index("</table>", start)]


def _headers(table: str) -> list[str]:
    return re.findall(r"<th>(.*?)</th>", table)


def test_tables_appear_in_the_order_the_text_names_them(built):
    _, _, page = built
    headings = [page.index(f"<h2 id='table{k}'>Table {k}:") for k in (1, 2, 3, 4)]
    assert headings == sorted(headings)
    first_mentions = [page.index(f"Table {k}") for k in (1, 2, 3, 4)]
    assert first_mentions == sorted(first_mentions)
    # the contents list names them, linked, before any table
    assert page.index("<a href='#table1'>") < page.index("<table>")


def test_table4_scrolls_in_its_own_box_with_the_attribute_frozen(built):
    _, result, page = built
    style = page[page.index("<style>") : page.index("</style>")]
    assert re.search(r"\.scroll \{[^}]*overflow-x: auto", style)
    assert re.search(
        r"\.scroll td:first-child, \.scroll th:first-child \{[^}]*position: sticky; left: 0", style
    )
    after = page[page.index("<h2 id='table4'>") :]
    assert after.index("<div class='scroll'><table>") < after.index("<table>") + 30
    main = _table_after(page, "<h2 id='table4'>")
    headers = _headers(main)
    assert headers[0] == "attribute" and len(headers) <= 14
    for needed in ("measured 90% interval", "Welch p", "est. gap (loss)", "est. 90% interval"):
        assert needed in headers, needed
    assert headers[-3:-1] == ["claim", "0-shot AUROC"] and "P(worse)" in headers
    # every column is still there, in the details view under it
    details = page[page.index("<details><summary>Table 4 with every column") :]
    assert "measured 90% low" in _headers(_table_after(details, "<summary>"))
    # the interval cell is the row's own numbers
    row = result.attribute_table.row(by_predicate=pl.col("attribute") == "Eyeglasses", named=True)
    interval = f"[{row['gap_loss_low']:.3f}, {row['gap_loss_high']:.3f}]"
    eyeglasses = re.search(r"<tr[^>]*><td>Eyeglasses</td>(.*?)</tr>", main).group(1)
    assert interval in eyeglasses
    assert '<td class="claim-worse">worse with</td>' in eyeglasses


def test_bar_colours_follow_the_claim(built):
    _, result, _ = built
    table = result.attribute_table
    colours = dict(zip(table["attribute"], plots.bar_colours(table), strict=True))
    claims = dict(zip(table["attribute"], table["claim"], strict=True))
    assert claims["Eyeglasses"] == "worse with"
    for name, claim in claims.items():
        assert colours[name] == plots.CLAIM_COLOURS[claim or "cannot tell"], name
    assert "cannot tell" in claims.values()
    assert len(set(colours.values())) >= 2  # colour says something: not every bar alike
    no_claims = table.drop("claim")
    assert set(plots.bar_colours(no_claims)) == {plots.CLAIM_COLOURS["cannot tell"]}


def test_scatter_states_units_and_labels_only_extremes(built, monkeypatch, tmp_path):
    _, result, _ = built
    from llm2loss_pipeline.core.members import member_groups

    figures = []
    monkeypatch.setattr(plots, "save_png", lambda figure, path: figures.append(figure) or path)
    groups = member_groups(list(FakeScorer().members))
    plots.scatter_estimated_vs_measured(
        result.attribute_table, result.attribute_estimates, groups, tmp_path / "s.png"
    )
    (figure,) = figures
    assert "different units" in figure._suptitle.get_text()
    for axes in figure.axes:
        assert "loss units" in axes.get_xlabel() and "not loss" in axes.get_ylabel()
        labels = [t.get_text() for t in axes.texts]
        assert 2 <= len(labels) <= 4 * plots.N_LABELLED < 40
        assert "Eyeglasses" in labels  # the largest on both axes
        positions = np.array([t.xy for t in axes.texts])
        span = np.ptp(positions, axis=0)
        for a in range(len(positions)):  # no two labels print over each other
            for b in range(a):
                dx, dy = np.abs(positions[a] - positions[b])
                assert dx > 0.2 * span[0] or dy > 0.05 * span[1], (labels[a], labels[b])


def test_extreme_points_are_the_top_and_bottom_of_each_axis():
    x = np.arange(10.0)
    y = np.array([5, 4, 9, 0, 3, 8, 2, 7, 1, np.nan])
    assert plots.extreme_points(x, y, k=2) == {0, 1, 7, 8, 3, 2, 5}


def test_spread_out_drops_labels_that_would_overlap():
    x = np.array([0.0, 10.0, 0.1, 5.0, -10.0])
    y = np.array([0.0, 10.0, 0.05, 5.0, -10.0])
    # 0 and 2 would print over each other; 2 is the median point, 0 is farther out: 2 goes
    assert plots.spread_out({0, 1, 2, 4}, x, y) == [0, 1, 4]
    assert plots.spread_out({0, 1, 2, 4}, x, y, gap_x=0.001) == [0, 1, 2, 4]
    assert plots.spread_out(set(), x, y) == []


def test_small_pair_cells_are_marked(tmp_path):
    layout = write_planted_world(tmp_path)
    result = run(layout, tmp_path / "reports", pairs=[("Eyeglasses", RARE), ("Eyeglasses", "Male")])
    assert result.pair_table["pair"].to_list() == [f"Eyeglasses & {RARE}", "Eyeglasses & Male"]
    rare = result.pair_table.row(0, named=True)
    assert rare["n_TT"] < result.min_group_size <= rare["n_FF"]
    page = result.files["report_html"].read_text()
    row = re.search(rf"<tr[^>]*><td>Eyeglasses &amp; {RARE}</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td( class=\"[^\"]*\")?>([^<]*)</td>", row)
    assert cells[0] == (' class="small-cell"', str(rare["n_TT"]))  # n A&B
    assert cells[3] == ("", str(rare["n_FF"]))  # n ¬A&¬B is large
    assert "td.small-cell" in page and "small cells, under" in page


def _boost_loss(layout, attribute: str, amount: float) -> None:
    """Make `attribute` the one measured worst, by far."""
    flags = pl.read_parquet(layout.attributes).select("sample_id", attribute)
    for shard in sorted(layout.shard_dir("per_sample_losses").glob("*.parquet")):
        frame = pl.read_parquet(shard).join(flags, on="sample_id", how="left")
        frame = frame.with_columns(pl.col("loss") + amount * pl.col(attribute).cast(pl.Float64))
        frame.drop(attribute).write_parquet(shard)


def test_default_pairs_include_the_attribute_measured_worst(tmp_path):
    layout = write_planted_world(tmp_path)
    inputs = EvalInputs.from_layout(layout)
    con = connect(None)
    try:
        before = frequent_pairs(con, inputs, "test", k=4)
        assert not any(HIDDEN_WORST in pair for pair in before)  # rare enough to be missed
        _boost_loss(layout, HIDDEN_WORST, 5.0)
        pairs = frequent_pairs(con, inputs, "test", k=4)
    finally:
        con.close()
    assert len(pairs) == 4 == len(set(pairs))
    assert HIDDEN_WORST in pairs[0]  # the worst attribute's pair comes first
    assert ("Eyeglasses", "Wearing_Hat") in pairs  # the most frequent pair stays
    assert all(CELEBA_ATTRIBUTES.index(a) < CELEBA_ATTRIBUTES.index(b) for a, b in pairs)


def test_dagster_metadata_is_tables_and_file_links(built):
    import dagster as dg
    from dagster._serdes import serialize_value

    from llm2loss_pipeline.core.steps.report import DisparityReportResult
    from llm2loss_pipeline.defs.report.assets import report_metadata

    _, result, _ = built
    files = result.files
    plots_ = {name: path for name, path in files.items() if str(path).endswith(".png")}
    step = DisparityReportResult(
        html_path=files["report_html"],
        duckdb_path=files["report_html"].parent / "llm2loss.duckdb",
        sha256="0" * 64,
        headline=dict(result.headline),
        top_attributes=list(result.top_attributes),
        markdown={},
        plots=plots_,
    )
    metadata = report_metadata("direct", step, files["report_html"].parent)

    for name in ("table2", "table3", "table4"):
        assert isinstance(metadata[name], dg.TableMetadataValue), name
    table2, table4 = metadata["table2"], metadata["table4"]
    names2 = [c.name for c in table2.schema.columns]
    assert names2[:3] == ["group", "estimate", "measure"] and "spearman_p" in names2
    types2 = {c.name: c.type for c in table2.schema.columns}
    assert types2["spearman"] == "float" and types2["spearman_p"] == "string"
    assert types2["n"] == "int"
    expected = result.table("table2").filter(pl.col("measure") == "loss")
    assert len(table2.records) == expected.height
    overall = next(
        r.data
        for r in table2.records
        if r.data["group"] == "overall" and r.data["estimate"] == "signed"
    )
    want = expected.row(
        by_predicate=(pl.col("group") == "overall") & (pl.col("estimate") == "signed"), named=True
    )
    assert overall["spearman"] == round(want["spearman"], 4)
    p = want["spearman_p"]
    assert overall["spearman_p"] == (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")

    assert len(table4.records) == 40
    columns4 = {c.name: c for c in table4.schema.columns}
    for needed in ("gap_loss_low", "gap_loss_high", "gap_loss_p", "est_gap", "claim"):
        assert needed in columns4 and columns4[needed].description, needed
    top = table4.records[0].data  # sorted by estimated disparity: a planted attribute first
    assert top["attribute"] in ("Eyeglasses", "Wearing_Hat") and top["claim"] == "worse with"
    assert re.fullmatch(r"\d\.\d\de-\d\d", top["gap_loss_p"])  # tiny p in e-notation
    rare = next(r.data for r in table4.records if r.data["attribute"] == "Blurry")
    assert rare["gap_loss"] is None and rare["small_group"] is True  # NaN is empty, not "nan"

    assert set(plots_) >= {"attribute_bars", "estimated_vs_measured"}
    for name, path in plots_.items():
        value = metadata[f"plot_{name}"]
        assert isinstance(value, dg.PathMetadataValue) and value.path == str(path)
    assert isinstance(metadata["report_html"], dg.PathMetadataValue)
    event = serialize_value(dg.MaterializeResult(metadata=metadata).metadata)
    assert "base64" not in event and len(event) < 100_000
