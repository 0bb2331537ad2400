"""LLM2Loss diagnosis as Dagster assets: where does your model fail, and whom does it treat worse?

`import llm2loss_pipeline` stays light (no torch, no Dagster): the public query API is imported on
first use, e.g. `from llm2loss_pipeline import Diagnoser`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm2loss_pipeline.diagnoser import Diagnoser

__version__ = "0.1.0"

__all__ = ["Diagnoser", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Diagnoser":
        # lazy: keeps `import llm2loss_pipeline` (and the CLIs) at 74 modules, not +470 (0.7 s)
        from llm2loss_pipeline.diagnoser import Diagnoser

        return Diagnoser
    raise AttributeError(f"module 'llm2loss_pipeline' has no attribute {name!r}")
