"""The dataset's attribute set: which attributes it has, which the diagnosis describes samples by,
and how each is phrased. Everything after the data step takes its attributes from here, never
from a fixed list, so a table dataset's own columns flow through the SQL, the report, the plots,
the checks, discovery and the encoder's captions.

The data step writes `tables/attribute_set.json` next to the attribute table:

    attributes  every attribute column of the attribute table, in its order
    target      an attribute task's target (task.target), else null
    diagnosed   the attributes minus the target (core.task.diagnosed): what the report measures
    phrasings   per attribute: source (curated / file / built), positive and negative phrases

A home written before this file existed (or a test's hand-made home) has only the attribute
table; its columns are the attribute set then, every one diagnosed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import polars as pl

from llm2loss_pipeline.core import prompts
from llm2loss_pipeline.core.attributes import attribute_columns
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.probes import built_phrasings
from llm2loss_pipeline.core.storage import write_json_atomic
from llm2loss_pipeline.core.task import TaskConfig, diagnosed

FILE_NAME = "attribute_set.json"
P = ParamSpec("P")
R = TypeVar("R")


class AttributeSetError(ValueError):
    """The attribute set is missing or does not fit the task or the settings that name it."""


@dataclass(frozen=True)
class AttributeSet:
    attributes: tuple[str, ...]
    target: str | None = None
    phrasings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def diagnosed(self) -> tuple[str, ...]:
        return tuple(name for name in self.attributes if name != self.target)

    @property
    def built(self) -> list[str]:
        """The diagnosed attributes whose phrasings were built from their name."""
        return [
            name
            for name in self.diagnosed
            if (
                self.phrasings[name]["source"]
                if name in self.phrasings
                else prompts.phrasing_source(name)
            )
            == "built"
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": list(self.attributes),
            "target": self.target,
            "diagnosed": list(self.diagnosed),
            "phrasings": self.phrasings,
        }


def attribute_set_path(layout: Layout) -> Path:
    return layout.tables / FILE_NAME


def build_attribute_set(
    attributes: pl.DataFrame,
    task: TaskConfig,
    probes: Mapping[str, tuple[list[str], list[str]]] | None = None,
) -> AttributeSet:
    """The attribute set of an attribute table, checked against the task; `probes`: a probes
    file's phrasings (core/probes.parse_probes), which take the place of curated or built ones."""
    names = attribute_columns(attributes.columns)
    if task.kind == "attribute" and task.target not in names:
        raise AttributeSetError(
            f"task.target {task.target!r} is not an attribute of the dataset; its attributes are "
            f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
        )
    given = dict(probes or {})
    phrasings: dict[str, dict[str, Any]] = {}
    for name in diagnosed(names, task):
        if name in given:
            source, (positive, negative) = "file", given[name]
        elif name in prompts.PHRASES:
            source = "curated"
            positive, negative = (list(side) for side in prompts.PHRASES[name])
        else:
            source, (positive, negative) = "built", built_phrasings(name)
        phrasings[name] = {"source": source, "positive": positive, "negative": negative}
    return AttributeSet(names, task.target, phrasings)


def write_attribute_set(layout: Layout, attribute_set: AttributeSet) -> Path:
    path = attribute_set_path(layout)
    write_json_atomic(path, attribute_set.to_json())
    return path


def read_attribute_set(layout: Layout) -> AttributeSet:
    """The home's attribute set (see the module docstring for a home without the file)."""
    path = attribute_set_path(layout)
    if path.exists():
        raw = json.loads(path.read_text())
        return AttributeSet(
            tuple(raw["attributes"]), raw.get("target"), dict(raw.get("phrasings") or {})
        )
    if not layout.attributes.exists():
        raise AttributeSetError(
            f"{layout.attributes} is missing: materialize celeba_attributes first (llm2loss run)"
        )
    names = attribute_columns(list(pl.read_parquet_schema(layout.attributes)))
    return AttributeSet(names)


def diagnosed_attributes(layout: Layout) -> tuple[str, ...]:
    """The attributes the report, the checks and discovery describe samples by."""
    return read_attribute_set(layout).diagnosed


@contextmanager
def phrasings_of(layout: Layout) -> Iterator[AttributeSet]:
    """Inside the block, phrase the home's probes-file attributes by the file's phrases
    (core.prompts.phrased_by); yields the home's attribute set."""
    attribute_set = read_attribute_set(layout) if _has_tables(layout) else AttributeSet(())
    file_phrasings = {
        name: (entry["positive"], entry["negative"])
        for name, entry in attribute_set.phrasings.items()
        if entry.get("source") == "file"
    }
    with prompts.phrased_by(file_phrasings):
        yield attribute_set


def with_home_phrasings(
    step: Callable[Concatenate[Layout, P], R],
) -> Callable[Concatenate[Layout, P], R]:
    """Run a step `step(layout, ...)` under its home's phrasings, for every text it makes."""

    @functools.wraps(step)
    def run(layout: Layout, *args: P.args, **kwargs: P.kwargs) -> R:
        with phrasings_of(layout):
            return step(layout, *args, **kwargs)

    return run


def _has_tables(layout: Layout) -> bool:
    return attribute_set_path(layout).exists() or layout.attributes.exists()
