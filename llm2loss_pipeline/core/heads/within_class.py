"""Questions within one class of an attribute task: "a blond man" vs "a blond woman".

An attribute task's loss is its classifier's on the target's labels, and those labels are known
wherever a loss is. Two texts that both name the same side of the target ask about what else
they name *within that class*: "is my Blond_Hair classifier worse on blond men than on blond
women?" is not "is it worse on men?". The marginal question, which the report's Male row
answers, mixes the blond men it fails with the dark-haired men it classifies well; on
configs/spurious.yaml it got P 0.83-0.87 where, among the blond images, the answer is sure.
So such a pair is asked among the evaluation images labelled with that class only.

Which side of the target a text names is read from its words, not its embedding: under the
offline encoder "a man" scores higher on the blond probe than "a blond man" (bench/RESULTS.md,
"Stop 25"), while the words say it plainly. A text names the target's positive side when it
holds one of the target's own words (`side_words`: those its positive phrasings state and its
negative ones do not, and no other attribute's phrasings use, so "hair" names no hair colour)
and the negative side when that word is negated ("not blond", "without glasses") or it holds a
word only the negative phrasings state ("woman" for Male, "old" for Young). A text that names
both sides, or neither, names no class, and the question is asked over all images as before.

How such an answer is judged was chosen on the spurious worlds of seeds 0, 7, 101 and 102
(configs/spurious.yaml, changing only `world.seed`) against each world's population truth within
the class (bench/within_class.py; bench/RESULTS.md, "Stop 26"), 64 questions a world: each tested
attribute, with and without, inside each class of Blond_Hair.
- A question one report probe holds (its share of the texts' difference at least
  `PROBE_SHARE`, as in probe_reading.py) is that probe's question within the class: P(A worse)
  is the class's own estimate judged with the probe's text error, the report's tau. Scaling tau
  by 0.75 to 2 left the Brier score flat (0.200-0.206), so it is taken as it is; the answers it
  stated at 0.9 or more were all on the right side.
- Free text no probe holds had no skill within a class: its answers named the right side 47-52%
  of the time at every stated level (Brier 0.280 with the free-text error, 0.250 for "cannot
  tell"). Within a class it gets P 1/2, "cannot tell", with the nearest probe named.
- A fit of the text error within each class, on the labelled attributes' gaps there, was worse:
  outside the blond images a Blond_Hair classifier's loss barely moves, the fitted scale came out
  near 0 with a small tau, and 10 claims there were all wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from llm2loss_pipeline.core import prompts

MIN_CLASS_IMAGES = 20
"""The fewest evaluation images of a class a question is asked among; with fewer, some member's
bootstrap may draw none of them, and the class is no sample of anything."""
NEGATIONS = frozenset({"not", "no", "non", "without", "never"})
NEGATION_REACH = 2
"""Tokens before a word that can negate it: "without blond hair", "not wearing glasses", "is not
blond". Three would also negate "without glasses and blond hair"'s "blond"."""
IRREGULAR = {"men": "man", "women": "woman", "ladies": "lady", "guys": "guy"}
_TOKEN = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ClassScope:
    """A question asked among the evaluation images of one class of the task's target."""

    target: str
    value: bool
    n_images: int
    probe_sides: tuple[int, int] | None = None
    """of those images, how many are labelled with and without the attribute whose probe holds
    the question (None: not known, or no probe holds it)"""

    @property
    def empty_side(self) -> bool:
        """Whether the class holds no labelled image on one side of the question's attribute
        ("blond hair and black hair": no such people), so there is nothing to answer about.
        Small sides are kept: seed 0's 7 blond images with a necktie carried a right claim (the
        report's small-group size, 20, as the bar cut 6 of 15 right claims: bench/RESULTS.md,
        "Stop 26")."""
        return self.probe_sides is not None and min(self.probe_sides) == 0

    @property
    def words(self) -> str:
        """'the N evaluation images labelled Blond_Hair' (or 'not labelled')."""
        label = "labelled" if self.value else "not labelled"
        return f"the {self.n_images} evaluation images {label} {self.target}"

    def to_dict(self) -> dict[str, object]:
        sides = list(self.probe_sides) if self.probe_sides is not None else None
        return {
            "target": self.target,
            "value": self.value,
            "n_images": self.n_images,
            "probe_sides": sides,
        }


def _tokens(text: str) -> list[str]:
    return [IRREGULAR.get(token, token) for token in _TOKEN.findall(text.lower())]


def _negated(tokens: list[str], i: int) -> bool:
    return any(t in NEGATIONS for t in tokens[max(0, i - NEGATION_REACH) : i])


def _phrase_words(attribute: str, value: bool) -> set[str]:
    return {word for phrase in prompts.phrases(attribute, value) for word in _tokens(phrase.text)}


def _stated_words(attribute: str, value: bool) -> set[str]:
    """The words a side's phrasings state, not negate ("blond" in "with:blond hair", not in
    "without:blond hair" or "whose hair is not blond")."""
    words = set()
    for phrase in prompts.phrases(attribute, value):
        tokens = _tokens(phrase.text)
        if phrase.slot != "without":
            words |= {t for i, t in enumerate(tokens) if not _negated(tokens, i)}
    return words


def side_words(target: str, others: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(words naming the target's positive side, words naming its negative side): the words each
    side's phrasings (those installed now) state and the other side's do not, less any word of
    another attribute's phrasings ("hair" names no hair colour; "eats" in "who eats only
    plants" vs "who eats meat" names neither side)."""
    used = set(NEGATIONS)
    for other in others:
        if other != target:
            used |= _phrase_words(other, True) | _phrase_words(other, False)
    stated_positive, stated_negative = _stated_words(target, True), _stated_words(target, False)
    positive = stated_positive - stated_negative - used
    negative = stated_negative - stated_positive - used
    return frozenset(positive), frozenset(negative)


def _matches(token: str, words: frozenset[str]) -> bool:
    return token in words or (token.endswith("s") and token[:-1] in words)


def named_side(text: str, words: tuple[frozenset[str], frozenset[str]]) -> bool | None:
    """True or False where the text names only that side of the target, else None."""
    positive, negative = words
    sides = set()
    tokens = _tokens(text)
    for i, token in enumerate(tokens):
        on = True if _matches(token, positive) else False if _matches(token, negative) else None
        if on is not None:
            sides.add(on != _negated(tokens, i))
    return sides.pop() if len(sides) == 1 else None


def shared_class(texts: Iterable[str], words: tuple[frozenset[str], frozenset[str]]) -> bool | None:
    """The side of the target (`side_words`) that every one of `texts` names, or None where
    they do not all name one side."""
    sides = {named_side(text, words) for text in texts}
    return sides.pop() if len(sides) == 1 else None
