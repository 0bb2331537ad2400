"""The label map: dataset label (identity) -> index of the model output that scores it.

The built-in classifier numbers the train split's identities in sorted order. A user's model has
its own numbering, given as a JSON object `{"<identity>": <output index>}` or a two-column CSV
(`identity,index`, an optional header row). A sample whose identity the map does not cover has
no defined loss, so it is an error that names the identities, not a silent exclusion.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np


class LabelMapError(ValueError):
    """A label map is malformed, or does not cover the dataset's labels."""


def builtin_label_map(train_identities: Iterable[int]) -> dict[int, int]:
    """Sorted distinct train identities -> 0..C-1."""
    identities = sorted({int(identity) for identity in train_identities})
    if len(identities) < 2:
        raise LabelMapError(
            f"the train split has {len(identities)} distinct identities; a classifier needs 2+"
        )
    return {identity: index for index, identity in enumerate(identities)}


def num_outputs_needed(label_map: Mapping[int, int]) -> int:
    """How many outputs a model must have to score every mapped label."""
    if not label_map:
        raise LabelMapError("the label map is empty")
    return max(label_map.values()) + 1


def read_label_map(path: str | os.PathLike[str]) -> dict[int, int]:
    """Read a JSON or CSV label map, rejecting malformed rows with their line number."""
    source = Path(path)
    if not source.is_file():
        raise LabelMapError(
            f"label map {source.expanduser().resolve()} does not exist (black_box.label_map_path)"
        )
    suffix = source.suffix.lower()
    if suffix == ".json":
        pairs = _json_pairs(source)
    elif suffix in (".csv", ".tsv", ".txt"):
        pairs = _csv_pairs(source)
    else:
        raise LabelMapError(f"label map {source}: expected a .json or .csv file")
    return _checked(pairs, source)


def _json_pairs(source: Path) -> list[tuple[str, object, object]]:
    try:
        raw = json.loads(source.read_text())
    except json.JSONDecodeError as exc:
        raise LabelMapError(f"{source} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise LabelMapError(f"{source}: expected a JSON object {{identity: output index}}")
    return [(f"key {key!r}", key, value) for key, value in raw.items()]


def _csv_pairs(source: Path) -> list[tuple[str, object, object]]:
    delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
    pairs: list[tuple[str, object, object]] = []
    with source.open(newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            rows = list(reader)
        except csv.Error as exc:  # e.g. a cell over csv's field limit (a 30 MB line)
            raise LabelMapError(f"{source} line {reader.line_num}: not a CSV row ({exc})") from None
        for line_no, row in enumerate(rows, start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if len(cells) != 2:
                raise LabelMapError(
                    f"{source} line {line_no}: expected 2 columns (identity, index), "
                    f"got {len(cells)}"
                )
            if line_no == 1 and not _is_int(cells[0]) and not _is_int(cells[1]):
                continue  # a header row
            pairs.append((f"line {line_no}", cells[0], cells[1]))
    return pairs


def _shown(value: object, limit: int = 200) -> str:
    """repr(value) cut to `limit` characters: a huge cell must not flood the terminal."""
    text = repr(value)
    return (
        text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
    )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _is_int(value.strip()):
        return int(value.strip())
    return None


def _checked(pairs: Sequence[tuple[str, object, object]], source: Path) -> dict[int, int]:
    mapping: dict[int, int] = {}
    owner_of_index: dict[int, int] = {}
    for where, raw_key, raw_value in pairs:
        key, value = _as_int(raw_key), _as_int(raw_value)
        if key is None:
            raise LabelMapError(f"{source} {where}: identity {_shown(raw_key)} is not an integer")
        if value is None or value < 0:
            raise LabelMapError(
                f"{source} {where}: output index {_shown(raw_value)} is not a non-negative integer"
            )
        if key in mapping:
            raise LabelMapError(f"{source} {where}: identity {key} is mapped twice")
        if value in owner_of_index:
            raise LabelMapError(
                f"{source} {where}: output index {value} is already the index of identity "
                f"{owner_of_index[value]}"
            )
        mapping[key] = value
        owner_of_index[value] = key
    if not mapping:
        raise LabelMapError(f"{source}: the label map is empty")
    return mapping


def map_labels(
    identities: Sequence[int] | np.ndarray,
    label_map: Mapping[int, int],
    *,
    sample_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Identities -> model output indices (int64); unmapped identities are an error naming them."""
    values = np.asarray(identities, dtype=np.int64)
    keys = np.fromiter(label_map.keys(), dtype=np.int64, count=len(label_map))
    outputs = np.fromiter(label_map.values(), dtype=np.int64, count=len(label_map))
    order = np.argsort(keys)
    keys, outputs = keys[order], outputs[order]
    slot = np.clip(np.searchsorted(keys, values), 0, max(len(keys) - 1, 0))
    found = keys[slot] == values if len(keys) else np.zeros(len(values), dtype=bool)
    if not found.all():
        missing = np.unique(values[~found])
        where = np.flatnonzero(~found)
        examples = ""
        if sample_ids is not None:
            examples = "; e.g. samples " + ", ".join(str(sample_ids[i]) for i in where[:5])
        raise LabelMapError(
            f"{len(missing)} identities are not in the label map "
            f"({', '.join(str(int(i)) for i in missing[:10])}"
            f"{', ...' if len(missing) > 10 else ''}), affecting {len(where)} samples{examples}. "
            "The model has no output for them; give a label map that covers every identity "
            "(or a model trained on them)."
        )
    return outputs[slot]


def label_map_to_json(label_map: Mapping[int, int]) -> dict[str, int]:
    return {str(key): int(value) for key, value in sorted(label_map.items())}


def label_map_from_json(raw: Mapping[str, int]) -> dict[int, int]:
    return {int(key): int(value) for key, value in raw.items()}
