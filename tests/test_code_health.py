"""Code-health refactors that change how much work is done, not what comes out."""

from __future__ import annotations

import numpy as np
import polars as pl

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.heads import gap as gap_module
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.steps import diagnosis


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        return np.ones((len(texts), 4), dtype=np.float32) / 2.0


def _frame(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {name: rng.random(n) < 0.5 for name in CELEBA_ATTRIBUTES}
    return pl.DataFrame(
        {
            "sample_id": [f"{i:06d}.jpg" for i in range(n)],
            "loss": rng.random(n),
            "embedding": rng.normal(size=(n, 4)).astype(np.float32),
            **columns,
        }
    )


def test_gap_effect_uses_the_text_corpus_embedded_once(monkeypatch):
    """fit_heads embeds the caption corpus once; the gap-effect measurement reuses it (it used to
    encode the same 2,000+ texts a second time)."""
    seen = {}

    def fake_measure(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(gap_module, "measure_gap_effect", fake_measure)
    train, held_out = _frame(50, 0), _frame(40, 1)
    encoder = CountingEncoder()
    config = HeadsConfig(n_seeds=1, epochs=1)
    corpus_texts = diagnosis.text_corpus(train, config.base_seed)
    corpus = np.full((len(corpus_texts), 4), 0.5, dtype=np.float32)
    rows = diagnosis.gap_effect_rows(train, held_out, corpus, config, encoder, "cpu")
    assert rows == []
    assert seen["text_corpus_embeddings"] is corpus
    assert all(call != corpus_texts for call in encoder.calls)
    assert len(seen["prompts"]) == len(CELEBA_ATTRIBUTES)
