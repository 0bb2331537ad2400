"""Candidate descriptions: attribute phrases, their pairs and triples, and user-supplied texts.

Every attribute value (each diagnosed attribute, present or absent) is one single description in
the report's wording (`prompts.composed_prompt`, e.g. "face of a person with gray hair"). Pairs
and triples of CelebA's 40 x 2 values would be 3,000 and 80,000 texts, most of them about groups
nobody is worse on, so composition is a beam: only the `beam` singles the heads rate worst are
extended, with every other value (pairs) and then with each other (triples). A user vocabulary is
added verbatim; duplicates keep their first source.

Neutral wording. Some CelebA labels rate a person's looks or body (Attractive, Chubby, Big_Nose,
...). Discovery speaks unprompted, so by default (`discovery.avoid_subjective`) a composed
description says such a value in neutral words (`NEUTRAL_WORDING`: "with a round full face" for
Chubby), and leaves out a value with no neutral wording (Attractive either way). The value is still
the description's, so its labels verify it; only the words change. A user's vocabulary is verbatim.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm2loss_pipeline.core.prompts import (
    DEFAULT_TEMPLATE,
    Phrase,
    _realise,  # the grammar's realiser, for phrases other than the canonical ones
    composed_prompt,
    in_sentence_order,
    phrases,
    text_lines,
)

SOURCES = ("attribute", "pair", "triple", "vocabulary", "proposer", "class")

NEUTRAL_WORDING: dict[tuple[str, bool], str | None] = {
    ("Attractive", True): None,  # a rating of looks: no neutral words, never said unprompted
    ("Attractive", False): None,
    ("Chubby", True): "with:a round full face",
    ("Chubby", False): "adj:lean",
    ("Big_Nose", True): "with:a prominent nose",
    ("Big_Nose", False): "with:a small nose",
    ("Big_Lips", True): "with:full lips",
    ("Big_Lips", False): "with:thin lips",
    ("Double_Chin", True): "with:a chin with two folds",
    ("Double_Chin", False): "with:a defined chin",
    ("Bags_Under_Eyes", True): "with:puffy eyes",
    ("Bags_Under_Eyes", False): "with:smooth skin under the eyes",
}
"""Subjective attribute values -> "slot:neutral words" (None: left out of composed descriptions).

Each is one of the value's own phrases in `prompts.PHRASES`, the words the caption-tuned encoder
is trained on. Words it never saw match other images: "shadows under the eyes" picked out
Bags_Under_Eyes at a zero-shot AUROC of 0.45-0.74 on tuning worlds 1001-1004 ("puffy eyes":
0.77-0.97), "a rounded chin" Double_Chin at 0.66-0.91 ("a chin with two folds": 0.92-0.99), "a
narrow face" the slim at 0.20-0.51, against the labels; the planted Bags_Under_Eyes of tuning
world 1004 and Double_Chin of reporting world 2014 were missed by discovery for it
(bench/RESULTS.md, stop 29)."""


def neutral_phrase(attribute: str, value: bool) -> Phrase | None:
    """The phrase discovery uses for a value: the canonical one, or its neutral wording."""
    if (attribute, value) not in NEUTRAL_WORDING:
        return phrases(attribute, value)[0]
    raw = NEUTRAL_WORDING[(attribute, value)]
    if raw is None:
        return None
    slot, _, text = raw.partition(":")
    return Phrase(slot, text)


class VocabularyError(ValueError):
    """A vocabulary file is missing, unreadable or has no description; names the file."""


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str
    values: tuple[tuple[str, bool], ...] = field(default=())
    """the attribute values the text states, for composed candidates (empty for free text)"""
    scope: tuple[str, bool] | None = None
    """an attribute task's target and one of its values (source "class"): the candidate is
    matched, estimated and verified among the evaluation images whose task label is that value;
    `values` ends with it and `text` says it"""
    query: str = ""
    """the words embedded, where they are not `text` (a class candidate's: its description
    without the scope, which the task's labels decide, not the encoder)"""

    @property
    def words(self) -> str:
        """What the encoder reads for this candidate."""
        return self.query or self.text

    @property
    def attributes(self) -> str:
        """'Gray_Hair, not Young': the stated values, readable and greppable."""
        return ", ".join(name if value else f"not {name}" for name, value in self.values)


def describe_values(values: Iterable[tuple[str, bool]], *, neutral: bool = False) -> Candidate:
    """The candidate stating `values`; `neutral`: in NEUTRAL_WORDING's words (a value without
    neutral words raises ValueError: callers leave those out first)."""
    values = list(values)
    rank = {name: i for i, name in enumerate(in_sentence_order([n for n, _ in values]))}
    ordered = tuple(sorted(values, key=lambda item: rank[item[0]]))
    source = {1: "attribute", 2: "pair", 3: "triple"}.get(len(ordered), "triple")
    if not neutral:
        return Candidate(composed_prompt(dict(ordered)), source, ordered)
    chosen = [(name, neutral_phrase(name, value)) for name, value in ordered]
    missing = [name for name, phrase in chosen if phrase is None]
    if missing:
        raise ValueError(f"no neutral wording for {', '.join(missing)}")
    return Candidate(DEFAULT_TEMPLATE.format(_realise(chosen)), source, ordered)


def is_negation(attribute: str, value: bool) -> bool:
    """Whether the canonical wording of a value says what is absent ("without a goatee", "not
    blond") rather than what is there ("old", "with a beard", "clean-shaven")."""
    phrase = phrases(attribute, value)[0]
    return phrase.slot == "without" or " not " in f" {phrase.text} "


def single_candidates(
    attributes: Sequence[str],
    *,
    negations: bool = False,
    avoid_subjective: bool = False,
) -> list[Candidate]:
    """One description per attribute value, both values of each attribute.

    Values worded as an absence are left out unless `negations`: CLIP-style text towers largely
    ignore negation, so "face of a person without gray hair" lands next to "... with gray hair"
    and retrieves exactly the samples it claims to exclude (measured on the default world: such
    descriptions were "kept" on the gray-haired samples' losses).
    """
    return [
        describe_values([(name, value)], neutral=avoid_subjective)
        for name in attributes
        for value in (True, False)
        if (negations or not is_negation(name, value))
        and not (avoid_subjective and neutral_phrase(name, value) is None)
    ]


def compose(
    singles: Sequence[Candidate],
    scores: Sequence[float] | np.ndarray,
    *,
    max_arity: int,
    beam: int,
    neutral: bool = False,
) -> list[Candidate]:
    """Pairs and triples grown from the `beam` best-scored singles (higher score = worse).

    Pairs: each beam single with every single of another attribute. Triples: three beam singles
    of three distinct attributes. Nothing beyond `max_arity`.
    """
    if len(singles) != len(scores):
        raise ValueError(f"{len(singles)} singles but {len(scores)} scores")
    if max_arity < 2:
        return []
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    top = [singles[i] for i in order[:beam]]
    seen: set[frozenset[tuple[str, bool]]] = set()
    composed: list[Candidate] = []

    def add(parts: Sequence[Candidate]) -> None:
        values = [value for part in parts for value in part.values]
        names = [name for name, _ in values]
        if len(set(names)) != len(names):
            return  # an attribute stated twice ("with A" and "without A") describes nobody
        key = frozenset(values)
        if key not in seen:
            seen.add(key)
            composed.append(describe_values(values, neutral=neutral))

    for first in top:
        for second in singles:
            add([first, second])
    if max_arity >= 3:
        for triple in itertools.combinations(top, 3):
            add(list(triple))
    return composed


def read_vocabulary(path: str | os.PathLike[str]) -> list[str]:
    """Descriptions from a text file, parsed by `prompts.text_lines`: one per line; blank lines
    and '#' comments are skipped."""
    source = Path(path)
    try:
        texts = text_lines(source.read_bytes())
    except FileNotFoundError:
        raise VocabularyError(f"{source}: no such vocabulary file") from None
    except OSError as exc:
        raise VocabularyError(f"{source}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:  # an undecodable byte, with its line
        raise VocabularyError(f"{source}: {exc}") from None
    if not texts:
        raise VocabularyError(
            f"{source}: the vocabulary file has no description (one per line; '#' starts a comment)"
        )
    return texts


def merge(groups: Iterable[Iterable[Candidate]], limit: int | None = None) -> list[Candidate]:
    """Candidates in order, each text once (case- and space-insensitive), at most `limit`.

    A text given twice keeps its first source; when a later copy states attribute values (a
    vocabulary line that is an attribute phrase word for word), the kept one takes them, so that
    the labels can check its words."""
    result: list[Candidate] = []
    seen: dict[str, int] = {}
    for group in groups:
        for candidate in group:
            key = " ".join(candidate.text.lower().split())
            if not key:
                continue
            if key not in seen:
                seen[key] = len(result)
                result.append(candidate)
            elif candidate.values and not result[seen[key]].values:
                first = result[seen[key]]
                result[seen[key]] = Candidate(first.text, first.source, candidate.values)
    return result if limit is None else result[:limit]


def free_text(texts: Iterable[str], source: str = "vocabulary") -> list[Candidate]:
    return [Candidate(" ".join(text.split()), source) for text in texts if text.strip()]


def generate_candidates(
    score: Callable[[Sequence[str]], np.ndarray],
    *,
    max_arity: int = 2,
    beam: int = 12,
    vocabulary: Sequence[str] = (),
    proposals: Sequence[str] = (),
    limit: int | None = None,
    attributes: Sequence[str] = (),
    negations: bool = False,
    avoid_subjective: bool = False,
) -> list[Candidate]:
    """All candidates: singles, composed pairs/triples, user vocabulary, language-model proposals.

    `score(texts)` is a worse-is-higher number per text (the heads' ensemble mean); it only
    chooses which singles the beam extends. User texts and proposals come first so that `limit`
    never drops what a person asked for. `attributes`: the dataset's diagnosed attributes.
    """
    if not attributes:
        raise ValueError("generate_candidates needs the dataset's attributes (attributes=...)")
    singles = single_candidates(attributes, negations=negations, avoid_subjective=avoid_subjective)
    composed = compose(
        singles,
        np.asarray(score([c.text for c in singles])),
        max_arity=max_arity,
        beam=beam,
        neutral=avoid_subjective,
    )
    return merge(
        [free_text(vocabulary), free_text(proposals, "proposer"), singles, composed], limit
    )


def class_candidates(singles: Sequence[Candidate], target: str) -> list[Candidate]:
    """For an attribute task with `target`: each single description within each class of the
    task's own labels ("face of a man, among images labelled Blond_Hair"). A classifier's
    failure is often one attribute within one class (blond men, where blond training images are
    mostly women); over all images that attribute's matched set mixes the class it fails with
    the one it does not."""
    return [
        Candidate(
            f"{single.text}, among images {'' if value else 'not '}labelled {target}",
            "class",
            (*single.values, (target, value)),
            scope=(target, value),
            query=single.text,
        )
        for value in (True, False)
        for single in singles
        if single.source == "attribute"
    ]


def contains_attribute(candidate: Candidate | Mapping[str, object], attribute: str) -> bool:
    """Whether a candidate states `attribute` as present (by its values, else by its text)."""
    if isinstance(candidate, Candidate):
        return (attribute, True) in candidate.values
    stated = str(candidate.get("attributes") or "")
    return attribute in [part.strip() for part in stated.split(",")]
