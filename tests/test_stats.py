"""Correlations and Benjamini-Hochberg against scipy and hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from llm2loss_pipeline.core.stats import (
    benjamini_hochberg,
    bh_adjust,
    correlations,
    one_sample_t_pvalue,
    prob_positive,
)

X = np.array([0.12, -0.4, 1.7, 0.33, 0.95, -1.2, 0.05, 2.4, -0.6, 0.7, 1.1, -0.05])
Y = np.array([0.3, -0.1, 1.2, 0.9, 0.2, -0.8, -0.3, 1.9, -0.2, 0.4, 1.6, 0.1])


def test_correlations_match_scipy():
    result = correlations(X, Y)
    assert result.n == 12
    pearson, spearman, kendall = sps.pearsonr(X, Y), sps.spearmanr(X, Y), sps.kendalltau(X, Y)
    assert result.pearson.coefficient == pytest.approx(pearson.statistic, abs=1e-12)
    assert result.pearson.p_value == pytest.approx(pearson.pvalue, rel=1e-9)
    assert result.spearman.coefficient == pytest.approx(spearman.statistic, abs=1e-12)
    assert result.spearman.p_value == pytest.approx(spearman.pvalue, rel=1e-9)
    assert result.kendall.coefficient == pytest.approx(kendall.statistic, abs=1e-12)
    assert result.kendall.p_value == pytest.approx(kendall.pvalue, rel=1e-9)
    # a clearly positive relation on this data
    assert result.spearman.coefficient > 0.7 and result.spearman.p_value < 0.01
    d = result.as_dict()
    assert d["n"] == 12 and d["kendall"] == result.kendall.coefficient
    assert set(d) == {
        "n", "pearson", "pearson_p", "spearman", "spearman_p", "kendall", "kendall_p"
    }  # fmt: skip


def test_correlations_public_reexport():
    from llm2loss_pipeline import stats

    assert stats.correlations is correlations
    assert stats.benjamini_hochberg is benjamini_hochberg
    assert stats.correlations([1, 2, 3, 4], [2, 4, 6, 9]).spearman.coefficient == 1.0


def test_correlations_drop_nan_pairs():
    x = np.concatenate([X, [np.nan, 1.0, np.inf]])
    y = np.concatenate([Y, [0.5, np.nan, 2.0]])
    result = correlations(x, y)
    assert result.n == 12
    assert result.pearson.coefficient == pytest.approx(sps.pearsonr(X, Y).statistic)


def test_correlations_need_three_pairs():
    with pytest.raises(ValueError, match=r"at least 3 complete .* got 2"):
        correlations([1.0, 2.0, np.nan, 4.0], [1.0, 3.0, 2.0, np.nan])
    with pytest.raises(ValueError, match="same length"):
        correlations([1.0, 2.0, 3.0], [1.0, 2.0])


def test_correlations_constant_input_is_nan_not_error():
    result = correlations([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert result.n == 4
    assert math.isnan(result.spearman.coefficient) and math.isnan(result.kendall.p_value)


def test_bh_hand_example_step_up():
    # m = 3, alpha = 0.05: thresholds 0.0167, 0.0333, 0.05. p_(1) = 0.02 misses its own threshold,
    # but p_(2) = 0.021 meets 0.0333, so the step-up rejects both (a step-down would reject none).
    p = [0.021, 0.6, 0.02]
    assert benjamini_hochberg(p, 0.05).tolist() == [True, False, True]
    # q_(2) = 0.021 * 3 / 2 = 0.0315; q_(1) = min(0.02 * 3, 0.0315); q_(3) = 0.6
    np.testing.assert_allclose(bh_adjust(p), [0.0315, 0.6, 0.0315])


def test_bh_second_hand_example():
    p = np.array([0.01, 0.039, 0.029, 0.005, 0.2])
    # sorted 0.005, 0.01, 0.029, 0.039, 0.2 -> m p / k = 0.025, 0.025, 0.04833, 0.04875, 0.2
    np.testing.assert_allclose(bh_adjust(p), [0.025, 0.04875, 0.029 * 5 / 3, 0.025, 0.2])
    assert benjamini_hochberg(p).tolist() == [True, True, True, True, False]
    assert benjamini_hochberg(p, alpha=0.03).tolist() == [True, False, False, True, False]


def test_bh_matches_scipy_false_discovery_control():
    rng = np.random.default_rng(7)
    p = np.concatenate([rng.uniform(0, 1, 30), rng.uniform(0, 0.01, 10)])
    np.testing.assert_allclose(bh_adjust(p), sps.false_discovery_control(p), rtol=1e-12)
    assert benjamini_hochberg(p, 0.05).tolist() == (sps.false_discovery_control(p) <= 0.05).tolist()


def test_bh_nan_is_left_out():
    q = bh_adjust([0.01, np.nan, 0.04])
    assert math.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2]], [0.02, 0.04])  # m = 2, not 3
    assert benjamini_hochberg([0.01, np.nan, 0.04]).tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"position 1 is 1\.5"):
        bh_adjust([0.2, 1.5])
    with pytest.raises(ValueError, match="alpha"):
        benjamini_hochberg([0.2], alpha=0)


def test_one_sample_t_and_prob_positive():
    values = np.array([0.5, 0.7, 0.2, 0.9, 0.4])
    assert one_sample_t_pvalue(values) == pytest.approx(sps.ttest_1samp(values, 0.0).pvalue)
    assert one_sample_t_pvalue(np.array([0.3, 0.3, 0.3])) == 0.0
    assert one_sample_t_pvalue(np.array([0.3, 0.3 + 1e-16, 0.3])) == 0.0  # float-level spread
    assert one_sample_t_pvalue(np.zeros(4)) == 1.0
    assert math.isnan(one_sample_t_pvalue(np.array([1.0])))
    assert prob_positive(np.array([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
