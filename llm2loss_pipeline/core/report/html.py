"""A self-contained `report.html`: tables, plain-language reading guide, and embedded figures.

Figures are embedded as base64 PNG so the file travels alone (e-mail, artifact store). Every
piece of text that comes from data (attribute names, notes, paths) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from llm2loss_pipeline.core.probes import BUILT_NOTE
from llm2loss_pipeline.core.report.group_estimates import ESTIMATED_WORST

if TYPE_CHECKING:
    from llm2loss_pipeline.core.report.build import ReportResult

Format = Callable[[Any], str]

AUROC_DEFINITION = (
    "AUROC of a group = the mean over its samples of the one-vs-rest ranking AUROC of the "
    "sample's true identity among all identity logits: the fraction of the other identities whose "
    "logit is below the true identity's logit (ties count half). 1 = the true identity outranks "
    "every other, 0.5 = chance."
)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(digits: int = 4) -> Format:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, bool):
            return "yes" if value else ""
        if isinstance(value, int):
            return str(value)
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.{max(1, digits - 2)}e}"
        return f"{value:.{digits}f}"

    return fmt


def text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def p_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


CellClass = Callable[[Mapping[str, Any], str], str]


def html_table(
    frame: pl.DataFrame,
    columns: Sequence[tuple[str, str, Format]],
    row_class: Callable[[Mapping[str, Any]], str] | None = None,
    cell_class: CellClass | None = None,
) -> str:
    """A `<table>` of `frame` showing `columns` as (column, header, formatter); `row_class` and
    `cell_class` (row, column) give CSS classes to rows and single cells."""
    head = "".join(f"<th>{_esc(header)}</th>" for _, header, _ in columns)
    body = []
    for row in frame.iter_rows(named=True):
        css = row_class(row) if row_class else ""
        cells = "".join(
            _cell(fmt(row[column]), cell_class(row, column) if cell_class else "")
            for column, _, fmt in columns
        )
        body.append(f'<tr class="{_esc(css)}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(value: str, css: str) -> str:
    return f'<td class="{_esc(css)}">{_esc(value)}</td>' if css else f"<td>{_esc(value)}</td>"


def scroll_box(table: str) -> str:
    """A wide table in its own horizontally scrolling box; the first column stays in view."""
    return f"<div class='scroll'>{table}</div>"


def image_tag(path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{encoded}">'


GROUP_COLUMNS: list[tuple[str, str, Format]] = [
    ("group", "group", text),
    ("n", "n", text),
    ("n_identities", "identities", text),
    ("accuracy", "accuracy", num(3)),
    ("accuracy_se", "± se (clustered)", num(3)),
    ("accuracy_upper", "90% upper bound", num(3)),
    ("mean_loss", "mean loss", num(4)),
    ("small_group", "small", text),
]
ESTIMATED_GROUP_COLUMNS: list[tuple[str, str, Format]] = [
    ("est_n", "images by text", text),
    ("est_loss", "estimated loss (member sd)", num(2)),
    ("est_rank", "estimated rank", text),
]
"""The groups estimated from text (core/report/group_estimates.py), with the grounded estimator."""
N_GROUPS_SHOWN = 12

CORRELATION_COLUMNS: list[tuple[str, str, Format]] = [
    ("group", "heads", text),
    ("estimate", "estimate", text),
    ("measure", "measured by", text),
    ("n", "n", text),
    ("pearson", "Pearson r", num(3)),
    ("pearson_p", "p", p_value),
    ("spearman", "Spearman ρ", num(3)),
    ("spearman_p", "p", p_value),
    ("kendall", "Kendall τ", num(3)),
    ("kendall_p", "p", p_value),
    ("note", "note", text),
]

ATTRIBUTE_COLUMNS: list[tuple[str, str, Format]] = [
    ("attribute", "attribute", text),
    ("n_true", "n with", text),
    ("n_false", "n without", text),
    ("loss_true", "loss with", num(4)),
    ("loss_false", "loss without", num(4)),
    ("accuracy_true", "acc with", num(4)),
    ("accuracy_false", "acc without", num(4)),
    ("auroc_true", "AUROC with", num(4)),
    ("auroc_false", "AUROC without", num(4)),
    ("gap_loss", "loss gap (signed)", num(4)),
    ("gap_loss_low", "measured 90% low", num(3)),
    ("gap_loss_high", "measured 90% high", num(3)),
    ("gap_loss_p", "measured p (Welch)", p_value),
    ("gt_rmm_auroc", "GT-RMM AUROC", num(4)),
    ("gt_rmm_accuracy", "GT-RMM acc", num(4)),
    ("est_mean", "est. disparity", num(3)),
    ("est_q1", "q1", num(3)),
    ("est_median", "median", num(3)),
    ("est_q3", "q3", num(3)),
    ("est_p_positive", "members >0", num(2)),
    ("est_gap", "est. gap (loss)", num(3)),
    ("est_gap_low", "est. 90% low", num(3)),
    ("est_gap_high", "est. 90% high", num(3)),
    ("est_p_worse", "P(worse)", num(2)),
    ("est_q_value", "BH q", p_value),
    ("claim", "claim", text),
    ("est_mean_regressor", "est. regressor", num(3)),
    ("est_mean_ranker", "est. ranker", num(3)),
    ("est_direct_mean", "est (direct)", num(3)),
    ("zero_shot_auroc", "0-shot AUROC", num(3)),
    ("zero_shot_auroc_dual", "0-shot AUROC (dual)", num(3)),
    ("small_group", "small group", text),
]

TABLE4_MAIN_COLUMNS: list[tuple[str, str, Format]] = [
    ("attribute", "attribute", text),
    ("n_true", "n with", text),
    ("n_false", "n without", text),
    ("loss_true", "loss with", num(3)),
    ("loss_false", "loss without", num(3)),
    ("gap_loss", "measured gap (loss)", num(3)),
    ("measured_interval", "measured 90% interval", text),
    ("gap_loss_p", "Welch p", p_value),
    ("est_gap", "est. gap (loss)", num(3)),
    ("est_interval", "est. 90% interval", text),
    ("est_p_worse", "P(worse)", num(2)),
    ("claim", "claim", text),
    ("zero_shot_auroc", "0-shot AUROC", num(3)),
    ("small_group", "small group", text),
]
"""Table 4 as most readers need it; every column is in the full table under it."""

PAIR_COLUMNS: list[tuple[str, str, Format]] = [
    ("pair", "pair (A & B)", text),
    ("n_TT", "n A&B", text),
    ("n_TF", "n A&¬B", text),
    ("n_FT", "n ¬A&B", text),
    ("n_FF", "n ¬A&¬B", text),
    ("loss_TT", "loss A&B", num(4)),
    ("loss_TF", "loss A&¬B", num(4)),
    ("loss_FT", "loss ¬A&B", num(4)),
    ("loss_FF", "loss ¬A&¬B", num(4)),
    ("measured_signed", "measured TT-FF", num(4)),
    ("est_signed_mean", "est. TT-FF", num(3)),
    ("est_signed_q1", "q1", num(3)),
    ("est_signed_q3", "q3", num(3)),
    ("est_p_positive", "members >0", num(2)),
    ("est_p_worse", "P(worse)", num(2)),
    ("bh_significant", "claimed", text),
    ("worst_cell_measured", "worst cell (measured)", text),
    ("worst_cell_estimated", "worst cell (estimated)", text),
    ("small_group", "small group", text),
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
td { white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
tr.small td { color: #999; font-style: italic; }
tr.significant td:first-child { font-weight: bold; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.5em 0 1.5em; }
.scroll table { margin: 0; }
.scroll td:first-child, .scroll th:first-child { position: sticky; left: 0; z-index: 1; }
.scroll td:first-child { background: #fff; }
.scroll th:first-child { background: #f0f0f0; z-index: 2; }
td.small-cell { color: #999; font-style: italic; }
td.small-cell::after { content: "*"; }
td.claim-worse { color: #d62728; font-weight: bold; }
td.claim-better { color: #1f77b4; font-weight: bold; }
.headline li { margin: 0.2em 0; }
.guide { background: #f7f7fb; padding: 0.6em 1.2em; border-left: 4px solid #88a; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def _attribute_row_class(row: Mapping[str, Any]) -> str:
    classes = []
    if row.get("small_group"):
        classes.append("small")
    if row.get("bh_significant"):
        classes.append("significant")
    return " ".join(classes)


def _claim_cell(row: Mapping[str, Any], column: str) -> str:
    if column != "claim":
        return ""
    return {"worse with": "claim-worse", "better with": "claim-better"}.get(row.get("claim"), "")


def _small_cells(min_group_size: int) -> CellClass:
    """Marks a pair's count and loss cells whose cell has fewer than `min_group_size` samples,
    as small attribute groups are marked (the pair row is greyed when TT or FF is small)."""

    def css(row: Mapping[str, Any], column: str) -> str:
        cell = column.rsplit("_", 1)[-1]
        if column.split("_")[0] in ("n", "loss") and f"n_{cell}" in row:
            return "small-cell" if (row[f"n_{cell}"] or 0) < min_group_size else ""
        return ""

    return css


def _interval(frame: pl.DataFrame, low: str, high: str) -> pl.Series:
    """'[low, high]' strings (a dash when either end is missing), one column instead of two."""
    fmt = num(3)
    if low not in frame.columns or high not in frame.columns:
        return pl.Series(["–"] * frame.height, dtype=pl.String)
    values = [
        "–" if fmt(a) == "–" or fmt(b) == "–" else f"[{fmt(a)}, {fmt(b)}]"
        for a, b in zip(frame[low], frame[high], strict=True)
    ]
    return pl.Series(values, dtype=pl.String)


def _table4(result: ReportResult) -> str:
    table = result.attribute_table.sort("est_mean", descending=True, nulls_last=True)
    table = table.with_columns(
        measured_interval=_interval(table, "gap_loss_low", "gap_loss_high"),
        est_interval=_interval(table, "est_gap_low", "est_gap_high"),
    )
    main = [c for c in TABLE4_MAIN_COLUMNS if c[0] in table.columns]
    every = [c for c in ATTRIBUTE_COLUMNS if c[0] in table.columns]
    return (
        scroll_box(html_table(table, main, _attribute_row_class, _claim_cell))
        + "<details><summary>Table 4 with every column (accuracy, AUROC, GT-RMM, the members' "
        "quartiles, per head kind, the direct estimate)</summary>"
        + scroll_box(html_table(table, every, _attribute_row_class, _claim_cell))
        + "</details>"
    )


TABLE_TITLES = {
    1: "Table 1: disparity over-estimation vs zero-shot AUROC",
    2: "Table 2: estimated vs measured disparity (measured by mean loss)",
    3: "Table 3: zero-shot AUROC vs measured |disparity| (GT-RMM)",
    4: "Table 4: per attribute",
}


def _contents() -> str:
    """The tables in the order they appear, each linked, so the text refers to them in order."""
    items = "".join(f"<li><a href='#table{k}'>{_esc(t)}</a></li>" for k, t in TABLE_TITLES.items())
    items += "<li><a href='#pairs'>Attribute pairs</a></li><li><a href='#figures'>Figures</a></li>"
    return f"<h2>Contents</h2><ol class='contents'>{items}</ol>"


def _heading(k: int) -> str:
    return f"<h2 id='table{k}'>{_esc(TABLE_TITLES[k])}</h2>"


def _headline(result: ReportResult) -> str:
    h = result.headline
    f3 = num(3)
    items = [
        f"Spearman ρ between estimated and measured (signed loss) disparity across attributes: "
        f"regressor heads {f3(h.get('spearman_signed_regressor'))} "
        f"(p {p_value(h.get('spearman_signed_regressor_p'))}), ranker heads "
        f"{f3(h.get('spearman_signed_ranker'))} (p {p_value(h.get('spearman_signed_ranker_p'))}), "
        f"whole ensemble {f3(h.get('spearman_signed_overall'))} "
        f"(p {p_value(h.get('spearman_signed_overall_p'))}).",
        f"Estimator: {result.estimator}"
        + (
            f"; the paper's direct estimate reaches Spearman "
            f"{f3(h.get('spearman_signed_direct'))} on the same attributes."
            if result.estimator == "grounded"
            else "."
        ),
        f"{int(h.get('n_bh_significant', 0))} of {int(h.get('n_attributes', 0))} attributes are "
        f"claimed worse or better (BH, α = {result.alpha}); the measured gap's own 90% interval "
        f"excludes zero for {int(h.get('n_measured_significant', 0))}. Trust check on the "
        f"labelled attributes, each judged without its own label: "
        f"{_share(h.get('claim_precision_measured'))} of the claims agree in sign with a "
        f"measured gap whose interval excludes zero, and the 90% intervals hold "
        f"{_share(h.get('interval_coverage_measured'))} of the measured gaps.",
        "Mean zero-shot AUROC of the encoder over attributes: "
        f"{f3(h.get('zero_shot_mean_auroc'))}.",
        f"{int(h.get('n_small_groups', 0))} attribute(s) have a group smaller than "
        f"{result.min_group_size} samples on the {result.eval_split!s} split (kept, greyed out).",
    ]
    top = ", ".join(a.replace("_", " ") for a in result.top_attributes[:5])
    items.append(f"Largest estimated disparities (worse with the attribute): {top}.")
    measured = (
        result.attribute_table.filter(~pl.col("small_group") & pl.col("gap_loss").is_not_nan())
        .sort("gap_loss", descending=True)["attribute"]
        .head(5)
        .to_list()
    )
    items.append(
        "Largest measured gaps on the evaluation split (worse with the attribute): "
        + ", ".join(a.replace("_", " ") for a in measured)
        + "."
    )
    # which probes a reader should not take at their word: built from column names
    items.extend(note for note in result.notes if BUILT_NOTE in note)
    if result.groups is not None:  # the worst group first: the group-robustness view
        first = [n for n in result.notes if n.startswith(("worst group:", ESTIMATED_WORST))]
        items[:0] = first
    return "<ul class='headline'>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def _share(value: Any) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.0%}"


def _calibration_sentence(result: ReportResult) -> str:
    cal = result.calibration
    if cal is None or not cal.calibrated:
        return "This report had too few labelled attributes to learn the mapping."
    return (
        f"Here one unit of estimate is {cal.slope:.3f} units of loss, and the text side adds "
        f"an error of {cal.text_error:.2f} estimate units (from {cal.n_attributes} attributes)."
    )


def _estimator_guide(estimator: str) -> str:
    prompts = (
        "The diagnosis heads never see the attribute labels or the measured losses. Each "
        "attribute is asked about in text, with prompts such as 'face of a person wearing "
        "eyeglasses' and 'face of a person without eyeglasses', averaged over wordings. "
    )
    if estimator == "grounded":
        return prompts + (
            "Estimator 'grounded': the prompts are turned into a text direction (with minus "
            "without), made independent of the other attributes' directions, and every evaluation "
            "image is scored along it. A member's estimate is how much its predicted loss rises "
            "per standard deviation of that score (a covariance in standardized units). Positive "
            "= the heads expect the model to do worse on faces with the attribute. The column "
            "'est (direct)' is the paper's estimate, the heads applied to the prompts' own "
            "embeddings, kept for comparison."
        )
    return prompts + (
        "Estimator 'direct' (the paper's): each member reads the prompts' text embeddings and "
        "estimates the loss on faces like each; the estimate is the difference (with minus "
        "without) in standardized loss units. Positive = the heads expect the model to do worse "
        "on faces with the attribute."
    )


def _guide(result: ReportResult) -> str:
    paragraphs = [
        _estimator_guide(result.estimator),
        "Measured disparity: the black box's performance on the evaluation split for faces with "
        "the attribute minus without it. Signed gaps are oriented so that positive always means "
        "worse with the attribute (higher loss, lower accuracy, lower AUROC). GT-RMM is the "
        "Rawlsian max-min gap |perf(with) - perf(without)|.",
        AUROC_DEFINITION,
        "members >0: the fraction of ensemble members whose estimate is above zero. The "
        "members are bootstrap replicates of one fit (resampled training images and evaluation "
        "identities), so their spread is the estimate's standard error from the data, not a "
        "sample of independent opinions: 20 of 20 agreeing is not certainty.",
        "P(worse), the 90% interval and the claim: the estimate's whole error is the members' "
        "spread plus the text side's error (how well the prompts pick out the attribute), "
        "learned on the other labelled attributes, which also give the scale from estimate to "
        "loss units (est. gap). P(worse) is the probability that the real gap is above zero; "
        "the interval should hold the real loss gap 9 times in 10; an attribute is claimed "
        "'worse with' or 'better with' when Benjamini-Hochberg at "
        f"{result.alpha:.0%} keeps it, and 'cannot tell' otherwise. "
        + _calibration_sentence(result),
        "Measured 90% interval: the measured loss gap with an identity-clustered standard error "
        "(images of one person are not independent); the Welch p-value beside it treats every "
        "image as independent, as the paper does.",
        "Zero-shot AUROC: how well the encoder alone tells the attribute from its absence "
        "(image-text similarity to the positive minus the negative prompts). It shows where the "
        "encoder's language prior is strong, and so where the estimates can be trusted most.",
        "Small groups (fewer than "
        f"{result.min_group_size} samples on one side) are shown greyed and are left out of the "
        "correlations, because their measured gaps are mostly noise.",
    ]
    return "<div class='guide'>" + "".join(f"<p>{_esc(p)}</p>" for p in paragraphs) + "</div>"


def _groups_section(result: ReportResult) -> list[str]:
    if result.groups is None:
        return []
    estimated = "est_loss" in result.groups.columns
    columns = GROUP_COLUMNS + (ESTIMATED_GROUP_COLUMNS if estimated else [])
    shown = result.groups.head(N_GROUPS_SHOWN)
    if estimated:  # the estimated worst group is shown even where its measure is not among them
        shown = pl.concat([shown, result.groups.filter(pl.col("est_worst"))]).unique(
            ["target_value", "attribute", "value"], keep="first", maintain_order=True
        )
    return [
        "<h2 id='groups'>Groups, worst first</h2>",
        f"<p>Accuracy and mean loss of the black box per group on the {_esc(result.eval_split)} "
        "split (an attribute task: its target crossed with each attribute), with "
        "identity-clustered standard errors and the upper bound of the 90% interval (a small "
        "slice's low accuracy may be partly chance). The whole table is groups.parquet. The "
        f"{N_GROUPS_SHOWN} worst of {result.groups.height}:</p>",
        *_declared_groups(result.groups),
        *_estimated_groups(result.groups),
        html_table(shown, columns),
    ]


def _estimated_groups(groups: pl.DataFrame) -> list[str]:
    """How to read the estimated columns, when the grounded estimator gave them."""
    if "est_loss" not in groups.columns:
        return []
    return [
        "<p>Estimated from text, without the attribute's labels: the images the report's probe "
        "puts in each group (an attribute task's target from its labels), and the heads' mean "
        "loss over them in member standard deviations. The declared groups the text gives "
        "enough images are ranked by it (1: estimated worst); a ranking, not a probability.</p>"
    ]


def _declared_groups(groups: pl.DataFrame) -> list[str]:
    """One line when report.group_by declares the groups: the worst group is chosen among them."""
    if "declared" not in groups.columns:
        return []
    declared = groups.filter(pl.col("declared"))["attribute"].unique(maintain_order=True)
    if declared.len() == groups["attribute"].n_unique():
        return []
    return [
        f"<p>The worst group is chosen among the declared groups (report.group_by: "
        f"{_esc(', '.join(declared.to_list()))}); the table lists every cell.</p>"
    ]


def render_html(result: ReportResult) -> str:
    corr = result.correlations
    table2_loss = corr.filter((pl.col("table") == "table2") & (pl.col("measure") == "loss"))
    table2_rest = corr.filter((pl.col("table") == "table2") & (pl.col("measure") != "loss"))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>LLM2Loss attribute disparity report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>LLM2Loss attribute disparity report</h1>",
        f"<p>Evaluation split: <b>{_esc(result.eval_split)}</b>; "
        f"{_esc(result.n_eval_samples)} samples; {_esc(result.n_members)} ensemble members.</p>",
        # A relative link: discovery.html is written next to this page by failure_hypotheses,
        # which runs after the report in the same job.
        "<p>Where the model fails beyond these attributes, in language and with evidence: "
        "<a href='discovery.html'>failure discovery</a> (after the failure_hypotheses asset "
        "has run).</p>",
        "<h2>Headline</h2>",
        _headline(result),
        "<h2>How to read this report</h2>",
        _guide(result),
        _contents(),
        _heading(1),
        "<p>Over-estimation = z(|estimated|) - z(GT-RMM of loss), z-scores across attributes.</p>",
        html_table(corr.filter(pl.col("table") == "table1"), CORRELATION_COLUMNS),
        _heading(2),
        html_table(table2_loss, CORRELATION_COLUMNS),
        "<details><summary>Table 2 with accuracy- and AUROC-based measured disparity</summary>",
        html_table(table2_rest, CORRELATION_COLUMNS),
        "</details>",
        _heading(3),
        html_table(corr.filter(pl.col("table") == "table3"), CORRELATION_COLUMNS),
        _heading(4),
        "<p>Sorted by estimated disparity (whole ensemble). Greyed rows: small groups. The table "
        "scrolls sideways inside its box; the attribute column stays in view.</p>",
        _table4(result),
        "<h2 id='pairs'>Attribute pairs (intersectional)</h2>",
        "<p>Cells: TT = both attributes, TF = first only, FT = second only, FF = neither. "
        "Signed disparity = loss(TT) - loss(FF); worst cell = highest loss among cells with at "
        f"least {_esc(result.min_group_size)} samples. Counts and losses marked * (grey) are "
        f"small cells, under {_esc(result.min_group_size)} samples; a pair whose TT or FF cell "
        "is small is greyed, as small attribute groups are. "
        + (
            "Grounded cell estimates score each image by the sum of the two attributes' scores "
            "with the cell's signs, so both conditions weigh the same."
            if result.estimator == "grounded"
            else "Estimated cells read composed prompts such as 'face of a young man'."
        )
        + "</p>",
        scroll_box(
            html_table(
                result.pair_table,
                PAIR_COLUMNS,
                _attribute_row_class,
                _small_cells(result.min_group_size),
            )
        ),
        html_table(corr.filter(pl.col("table") == "pairs"), CORRELATION_COLUMNS),
        *_groups_section(result),
        "<h2 id='figures'>Figures</h2>",
    ]
    for name, path in result.files.items():
        if str(path).endswith(".png"):
            parts.append(f"<h3>{_esc(name.replace('_', ' '))}</h3>{image_tag(path, name)}")
    if result.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts.extend(f"<li>{_esc(note)}</li>" for note in result.notes)
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
