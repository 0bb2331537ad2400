"""The one markdown-table renderer (Dagster metadata panels and the report's tables).

Numbers: 3 decimals, or 3 significant digits in e-notation under 1e-3 (p-values); NaN is "–",
None empty, True "yes" and False empty, so a table of flags reads at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DIGITS = 3


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = DIGITS
) -> str:
    """Rows (dicts) as a markdown table; `columns` picks and orders them (default: the first
    row's keys). No rows and no columns: "_(empty)_"."""
    if not rows and not columns:
        return "_(empty)_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def cell(value: object, digits: int = DIGITS) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")
