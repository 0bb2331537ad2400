"""Judging the diagnosis against the truth of a generated world.

Three disparities are kept apart (shared/design, "Truth, trust and generality"): the *population*
one (the black box on many fresh images of the world's identities, core/world/population.py), the
*measured* one (the evaluation split, what a user with labels sees) and the *estimated* one (from
text). This module computes the first and scores the third against it:

- `population_losses`: the black box's loss on every population image;
- `population_gaps`: per attribute, mean loss with minus without, with an identity-clustered
  standard error and 90% / 95% intervals;
- `score_world`: Spearman of estimate vs truth, planted recall, the claims' precision, the
  intervals' coverage;
- `calibration_table`: stated P(A worse) against how often A really was worse, with the expected
  calibration error.

A claim is *correct* when its sign agrees with the population gap and the population gap's 95%
interval excludes 0; a claim on an attribute whose true gap is indistinguishable from 0 counts as
wrong (it said more than the truth supports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import stats as sps

from llm2loss_pipeline.core.stats import clustered_mean_gap

TRUTH_LEVEL = 0.95


def population_losses(
    black_box_path: Path, population_dir: Path, table: pl.DataFrame, target: str | None = None
) -> np.ndarray:
    """The built-in black box's per-sample loss on the population images, in table order: on
    their identities, or for an attribute task on their `target` labels (1 with it, 0 without,
    the built-in numbering of core/blackbox/task_labels.py)."""
    # lazy: torch (+980 modules, 2.9 s) for population losses only; scoring needs none
    from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box
    from llm2loss_pipeline.core.blackbox.labels import map_labels
    from llm2loss_pipeline.core.blackbox.losses import compute_losses

    loaded = load_black_box(black_box_path, "cpu")
    if loaded.label_map is None:
        raise ValueError(f"{black_box_path} has no label map: only the built-in black box")
    ids = table["sample_id"].to_list()
    column = table["identity"] if target is None else table[target].cast(pl.Int64)
    labels = map_labels(column.to_numpy(), loaded.label_map, sample_ids=ids)
    items = [
        (sample, str(Path(population_dir) / path))
        for sample, path in zip(ids, table["path"].to_list(), strict=True)
    ]
    result = compute_losses(loaded, items, labels, ["population"] * len(ids), threads=None)
    if result.dropped or result.skipped:
        raise ValueError(f"population losses: {len(result.dropped) + len(result.skipped)} lost")
    return result.frame["loss"].to_numpy().astype(np.float64)


def population_gaps(
    loss: np.ndarray, table: pl.DataFrame, attributes: Sequence[str]
) -> pl.DataFrame:
    """attribute, truth_gap, truth_se, truth_low/high (95%), n_true, n_false."""
    labels = np.stack([table[name].to_numpy().astype(bool) for name in attributes], axis=1)
    gap, se = clustered_mean_gap(loss, labels, table["identity"].to_numpy())
    z = float(sps.norm.ppf(0.5 + TRUTH_LEVEL / 2))
    return pl.DataFrame(
        {
            "attribute": list(attributes),
            "truth_gap": gap,
            "truth_se": se,
            "truth_low": gap - z * se,
            "truth_high": gap + z * se,
            "n_true": labels.sum(axis=0),
            "n_false": (~labels).sum(axis=0),
        }
    )


def condition_gap(
    loss: np.ndarray, table: pl.DataFrame, a: Mapping[str, bool], b: Mapping[str, bool]
) -> float:
    """Population mean loss of images matching every condition of `a`, minus that of `b`."""

    def mask(conditions: Mapping[str, bool]) -> np.ndarray:
        out = np.ones(table.height, dtype=bool)
        for name, value in conditions.items():
            out &= table[name].to_numpy().astype(bool) == value
        return out

    in_a, in_b = mask(a), mask(b)
    if not in_a.any() or not in_b.any():
        return math.nan
    return float(loss[in_a].mean() - loss[in_b].mean())


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan
    return float(sps.spearmanr(x[keep], y[keep]).statistic)


def score_world(
    report: pl.DataFrame, truth: pl.DataFrame, planted: Sequence[str], ceiling: np.ndarray | None
) -> dict[str, Any]:
    """The report's attribute table against the population truth of its world."""
    joined = report.join(truth, on="attribute", how="inner", suffix="_pop")
    est = joined["est_mean"].to_numpy()
    gap = joined["truth_gap"].to_numpy()
    real = ((joined["truth_low"] > 0) | (joined["truth_high"] < 0)).to_numpy()
    claimed = joined["bh_significant"].fill_null(False).to_numpy()
    correct = claimed & real & (np.sign(est) == np.sign(gap))
    inside = (joined["est_gap_low"] <= joined["truth_gap"]) & (
        joined["truth_gap"] <= joined["est_gap_high"]
    )
    finite = joined["est_gap"].is_finite().to_numpy()
    names = joined["attribute"].to_list()
    order = joined.sort("est_mean", descending=True)["attribute"].to_list()
    top = set(order[: max(3, len(planted))])
    truth_order = joined.sort("truth_gap", descending=True)["attribute"].to_list()
    return {
        "spearman": _spearman(est, gap),
        "ceiling_spearman": _spearman(np.asarray(ceiling), gap)
        if ceiling is not None
        else math.nan,
        "planted_recall_at_3": (
            sum(name in top for name in planted) / len(planted) if planted else math.nan
        ),
        "planted_significant": (
            float(np.mean([claimed[names.index(name)] for name in planted]))
            if planted
            else math.nan
        ),
        "planted_truth_rank": [truth_order.index(name) + 1 for name in planted],
        "n_attributes": int(joined.height),
        "n_real": int(real.sum()),
        "n_claims": int(claimed.sum()),
        "n_correct_claims": int(correct.sum()),
        "claim_precision": float(correct.sum() / claimed.sum()) if claimed.any() else math.nan,
        "coverage": float(inside.filter(pl.Series(finite)).mean()) if finite.any() else math.nan,
    }


def calibration_table(p: np.ndarray, outcome: np.ndarray, bins: int = 5) -> dict[str, Any]:
    """Stated probabilities against observed frequencies, in equal-width bins; and the ECE.

    Because P(A worse) = 1 - P(B worse), each answer is folded onto P >= 0.5 (the side it leans
    to), so a bin reads "answers that were this sure: how often were they right".
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(outcome, dtype=bool)
    keep = np.isfinite(p)
    p, y = p[keep], y[keep]
    sure = np.maximum(p, 1 - p)
    right = np.where(p >= 0.5, y, ~y)
    edges = np.linspace(0.5, 1.0, bins + 1)
    rows, ece = [], 0.0
    for k in range(bins):
        upper = sure <= edges[k + 1] if k == bins - 1 else sure < edges[k + 1]
        in_bin = (sure >= edges[k]) & upper
        if not in_bin.any():
            continue
        stated, observed = float(sure[in_bin].mean()), float(right[in_bin].mean())
        ece += in_bin.sum() / max(1, sure.size) * abs(stated - observed)
        rows.append(
            {
                "bin": f"{edges[k]:.1f}-{edges[k + 1]:.1f}",
                "n": int(in_bin.sum()),
                "stated": stated,
                "observed": observed,
            }
        )
    return {"bins": rows, "ece": float(ece), "n": int(sure.size)}


def condition_truth(
    loss: np.ndarray, table: pl.DataFrame, condition: Mapping[str, bool]
) -> dict[str, float]:
    """Population gap of the images meeting every value of `condition` ({attribute: value})
    against all other images, with the identity-clustered standard error and 95% interval of
    `population_gaps` (a failure mode names a group; its truth is that group against the rest).
    NaN when either side is empty."""
    if not condition:
        raise ValueError("a condition needs at least one attribute value")
    unknown = [name for name in condition if name not in table.columns]
    if unknown:
        raise ValueError(f"condition attribute {unknown[0]!r} is not a population column")
    meets = np.ones(table.height, dtype=bool)
    for name, value in condition.items():
        meets &= table[name].to_numpy().astype(bool) == bool(value)
    gap, se = clustered_mean_gap(loss, meets, table["identity"].to_numpy())
    z = float(sps.norm.ppf(0.5 + TRUTH_LEVEL / 2))
    return {
        "truth_gap": float(gap[0]),
        "truth_se": float(se[0]),
        "truth_low": float(gap[0] - z * se[0]),
        "truth_high": float(gap[0] + z * se[0]),
        "n_true": int(meets.sum()),
    }
