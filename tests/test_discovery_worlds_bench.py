"""bench/discovery_worlds.py's scoring on synthetic inputs: which attributes a mode names, planted
recall in the top k, and a mode's population truth with its identity-clustered interval."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.truth import condition_truth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "discovery_worlds", ROOT / "bench" / "discovery_worlds.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth(gap: float, low: float) -> dict[str, float]:
    return {"truth_gap": gap, "truth_low": low, "truth_high": 2 * gap - low, "truth_se": 0.1}


def test_a_mode_names_its_shown_values_else_its_own(bench) -> None:
    row = {"shown_attributes": "Goatee, not No_Beard", "attributes": "Wearing_Hat"}
    assert bench.mode_condition(row) == {"Goatee": True, "No_Beard": False}
    # words the images do not show: the candidate's own values
    assert bench.mode_condition({"shown_attributes": None, "attributes": "not Smiling"}) == {
        "Smiling": False
    }
    assert bench.mode_condition({"shown_attributes": "", "attributes": ""}) == {}


def test_recall_counts_planted_values_named_true_in_the_top_k_only(bench) -> None:
    modes = [
        {"Gray_Hair": True},
        {"No_Beard": False, "Goatee": False},  # names Goatee, but as absent: not found
        {"Smiling": True},
        {"Goatee": True},  # fourth: past k = 1 + 2
    ]
    truths = [_truth(0.5, 0.2), _truth(0.3, -0.1), None, _truth(-0.4, -0.6)]
    scores = bench.score_modes(modes, truths, ["Goatee"])
    assert scores["k"] == 3 and scores["planted_found"] == []
    assert scores["planted_recall"] == 0.0 and scores["all_planted_in_top_k"] is False
    # backed: gap > 0 and the 95% interval above 0; no condition is not backed
    assert scores["backed"] == [True, False, False, False]
    assert scores["n_backed_top_k"] == 1 and scores["n_top_k"] == 3
    # a goatee folded under the first mode: found under a broader word, counted apart
    variants = [[{"Goatee": True}], [], [], []]
    folded = bench.score_modes(modes, truths, ["Goatee"], variants)
    assert folded["planted_found"] == [] and folded["planted_in_variants"] == ["Goatee"]
    two = bench.score_modes(modes, truths, ["Gray_Hair", "Goatee"])  # k = 4
    assert two["planted_found"] == ["Gray_Hair", "Goatee"] and two["planted_recall"] == 1.0
    nothing = bench.score_modes([], [], [])
    assert math.isnan(nothing["planted_recall"]) and nothing["all_planted_in_top_k"] is None
    with pytest.raises(ValueError, match="2 modes but 1 truths"):
        bench.score_modes(modes[:2], truths[:1], [])


def test_summary_counts_worlds_with_plantings_and_every_mode(bench) -> None:
    worlds = [
        {"planted": {}, "all_planted_in_top_k": None, "planted_recall": math.nan,
         "n_modes": 2, "n_backed": 1, "n_backed_top_k": 1, "n_top_k": 2},
        {"planted": {"Goatee": 0.9}, "all_planted_in_top_k": True, "planted_recall": 1.0,
         "n_modes": 5, "n_backed": 5, "n_backed_top_k": 3, "n_top_k": 3},
        {"planted": {"Bald": 0.7, "Big_Lips": 0.6}, "all_planted_in_top_k": False,
         "planted_recall": 0.5, "n_modes": 3, "n_backed": 2, "n_backed_top_k": 2, "n_top_k": 3},
    ]  # fmt: skip
    s = bench.summarize(worlds)
    assert s["worlds_with_planting"] == 2 and s["all_planted_in_top_k"] == 1
    assert s["share_all_planted_in_top_k"] == 0.5 and s["mean_planted_recall"] == 0.75
    assert s["n_modes"] == 10 and s["share_backed"] == 0.8
    assert s["share_backed_top_k"] == pytest.approx(6 / 8)


def test_condition_truth_is_the_group_against_the_rest_clustered_by_identity() -> None:
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(40), 10)
    goatee = np.repeat(rng.random(40) < 0.3, 10)  # identity-level
    hat = rng.random(400) < 0.5
    loss = rng.normal(0, 0.1, 400) + 1.0 * (goatee & hat)
    table = pl.DataFrame({"identity": identity, "Goatee": goatee, "Wearing_Hat": hat})
    both = condition_truth(loss, table, {"Goatee": True, "Wearing_Hat": True})
    meets = goatee & hat
    assert both["n_true"] == int(meets.sum())
    assert both["truth_gap"] == pytest.approx(loss[meets].mean() - loss[~meets].mean())
    assert both["truth_low"] > 0.5 and both["truth_high"] > both["truth_gap"]
    assert both["truth_high"] - both["truth_gap"] == pytest.approx(1.959964 * both["truth_se"])
    # the absent side of the same condition is better than the rest
    assert condition_truth(loss, table, {"Goatee": False})["truth_gap"] < 0
    with pytest.raises(ValueError, match="'Bald' is not a population column"):
        condition_truth(loss, table, {"Bald": True})
    with pytest.raises(ValueError, match="at least one attribute value"):
        condition_truth(loss, table, {})
    empty = condition_truth(
        loss, table.with_columns(pl.lit(False).alias("Goatee")), {"Goatee": True}
    )
    assert math.isnan(empty["truth_gap"]) and empty["n_true"] == 0


def test_rediscover_settings_are_validated(bench) -> None:
    config = bench.discovery_config(["min_p_worse=0.55", "alpha=0.1"])
    assert config.min_p_worse == 0.55 and config.alpha == 0.1
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench.discovery_config(["min_p_worse"])
    with pytest.raises(ValueError, match="min_p_worse"):
        bench.discovery_config(["min_p_worse=0.4"])  # must stay above 1/2


def test_a_value_the_modes_share_is_scored_against_the_population(bench) -> None:
    from llm2loss_pipeline.core.discovery.shared import SharedTrait

    # 20 identities of 5 images: the men (first 10) do worse, the smiling are no different
    identity = np.repeat(np.arange(20), 5)
    male = identity < 10
    smiling = np.tile([True, False, True, False, True], 20)
    table = pl.DataFrame({"identity": identity, "Male": male, "Smiling": smiling})
    loss = np.where(male, 1.0, 0.2) + 0.05 * (identity % 3)

    def trait(attribute: str, worse: bool) -> SharedTrait:
        return SharedTrait(attribute, True, "words", (1, 2, 3), 4, 0.5, 0.8, 0.3, 0.01, worse)

    scored = bench.score_shared([trait("Male", True), trait("Smiling", False)], loss, table)
    male_truth = condition_truth(loss, table, {"Male": True})
    assert scored[0]["truth_gap"] == pytest.approx(male_truth["truth_gap"])
    assert scored[0]["truth_gap"] > 0.7
    assert scored[0]["backed"] and not scored[1]["backed"]
    assert scored[0]["label"] == "Male" and scored[0]["modes"] == [1, 2, 3]
    world = {"n_modes": 4, "n_backed": 0, "n_top_k": 0, "n_backed_top_k": 0, "planted": {}}
    planted = {"planted": {"Male": 0.9, "Bangs": 0.6}, "planted_recall": 0.5}
    planted |= {"all_planted_in_top_k": False, "planted_shared": ["Male"]}
    summary = bench.summarize([{**world, **planted, "shared": scored}, {**world, "shared": None}])
    assert (summary["n_shared"], summary["n_shared_worse"]) == (2, 1)
    assert summary["n_shared_worse_backed"] == 1 and summary["n_shared_not_worse_backed"] == 0
    assert (summary["n_planted_shared"], summary["n_planted"]) == (1, 2)
