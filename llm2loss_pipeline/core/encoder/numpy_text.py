"""The caption_tuned encoder's text tower in numpy, so that a query about a new text needs
neither torch nor open_clip nor transformers (about 8 s of CPU to import and build here).

What it reproduces, from open_clip 3.3.0 (hf_model.py, tokenizer.py) and the encoder built by
`factory._build_caption_tuned`:
- `HFTokenizer`: ftfy, double HTML unescape, whitespace collapsed (its `whitespace` cleaning),
  then the model's tokenizer with truncation to the context (77), [CLS] ... [SEP];
- `Encoder._encode_uncached`: padding cut to the text's own token count (ids equal to the pad
  id do not count), and a warning for a text longer than the context;
- `HFTextEncoder` with `mean_pooler` and `linear` projection: a BERT forward (post-LayerNorm,
  exact GELU) under the padding mask, masked mean over tokens, the bias-free projection, L2
  normalisation (`encode_text(normalize=True)`).

The weights are the saved encoder's own (`text.transformer.*`, `text.proj.weight` in its
safetensors file, whose sha256 is checked against encoder.json as `load_encoder` does), so a
user's text tower is honoured. Anything this module does not reproduce raises
`TowerUnavailable`, and the caller loads the full encoder instead.
"""

from __future__ import annotations

import html
import json
import math
import mmap
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
from tokenizers import Tokenizer

from llm2loss_pipeline.core.encoder.text_input import checked_texts
from llm2loss_pipeline.core.storage import StorageError, existing_dir, sha256_bytes

# named as in core/encoder/checkpoint.py, which imports torch
SIDECAR = "encoder.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
BERT_PREFIX = "text.transformer."
PROJECTION = "text.proj.weight"
DEFAULT_CONTEXT = 77  # open_clip's DEFAULT_CONTEXT_LENGTH, used when text_cfg names none
BATCH = 32  # texts per forward, sorted by length so that little is padding


class TowerUnavailable(Exception):
    """This encoder's text tower is not one the numpy tower reproduces (another mode, pooler,
    projection or architecture): load the full encoder instead."""


def clean_text(text: str) -> str:
    """open_clip's `_clean_whitespace`: `basic_clean` then `whitespace_clean`."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip()


# erf's table: cubic Hermite pieces of width 1/128, whose own error (h^4 / 384 max|erf^(4)|)
# is below 1e-10; float32 rounding (6e-8) is what is left
ERF_STEP = 1.0 / 128
ERF_LIMIT = 6.0  # 1 - erf(6) is 2e-17: beyond it erf is 1


def _erf_table() -> np.ndarray:
    """[4, pieces] coefficients of erf on [k h, (k+1) h] in t = x / h - k, from math.erf and
    its derivative 2/sqrt(pi) e^(-x²) at both ends; float32, as the torch tower computes."""
    grid = np.arange(int(ERF_LIMIT / ERF_STEP) + 2) * ERF_STEP
    value = np.array([math.erf(x) for x in grid])
    slope = ERF_STEP * 2.0 / math.sqrt(math.pi) * np.exp(-grid * grid)
    y0, y1, m0, m1 = value[:-1], value[1:], slope[:-1], slope[1:]
    table = np.stack([y0, m0, 3 * (y1 - y0) - 2 * m0 - m1, 2 * (y0 - y1) + m0 + m1])
    return table.astype(np.float32)


_ERF_TABLE = _erf_table()


def erf(values: np.ndarray) -> np.ndarray:
    """erf of a float32 array, within 6e-8 of math.erf (half a float32 ulp at 1; numpy has no
    erf, and scipy.special costs 0.3 s of import): a table of cubic pieces, a few passes."""
    x = np.asarray(values, dtype=np.float32)
    scaled = np.minimum(np.abs(x), np.float32(ERF_LIMIT))
    scaled *= np.float32(1.0 / ERF_STEP)
    piece = scaled.astype(np.intp)
    t = scaled - piece.astype(np.float32)
    c0, c1, c2, c3 = (np.take(column, piece, mode="clip") for column in _ERF_TABLE)
    result = c3 * t
    for c in (c2, c1, c0):  # Horner, in place
        result += c
        if c is not c0:
            result *= t
    return np.copysign(result, x)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU (transformers' "gelu"), x * Phi(x)."""
    phi = erf(x * np.float32(1.0 / math.sqrt(2.0)))
    phi += np.float32(1.0)
    phi *= np.float32(0.5)
    phi *= x
    return phi


class NumpyTextTower:
    """`encode_texts` of a saved caption_tuned encoder, in numpy float32; `sha256` and
    `embed_dim` as `Encoder` has them."""

    def __init__(
        self,
        weights: dict[str, np.ndarray],
        bert: dict[str, Any],
        tokenizer_json: str,
        context_length: int,
        sha256: str,
    ) -> None:
        self.w = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in weights.items()}
        # dense layers as x @ W.T: the transposes made contiguous once, so that each product is
        # one BLAS call on [tokens, width]
        self.wt = {
            name: np.ascontiguousarray(v.T)
            for name, v in self.w.items()
            if name.endswith(".weight") and v.ndim == 2 and "embeddings" not in name
        }
        self.layers = int(bert["num_hidden_layers"])
        self.heads = int(bert["num_attention_heads"])
        self.eps = float(bert["layer_norm_eps"])
        self.pad_id = int(bert["pad_token_id"])
        self.context_length = int(context_length)
        self.sha256 = sha256
        self.embed_dim = int(self.w["proj"].shape[0])
        self._json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.context_length)
        self._full: Tokenizer | None = None  # untruncated, made for the first over-long text

    def __repr__(self) -> str:
        return f"NumpyTextTower(embed_dim={self.embed_dim}, sha256={self.sha256[:12]!r})"

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 [n, embed_dim], as `Encoder.encode_texts`
        gives them (same errors for empty texts, same warning for over-long ones)."""
        texts = checked_texts(texts)
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        rows = self.token_rows(texts)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            width = max(len(rows[i]) for i in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            for row, position in enumerate(chunk):
                ids[row, : len(rows[position])] = rows[position]
            out[chunk] = self.embed(ids)
        return out

    def token_rows(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text as the torch encoder feeds them: cleaned, truncated to the
        context, then cut to the count of ids that are not the pad id (at least one)."""
        encodings = self.tokenizer.encode_batch([clean_text(t) for t in texts])
        rows = []
        for text, encoding in zip(texts, encodings, strict=True):
            ids = list(encoding.ids)
            if len(ids) == self.context_length and ids[-1] != self.pad_id:
                self._warn_if_truncated(text)
            kept = sum(1 for i in ids if i != self.pad_id)
            rows.append((ids + [self.pad_id] * self.context_length)[: max(kept, 1)])
        return rows

    def _warn_if_truncated(self, text: str) -> None:
        if self._full is None:
            self._full = Tokenizer.from_str(self._json)
            self._full.no_padding()
            self._full.no_truncation()
        length = len(self._full.encode(text).ids)  # the raw text, as Encoder measures it
        if length > self.context_length:
            warnings.warn(
                f"text {text[:80]!r} has {length} tokens; it was truncated to the "
                f"tokenizer context of {self.context_length}",
                stacklevel=4,
            )

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[n, L] token ids (pad id = padding) -> normalised embeddings [n, embed_dim]."""
        w = self.w
        mask = ids != self.pad_id
        positions = np.arange(ids.shape[1])
        x = w["embeddings.word_embeddings.weight"][ids]
        x = x + w["embeddings.position_embeddings.weight"][positions]
        x = x + w["embeddings.token_type_embeddings.weight"][0]  # one segment: type 0
        x = _layer_norm(
            x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps
        )
        # the additive mask of transformers: the float32 minimum on keys that are padding
        bias = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
        for layer in range(self.layers):
            x = self._layer(x, f"encoder.layer.{layer}.", bias)
        weights = mask.astype(np.float32)[:, :, None]
        pooled = (x * weights).sum(axis=1) / weights.sum(axis=1)
        projected = pooled @ w["proj"].T
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        return projected / np.maximum(norms, np.float32(1e-12))  # F.normalize's eps

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1]) @ self.wt[name + ".weight"]
        flat += self.w[name + ".bias"]
        return flat.reshape(*x.shape[:-1], flat.shape[-1])

    def _layer(self, x: np.ndarray, prefix: str, bias: np.ndarray) -> np.ndarray:
        n, length, width = x.shape
        size = width // self.heads

        def split(name: str) -> np.ndarray:  # [n, L, width] -> [n, heads, L, size]
            heads = self._dense(x, prefix + "attention.self." + name)
            return heads.reshape(n, length, self.heads, size).transpose(0, 2, 1, 3)

        query, key, value = split("query"), split("key"), split("value")
        scores = query @ key.transpose(0, 1, 3, 2) / np.float32(math.sqrt(size)) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ value).transpose(0, 2, 1, 3).reshape(n, length, width)
        attended = self._dense(context, prefix + "attention.output.dense") + x
        x = _layer_norm(
            attended,
            self.w[prefix + "attention.output.LayerNorm.weight"],
            self.w[prefix + "attention.output.LayerNorm.bias"],
            self.eps,
        )
        hidden = _gelu(self._dense(x, prefix + "intermediate.dense"))
        out = self._dense(hidden, prefix + "output.dense") + x
        return _layer_norm(
            out,
            self.w[prefix + "output.LayerNorm.weight"],
            self.w[prefix + "output.LayerNorm.bias"],
            self.eps,
        )


# ---- loading ------------------------------------------------------------------------------


def _json_of(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # the full loader names the damage precisely; this path only steps aside
        raise TowerUnavailable(f"{path}: not readable JSON ({exc})") from exc


def _checked_bytes(folder: Path, name: str, sidecar: dict[str, Any]) -> tuple[bytes, str]:
    """A file of the encoder folder and its sha256, checked against the one encoder.json
    lists for it (read once, hashed once: what is checked is what is used)."""
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TowerUnavailable(f"{path}: not readable ({exc})") from exc
    digest = sha256_bytes(data)
    files = sidecar.get("files")
    expected = files.get(name) if isinstance(files, dict) else None
    if expected is not None and digest != expected:
        raise StorageError(
            f"{path}: sha256 {digest[:12]} does not match {SIDECAR} "
            f"({str(expected)[:12]}); the encoder folder is incomplete or was modified"
        )
    return data, digest


def _text_weights(path: Path, expected_sha256: Any) -> tuple[dict[str, np.ndarray], str]:
    """The `text.` tensors of the encoder's safetensors file and the file's sha256.

    The file is mapped, hashed and read as one object: the tensors are views of the very bytes
    that were checked (a run that swaps in a new encoder folder leaves this file's inode alone),
    and nothing is copied: safetensors.numpy.load would copy all 104 MB, image tower included
    (0.1-0.35 s here). The layout is safetensors': an 8-byte little-endian header size, a JSON
    header of name -> dtype, shape, data_offsets, then the data.
    """
    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise TowerUnavailable(f"{path}: not readable ({exc})") from exc
    digest = sha256_bytes(data)  # type: ignore[arg-type]
    if digest != expected_sha256:
        raise StorageError(
            f"{path}: sha256 {digest[:12]} does not match {SIDECAR} "
            f"({str(expected_sha256)[:12]}); the encoder is incomplete or was modified"
        )
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        start = 8 + size
        tensors = {}
        for name, entry in header.items():
            if not name.startswith("text."):
                continue
            if entry["dtype"] != "F32":
                raise TowerUnavailable(f"{path}: {name} is {entry['dtype']}, not F32")
            begin, end = entry["data_offsets"]
            shape = tuple(int(n) for n in entry["shape"])
            if end - begin != 4 * math.prod(shape) or start + end > len(data):
                raise ValueError(f"{name}: data_offsets {entry['data_offsets']} do not fit")
            tensors[name] = np.frombuffer(
                data, np.float32, math.prod(shape), start + begin
            ).reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise TowerUnavailable(f"{path}: not a safetensors file this reads ({exc})") from exc
    return tensors, digest


def _required(layers: int) -> list[str]:
    """The BERT weights the forward reads (names under `text.transformer.`)."""
    names = [
        f"embeddings.{part}.weight"
        for part in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    parts = (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for layer in range(layers):
        for part in parts:
            names += [f"encoder.layer.{layer}.{part}.{kind}" for kind in ("weight", "bias")]
    return names


def _text_cfg(folder: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    """The open_clip text config, if it is the one this module reproduces."""
    if sidecar.get("mode") != "caption_tuned":
        raise TowerUnavailable(f"encoder mode {sidecar.get('mode')!r} is not caption_tuned")
    config = _json_of(folder / OPEN_CLIP_CONFIG)
    text_cfg = (config.get("model_cfg") or {}).get("text_cfg") if isinstance(config, dict) else None
    if not isinstance(text_cfg, dict):
        raise TowerUnavailable(f"{folder / OPEN_CLIP_CONFIG}: no model_cfg.text_cfg")
    wanted = {"hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}
    for key, value in wanted.items():
        if text_cfg.get(key) != value:
            raise TowerUnavailable(f"text_cfg.{key} is {text_cfg.get(key)!r}, not {value!r}")
    for key in ("tokenizer_mode", "tokenizer_kwargs"):
        if text_cfg.get(key):
            raise TowerUnavailable(f"text_cfg.{key} is set ({text_cfg[key]!r})")
    return text_cfg


def _bert_config(data: bytes, path: Path) -> dict[str, Any]:
    try:
        bert = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TowerUnavailable(f"{path}: not readable JSON ({exc})") from exc
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if bert.get(key, value) != value:
            raise TowerUnavailable(f"{path}: {key} is {bert.get(key)!r}, not {value!r}")
    for key in ("num_hidden_layers", "num_attention_heads", "layer_norm_eps", "pad_token_id"):
        if not isinstance(bert.get(key), int | float):
            raise TowerUnavailable(f"{path}: {key} is missing")
    return bert


def load_numpy_text_tower(encoder_dir: str | Path) -> NumpyTextTower:
    """The text tower of the saved encoder in `encoder_dir` (a `save_encoder` folder).

    Raises TowerUnavailable where the folder holds another kind of text tower (the caller then
    loads the full encoder), StorageError where a file it reads does not match encoder.json.
    """
    folder = existing_dir(Path(encoder_dir).expanduser().resolve())
    sidecar = _json_of(folder / SIDECAR)
    if not isinstance(sidecar, dict) or not all(
        isinstance(sidecar.get(key), str) for key in ("weights_file", "sha256")
    ):
        raise TowerUnavailable(f"{folder / SIDECAR}: no weights_file and sha256")
    text_cfg = _text_cfg(folder, sidecar)
    arrays, sha256 = _text_weights(folder / sidecar["weights_file"], sidecar.get("sha256"))
    bert = _bert_config(_checked_bytes(folder, "config.json", sidecar)[0], folder / "config.json")
    tokenizer_json = _checked_bytes(folder, "tokenizer.json", sidecar)[0].decode("utf-8")
    try:
        Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        raise TowerUnavailable(f"{folder / 'tokenizer.json'}: {exc}") from exc
    weights = {k[len(BERT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BERT_PREFIX)}
    absent = [name for name in _required(int(bert["num_hidden_layers"])) if name not in weights]
    if PROJECTION not in arrays or absent:
        raise TowerUnavailable(
            f"{folder / sidecar['weights_file']}: no text tower weight "
            f"{BERT_PREFIX}{absent[0] if absent else PROJECTION}"
        )
    weights["proj"] = arrays[PROJECTION]
    context = (sidecar.get("tokenizer") or {}).get("context_length") or text_cfg.get(
        "context_length", DEFAULT_CONTEXT
    )
    tower = NumpyTextTower(weights, bert, tokenizer_json, int(context), sha256)
    if tower.embed_dim != sidecar.get("embed_dim", tower.embed_dim):
        raise TowerUnavailable(f"projection width {tower.embed_dim} is not the embed_dim")
    return tower
