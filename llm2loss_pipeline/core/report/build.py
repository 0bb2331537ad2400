"""The attribute disparity report, end to end: measure, estimate, correlate, write.

`build_report` reads the Parquet tables under LLM2LOSS_HOME through DuckDB, asks the diagnosis
heads about every attribute and attribute pair in one batched scoring call, and writes its tables
(Parquet), figures (PNG), headline numbers (JSON) and a self-contained `report.html` to `out_dir`,
each file atomically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import numpy as np
import polars as pl
from safetensors.numpy import save as save_arrays
from scipy import stats as sps

from llm2loss_pipeline.core import prompts
from llm2loss_pipeline.core.attribute_set import diagnosed_attributes
from llm2loss_pipeline.core.blackbox.task_labels import recorded_task_of
from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.markdown import markdown_table
from llm2loss_pipeline.core.members import KINDS, OVERALL, MemberGroup, member_groups
from llm2loss_pipeline.core.metrics import auroc
from llm2loss_pipeline.core.probes import BUILT_NOTE
from llm2loss_pipeline.core.report import correlate, plots
from llm2loss_pipeline.core.report.calibration import (
    LEVEL,
    MIN_RESOLUTION,
    Calibration,
    calibrated_claims,
    per_image_gap_se,
)
from llm2loss_pipeline.core.report.estimated import (
    AurocFn,
    EncodeTexts,
    PromptPairs,
    ScorerLike,
    collect_prompt_pairs,
    member_diffs,
    member_diffs_long,
    score_texts_once,
    summarize,
    zero_shot_auroc,
)
from llm2loss_pipeline.core.report.grounded import ESTIMATORS, Grounding
from llm2loss_pipeline.core.report.groups import report_groups
from llm2loss_pipeline.core.report.html import render_html
from llm2loss_pipeline.core.report.intersectional import (
    CELLS,
    ComposePrompt,
    estimated_pair_cells,
    frequent_pairs,
    measured_pair_cells,
    pair_cell_prompts,
    pair_tables,
    validate_pairs,
)
from llm2loss_pipeline.core.report.measured import (
    EvalInputs,
    ReportInputError,
    check_inputs,
    load_zero_shot_inputs,
    measured_attribute_table,
)
from llm2loss_pipeline.core.sql import connect, run_sql
from llm2loss_pipeline.core.stats import bh_adjust, clustered_mean_gap
from llm2loss_pipeline.core.storage import (
    sha256_bytes,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)

TOP_K = 10
CALIBRATION_FILE = "calibration.json"
PROBES_FILE = "probes.safetensors"
DIRECT = "direct"
N_STRONGEST = 4


@dataclass(frozen=True)
class ReportResult:
    """Everything the report computed, and where it was written.

    Tables (polars): `attribute_table` (one row per attribute: measured, estimated by the whole
    ensemble and per head kind, zero-shot AUROC, small_group, bh_significant),
    `attribute_estimates` (attribute x member group), `member_diffs` (attribute x member),
    `pair_table` (one row per pair with its four cells), `pair_cells`, `pair_estimates`,
    `pair_member_diffs`, `correlations` (tables 1, 2, 3 and pairs, long form).
    """

    eval_split: str
    alpha: float
    min_group_size: int
    n_eval_samples: int
    n_members: int
    attribute_table: pl.DataFrame
    attribute_estimates: pl.DataFrame
    member_diffs: pl.DataFrame
    pair_table: pl.DataFrame
    pair_cells: pl.DataFrame
    pair_estimates: pl.DataFrame
    pair_member_diffs: pl.DataFrame
    correlations: pl.DataFrame
    headline: dict[str, float]
    top_attributes: list[str]
    estimator: str = "grounded"
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    grounding: Grounding | None = field(default=None, repr=False)
    groups: pl.DataFrame | None = None  # core/report/groups.py: per-group accuracy, worst first

    def table(self, name: str) -> pl.DataFrame:
        """The rows of one correlation table: "table1", "table2", "table3" or "pairs"."""
        return self.correlations.filter(pl.col("table") == name)


def _default_prompt_functions() -> tuple[PromptPairs, ComposePrompt, Sequence[str]]:
    templates = getattr(prompts, "TEMPLATES", None) or (prompts.DEFAULT_TEMPLATE,)
    return prompts.attribute_prompt_pairs, prompts.composed_prompt, tuple(templates)


def _default_auroc() -> AurocFn:
    return auroc


def _attribute_table(
    measured: pl.DataFrame, estimates: pl.DataFrame, zero_shot: pl.DataFrame, claims: pl.DataFrame
) -> pl.DataFrame:
    overall = estimates.filter(pl.col("group") == OVERALL).select(
        "attribute",
        *[
            pl.col(c).alias(f"est_{c}")
            for c in ("mean", "std", "min", "q1", "median", "q3", "max", "p_positive")
        ],
        pl.col("p_value").alias("est_replicate_p_value"),
    )
    table = measured.join(overall, on="attribute", how="left", maintain_order="left")
    table = table.join(claims, on="attribute", how="left", maintain_order="left")
    for kind in KINDS:
        part = estimates.filter(pl.col("group") == kind).select(
            "attribute",
            pl.col("mean").alias(f"est_mean_{kind}"),
            pl.col("p_positive").alias(f"est_p_positive_{kind}"),
            pl.col("bh_significant").alias(f"bh_significant_{kind}"),
        )
        table = table.join(part, on="attribute", how="left", maintain_order="left")
        table = table.with_columns(
            pl.col(f"est_mean_{kind}").cast(pl.Float64).fill_null(float("nan")),
            pl.col(f"est_p_positive_{kind}").cast(pl.Float64).fill_null(float("nan")),
        )
    table = table.join(
        zero_shot.select(
            "attribute", "zero_shot_auroc", *(c for c in zero_shot.columns if c.endswith("_dual"))
        ),
        on="attribute",
        how="left",
        maintain_order="left",
    ).with_columns(pl.col("zero_shot_auroc").fill_null(float("nan")))
    return table.with_columns(
        pl.col("est_mean").rank(method="ordinal", descending=True).cast(pl.Int64).alias("est_rank")
    )


def _headline(
    table: pl.DataFrame,
    correlations: pl.DataFrame,
    pair_table: pl.DataFrame,
    n_members: int,
    n_eval: int,
) -> dict[str, float]:
    def pick(kind: str, group: str, estimate: str, measure: str, stat: str) -> float:
        rows = correlations.filter(
            (pl.col("table") == kind)
            & (pl.col("group") == group)
            & (pl.col("estimate") == estimate)
            & (pl.col("measure") == measure)
        )
        return float(rows[stat][0]) if rows.height else math.nan

    headline: dict[str, float] = {}
    # the whole ensemble and each head kind (kind x arch rows stay in the correlations table)
    for group in (OVERALL, *KINDS):
        for estimate, short, stats in (
            ("signed", "signed", ("spearman", "pearson", "kendall")),
            ("absolute", "abs", ("spearman",)),
        ):
            for stat in stats:
                headline[f"{stat}_{short}_{group}"] = pick("table2", group, estimate, "loss", stat)
                headline[f"{stat}_{short}_{group}_p"] = pick(
                    "table2", group, estimate, "loss", f"{stat}_p"
                )
    for metric in ("loss", "auroc", "accuracy"):
        headline[f"spearman_zero_shot_vs_gt_rmm_{metric}"] = pick(
            "table3", "encoder", "zero_shot_auroc", metric, "spearman"
        )
    zero_shot = table["zero_shot_auroc"].to_numpy()
    finite = zero_shot[np.isfinite(zero_shot)]
    headline["zero_shot_mean_auroc"] = float(finite.mean()) if finite.size else math.nan
    headline["spearman_signed_direct"] = pick("table2", DIRECT, "signed", "loss", "spearman")
    headline["n_bh_significant"] = float(table["bh_significant"].fill_null(False).sum())
    headline["n_measured_significant"] = float(
        ((table["gap_loss_low"] > 0) | (table["gap_loss_high"] < 0)).fill_null(False).sum()
    )
    headline["n_attributes"] = float(table.height)
    headline["n_small_groups"] = float(table["small_group"].sum())
    headline["n_members"] = float(n_members)
    headline["n_eval_samples"] = float(n_eval)
    headline["n_pairs"] = float(pair_table.height)
    headline["pair_spearman_signed_overall"] = pick("pairs", OVERALL, "signed", "loss", "spearman")
    headline["pair_spearman_gap_overall"] = pick("pairs", OVERALL, "gap", "loss", "spearman")
    agrees = pair_table["worst_cell_agrees"].drop_nulls()
    headline["pair_worst_cell_agreement"] = float(agrees.mean()) if agrees.len() else math.nan
    headline["n_pairs_bh_significant"] = float(pair_table["bh_significant"].fill_null(False).sum())
    return headline


class ReportSettings(Protocol):
    """The report's settings: `core.config.ReportConfig` (not imported: config names the
    report's estimators, so the import would close a cycle), or `build_report`'s keywords."""

    eval_split: str
    pairs: Sequence[str]
    n_pairs: int
    min_group_size: int
    group_by: Sequence[str]
    alpha: float
    estimator: str
    dual_ridge: float


@dataclass(frozen=True)
class ReportHooks:
    """What the report takes besides its settings, injectable for tests and benches.

    prompt_pairs / compose_prompt / pair_templates / auroc_fn default to
    `core.prompts.attribute_prompt_pairs`, `core.prompts.composed_prompt`,
    `core.prompts.TEMPLATES` and `core.metrics.auroc`. embeddings: precomputed (sample ids,
    [N, dim] image embeddings) of the split, instead of reading the image_embeddings shards.
    attributes: None takes the home's diagnosed attributes (core/attribute_set.py).
    built_phrasings: the attributes whose probes were built from their names (said in the
    report); None: found from core.prompts when the prompts are the default ones.
    """

    attributes: Sequence[str] | None = None
    prompt_pairs: PromptPairs | None = None
    compose_prompt: ComposePrompt | None = None
    pair_templates: Sequence[str] | None = None
    auroc_fn: AurocFn | None = None
    embeddings: tuple[Sequence[str], np.ndarray] | None = None
    built_phrasings: Sequence[str] | None = None

    def with_defaults(self) -> ReportHooks:
        if self.prompt_pairs and self.compose_prompt and self.pair_templates and self.auroc_fn:
            return self
        default_pairs, default_compose, default_templates = _default_prompt_functions()
        return dataclasses.replace(
            self,
            prompt_pairs=self.prompt_pairs or default_pairs,
            compose_prompt=self.compose_prompt or default_compose,
            pair_templates=self.pair_templates or default_templates,
            auroc_fn=self.auroc_fn or _default_auroc(),
        )


@dataclass(frozen=True)
class Measured:
    """What the report reads off the labelled split: the measured side of every comparison."""

    n_losses: int
    table: pl.DataFrame
    eval_frame: pl.DataFrame
    pairs: list[tuple[str, str]]
    cells: pl.DataFrame
    # (sample ids, [N, dim] image embeddings, labels by attribute); None when nothing needs it
    pool: tuple[list[str], np.ndarray, dict[str, np.ndarray]] | None


@dataclass(frozen=True)
class Estimated:
    """The heads' answers: per member and attribute (`diffs`) and per pair cell (`cells`)."""

    direct_diffs: np.ndarray
    diffs: np.ndarray
    cells: np.ndarray
    grounding: Grounding | None = None


@dataclass(frozen=True)
class Probes:
    by_attribute: dict[str, list[tuple[str, str]]]
    pair_cells: dict


class DirectEstimator:
    """The paper's estimator: the heads score the probe texts' own embeddings."""

    name = DIRECT
    needs_pool = False

    def texts(self, probes: Probes) -> list[str]:
        # the direct pairs score composed sentences, so those are scored in the same call
        return [t for by_cell in probes.pair_cells.values() for ts in by_cell.values() for t in ts]

    def estimate(self, scorer, scores, direct_diffs, probes, measured, config) -> Estimated:
        n_members = len(list(scorer.members))
        if measured.pairs:
            cells = estimated_pair_cells(scores, probes.pair_cells)
        else:
            cells = np.zeros((n_members, 0, len(CELLS)))
        return Estimated(direct_diffs, direct_diffs, cells)

    def zero_shot(self, estimated, measured, zero_shot, auroc_fn, notes) -> pl.DataFrame:
        notes.append(
            "estimator 'direct': the heads scored the probe texts' own embeddings (the paper's "
            "method); the grounded estimator is usually closer to the measured disparities"
        )
        return zero_shot

    def extra_correlations(self, estimated, measured, attributes, alpha) -> list[pl.DataFrame]:
        return []

    def finish_headline(self, headline: dict[str, float]) -> None:
        headline["spearman_signed_direct"] = headline["spearman_signed_overall"]


class GroundedEstimator:
    """The heads answer each probe on the split's images (see `core.report.grounded`)."""

    name = "grounded"
    needs_pool = True

    def texts(self, probes: Probes) -> list[str]:
        return []  # grounded pairs compose the attributes' scores, not sentences

    def estimate(self, scorer, scores, direct_diffs, probes, measured, config) -> Estimated:
        ids, pool, _ = measured.pool  # type: ignore[misc]
        grounding = Grounding.build(
            scorer,
            pool,
            probes.by_attribute,
            config.dual_ridge,
            groups=_pool_identities(ids, measured.eval_frame),
        )
        cells = grounding.pair_cells(measured.pairs, CELLS)
        return Estimated(direct_diffs, grounding.attribute_diffs(), cells, grounding)

    def zero_shot(self, estimated, measured, zero_shot, auroc_fn, notes) -> pl.DataFrame:
        dual = _dual_zero_shot(estimated.grounding, measured.pool[2], auroc_fn)  # type: ignore[index,arg-type]
        return zero_shot.join(dual, on="attribute", how="left")

    def extra_correlations(self, estimated, measured, attributes, alpha) -> list[pl.DataFrame]:
        # the paper's direct estimate beside the grounded one, as group "direct" of table 2
        everyone = tuple(range(estimated.direct_diffs.shape[0]))
        direct_group = [MemberGroup(DIRECT, None, None, everyone)]
        direct = summarize(estimated.direct_diffs, list(attributes), direct_group, alpha)
        return [correlate.table2(measured.table, direct, direct_group)]

    def finish_headline(self, headline: dict[str, float]) -> None:
        pass  # spearman_signed_direct comes from the "direct" group of table 2


ESTIMATOR_OBJECTS = {"grounded": GroundedEstimator(), DIRECT: DirectEstimator()}
assert tuple(ESTIMATOR_OBJECTS) == ESTIMATORS


def build_report(
    layout: Layout,
    scorer: ScorerLike,
    encode_texts: EncodeTexts | None,
    *,
    eval_split: str = "test",
    pairs: Sequence[Sequence[str]] | None = None,
    n_pairs: int = 10,
    min_group_size: int = 20,
    group_by: Sequence[str] = (),
    alpha: float = 0.1,  # report.alpha: the FDR of the attribute claims
    out_dir: str | Path | None = None,
    attributes: Sequence[str] | None = None,
    prompt_pairs: PromptPairs | None = None,
    compose_prompt: ComposePrompt | None = None,
    pair_templates: Sequence[str] | None = None,
    auroc_fn: AurocFn | None = None,
    embeddings: tuple[Sequence[str], np.ndarray] | None = None,
    estimator: str = "grounded",
    dual_ridge: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> ReportResult:
    """`build_report_from_config` with the settings as keywords (tests and benches call it so).

    pairs: attribute pairs for the intersectional table; None takes the `n_pairs` most frequent
    co-occurring positive pairs of the split; [] skips pairs. Everything else: see
    `ReportConfig`, `ReportHooks` and `build_report_from_config`.
    """
    # unchecked here: build_report_from_config checks alpha, estimator and pairs itself
    config = SimpleNamespace(
        eval_split=eval_split,
        pairs=[":".join(pair) for pair in validate_pairs(pairs or ())],
        n_pairs=0 if pairs is not None and not pairs else n_pairs,
        min_group_size=min_group_size,
        group_by=list(group_by),
        alpha=alpha,
        estimator=estimator,
        dual_ridge=dual_ridge,
    )
    hooks = ReportHooks(
        attributes, prompt_pairs, compose_prompt, pair_templates, auroc_fn, embeddings
    )
    return build_report_from_config(
        layout, scorer, encode_texts, config, hooks=hooks, out_dir=out_dir, log=log
    )


def build_report_from_config(
    layout: Layout,
    scorer: ScorerLike,
    encode_texts: EncodeTexts | None,
    config: ReportSettings,
    *,
    hooks: ReportHooks = ReportHooks(),
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> ReportResult:
    """Build the attribute disparity report of the black box on `config.eval_split`.

    scorer: the diagnosis heads (`members`, `score_texts(texts) -> [members, texts]`; the grounded
        estimator also needs text_features/image_features/score_features).
    encode_texts: the encoder's text tower (texts -> [texts, dim], L2-normalised) for the
        zero-shot AUROC; None skips it (NaN column, noted).
    config.estimator: "grounded" (the heads answer each probe on the split's images) or "direct"
        (the paper: the heads score the probe texts' own embeddings). The direct estimate is
        always kept too: `est_direct_mean`, headline `spearman_signed_direct`.
    config.pairs: 'A:B' pairs; empty takes the `n_pairs` most frequent ones (0: no pairs).
    out_dir: where files go (default `layout.reports`).
    """
    say = log or (lambda _message: None)
    if not 0 < config.alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {config.alpha}")
    estimator = ESTIMATOR_OBJECTS[one_of("estimator", config.estimator, ESTIMATORS)]
    hooks = _with_attributes(hooks, layout).with_defaults()
    needs_pool = encode_texts is not None or estimator.needs_pool
    measured = measure_report(layout, config, hooks, needs_pool, say)
    estimated, probes = estimate_report(scorer, estimator, measured, config, hooks, say)
    result = assemble_report(
        scorer, encode_texts, estimator, measured, estimated, probes, config, hooks, say
    )
    result = _with_groups(result, layout, measured, hooks, config, estimated.grounding)
    out = Path(out_dir) if out_dir is not None else layout.reports
    say(f"writing the report to {out}")
    return write_report(result, out, member_groups(list(scorer.members)))


def _with_groups(
    result: ReportResult,
    layout: Layout,
    measured: Measured,
    hooks: ReportHooks,
    config: ReportSettings,
    grounding: Grounding | None,
) -> ReportResult:
    """Per-group accuracy for the task the black box was fitted for, and the worst group in the
    headline and the notes; with the grounded estimator, each group estimated from text too."""
    task = recorded_task_of(layout.black_box_reference, layout.black_box.with_suffix(".json"))
    pool = (grounding, measured.pool[0]) if grounding is not None and measured.pool else None
    table, headline, sentences = report_groups(
        measured.eval_frame,
        list(hooks.attributes or ()),
        task,
        config.min_group_size,
        str(layout.attributes),
        config.group_by,
        pool,
    )
    return dataclasses.replace(
        result,
        groups=table,
        headline={**result.headline, **headline},
        notes=[*sentences, *result.notes],
    )


def _with_attributes(hooks: ReportHooks, layout: Layout) -> ReportHooks:
    """The hooks with the attribute set filled in: the home's diagnosed attributes unless given,
    and which of them are phrased from their names."""
    attributes = (
        tuple(hooks.attributes) if hooks.attributes is not None else diagnosed_attributes(layout)
    )
    built = hooks.built_phrasings
    if built is None:
        default_prompts = hooks.prompt_pairs is None
        built = [
            name
            for name in attributes
            if default_prompts and prompts.phrasing_source(name) == "built"
        ]
    return dataclasses.replace(hooks, attributes=attributes, built_phrasings=tuple(built))


def measure_report(
    layout: Layout,
    config: ReportSettings,
    hooks: ReportHooks,
    needs_pool: bool,
    say: Callable[[str], None],
) -> Measured:
    """The measured side: per attribute and pair cell, from the labels and the black box's
    losses; the split's image embeddings too when the zero-shot AUROC or the estimator needs
    them."""
    split, attributes = config.eval_split, list(hooks.attributes or ())
    inputs = EvalInputs.from_layout(layout)
    con = connect(None)
    try:
        coverage = check_inputs(con, inputs, split, attributes)
        say(f"measuring {len(attributes)} attributes on {coverage['n_losses']} samples")
        table = measured_attribute_table(con, inputs, split, config.min_group_size, attributes)
        params = {"split": split, "attribute_names": list(attributes)}
        eval_frame = run_sql(con, "eval_join", params, inputs.tables())
        table = _with_clustered_gap(table, eval_frame, attributes)
        if config.pairs:
            # Checked here, not with the configuration: only the data knows its attributes.
            chosen = validate_pairs([pair.split(":") for pair in config.pairs], attributes)
        elif config.n_pairs == 0:
            chosen = []
        else:
            chosen = frequent_pairs(con, inputs, split, config.n_pairs, attributes)
            chosen = validate_pairs(chosen, attributes)
        cells = measured_pair_cells(con, inputs, split, chosen, config.min_group_size, attributes)
        pool = None
        if needs_pool:
            pool = _zero_shot_data(con, inputs, split, attributes, hooks.embeddings)
    finally:
        con.close()
    return Measured(coverage["n_losses"], table, eval_frame, chosen, cells, pool)


def estimate_report(
    scorer: ScorerLike,
    estimator: DirectEstimator | GroundedEstimator,
    measured: Measured,
    config: ReportSettings,
    hooks: ReportHooks,
    say: Callable[[str], None],
) -> tuple[Estimated, Probes]:
    """The heads' side: every probe text scored in one batched call, then the estimator's
    per-member answers for each attribute and pair cell."""
    by_attribute = collect_prompt_pairs(hooks.attributes, hooks.prompt_pairs)  # type: ignore[arg-type]
    pair_cells = pair_cell_prompts(measured.pairs, hooks.compose_prompt, hooks.pair_templates)  # type: ignore[arg-type]
    probes = Probes(by_attribute, pair_cells)
    texts = [t for pairs_ in by_attribute.values() for pair in pairs_ for t in pair]
    texts += estimator.texts(probes)
    say(f"scoring {len(set(texts))} prompts with {len(list(scorer.members))} heads")
    scores = score_texts_once(scorer, texts)
    direct_diffs = member_diffs(scores, by_attribute)
    if estimator.needs_pool:
        say(f"grounding the probes on the {len(measured.pool[1])} images of split "  # type: ignore[index]
            f"{config.eval_split!r}")  # fmt: skip
    return estimator.estimate(scorer, scores, direct_diffs, probes, measured, config), probes


def assemble_report(
    scorer: ScorerLike,
    encode_texts: EncodeTexts | None,
    estimator: DirectEstimator | GroundedEstimator,
    measured: Measured,
    estimated: Estimated,
    probes: Probes,
    config: ReportSettings,
    hooks: ReportHooks,
    say: Callable[[str], None],
) -> ReportResult:
    """Measured beside estimated: summaries, calibrated claims, correlations and the headline."""
    attributes, alpha = list(hooks.attributes or ()), config.alpha
    members = list(scorer.members)
    groups = member_groups(members)
    notes: list[str] = []
    attribute_estimates = summarize(estimated.diffs, attributes, groups, alpha)
    pair_table, pair_estimates, pair_diffs = pair_tables(
        measured.cells, estimated.cells, measured.pairs, members, groups, alpha
    )
    zero_shot = _zero_shot_table(encode_texts, measured, probes, hooks, notes, say)
    zero_shot = estimator.zero_shot(estimated, measured, zero_shot, hooks.auroc_fn, notes)
    claims, calibration = _attribute_claims(
        estimator.name, attribute_estimates, measured, zero_shot, attributes, alpha, notes
    )
    table = _attribute_table(measured.table, attribute_estimates, zero_shot, claims)
    pair_table = _calibrated_pairs(pair_table, pair_estimates, calibration, alpha)
    direct_mean = pl.DataFrame(
        {"attribute": attributes, "est_direct_mean": estimated.direct_diffs.mean(axis=0)},
        schema={"attribute": pl.String, "est_direct_mean": pl.Float64},
    )
    table = table.join(direct_mean, on="attribute", how="left", maintain_order="left")
    correlations = pl.concat(
        [
            correlate.table2(measured.table, attribute_estimates, groups),
            correlate.table3(table),
            correlate.table1(table, attribute_estimates, groups),
            correlate.pair_correlations(pair_table, pair_estimates, groups),
            *estimator.extra_correlations(estimated, measured, attributes, alpha),
        ]
    )
    headline = _headline(table, correlations, pair_table, len(members), measured.n_losses)
    headline.update(trust_check(table, calibration))
    estimator.finish_headline(headline)
    _note_built_phrasings(hooks, headline, notes)
    small = table.filter(pl.col("small_group"))["attribute"].to_list()
    if small:
        notes.append(
            f"small groups (< {config.min_group_size} samples on one side), kept and flagged: "
            + ", ".join(small)
        )
    return ReportResult(
        eval_split=config.eval_split,
        alpha=alpha,
        min_group_size=config.min_group_size,
        n_eval_samples=measured.n_losses,
        n_members=len(members),
        attribute_table=table,
        attribute_estimates=attribute_estimates,
        member_diffs=member_diffs_long(estimated.diffs, attributes, members),
        pair_table=pair_table,
        pair_cells=measured.cells,
        pair_estimates=pair_estimates,
        pair_member_diffs=pair_diffs,
        correlations=correlations,
        headline=headline,
        top_attributes=_top_attributes(table),
        estimator=estimator.name,
        notes=notes,
        calibration=calibration,
        grounding=estimated.grounding,
    )


def _note_built_phrasings(hooks: ReportHooks, headline: dict[str, float], notes: list[str]) -> None:
    """Say which attributes are asked about in words built from their names (headline count and
    a note on the page): such a probe may not say what the column means."""
    built = list(hooks.built_phrasings or ())
    headline["n_built_phrasings"] = float(len(built))
    if built:
        notes.append(
            f"{len(built)} attribute(s) {BUILT_NOTE} (no probes file entry, see "
            "dataset.probes_path), which may not say what the column means: " + ", ".join(built)
        )


def _zero_shot_table(
    encode_texts: EncodeTexts | None,
    measured: Measured,
    probes: Probes,
    hooks: ReportHooks,
    notes: list[str],
    say: Callable[[str], None],
) -> pl.DataFrame:
    """Per attribute: the encoder's zero-shot AUROC (NaN, and a note, without a text encoder)."""
    if measured.pool is None or encode_texts is None:
        notes.append("no text encoder was given: the zero-shot AUROC column is empty")
        names = list(hooks.attributes or ())
        return pl.DataFrame({"attribute": names, "zero_shot_auroc": [math.nan] * len(names)})
    say("zero-shot attribute classification")
    _, image_embeddings, labels = measured.pool
    return zero_shot_auroc(
        image_embeddings,
        labels,
        probes.by_attribute,
        encode_texts,
        hooks.auroc_fn,  # type: ignore[arg-type]
    )


def _top_attributes(table: pl.DataFrame) -> list[str]:
    return (
        table.filter(pl.col("est_mean").is_not_nan())
        .sort("est_mean", descending=True)["attribute"]
        .head(TOP_K)
        .to_list()
    )


def _with_clustered_gap(
    measured: pl.DataFrame, eval_frame: pl.DataFrame, attributes: Sequence[str]
) -> pl.DataFrame:
    """The measured table with the loss gap's identity-clustered standard error and 90% interval.

    Welch's p-value (`gap_loss_p`) treats every image as independent; images of one identity are
    not, so the interval and the calibration use the cluster-robust standard error instead.
    """
    loss = eval_frame["loss"].to_numpy().astype(np.float64)
    labels = np.stack([eval_frame[name].to_numpy().astype(bool) for name in attributes], axis=1)
    _, se = clustered_mean_gap(loss, labels, eval_frame["identity"].to_numpy())
    z = float(sps.norm.ppf(0.5 + LEVEL / 2))
    return measured.with_columns(pl.Series("gap_loss_se", se, dtype=pl.Float64)).with_columns(
        (pl.col("gap_loss") - z * pl.col("gap_loss_se")).alias("gap_loss_low"),
        (pl.col("gap_loss") + z * pl.col("gap_loss_se")).alias("gap_loss_high"),
    )


def _calibrated_pairs(
    pair_table: pl.DataFrame, pair_estimates: pl.DataFrame, calibration: Calibration, alpha: float
) -> pl.DataFrame:
    """Pair claims judged as attribute claims are: the members' spread plus the text side's
    error learned on the attributes (a pair's score is a sum of two standardised attribute
    scores, asked in the same units)."""
    if not pair_table.height or not calibration.calibrated:
        return pair_table
    overall = pair_estimates.filter(pl.col("group") == OVERALL)
    mean, std = overall["mean"].to_numpy(), overall["std"].to_numpy()
    z = calibration.z(mean, np.nan_to_num(std))
    p = 2 * sps.norm.sf(np.abs(z))
    q = bh_adjust(p)
    claims = pl.DataFrame(
        {
            "pair": overall["pair"],
            "est_p_worse": sps.norm.cdf(z),
            "est_p_value": p,
            "est_q_value": q,
            "bh_significant": np.where(np.isfinite(q), q <= alpha, False),
        }
    )
    table = pair_table.drop("est_p_value", "est_q_value", "bh_significant")
    return table.join(claims, on="pair", how="left", maintain_order="left")


def _pool_identities(sample_ids: Sequence[str], eval_frame: pl.DataFrame) -> np.ndarray:
    """The identity of every pool image (an image without a loss row is its own group)."""
    identity = dict(
        zip(eval_frame["sample_id"].to_list(), eval_frame["identity"].to_list(), strict=True)
    )
    return np.array([f"i{identity[s]}" if s in identity else f"s{s}" for s in sample_ids])


def trust_check(table: pl.DataFrame, calibration: Calibration) -> dict[str, float]:
    """How the claims fare on the labelled attributes themselves (each judged leave-one-out).

    claim_precision_measured: of the significant claims, the share whose sign agrees with a
    measured gap whose own 90% interval excludes 0. interval_coverage_measured: the share of
    attributes whose measured gap falls in the claim's 90% interval widened by the measured gap's
    own standard error (a gap measured on a few hundred images is itself noisy).
    """
    z = float(sps.norm.ppf(0.5 + LEVEL / 2))
    claimed = table.filter(pl.col("bh_significant").fill_null(False))
    agree = claimed.filter(
        (pl.col("est_mean").sign() == pl.col("gap_loss").sign())
        & ((pl.col("gap_loss_low") > 0) | (pl.col("gap_loss_high") < 0))
    )
    half = (pl.col("est_gap_high") - pl.col("est_gap_low")) / 2
    width = (half**2 + (z * pl.col("gap_loss_se")) ** 2).sqrt()
    inside = table.filter(pl.col("est_gap").is_finite()).select(
        ((pl.col("gap_loss") - pl.col("est_gap")).abs() <= width).alias("in")
    )["in"]
    return {
        "n_claims": float(claimed.height),
        "claim_precision_measured": agree.height / claimed.height if claimed.height else math.nan,
        "interval_coverage_measured": float(inside.mean()) if inside.len() else math.nan,
        "calibration_slope": calibration.slope,
        "text_error": calibration.text_error,
    }


def _write_calibration(result: ReportResult, out: Path) -> dict[str, Path]:
    """calibration.json, and for the grounded estimator the probes it asked with
    (probes.safetensors: directions and duals), so free-text queries ask the same way."""
    files: dict[str, Path] = {}
    extra: dict[str, object] = {"attributes": None, "dual_ridge": None, "probes_sha256": None}
    if result.grounding is not None:
        data = save_arrays(
            {
                "directions": np.ascontiguousarray(result.grounding.directions, np.float64),
                "duals": np.ascontiguousarray(result.grounding.duals, np.float64),
            }
        )
        files["probes"] = write_bytes_atomic(out / PROBES_FILE, data)
        extra = {
            "attributes": list(result.grounding.attributes),
            "dual_ridge": result.grounding.ridge,
            "probes_sha256": sha256_bytes(data),
        }
    body = _finite_or_null({**result.calibration.to_json(), **extra})  # type: ignore[union-attr]
    files["calibration"] = write_json_atomic(out / CALIBRATION_FILE, body)
    return files


def _finite_or_null(data: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()
    }


def _attribute_claims(
    estimator: str,
    attribute_estimates: pl.DataFrame,
    measured: Measured,
    zero_shot: pl.DataFrame,
    attributes: list[str],
    alpha: float,
    notes: list[str],
) -> tuple[pl.DataFrame, Calibration]:
    """The calibrated claims (core/report/calibration.py), with a note naming the attributes whose
    probes were too weak to be tested."""
    overall = attribute_estimates.filter(pl.col("group") == OVERALL)
    claims, calibration = calibrated_claims(
        attributes,
        estimator,
        overall["mean"].to_numpy(),
        overall["std"].to_numpy(),
        measured.table["gap_loss"].to_numpy(),
        measured.table["gap_loss_se"].to_numpy(),
        alpha,
        gap_se_images=per_image_gap_se(measured.table),
        resolution=_probe_resolution(zero_shot, attributes),
    )
    unresolved = claims.filter(~pl.col("probe_resolves"))["attribute"].to_list()
    if unresolved:
        notes.append(
            f"never claimed, because their probes do not pick them out on these images (zero-shot "
            f"AUROC under {MIN_RESOLUTION}): " + ", ".join(unresolved)
        )
    return claims, calibration


def _probe_resolution(zero_shot: pl.DataFrame, attributes: list[str]) -> np.ndarray | None:
    """Each probe's zero-shot AUROC on its attribute, read the way the estimator reads the probe
    (the dual direction for grounded); None where there is no text encoder to tell."""
    column = next((c for c in ("zero_shot_auroc_dual", "zero_shot_auroc") if c in zero_shot), None)
    if column is None:
        return None
    by_name = dict(zip(zero_shot["attribute"].to_list(), zero_shot[column].to_list(), strict=True))
    values = np.array([by_name.get(name, math.nan) for name in attributes], dtype=np.float64)
    return None if not np.isfinite(values).any() else values


def _dual_zero_shot(
    grounding: Grounding, labels: dict[str, np.ndarray], auroc_fn: AurocFn
) -> pl.DataFrame:
    """Per attribute: AUROC of the grounded estimator's dual score as a classifier of it."""
    scores = grounding.attribute_scores()
    values = []
    for j, name in enumerate(grounding.attributes):
        y = np.asarray(labels[name], dtype=bool)
        values.append(float(auroc_fn(scores[:, j], y)) if 0 < y.sum() < y.size else math.nan)
    return pl.DataFrame(
        {"attribute": list(grounding.attributes), "zero_shot_auroc_dual": values},
        schema={"attribute": pl.String, "zero_shot_auroc_dual": pl.Float64},
    )


def _zero_shot_data(con, inputs, split, attributes, embeddings):
    if embeddings is None:
        return load_zero_shot_inputs(con, inputs, split, attributes)
    ids, matrix = embeddings
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ReportInputError(
            f"precomputed embeddings have shape {matrix.shape} for {len(ids)} sample ids"
        )
    params = {"split": split, "attribute_names": list(attributes)}
    frame = run_sql(con, "eval_join", params, inputs.tables())
    position = {sample: i for i, sample in enumerate(frame["sample_id"].to_list())}
    missing = [sample for sample in ids if sample not in position]
    if missing:
        raise ReportInputError(
            f"precomputed embedding of sample {missing[0]} is not in split {split!r} "
            f"({len(missing)} such samples)"
        )
    rows = np.array([position[sample] for sample in ids], dtype=np.int64)
    labels = {name: frame[name].to_numpy().astype(bool)[rows] for name in attributes}
    return list(ids), matrix, labels


def write_report(result: ReportResult, out: Path, groups) -> ReportResult:
    """Write tables, figures, headline and report.html under `out`; return the result with paths."""
    files: dict[str, Path] = {}
    for name, frame in (
        ("attribute_disparity", result.attribute_table),
        ("pair_disparity", result.pair_table),
        ("correlations", result.correlations),
        ("attribute_estimates", result.attribute_estimates),
        ("member_diffs", result.member_diffs),
        ("pair_cells", result.pair_cells),
        ("pair_estimates", result.pair_estimates),
        ("pair_member_diffs", result.pair_member_diffs),
    ):
        files[name] = write_parquet_atomic(frame, out / f"{name}.parquet")
    if result.groups is not None:
        files["groups"] = write_parquet_atomic(result.groups, out / "groups.parquet")
    # strict JSON has no NaN: an undefined number is written as null
    headline = {k: (None if math.isnan(v) else v) for k, v in result.headline.items()}
    files["headline"] = write_json_atomic(out / "headline.json", headline)
    if result.calibration is not None:
        files.update(_write_calibration(result, out))

    table = result.attribute_table
    files["estimated_vs_measured"] = plots.scatter_estimated_vs_measured(
        table, result.attribute_estimates, groups, out / "estimated_vs_measured.png"
    )
    files["attribute_bars"] = plots.attribute_bars(table, out / "attribute_bars.png")
    strongest = (
        table.filter(pl.col("est_mean").is_not_nan())
        .sort(pl.col("est_mean").abs(), descending=True)["attribute"]
        .head(N_STRONGEST)
        .to_list()
    )
    files["strongest_attributes"] = plots.member_boxes(
        result.member_diffs,
        strongest,
        "attribute",
        out / "strongest_attributes.png",
        "Strongest estimated attribute disparities: h(with) - h(without) per member",
    )
    if result.pair_table.height:
        strongest_pairs = (
            result.pair_table.sort(pl.col("est_signed_mean").abs(), descending=True)["pair"]
            .head(N_STRONGEST)
            .to_list()
        )
        files["strongest_pairs"] = plots.member_boxes(
            result.pair_member_diffs,
            strongest_pairs,
            "pair",
            out / "strongest_pairs.png",
            "Strongest estimated pair disparities: h(A & B) - h(neither) per member",
        )
    with_figures = dataclasses.replace(result, files=files)
    files["report_html"] = write_text_atomic(out / "report.html", render_html(with_figures))
    return dataclasses.replace(result, files=dict(files))


def _markdown(frame: pl.DataFrame, columns: Sequence[str]) -> str:
    return markdown_table(frame.select(columns).to_dicts(), columns)


def markdown_tables(result: ReportResult) -> dict[str, str]:
    """Markdown for Dagster metadata: Table 2 (loss), Table 3, and the top 10 of Table 4."""
    stats = ["group", "estimate", "n", "pearson", "pearson_p", "spearman", "spearman_p"]
    stats += ["kendall", "kendall_p"]
    table2 = result.table("table2").filter(pl.col("measure") == "loss")
    table3 = result.table("table3")
    top = result.attribute_table.sort("est_mean", descending=True, nulls_last=True).head(TOP_K)
    columns4 = ["attribute", "n_true", "n_false", "loss_true", "loss_false", "gap_loss"]
    columns4 += ["gt_rmm_auroc", "est_mean", "est_q1", "est_q3", "est_p_positive"]
    columns4 += ["est_direct_mean", "bh_significant", "zero_shot_auroc", "small_group"]
    return {
        "table2": _markdown(table2, stats),
        "table3": _markdown(table3, ["measure", *stats[2:]]),
        "table4_top10": _markdown(top, columns4),
    }
