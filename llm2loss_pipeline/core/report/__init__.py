"""The attribute disparity report: measured vs estimated disparity per CelebA attribute.

- `measured`: the black box's performance with and without each attribute (DuckDB SQL);
- `estimated`: the diagnosis heads' text-prompted estimate, its ensemble spread and significance,
  and the encoder's zero-shot attribute AUROC;
- `intersectional`: the same for attribute pairs, over four cells;
- `correlate`: the paper's Tables 1-3; `plots`, `html`: figures and the self-contained page;
- `build`: `build_report`, which runs all of it; `publish`: DuckDB views for users.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562): a query imports report.calibration and report.grounded, and
# must not pay for build's matplotlib and scipy imports (seconds; issue 21, item 5).
_LAZY = {
    "ReportResult": "build",
    "build_report": "build",
    "build_report_from_config": "build",
    "markdown_tables": "build",
    "PublishResult": "publish",
    "publish_views": "publish",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "PublishResult",
    "ReportResult",
    "build_report",
    "build_report_from_config",
    "markdown_tables",
    "publish_views",
]
