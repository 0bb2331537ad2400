"""The texts a text tower accepts, checked one way for both towers (`factory.Encoder`, torch, and
`numpy_text.NumpyTextTower`, which must not import torch)."""

from __future__ import annotations

from collections.abc import Sequence


def checked_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list; TypeError for a lone string or a non-str item, ValueError for an empty or
    whitespace-only text, each naming its position."""
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a sequence of texts, not a single string")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text at position {position} is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"text at position {position} is empty or only whitespace")
    return texts
