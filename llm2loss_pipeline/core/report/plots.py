"""The report's figures, drawn with matplotlib's Agg canvas and written atomically as PNG.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so drawing holds no global
state and works in worker processes without a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from llm2loss_pipeline.core.members import KINDS, MemberGroup
from llm2loss_pipeline.core.stats import prob_positive
from llm2loss_pipeline.core.storage import write_bytes_atomic

DPI = 100
_KIND_COLOURS = {"regressor": "#1f77b4", "ranker": "#d62728", "overall": "#444444"}
CLAIM_COLOURS = {"worse with": "#d62728", "better with": "#1f77b4", "cannot tell": "#bbbbbb"}
"""Bar colour per claim (the calibrated, BH-controlled verdict), so colour says what is claimed."""
N_LABELLED = 4
"""The scatter labels the attributes among the N largest and N smallest on either axis."""


def save_png(figure: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def _label(attribute: str) -> str:
    return attribute.replace("_", " ")


def scatter_estimated_vs_measured(
    table: pl.DataFrame,
    estimates: pl.DataFrame,
    groups: Sequence[MemberGroup],
    path: str | Path,
    measure: str = "gap_loss",
) -> Path:
    """Estimated (ensemble mean diff) vs measured disparity, one panel per head kind + overall.

    Hollow markers are small groups (left out of the correlations).
    """
    panels = [g for g in groups if g.arch is None]
    figure = Figure(figsize=(5.2 * len(panels), 4.8))
    for position, group in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), position + 1)
        est = estimates.filter(pl.col("group") == group.name).select("attribute", "mean")
        joined = table.select("attribute", measure, "small_group").join(est, on="attribute")
        x = joined[measure].to_numpy().astype(float)
        y = joined["mean"].to_numpy().astype(float)
        small = joined["small_group"].to_numpy()
        colour = _KIND_COLOURS.get(group.name, "#2ca02c")
        axes.scatter(x[~small], y[~small], color=colour, s=22)
        axes.scatter(x[small], y[small], facecolors="none", edgecolors=colour, s=22)
        names = joined["attribute"].to_list()
        for i in spread_out(extreme_points(x, y), x, y):
            axes.annotate(
                _label(names[i]),
                (x[i], y[i]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        axes.axhline(0, color="#999999", linewidth=0.8)
        axes.axvline(0, color="#999999", linewidth=0.8)
        axes.set_xlabel(f"measured {measure.replace('_', ' ')}: with - without (loss units)")
        axes.set_ylabel("estimated disparity (estimate units, not loss)")
        axes.set_title(f"{group.name} ({len(group.positions)} members)")
    figure.suptitle(
        "Estimated vs measured disparity per attribute (positive = worse with it). The axes are "
        "in different units:\ncompare the order of the points, not their values. Labelled: among "
        f"the {N_LABELLED} largest and smallest on each axis, those with room for a label.",
        y=1.06,  # two lines: above the panels' own titles
    )
    return save_png(figure, path)


def extreme_points(x: np.ndarray, y: np.ndarray, k: int = N_LABELLED) -> set[int]:
    """Indices of the `k` largest and `k` smallest finite points by x and by y: labelling only
    these keeps 40 labels from piling up in the middle, where they say least."""
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    chosen: set[int] = set()
    for values in (x, y):
        order = finite[np.argsort(values[finite], kind="stable")]
        chosen.update(order[:k].tolist())
        chosen.update(order[-k:].tolist())
    return chosen


def spread_out(
    indices: set[int], x: np.ndarray, y: np.ndarray, gap_x: float = 0.2, gap_y: float = 0.05
) -> list[int]:
    """`indices` without those whose label would overlap the label of a point kept before (a
    label is about `gap_x` of the x range wide and `gap_y` of the y range tall). The farthest
    from the centre are kept first, so a dense corner keeps its most extreme label and loses
    the ones that would print over it."""
    if not indices:
        return []
    finite = np.isfinite(x) & np.isfinite(y)
    span_x = float(np.ptp(x[finite])) or 1.0
    span_y = float(np.ptp(y[finite])) or 1.0
    cx, cy = float(np.median(x[finite])), float(np.median(y[finite]))
    kept: list[int] = []

    def far(i: int) -> float:
        return ((x[i] - cx) / span_x) ** 2 + ((y[i] - cy) / span_y) ** 2

    for i in sorted(indices, key=far, reverse=True):
        clear = (
            abs(x[i] - x[j]) > gap_x * span_x or abs(y[i] - y[j]) > gap_y * span_y for j in kept
        )
        if all(clear):
            kept.append(i)
    return sorted(kept)


def bar_colours(table: pl.DataFrame) -> list[str]:
    """One colour per row of `table` from its `claim` ("cannot tell" when absent or null)."""
    return [CLAIM_COLOURS.get(c, CLAIM_COLOURS["cannot tell"]) for c in _claims(table)]


def attribute_bars(table: pl.DataFrame, path: str | Path) -> Path:
    """Ensemble-mean estimated disparity per attribute, sorted, with the members' q1-q3 range."""
    ordered = table.sort("est_mean", nulls_last=True)
    names = [_label(a) for a in ordered["attribute"].to_list()]
    mean = ordered["est_mean"].to_numpy().astype(float)
    q1 = ordered["est_q1"].to_numpy().astype(float)
    q3 = ordered["est_q3"].to_numpy().astype(float)
    figure = Figure(figsize=(7.5, max(3.0, 0.22 * len(names) + 1.2)))
    axes = figure.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    axes.barh(positions, mean, color=bar_colours(ordered), height=0.7)
    axes.hlines(positions, q1, q3, color="black", linewidth=1.2)
    axes.scatter(q1, positions, marker="|", color="black", s=30)
    axes.scatter(q3, positions, marker="|", color="black", s=30)
    axes.axvline(0, color="#666666", linewidth=0.8)
    axes.set_yticks(positions, names, fontsize=7)
    axes.set_xlabel("estimated disparity: h(with) - h(without), ensemble mean; whisker = q1..q3")
    present = [claim for claim in CLAIM_COLOURS if claim in _claims(ordered)]
    axes.legend(
        handles=[Patch(color=CLAIM_COLOURS[c], label=f"claimed {c}" if c != "cannot tell" else c)
                 for c in present],
        loc="lower right",
        fontsize=7,
    )  # fmt: skip
    axes.set_title("Estimated disparity per attribute, coloured by the report's claim")
    return save_png(figure, path)


def _claims(table: pl.DataFrame) -> list[str]:
    if "claim" not in table.columns:
        return ["cannot tell"] * table.height
    return [c or "cannot tell" for c in table["claim"]]


def member_boxes(
    diffs: pl.DataFrame,
    items: Sequence[str],
    item_column: str,
    path: str | Path,
    title: str,
) -> Path:
    """Figure-2 style: per item, a box of the members' diffs for each head kind, with zero."""
    figure = Figure(figsize=(3.4 * max(1, len(items)), 3.8))
    for position, item in enumerate(items):
        axes = figure.add_subplot(1, max(1, len(items)), position + 1)
        sub = diffs.filter(pl.col(item_column) == item)
        present = sorted(
            set(sub["kind"].to_list()),
            key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k),
        )
        data = [sub.filter(pl.col("kind") == k)["diff"].to_numpy() for k in present]
        boxes = axes.boxplot(data, whis=(0, 100), patch_artist=True, widths=0.6)
        labels = [
            f"{k}\nP(>0)={float(prob_positive(v)):.2f}" for k, v in zip(present, data, strict=True)
        ]
        axes.set_xticks(range(1, len(present) + 1), labels, fontsize=8)
        for patch, kind in zip(boxes["boxes"], present, strict=True):
            patch.set_facecolor(_KIND_COLOURS.get(kind, "#2ca02c"))
            patch.set_alpha(0.5)
        for x, values in enumerate(data, start=1):
            axes.scatter(np.full(values.size, x), values, s=10, color="black", zorder=3)
        axes.axhline(0, color="#666666", linewidth=0.8)
        axes.set_title(_label(item), fontsize=8)
        if position == 0:
            axes.set_ylabel("h(text 1) - h(text 2) per member")
    figure.suptitle(title)
    return save_png(figure, path)
