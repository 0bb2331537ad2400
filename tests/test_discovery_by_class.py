"""Which class candidates discovery adds (core/steps/discovery.py): the report's declared
groups, for an attribute task only; and the grounding they are estimated on."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.estimate import DescriptionGrounding
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.steps import discovery as step

ATTRIBUTES = ("Eyeglasses", "Male", "Smiling")


def _groups(layout: Layout, declared: dict[str, bool]) -> None:
    layout.reports.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"attribute": list(declared), "declared": list(declared.values())}).write_parquet(
        layout.reports / "groups.parquet"
    )


def test_class_candidates_test_the_reports_declared_groups(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(step, "diagnosed_attributes", lambda layout: ATTRIBUTES)
    layout = Layout.at(tmp_path)
    assert step.declared_attributes(layout) == list(ATTRIBUTES)  # no report yet: every one
    _groups(layout, {"Eyeglasses": False, "Male": True, "Smiling": False})
    assert step.declared_attributes(layout) == ["Male"]  # report.group_by: [Male]
    _groups(layout, dict.fromkeys(ATTRIBUTES, True))
    assert step.declared_attributes(layout) == list(ATTRIBUTES)


def test_an_identity_task_gets_no_class_candidates(tmp_path) -> None:
    held_out = pl.DataFrame({"sample_id": ["a.jpg", "b.jpg"]})
    said: list[str] = []
    # no black box recorded: the identity task
    found = step._by_class(
        Layout.at(tmp_path), DiscoveryConfig(), held_out, None, None, said.append
    )
    assert found == ([], {}) and said == []


def test_an_attribute_task_tests_each_declared_value_in_each_large_class(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(step, "diagnosed_attributes", lambda layout: ATTRIBUTES)
    layout = Layout.at(tmp_path)
    layout.black_box.parent.mkdir(parents=True, exist_ok=True)
    task = {"task": {"kind": "attribute", "target": "Blond_Hair"}}
    layout.black_box.with_suffix(".json").write_text(json.dumps(task))
    _groups(layout, {"Eyeglasses": False, "Male": True, "Smiling": False})
    ids = [f"{i:03d}.jpg" for i in range(100)]
    layout.attributes.parent.mkdir(parents=True, exist_ok=True)
    blond = [i < 5 for i in range(100)]  # 5 blond: fewer than the 10 a description matches
    pl.DataFrame({"sample_id": ids, "Blond_Hair": blond}).write_parquet(layout.attributes)
    held_out = pl.DataFrame({"sample_id": ids})
    candidates, labels = step._by_class(layout, DiscoveryConfig(), held_out, None, None, print)
    assert [c.text for c in candidates] == [
        "face of a man, among images not labelled Blond_Hair",
        "face of a woman, among images not labelled Blond_Hair",
    ]
    assert labels["Blond_Hair"].tolist() == blond
    off = DiscoveryConfig(by_class=False)
    assert step._by_class(layout, off, held_out, None, None, print) == ([], {})
    # a sample without a label of the target: no class candidates, and the log says why
    pl.DataFrame({"sample_id": ids[:-1], "Blond_Hair": blond[:-1]}).write_parquet(layout.attributes)
    said: list[str] = []
    assert step._by_class(layout, DiscoveryConfig(), held_out, None, None, said.append) == ([], {})
    assert said == ["discovery: no class candidates: some samples have no Blond_Hair label"]


def test_a_grounding_within_a_class_keeps_its_images_and_drops_the_reports_answers() -> None:
    pool = np.arange(12.0).reshape(6, 2)
    scores = np.arange(12.0).reshape(2, 6)
    weights = np.array([[1.0, 0.0, 0.0, 2.0, 1.0, 1.0], [0.0, 0.0, 3.0, 1.0, 1.0, 1.0]])
    grounding = DescriptionGrounding(
        members=(),
        pool=pool,
        member_scores=scores,
        weights=weights,
        probe_directions=np.eye(2),
        probe_duals=np.eye(2),
        calibration=None,
        answers=(["Male", "Young"], np.array([0.9, 0.2]), np.array([True, True])),
    )
    mask = np.array([False, True, True, False, False, False])
    inside = grounding.within(mask)
    assert inside.pool.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert inside.member_scores.tolist() == [[1.0, 2.0], [7.0, 8.0]]
    # member 0 drew neither image of the class: it keeps both, as pool_weights would
    assert inside.weights.tolist() == [[1.0, 1.0], [0.0, 3.0]]
    assert inside.answers is None  # the report answers over all images, not within a class
    assert grounding.answers is not None  # the original is unchanged
    with pytest.raises(ValueError, match=r"a mask of shape \(3,\) for 6 pool images"):
        grounding.within(np.ones(3, dtype=bool))
