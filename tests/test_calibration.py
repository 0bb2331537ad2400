"""Calibrated claims: replicate p-values, clustered errors, the text-side error, truth scoring."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from llm2loss_pipeline.core.heads.compare import compare_members
from llm2loss_pipeline.core.heads.ensemble import MemberInfo
from llm2loss_pipeline.core.heads.probe_reading import ProbeReading, probe_readings
from llm2loss_pipeline.core.report.calibration import (
    Calibration,
    calibrated_claims,
    fit_calibration,
    per_image_gap_se,
)
from llm2loss_pipeline.core.report.grounded import grounded_diffs, in_probe_basis, pool_weights
from llm2loss_pipeline.core.stats import bh_adjust, clustered_mean_gap, replicate_pvalue
from llm2loss_pipeline.core.truth import calibration_table, score_world
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.population import plan_population, population_table


def test_replicate_pvalue_uses_the_spread_as_the_standard_error():
    values = np.array([0.9, 1.1, 1.3, 0.7, 1.0, 1.2, 0.8, 1.0])
    z = values.mean() / values.std(ddof=1)
    assert replicate_pvalue(values) == pytest.approx(2 * sps.t.sf(z, df=7))
    # a t-test across replicates divides by sqrt(M) again: far surer than the data allow
    t_test = sps.ttest_1samp(values, 0)
    assert t_test.statistic == pytest.approx(z * math.sqrt(values.size))
    assert t_test.pvalue < replicate_pvalue(values) / 100
    assert replicate_pvalue(np.array([1.0, 1.0, 1.0])) == 0.0
    assert replicate_pvalue(np.array([0.0, 0.0])) == 1.0
    assert math.isnan(replicate_pvalue(np.array([1.0])))


def test_twenty_of_twenty_members_are_not_proof():
    # every member positive, yet the mean is only 1.2 standard errors from zero
    values = np.linspace(0.01, 1.0, 20)
    assert (values > 0).all()
    assert replicate_pvalue(values) > 0.05


def test_clustered_gap_matches_welch_for_singletons_and_widens_for_clusters():
    rng = np.random.default_rng(0)
    y = rng.normal(size=2000)
    a = rng.random(2000) < 0.3
    gap, se = clustered_mean_gap(y, a, np.arange(2000))
    welch = math.sqrt(y[a].var(ddof=1) / a.sum() + y[~a].var(ddof=1) / (~a).sum())
    assert gap[0] == pytest.approx(y[a].mean() - y[~a].mean())
    assert se[0] == pytest.approx(welch, rel=0.01)
    # every sample copied 5 times within its own cluster: the same information, the same error
    y5, a5, c5 = np.repeat(y, 5), np.repeat(a, 5), np.repeat(np.arange(2000), 5)
    _, se5 = clustered_mean_gap(y5, a5, c5)
    assert se5[0] == pytest.approx(se[0], rel=0.01)
    _, naive = clustered_mean_gap(y5, a5, np.arange(10_000))
    assert naive[0] < 0.5 * se5[0]


def test_clustered_gap_of_an_empty_side_is_nan():
    gap, se = clustered_mean_gap(np.arange(4.0), np.ones(4, bool), np.arange(4))
    assert math.isnan(gap[0]) and math.isnan(se[0])


def _synthetic(n, slope=2.0, tau=0.3, s=0.1, u=0.05, seed=0):
    """The calibration's model: the estimate reads the real gap (estimate units) with the text
    error tau and the data's error s; the measured gap is the real one in loss units plus u."""
    rng = np.random.default_rng(seed)
    real = rng.normal(0, 1, n)
    truth = slope * real
    estimate = real + rng.normal(0, tau, n) + rng.normal(0, s, n)
    measured = truth + rng.normal(0, u, n)
    return estimate, np.full(n, s), measured, np.full(n, u), truth


def test_fit_calibration_recovers_the_scale_and_the_text_error():
    e, s, g, u, _ = _synthetic(4000)
    cal = fit_calibration("grounded", e, s, g, u)
    assert cal.slope == pytest.approx(2.0, rel=0.05)
    assert cal.text_error == pytest.approx(0.3, rel=0.15)
    assert cal.calibrated
    # least squares of g on e shrinks the slope by the estimates' reliability, 1 / (1 + 0.1):
    # the errors are in the estimate, and the planted gaps then look twice their estimates
    assert e @ g / (e @ e) == pytest.approx(2.0 / 1.1, rel=0.05)


def test_measured_gaps_that_are_all_noise_calibrate_nothing():
    rng = np.random.default_rng(5)
    e, u = rng.normal(0, 1, 40), np.full(40, 0.3)
    g = 0.01 * e + rng.normal(0, 0.1, 40)  # a weak trace of the estimates, well within u
    cal = fit_calibration("grounded", e, np.full(40, 0.1), g, u)
    assert cal.slope <= 0 and cal.text_error == math.inf


def test_the_text_error_bound_adds_standard_errors_of_its_own_estimate():
    e, s, g, u, _ = _synthetic(40, seed=3)
    plain = fit_calibration("grounded", e, s, g, u, bound=0.0)
    raised = fit_calibration("grounded", e, s, g, u, bound=1.5)
    terms = (g / plain.slope - e) ** 2 - s**2 - (u / plain.slope) ** 2
    assert plain.text_error**2 == pytest.approx(max(terms.mean(), 0.0))
    expected = terms.mean() + 1.5 * terms.std(ddof=1) / math.sqrt(terms.size)
    assert raised.text_error**2 == pytest.approx(expected)
    assert raised.slope == plain.slope


def test_a_bounded_text_error_is_seldom_far_below_the_real_one():
    # What the worlds show (bench/RESULTS.md): the text error is heavy-tailed over attributes (a
    # few probes are far off, most are close) and the measurement noise is as large, so from 40
    # attributes the moment estimate of tau = 0.2 comes out under half of it in about one world
    # of ten, and every claim built on it is too sure. The bound makes that rare.
    def world(seed, slope=2.0, tau=0.2, s=0.15, u=0.3, df=3):
        rng = np.random.default_rng(seed)
        real = rng.normal(0, 1, 40)
        text = rng.standard_t(df, 40) * tau / math.sqrt(df / (df - 2))
        estimate = real + text + rng.normal(0, s, 40)
        measured = slope * real + rng.normal(0, u, 40)
        return estimate, np.full(40, s), measured, np.full(40, u)

    def too_small(bound):
        return np.mean(
            [
                fit_calibration("grounded", *world(seed), bound).text_error < 0.1
                for seed in range(300)
            ]
        )

    assert too_small(0.0) > 0.05
    assert too_small(1.5) < 0.4 * too_small(0.0)


def test_a_negative_slope_claims_nothing_and_few_attributes_are_uncalibrated():
    e, s, g, u, _ = _synthetic(40)
    against = fit_calibration("grounded", e, s, -g, u)
    assert against.text_error == math.inf and against.p_worse(5.0, 0.1) == 0.5
    frame, _ = calibrated_claims([f"a{i}" for i in range(40)], "grounded", e, s, -g, u, 0.1)
    assert frame["est_gap"].is_nan().all() and (frame["claim"] == "cannot tell").all()
    few = fit_calibration("grounded", e[:3], s[:3], g[:3], u[:3])
    assert not few.calibrated and few.text_error == 0.0


def test_calibrated_intervals_cover_the_truth_nine_times_in_ten():
    covered, claims, right = [], 0, 0
    for seed in range(30):
        e, s, g, u, truth = _synthetic(40, seed=seed)
        e[0] = 0.0  # one attribute with no signal
        frame, cal = calibrated_claims([f"a{i}" for i in range(40)], "grounded", e, s, g, u, 0.1)
        low, high = frame["est_gap_low"].to_numpy(), frame["est_gap_high"].to_numpy()
        covered += list((low <= truth) & (truth <= high))
        claimed = frame["bh_significant"].to_numpy()
        claims += int(claimed.sum())
        right += int((np.sign(frame["est_gap"].to_numpy()) == np.sign(truth))[claimed].sum())
        assert frame["claim"][0] == "cannot tell"
        assert cal.slope == pytest.approx(2.0, rel=0.25)
    assert 0.85 <= np.mean(covered) <= 0.95
    assert right / claims >= 0.9


def test_claims_name_a_side_only_when_sure():
    e = np.array([3.0, -3.0, 0.05, 1.0, -1.0, 0.5, -0.5, 2.0])
    g = 0.5 * e + np.array([0.05, -0.05, 0.02, -0.1, 0.1, 0.05, -0.05, 0.0])
    frame, _ = calibrated_claims(
        list("abcdefgh"), "grounded", e, np.full(8, 0.05), g, np.full(8, 0.02), 0.1
    )
    claims = dict(zip(frame["attribute"], frame["claim"], strict=True))
    assert claims["a"] == "worse with" and claims["b"] == "better with"
    assert claims["c"] == "cannot tell"
    p = dict(zip(frame["attribute"], frame["est_p_worse"], strict=True))
    assert p["a"] > 0.99 and p["b"] < 0.01 and 0.3 < p["c"] < 0.8


MEMBERS = [MemberInfo(i, "regressor" if i < 10 else "ranker", "linear", i) for i in range(20)]


def test_compare_with_calibration_says_cannot_tell_when_twenty_members_agree_on_little():
    diffs = np.linspace(0.02, 0.08, 20)  # 20 of 20 members positive
    cal = Calibration("grounded", slope=1.0, text_error=0.5, n_attributes=40)
    answer = compare_members(diffs, MEMBERS, "a cat", "a dog", "grounded", cal, explained=0.9)
    assert answer.p_greater == 1.0
    assert 0.5 < answer.p_a_worse < 0.6 and not answer.claimed
    assert answer.verdict.startswith("cannot tell: no measurable difference")
    # the same members moved half the free-text error (1.0) up: a side, but not a claim
    leaning = compare_members(diffs + 0.5, MEMBERS, "a cat", "a dog", "grounded", cal, 0.9)
    assert 0.6 < leaning.p_a_worse < 0.9 and not leaning.claimed
    assert leaning.verdict.startswith("cannot tell: it leans worse on A ('a cat')")
    flipped = compare_members(-diffs - 0.5, MEMBERS, "a cat", "a dog", "grounded", cal, 0.9)
    assert flipped.verdict.startswith("cannot tell: it leans worse on B ('a dog')")
    uncalibrated = compare_members(diffs, MEMBERS, "a cat", "a dog")
    assert uncalibrated.claimed and "20 of 20 members agree" in uncalibrated.verdict


def test_a_world_whose_text_error_came_out_small_does_not_make_free_text_sure():
    # tau is a moment estimate from ~40 attributes; on tuning world 1008 it came out 0.10, and
    # 2 x tau made free-text answers at P >= 0.9 right only 71% of the time (bench/RESULTS.md)
    diffs = np.linspace(0.45, 0.55, 20)  # every member: A worse, by half a member sd
    small = Calibration("grounded", slope=1.0, text_error=0.05, n_attributes=40)
    answer = compare_members(diffs, MEMBERS, "a", "b", "grounded", small, explained=0.9)
    floor = sps.norm.cdf(0.5 / math.sqrt(diffs.std(ddof=1) ** 2 + 0.6**2))
    assert answer.p_a_worse == pytest.approx(floor) and not answer.claimed
    # where the world's own tau is larger, it is what counts
    large = Calibration("grounded", slope=1.0, text_error=0.5, n_attributes=40)
    wide = compare_members(diffs, MEMBERS, "a", "b", "grounded", large, explained=0.9)
    assert wide.p_a_worse == pytest.approx(
        sps.norm.cdf(0.5 / math.sqrt(diffs.std(ddof=1) ** 2 + 1.0))
    )


def test_compare_off_the_data_is_not_claimed_however_large():
    cal = Calibration("grounded", slope=1.0, text_error=0.1, n_attributes=40)
    diffs = np.linspace(2.0, 3.0, 20)
    answer = compare_members(diffs, MEMBERS, "a cat", "a dog", "grounded", cal, explained=0.2)
    assert answer.p_a_worse > 0.99 and not answer.claimed
    assert "mostly not something these images vary in" in answer.verdict
    assert "20%" in answer.verdict
    sure = compare_members(diffs, MEMBERS, "old", "young", "grounded", cal, explained=0.8)
    assert sure.claimed and sure.verdict.startswith("the model is expected to do worse on A")
    flipped = compare_members(-diffs, MEMBERS, "old", "young", "grounded", cal, explained=0.8)
    assert flipped.p_a_worse == pytest.approx(1 - sure.p_a_worse)
    assert flipped.verdict.startswith("the model is expected to do worse on B")


def test_group_bootstrap_gives_each_identity_one_weight():
    groups = np.repeat(np.arange(10), 6)
    weights = pool_weights(20, 60, seed=3, groups=groups)
    for member in weights:
        assert np.all(member.reshape(10, 6) == member.reshape(10, 6)[:, :1])
    assert weights.sum(axis=1) == pytest.approx(np.full(20, 60.0))


def test_group_bootstrap_widens_the_spread_of_a_gap_that_few_identities_carry():
    rng = np.random.default_rng(1)
    identity = np.repeat(np.arange(30), 10)
    effect = rng.normal(0, 1, 30)[identity]  # the loss moves with the identity, not the image
    pool = np.stack([effect + rng.normal(0, 0.1, 300), rng.normal(size=300)], axis=1)
    scores = np.tile(effect + rng.normal(0, 0.3, 300), (40, 1))
    direction = np.array([[1.0, 0.0]])
    by_image = grounded_diffs(scores, pool, direction, pool_weights(40, 300, 0))
    by_identity = grounded_diffs(scores, pool, direction, pool_weights(40, 300, 0, identity))
    assert by_identity.std() > 2 * by_image.std()


def test_free_text_on_a_probe_is_asked_like_the_probe():
    rng = np.random.default_rng(2)
    probes = rng.normal(size=(5, 32))
    duals = np.linalg.solve(probes @ probes.T, probes)
    mapped, explained = in_probe_basis(probes[[2]], probes, duals)
    assert explained[0] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(mapped[0], duals[2], atol=1e-4)
    outside = rng.normal(size=32)
    outside -= probes.T @ np.linalg.lstsq(probes.T, outside, rcond=None)[0]  # orthogonal part
    _, explained = in_probe_basis(outside[None], probes, duals)
    assert explained[0] < 1e-6


def test_population_draws_new_slots_of_the_same_identities():
    config = WorldConfig(n_identities=3, images_per_identity=4, hard_attributes={"Eyeglasses": 1})
    planned = plan_population(config, 5)
    assert len(planned) == 15 and {p.slot for p in planned} == set(range(4, 9))
    assert planned == plan_population(config, 5)  # a pure function of the config
    table = population_table(planned)
    assert table["identity"].to_list() == [1] * 5 + [2] * 5 + [3] * 5
    # identity-level attributes follow the identity, image-level ones vary by slot
    for identity in (1, 2, 3):
        rows = table.filter(pl.col("identity") == identity)
        assert rows["Male"].n_unique() == 1
    assert 0 < table["Eyeglasses"].sum() < 15 or table.height == 15


def test_calibration_table_folds_and_scores_overconfidence():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    calibrated = calibration_table(p, rng.uniform(0, 1, p.size) < p)
    assert calibrated["ece"] < 0.02
    sure = calibration_table(np.full(1000, 0.99), np.arange(1000) < 600)
    assert sure["ece"] == pytest.approx(0.39, abs=0.01)
    assert sure["bins"][-1]["observed"] == pytest.approx(0.6)
    flipped = calibration_table(np.full(1000, 0.01), np.arange(1000) >= 600)
    assert flipped["ece"] == pytest.approx(sure["ece"])


def test_score_world_counts_only_claims_the_truth_supports():
    report = pl.DataFrame(
        {
            "attribute": ["a", "b", "c", "d"],
            "est_mean": [2.0, 1.0, -1.0, 0.1],
            "est_gap": [0.4, 0.2, -0.2, 0.02],
            "est_gap_low": [0.3, 0.1, -0.3, -0.1],
            "est_gap_high": [0.5, 0.3, -0.1, 0.1],
            "bh_significant": [True, True, True, False],
        }
    )
    truth = pl.DataFrame(
        {
            "attribute": ["a", "b", "c", "d"],
            "truth_gap": [0.45, 0.01, 0.2, 0.0],
            "truth_low": [0.4, -0.05, 0.1, -0.05],
            "truth_high": [0.5, 0.07, 0.3, 0.05],
        }
    )
    scores = score_world(report, truth, ["a"], None)
    # a is right; b's truth is indistinguishable from 0; c has the wrong sign
    assert scores["n_claims"] == 3 and scores["n_correct_claims"] == 1
    assert scores["claim_precision"] == pytest.approx(1 / 3)
    assert scores["coverage"] == pytest.approx(2 / 4)
    assert scores["planted_recall_at_3"] == 1.0 and scores["planted_significant"] == 1.0


def test_heads_bootstrap_resamples_whole_identities():
    import torch

    from llm2loss_pipeline.core.heads.train import _bootstrap_weights, _group_index

    groups = np.repeat(np.array(["a", "b", "c", "d", "e"]), 4)
    index = _group_index(groups, 20, np.arange(20))
    generators = [torch.Generator().manual_seed(s) for s in range(50)]
    weights = _bootstrap_weights(generators, 20, True, index).numpy()
    for member in weights:
        assert np.all(member.reshape(5, 4) == member.reshape(5, 4)[:, :1])
        assert member.sum() == 20  # five groups of four drawn five times
    assert (weights == 0).any()  # some identities are left out of some members
    plain = _bootstrap_weights(generators, 20, True).numpy()
    assert not all(np.all(m.reshape(5, 4) == m.reshape(5, 4)[:, :1]) for m in plain)
    with pytest.raises(ValueError, match="one group per sample"):
        _group_index(groups[:5], 20, np.arange(20))


def _shared_identities(n_attributes, seed, slope=1.0, tau=0.2, s=0.05, between=0.3, within=0.1):
    """Estimate, measured gap and population truth on the *same* identities: the identity draw
    (sd `between`) is in all three; only the measured gap has the image draw (sd `within`)."""
    rng = np.random.default_rng(seed)
    people = rng.normal(0, 1, n_attributes)  # the gap on these identities, in estimate units
    identity_noise = rng.normal(0, between, n_attributes)
    truth = slope * (people + identity_noise)
    e = people + identity_noise + rng.normal(0, tau, n_attributes) + rng.normal(0, s, n_attributes)
    g = truth + slope * rng.normal(0, within, n_attributes)
    clustered = np.full(n_attributes, slope * math.hypot(between, within))
    per_image = np.full(n_attributes, slope * within)
    return e, np.full(n_attributes, s), g, clustered, per_image, truth


def test_the_text_error_is_fitted_against_the_noise_on_the_same_identities():
    e, s, g, clustered, per_image, _ = _shared_identities(4000, seed=3)
    # subtracting the clustered error takes the shared identity noise out twice: tau vanishes
    assert fit_calibration("grounded", e, s, g, clustered).text_error < 0.05
    assert fit_calibration("grounded", e, s, g, per_image).text_error == pytest.approx(
        0.2, rel=0.15
    )


def test_intervals_cover_the_population_truth_of_the_same_identities():
    def coverage(per_image_known: bool) -> float:
        shares = []
        for seed in range(20):
            e, s, g, clustered, per_image, truth = _shared_identities(
                40, seed=seed, between=0.2, within=0.12
            )
            frame, _ = calibrated_claims(
                [f"a{i}" for i in range(40)],
                "grounded",
                e,
                s,
                g,
                clustered,
                0.1,
                gap_se_images=per_image if per_image_known else None,
            )
            low, high = frame["est_gap_low"].to_numpy(), frame["est_gap_high"].to_numpy()
            shares.append(np.mean((truth >= low) & (truth <= high)))
        return float(np.mean(shares))

    # wider than the same identities need: a claim also covers which people were drawn. (Fitted
    # against the clustered error, tau vanishes: test_the_text_error_is_fitted_against_...)
    assert 0.85 <= coverage(per_image_known=True) <= 0.99


def test_a_gap_few_identities_carry_needs_more_to_be_claimed():
    e, s, g, _, per_image, _ = _shared_identities(40, seed=1)
    e[0], g[0] = 1.5, 1.5  # the same estimate and gap for the first two attributes ...
    e[1], g[1] = 1.5, 1.5
    clustered = per_image.copy()
    clustered[1] = 2.0  # ... but the second's gap rests on a handful of identities
    frame, _ = calibrated_claims(
        [f"a{i}" for i in range(40)], "grounded", e, s, g, clustered, 0.1, gap_se_images=per_image
    )
    z = frame["est_z"].to_numpy()
    cal = fit_calibration(
        "grounded", np.delete(e, 1), np.delete(s, 1), np.delete(g, 1), np.delete(per_image, 1)
    )
    # the whole clustered error, in estimate units by every attribute's slope (see the module)
    identity = 2.0 / fit_calibration("grounded", e, s, g, per_image).slope
    assert z[1] == pytest.approx(1.5 / math.sqrt(s[1] ** 2 + identity**2 + cal.text_error**2))
    assert z[0] > 2 * z[1]
    assert frame["claim"][0] == "worse with" and frame["claim"][1] == "cannot tell"


def test_a_planting_that_carries_the_signal_is_claimed_where_the_others_say_little_of_b():
    # one planted attribute holds most of a world's signal; without it the other 39 give a
    # slope far from the real one (tuning world 1007's Wearing_Earrings: 0.32 against 1.65)
    rng = np.random.default_rng(1)
    n = 40
    v = np.full(n, 0.1)  # the measured gaps' per-image noise
    e, g = rng.normal(0, 0.15, n), rng.normal(0, 1, n)
    g[2:] *= math.sqrt(np.sum(v[2:] ** 2) / np.sum(g[2:] ** 2))  # 38 gaps that are all noise
    e[0], g[0] = 0.6, 1.8  # the planting
    e[1], g[1] = 0.55, 0.6  # a weaker one
    s, u = np.full(n, 0.07), np.full(n, 0.18)
    others = fit_calibration("grounded", e[1:], s[1:], g[1:], v[1:])
    whole = fit_calibration("grounded", e, s, g, v)
    assert others.slope < 0.4 * whole.slope
    frame, returned = calibrated_claims(
        [f"a{i}" for i in range(n)], "grounded", e, s, g, u, 0.1, gap_se_images=v
    )
    assert returned == whole
    # w in estimate units by every attribute's slope; the text error still from the others
    z = e[0] / math.sqrt(s[0] ** 2 + (u[0] / whole.slope) ** 2 + others.text_error**2)
    assert frame["est_z"][0] == pytest.approx(z) and z > 4
    # with the others' slope, w was three times as large and z 2.3 (p 0.02 of 40 tests)
    assert e[0] / math.sqrt(s[0] ** 2 + (u[0] / others.slope) ** 2 + others.text_error**2) < 2.5
    assert frame["claim"][0] == "worse with"
    # the interval keeps the others' slope: its own gap does not set its own loss units
    assert frame["est_gap"][0] == pytest.approx(others.slope * e[0])


def test_per_image_gap_se_is_welch_from_the_measured_table():
    table = pl.DataFrame(
        {
            "loss_var_true": [0.5, 1.0],
            "n_true": [10, 40],
            "loss_var_false": [2.0, 1.0],
            "n_false": [100, 40],
        }
    )
    expected = [math.sqrt(0.5 / 10 + 2.0 / 100), math.sqrt(1.0 / 40 + 1.0 / 40)]
    assert per_image_gap_se(table) == pytest.approx(expected)


def test_a_probe_that_does_not_resolve_its_attribute_is_never_claimed():
    # a0 has the largest estimate of all, but its probe reads its attribute at chance: it is not
    # tested, takes no share of the FDR, and says "cannot tell"; the rest are tested as before
    e, s, g, u, _ = _synthetic(40, seed=5)
    e[0], g[0] = 6.0, 12.0
    names = [f"a{i}" for i in range(40)]
    resolution = np.full(40, 0.9)
    resolution[0] = 0.55
    gated, _ = calibrated_claims(names, "grounded", e, s, g, u, 0.1, resolution=resolution)
    open_, _ = calibrated_claims(names, "grounded", e, s, g, u, 0.1)
    assert open_["bh_significant"][0] and not gated["bh_significant"][0]
    assert gated["claim"][0] == "cannot tell" and math.isnan(gated["est_q_value"][0])
    assert gated["probe_resolves"].to_list() == [False] + [True] * 39
    assert gated["est_p_value"][0] == open_["est_p_value"][0]  # the estimate itself is kept
    expected = bh_adjust(open_["est_p_value"].to_numpy()[1:])
    np.testing.assert_allclose(gated["est_q_value"].to_numpy()[1:], expected)
    unknown = np.full(40, np.nan)  # no labels to tell: every probe is tested
    assert calibrated_claims(names, "grounded", e, s, g, u, 0.1, resolution=unknown)[0][
        "bh_significant"
    ][0]


def test_a_question_one_probe_holds_is_answered_as_the_report_answers_that_probe():
    cal = Calibration("grounded", slope=1.0, text_error=0.2, n_attributes=40)
    diffs = np.linspace(0.3, 0.5, 20)  # free text alone: P(A worse) 0.75, no claim
    free = compare_members(diffs, MEMBERS, "a man", "a woman", "grounded", cal, 0.9)
    assert 0.7 < free.p_a_worse < 0.8 and not free.claimed and not free.asked_as_probe
    male = ProbeReading("Male", share=0.92, sign=1, p_worse=0.95, resolves=True)
    asked = compare_members(diffs, MEMBERS, "a man", "a woman", "grounded", cal, 0.9, male)
    assert asked.asked_as_probe and asked.p_a_worse == 0.95 and asked.claimed
    assert asked.verdict.startswith("the model is expected to do worse on A ('a man')")
    assert "asked as the report asks Male, whose probe holds 92% of the question" in asked.verdict
    assert asked.to_dict()["probe"]["holds"] is True
    from llm2loss_pipeline.query_cli import _short_verdict

    assert _short_verdict(asked) == "worse on A (asked as Male)"
    assert _short_verdict(free) == "cannot tell"
    # text B on the attribute's side: the report's P read for A
    swapped = ProbeReading("Male", share=0.92, sign=-1, p_worse=0.95, resolves=True)
    flipped = compare_members(-diffs, MEMBERS, "a woman", "a man", "grounded", cal, 0.9, swapped)
    assert flipped.p_a_worse == pytest.approx(0.05) and flipped.claimed
    # a probe short of the share, one the report does not test, or no calibration: as before
    for probe in (
        ProbeReading("Male", share=0.45, sign=1, p_worse=0.95, resolves=True),
        ProbeReading("Smiling", share=0.95, sign=1, p_worse=0.99, resolves=False),
    ):
        other = compare_members(diffs, MEMBERS, "a", "b", "grounded", cal, 0.9, probe)
        assert not other.asked_as_probe and other.p_a_worse == pytest.approx(free.p_a_worse)
    bare = compare_members(diffs, MEMBERS, "a", "b", "grounded", None, 0.9, male)
    assert not bare.asked_as_probe and bare.p_a_worse == 1.0  # the members' share
    # text the data cannot answer stays unanswered whatever probe it leans on
    off = compare_members(diffs, MEMBERS, "a cat", "a dog", "grounded", cal, 0.1, male)
    assert not off.claimed and "mostly not something these images vary in" in off.verdict


def test_probe_readings_take_the_probe_with_the_largest_coefficient():
    coefficients = np.array([[0.1, -0.9, 0.2], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    readings = probe_readings(coefficients, ["A", "B", "C"], [0.2, 0.97, 0.5], [1, 1, 0])
    first, none, spread = readings
    assert (first.attribute, first.sign) == ("B", -1)
    assert first.share == pytest.approx(0.81 / 0.86) and first.holds
    assert first.p_a_worse == pytest.approx(0.03)
    assert none is None
    assert spread.attribute == "A" and spread.share == pytest.approx(1 / 3) and not spread.holds
    nan = ProbeReading("B", share=0.99, sign=1, p_worse=float("nan"), resolves=True)
    assert not nan.holds
    with pytest.raises(ValueError, match=r"coefficients must be \[q, 2\]"):
        probe_readings(coefficients, ["A", "B"], [0.1, 0.2], [1, 1])
