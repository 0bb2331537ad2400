"""Groups estimated from text (core/report/group_estimates.py), against hand computations: the
text's side of each image, the members' means over it, and the estimated worst group."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.report import html
from llm2loss_pipeline.core.report.grounded import Grounding
from llm2loss_pipeline.core.report.group_estimates import (
    estimate_agreement,
    estimate_groups,
    estimated_worst_sentence,
    text_membership,
    two_means_threshold,
)
from llm2loss_pipeline.core.report.groups import group_table
from llm2loss_pipeline.core.task import TaskConfig

BLOND_TASK = TaskConfig(kind="attribute", target="Blond_Hair")
LOSS = np.array([2.0, 1.0, 0.5, 1.5, 0.1, 0.3, 0.2, 0.2, 0.5, 0.1, 0.9, 0.2])
BLOND = [True] * 6 + [False] * 6
MALE = [True, True, True, True, False, False, True, True, True, False, False, False]
# The text's Male score of each image: sample 3, a blond man, looks like a woman to the probe.
LOOKS_MALE = [1.0, 1.1, 0.9, -1.0, -1.1, -0.9, 1.0, 1.2, 0.8, -1.0, -1.2, -0.8]


def _frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": [f"{i:06d}.jpg" for i in range(12)],
            "identity": [1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 6, 6],
            "Blond_Hair": BLOND,
            "Male": MALE,
            "Eyeglasses": [i % 2 == 0 for i in range(12)],
            "correct": [bool(x < 1.0) for x in LOSS],
            "loss": LOSS,
        }
    )


def _grounding(weights: np.ndarray | None = None) -> Grounding:
    """Two members: member 0 estimates the loss itself, member 1 twice it. Male's dual reads
    the first pool dimension."""
    pool = np.stack([LOOKS_MALE, np.linspace(0, 1, 12)], axis=1)
    scores = np.stack([LOSS, 2 * LOSS])
    return Grounding(
        attributes=("Male",),
        pool=pool,
        member_scores=scores,
        directions=np.array([[1.0, 0.0]]),
        duals=np.array([[1.0, 0.0]]),
        ridge=0.1,
        weights=np.ones_like(scores) if weights is None else weights,
    )


def _estimated(min_group_size: int = 2, weights: np.ndarray | None = None) -> pl.DataFrame:
    frame = _frame()
    table = group_table(frame, ["Male", "Eyeglasses"], BLOND_TASK, 2, group_by=["Male"])
    ids = frame["sample_id"].to_list()
    return estimate_groups(table, _grounding(weights), ids, frame, "Blond_Hair", min_group_size)


def _row(table: pl.DataFrame, group: str) -> dict:
    return table.filter(pl.col("group") == group).to_dicts()[0]


def test_two_means_threshold_splits_two_clusters():
    assert 0.2 < two_means_threshold(np.array([0.0, 0.1, 0.2, 5.0, 5.1])) < 5.0
    # a cluster of 3 near 0 and 1 at 10: the midpoint of the means (0.1, 10), not the median
    assert two_means_threshold(np.array([0.0, 0.1, 0.2, 10.0])) == pytest.approx(5.05)
    assert two_means_threshold(np.full(4, 2.0)) == 2.0  # no split: the median
    sides = text_membership(np.array([[0.0, 1.0], [0.1, 0.0], [3.0, 0.9]]))
    assert sides.tolist() == [[False, True], [False, False], [True, True]]


def test_groups_are_the_texts_images_and_the_members_means_over_them():
    table = _estimated()
    # the text's blond men: samples 0-2 (sample 3 reads as a woman); members 7/6 and 14/6
    blond_men = _row(table, "blond men")
    assert blond_men["n"] == 4 and blond_men["est_n"] == 3
    assert blond_men["est_loss"] == pytest.approx((3.5 / 3 + 7.0 / 3) / 2)
    # the text's blond women: samples 3-5, (1.5 + 0.1 + 0.3) / 3 and twice it
    assert _row(table, "blond women")["est_loss"] == pytest.approx(1.9 / 3 * 1.5)
    assert _row(table, "non-blond women")["est_loss"] == pytest.approx(0.4 * 1.5)
    q1, q3 = blond_men["est_loss_q1"], blond_men["est_loss_q3"]
    assert 3.5 / 3 < q1 < q3 < 7.0 / 3  # quartiles of the two members' means
    assert table.filter(pl.col("est_worst"))["group"].to_list() == ["blond men"]
    # an attribute without a probe in the grounding is not estimated, and never chosen
    glasses = table.filter(pl.col("attribute") == "Eyeglasses")
    assert glasses["est_loss"].is_null().all() and glasses["est_n"].is_null().all()


def test_the_estimated_worst_is_declared_and_large_enough_by_the_texts_count():
    # min 4 images: the text gives every declared cell 3, so none is chosen
    table = _estimated(min_group_size=4)
    assert not table["est_worst"].any()
    assert estimated_worst_sentence(table) is None
    assert math.isnan(estimate_agreement(table)["worst_group_estimated_agrees"])


def test_a_member_that_drew_no_image_of_a_group_is_left_out_of_it():
    weights = np.ones((2, 12))
    weights[1, :3] = 0.0  # member 1's bootstrap drew none of the text's blond men
    row = _row(_estimated(weights=weights), "blond men")
    assert row["est_loss"] == pytest.approx(3.5 / 3)


def test_agreement_and_sentence_name_the_measured_worst_group():
    table = _estimated()
    numbers = estimate_agreement(table)
    assert numbers["worst_group_estimated_agrees"] == 1.0
    assert numbers["worst_group_estimated_rank"] == 1.0
    # two declared cells are small (one identity each): too few left to correlate
    assert math.isnan(numbers["group_spearman_estimated"])
    # all four: measured mean loss 1.25, 0.4, 0.3, 0.2 (blond men, non-blond women, non-blond
    # men, blond women) against estimates 1.75, 0.6, 0.45, 0.95: rank differences 0, 1, 1, -2,
    # Spearman 1 - 6 * 6 / (4 * 15)
    everyone = estimate_agreement(table.with_columns(small_group=pl.lit(False)))
    assert everyone["group_spearman_estimated"] == pytest.approx(0.4)
    # the declared cells by estimate: blond men, blond women, non-blond women, non-blond men
    ranks = dict(zip(table["group"], table["est_rank"], strict=True))
    assert [ranks[g] for g in ("blond men", "blond women", "non-blond women")] == [1, 2, 3]
    assert ranks["non-blond men"] == 4 and ranks["blond people with eyeglasses"] is None
    assert estimated_worst_sentence(table) == (
        "worst groups estimated from text, without the attribute's labels: blond men (the "
        "heads' loss +1.75 member sd, quartiles +1.46 to +2.04; the text puts 3 images there), "
        "then blond women (+0.95), non-blond women (+0.60); the measured worst group is the "
        "first of them"
    )
    second = table.with_columns(worst=pl.col("group") == "blond women")
    assert estimate_agreement(second)["worst_group_estimated_agrees"] == 0.0
    assert estimate_agreement(second)["worst_group_estimated_rank"] == 2.0
    assert estimated_worst_sentence(second).endswith(
        "the measured worst group is the second of them"
    )
    fourth = table.with_columns(worst=pl.col("group") == "non-blond men")
    assert estimated_worst_sentence(fourth).endswith(
        "the measured worst group (non-blond men) is not among them"
    )


def test_a_pool_image_without_a_target_label_is_named():
    frame = _frame()
    table = group_table(frame, ["Male"], BLOND_TASK, 2)
    ids = [*frame["sample_id"].to_list()[:-1], "999999.jpg"]
    with pytest.raises(ValueError, match=r"pool image '999999.jpg' has no label of the task's"):
        estimate_groups(table, _grounding(), ids, frame, "Blond_Hair", 2)


def test_the_html_shows_the_estimated_worst_group_even_below_the_shown_rows(monkeypatch):
    monkeypatch.setattr(html, "N_GROUPS_SHOWN", 1)
    table = _estimated().with_columns(est_worst=pl.col("group") == "non-blond women")
    first = table.row(0, named=True)["group"]
    assert first != "non-blond women"
    section = "".join(html._groups_section(SimpleNamespace(groups=table, eval_split="test")))
    body = section.split("<tbody>")[1]
    assert body.count("<tr") == 2 and first in body and "non-blond women" in body
    assert "images by text" in section and "Estimated from text" in section
