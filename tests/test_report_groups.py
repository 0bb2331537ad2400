"""Per-group accuracy and the worst group (core/report/groups.py), against hand computations."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.report.groups import (
    clustered_mean,
    describe,
    group_table,
    report_groups,
    worst_group,
    worst_group_sentence,
)
from llm2loss_pipeline.core.task import TaskConfig

BLOND_TASK = TaskConfig(kind="attribute", target="Blond_Hair")


def _frame() -> pl.DataFrame:
    """12 samples, 6 identities. Blond men (ids 1, 2): 1 of 4 right; blond women (3): 2 of 2;
    dark men (4): 3 of 3; dark women (5, 6): 2 of 3."""
    rows = [
        # identity, blond, male, correct, loss
        (1, True, True, False, 2.0),
        (1, True, True, False, 1.0),
        (2, True, True, True, 0.5),
        (2, True, True, False, 1.5),
        (3, True, False, True, 0.1),
        (3, True, False, True, 0.3),
        (4, False, True, True, 0.2),
        (4, False, True, True, 0.2),
        (4, False, True, True, 0.2),
        (5, False, False, True, 0.1),
        (6, False, False, False, 0.9),
        (6, False, False, True, 0.2),
    ]
    identity, blond, male, correct, loss = zip(*rows, strict=True)
    return pl.DataFrame(
        {
            "sample_id": [f"{i:06d}.jpg" for i in range(len(rows))],
            "identity": list(identity),
            "Blond_Hair": list(blond),
            "Male": list(male),
            "correct": list(correct),
            "loss": list(loss),
        }
    )


def test_clustered_mean_by_hand():
    # values 0,0 (cluster a) and 1,0 (cluster b): mean 1/4; residual sums -1/2 and +1/2;
    # variance G/(G-1) * (1/4 + 1/4) / n^2 = 2 * 0.5 / 16
    mean, se = clustered_mean(np.array([0.0, 0.0, 1.0, 0.0]), np.array(["a", "a", "b", "b"]))
    assert mean == 0.25
    assert se == pytest.approx(math.sqrt(2 * 0.5 / 16))
    assert math.isnan(clustered_mean(np.array([1.0, 0.0]), np.array([1, 1]))[1])


def test_attribute_task_groups_are_target_by_attribute_cells():
    table = group_table(_frame(), ["Blond_Hair", "Male"], BLOND_TASK, min_group_size=2)
    assert table.height == 4  # the target is not crossed with itself
    cells = {(r["target_value"], r["value"]): r for r in table.to_dicts()}
    blond_men = cells[(True, True)]
    assert blond_men["group"] == "blond men"
    assert (blond_men["n"], blond_men["n_identities"]) == (4, 2)
    assert blond_men["accuracy"] == 0.25
    assert blond_men["mean_loss"] == pytest.approx(1.25)
    assert cells[(True, False)]["group"] == "blond women"
    assert cells[(True, False)]["small_group"]  # one identity: no clustered error
    assert cells[(False, False)]["accuracy"] == pytest.approx(2 / 3)
    assert cells[(False, True)]["group"] == "non-blond men"
    # worst: the lowest accuracy among groups that are not small
    assert worst_group(table)["group"] == "blond men"
    assert table["worst"].to_list() == [True, False, False, False]
    # se by hand as in test_clustered_mean_by_hand: residual sums -1/2 and +1/2 -> 0.25
    assert blond_men["accuracy_se"] == pytest.approx(0.25)
    assert blond_men["accuracy_upper"] == pytest.approx(0.25 + 1.645 * 0.25)
    assert cells[(False, False)]["accuracy_upper"] <= 1.0  # a bound, not past certainty
    assert worst_group_sentence(worst_group(table)) == (
        "worst group: blond men, accuracy 0.25 (90% upper bound 0.66; n=4, 2 identities; "
        "mean loss 1.250)"
    )


def test_other_tasks_group_by_each_attribute_value():
    table = group_table(_frame(), ["Blond_Hair", "Male"], TaskConfig(), min_group_size=5)
    assert sorted(table["group"].to_list()) == ["blond people", "men", "non-blond people", "women"]
    men = table.filter(pl.col("group") == "men").row(0, named=True)
    assert (men["n"], men["accuracy"]) == (7, pytest.approx(4 / 7))
    blond = table.filter(pl.col("group") == "blond people").row(0, named=True)
    assert (blond["n"], blond["accuracy"]) == (6, 0.5)  # 3 of 6: below the men's 4 of 7
    assert table.filter(pl.col("worst"))["group"].to_list() == ["blond people"]
    # every group small: no worst group
    none = group_table(_frame(), ["Male"], TaskConfig(), min_group_size=100)
    assert worst_group(none) is None
    assert "none" in worst_group_sentence(None)


def test_group_by_declares_the_groups_the_worst_is_chosen_from(tmp_path):
    # over all cells "blond people" (3 of 6) is the lowest; declared by Male, "men" (4 of 7) is
    # the worst group, and the sentence names the lower cell after it
    table = group_table(_frame(), ["Blond_Hair", "Male"], TaskConfig(), 5, group_by=["Male"])
    assert table["group"].to_list()[:2] == ["blond people", "men"]
    assert worst_group(table)["group"] == "men"
    assert table.filter(pl.col("declared"))["attribute"].unique().to_list() == ["Male"]
    path = tmp_path / "attributes.parquet"
    _frame().select("sample_id", "Blond_Hair", "Male").write_parquet(path)
    _, headline, (sentence,) = report_groups(
        _frame(), ["Blond_Hair", "Male"], TaskConfig(), 5, str(path), ["Male"]
    )
    assert headline["worst_group_accuracy"] == pytest.approx(4 / 7)
    assert sentence.startswith("worst group: men, accuracy 0.57")
    assert (
        "; the lowest of all 4 cells, not a declared group (report.group_by): blond people, "
        in (sentence)
    )
    assert "accuracy 0.50" in sentence.split("report.group_by")[1]
    # without group_by every cell is declared and the lowest is the worst
    assert worst_group(group_table(_frame(), ["Blond_Hair", "Male"], TaskConfig(), 5))["group"] == (
        "blond people"
    )
    with pytest.raises(ValueError, match=r"report.group_by names \['Hat'\]"):
        group_table(_frame(), ["Blond_Hair", "Male"], TaskConfig(), 5, group_by=["Hat"])
    with pytest.raises(ValueError, match=r"report.group_by names \['Blond_Hair'\]"):
        group_table(_frame(), ["Blond_Hair", "Male"], BLOND_TASK, 2, group_by=["Blond_Hair"])


def test_without_accuracy_the_worst_group_is_the_highest_loss():
    frame = _frame().with_columns(correct=pl.lit(None, dtype=pl.Boolean))
    table = group_table(frame, ["Male"], TaskConfig(), min_group_size=2)
    assert worst_group(table)["group"] == "men"  # mean loss 5.6/7 against 1.6/5


def test_describe_reads_like_words():
    assert describe([("Blond_Hair", True), ("Male", True)]) == "blond men"
    assert describe([("Eyeglasses", False)]) == "people without eyeglasses"
    assert describe([("Blond_Hair", False), ("Wearing_Hat", True)]) == (
        "non-blond people wearing hat"
    )
    assert describe([("Wearing_Hat", False)]) == "people not wearing hat"
    # a negated column reads as what it means, not "without no beard"
    assert describe([("Blond_Hair", True), ("No_Beard", False)]) == "blond people with beard"
    assert describe([("No_Beard", True), ("Smiling", True)]) == "smiling people without beard"


def test_report_groups_reads_the_target_from_the_attribute_table(tmp_path):
    frame = _frame()
    path = tmp_path / "attributes.parquet"
    frame.select("sample_id", "Blond_Hair", "Male").write_parquet(path)
    table, headline, sentences = report_groups(
        frame.drop("Blond_Hair"), ["Male"], BLOND_TASK, 2, str(path)
    )
    assert headline["worst_group_accuracy"] == 0.25 and headline["worst_group_n"] == 4
    assert headline["n_groups"] == 4 and table.height == 4
    assert len(sentences) == 1 and sentences[0].startswith("worst group: blond men")
    assert "est_loss" not in table.columns  # no grounding given: nothing estimated from text
    with pytest.raises(ValueError, match=r"no column for task.target 'Blond_Hair'"):
        group_table(frame.drop("Blond_Hair"), ["Male"], BLOND_TASK, 2)
