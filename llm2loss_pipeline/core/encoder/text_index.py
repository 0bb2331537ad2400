"""The texts one encoder has embedded, kept on disk under the home (torch-free).

The encoder step seeds it with its evaluation prompts, which the report asks for again; the query
engine (`core/query.py`) reads it first and adds the texts it had to embed, so that a question
about known texts needs neither the encoder nor open_clip's imports (seconds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_arrays

TEXT_INDEX_DIR = ("cache", "text_embeddings")  # under the home: <encoder sha256>.safetensors
TEXT_INDEX_LIMIT = 20_000  # texts kept on disk (30 MB at d = 384); the newest are kept


class TextIndex:
    """Text embeddings already computed by one encoder, kept on disk under the home so that a
    question about known texts needs neither the encoder nor open_clip's imports (seconds).

    One safetensors file per encoder sha256: the embeddings [n, d] and the texts (JSON, in the
    header's metadata). A damaged or foreign file is ignored and rewritten: it is only a cache.
    """

    def __init__(self, path: Path, sha256: str, dim: int) -> None:
        self.path, self.sha256, self.dim = path, sha256, dim
        self.rows: dict[str, np.ndarray] | None = None

    def _read(self) -> dict[str, np.ndarray]:
        if self.rows is None:
            self.rows = {}
            try:
                with safe_open(str(self.path), framework="numpy") as handle:
                    meta = handle.metadata() or {}
                    if meta.get("encoder_sha256") == self.sha256:
                        texts = json.loads(meta["texts"])
                        matrix = handle.get_tensor("embeddings")
                        if matrix.shape == (len(texts), self.dim):
                            self.rows = dict(zip(texts, matrix, strict=True))
            except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # rebuilt later
                self.rows = {}
        return self.rows

    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        rows = self._read()
        return {text: rows[text] for text in texts if text in rows}

    def add(self, texts: Sequence[str], embeddings: np.ndarray) -> None:
        """Remember new texts, and rewrite the file atomically (a reader never sees half)."""

        rows = self._read()
        rows.update(zip(texts, np.asarray(embeddings, dtype=np.float32), strict=True))
        for old in list(rows)[: max(0, len(rows) - TEXT_INDEX_LIMIT)]:
            del rows[old]
        names = list(rows)
        matrix = np.stack([rows[t] for t in names]) if names else np.zeros((0, self.dim))
        meta = {"encoder_sha256": self.sha256, "texts": json.dumps(names, ensure_ascii=False)}
        data = save_arrays({"embeddings": np.ascontiguousarray(matrix, np.float32)}, metadata=meta)
        try:  # a read-only home still answers; it only stays slow
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            staging.write_bytes(data)
            os.replace(staging, self.path)
        except OSError:
            pass


def text_index(home: Path, sha256: str, dim: int) -> TextIndex:
    """The home's index of the texts one encoder (by weights sha256) has embedded: the encoder
    step seeds it with its evaluation prompts, which the report asks for again."""
    return TextIndex(home.joinpath(*TEXT_INDEX_DIR, f"{sha256}.safetensors"), sha256, dim)


def known_first(
    index: TextIndex, encode_texts: Callable[[Sequence[str]], np.ndarray]
) -> Callable[[Sequence[str]], np.ndarray]:
    """`encode_texts` that takes what the index knows from it and embeds only the other texts
    (which it does not add: a step that reads the index leaves it as the encoder step wrote it)."""

    def encode(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        known = index.lookup(texts)
        missing = list(dict.fromkeys(text for text in texts if text not in known))
        if missing:
            new = np.asarray(encode_texts(missing), dtype=np.float32)
            known.update(zip(missing, new, strict=True))
        if not texts:
            return np.zeros((0, index.dim), dtype=np.float32)
        return np.stack([known[text] for text in texts]).astype(np.float32, copy=False)

    return encode
