"""Statistics of text comparisons over ensemble members, and their charts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm2loss_pipeline.core.heads.compare import compare_members, rank_texts
from llm2loss_pipeline.core.heads.ensemble import MemberInfo
from llm2loss_pipeline.core.heads.plots import plot_comparison, plot_ranking
from llm2loss_pipeline.core.heads.probe_reading import ProbeReading
from llm2loss_pipeline.core.report.calibration import Calibration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def members(kinds: list[str]) -> list[MemberInfo]:
    return [MemberInfo(i, kind, "linear", i) for i, kind in enumerate(kinds)]


def test_hand_checked_quartiles_and_probability():
    # numpy "linear" quantiles of [-1, 0, 1, 2, 3]: positions 1, 2, 3 are exact order statistics
    result = compare_members(np.array([-1.0, 0.0, 1.0, 2.0, 3.0]), members(["regressor"] * 5))
    stats = result.overall
    assert (stats.min, stats.q1, stats.median, stats.q3, stats.max) == (-1, 0, 1, 2, 3)
    assert stats.mean == 1.0
    assert stats.p_greater == pytest.approx(0.7)  # 3 above zero, the tie at 0 counts one half
    assert (stats.n_positive, stats.n_negative, stats.n_agree) == (3, 1, 3)
    assert list(result.groups) == ["regressor", "overall"]


def test_interpolated_quartiles_follow_numpy_linear():
    diffs = np.array([0.5, -2.0, 4.0, 1.0])
    stats = compare_members(diffs, members(["ranker"] * 4)).overall
    # sorted [-2, 0.5, 1, 4]; q1 at position 0.75 -> -2 + 0.75 * 2.5, q3 at 2.25 -> 1 + 0.25 * 3
    assert stats.q1 == pytest.approx(-0.125) and stats.q3 == pytest.approx(1.75)
    assert stats.median == pytest.approx(0.75)


def test_swapping_texts_mirrors_the_statistics():
    rng = np.random.default_rng(0)
    kinds = ["regressor"] * 10 + ["ranker"] * 10
    diffs = rng.normal(0.3, 1.0, 20)
    diffs[3] = 0.0  # a tie
    ab = compare_members(diffs, members(kinds), "a", "b")
    ba = compare_members(-diffs, members(kinds), "b", "a")
    for name in ("regressor", "ranker", "overall"):
        x, y = ab.groups[name], ba.groups[name]
        assert x.q1 == pytest.approx(-y.q3) and x.q3 == pytest.approx(-y.q1)
        assert x.min == pytest.approx(-y.max) and x.median == pytest.approx(-y.median)
        assert x.mean == pytest.approx(-y.mean)
        assert x.p_greater == pytest.approx(1.0 - y.p_greater)
    assert ab.groups["regressor"].n == 10 and ab.overall.n == 20


def test_verdicts_and_their_thresholds():
    kinds = ["regressor"] * 10 + ["ranker"] * 10
    confident = compare_members(np.r_[np.ones(18), -np.ones(2)], members(kinds), "old", "young")
    assert confident.verdict == (
        "the model is expected to do worse on A ('old') than on B ('young'); 18 of 20 members agree"
    )
    reversed_ = compare_members(np.r_[-np.ones(17), np.ones(3)], members(kinds), "old", "young")
    assert reversed_.verdict.startswith("the model is expected to do worse on B ('young')")
    assert "17 of 20 members agree" in reversed_.verdict
    uncertain = compare_members(np.r_[np.ones(11), -np.ones(9)], members(kinds), "x", "y")
    assert uncertain.verdict.startswith("uncertain: 11 of 20 members")
    # exactly at the threshold (P = 0.8) counts as agreement
    edge = compare_members(np.r_[np.ones(16), -np.ones(4)], members(kinds))
    assert edge.verdict.startswith("the model is expected")
    flat = compare_members(np.zeros(20), members(kinds))
    assert flat.verdict.startswith("no difference") and flat.p_greater == 0.5
    # an even split names no side: it used to call A worse whichever text was A
    split = np.r_[np.ones(10), -np.ones(10)]
    ab = compare_members(split, members(kinds), "man", "eyebrows")
    ba = compare_members(-split, members(kinds), "eyebrows", "man")
    assert ab.verdict == (
        "evenly split: 10 of 20 members expect the model to do worse on A ('man'), "
        "10 on B ('eyebrows')"
    )
    assert ba.verdict.startswith("evenly split: 10 of 20")
    assert "worse on A ('eyebrows')" in ba.verdict


def test_comparison_serialises_to_json():
    result = compare_members(np.array([0.2, -0.1, 0.4]), members(["regressor", "ranker", "ranker"]))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["verdict"] == result.verdict
    assert data["groups"]["ranker"]["n"] == 2 and data["groups"]["overall"]["n_agree"] == 2
    assert data["p_a_worse"] == pytest.approx(2 / 3)
    assert [m["diff"] for m in data["members"]] == [0.2, -0.1, 0.4]


def test_bad_differences_are_rejected():
    with pytest.raises(ValueError, match="2 differences for 3 members"):
        compare_members(np.zeros(2), members(["ranker"] * 3))
    with pytest.raises(ValueError, match="NaN"):
        compare_members(np.array([0.0, np.nan]), members(["ranker"] * 2))


def test_rank_texts_orders_worst_first_with_intervals():
    scores = np.array([[0.0, 2.0, -1.0], [1.0, 3.0, -2.0], [0.5, 1.0, 0.0]])
    rows = rank_texts(["mid", "top", "low"], scores, members(["regressor", "ranker", "ranker"]))
    assert [r["text"] for r in rows] == ["top", "mid", "low"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    top = rows[0]
    assert top["mean"] == pytest.approx(2.0) and (top["min"], top["max"]) == (1.0, 3.0)
    assert top["q1"] == pytest.approx(1.5) and top["q3"] == pytest.approx(2.5)
    assert top["groups"]["regressor"]["mean"] == 2.0 and top["groups"]["ranker"]["n"] == 2
    json.dumps(rows)
    with pytest.raises(ValueError, match=r"scores must be \[3, 2\]"):
        rank_texts(["a", "b"], scores, members(["ranker"] * 3))


def test_grounded_rank_answers_each_text_as_compare_answers_it_against_the_average():
    kinds = ["regressor"] * 4 + ["ranker"] * 4
    rng = np.random.default_rng(3)
    scores = np.stack(
        [rng.normal(0.6, 0.05, 8), rng.normal(0.1, 0.05, 8), rng.normal(-1.0, 0.05, 8)], 1
    )
    cal = Calibration("grounded", slope=1.0, text_error=0.3, n_attributes=40)
    texts = ["a goatee", "a cat", "a young woman"]
    rows = rank_texts(texts, scores, members(kinds), "grounded", cal)
    by_text = {row["text"]: row for row in rows}
    for t, text in enumerate(texts):  # the same P as compare's for those member values
        same = compare_members(scores[:, t], members(kinds), text, "the average", "grounded", cal)
        assert by_text[text]["p_worse"] == pytest.approx(same.p_a_worse)
    # free text's error (at least 0.6) keeps +0.6 short of a claim; -1.0 is one
    assert by_text["a goatee"]["verdict"] == "cannot tell"
    assert 0.8 < by_text["a goatee"]["p_worse"] < 0.9
    assert by_text["a young woman"]["verdict"] == "better than the average"
    assert "average of the texts ranked" in rows[0]["units"]
    worse = rank_texts(texts, scores + 1.0, members(kinds), "grounded", cal)
    assert worse[0]["verdict"] == "worse than the average" and worse[0]["p_worse"] >= 0.9
    # a contrast one report probe holds takes the report's answer, read for its side
    held = ProbeReading("Male", share=0.9, sign=-1, p_worse=0.97, resolves=True)
    routed = rank_texts(texts, scores, members(kinds), "grounded", cal, [held, None, None])
    goatee = next(row for row in routed if row["text"] == "a goatee")
    assert goatee["p_worse"] == pytest.approx(0.03) and goatee["asked_as"] == "Male"
    assert goatee["verdict"] == "better than the average"
    # without a report, or for the paper's estimate, no probability is attached
    for plain in (
        rank_texts(texts, scores, members(kinds), "grounded"),
        rank_texts(texts, scores, members(kinds), "direct", cal, [held, None, None]),
    ):
        assert all(r["p_worse"] is None and r["verdict"] == "uncalibrated" for r in plain)
        assert all(r["asked_as"] is None for r in plain)
    assert "training average" in plain[0]["units"]
    json.dumps(rows)


def test_plots_write_png_files(tmp_path):
    kinds = ["regressor"] * 4 + ["ranker"] * 4
    comparison = compare_members(
        np.linspace(-0.5, 2.0, 8), members(kinds), "face of an old male", "face of a young female"
    )
    out = plot_comparison(comparison, tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    scores = np.random.default_rng(0).normal(size=(8, 3))
    ranking = rank_texts(["a hat", "glasses", "a smile"], scores, members(kinds))
    assert plot_ranking(ranking, tmp_path / "rank.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "rank.png"]  # no temp files
    with pytest.raises(ValueError, match="empty"):
        plot_ranking([], tmp_path / "none.png")
