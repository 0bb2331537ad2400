"""Public statistics helpers: `llm2loss_pipeline.stats.correlations(x, y)` and friends.

Thin re-exports of `llm2loss_pipeline.core.stats`, so that user code does not depend on the
package's internal layout.
"""

from llm2loss_pipeline.core.stats import (
    Coefficient,
    Correlations,
    benjamini_hochberg,
    bh_adjust,
    correlations,
)

__all__ = ["Coefficient", "Correlations", "benjamini_hochberg", "bh_adjust", "correlations"]
