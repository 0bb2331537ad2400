"""bench/compare_probes.py on synthetic answers: its question sets and how each rule is scored."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    # it imports its sibling scripts (worlds, text_error_fit) by name, as when run from bench/;
    # they leave sys.path and sys.modules as they were afterwards
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))
        path = ROOT / "bench" / "compare_probes.py"
        spec = importlib.util.spec_from_file_location("compare_probes", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    for name in set(sys.modules) - before:
        if name in ("worlds", "text_error_fit", "discovery_worlds"):
            del sys.modules[name]


def test_the_new_wordings_are_no_probe_s_and_each_names_its_side(bench) -> None:
    probe_texts = {
        text for name in CELEBA_ATTRIBUTES for pair in attribute_prompt_pairs(name) for text in pair
    }
    asked = bench.questions()
    new = [q for q in asked if q[4] == "new"]
    assert len(new) == len(bench.PARAPHRASES) >= 20
    for a, cond_a, b, cond_b, _ in new:
        assert a not in probe_texts and b not in probe_texts, (a, b)
        (name,) = cond_a
        assert name in CELEBA_ATTRIBUTES and cond_b == {name: not cond_a[name]}
    # text A is the attribute's side, but a bearded man is No_Beard False
    sides = {a: cond for a, cond, _, _, _ in new}
    assert sides["a man"] == {"Male": True} and sides["a young person"] == {"Young": True}
    assert sides["a bearded man"] == {"No_Beard": False}
    assert sum(q[4] == "probe" for q in asked) == len(CELEBA_ATTRIBUTES)


def test_each_rule_takes_the_probe_s_answer_only_where_it_holds_the_question(bench) -> None:
    def row(share, resolves, p_probe, p_free):
        probe = {"share": share, "resolves": resolves, "p_worse": p_probe}
        return {"probe": probe, "p_probe": p_probe, "p_free": p_free}

    rows = [
        row(0.9, True, 0.97, 0.6),
        row(0.55, True, 0.2, 0.45),
        row(0.95, False, 0.99, 0.52),  # a probe the report does not test
        row(0.8, True, math.nan, 0.58),  # no calibrated answer for it
        {"probe": None, "p_probe": math.nan, "p_free": 0.3},
    ]
    assert list(bench.p_under(rows, None)) == [0.6, 0.45, 0.52, 0.58, 0.3]
    assert list(bench.p_under(rows, 0.5)) == [0.97, 0.2, 0.52, 0.58, 0.3]
    assert list(bench.p_under(rows, 0.8)) == [0.97, 0.45, 0.52, 0.58, 0.3]


def test_a_rule_is_scored_by_its_calibration_and_its_sure_answers(bench) -> None:
    p = np.array([0.95, 0.95, 0.05, 0.55, 0.45])
    truth = np.array([0.3, -0.1, -0.2, 0.1, 0.2])
    scored = bench.score(p, truth)
    assert scored["n"] == 5 and scored["sure"] == 3
    assert scored["sure_right"] == pytest.approx(2 / 3)
    assert scored["right"] == pytest.approx(3 / 5)
    worse = truth > 0
    assert scored["brier"] == pytest.approx(np.mean((p - worse) ** 2))
    assert 0 <= scored["ece"] <= 1
