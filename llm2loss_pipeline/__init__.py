"""LLM2Loss diagnosis as Dagster assets: where does your model fail, and whom does it treat worse?

`import llm2loss_pipeline` stays light (no torch, no Dagster): the public query API is imported on
first use, e.g. `from llm2loss_pipeline import Diagnoser`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Same inputs, same bytes (bench/RESULTS.md, "Determinism"). On CPUs with AVX-512 (Intel Xeon),
# MKL picks its GEMM kernel by the size of the batch, so a row computed in a batch of 5 and in a
# batch of 300 differ in the last bits: the modality gap's text mean then differed between a run
# and its rerun, and `compare --pairs` from `compare`. Strict conditional numerical
# reproducibility (measured: no other MKL_CBWR value does) removes that. MKL reads the variable at
# its first call, so it is set here, before any module of ours imports torch; a value the user set
# is kept (tests/test_determinism.py).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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
