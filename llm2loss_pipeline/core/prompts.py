"""The attribute language: one grammar for training captions, report prompts and text probes.

Every text the pipeline feeds to the text tower comes from here, so that the captions the image
tower learns from and the prompts the report asks with share their wording. A description is a
noun phrase built from *phrases*, each tagged with the grammatical slot it fills:

    [article] [adjectives] noun [with ...] [without ...] [wearing ...] [who is ...] [clauses]
    "a smiling young woman with blond hair and bangs wearing glasses and a hat"

Slots:
    adj      an adjective before the noun ("young", "smiling", "chubby")
    noun     the subject noun; only Male sets it ("man"/"woman"), otherwise "person"
    with     things the face has ("blond hair", "a mustache"), joined as "with A, B and C"
    without  things it lacks ("eyeglasses", "a hat"), joined as "without A or B"
    wearing  worn items ("glasses", "a hat"), joined as "wearing A and B"
    who      predicates ("not smiling", "not wearing a tie"), joined as "who is A and B"
    clause   a verbatim trailing phrase ("whose hair is not blond", "in a blurry photo")

`PHRASES` holds the curated wording: for each of the 40 CelebA attributes, the phrases for having
it and for not having it, each written for that attribute. The first phrase of each list is
canonical: deterministic descriptions and the report's first prompt pair use it.

Any other attribute (a table dataset's column) is phrased by the dataset's probes file
(`phrased_by`, for each step from the data step's attribute set, core/attribute_set.py) or,
without one, from its name (`core.probes.built_phrasings`).
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.probes import SLOTS as _PROBE_SLOTS
from llm2loss_pipeline.core.probes import built_phrasings

SLOTS = ("adj", "noun", "with", "without", "wearing", "who", "clause")
assert SLOTS == _PROBE_SLOTS, "core/probes.py keeps a copy of the slots; keep them equal"

DEFAULT_TEMPLATE = "face of {}"

TEMPLATES: tuple[str, ...] = (
    "face of {}",
    "a photo of {}",
    "a close-up portrait of {}",
    "a face image of {}",
    "a picture of the face of {}",
)
"""Report prompt templates: each attribute is asked with every one, and the answers averaged."""

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a cartoon portrait of {}",
    "a picture showing {}",
    "a drawing of {}",
    "a close-up of {}",
    "an illustration of {}",
    "a headshot of {}",
    "an image of the face of {}",
    "a portrait of {}",
    "a snapshot of {}",
)
"""Training caption templates: varied so that the image tower learns the content, not the frame.
Disjoint from `TEMPLATES`, so the report's prompts are never training captions verbatim."""

# attribute: (positive phrases, negative phrases), each "slot:text"; the first is canonical.
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "5_o_Clock_Shadow": (
        ("with:a five o'clock shadow", "with:stubble", "with:a stubbly chin"),
        ("adj:clean-shaven", "without:stubble", "with:a smooth chin"),
    ),
    "Arched_Eyebrows": (
        ("with:arched eyebrows", "with:highly arched brows", "with:curved eyebrows"),
        ("with:straight eyebrows", "with:flat eyebrows", "without:arched eyebrows"),
    ),
    "Attractive": (
        ("adj:attractive", "adj:good-looking", "adj:beautiful"),
        ("adj:unattractive", "adj:plain-looking", "adj:homely"),
    ),
    "Bags_Under_Eyes": (
        ("with:bags under the eyes", "with:puffy eyes", "adj:tired-looking"),
        ("without:bags under the eyes", "with:smooth skin under the eyes", "adj:fresh-faced"),
    ),
    "Bald": (
        ("adj:bald", "with:a shaved head", "adj:hairless"),
        ("with:a full head of hair", "who:not bald", "with:hair on the head"),
    ),
    "Bangs": (
        ("with:bangs", "with:a fringe", "with:hair covering the forehead"),
        ("without:bangs", "with:a bare forehead", "without:a fringe"),
    ),
    "Big_Lips": (
        ("with:big lips", "with:full lips", "with:thick lips"),
        ("with:thin lips", "with:small lips", "without:big lips"),
    ),
    "Big_Nose": (
        ("with:a big nose", "with:a large nose", "with:a prominent nose"),
        ("with:a small nose", "with:a little nose", "without:a big nose"),
    ),
    "Black_Hair": (
        ("with:black hair", "with:dark black hair", "adj:black-haired"),
        ("without:black hair", "clause:whose hair is not black", "with:hair that is not black"),
    ),
    "Blond_Hair": (
        ("with:blond hair", "adj:blonde", "with:golden hair"),
        ("without:blond hair", "clause:whose hair is not blond", "with:hair that is not blond"),
    ),
    "Blurry": (
        ("clause:in a blurry photo", "clause:out of focus", "clause:in a blurred picture"),
        ("clause:in a sharp photo", "clause:in focus", "clause:in a crisp clear picture"),
    ),
    "Brown_Hair": (
        ("with:brown hair", "adj:brown-haired", "with:chestnut hair"),
        ("without:brown hair", "clause:whose hair is not brown", "with:hair that is not brown"),
    ),
    "Bushy_Eyebrows": (
        ("with:bushy eyebrows", "with:thick eyebrows", "with:heavy brows"),
        ("with:thin eyebrows", "with:sparse eyebrows", "without:bushy eyebrows"),
    ),
    "Chubby": (
        ("adj:chubby", "adj:plump", "with:a round full face"),
        ("adj:slim", "adj:thin", "adj:lean"),
    ),
    "Double_Chin": (
        ("with:a double chin", "with:a fleshy chin", "with:a chin with two folds"),
        ("without:a double chin", "with:a firm jawline", "with:a defined chin"),
    ),
    "Eyeglasses": (
        ("wearing:eyeglasses", "wearing:glasses", "with:spectacles"),
        ("without:eyeglasses", "who:not wearing glasses", "without:spectacles"),
    ),
    "Goatee": (
        ("with:a goatee", "with:a chin beard", "with:a small pointed beard"),
        ("without:a goatee", "with:no chin beard", "without:a chin beard"),
    ),
    "Gray_Hair": (
        ("with:gray hair", "adj:gray-haired", "with:silver hair"),
        ("without:gray hair", "clause:whose hair is not gray", "with:hair that is not gray"),
    ),
    "Heavy_Makeup": (
        ("wearing:heavy makeup", "wearing:a lot of makeup", "with:heavily made-up eyes"),
        ("without:makeup", "wearing:no makeup", "with:a natural bare face"),
    ),
    "High_Cheekbones": (
        ("with:high cheekbones", "with:prominent cheekbones", "with:chiselled cheekbones"),
        ("with:low cheekbones", "with:flat cheekbones", "without:high cheekbones"),
    ),
    "Male": (
        ("noun:man", "noun:male", "noun:guy"),
        ("noun:woman", "noun:female", "noun:lady"),
    ),
    "Mouth_Slightly_Open": (
        ("with:a slightly open mouth", "with:parted lips", "with:the mouth a little open"),
        ("with:a closed mouth", "with:closed lips", "with:the mouth shut"),
    ),
    "Mustache": (
        ("with:a mustache", "with:a moustache", "with:hair on the upper lip"),
        ("without:a mustache", "with:a bare upper lip", "without:a moustache"),
    ),
    "Narrow_Eyes": (
        ("with:narrow eyes", "with:squinting eyes", "with:slit eyes"),
        ("with:wide open eyes", "with:big round eyes", "without:narrow eyes"),
    ),
    "No_Beard": (
        ("without:a beard", "adj:beardless", "with:no beard"),
        ("with:a beard", "adj:bearded", "with:a full beard"),
    ),
    "Oval_Face": (
        ("with:an oval face", "with:an egg-shaped face", "with:an oval-shaped face"),
        ("with:a round face", "with:a square face", "without:an oval face"),
    ),
    "Pale_Skin": (
        ("with:pale skin", "adj:pale", "with:fair light skin"),
        ("with:tanned skin", "with:dark skin", "without:pale skin"),
    ),
    "Pointy_Nose": (
        ("with:a pointy nose", "with:a pointed nose", "with:a sharp nose"),
        ("with:a rounded nose", "with:a blunt nose", "without:a pointy nose"),
    ),
    "Receding_Hairline": (
        ("with:a receding hairline", "with:a high hairline", "with:thinning hair at the temples"),
        ("with:a full hairline", "without:a receding hairline", "with:a low hairline"),
    ),
    "Rosy_Cheeks": (
        ("with:rosy cheeks", "with:red cheeks", "with:blushing cheeks"),
        ("with:pale cheeks", "without:rosy cheeks", "without:blush on the cheeks"),
    ),
    "Sideburns": (
        ("with:sideburns", "with:long sideburns", "with:hair down the sides of the face"),
        ("without:sideburns", "with:no sideburns", "with:shaved temples"),
    ),
    "Smiling": (
        ("adj:smiling", "who:smiling", "adj:happy"),
        ("with:a neutral expression", "who:not smiling", "adj:serious"),
    ),
    "Straight_Hair": (
        ("with:straight hair", "with:sleek straight hair", "adj:straight-haired"),
        ("without:straight hair", "with:curly hair", "clause:whose hair is not straight"),
    ),
    "Wavy_Hair": (
        ("with:wavy hair", "with:curly hair", "with:hair in waves"),
        ("without:wavy hair", "with:straight hair", "clause:whose hair is not wavy"),
    ),
    "Wearing_Earrings": (
        ("wearing:earrings", "with:earrings", "wearing:ear jewelry"),
        ("without:earrings", "who:not wearing earrings", "with:bare earlobes"),
    ),
    "Wearing_Hat": (
        ("wearing:a hat", "wearing:a cap", "with:a hat on the head"),
        ("without:a hat", "who:not wearing a hat", "adj:bareheaded"),
    ),
    "Wearing_Lipstick": (
        ("wearing:lipstick", "with:painted lips", "with:red lipstick"),
        ("without:lipstick", "who:not wearing lipstick", "with:unpainted lips"),
    ),
    "Wearing_Necklace": (
        ("wearing:a necklace", "with:a necklace", "wearing:a chain around the neck"),
        ("without:a necklace", "who:not wearing a necklace", "with:a bare neck"),
    ),
    "Wearing_Necktie": (
        ("wearing:a necktie", "wearing:a tie", "with:a tie"),
        ("without:a necktie", "who:not wearing a tie", "without:a tie"),
    ),
    "Young": (
        ("adj:young", "adj:youthful", "adj:young-looking"),
        ("adj:old", "adj:elderly", "adj:older"),
    ),
}

SALIENT_NEGATIVES: frozenset[str] = frozenset(
    {"Male", "Young", "Smiling", "Eyeglasses", "Wearing_Hat", "Bald", "No_Beard", "Blurry"}
)
"""Attributes whose absence is itself visible and worth saying in a caption ("a woman",
"an old person", "without glasses"), so captions mention them more often when False."""

# Adjectives in English go opinion, shape, age, colour; participles such as "smiling" lead.
_ADJECTIVE_ORDER: tuple[str, ...] = (
    "Attractive",
    "Smiling",
    "Bags_Under_Eyes",
    "Chubby",
    "Young",
    "Pale_Skin",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Gray_Hair",
    "Straight_Hair",
    "Bald",
    "Wearing_Hat",
    "5_o_Clock_Shadow",
    "No_Beard",
)

# Characters that show nothing on their own: spaces, controls, format characters (a zero-width
# space, a byte-order mark) and combining marks without a base.
INVISIBLE = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"})


def shows_nothing(text: str) -> bool:
    """Whether a text is empty to a reader, though str.strip() may leave characters in it."""
    return all(unicodedata.category(char) in INVISIBLE for char in text)


def text_lines(data: bytes) -> list[str]:
    """The entries of a one-per-line text file (prompt files, discovery vocabularies).

    UTF-8; byte-order marks are dropped wherever they are (files joined with cat). Lines end at
    \\n, \\r\\n or \\r alone: str.splitlines would also split an entry at a form feed or
    U+0085. Entries are stripped; lines that show nothing and '#' comments are skipped. An
    undecodable byte is a ValueError naming its line, for the caller to prefix with the source.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"line {line} is not UTF-8 text ({exc.reason}: byte 0x{data[exc.start]:02x})"
        ) from exc
    lines = [line.replace("\ufeff", "").strip() for line in re.split(r"\r\n|\n|\r", text)]
    return [line for line in lines if not shows_nothing(line) and not line.startswith("#")]


@dataclass(frozen=True)
class Phrase:
    slot: str
    text: str


def _parse(attribute: str, raw: str) -> Phrase:
    slot, sep, text = raw.partition(":")
    if not sep or slot not in SLOTS or not text.strip():
        raise ValueError(
            f"PHRASES[{attribute!r}]: {raw!r} is not 'slot:text' with a slot in {SLOTS}"
        )
    return Phrase(slot, text)


def _build_table() -> dict[str, tuple[tuple[Phrase, ...], tuple[Phrase, ...]]]:
    missing = set(CELEBA_ATTRIBUTES) - set(PHRASES)
    extra = set(PHRASES) - set(CELEBA_ATTRIBUTES)
    if missing or extra:
        raise ValueError(
            f"PHRASES must cover the 40 CelebA attributes: missing {missing}, extra {extra}"
        )
    table = {}
    for name in CELEBA_ATTRIBUTES:
        positives, negatives = PHRASES[name]
        if not positives or not negatives:
            raise ValueError(
                f"PHRASES[{name!r}] needs at least one positive and one negative phrase"
            )
        table[name] = (
            tuple(_parse(name, raw) for raw in positives),
            tuple(_parse(name, raw) for raw in negatives),
        )
    return table


_TABLE = _build_table()
_ADJ_RANK = {name: rank for rank, name in enumerate(_ADJECTIVE_ORDER)}
_CELEBA_RANK = {name: rank for rank, name in enumerate(CELEBA_ATTRIBUTES)}

PhraseLists = tuple[tuple[Phrase, ...], tuple[Phrase, ...]]

# The phrasings of the dataset at hand that are not CelebA's curated ones (a probes file's), set
# by `phrased_by` for the length of a block. A context variable, not an argument, because every
# text the pipeline makes comes through here, from deep inside the report, discovery and encoder
# code; and not a module global, so that a step's phrasings end with the step and two homes
# read in one process (or two threads) never phrase by each other's file. Each step that reads
# a home runs under its dataset's phrasings (core/attribute_set.phrasings_of); an attribute not
# installed is phrased from its name, the same in every process.
_INSTALLED: ContextVar[Mapping[str, PhraseLists]] = ContextVar(
    "llm2loss_phrasings", default=MappingProxyType({})
)
_BUILT: dict[str, PhraseLists] = {}  # a cache: built phrasings depend on the name alone


def _parsed(name: str, raw: tuple[Sequence[str], Sequence[str]]) -> PhraseLists:
    positives, negatives = raw
    if not positives or not negatives:
        raise ValueError(f"phrasings of {name!r} need at least one positive and one negative")
    return (
        tuple(_parse(name, text) for text in positives),
        tuple(_parse(name, text) for text in negatives),
    )


@contextmanager
def phrased_by(table: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> Iterator[None]:
    """Inside the block, phrase the given attributes by these ('slot:text') lists, in place of
    any outer block's; after it, as before it. Only this thread (or task) sees them."""
    parsed = {_checked_name(name): _parsed(name, raw) for name, raw in table.items()}
    token = _INSTALLED.set(MappingProxyType(parsed))
    try:
        yield
    finally:
        _INSTALLED.reset(token)


def phrasing_source(attribute: str) -> str:
    """'file' (installed), 'curated' (CelebA's table) or 'built' (from the name)."""
    if attribute in _INSTALLED.get():
        return "file"
    return "curated" if attribute in _TABLE else "built"


def _checked_name(attribute: object) -> str:
    if not isinstance(attribute, str) or not attribute.strip():
        raise ValueError(f"unknown attribute {attribute!r}; expected an attribute column's name")
    return attribute


def _phrase_lists(attribute: str) -> PhraseLists:
    name = _checked_name(attribute)
    found = _INSTALLED.get().get(name) or _TABLE.get(name)
    if found is None:
        found = _BUILT.get(name)
        if found is None:
            found = _BUILT[name] = _parsed(name, built_phrasings(name))
    return found


def _in_order(names: object) -> list[str]:
    """CelebA's attributes in CelebA's order (the curated sentences' order), then the others in
    the order given."""
    given = [_checked_name(name) for name in names]  # type: ignore[attr-defined]
    celeba = sorted((n for n in given if n in _CELEBA_RANK), key=_CELEBA_RANK.__getitem__)
    return celeba + [n for n in given if n not in _CELEBA_RANK]


def in_sentence_order(names: Sequence[str]) -> list[str]:
    """`names` in the order a description says them: CelebA's attributes in CelebA's order,
    then any others in the order given."""
    return _in_order(names)


def phrases(attribute: str, value: bool) -> tuple[Phrase, ...]:
    """The phrases saying that `attribute` is `value`; the first is canonical."""
    positives, negatives = _phrase_lists(attribute)
    return positives if value else negatives


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" and not words.lower().startswith("one") else "a"


def _join(items: Sequence[str], conjunction: str) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _realise(chosen: Sequence[tuple[str, Phrase]]) -> str:
    """Put chosen (attribute, phrase) pairs into one noun phrase, following the slot order."""
    by_slot: dict[str, list[tuple[str, str]]] = {slot: [] for slot in SLOTS}
    for attribute, phrase in chosen:
        by_slot[phrase.slot].append((attribute, phrase.text))
    adjectives = [
        text
        for _, text in sorted(
            by_slot["adj"], key=lambda item: _ADJ_RANK.get(item[0], len(_ADJ_RANK))
        )
    ]
    nouns = [text for _, text in by_slot["noun"]]
    noun = nouns[0] if nouns else "person"
    head = " ".join([*adjectives, noun])
    tail = []
    if by_slot["with"]:
        tail.append("with " + _join([text for _, text in by_slot["with"]], "and"))
    if by_slot["without"]:
        tail.append("without " + _join([text for _, text in by_slot["without"]], "or"))
    if by_slot["wearing"]:
        tail.append("wearing " + _join([text for _, text in by_slot["wearing"]], "and"))
    if by_slot["who"]:
        tail.append("who is " + _join([text for _, text in by_slot["who"]], "and"))
    tail.extend(text for _, text in by_slot["clause"])
    separator = ", " if len(tail) > 2 else " "
    words = f"{head} {separator.join(tail)}" if tail else head
    return f"{_article(words)} {words}"


def _apply_template(template: str, description: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    return template.format(description)


def describe(
    values: Mapping[str, bool],
    rng: random.Random | None = None,
    template: str | None = None,
) -> str:
    """A sentence saying exactly the given attribute values.

    Without `rng` the canonical phrase of each value and the template "face of {}" are used, so
    the same values always give the same text; with `rng` synonyms and (unless `template` is
    given) caption templates are drawn from it.
    """
    chosen: list[tuple[str, Phrase]] = []
    for attribute in _in_order(values):
        options = phrases(attribute, bool(values[attribute]))
        chosen.append((attribute, options[0] if rng is None else rng.choice(options)))
    if template is None:
        template = DEFAULT_TEMPLATE if rng is None else rng.choice(CAPTION_TEMPLATES)
    return _apply_template(template, _realise(chosen))


def composed_prompt(values: Mapping[str, bool], template: str = DEFAULT_TEMPLATE) -> str:
    """A deterministic prompt for an intersectional probe, e.g. Male=True, Young=False ->
    "face of an old man"."""
    return describe(values, rng=None, template=template)


def attribute_prompt_pairs(attribute: str) -> list[tuple[str, str]]:
    """(positive, negative) prompts for one attribute: every report template with every
    synonym pair (i-th positive phrase with i-th negative phrase). The first pair is canonical,
    e.g. ("face of a person wearing eyeglasses", "face of a person without eyeglasses")."""
    positives, negatives = _phrase_lists(attribute)
    n_pairs = max(len(positives), len(negatives))
    pairs = []
    for index in range(n_pairs):
        positive = _realise([(attribute, positives[index % len(positives)])])
        negative = _realise([(attribute, negatives[index % len(negatives)])])
        for template in TEMPLATES:
            pairs.append((_apply_template(template, positive), _apply_template(template, negative)))
    return pairs


def draw_caption(
    attribute_row: Mapping[str, bool],
    rng: random.Random,
    max_attributes: int = 5,
    p_positive: float = 0.6,
    p_salient_negative: float = 0.35,
    p_negative: float = 0.05,
) -> tuple[str, dict[str, bool]]:
    """A training caption for one image and the attribute values it states.

    Each present attribute is mentioned with probability `p_positive`; absent attributes whose
    absence is visible (`SALIENT_NEGATIVES`) with `p_salient_negative`, others rarely. At most
    `max_attributes` are kept, positives first. A caption never comes out empty of content:
    if nothing was drawn, one present attribute (or a salient absent one) is said. The stated
    values let a trainer know which other images the same caption is also true of.
    """
    known = _in_order(attribute_row)
    if not known:
        raise ValueError("a caption needs at least one known attribute value")
    present = [name for name in known if bool(attribute_row[name])]
    absent = [name for name in known if not bool(attribute_row[name])]
    picked_positive = [name for name in present if rng.random() < p_positive]
    picked_negative = [
        name
        for name in absent
        if rng.random() < (p_salient_negative if name in SALIENT_NEGATIVES else p_negative)
    ]
    rng.shuffle(picked_positive)
    rng.shuffle(picked_negative)
    picked = (picked_positive + picked_negative)[:max_attributes]
    if not picked:
        fallback = present or [name for name in absent if name in SALIENT_NEGATIVES] or absent
        picked = [rng.choice(fallback)]
    stated = {name: bool(attribute_row[name]) for name in picked}
    return describe(stated, rng=rng), stated


def caption_for(attribute_row: Mapping[str, bool], rng: random.Random) -> str:
    """A training caption from a random subset of the image's attributes, in varied words and
    templates (see `draw_caption`)."""
    return draw_caption(attribute_row, rng)[0]
