"""Pins at the boundaries users read: each number a user sees equals an independent computation.

Every test here was written against a plausible one-token bug that the rest of the suite let
through (issue 24's mutation spot-check): `q <= alpha` made `<`, Welch's n_a and n_b swapped, a
one-sided test made two-sided, an id check reduced to a count check, a token check without its
length, a dropped chmod. Each compares with scipy or with the definition, not with a range.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.celeba import CelebaFormatError, read_celeba
from llm2loss_pipeline.core.discovery.candidates import Candidate
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.hypotheses import _estimates
from llm2loss_pipeline.core.discovery.verify import jaccard, measure
from llm2loss_pipeline.core.report.correlate import correlation_row
from llm2loss_pipeline.core.report.measured import (
    EvalInputs,
    _welch_p,
    measured_attribute_table,
)
from llm2loss_pipeline.core.stats import (
    benjamini_hochberg,
    bh_adjust,
    clustered_mean_gap,
    correlations,
    one_sample_t_pvalue,
    prob_positive,
    replicate_pvalue,
)
from llm2loss_pipeline.core.storage import (
    _host,
    atomic_path,
    sweep_stale_temps,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from tests.test_celeba_reader import ATTR, IDENT, PART, _write_root
from tests.test_report import write_planted_world

# --- Benjamini-Hochberg: the boundary is inclusive ----------------------------------------------


def test_bh_rejects_a_p_value_equal_to_its_threshold() -> None:
    assert benjamini_hochberg([0.05]).tolist() == [True]
    assert benjamini_hochberg([0.0500001]).tolist() == [False]
    # p_(k) <= k alpha / m exactly at the step: 0.025 = 1 * 0.05 / 2 and 0.05 = 2 * 0.05 / 2
    assert benjamini_hochberg([0.05, 0.025]).tolist() == [True, True]
    assert benjamini_hochberg([0.03, 0.06], alpha=0.06).tolist() == [True, True]
    assert benjamini_hochberg([0.04, 0.2, 0.2], alpha=0.1).tolist() == [False, False, False]


def test_bh_q_values_equal_scipy() -> None:
    p = np.random.default_rng(3).uniform(0, 1, 40) ** 3
    np.testing.assert_allclose(bh_adjust(p), sps.false_discovery_control(p), rtol=1e-12)
    rejected = benjamini_hochberg(p, alpha=0.05)
    assert rejected.tolist() == (sps.false_discovery_control(p) <= 0.05).tolist()
    assert 0 < rejected.sum() < p.size  # the comparison decides something here


def test_bh_accepts_the_ends_of_the_unit_interval() -> None:
    np.testing.assert_allclose(bh_adjust([1.0, 0.0, 0.5]), [1.0, 0.0, 0.75])
    with pytest.raises(ValueError, match=r"position 1 is 1\.5"):
        bh_adjust([0.5, 1.5])


def test_prob_positive_counts_ties_half() -> None:
    assert prob_positive(np.array([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)


# --- correlation and t-test p-values: two-sided, as scipy computes them --------------------------


def test_correlation_p_values_equal_scipy() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=25)
    y = 0.4 * x + rng.normal(size=25)
    row = correlation_row("table2", "overall", "signed", "loss", x, y)
    assert row["pearson_p"] == pytest.approx(sps.pearsonr(x, y).pvalue, rel=1e-12)
    assert row["spearman_p"] == pytest.approx(sps.spearmanr(x, y).pvalue, rel=1e-12)
    assert row["kendall_p"] == pytest.approx(sps.kendalltau(x, y).pvalue, rel=1e-12)
    assert row["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    # a NaN pair is dropped, not propagated
    x[3] = np.nan
    kept = np.isfinite(x)
    assert correlations(x, y).spearman.p_value == pytest.approx(
        sps.spearmanr(x[kept], y[kept]).pvalue, rel=1e-12
    )


def test_one_sample_t_p_value_is_two_sided() -> None:
    values = np.array([0.3, 0.1, 0.4, -0.05, 0.2, 0.25])
    expected = sps.ttest_1samp(values, 0.0).pvalue
    assert one_sample_t_pvalue(values) == pytest.approx(expected, rel=1e-12)
    assert one_sample_t_pvalue(-values) == pytest.approx(expected, rel=1e-12)


def test_replicate_p_value_uses_the_members_spread_with_m_minus_1_degrees_of_freedom() -> None:
    # mean 2, std 1 (ddof 1), so the statistic is 2 on 2 degrees of freedom, where the t
    # distribution has a closed form: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2
    expected = 1.0 - 2.0 / np.sqrt(6.0)
    assert replicate_pvalue(np.array([1.0, 2.0, 3.0])) == pytest.approx(expected, rel=1e-12)
    assert replicate_pvalue(np.array([-1.0, -2.0, -3.0])) == pytest.approx(expected, rel=1e-12)


def test_clustered_gap_of_a_one_sample_group_is_defined() -> None:
    values = np.array([4.0, 1.0, 2.0, 3.0])
    groups = np.array(
        [[True, True, True], [False, True, True], [False, False, True], [False, False, False]]
    )
    gap, se = clustered_mean_gap(values, groups, np.arange(4))
    np.testing.assert_allclose(gap, [4.0 - 2.0, 2.5 - 2.5, 7.0 / 3.0 - 3.0])
    assert np.isfinite(se).all()
    gap, se = clustered_mean_gap(values, np.ones((4, 1), dtype=bool), np.arange(4))
    assert np.isnan(gap[0]) and np.isnan(se[0])  # an empty side


# --- the measured table's gap_loss_p: Welch's t-test on the per-sample losses -------------------


def _per_sample(layout, split: str) -> pl.DataFrame:
    losses = pl.concat(
        pl.read_parquet(path)
        for path in sorted(layout.shard_dir("per_sample_losses").glob("*.parquet"))
    )
    attributes = pl.read_parquet(layout.attributes)
    return losses.filter(pl.col("split") == split).join(attributes, on="sample_id")


def test_measured_gap_loss_p_is_welch_on_the_per_sample_table(tmp_path: Path) -> None:
    layout = write_planted_world(tmp_path / "home")
    with duckdb.connect() as con:
        table = measured_attribute_table(
            con, EvalInputs.from_layout(layout), split="test", min_group_size=5
        )
    samples = _per_sample(layout, "test")
    checked = 0
    for row in table.iter_rows(named=True):
        mask = samples[row["attribute"]].to_numpy()
        loss = samples["loss"].to_numpy()
        if mask.sum() < 2 or (~mask).sum() < 2:
            assert np.isnan(row["gap_loss_p"])
            continue
        welch = sps.ttest_ind(loss[mask], loss[~mask], equal_var=False)
        assert row["gap_loss_p"] == pytest.approx(welch.pvalue, rel=1e-9), row["attribute"]
        assert row["gap_loss"] == pytest.approx(loss[mask].mean() - loss[~mask].mean(), rel=1e-9)
        assert (row["n_true"], row["n_false"]) == (int(mask.sum()), int((~mask).sum()))
        checked += 1
    assert checked >= 35
    # the groups are unbalanced, so swapping n_true and n_false would move the p-values
    assert (table["n_true"] != table["n_false"]).all()


@pytest.mark.parametrize("n", [2, 3])
def test_welch_p_is_defined_from_two_samples_a_side(n: int) -> None:
    small, large = np.array([1.0, 1.5, 0.7][:n]), np.array([0.2, 0.4, 0.1, 0.3])
    for a, b in ((small, large), (large, small)):  # either side may be the small one
        summary = (a.mean(), a.var(ddof=1), a.size, b.mean(), b.var(ddof=1), b.size)
        expected = sps.ttest_ind(a, b, equal_var=False).pvalue
        assert _welch_p(*summary) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(_welch_p(1.0, 0.0, 1, 0.5, 0.1, 4))  # one sample has no variance


# --- discovery: one-sided Mann-Whitney, and the members' sign test ------------------------------


def test_discovery_p_value_is_one_sided_mann_whitney() -> None:
    rng = np.random.default_rng(11)
    losses = rng.gamma(2.0, 0.5, 200)
    matched = np.arange(0, 200, 7)
    losses[matched] += 0.2
    result = measure(losses, matched)
    inside = np.zeros(200, dtype=bool)
    inside[matched] = True
    expected = sps.mannwhitneyu(losses[inside], losses[~inside], alternative="greater")
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-12)
    assert result.p_value < 0.5 * sps.mannwhitneyu(losses[inside], losses[~inside]).pvalue + 1e-12
    assert result.auc == pytest.approx(expected.statistic / (inside.sum() * (~inside).sum()))
    assert result.gap == pytest.approx(losses[inside].mean() - losses[~inside].mean())
    # matched samples that are better give a p-value near 1, not near 0 (the test is one-sided)
    assert measure(-losses, matched).p_value > 0.5


def test_discovery_measures_a_single_matched_sample() -> None:
    losses = np.array([0.1, 0.2, 0.3, 5.0, 0.4])
    result = measure(losses, np.array([3]))
    assert (result.n_matched, result.n_rest) == (1, 4)
    assert result.gap == pytest.approx(5.0 - 0.25)
    assert result.auc == 1.0
    expected = sps.mannwhitneyu([5.0], [0.1, 0.2, 0.3, 0.4], alternative="greater").pvalue
    assert result.p_value == pytest.approx(expected)


def test_discovery_on_all_equal_losses_finds_nothing_worse() -> None:
    result = measure(np.full(10, 0.7), np.array([0, 1, 2]))
    assert result.gap == pytest.approx(0.0, abs=1e-12)
    assert (result.gap_std, result.auc, result.p_value) == (0.0, 0.5, 1.0)


def test_jaccard_overlap_of_matched_sets() -> None:
    assert jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == pytest.approx(0.5)
    assert jaccard(np.array([1, 2]), np.array([3])) == 0.0
    assert jaccard(np.array([7]), np.array([7])) == 1.0
    assert jaccard(np.array([], dtype=int), np.array([], dtype=int)) == 0.0


class _Members:
    """An ensemble whose standardized output is a fixed matrix: member m scores row i as x[i, m]."""

    def standardized(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).T


def test_discovery_p_estimate_is_a_one_sided_sign_test_over_members() -> None:
    image_x = np.zeros((4, 10))  # population mean 0 for every member
    text_x = np.array([[1.0] * 8 + [-1.0] * 2, [1.0] * 3 + [-1.0] * 7])
    # the direct estimate (no grounding: a home without a report): its P(worse) is the members'
    # share, gated at min_member_share
    config = DiscoveryConfig()
    texts = [Candidate("text a", "vocabulary"), Candidate("text b", "vocabulary")]
    est, threshold = _estimates(_Members(), text_x, image_x, texts, None, None, config, {})
    assert threshold == config.min_member_share
    assert est["p_worse"].tolist() == [0.8, 0.3]
    expected = [sps.binomtest(k, 10, 0.5, alternative="greater").pvalue for k in (8, 3)]
    np.testing.assert_allclose(est["p_estimate"], expected, rtol=1e-12)


def test_a_class_candidates_direct_estimate_is_against_its_class_population() -> None:
    image_x = np.array([[1.0] * 10, [1.0] * 10, [-1.0] * 10, [-1.0] * 10])  # mean 0; class 1
    text_x = np.full((2, 10), 1.5)
    texts = [
        Candidate("a text", "vocabulary"),
        Candidate("a text, among images labelled T", "class", scope=("T", True)),
    ]
    scopes = {("T", True): np.array([True, True, False, False])}
    est, _ = _estimates(_Members(), text_x, image_x, texts, None, None, DiscoveryConfig(), scopes)
    assert est["estimated_gap"].tolist() == [1.5, 0.5]  # 1.5 - 0 over all, 1.5 - 1 in class T


# --- the CelebA reader: ids are compared, tokens are whole ----------------------------------------


def test_celeba_rejects_a_same_count_identity_file_with_another_id(tmp_path: Path) -> None:
    root = _write_root(tmp_path / "root")
    lines = (root / IDENT).read_text().splitlines()
    lines[2] = "999999.jpg 1"
    (root / IDENT).write_text("\n".join(lines) + "\n")
    with pytest.raises(CelebaFormatError, match=r"lacks 1 sample ids .*999999\.jpg|000003\.jpg"):
        read_celeba(root)


@pytest.mark.parametrize("file", [IDENT, PART])
def test_celeba_rejects_a_renamed_id_in_any_file(tmp_path: Path, file: str) -> None:
    root = _write_root(tmp_path / "root")
    text = (root / file).read_text().replace("000002.jpg", "000009.jpg")
    (root / file).write_text(text)
    with pytest.raises(CelebaFormatError, match=r"000002\.jpg|000009\.jpg"):
        read_celeba(root)


@pytest.mark.parametrize("token", ["-10", "10", "-11", "11", "--1", "+1", "1-"])
def test_celeba_rejects_tokens_that_start_like_a_sign(tmp_path: Path, token: str) -> None:
    root = _write_root(tmp_path / "root")
    lines = (root / ATTR).read_text().splitlines()
    values = lines[3].split()
    values[5] = token  # line 4 of the file, the 5th attribute
    lines[3] = " ".join(values)
    (root / ATTR).write_text("\n".join(lines) + "\n")
    with pytest.raises(CelebaFormatError) as info:
        read_celeba(root)
    message = str(info.value)
    assert f"{ATTR} line 4" in message
    assert f"column {CELEBA_ATTRIBUTES[4]} has value {token!r}" in message


# --- atomic writes: the final file has the mode a plain open() gives ----------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomically_written_files_get_the_umask_mode(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        written = [
            write_bytes_atomic(tmp_path / "a.bin", b"x"),
            write_json_atomic(tmp_path / "b.json", {"k": 1}),
            write_parquet_atomic(pl.DataFrame({"a": [1]}), tmp_path / "c.parquet"),
        ]
        with atomic_path(tmp_path / "d.txt") as tmp:
            tmp.write_text("d")
        written.append(tmp_path / "d.txt")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(previous)
    expected = 0o666 & ~mask
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def test_the_temp_sweep_leaves_symlinks_and_folders_alone(tmp_path: Path) -> None:
    """Only plain files of dead writers go: a link or folder with a temp-like name is not ours."""
    target = tmp_path / "table.parquet"
    dead = 2**22 + 12345  # above the default pid_max, so no process has it
    elsewhere = tmp_path / "keep.txt"
    elsewhere.write_text("not a temp file")
    link = tmp_path / f".table.parquet.{dead}@{_host()}@a.tmp"
    link.symlink_to(elsewhere)
    folder = tmp_path / f".table.parquet.{dead}@{_host()}@b.tmp"
    folder.mkdir()
    stale = tmp_path / f".table.parquet.{dead}@{_host()}@c.tmp"
    stale.write_bytes(b"half")
    assert sweep_stale_temps(target) == [stale]
    assert link.is_symlink() and folder.is_dir() and elsewhere.exists()
