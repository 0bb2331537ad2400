"""Ask the trained diagnosis heads questions in plain text: the public query API.

    from llm2loss_pipeline import Diagnoser

    diagnoser = Diagnoser.load()  # the latest materialization under LLM2LOSS_HOME
    diagnoser.compare("face of an old male", "face of a young female").verdict
    diagnoser.rank(["a person wearing glasses", "a person wearing a hat", "a smiling person"])

A text is embedded by the encoder's text tower, moved across the modality gap (`gap.text`) and fed
to every head; outputs are standardised per member (core/heads/ensemble.py), so every number here
is in "standard deviations of that member's predicted loss over the training images". Higher means
the black box is expected to do worse on inputs like the text. The spread over members is the
uncertainty (paper, Figure 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm2loss_pipeline.core.heads.checkpoint import INDEX, load_ensemble
from llm2loss_pipeline.core.heads.compare import (
    OVERALL,
    Comparison,
    Spread,
    compare_members,
    member_groups,
    rank_texts,
)
from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble, MemberInfo
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import StorageError

EncodeTexts = Callable[[Sequence[str]], np.ndarray]
EncoderLoader = Callable[[Path, str], Any]
RUN_COMMAND = "llm2loss run"
CACHE_LIMIT = 100_000


class NotMaterializedError(StorageError):
    """The encoder or the heads have not been materialized under this home yet."""


def default_encoder_loader(encoder_dir: Path, device: str) -> Any:
    """The pipeline's encoder (`core.encoder.load_encoder`), imported only when a query needs it."""
    from llm2loss_pipeline.core.encoder import load_encoder

    return load_encoder(encoder_dir, device)


def check_texts(texts: Iterable[Any], labels: Sequence[str] | None = None) -> list[str]:
    """Texts as a list, with a ValueError naming the first empty or non-string one."""
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got a single string")
    result = list(texts)
    for position, text in enumerate(result):
        label = labels[position] if labels is not None else f"text {position + 1}"
        if not isinstance(text, str):
            raise ValueError(f"{label} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(
                f"{label} is empty: give a description such as 'a person wearing glasses'"
            )
    return result


class Diagnoser:
    """Text queries against one encoder and one head ensemble.

    `encode_texts` maps texts to L2-normalised text embeddings [n, d]; `ensemble` and `gap` are the
    trained heads and the modality-gap map (`load_ensemble`); `meta` is their index record.
    """

    def __init__(
        self,
        encode_texts: EncodeTexts,
        ensemble: HeadEnsemble,
        gap: ModalityGap,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if gap.dim != ensemble.embedding_dim:
            raise ValueError(
                f"modality gap has dimension {gap.dim} but the heads take {ensemble.embedding_dim}"
            )
        self.encode_texts = encode_texts
        self.ensemble = ensemble
        self.gap = gap
        self.meta = dict(meta or {})
        self._scores: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Diagnoser({len(self.ensemble)} members, dim {self.ensemble.embedding_dim})"

    @classmethod
    def load(
        cls,
        home: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        *,
        encoder_loader: EncoderLoader | None = None,
    ) -> Diagnoser:
        """The encoder and heads of the latest materialization under `home` (or LLM2LOSS_HOME).

        Raises NotMaterializedError when either is missing, HeadMismatchError when the heads were
        trained on another encoder than the one saved now, StorageError when files are damaged.
        """
        layout = Layout.at(home)
        missing = []
        if not layout.encoder_dir.is_dir() or not any(layout.encoder_dir.iterdir()):
            missing.append(f"the encoder ({layout.encoder_dir})")
        if not (layout.heads_dir / INDEX).is_file():
            missing.append(f"the diagnosis heads ({layout.heads_dir / INDEX})")
        if missing:
            raise NotMaterializedError(
                f"nothing to query under {layout.home}: {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not materialized yet; "
                f"run `{RUN_COMMAND}` (with --home {layout.home} or LLM2LOSS_HOME set) first"
            )
        encoder = (encoder_loader or default_encoder_loader)(layout.encoder_dir, device)
        ensemble, gap, meta = load_ensemble(
            layout.heads_dir,
            expected_dim=int(encoder.embed_dim),
            expected_encoder_sha256=str(encoder.sha256),
        )
        meta = {**meta, "home": str(layout.home), "encoder": repr(encoder)}
        return cls(encoder.encode_texts, ensemble, gap, meta)

    @property
    def members(self) -> list[MemberInfo]:
        return list(self.ensemble.members)

    # scores

    def score_texts(self, texts: Sequence[str], labels: Sequence[str] | None = None) -> np.ndarray:
        """Standardised member scores [M, T]; new texts are encoded in one batch, then cached."""
        texts = check_texts(texts, labels)
        missing = list(dict.fromkeys(t for t in texts if t not in self._scores))
        if missing:
            embeddings = np.asarray(self.encode_texts(missing), dtype=np.float32)
            if embeddings.shape != (len(missing), self.ensemble.embedding_dim):
                raise ValueError(
                    f"the text encoder returned shape {embeddings.shape} for {len(missing)} texts; "
                    f"the heads expect [n, {self.ensemble.embedding_dim}]"
                )
            scores = self.ensemble.standardized(self.gap.text(embeddings))
            if len(self._scores) + len(missing) > CACHE_LIMIT:
                self._scores.clear()
            for column, text in enumerate(missing):
                self._scores[text] = scores[:, column]
        if not texts:
            return np.zeros((len(self.ensemble), 0))
        return np.stack([self._scores[t] for t in texts], axis=1)

    def estimate(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Per text: the ensemble mean and spread (std, quartiles, range), per kind and overall."""
        texts = check_texts(texts)
        scores = self.score_texts(texts)
        groups = member_groups(self.ensemble.members)
        rows = []
        for t, text in enumerate(texts):
            per_group = {name: Spread.of(scores[idx, t]).to_dict() for name, idx in groups.items()}
            rows.append({"text": text, **per_group[OVERALL], "groups": per_group})
        return rows

    # comparisons

    def compare(self, text_a: str, text_b: str) -> Comparison:
        """Distribution over members of h(a) - h(b); positive: the model does worse on a."""
        scores = self.score_texts([text_a, text_b], labels=["text A", "text B"])
        return compare_members(scores[:, 0] - scores[:, 1], self.ensemble.members, text_a, text_b)

    def compare_many(self, pairs: Sequence[tuple[str, str]]) -> list[Comparison]:
        """Many comparisons, with every distinct text encoded once, in one batch."""
        pairs = list(pairs)
        for position, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"pair {position + 1} has {len(pair)} texts, expected 2")
        labels = [f"text {'AB'[k]} of pair {p + 1}" for p in range(len(pairs)) for k in range(2)]
        flat = [text for pair in pairs for text in pair]
        scores = self.score_texts(flat, labels=labels)
        members = self.ensemble.members
        return [
            compare_members(scores[:, 2 * p] - scores[:, 2 * p + 1], members, a, b)
            for p, (a, b) in enumerate(pairs)
        ]

    def rank(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Texts ordered by estimated loss, worst first, with q1..q3 and min..max intervals."""
        texts = check_texts(texts)
        if not texts:
            raise ValueError("rank needs at least one text")
        return rank_texts(texts, self.score_texts(texts), self.ensemble.members)
