"""Discovery step: candidate descriptions -> ranked failure hypotheses with evidence, on disk.

Reads the materialized encoder, heads, losses and embeddings; writes under `reports/`:
failure_hypotheses.parquet, failure_evidence.parquet, discovery/hypothesis-NN.png (contact
sheets), discovery.html; and republishes the DuckDB views with the two tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from llm2loss_pipeline.core.attribute_set import diagnosed_attributes, with_home_phrasings
from llm2loss_pipeline.core.blackbox.task_labels import recorded_task_of
from llm2loss_pipeline.core.discovery.candidates import (
    Candidate,
    class_candidates,
    generate_candidates,
    read_vocabulary,
    single_candidates,
)
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.evidence import (
    SUMMARY_COLUMNS,
    discovery_html,
    fmt,
    hypothesis_sheets,
)
from llm2loss_pipeline.core.discovery.proposer import propose
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.steps.diagnosis import training_frame
from llm2loss_pipeline.core.steps.tables import read_manifest, split_rows
from llm2loss_pipeline.core.storage import sha256_file, write_parquet_atomic

if TYPE_CHECKING:  # core.discovery.shared pulls scipy, which this module loads lazily
    from llm2loss_pipeline.core.discovery.shared import SharedTrait

TOP_MARKDOWN = 10


@dataclass(frozen=True)
class DiscoveryFindings:
    """What discovery computes, before anything is written (`compute_discovery`)."""

    hypotheses: pl.DataFrame
    evidence: pl.DataFrame
    counts: dict[str, int]
    shared: tuple[SharedTrait, ...] = ()
    """labelled values most modes' images show (core/discovery/shared.py)"""


@dataclass(frozen=True)
class FailureHypothesesResult:
    """The findings and the files `write_discovery` wrote for them."""

    hypotheses: pl.DataFrame
    evidence: pl.DataFrame
    hypotheses_path: Path
    evidence_path: Path
    html_path: Path
    sha256: str
    counts: dict[str, int]
    sheets: dict[int, Path] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)
    shared: tuple[SharedTrait, ...] = ()


class _TextCache:
    """Raw text embeddings, each text encoded once across the beam's rounds."""

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray]) -> None:
        self.encode = encode
        self.vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            for text, vector in zip(missing, np.asarray(self.encode(missing)), strict=True):
                self.vectors[text] = vector.astype(np.float32)
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, 0))


def run_discovery(
    layout: Layout,
    config: DiscoveryConfig,
    diagnoser: Any,
    *,
    vocabulary: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> FailureHypothesesResult:
    """The failure_hypotheses asset's step: compute the hypotheses, then write their files.

    `diagnoser`: a loaded `core.query.Diagnoser` (the caller loads it, so that this step does not
    import the query engine that itself runs `compute_discovery`).
    """
    findings = compute_discovery(layout, config, diagnoser, vocabulary=vocabulary, log=log)
    return write_discovery(layout, config, findings)


@with_home_phrasings  # candidates phrase attributes as the dataset's probes file says
def compute_discovery(
    layout: Layout,
    config: DiscoveryConfig,
    diagnoser: Any,
    *,
    vocabulary: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> DiscoveryFindings:
    """Generate, score, verify and rank candidates; nothing is written (what `Diagnoser.discover`
    and `llm2loss discover` use: the files under reports/ belong to the failure_hypotheses asset).

    `diagnoser`: anything with `encode_texts`, `ensemble` and `gap` (a `core.query.Diagnoser`).
    """
    # lazy: pulls scipy.stats, +3.0 s on the Dagster definitions load (measured)
    from llm2loss_pipeline.core.discovery.estimate import DescriptionGrounding
    from llm2loss_pipeline.core.discovery.hypotheses import EvalData, discover

    say = log or (lambda message: None)
    ensemble, gap = diagnoser.ensemble, diagnoser.gap
    frame = training_frame(layout)
    held_out = split_rows(frame, config.eval_split, "discovery.eval_split")
    train = split_rows(frame, ensemble.config.train_split, "heads.train_split")

    # The dataset's diagnosed attributes (core/attribute_set.py).
    attributes = diagnosed_attributes(layout)
    texts = _vocabulary(config, vocabulary)
    embed = _TextCache(diagnoser.encode_texts)

    def score(batch: Sequence[str]) -> np.ndarray:
        return ensemble.standardized(gap.text(embed(batch))).mean(axis=0)

    candidates, n_proposed = _candidates(config, score, texts, attributes, say)
    eval_data = EvalData(
        held_out["sample_id"].to_list(),
        held_out["embedding"].to_numpy().astype(np.float32),
        held_out["loss"].to_numpy(),
        groups=identities(layout, held_out),
    )
    grounding = None
    if config.estimator == "grounded":  # compare's estimate, where the home has a report
        grounding = DescriptionGrounding.from_diagnoser(diagnoser)
    labels = eval_labels(held_out, attributes)
    by_class, target_labels = _by_class(layout, config, held_out, grounding, ensemble, say)
    if by_class:
        candidates += by_class
        labels = {**(labels or {}), **target_labels}
    say(f"discovery: {len(candidates)} candidate descriptions")
    text_embeddings = embed([c.words for c in candidates])
    # every value, canonical words
    probes = [c.text for c in single_candidates(attributes, negations=True)]
    result = discover(
        candidates,
        text_embeddings,
        ensemble,
        gap,
        eval_data,
        train["embedding"].to_numpy().astype(np.float32),
        config,
        train_losses=train["loss"].to_numpy(),
        labels=labels,
        probe_embeddings=embed(probes),
        grounding=grounding,
        progress=say,
    )
    say(
        f"discovery: {result.n_modes} failure modes ({result.n_kept} of {result.n_candidates} "
        "descriptions verified)"
    )
    counts = _counts(result, held_out.height, n_proposed)
    return DiscoveryFindings(result.hypotheses, result.evidence, counts, result.shared)


def _candidates(
    config: DiscoveryConfig,
    score: Callable[[Sequence[str]], np.ndarray],
    texts: Sequence[str],
    attributes: Sequence[str],
    say: Callable[[str], None],
) -> tuple[list[Candidate], int]:
    """The candidates over all images (candidates.generate_candidates), with the language
    model's proposals when it is enabled; and how many it proposed."""
    proposals: list[str] = []
    if config.proposer.enabled:
        proposals = _proposals(config, score, say, attributes)
    candidates = generate_candidates(
        score,
        max_arity=config.max_arity,
        beam=config.beam,
        vocabulary=texts,
        proposals=proposals,
        limit=config.max_candidates,
        attributes=attributes,
        negations=config.negations,
        avoid_subjective=config.avoid_subjective,
    )
    return candidates, len(proposals)


def _by_class(
    layout: Layout,
    config: DiscoveryConfig,
    held_out: pl.DataFrame,
    grounding: Any,
    ensemble: Any,
    say: Callable[[str], None],
) -> tuple[list[Candidate], dict[str, np.ndarray]]:
    """For an attribute task (and `config.by_class`): the class candidates of each class large
    enough to match in, and the target's labels on the evaluation samples; else nothing."""
    task = recorded_task_of(layout.black_box_reference, layout.black_box.with_suffix(".json"))
    if task.kind != "attribute" or not config.by_class or task.target is None:
        return [], {}
    if grounding is not None and ensemble.config.eval_split != config.eval_split:
        say(
            f"discovery: no class candidates: the heads' evaluation split "
            f"{ensemble.config.eval_split!r} is not discovery's {config.eval_split!r}"
        )
        return [], {}
    column = pl.read_parquet(layout.attributes, columns=["sample_id", task.target])
    joined = held_out.select("sample_id").join(column, on="sample_id", how="left")
    if joined[task.target].null_count():
        say(f"discovery: no class candidates: some samples have no {task.target} label")
        return [], {}
    # lazy: verify imports scipy.stats (+3.0 s on the Dagster definitions load, as above)
    from llm2loss_pipeline.core.discovery.verify import match_count

    labels = joined[task.target].cast(pl.Boolean).to_numpy()
    k = match_count(held_out.height, config.match_fraction, config.min_matches)
    singles = single_candidates(
        declared_attributes(layout),
        negations=config.negations,
        avoid_subjective=config.avoid_subjective,
    )
    chosen = [
        c
        for c in class_candidates(singles, task.target)
        if int((labels == c.scope[1]).sum()) > k  # type: ignore[index]
    ]
    return chosen, {task.target: labels}


def declared_attributes(layout: Layout) -> list[str]:
    """The attributes whose groups the report declares (report.group_by, the `declared` rows of
    reports/groups.parquet); every diagnosed attribute where the report declares all of them or
    has not run. Class candidates of every attribute would test 2 x 39 facets of one failure
    (each a different top-k of the same people), where the user named the group to test."""
    attributes = list(diagnosed_attributes(layout))
    path = layout.reports / "groups.parquet"
    if not path.is_file():
        return attributes
    groups = pl.read_parquet(path, columns=["attribute", "declared"])
    declared = set(groups.filter(pl.col("declared"))["attribute"].to_list())
    return [name for name in attributes if name in declared] or attributes


def identities(layout: Layout, frame: pl.DataFrame) -> np.ndarray:
    """The identity of each row of `frame` (the manifest's; a sample without one is its own),
    as the grounding pool reads them (core/query.py): discovery's clustered test."""
    manifest = read_manifest(layout)
    if "identity" not in manifest.columns:
        return np.array([f"s{s}" for s in frame["sample_id"]])
    joined = frame.select("sample_id").join(
        manifest.select("sample_id", "identity"), on="sample_id", how="left", maintain_order="left"
    )
    return np.array(
        [
            f"i{i}" if i is not None else f"s{s}"
            for i, s in zip(joined["identity"], joined["sample_id"], strict=True)
        ]
    )


def _vocabulary(config: DiscoveryConfig, vocabulary: Sequence[str]) -> list[str]:
    """The configured words, then the vocabulary file's, then the caller's."""

    texts = list(config.vocabulary)
    if config.vocabulary_path:
        texts += read_vocabulary(config.vocabulary_path)
    return texts + list(vocabulary)


def _counts(result: Any, n_eval: int, n_proposed: int) -> dict[str, int]:
    return {
        "n_candidates": result.n_candidates,
        "n_kept": result.n_kept,
        "n_modes": result.n_modes,
        "n_eval_samples": n_eval,
        "n_evidence_samples": result.evidence.height,
        "n_proposed": n_proposed,
    }


def eval_labels(frame: pl.DataFrame, attributes: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Attribute -> bool per sample, for the attributes labelled on every sample (None: none)."""

    labels = {
        name: frame[name].cast(pl.Boolean).to_numpy()
        for name in attributes
        if name in frame.columns and frame[name].null_count() == 0
    }
    return labels or None


def _proposals(
    config: DiscoveryConfig,
    score: Callable[[Sequence[str]], np.ndarray],
    say: Callable,
    attributes: Sequence[str],
) -> list[str]:
    singles = [
        c.text
        for c in single_candidates(
            attributes, negations=config.negations, avoid_subjective=config.avoid_subjective
        )
    ]
    order = np.argsort(-score(singles))
    worse = [singles[i] for i in order[:10]]
    better = [singles[i] for i in order[::-1][:5]]
    proposals = propose(config.proposer, worse, better)
    say(f"discovery: {len(proposals)} descriptions proposed by {config.proposer.base_url}")
    return proposals


def write_discovery(
    layout: Layout, config: DiscoveryConfig, result: DiscoveryFindings
) -> FailureHypothesesResult:
    """The tables, contact sheets and page of `result` under reports/, and the DuckDB views."""
    # lazy: pulls duckdb, +0.26 s on the Dagster definitions load (measured)
    from llm2loss_pipeline.core.discovery.publish import publish_with_discovery

    manifest = read_manifest(layout)
    paths = dict(zip(manifest["sample_id"].to_list(), manifest["path"].to_list(), strict=True))
    sheet_dir = layout.discovery_dir
    sheet_dir.mkdir(parents=True, exist_ok=True)
    for stale in sheet_dir.glob("hypothesis-*.png"):
        stale.unlink()  # a rerun with fewer kept hypotheses must not leave old sheets behind
    sheets = hypothesis_sheets(
        result.hypotheses, result.evidence, paths, sheet_dir, config.n_sheets
    )
    table_path = write_parquet_atomic(result.hypotheses, layout.hypotheses)
    evidence_file = write_parquet_atomic(result.evidence, layout.evidence)
    html = discovery_html(result.hypotheses, sheets, layout.discovery_html, shared=result.shared)
    metrics = layout.member_metrics
    published = publish_with_discovery(
        layout,
        {"failure_hypotheses": table_path, "failure_evidence": evidence_file},
        member_metrics=metrics if metrics.exists() else None,
    )
    return FailureHypothesesResult(
        hypotheses=result.hypotheses,
        evidence=result.evidence,
        hypotheses_path=table_path,
        evidence_path=evidence_file,
        html_path=html,
        sha256=sha256_file(table_path),
        counts=result.counts,
        sheets=sheets,
        views=sorted(published.views),
        shared=result.shared,
    )


def top_rows(table: pl.DataFrame, n: int = TOP_MARKDOWN) -> list[dict[str, Any]]:
    """The first n failure modes in the columns a reader scans first, as the reader should see
    them (yes/no, a dash for nothing: never True or None)."""

    modes = table.filter(pl.col("verdict") == "mode").head(n).select(SUMMARY_COLUMNS)
    return [{key: fmt(value) for key, value in row.items()} for row in modes.to_dicts()]
