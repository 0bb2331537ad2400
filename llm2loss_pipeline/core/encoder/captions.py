"""The caption pool: training texts of the caption-tuned encoder, written once and embedded once.

Every training image contributes `captions_per_image` captions (`prompts.draw_caption`), each
recording the attribute values it states. A caption is *true of* any image whose attributes agree
with every value it states, not only of the image it was written for: "face of a smiling woman"
describes hundreds of images. The pool therefore keeps, per image, the captions true of it (its own
first, then others from a random candidate sample), and a training step may pair the image with
any of them. This multiplies the wording each image sees without embedding more texts: the frozen
sentence model runs at only a few hundred texts per second on two CPU cores, so embedding is the
expensive part of the budget.

The same truth table gives the targets of the `consistent` loss (see `train.py`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from llm2loss_pipeline.core.prompts import caption_for, draw_caption

CANDIDATES = 8192
"""Pool captions checked against each image for truth (a fixed random sample when larger)."""


@dataclass(frozen=True)
class CaptionPool:
    """`texts[j]` states the values `values[j, a]` of the attributes where `stated[j, a]`.

    `true_of[i, :n_true[i]]` index the captions true of image i, its own captions first.
    `rows[i]` are image i's attribute values (over `attributes`, the columns of every matrix;
    False when unknown) and `known[i]` which of them it has. `embeddings[j]` is filled by
    `embed_pool`.
    """

    texts: list[str]
    stated: np.ndarray
    values: np.ndarray
    rows: np.ndarray
    known: np.ndarray
    true_of: np.ndarray
    n_true: np.ndarray
    attributes: tuple[str, ...] = ()
    embeddings: np.ndarray | None = None

    @property
    def n_unique_texts(self) -> int:
        return len(set(self.texts))


def row_attributes(attribute_rows: Sequence[Mapping[str, bool]]) -> tuple[str, ...]:
    """The attributes the rows name, in the order they first appear (the attribute table's)."""
    seen: dict[str, None] = {}
    for row in attribute_rows:
        seen.update(dict.fromkeys(row))
    return tuple(seen)


def attribute_matrix(
    attribute_rows: Sequence[Mapping[str, bool]], attributes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(values, known) boolean matrices [n, len(attributes)] (default: `row_attributes`)."""
    names = tuple(attributes) if attributes is not None else row_attributes(attribute_rows)
    values = np.zeros((len(attribute_rows), len(names)), dtype=bool)
    known = np.zeros_like(values)
    column = {name: index for index, name in enumerate(names)}
    for position, row in enumerate(attribute_rows):
        if not row:
            raise ValueError(f"attribute row {position} is empty: nothing to write a caption from")
        for name, value in row.items():
            if name not in column:
                raise ValueError(
                    f"attribute row {position} names {name!r}, which is not one of the "
                    f"attributes {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                )
            values[position, column[name]] = bool(value)
            known[position, column[name]] = True
    return values, known


def truth(
    rows: np.ndarray, known: np.ndarray, stated: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """[n_images, n_captions] True where every value a caption states holds for the image
    (an attribute the image does not have a label for counts as a disagreement)."""
    rows_f = rows.astype(np.float32)
    unknown_f = (~known).astype(np.float32)
    stated_f = stated.astype(np.float32)
    stated_true = (stated & values).astype(np.float32)
    # disagreements: stated attributes where the image's value differs from the stated one
    mismatches = (
        rows_f @ stated_f.T
        + stated_true.sum(axis=1)[None, :]
        - 2.0 * rows_f @ stated_true.T
        + unknown_f @ stated_f.T
    )
    return mismatches < 0.5


def build_caption_pool(
    attribute_rows: Sequence[Mapping[str, bool]],
    captions_per_image: int,
    seed: int,
    max_true_per_image: int = 48,
) -> CaptionPool:
    """Write `captions_per_image` captions per image and index which captions are true of which
    image, deterministically for `seed`."""
    if not attribute_rows:
        raise ValueError("no attribute rows: the caption-tuned encoder needs attributes to caption")
    names = row_attributes(attribute_rows)
    rows, known = attribute_matrix(attribute_rows, names)
    rng = random.Random(seed)
    n_images, n_attributes = rows.shape
    n_pool = n_images * captions_per_image
    drawn = [draw_caption(row, rng) for row in attribute_rows for _ in range(captions_per_image)]
    texts = [text for text, _ in drawn]
    stated = np.zeros((len(drawn), n_attributes), dtype=bool)
    values = np.zeros((len(drawn), n_attributes), dtype=bool)
    column = {name: index for index, name in enumerate(names)}
    for j, (_, said) in enumerate(drawn):
        for name, value in said.items():
            stated[j, column[name]] = True
            values[j, column[name]] = value

    np_rng = np.random.default_rng(seed)
    candidates = np.arange(n_pool)
    if n_pool > CANDIDATES:
        candidates = np.sort(np_rng.choice(n_pool, size=CANDIDATES, replace=False))
    width = max(max_true_per_image, captions_per_image)
    true_of = np.zeros((n_images, width), dtype=np.int64)
    n_true = np.zeros(n_images, dtype=np.int64)
    for start in range(0, n_images, 1024):
        stop = min(start + 1024, n_images)
        table = truth(rows[start:stop], known[start:stop], stated[candidates], values[candidates])
        for offset, mask in enumerate(table):
            image = start + offset
            own = np.arange(image * captions_per_image, (image + 1) * captions_per_image)
            others = candidates[mask]
            others = others[(others < own[0]) | (others > own[-1])]
            room = width - len(own)
            if len(others) > room:
                others = np_rng.choice(others, size=room, replace=False)
            chosen = np.concatenate([own, np.sort(others)])
            true_of[image, : len(chosen)] = chosen
            n_true[image] = len(chosen)
    return CaptionPool(
        texts=texts,
        stated=stated,
        values=values,
        rows=rows,
        known=known,
        true_of=true_of,
        n_true=n_true,
        attributes=names,
    )


def embed_pool(pool: CaptionPool, encode_texts) -> CaptionPool:
    """Fill the pool's embeddings [n_captions, d] with one `encode_texts` call (duplicates are
    embedded once by the encoder's text cache)."""
    return replace(pool, embeddings=np.asarray(encode_texts(pool.texts), dtype=np.float32))


def captions_for_rows(attribute_rows: Sequence[Mapping[str, bool]], seed: int = 0) -> list[str]:
    """One caption per row (e.g. for retrieval evaluation on the validation split)."""
    rng = random.Random(seed)
    return [caption_for(row, rng) for row in attribute_rows]
