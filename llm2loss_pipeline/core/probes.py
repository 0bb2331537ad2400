"""Phrasings for any attribute: a user's probes file, or phrasings built from the column name.

`dataset.probes_path` names a YAML file that maps attribute names to their phrasings:

    Wearing_Hat:
      positive: ["wearing a hat", "with a hat on"]
      negative: ["without a hat", "bareheaded"]
    hair_red:
      positive: ["with:red hair"]     # optional slot prefix, see core/prompts.py
      negative: ["without:red hair"]

Each phrase completes "a person ...": "a person wearing a hat". A phrase may start with one of
the grammar's slots (`adj:`, `with:`, `without:`, `wearing:`, `who:`, `clause:`) so that several
attributes read as one sentence; without one it is a trailing clause. The i-th positive and the
i-th negative phrase form the i-th probe pair; the first of each list is canonical.

An attribute the file does not phrase, and that has no curated CelebA phrasing, is phrased from
its name (`built_phrasings`: `Wearing_Hat` -> "wearing hat" / "without hat"); the report lists
those attributes, since a probe built from a column name may not say what the column means.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

SLOTS = ("adj", "noun", "with", "without", "wearing", "who", "clause")
"""core/prompts.py's grammar slots (kept here so that this module does not import prompts)."""

SOURCES = ("curated", "file", "built")
"""Where an attribute's phrasings come from: CelebA's curated table, the probes file, its name."""

MAX_PHRASE = 200

BUILT_NOTE = "are asked about in words built from their column names"
"""The report's note on built phrasings (core/report/build.py), shown in its headline list too."""


class ProbesFileError(ValueError):
    """A probes file is unreadable or malformed; the message names the file and the key."""


def _words(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return [word.lower() for word in re.split(r"[\s_\-]+", spaced) if word]


def built_phrasings(name: str) -> tuple[list[str], list[str]]:
    """(positive, negative) 'slot:text' phrases read off an attribute's name.

    `Wearing_Hat` -> wearing hat / without hat; `Has_Beard`, `With_Beard` -> with beard /
    without beard; `Is_Smiling` -> who is smiling / who is not smiling; anything else ->
    with <words> / without <words> ("a person with hair red")."""
    words = _words(name) or [name]
    head, rest = words[0], " ".join(words[1:])
    if head == "wearing" and rest:
        return [f"wearing:{rest}"], [f"without:{rest}"]
    if head in ("with", "has", "have") and rest:
        return [f"with:{rest}"], [f"without:{rest}"]
    if head == "is" and rest:
        return [f"who:{rest}"], [f"who:not {rest}"]
    text = " ".join(words)
    return [f"with:{text}"], [f"without:{text}"]


def as_slot_phrase(text: str) -> str:
    """'slot:text' when `text` starts with a grammar slot, else 'clause:text'."""
    slot, sep, rest = text.partition(":")
    if sep and slot.strip() in SLOTS and rest.strip():
        return f"{slot.strip()}:{rest.strip()}"
    return f"clause:{text.strip()}"


def _phrases(source: str, name: str, side: str, value: Any) -> list[str]:
    where = f"{source}: {name}.{side}"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ProbesFileError(f"{where}: expected a non-empty list of phrases, got {value!r}")
    out = []
    for index, phrase in enumerate(value, start=1):
        if not isinstance(phrase, str) or not phrase.strip():
            raise ProbesFileError(
                f"{where} item {index}: expected a non-empty phrase, got {phrase!r}"
            )
        if len(phrase) > MAX_PHRASE:
            raise ProbesFileError(
                f"{where} item {index}: {len(phrase)} characters; a phrase has at most {MAX_PHRASE}"
            )
        if "{" in phrase or "}" in phrase:
            raise ProbesFileError(
                f"{where} item {index}: {phrase!r} holds a brace; a phrase completes "
                "'a person ...' and the templates are the pipeline's"
            )
        out.append(as_slot_phrase(phrase))
    return out


def parse_probes(
    raw: Any, source: str, attributes: Sequence[str]
) -> dict[str, tuple[list[str], list[str]]]:
    """Validate a parsed probes file against the dataset's attribute names."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ProbesFileError(
            f"{source}: the top level must map attribute names to {{positive: [...], "
            f"negative: [...]}}, got {type(raw).__name__}"
        )
    known = set(attributes)
    table: dict[str, tuple[list[str], list[str]]] = {}
    for name, body in raw.items():
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), list(attributes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProbesFileError(
                f"{source}: {name!r} is not an attribute of the dataset{hint}; its attributes are "
                f"{', '.join(list(attributes)[:12])}{', ...' if len(known) > 12 else ''}"
            )
        if not isinstance(body, Mapping):
            raise ProbesFileError(
                f"{source}: {name}: expected {{positive: [...], negative: [...]}}, got {body!r}"
            )
        extra = sorted(str(key) for key in body if key not in ("positive", "negative"))
        if extra:
            raise ProbesFileError(
                f"{source}: {name}: unknown key {extra[0]!r}; expected positive and negative"
            )
        for side in ("positive", "negative"):
            if side not in body:
                raise ProbesFileError(f"{source}: {name}: missing {side} (a list of phrases)")
        table[name] = (
            _phrases(source, name, "positive", body["positive"]),
            _phrases(source, name, "negative", body["negative"]),
        )
    return table
