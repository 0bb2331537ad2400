"""The grounded estimator (`core.report.grounded`): duals, scores, weights, covariances, and a
planted world where the plain probe direction is confounded and the dual is not."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest
from scipy.stats import rankdata

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.report import build_report
from llm2loss_pipeline.core.report.grounded import (
    Grounding,
    covariance_with,
    dual_directions,
    grounded_diffs,
    pool_weights,
    standardized_scores,
    text_directions,
)
from tests.test_report import (
    EFFECTS,
    PLANTED,
    FakeScorer,
    fake_composed_prompt,
    fake_encode_texts,
    fake_prompt_pairs,
    write_planted_world,
)

MENTION = re.compile(r"\b(with|without) (\w+)")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = rankdata(scores)
    positives = np.asarray(labels, dtype=bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --- dual directions ---------------------------------------------------------------------------


def test_dual_without_ridge_is_biorthogonal_and_large_ridge_keeps_the_directions():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(5, 12))
    dual = dual_directions(directions, 0.0)
    assert dual.shape == (5, 12)
    np.testing.assert_allclose(dual @ directions.T, np.eye(5), atol=1e-8)
    # the dual lies in the span of the directions (it is the minimum-norm solution)
    coefficients, *_ = np.linalg.lstsq(directions.T, dual.T, rcond=None)
    np.testing.assert_allclose(directions.T @ coefficients, dual.T, atol=1e-10)

    # correlated directions: without ridge the duals turn far away from them ...
    shared = rng.normal(size=12)
    correlated = shared + 0.3 * rng.normal(size=(5, 12))

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    assert cosines(dual_directions(correlated, 0.0), correlated).max() < 0.9
    # ... and with a large ridge they are (nearly) the directions themselves
    assert cosines(dual_directions(correlated, 1e4), correlated).min() > 0.99
    assert cosines(dual_directions(directions, 1e4), directions).min() > 0.99


def test_dual_rejects_empty_directions():
    with pytest.raises(ValueError, match="k >= 1"):
        dual_directions(np.zeros((0, 4)), 0.1)
    with pytest.raises(ValueError, match="k >= 1"):
        dual_directions(np.ones(4), 0.1)


def test_text_directions_average_positive_minus_negative():
    vectors = {"a+": [1.0, 0.0], "a-": [0.0, 1.0], "b+": [3.0, 3.0], "b-": [1.0, 1.0]}
    calls = []

    def features(texts):
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts])

    out = text_directions(features, {"A": [("a+", "a-"), ("b+", "b-")], "B": [("a-", "a+")]})
    np.testing.assert_allclose(out, [[1.5, 0.5], [-1.0, 1.0]])
    assert calls == [["a+", "a-", "b+", "b-"]]  # one call, each text once
    with pytest.raises(ValueError, match="text features have shape"):
        text_directions(lambda texts: np.zeros((1, 2)), {"A": [("a+", "a-")]})


# --- standardised scores -----------------------------------------------------------------------


def test_standardized_scores_have_zero_mean_unit_std():
    rng = np.random.default_rng(1)
    pool = rng.normal(3.0, 2.0, size=(300, 6))
    directions = rng.normal(size=(4, 6))
    z = standardized_scores(pool, directions)
    assert z.shape == (300, 4)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-12)
    # an affine function of the raw scores, column by column
    raw = pool @ directions.T
    for j in range(4):
        assert np.corrcoef(z[:, j], raw[:, j])[0, 1] == pytest.approx(1.0, abs=1e-12)


def test_standardized_scores_reject_a_flat_direction():
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(50, 3))
    pool[:, 2] = 0.7  # every image has the same third coordinate
    directions = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="direction 1 gives every pool image the same score"):
        standardized_scores(pool, directions)
    with pytest.raises(ValueError, match="at least 2 pool images"):
        grounded_diffs(np.zeros((2, 1)), pool[:1], directions[:1])


# --- weighted covariance -----------------------------------------------------------------------


def test_covariance_with_no_weights_is_population_covariance_over_std():
    rng = np.random.default_rng(3)
    members = rng.normal(size=(4, 200)) + np.arange(4)[:, None]
    scores = rng.normal(size=(200, 3)) * [1.0, 2.0, 0.5] + [0.0, 5.0, -1.0]
    scores[:, 0] += 0.8 * members[0]  # one strong, known covariance
    got = covariance_with(members, scores)
    assert got.shape == (4, 3)

    def population(m: int, j: int) -> float:
        return np.cov(members[m], scores[:, j], bias=True)[0, 1] / np.std(scores[:, j])

    expected = np.array([[population(m, j) for j in range(3)] for m in range(4)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[0, 0] > 0.5


def test_covariance_with_integer_weights_equals_repeated_rows():
    rng = np.random.default_rng(4)
    n = 60
    members = rng.normal(size=(3, n))
    scores = rng.normal(size=(n, 2)) + 0.5 * members[1][:, None]
    weights = rng.integers(0, 4, size=(3, n)).astype(float)
    got = covariance_with(members, scores, weights)
    for m in range(3):
        counts = weights[m].astype(int)
        repeated = covariance_with(
            np.repeat(members[m], counts)[None, :], np.repeat(scores, counts, axis=0)
        )
        np.testing.assert_allclose(got[m], repeated[0], rtol=0, atol=1e-10)
    # the weights matter: unweighted is something else
    assert np.abs(got - covariance_with(members, scores)).max() > 1e-3


@pytest.mark.parametrize(
    "change",
    [
        lambda w: np.where(np.arange(w.size).reshape(w.shape) == 3, -1.0, w),
        lambda w: w[:, :-1],
        lambda w: w[:1],
        lambda w: np.vstack([w[:1], np.zeros_like(w[1:2]), w[2:]]),
    ],
    ids=["negative", "too-few-images", "too-few-members", "all-zero-row"],
)
def test_covariance_with_rejects_bad_weights(change):
    rng = np.random.default_rng(5)
    members, scores = rng.normal(size=(3, 20)), rng.normal(size=(20, 2))
    with pytest.raises(ValueError, match="weights must be non-negative"):
        covariance_with(members, scores, change(np.ones((3, 20))))


def test_covariance_with_rejects_mismatched_scores():
    with pytest.raises(ValueError, match=r"member scores have shape \(2, 5\) for 4 pool images"):
        covariance_with(np.zeros((2, 5)), np.zeros((4, 1)))


# --- bootstrap weights -------------------------------------------------------------------------


def test_pool_weights_none_is_all_ones():
    weights = pool_weights(3, 7, None)
    assert weights.shape == (3, 7)
    assert (weights == 1.0).all()


def test_pool_weights_are_deterministic_multinomial_counts():
    weights = pool_weights(5, 400, seed=11)
    assert weights.shape == (5, 400) and weights.dtype == np.float64
    assert (weights.sum(axis=1) == 400).all()
    assert (weights >= 0).all() and (weights == np.round(weights)).all()
    # a bootstrap resample leaves out about 1/e of the pool
    left_out = (weights == 0).mean(axis=1)
    assert np.all(np.abs(left_out - math.exp(-1)) < 0.08), left_out
    for a in range(5):
        for b in range(a + 1, 5):
            assert not np.array_equal(weights[a], weights[b])
    np.testing.assert_array_equal(weights, pool_weights(5, 400, seed=11))
    assert not np.array_equal(weights, pool_weights(5, 400, seed=12))
    # member m's counts do not depend on how many members there are
    np.testing.assert_array_equal(pool_weights(2, 400, seed=11), weights[:2])


# --- a planted world ---------------------------------------------------------------------------

N_POOL, DIM = 2000, 16
# attribute -> its axis in the image space; "Common" is an axis that every text shares
AXES = {"Hard": 0, "Young": 1, "Gray": 2, "Unrelated": 3, "Other": 4}
COMMON = 15
SLOPE, NOISE = 0.7, 1.0  # member scores: SLOPE * x[Hard] + noise (different per member)


class PlantedScorer:
    """Heads that score images by their Hard coordinate; texts that confound Gray with Young."""

    def __init__(self, n_members: int = 6, seed: int = 0):
        self.members = list(range(n_members))
        self.seed = seed
        self.text_calls: list[list[str]] = []

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        self.text_calls.append(list(texts))
        out = np.zeros((len(texts), DIM))
        for t, text in enumerate(texts):
            out[t, COMMON] = 3.0  # the modality gap: every text is far along one axis
            for how, name in MENTION.findall(text):
                sign = 1.0 if how == "with" else -1.0
                out[t, AXES[name]] += sign
                if name == "Gray":  # a sentence model reads "gray hair" as "old" too
                    out[t, AXES["Young"]] -= 0.9 * sign
        return out

    def image_features(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, dtype=np.float64)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        rows = []
        for m in self.members:
            rng = np.random.default_rng([self.seed, m])
            rows.append(SLOPE * features[:, AXES["Hard"]] + NOISE * rng.normal(size=len(features)))
        return np.stack(rows)


def planted_pool(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = {name: rng.random(N_POOL) < 0.5 for name in AXES}
    pool = rng.normal(0.0, 1.0, size=(N_POOL, DIM))
    for name, axis in AXES.items():
        pool[:, axis] += np.where(labels[name], 1.0, -1.0)
    return pool, labels


def planted_prompts() -> dict[str, list[tuple[str, str]]]:
    return {
        name: [(f"face with {name}", f"face without {name}"), (f"with {name}", f"without {name}")]
        for name in AXES
    }


@pytest.fixture(scope="module")
def planted():
    pool, labels = planted_pool()
    scorer = PlantedScorer()
    grounding = Grounding.build(scorer, pool, planted_prompts(), ridge=1e-3, bootstrap_seed=0)
    return grounding, pool, labels, scorer


def test_grounding_build_reads_the_scorer(planted):
    grounding, pool, _, scorer = planted
    assert grounding.attributes == tuple(AXES)
    assert grounding.pool.shape == (N_POOL, DIM)
    np.testing.assert_array_equal(grounding.pool, pool)
    assert grounding.member_scores.shape == (6, N_POOL)
    assert grounding.directions.shape == grounding.duals.shape == (len(AXES), DIM)
    assert grounding.weights.shape == (6, N_POOL)
    assert (grounding.weights.sum(axis=1) == N_POOL).all()
    assert len(scorer.text_calls) == 1 and len(scorer.text_calls[0]) == 4 * len(AXES)
    # the common axis cancels in the direction; Gray's direction also points away from Young
    gray = grounding.directions[AXES["Gray"]]
    assert gray[COMMON] == 0.0
    assert gray[AXES["Gray"]] == pytest.approx(2.0) and gray[AXES["Young"]] == pytest.approx(-1.8)
    # its dual does not
    dual = grounding.duals[list(AXES).index("Gray")]
    assert abs(dual[AXES["Young"]]) < 1e-2 * abs(dual[AXES["Gray"]])


def test_planted_hard_attribute_is_found_and_unrelated_is_zero(planted):
    grounding, pool, _, _ = planted
    diffs = grounding.attribute_diffs()
    assert diffs.shape == (6, len(AXES))
    mean = diffs.mean(axis=0)
    names = list(AXES)
    assert names[int(np.argmax(mean))] == "Hard"
    # SLOPE * std(x[Hard]) member standard deviations per standard deviation of the Hard score
    expected = SLOPE * pool[:, AXES["Hard"]].std()
    assert mean[names.index("Hard")] == pytest.approx(expected, abs=0.1)
    assert (diffs[:, names.index("Hard")] > 0.8).all()
    for name in ("Unrelated", "Other"):
        assert abs(mean[names.index(name)]) < 0.1, (name, mean)
    for name in ("Young", "Gray"):  # their duals mix two noisy axes: a little more slack
        assert abs(mean[names.index(name)]) < 0.15, (name, mean)
    # the bootstrap weights spread the members: with equal weights they agree more closely
    unweighted = grounded_diffs(grounding.member_scores, grounding.pool, grounding.duals)
    np.testing.assert_allclose(unweighted.mean(axis=0), mean, atol=0.1)
    assert diffs.std(axis=0).mean() > 1.5 * unweighted.std(axis=0).mean()


def test_dual_scores_classify_the_confounded_attribute_better(planted):
    grounding, pool, labels, _ = planted
    names = list(AXES)
    dual_scores = grounding.attribute_scores()
    plain_scores = standardized_scores(pool, grounding.directions)
    np.testing.assert_allclose(dual_scores.std(axis=0), 1.0, atol=1e-12)
    gray = names.index("Gray")
    dual_auc = auroc(dual_scores[:, gray], labels["Gray"])
    plain_auc = auroc(plain_scores[:, gray], labels["Gray"])
    assert dual_auc > plain_auc + 0.05, (dual_auc, plain_auc)
    assert dual_auc > 0.8
    # unconfounded attributes classify the same either way
    hard = names.index("Hard")
    assert auroc(dual_scores[:, hard], labels["Hard"]) == pytest.approx(
        auroc(plain_scores[:, hard], labels["Hard"]), abs=0.01
    )


class YoungScorer(PlantedScorer):
    """Heads whose loss estimate rises with the Young coordinate only."""

    def score_features(self, features: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        noise = rng.normal(size=(len(self.members), len(features)))
        return features[:, AXES["Young"]] + 0.5 * noise


def test_dual_removes_a_confound_from_the_estimate():
    pool, _ = planted_pool(seed=1)
    grounding = Grounding.build(YoungScorer(4), pool, planted_prompts(), 1e-3, bootstrap_seed=5)
    names = list(AXES)
    young, gray = names.index("Young"), names.index("Gray")
    diffs = grounding.attribute_diffs()
    np.testing.assert_array_equal(
        diffs, grounded_diffs(grounding.member_scores, pool, grounding.duals, grounding.weights)
    )
    # Young's dual must be orthogonal to Gray's direction (2 e_Gray - 1.8 e_Young), so it is
    # e_Young + 0.9 e_Gray: its score correlates 1 / sqrt(1 + 0.9^2) with the Young coordinate
    expected = pool[:, AXES["Young"]].std() / math.sqrt(1 + 0.9**2)
    assert diffs[:, young].mean() == pytest.approx(expected, abs=0.1)
    assert abs(diffs[:, gray].mean()) < 0.1
    # the plain Gray direction points away from Young, so it would call Gray better
    plain = grounded_diffs(grounding.member_scores, pool, grounding.directions, grounding.weights)
    assert plain[:, gray].mean() < -0.8


CELLS = (("TT", True, True), ("TF", True, False), ("FT", False, True), ("FF", False, False))


def test_pair_cells_are_antisymmetric(planted):
    grounding, _, _, _ = planted
    pairs = [("Hard", "Young"), ("Gray", "Unrelated")]
    cells = grounding.pair_cells(pairs, CELLS)
    assert cells.shape == (6, 2, 4)
    np.testing.assert_allclose(cells[:, :, 0], -cells[:, :, 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cells[:, :, 1], -cells[:, :, 2], rtol=0, atol=1e-12)
    # Hard & Young: the cell with Hard present is the worst, with Hard absent the best
    hard_young = cells[:, 0].mean(axis=0)
    assert hard_young[:2].min() > 0.5 and hard_young[2:].max() < -0.5
    assert abs(cells[:, 1].mean(axis=0)).max() < 0.1
    assert grounding.pair_cells([], CELLS).shape == (6, 0, 4)


def test_pair_cells_compose_the_attribute_scores():
    pool, _ = planted_pool(seed=3)
    grounding = Grounding.build(PlantedScorer(3), pool, planted_prompts(), 1e-3, None)
    names = list(AXES)
    diffs = grounding.attribute_diffs()
    z = grounding.attribute_scores()
    a, b = names.index("Hard"), names.index("Other")
    tt = grounding.pair_cells([("Hard", "Other")], CELLS)[:, 0, 0]
    np.testing.assert_allclose(tt, (diffs[:, a] + diffs[:, b]) / (z[:, a] + z[:, b]).std())
    tf = grounding.pair_cells([("Hard", "Other")], CELLS)[:, 0, 1]
    np.testing.assert_allclose(tf, (diffs[:, a] - diffs[:, b]) / (z[:, a] - z[:, b]).std())


def test_pair_cells_name_an_unknown_attribute(planted):
    grounding, _, _, _ = planted
    with pytest.raises(ValueError, match="pair attribute 'Bald' has no probe"):
        grounding.pair_cells([("Hard", "Young"), ("Gray", "Bald")], CELLS)


def test_build_needs_a_grounding_scorer():
    class TextsOnly:
        members = (0, 1)

        def image_features(self, embeddings):
            return embeddings

        def score_features(self, features):
            return np.zeros((2, len(features)))

    pool, _ = planted_pool()
    with pytest.raises(TypeError, match=r"text_features.*estimator='direct'"):
        Grounding.build(TextsOnly(), pool, planted_prompts(), 0.1)


# --- through build_report ----------------------------------------------------------------------

WEIGHTS = np.array([EFFECTS[name] for name in CELEBA_ATTRIBUTES])


class GroundingFakeScorer(FakeScorer):
    """FakeScorer's text scores, plus heads that read the planted effects off image features."""

    def __init__(self, noise: float = 0.15):
        super().__init__(noise)
        self.feature_calls = 0

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        return fake_encode_texts(texts)

    def image_features(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, dtype=np.float64)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        self.feature_calls += 1
        rows = []
        for m in range(len(self.members)):
            rng = np.random.default_rng(zlib.crc32(f"member {m}".encode()))
            weights = WEIGHTS + rng.normal(0, 0.1, WEIGHTS.shape)
            rows.append(10.0 * features @ weights + rng.normal(0, 0.3, len(features)))
        return np.stack(rows)


def grounded_report(layout, out, scorer, **kwargs):
    return build_report(
        layout,
        scorer,
        fake_encode_texts,
        out_dir=out,
        prompt_pairs=fake_prompt_pairs,
        compose_prompt=fake_composed_prompt,
        pair_templates=("face of {}",),
        auroc_fn=auroc,
        **kwargs,
    )


def test_build_report_grounded(tmp_path):
    layout = write_planted_world(tmp_path / "home")
    scorer = GroundingFakeScorer()
    result = grounded_report(
        layout, tmp_path / "out", scorer, estimator="grounded", pairs=[("Eyeglasses", "Male")]
    )
    assert result.estimator == "grounded"
    assert scorer.feature_calls == 1
    assert set(result.top_attributes[:2]) == set(PLANTED)
    table = result.attribute_table
    assert {"est_direct_mean", "zero_shot_auroc_dual", "est_mean"} <= set(table.columns)
    assert table.height == len(CELEBA_ATTRIBUTES)
    eyeglasses = table.row(by_predicate=pl.col("attribute") == "Eyeglasses", named=True)
    assert eyeglasses["est_rank"] in (1, 2) and eyeglasses["bh_significant"]
    # the direct estimate is kept: FakeScorer's text scores give about the planted effect
    assert eyeglasses["est_direct_mean"] == pytest.approx(2.0, abs=0.2)
    # the dual scores classify the attribute they probe
    assert eyeglasses["zero_shot_auroc_dual"] > 0.7
    dual = table.filter(pl.col("attribute") != "Blurry")["zero_shot_auroc_dual"]
    assert dual.is_finite().all() and dual.mean() > 0.7
    absent = table.row(by_predicate=pl.col("attribute") == "Blurry", named=True)
    assert math.isnan(absent["zero_shot_auroc_dual"])
    h = result.headline
    assert math.isfinite(h["spearman_signed_direct"]) and h["spearman_signed_direct"] > 0.5
    assert h["spearman_signed_overall"] > 0.5
    assert h["spearman_signed_direct"] != h["spearman_signed_overall"]
    assert result.pair_table.height == 1 and result.pair_cells.height == 4
    assert "direct" in set(result.table("table2")["group"])


def test_build_report_rejects_an_unknown_estimator(tmp_path):
    layout = write_planted_world(tmp_path / "home")
    with pytest.raises(ValueError, match=r"estimator must be one of \['grounded', 'direct'\]"):
        grounded_report(layout, tmp_path / "out", GroundingFakeScorer(), estimator="nope")


def test_build_report_grounded_needs_a_grounding_scorer(tmp_path):
    layout = write_planted_world(tmp_path / "home")
    with pytest.raises(TypeError, match="estimator='direct'"):
        grounded_report(layout, tmp_path / "out", FakeScorer(), estimator="grounded", pairs=[])


def test_degenerate_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"probe 1 has no direction.*identical"):
        dual_directions(np.array([[1.0, 0.0], [0.0, 0.0]]), 0.1)
    with pytest.raises(ValueError, match=r"linearly dependent; use a dual ridge > 0"):
        dual_directions(np.array([[1.0, 0.0], [2.0, 0.0]]), 0.0)
    with pytest.raises(ValueError, match=r"ridge must be >= 0"):
        dual_directions(np.eye(2), -1.0)
    with pytest.raises(ValueError, match=r"needs images, got 0"):
        pool_weights(2, 0, 0)
