"""bench/within_class.py on synthetic answers: its questions and how it scores them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import polars as pl
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.heads.within_class import shared_class, side_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "bench" / "within_class.py"
    spec = importlib.util.spec_from_file_location("within_class_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(p: float, truth: float, se: float = 0.1, claimed: bool | None = None) -> dict:
    claimed = (p >= 0.9 or p <= 0.1) if claimed is None else claimed
    return {"p_a_worse": p, "truth": truth, "truth_se": se, "claimed": claimed, "scoped": True}


def test_a_claim_is_right_on_the_truths_side_and_outside_its_noise(bench) -> None:
    rows = [
        _row(0.95, 0.5),  # right
        _row(0.05, -0.5),  # right, for B
        _row(0.95, -0.5),  # wrong side
        _row(0.95, 0.1, se=0.1),  # right side, the truth indistinguishable from 0
        _row(0.6, 0.3),  # no claim
        _row(0.95, math.nan),  # no population image on one side: not scored
    ]
    summary = bench.summary(rows)
    assert summary["n_questions"] == 5 and summary["n_scoped"] == 5
    assert (summary["n_claims"], summary["n_claims_right"]) == (4, 2)
    outcome = [1, 0, 0, 1, 1]
    p = [0.95, 0.05, 0.95, 0.95, 0.6]
    assert summary["brier"] == pytest.approx(
        sum((a - b) ** 2 for a, b in zip(p, outcome, strict=True)) / 5
    )


def test_each_question_names_the_class_it_is_asked_in(bench, tmp_path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    pl.DataFrame(
        {"attribute": ["Male", "Smiling", "Eyeglasses"], "probe_resolves": [True, False, True]}
    ).write_parquet(reports / "attribute_disparity.parquet")
    questions = bench._questions(tmp_path, "Blond_Hair")
    # the probes the report tests, with and without, inside each class
    assert [(name, value) for _, _, name, value in questions] == [
        ("Male", True),
        ("Eyeglasses", True),
        ("Male", False),
        ("Eyeglasses", False),
    ]
    words = side_words("Blond_Hair", CELEBA_ATTRIBUTES)
    for a, b, _, value in questions:
        assert shared_class([a, b], words) is value, (a, b)
