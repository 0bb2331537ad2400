"""The attribute disparity report on a planted synthetic world, with a fake scorer and prompts.

The world: black-box losses are higher for faces with Eyeglasses and Wearing_Hat (by PLANTED)
and shifted a little for every other attribute (by a known per-attribute effect); Bald is rare
(a small group) and Blurry never occurs. The fake heads read the attribute names out of the
prompt texts and score them with the same per-attribute effects plus member noise, so a correct
report must rank the planted attributes first and correlate estimated with measured disparity.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from scipy.stats import rankdata

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.members import member_groups
from llm2loss_pipeline.core.report import build_report, markdown_tables, publish_views
from llm2loss_pipeline.core.report.html import html_table, text
from llm2loss_pipeline.core.report.measured import ReportInputError

N = 800
PLANTED = {"Eyeglasses": 2.0, "Wearing_Hat": 1.5}
RARE, ABSENT = "Bald", "Blurry"
RNG_EFFECTS = np.random.default_rng(123)
EFFECTS = {
    name: PLANTED.get(name, float(RNG_EFFECTS.uniform(-0.4, 0.4))) for name in CELEBA_ATTRIBUTES
}
MENTION = re.compile(r"\b(with|without) (\w+)")


def rate(name: str) -> float:
    if name in PLANTED:
        return 0.6
    if name == RARE:
        return 0.02
    if name == ABSENT:
        return 0.0
    return 0.15 + 0.25 * (CELEBA_ATTRIBUTES.index(name) % 5) / 4


def write_planted_world(home: Path, seed: int = 0) -> Layout:
    rng = np.random.default_rng(seed)
    layout = Layout.at(home)
    ids = [f"{i + 1:06d}.jpg" for i in range(N)]
    splits = rng.choice(["train", "valid", "test"], size=N, p=[0.3, 0.2, 0.5])
    shards = [f"shard-{i * 2 // N:05d}" for i in range(N)]
    layout.tables.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "sample_id": ids,
            "index": pl.Series(range(N), dtype=pl.Int64),
            "path": [f"img/{s}" for s in ids],
            "split": splits.tolist(),
            "identity": pl.Series(rng.integers(0, 20, N), dtype=pl.Int64),
            "shard": shards,
        }
    ).write_parquet(layout.manifest)
    values = {name: rng.random(N) < rate(name) for name in CELEBA_ATTRIBUTES}
    pl.DataFrame({"sample_id": ids} | {k: v.tolist() for k, v in values.items()}).write_parquet(
        layout.attributes
    )
    loss = rng.gamma(2.0, 0.25, N) + sum(EFFECTS[k] * values[k] for k in CELEBA_ATTRIBUTES)
    loss = loss - loss.min() + 0.01
    losses = pl.DataFrame(
        {
            "sample_id": ids,
            "split": splits.tolist(),
            "label": pl.Series(rng.integers(0, 20, N), dtype=pl.Int64),
            "loss": loss,
            "predicted": pl.Series(rng.integers(0, 20, N), dtype=pl.Int64),
            "correct": (loss < np.median(loss)).tolist(),
            "p_true": np.exp(-loss),
            "true_class_auroc": 1.0 / (1.0 + loss),
        }
    )
    # image embeddings: +-1 per attribute plus noise; attribute k lives on axis k
    signs = np.stack([np.where(values[k], 1.0, -1.0) for k in CELEBA_ATTRIBUTES], axis=1)
    embedding = (signs + rng.normal(0, 1.5, signs.shape)).astype(np.float32)
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    emb = pl.DataFrame({"sample_id": ids, "embedding": list(embedding)})
    for shard in sorted(set(shards)):
        mask = pl.Series(shards) == shard
        for table, frame in (("per_sample_losses", losses), ("image_embeddings", emb)):
            folder = layout.shard_dir(table)
            folder.mkdir(parents=True, exist_ok=True)
            frame.filter(mask).write_parquet(folder / f"{shard}.parquet")
    return layout


def fake_prompt_pairs(attribute: str) -> list[tuple[str, str]]:
    return [
        (f"face with {attribute}", f"face without {attribute}"),
        (f"a photo of someone with {attribute}", f"a photo of someone without {attribute}"),
    ]


def fake_composed_prompt(values: Mapping[str, bool], template: str = "face of {}") -> str:
    words = " and ".join(f"{'with' if v else 'without'} {k}" for k, v in values.items())
    return template.format(words)


@dataclass(frozen=True)
class Member:
    index: int
    kind: str
    arch: str
    seed: int


class FakeScorer:
    """Scores a text by the loss effects of the attributes it says are present, plus noise."""

    def __init__(self, noise: float = 0.15):
        self.members = [
            Member(i, kind, arch, seed)
            for i, (kind, arch, seed) in enumerate(
                (k, a, s)
                for k in ("regressor", "ranker")
                for a in ("linear", "mlp")
                for s in (0, 1, 2)
            )
        ]
        self.noise = noise
        self.calls: list[int] = []

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(self.members), len(texts)))
        for t, text_ in enumerate(texts):
            base = sum(EFFECTS[a] for how, a in MENTION.findall(text_) if how == "with")
            for m in range(len(self.members)):
                noise_rng = np.random.default_rng(zlib.crc32(f"{m}|{text_}".encode()))
                out[m, t] = base + self.noise * noise_rng.normal()
        return out


def fake_encode_texts(texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), len(CELEBA_ATTRIBUTES)))
    for t, text_ in enumerate(texts):
        rng = np.random.default_rng(zlib.crc32(text_.encode()))
        out[t] = rng.normal(0, 0.2, out.shape[1])
        for how, a in MENTION.findall(text_):
            out[t, CELEBA_ATTRIBUTES.index(a)] += 1.0 if how == "with" else -1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = rankdata(scores)
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run(layout: Layout, out: Path, scorer=None, **kwargs):
    return build_report(
        layout,
        scorer or FakeScorer(),
        fake_encode_texts,
        out_dir=out,
        prompt_pairs=fake_prompt_pairs,
        compose_prompt=fake_composed_prompt,
        pair_templates=("face of {}", "a photo of a person {}"),
        auroc_fn=rank_auroc,
        **{"estimator": "direct", **kwargs},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    layout = write_planted_world(home)
    scorer = FakeScorer()
    result = run(layout, home / "reports", scorer=scorer, n_pairs=3)
    return layout, scorer, result


def test_planted_attributes_rank_top(report):
    _, scorer, result = report
    table = result.attribute_table
    assert table.height == 40
    assert table["attribute"].to_list() == list(CELEBA_ATTRIBUTES)
    assert set(result.top_attributes[:2]) == set(PLANTED)
    measured = table.filter(pl.col("gap_loss").is_not_nan())
    measured_top = measured.sort("gap_loss", descending=True)["attribute"][:2]
    assert set(measured_top) == set(PLANTED)
    eyeglasses = table.row(by_predicate=pl.col("attribute") == "Eyeglasses", named=True)
    assert eyeglasses["gap_loss"] == pytest.approx(2.0, abs=0.3)
    assert eyeglasses["est_mean"] == pytest.approx(2.0, abs=0.2)
    assert eyeglasses["est_p_positive"] == 1.0 and eyeglasses["bh_significant"]
    assert eyeglasses["est_q1"] <= eyeglasses["est_median"] <= eyeglasses["est_q3"]
    assert eyeglasses["est_rank"] in (1, 2)
    # the planted attributes are worse in accuracy and AUROC too (positive = worse)
    assert eyeglasses["gap_accuracy"] > 0 and eyeglasses["gap_auroc"] > 0
    assert eyeglasses["gt_rmm_auroc"] == pytest.approx(abs(eyeglasses["gap_auroc"]))
    # one batched scoring call for all prompts (attributes and pairs, deduplicated)
    assert len(scorer.calls) == 1
    assert scorer.calls[0] == 40 * 4 + 3 * 4 * 2


def test_numbers_are_finite_and_small_groups_flagged_not_dropped(report):
    _, _, result = report
    table = result.attribute_table
    est_columns = ["est_mean", "est_q1", "est_median", "est_q3", "est_p_positive", "est_p_value"]
    for column in [*est_columns, "est_mean_regressor", "est_mean_ranker"]:
        assert table[column].is_finite().all(), column
    present = table.filter(pl.col("n_true") > 0)
    for column in ("loss_true", "loss_false", "gap_loss", "gt_rmm_accuracy", "zero_shot_auroc"):
        assert present[column].is_finite().all(), column
    rare = table.row(by_predicate=pl.col("attribute") == RARE, named=True)
    assert 0 < rare["n_true"] < 20 and rare["small_group"]
    absent = table.row(by_predicate=pl.col("attribute") == ABSENT, named=True)
    assert absent["n_true"] == 0 and absent["small_group"]
    assert math.isnan(absent["loss_true"]) and math.isnan(absent["zero_shot_auroc"])
    assert set(table.filter(pl.col("small_group"))["attribute"]) == {RARE, ABSENT}
    assert table["bh_significant"].dtype == pl.Boolean
    significant = set(table.filter(pl.col("bh_significant"))["attribute"])
    assert set(PLANTED) <= significant
    assert result.headline["n_bh_significant"] == len(significant)
    assert result.headline["n_small_groups"] == 2
    n_test = table["n_true"][0] + table["n_false"][0]
    assert (table["n_true"] + table["n_false"] == n_test).all()
    assert result.n_eval_samples == n_test


def test_member_groups_and_estimates(report):
    _, _, result = report
    groups = set(result.attribute_estimates["group"])
    assert groups == {
        "overall", "regressor", "ranker",
        "regressor/linear", "regressor/mlp", "ranker/linear", "ranker/mlp",
    }  # fmt: skip
    sizes = dict(
        result.attribute_estimates.group_by("group").agg(pl.col("n_members").first()).iter_rows()
    )
    assert sizes["overall"] == 12 and sizes["ranker"] == 6 and sizes["ranker/mlp"] == 3
    assert result.member_diffs.height == 40 * 12
    # the overall mean is the mean of the member diffs
    eyeglasses = result.member_diffs.filter(pl.col("attribute") == "Eyeglasses")["diff"].mean()
    row = result.attribute_table.row(by_predicate=pl.col("attribute") == "Eyeglasses", named=True)
    assert row["est_mean"] == pytest.approx(eyeglasses)
    # each group's estimate is the mean over that group's members, not over the others
    diffs = result.member_diffs.filter(pl.col("attribute") == "Eyeglasses")
    for group in ("regressor", "ranker", "regressor/mlp", "ranker/linear"):
        kind, _, arch = group.partition("/")
        mine = diffs.filter((pl.col("kind") == kind) & ((pl.col("arch") == arch) | (arch == "")))
        estimate = result.attribute_estimates.filter(
            (pl.col("attribute") == "Eyeglasses") & (pl.col("group") == group)
        ).row(0, named=True)
        assert estimate["mean"] == pytest.approx(mine["diff"].mean()), group
    assert row["est_mean_regressor"] == pytest.approx(
        diffs.filter(pl.col("kind") == "regressor")["diff"].mean()
    )


def test_correlations_tables(report):
    _, _, result = report
    table2 = result.table("table2")
    assert set(table2["group"]) >= {"overall", "regressor", "ranker"}
    assert set(table2["measure"]) == {"loss", "accuracy", "auroc"}
    assert set(table2["estimate"]) == {"signed", "absolute"}
    signed = table2.filter((pl.col("estimate") == "signed") & (pl.col("measure") == "loss"))
    assert (signed["n"] == 38).all()  # the two small groups are left out, and said so
    assert signed["note"].str.contains("2 small-group attribute").all()
    h = result.headline
    for key in ("spearman_signed_overall", "spearman_signed_regressor", "spearman_signed_ranker"):
        assert h[key] > 0.6, (key, h[key])
        assert h[key + "_p"] < 1e-3
    assert h["zero_shot_mean_auroc"] > 0.75
    assert set(result.table("table3")["measure"]) == {"loss", "accuracy", "auroc"}
    assert result.table("table1").height == 7
    assert math.isfinite(h["spearman_zero_shot_vs_gt_rmm_loss"])


def test_published_correlation_p_values_equal_scipy(report):
    """table2 and table3's p-values, recomputed with scipy from the published attribute table."""
    from scipy import stats as sps

    _, _, result = report
    usable = result.attribute_table.filter(~pl.col("small_group")).sort("attribute")
    estimates = result.attribute_estimates.filter(pl.col("group") == "overall")
    joined = usable.join(estimates.select("attribute", "mean"), on="attribute")
    est, gap = joined["mean"].to_numpy(), joined["gap_loss"].to_numpy()
    row = (
        result.table("table2")
        .filter(
            (pl.col("group") == "overall")
            & (pl.col("estimate") == "signed")
            & (pl.col("measure") == "loss")
        )
        .row(0, named=True)
    )
    assert row["n"] == len(est) == 38
    for name, test in (
        ("pearson", sps.pearsonr),
        ("spearman", sps.spearmanr),
        ("kendall", sps.kendalltau),
    ):
        expected = test(est, gap)
        assert row[name] == pytest.approx(expected.statistic, rel=1e-9), name
        assert row[f"{name}_p"] == pytest.approx(expected.pvalue, rel=1e-9), name
    assert result.headline["spearman_signed_overall_p"] == pytest.approx(row["spearman_p"])
    zero_shot = result.table("table3").filter(pl.col("measure") == "loss").row(0, named=True)
    expected = sps.spearmanr(usable["zero_shot_auroc"], usable["gt_rmm_loss"])
    assert zero_shot["spearman_p"] == pytest.approx(expected.pvalue, rel=1e-9)


def test_published_gap_loss_p_is_welch_on_the_per_sample_table(report):
    from scipy import stats as sps

    layout, _, result = report
    losses = pl.concat(
        pl.read_parquet(path)
        for path in sorted(layout.shard_dir("per_sample_losses").glob("*.parquet"))
    ).filter(pl.col("split") == "test")
    samples = losses.join(pl.read_parquet(layout.attributes), on="sample_id")
    loss = samples["loss"].to_numpy()
    for attribute in (*PLANTED, "Male", "Young", RARE):
        mask = samples[attribute].to_numpy()
        row = result.attribute_table.row(by_predicate=pl.col("attribute") == attribute, named=True)
        welch = sps.ttest_ind(loss[mask], loss[~mask], equal_var=False).pvalue
        assert row["gap_loss_p"] == pytest.approx(welch, rel=1e-9), attribute


def test_pairs_have_four_cells(report):
    _, _, result = report
    pairs = result.pair_table
    assert pairs.height == 3
    # the planted attributes are the most frequent co-occurring pair
    assert pairs["pair"][0] == "Eyeglasses & Wearing_Hat"
    n_test = int(result.n_eval_samples)
    cells = ["n_TT", "n_TF", "n_FT", "n_FF"]
    assert (pairs.select(pl.sum_horizontal(cells)).to_series() == n_test).all()
    assert result.pair_cells.height == 12
    assert set(result.pair_cells["cell"]) == {"TT", "TF", "FT", "FF"}
    planted = pairs.row(0, named=True)
    assert planted["measured_signed"] == pytest.approx(3.5, abs=0.4)
    assert planted["est_signed_mean"] == pytest.approx(3.5, abs=0.2)
    assert planted["worst_cell_measured"] == "TT" == planted["worst_cell_estimated"]
    assert planted["best_cell_measured"] == "FF"
    assert planted["worst_cell_agrees"] and planted["bh_significant"]
    assert planted["est_TT"] > planted["est_TF"] > planted["est_FF"]
    assert result.pair_member_diffs.height == 3 * 12
    assert set(result.table("pairs")["estimate"]) == {"signed", "gap"}


def test_files_written(report):
    layout, _, result = report
    files = result.files
    for name in ("attribute_disparity", "pair_disparity", "correlations"):
        assert files[name].name == f"{name}.parquet"
    assert pl.read_parquet(files["attribute_disparity"]).height == 40
    assert pl.read_parquet(files["pair_disparity"]).height == 3
    assert pl.read_parquet(files["correlations"]).equals(result.correlations)
    for name in (
        "estimated_vs_measured",
        "attribute_bars",
        "strongest_attributes",
        "strongest_pairs",
    ):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = files["report_html"].read_text()
    for needle in (
        "Table 2",
        "Table 3",
        "Table 4",
        "How to read",
        "P(worse)",
        "measured 90% low",
        "measured p (Welch)",
        "est. 90% high",
        "Trust check on the labelled attributes",
        "Benjamini-Hochberg",
    ):
        assert needle in page, needle
    assert "true identity among all identity logits" in page
    assert all(name in page for name in CELEBA_ATTRIBUTES)
    assert page.count("data:image/png;base64,") == 4
    assert 'class="small"' in page
    assert not any(p.name.startswith(".") for p in files["report_html"].parent.iterdir())
    headline = files["headline"].read_text()
    assert "NaN" not in headline and "spearman_signed_overall" in headline
    md = markdown_tables(result)
    assert set(md) == {"table2", "table3", "table4_top10"}
    assert md["table4_top10"].count("\n") == 11 and "Eyeglasses" in md["table4_top10"]

    # the published views read the report's tables
    published = publish_views(None, layout, reports_dir=files["attribute_disparity"].parent)
    con = duckdb.connect(str(published.db_path), read_only=True)
    try:
        top = con.execute(
            "SELECT attribute FROM attribute_disparity ORDER BY est_mean DESC LIMIT 2"
        ).fetchall()
        groups = con.execute("SELECT count(*) FROM groups").fetchone()[0]
    finally:
        con.close()
    assert {row[0] for row in top} == set(PLANTED)
    assert groups == pl.read_parquet(files["groups"]).height > 0


def test_default_prompts_and_auroc_integration(tmp_path):
    """The real prompt grammar and AUROC, not the fakes the other tests use."""
    from llm2loss_pipeline.core.prompts import attribute_prompt_pairs

    layout = write_planted_world(tmp_path / "home")

    class Keywords(FakeScorer):
        def score_texts(self, texts):
            self.calls.append(len(texts))
            hit = np.array([2.0 * ("wearing eyeglasses" in t) for t in texts])
            return (
                np.tile(hit, (len(self.members), 1)) + 0.01 * np.arange(len(self.members))[:, None]
            )

    scorer = Keywords()

    def hashed_encoder(texts):
        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=40) for t in texts]
        return np.stack(rows) / np.linalg.norm(np.stack(rows), axis=1, keepdims=True)

    result = build_report(
        layout,
        scorer,
        hashed_encoder,
        out_dir=tmp_path / "out",
        pairs=[("Male", "Eyeglasses")],
        estimator="direct",
    )
    assert len(scorer.calls) == 1
    assert result.top_attributes[0] == "Eyeglasses"
    n_templates = len(attribute_prompt_pairs("Eyeglasses"))
    expected = (
        2.0
        * sum(
            ("wearing eyeglasses" in p) - ("wearing eyeglasses" in n)
            for p, n in attribute_prompt_pairs("Eyeglasses")
        )
        / n_templates
    )
    top = result.attribute_table.row(by_predicate=pl.col("attribute") == "Eyeglasses", named=True)
    assert top["est_mean"] == pytest.approx(expected)
    assert result.pair_table.height == 1 and result.pair_cells.height == 4
    assert result.attribute_table["zero_shot_auroc"].is_finite().sum() == 39  # Blurry is absent


def test_html_escapes_text():
    frame = pl.DataFrame({"name": ["<script>alert(1)</script>"]})
    rendered = html_table(frame, [("name", "a <b>", text)])
    assert "<script>" not in rendered and "&lt;script&gt;" in rendered
    assert "a &lt;b&gt;" in rendered


def test_explicit_pairs_and_no_encoder(tmp_path):
    layout = write_planted_world(tmp_path / "home", seed=1)
    result = build_report(
        layout,
        FakeScorer(),
        None,
        estimator="direct",
        out_dir=tmp_path / "out",
        pairs=[("Male", "Young")],
        prompt_pairs=fake_prompt_pairs,
        compose_prompt=fake_composed_prompt,
        pair_templates=("face of {}",),
        eval_split="valid",
    )
    assert result.pair_table["pair"].to_list() == ["Male & Young"]
    assert result.attribute_table["zero_shot_auroc"].is_nan().all()
    assert any("zero-shot" in note for note in result.notes)
    n_valid = pl.read_parquet(layout.manifest).filter(pl.col("split") == "valid").height
    assert result.n_eval_samples == n_valid
    with pytest.raises(ValueError, match="names 'Male' twice"):
        build_report(
            layout,
            FakeScorer(),
            None,
            estimator="direct",
            pairs=[("Male", "Male")],
            out_dir=tmp_path,
        )


def _rewrite_shard(layout: Layout, change) -> None:
    path = layout.shard_dir("per_sample_losses") / "shard-00000.parquet"
    change(pl.read_parquet(path)).write_parquet(path)


def test_bad_inputs_name_file_and_sample(tmp_path):
    layout = write_planted_world(tmp_path / "home")
    kwargs = {"out_dir": tmp_path / "out", "prompt_pairs": fake_prompt_pairs}
    kwargs |= {"compose_prompt": fake_composed_prompt, "pair_templates": ("{}",), "pairs": []}

    attributes = pl.read_parquet(layout.attributes)
    attributes.drop("Smiling").write_parquet(layout.attributes)
    # the attributes asked for (the home's attribute set, here given) must all be columns
    with pytest.raises(ReportInputError, match=r"attributes.parquet: column 'Smiling' is missing"):
        build_report(
            layout, FakeScorer(), None, estimator="direct", attributes=CELEBA_ATTRIBUTES, **kwargs
        )
    attributes.with_columns(
        pl.when(pl.col("sample_id") == "000003.jpg").then(None).otherwise(pl.col("Young"))
        .alias("Young")
    ).write_parquet(layout.attributes)  # fmt: skip
    with pytest.raises(ReportInputError, match=r"NULL, first Young of sample 000003\.jpg"):
        build_report(layout, FakeScorer(), None, estimator="direct", **kwargs)
    attributes.write_parquet(layout.attributes)

    _rewrite_shard(layout, lambda frame: pl.concat([frame, frame.head(1)]))
    with pytest.raises(ReportInputError, match=r"shard-00000.parquet: sample 000001.jpg has more"):
        build_report(layout, FakeScorer(), None, estimator="direct", **kwargs)

    def drop_first_test_sample(frame: pl.DataFrame) -> pl.DataFrame:
        frame = frame.unique("sample_id", keep="first", maintain_order=True)
        first_test = frame.filter(pl.col("split") == "test")["sample_id"][0]
        return frame.filter(pl.col("sample_id") != first_test)

    _rewrite_shard(layout, drop_first_test_sample)
    with pytest.raises(ReportInputError, match=r"sample \d{6}\.jpg of split 'test' has no loss"):
        build_report(layout, FakeScorer(), None, estimator="direct", **kwargs)


def test_scorer_shape_is_checked(tmp_path):
    layout = write_planted_world(tmp_path / "home")

    class Broken(FakeScorer):
        def score_texts(self, texts):
            return np.zeros((2, len(texts)))

    with pytest.raises(ValueError, match=r"expected \(members, texts\) = \(12,"):
        build_report(
            layout, Broken(), None, out_dir=tmp_path / "out", pairs=[],
            prompt_pairs=fake_prompt_pairs, compose_prompt=fake_composed_prompt,
            pair_templates=("{}",),
        )  # fmt: skip
    assert len(member_groups(FakeScorer().members)) == 7
