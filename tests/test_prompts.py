"""The attribute language: report prompts, probes and training captions."""

from __future__ import annotations

import random

import pytest

from llm2loss_pipeline.core import prompts
from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES


def test_every_attribute_has_distinct_prompt_pairs() -> None:
    for attribute in CELEBA_ATTRIBUTES:
        pairs = prompts.attribute_prompt_pairs(attribute)
        assert len(pairs) >= len(prompts.TEMPLATES)
        assert len(set(pairs)) == len(pairs), attribute
        for positive, negative in pairs:
            assert positive != negative
            assert positive.strip() and negative.strip()
        positives, negatives = prompts.PHRASES[attribute]
        assert not set(positives) & set(negatives), f"{attribute}: a phrase on both sides"


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        (
            "Eyeglasses",
            ("face of a person wearing eyeglasses", "face of a person without eyeglasses"),
        ),
        ("Young", ("face of a young person", "face of an old person")),
        ("Male", ("face of a man", "face of a woman")),
        ("Smiling", ("face of a smiling person", "face of a person with a neutral expression")),
        ("Blond_Hair", ("face of a person with blond hair", "face of a person without blond hair")),
        ("Bald", ("face of a bald person", "face of a person with a full head of hair")),
        ("No_Beard", ("face of a person without a beard", "face of a person with a beard")),
        ("Attractive", ("face of an attractive person", "face of an unattractive person")),
    ],
)
def test_canonical_pairs_read_well(attribute: str, expected: tuple[str, str]) -> None:
    assert prompts.attribute_prompt_pairs(attribute)[0] == expected


def test_pairs_use_every_report_template() -> None:
    pairs = prompts.attribute_prompt_pairs("Wearing_Hat")
    assert ("a photo of a person wearing a hat", "a photo of a person without a hat") in pairs
    for template in prompts.TEMPLATES:
        prefix = template.split("{}")[0]
        assert any(positive.startswith(prefix) for positive, _ in pairs)


def test_describe_without_rng_is_deterministic_and_fluent() -> None:
    values = {"Male": False, "Blond_Hair": True, "Smiling": True, "Eyeglasses": True}
    text = prompts.describe(values)
    assert text == "face of a smiling woman with blond hair wearing eyeglasses"
    assert prompts.describe(dict(reversed(list(values.items())))) == text
    assert prompts.describe({"Wearing_Hat": True, "Eyeglasses": True, "Bangs": True}) == (
        "face of a person with bangs wearing eyeglasses and a hat"
    )
    assert prompts.describe({"Eyeglasses": False, "Wearing_Hat": False}) == (
        "face of a person without eyeglasses or a hat"
    )
    assert prompts.describe({"Young": True, "Smiling": True}, template="{}") == (
        "a smiling young person"
    )


def test_composed_prompts_for_intersections() -> None:
    assert prompts.composed_prompt({"Male": True, "Young": False}) == "face of an old man"
    assert prompts.composed_prompt({"Male": False, "Young": True}) == "face of a young woman"
    assert prompts.composed_prompt({"Male": True}, template="a photo of {}") == "a photo of a man"


def test_describe_with_rng_varies_words_and_templates() -> None:
    values = {"Male": True, "Eyeglasses": True, "Smiling": True}
    texts = {prompts.describe(values, rng=random.Random(seed)) for seed in range(40)}
    assert len(texts) >= 15
    assert any("glasses" in text or "spectacles" in text for text in texts)
    assert all(("man" in t or "male" in t or "guy" in t) for t in texts)
    # a fixed template with an rng varies only the synonyms
    fixed = {
        prompts.describe(values, rng=random.Random(s), template="face of {}") for s in range(40)
    }
    assert all(text.startswith("face of ") for text in fixed)
    assert len(fixed) >= 5


def test_captions_vary_and_never_contradict_the_row() -> None:
    rng = random.Random(0)
    row = {name: False for name in CELEBA_ATTRIBUTES}
    row.update(Male=True, Young=True, Eyeglasses=True, Black_Hair=True, Smiling=True)
    captions = [prompts.caption_for(row, rng) for _ in range(200)]
    assert len(set(captions)) >= 150
    starts = {caption.split(" of ")[0] for caption in captions if " of " in caption}
    assert len(starts) >= 5  # several templates
    for caption in captions:
        words = caption.replace(",", " ").split()
        assert not {"woman", "female", "lady", "old", "elderly", "older"} & set(words), caption
        assert "wearing a hat" not in caption.replace("not wearing a hat", ""), caption
        assert "bald" not in caption.replace("not bald", ""), caption
    mentioned = sum("glasses" in c or "spectacles" in c for c in captions)
    assert 60 <= mentioned <= 180  # mostly positives, not always


def test_draw_caption_reports_what_it_states() -> None:
    rng = random.Random(3)
    row = {name: index % 3 == 0 for index, name in enumerate(CELEBA_ATTRIBUTES)}
    for _ in range(100):
        text, stated = prompts.draw_caption(row, rng)
        assert 1 <= len(stated) <= 5
        assert all(row[name] == value for name, value in stated.items())
        # the text is the description of exactly the stated values, in some wording
        assert text


def test_caption_falls_back_to_a_salient_negative() -> None:
    row = {name: False for name in CELEBA_ATTRIBUTES}
    never = dict.fromkeys(("p_positive", "p_salient_negative", "p_negative"), 0.0)
    _, stated = prompts.draw_caption(row, random.Random(0), **never)
    assert len(stated) == 1
    assert next(iter(stated)) in prompts.SALIENT_NEGATIVES


def test_bad_inputs_are_named() -> None:
    # Any attribute name is phrased (a table dataset's columns); an empty or non-text one is not.
    with pytest.raises(ValueError, match="unknown attribute ''"):
        prompts.describe({"": True})
    with pytest.raises(ValueError, match="unknown attribute 3"):
        prompts.attribute_prompt_pairs(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        prompts.describe({"Male": True}, template="face of")
    with pytest.raises(ValueError, match="at least one"):
        prompts.caption_for({}, random.Random(0))
