"""Figure-2-style charts of comparisons and rankings (matplotlib, Agg backend, atomic writes in the
format the file name's extension gives: .png, .svg, .pdf, ...).

A comparison shows, per kind and overall, the distribution over members of h(a) - h(b): a box from
q1 to q3 with the median, whiskers from min to max, each member as a dot, and the zero line; the
label gives P(h(a) > h(b)). A box wholly right of zero is a confident "worse on A".
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2loss_pipeline.core.heads.compare import OVERALL, Comparison
from llm2loss_pipeline.core.storage import atomic_path

# What matplotlib writes with no outside program (pgf needs LaTeX) and no caveat (eps and ps drop
# transparency, with a warning on stderr).
PLOT_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "tif", "tiff", "webp")
_COLORS = {"regressor": "#4C72B0", "ranker": "#DD8452", OVERALL: "#55A868"}


def _pyplot():
    # lazy: matplotlib (+150 modules, 0.5 s); `compare --plot` checks the format before drawing
    import matplotlib

    matplotlib.use("Agg", force=True)
    # lazy: only after matplotlib.use("Agg"): no GUI backend on a server
    import matplotlib.pyplot as plt

    return plt


def plot_format(out: str | os.PathLike[str]) -> str:
    """The image format a chart path asks for by its extension, or a ValueError naming the path;
    called before any work so that a typo does not cost a whole query."""
    path = Path(out)
    if not str(out).strip():
        raise ValueError("a plot path needs a file name, such as out.png")
    if path.is_dir():
        raise ValueError(f"plot path {path} is a directory; give a file name such as out.png")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"plot path {path}: {parent} is a file, not a folder")
            break
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ValueError(
            f"plot path {path}: the extension must name an image format, one of "
            f"{', '.join('.' + name for name in PLOT_FORMATS)}"
        )
    return fmt


def _save(fig: Any, out: str | os.PathLike[str]) -> Path:
    fmt = plot_format(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    except (OSError, RuntimeError) as exc:  # name the chart, not the temporary file beside it
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise OSError(f"cannot write plot {out}: {reason}") from exc
    return Path(out)


def _wrap(text: str, width: int = 60) -> str:
    # "$" starts matplotlib mathtext: a price in a prompt would be typeset, or fail to parse.
    return ("\n".join(textwrap.wrap(text, width)) or text).replace("$", r"\$")


def estimator_line(estimator: str, calibrated: bool, p_a_worse: float | None = None) -> str:
    """What a chart's numbers come from, for its title: the estimator and whether calibrated."""
    read = {
        "grounded": "grounded on the evaluation images",
        "direct": "direct: the heads read the texts' own embeddings",
    }.get(estimator, estimator)
    if calibrated and p_a_worse is not None:
        return f"estimator: {read}; calibrated P(A worse) {p_a_worse:.2f}"
    return f"estimator: {read}; uncalibrated"


def plot_comparison(comparison: Comparison, out_png: str | os.PathLike[str]) -> Path:
    plt = _pyplot()
    names = list(comparison.groups)
    fig, ax = plt.subplots(figsize=(7.5, 1.0 + 0.9 * len(names)))
    try:
        for y, name in enumerate(reversed(names)):
            stats = comparison.groups[name]
            color = _COLORS.get(name, "#8172B3")
            ax.plot([stats.min, stats.max], [y, y], color=color, lw=1.2, zorder=1)
            ax.barh(
                y,
                stats.q3 - stats.q1,
                left=stats.q1,
                height=0.5,
                color=color,
                alpha=0.55,
                edgecolor=color,
                zorder=2,
            )
            ax.plot(
                [stats.median, stats.median], [y - 0.25, y + 0.25], color="black", lw=2, zorder=3
            )
            member_values = [
                d
                for m, d in zip(comparison.members, comparison.diffs, strict=True)
                if name == OVERALL or m.kind == name
            ]
            ax.scatter(
                member_values, [y] * len(member_values), s=10, color="black", alpha=0.6, zorder=4
            )
        ax.axvline(0.0, color="crimson", lw=1.2, ls="--", zorder=0)
        low, high = min(0.0, *comparison.diffs), max(0.0, *comparison.diffs)
        pad = 0.08 * (high - low) or 1.0
        ax.set_xlim(low - pad, high + pad)  # zero is always in view
        # the share of members, not a probability: P(A worse) is the calibrated one, in the title
        labels = [
            f"{name}\nmembers A worse {comparison.groups[name].p_greater:.2f}"
            for name in reversed(names)
        ]
        ax.set_yticks(range(len(names)), labels)
        ax.set_xlabel(_wrap(f"h(A) - h(B) [{comparison.units}]", 90), fontsize=8)
        ax.set_title(
            f"A: {_wrap(comparison.text_a)}\nB: {_wrap(comparison.text_b)}\n"
            f"{estimator_line(comparison.estimator, comparison.calibrated, comparison.p_a_worse)}",
            fontsize=10,
            loc="left",
        )
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def plot_ranking(ranking: Sequence[dict[str, Any]], out_png: str | os.PathLike[str]) -> Path:
    """Texts top (worst) to bottom: mean estimate, q1..q3 bar and min..max whisker."""
    plt = _pyplot()
    if not ranking:
        raise ValueError("nothing to plot: the ranking is empty")
    fig, ax = plt.subplots(figsize=(8.0, 1.0 + 0.45 * len(ranking)))
    try:
        count = len(ranking)
        for pos, row in enumerate(ranking):
            y = count - 1 - pos
            ax.plot([row["min"], row["max"]], [y, y], color="#4C72B0", lw=1.0)
            ax.barh(
                y, row["q3"] - row["q1"], left=row["q1"], height=0.5, color="#4C72B0", alpha=0.5
            )
            ax.plot(row["mean"], y, "o", color="black", ms=4)
        ax.axvline(0.0, color="grey", lw=1.0, ls=":")
        ax.set_yticks(
            range(count),
            [_wrap(str(row["text"]), 45) for row in reversed(list(ranking))],
            fontsize=8,
        )
        estimator = str(ranking[0].get("estimator", "direct"))
        ax.set_xlabel(
            "estimated loss [member std above the training average]; right = worse"
            if estimator == "direct"
            else "estimated loss vs the mean of these texts [units of compare]; right = worse"
        )
        ax.set_title(
            "Estimated loss by text, worst first (mean, q1..q3, min..max over members)\n"
            f"{estimator_line(estimator, calibrated=False)}",
            fontsize=10,
        )
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, out_png)
    finally:
        plt.close(fig)
