"""Questions within one class of an attribute task (core/heads/within_class.py): which class two
texts name, that they are asked among that class's images only, and how their answer is judged."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core import prompts
from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.discovery.candidates import class_candidates, single_candidates
from llm2loss_pipeline.core.heads.compare import compare_members, free_text_p_worse
from llm2loss_pipeline.core.heads.probe_reading import ProbeReading
from llm2loss_pipeline.core.heads.within_class import (
    MIN_CLASS_IMAGES,
    ClassScope,
    named_side,
    shared_class,
    side_words,
)
from llm2loss_pipeline.core.members import MemberInfo
from llm2loss_pipeline.core.query import _class_counts, read_snapshot, write_snapshot
from llm2loss_pipeline.core.report.calibration import Calibration
from llm2loss_pipeline.core.report.grounded import grounded_diffs
from tests.test_diagnoser import diagnoser, home, pool_embeddings  # noqa: F401  (fixtures)

BLOND = side_words("Blond_Hair", CELEBA_ATTRIBUTES)
MALE = side_words("Male", CELEBA_ATTRIBUTES)


def test_a_targets_words_are_its_own() -> None:
    positive, negative = BLOND
    assert {"blond", "blonde", "golden"} <= positive
    assert "hair" not in positive  # every hair colour says "hair"
    assert not negative  # Blond_Hair's negatives only negate it
    assert (frozenset({"man", "male", "guy"}), frozenset({"woman", "female", "lady"})) == MALE


@pytest.mark.parametrize(
    ("text", "side"),
    [
        ("a photo of a blond man", True),
        ("a blonde woman", True),
        ("a person with golden hair", True),
        ("a woman whose hair is not blond", False),
        ("a man without blond hair", False),
        ("a man without glasses and blond hair", True),  # the negation is out of reach
        ("a blond woman next to a man who is not blond", None),  # both sides
        ("a photo of a man", None),
        # discover's class candidates read back as their class
        ("face of a man, among images labelled Blond_Hair", True),
        ("face of a man, among images not labelled Blond_Hair", False),
    ],
)
def test_the_side_a_text_names(text: str, side: bool | None) -> None:
    assert named_side(text, BLOND) is side


def test_discovers_class_candidates_are_asked_within_their_class() -> None:
    singles = single_candidates(["Male", "Eyeglasses"])
    for candidate in class_candidates(singles, "Blond_Hair"):
        assert named_side(candidate.text, BLOND) is candidate.scope[1], candidate.text


def test_plurals_and_the_negative_sides_own_words() -> None:
    assert named_side("two women", MALE) is False
    assert named_side("men in hats", MALE) is True
    assert named_side("not a woman", MALE) is True


def test_a_probes_files_phrasings_give_its_own_words() -> None:
    table = {
        "is_vegan": (["who:eats only plants", "adj:vegan"], ["who:eats meat"]),
        "hair_blond": (["with:blond hair"], ["with:dark hair"]),
    }
    with prompts.phrased_by(table):
        words = side_words("is_vegan", ["is_vegan", "hair_blond"])
    # "eats" is stated on both sides: it names neither
    assert words == (frozenset({"only", "plants", "vegan"}), frozenset({"meat"}))
    assert shared_class(["a vegan man", "a vegan woman"], words) is True
    assert shared_class(["a man who eats meat", "a woman who eats meat"], words) is False
    # a column phrased from its name ("with hair blond") shares "hair" with nothing here
    assert side_words("hair_blond", ["is_vegan", "hair_blond"])[0] == {"hair", "blond"}


def test_texts_share_a_class_only_when_all_name_it() -> None:
    assert shared_class(["a blond man", "a blond woman"], BLOND) is True
    assert shared_class(["a man who is not blond", "a woman without blond hair"], BLOND) is False
    assert shared_class(["a blond man", "a woman"], BLOND) is None
    assert shared_class(["a blond man", "a man without blond hair"], BLOND) is None


MEMBERS = [MemberInfo(index=s, seed=s, kind="mlp", arch="mlp") for s in range(8)]
CALIBRATION = Calibration("grounded", slope=0.4, text_error=0.3, n_attributes=30)
SCOPE = ClassScope("Blond_Hair", True, 174)


def _reading(share: float, p_worse: float = 0.55) -> ProbeReading:
    return ProbeReading("Male", share=share, sign=1, p_worse=p_worse, resolves=True)


def test_a_question_within_a_class_is_not_the_reports_marginal_answer() -> None:
    diffs = np.linspace(0.6, 1.0, 8)
    outside = compare_members(diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.8))
    assert outside.asked_as_probe and outside.p_a_worse == 0.55  # the report's own answer
    within = compare_members(
        diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.8), SCOPE
    )
    assert not within.asked_as_probe and within.probe_within_class
    # the probe's text error, on the class's own estimate
    expected = 0.5 * math.erfc(-diffs.mean() / math.hypot(diffs.std(ddof=1), 0.3) / math.sqrt(2))
    assert within.p_a_worse == pytest.approx(expected)
    assert "among the 174 evaluation images labelled Blond_Hair" in within.verdict
    assert "as Male (80% of the question) within it" in within.verdict
    assert within.to_dict()["scope"] == {
        "target": "Blond_Hair",
        "value": True,
        "n_images": 174,
        "probe_sides": None,
    }
    # a question no probe holds: free text, which had no skill within a class
    free = compare_members(
        diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.3), SCOPE
    )
    assert not free.probe_within_class and free.p_a_worse == 0.5 and not free.claimed
    assert free.verdict.startswith("cannot tell: A ('a') and B ('b') both name one class")
    assert "the nearest, Male, holds 30%" in free.verdict
    # a class that holds no labelled image on one side of the probe's attribute
    none = ClassScope("Blond_Hair", True, 174, probe_sides=(0, 174))
    empty = compare_members(
        diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.8), none
    )
    assert not empty.probe_within_class and empty.p_a_worse == 0.5 and not empty.claimed
    assert "0 are labelled Male and 174 are not: no such people" in empty.verdict
    few = ClassScope("Blond_Hair", True, 174, probe_sides=(1, 173))  # few, but some: answered
    assert compare_members(
        diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.8), few
    ).probe_within_class
    # outside a class the same question is free text's, with its own error
    plain = compare_members(diffs, MEMBERS, "a", "b", "grounded", CALIBRATION, 0.9, _reading(0.3))
    assert plain.p_a_worse == pytest.approx(free_text_p_worse(diffs, CALIBRATION))


def test_compare_asks_texts_naming_one_class_among_its_images(diagnoser) -> None:  # noqa: F811
    labels, pool = pool_embeddings()
    hat = labels[:, 1]
    diagnoser.use_pool(pool, classes=hat.astype(np.int8))
    diagnoser.class_words = lambda: ("Wearing_Hat", (frozenset({"hat"}), frozenset()))
    a, b = "a person wearing glasses and a hat", "a person wearing a hat"
    within, outside = diagnoser.compare_many([(a, b), ("a person wearing glasses", "a person")])
    assert within.scope == ClassScope("Wearing_Hat", True, int(hat.sum()))
    assert outside.scope is None
    features, scores, weights = diagnoser.grounding_pool()
    text = diagnoser.text_features([a, b])
    expected = grounded_diffs(scores, features, text[:1] - text[1:], weights * hat)[:, 0]
    assert np.allclose(within.diffs, expected)
    over_all = grounded_diffs(scores, features, text[:1] - text[1:], weights)[:, 0]
    assert not np.allclose(within.diffs, over_all)
    ranked = diagnoser.rank(["a hat and glasses", "a hat"])
    assert ranked[0]["within"] == within.scope.to_dict()
    # a class the pool holds too few images of is not asked within
    few = np.zeros(len(pool), dtype=np.int8)
    few[: MIN_CLASS_IMAGES - 1] = 1
    diagnoser.use_pool(pool, classes=few)
    assert diagnoser.compare(a, b).scope is None
    with pytest.raises(ValueError, match=r"3 classes for 600 pool images"):
        diagnoser.use_pool(pool, classes=np.ones(3))


def test_compare_reads_what_the_class_holds_of_the_probes_attribute(diagnoser) -> None:  # noqa: F811
    labels, pool = pool_embeddings()
    hat = labels[:, 1]
    diagnoser.use_pool(pool, classes=hat.astype(np.int8))
    diagnoser.class_words = lambda: ("Wearing_Hat", (frozenset({"hat"}), frozenset()))
    counts = np.zeros((1, 2, 2), dtype=np.int64)
    counts[0, 1] = (int(hat.sum()), 0)  # no one with a hat is labelled with glasses
    diagnoser.class_counts = (("glasses",), counts)
    reading = ProbeReading("glasses", share=0.9, sign=1, p_worse=0.99, resolves=True)
    diagnoser._probe_readings = lambda directions: [reading] * len(directions)
    pair = ("a person wearing glasses and a hat", "a person wearing a hat")
    diagnoser._calibration["grounded"] = CALIBRATION  # as a built report's calibration.json
    answer = diagnoser.compare(*pair)
    assert answer.scope.probe_sides == (0, int(hat.sum())) and answer.scope.empty_side
    assert answer.calibrated and answer.p_a_worse == 0.5
    assert "0 are labelled glasses" in answer.verdict and "no such people" in answer.verdict
    # rank reads them per text, as compare does
    rows = diagnoser.rank(["glasses and a hat", "a hat"])
    assert all(row["within"]["probe_sides"] == [0, int(hat.sum())] for row in rows)
    assert all(row["p_worse"] == 0.5 and row["verdict"] == "cannot tell" for row in rows)
    # a probe that does not hold the question: its attribute's counts are not read
    weak = ProbeReading("glasses", share=0.3, sign=1, p_worse=0.99, resolves=True)
    diagnoser._probe_readings = lambda directions: [weak] * len(directions)
    assert diagnoser.compare(*pair).scope.probe_sides is None


def test_class_counts_and_the_snapshot_keep_what_each_class_holds(tmp_path, diagnoser) -> None:  # noqa: F811
    labels, pool = pool_embeddings()
    classes = labels[:, 1].astype(np.int8)
    frame = pl.DataFrame(
        {"glasses": labels[:, 0], "partly": [None, *labels[1:, 2]], "loss": np.zeros(len(pool))}
    )
    names, counts = _class_counts(frame, classes)
    assert names == ("glasses", "partly")  # boolean columns only
    hat = classes == 1
    assert counts[0, 1].tolist() == [int((~labels[hat, 0]).sum()), int(labels[hat, 0].sum())]
    assert counts[1].sum() == len(pool) - 1  # the unlabelled image counts on neither side
    diagnoser.use_pool(pool, classes=classes)
    diagnoser.class_counts = (names, counts)
    scope = ClassScope("Wearing_Hat", True, int(hat.sum()))
    assert diagnoser.class_sides(scope, "glasses") == (
        int(labels[hat, 0].sum()),
        int((~labels[hat, 0]).sum()),
    )
    assert diagnoser.class_sides(scope, "Smiling") is None
    write_snapshot(tmp_path / "s.safetensors", diagnoser)
    _, _, _, _, (_, (kept_classes, kept_counts)) = read_snapshot(tmp_path / "s.safetensors")
    assert np.array_equal(kept_classes, classes)
    assert kept_counts[0] == names and np.array_equal(kept_counts[1], counts)
    diagnoser.use_pool(pool)  # a new pool drops the old one's counts
    assert diagnoser.class_counts is None
    write_snapshot(tmp_path / "t.safetensors", diagnoser)
    assert read_snapshot(tmp_path / "t.safetensors")[4][1] == (None, None)


def test_a_null_text_error_reads_back_as_infinite() -> None:
    # JSON has no infinity: a fit whose estimates ran against the gaps is written null
    data = {"estimator": "grounded", "slope": -0.2, "text_error": None, "n_attributes": 30}
    assert Calibration.from_json(data).text_error == math.inf
