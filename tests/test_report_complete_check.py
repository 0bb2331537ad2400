"""The report_is_complete check: every number finite, except where the report leaves it empty on
purpose (an untested probe has no q-value; a calibration without a positive slope has no loss
units), so the default world's unresolved probes do not fail it and a real hole still does."""

from __future__ import annotations

import math

import polars as pl

from llm2loss_pipeline.core.steps import report as steps


def _table(**overrides) -> pl.DataFrame:
    row = {
        "attribute": ["A", "B"],
        "small_group": [False, False],
        "gap_loss": [0.1, 0.2],
        "est_gap": [0.3, 0.4],
        "est_z": [1.0, 2.0],
        "est_q_value": [0.2, 0.1],
        "probe_resolves": [True, True],
        "calibration_slope": [0.8, 0.8],
        "text_error": [0.2, 0.2],
    }
    row.update(overrides)
    return pl.DataFrame(row)


def _check(monkeypatch, table: pl.DataFrame):
    monkeypatch.setattr(steps, "_attribute_table", lambda layout: table)
    monkeypatch.setattr(steps, "diagnosed_attributes", lambda layout: ["A", "B"])
    return steps.check_complete(None)


def test_an_untested_probe_without_a_q_value_passes(monkeypatch):
    table = _table(est_q_value=[math.nan, 0.1], probe_resolves=[False, True])
    assert _check(monkeypatch, table).passed


def test_no_loss_units_without_a_positive_slope_passes(monkeypatch):
    table = _table(
        est_gap=[math.nan, 0.4], calibration_slope=[-0.1, 0.8], text_error=[math.inf, 0.2]
    )
    assert _check(monkeypatch, table).passed


def test_a_missing_number_anywhere_else_fails(monkeypatch):
    assert not _check(monkeypatch, _table(est_q_value=[math.nan, 0.1])).passed  # tested probe
    assert not _check(monkeypatch, _table(gap_loss=[math.nan, 0.2])).passed
    assert not _check(
        monkeypatch, _table(est_z=[math.nan, 2.0], probe_resolves=[False, True])
    ).passed
