"""The attribute disparity report: measured vs estimated disparity per CelebA attribute.

- `measured`: the black box's performance with and without each attribute (DuckDB SQL);
- `estimated`: the diagnosis heads' text-prompted estimate, its ensemble spread and significance,
  and the encoder's zero-shot attribute AUROC;
- `intersectional`: the same for attribute pairs, over four cells;
- `correlate`: the paper's Tables 1-3; `plots`, `html`: figures and the self-contained page;
- `build`: `build_report`, which runs all of it; `publish`: DuckDB views for users.
"""

from llm2loss_pipeline.core.report.build import (
    ReportResult,
    build_report,
    build_report_from_config,
    markdown_tables,
)
from llm2loss_pipeline.core.report.publish import PublishResult, publish_views

__all__ = [
    "PublishResult",
    "ReportResult",
    "build_report",
    "build_report_from_config",
    "markdown_tables",
    "publish_views",
]
