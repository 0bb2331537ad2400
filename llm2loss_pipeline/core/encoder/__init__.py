"""The semantic encoder `g` (image tower) and `g~` (text tower) of LLM2Loss.

`build_encoder(config)` is the one entry point; `train_caption_tuned` teaches the default encoder's
image tower the attribute language; `save_encoder` / `load_encoder` write and read an
open_clip-loadable folder; `embed_images` embeds an image list; `evaluate` measures zero-shot
attribute AUROC and caption retrieval.

Names are imported lazily so that reading the configuration (`EncoderConfig`) does not import
torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderConfig": "config",
    "Encoder": "factory",
    "build_encoder": "factory",
    "train_caption_tuned": "train",
    "save_encoder": "checkpoint",
    "load_encoder": "checkpoint",
    "EmbeddingResult": "embed",
    "embed_images": "embed",
    "zero_shot_scores": "evaluate",
    "zero_shot_auroc": "evaluate",
    "retrieval_accuracy": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
