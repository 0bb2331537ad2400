"""The diagnosis heads `h`: an ensemble that predicts the black box's loss from an embedding.

config.py      HeadsConfig (kinds x archs x seeds, optimiser, target scaling, modality gap)
scaling.py     regressor target scaling for heavy-tailed losses (measured default)
ensemble.py    HeadEnsemble: stacked members, raw and standardised outputs
train.py       train_ensemble: all members in one batched computation
fused.py       training's layout: every member's first layer in one matrix, its forward/backward
evaluate.py    held-out Spearman / Kendall / pairwise accuracy per member and per group
gap.py         ModalityGap: centre each modality before the heads; measure_gap_effect
checkpoint.py  save_ensemble / load_ensemble (one safetensors file per member, index written last)
compare.py     Comparison of two texts over members; rank_texts
probe_reading.py  a free-text question one report probe holds, answered as the report answers it
plots.py       Figure-2-style comparison chart and ranking chart
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy, so that reading HeadsConfig (core/config.py, the CLI) does not import torch.
_EXPORTS = {
    "HeadMismatchError": "checkpoint",
    "load_ensemble": "checkpoint",
    "save_ensemble": "checkpoint",
    "Comparison": "compare",
    "DiffStats": "compare",
    "compare_members": "compare",
    "rank_texts": "compare",
    "ProbeReading": "probe_reading",
    "HeadsConfig": "config",
    "HeadEnsemble": "ensemble",
    "MemberInfo": "ensemble",
    "member_grid": "ensemble",
    "evaluate_ensemble": "evaluate",
    "evaluate_members": "evaluate",
    "ModalityGap": "gap",
    "fit_gap": "gap",
    "measure_gap_effect": "gap",
    "TargetScaler": "scaling",
    "fit_transform": "scaling",
    "train_ensemble": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
