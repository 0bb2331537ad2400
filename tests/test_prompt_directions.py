"""Zero-shot directions from one text batch, and the encoder step's seed of the text index.

`prompt_directions` must give each attribute exactly what `attribute_direction` gives it alone
(the zero-shot AUROCs the encoder and the report publish do not move), from a single call of the
text tower; the index the encoder step seeds is the one a report's Diagnoser reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.encoder.evaluate import (
    attribute_direction,
    prompt_directions,
    prompt_texts,
    zero_shot_auroc,
)
from llm2loss_pipeline.core.encoder.text_index import TEXT_INDEX_DIR, known_first, text_index
from llm2loss_pipeline.core.metrics import auroc
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs


class CountingTower:
    """A text tower whose embedding of a text depends on the text alone; counts its calls."""

    def __init__(self, dim: int = 16) -> None:
        self.dim, self.calls = dim, []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)


def test_prompt_directions_equal_one_attribute_at_a_time_from_one_call() -> None:
    tower = CountingTower()
    directions = prompt_directions(tower, list(CELEBA_ATTRIBUTES))
    texts = prompt_texts(CELEBA_ATTRIBUTES)
    assert tower.calls == [len(texts)]  # one batch, each prompt once
    assert len(texts) == len(set(texts)) > 2 * len(CELEBA_ATTRIBUTES)
    assert prompt_directions(tower, []) == {}
    assert tower.calls == [len(texts)]  # nothing asked for no attributes
    for name in CELEBA_ATTRIBUTES:
        alone = attribute_direction(tower, name)
        assert np.array_equal(directions[name], alone), name  # bit for bit


def test_prompt_texts_are_every_pairs_texts_once_in_order() -> None:
    pairs = attribute_prompt_pairs("Eyeglasses") + attribute_prompt_pairs("Pale_Skin")
    expected = list(dict.fromkeys(text for pair in pairs for text in pair))
    assert prompt_texts(["Eyeglasses", "Pale_Skin"]) == expected


def test_zero_shot_auroc_is_unchanged_and_asks_the_tower_once() -> None:
    tower = CountingTower()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, tower.dim))
    labels = {"Eyeglasses": rng.random(30) > 0.5, "Smiling": rng.random(30) > 0.3}
    expected = {
        name: auroc(images @ attribute_direction(tower, name), values)
        for name, values in labels.items()
    }
    tower.calls.clear()
    assert zero_shot_auroc(images, labels, tower) == expected
    assert len(tower.calls) == 1


def test_the_seeded_index_is_the_one_a_diagnoser_reads(tmp_path) -> None:
    tower = CountingTower()
    sha = "ab" * 32
    prompts = prompt_texts(["Pale_Skin"])
    text_index(tmp_path, sha, tower.dim).add(prompts, tower(prompts))
    path = tmp_path.joinpath(*TEXT_INDEX_DIR, f"{sha}.safetensors")
    assert path.is_file()
    found = text_index(tmp_path, sha, tower.dim).lookup(prompts)
    assert list(found) == prompts
    assert np.array_equal(np.stack([found[t] for t in prompts]), tower(prompts))
    assert text_index(tmp_path, "cd" * 32, tower.dim).lookup(prompts) == {}  # another encoder


def test_known_first_embeds_only_the_texts_the_index_lacks_and_adds_nothing(tmp_path) -> None:
    tower = CountingTower()
    sha = "ef" * 32
    prompts = prompt_texts(["Eyeglasses"])
    text_index(tmp_path, sha, tower.dim).add(prompts, tower(prompts))
    tower.calls.clear()
    index = text_index(tmp_path, sha, tower.dim)
    captions = ["a face with a hat", "a smiling face", "a face with a hat"]
    texts = [captions[0], prompts[0], *captions[1:], prompts[1]]
    embedded = known_first(index, tower)(texts)
    assert tower.calls == [2]  # the two distinct captions, once each
    assert np.array_equal(embedded, tower(texts))  # in the order asked
    assert embedded.dtype == np.float32
    assert list(text_index(tmp_path, sha, tower.dim).lookup(texts)) == prompts[:2]
    assert known_first(index, tower)([]).shape == (0, tower.dim)
