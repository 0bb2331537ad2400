"""Showing the evidence: a contact sheet per kept hypothesis and a small HTML page of all.

A sheet has two rows: the proponents (PROPONENTS) and the counter-examples (COUNTER_EXAMPLES),
each face labelled with its sample id, loss and influence, so a reader can see whether the
description fits the faces and whether the failure is real. The page embeds its sheets (base64
PNG), so it can be mailed or moved on its own, as report.html is.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image, ImageDraw, ImageFont

from llm2loss_pipeline.core.images import ImageDecodeError, load_image
from llm2loss_pipeline.core.storage import write_bytes_atomic, write_text_atomic

PROPONENTS = (
    "proponents: matched samples the model does worse on (loss above the unmatched samples' "
    "median) that push the heads' estimate towards 'worse' most"
)
COUNTER_EXAMPLES = (
    "counter-examples: matched samples the model does fine on (loss at or below that median), "
    "those that pull the estimate down most first: cases of the description that do not fail"
)
KEEP_RULE = (
    "kept only when both agree: the heads estimate worse (the estimate `compare` gives, "
    "P(worse) at or above discovery.min_p_worse) and the matched samples are worse (a rank test "
    "that counts each identity's images as one cluster, Benjamini-Hochberg); 'estimate "
    "disagrees' means the samples are worse but the heads, which generalise from the training "
    "split, do not rate the description worse: a lead to check, not a finding; with attribute "
    "labels it is 'kept on the labels' when the people its words name are measurably worse too"
)
MODE_RULE = (
    "a failure mode groups the descriptions whose matched samples overlap (Jaccard at or above "
    "discovery.max_overlap) under its best wording; a pair or triple is its own mode only when "
    "its samples are measurably worse than its parents'"
)
SHARED_RULE = (
    "a labelled value is listed when it is on most of the matched samples of at least half of "
    "the modes, and of at least three, and there at least discovery.min_lift times as common "
    "as among all samples; modes that share one may be facets of one group, and the labels say "
    "whether the people with it are worse"
)
SHARED_HEADING = (
    "what the modes share (a labelled value on most of the images of at least half of the "
    "modes, and far more common there than among all samples)"
)

CELL = 96
LINE = 11
TITLE_HEIGHT = 18


def _load(path: str | Path, sample_id: str) -> Image.Image:
    try:
        return load_image(path)
    except (ImageDecodeError, OSError) as exc:
        raise ValueError(
            f"evidence sample {sample_id}: cannot load its image {path} ({exc})"
        ) from exc


def contact_sheet(
    title: str,
    rows: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    image_paths: Mapping[str, str],
    out_png: str | Path,
    cell: int = CELL,
) -> Path:
    """A PNG with one labelled row per (name, samples); samples carry sample_id, loss, influence."""
    font = ImageFont.load_default()
    label_height = 3 * LINE + 4
    columns = max([len(samples) for _, samples in rows] + [1])
    name_width = 110
    width = name_width + columns * cell
    height = TITLE_HEIGHT + len(rows) * (cell + label_height)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), title[: width // 6], fill=(0, 0, 0), font=font)
    for r, (name, samples) in enumerate(rows):
        y = TITLE_HEIGHT + r * (cell + label_height)
        draw.text((4, y + cell // 2), name, fill=(0, 0, 0), font=font)
        if not samples:
            draw.text((name_width, y + cell // 2), "(none)", fill=(120, 120, 120), font=font)
        for c, sample in enumerate(samples):
            sample_id = str(sample["sample_id"])
            if sample_id not in image_paths:
                raise ValueError(f"evidence sample {sample_id} is not in the dataset manifest")
            face = _load(image_paths[sample_id], sample_id).resize(
                (cell, cell), Image.Resampling.LANCZOS
            )
            x = name_width + c * cell
            sheet.paste(face, (x, y))
            labels = [
                sample_id,
                f"loss {float(sample['loss']):.3g}",
                f"infl {float(sample['influence']):+.2f}",
            ]
            for line, text in enumerate(labels):
                draw.text((x + 2, y + cell + 2 + line * LINE), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return write_bytes_atomic(out_png, buffer.getvalue())


def hypothesis_sheets(
    hypotheses: pl.DataFrame,
    evidence: pl.DataFrame,
    image_paths: Mapping[str, str],
    out_dir: str | Path,
    n_sheets: int,
) -> dict[int, Path]:
    """One sheet per failure mode, best first, at most n_sheets: rank -> PNG path."""
    sheets: dict[int, Path] = {}
    kept = hypotheses.filter(pl.col("verdict") == "mode").head(n_sheets)
    for row in kept.iter_rows(named=True):
        rank = int(row["rank"])
        mine = evidence.filter(pl.col("rank") == rank).sort("position")
        rows = [
            ("proponents", mine.filter(pl.col("role") == "proponent").to_dicts()),
            ("counter-examples", mine.filter(pl.col("role") == "counter_example").to_dicts()),
        ]
        title = f"#{rank} {row['shown_as']}  (measured gap {row['measured_gap']:+.3g})"
        sheets[rank] = contact_sheet(
            title, rows, image_paths, Path(out_dir) / f"hypothesis-{rank:02d}.png"
        )
    return sheets


def fmt(value: Any) -> str:
    """A cell as a reader should see it: yes/no, a dash for nothing, 3 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


SUMMARY_COLUMNS = (
    "rank",
    "mode",
    "verdict",
    "shown_as",
    "wording",
    "estimated_gap",
    "p_worse",
    "measured_gap",
    "measured_auc",
    "q_value",
    "n_matched",
    "n_supporting",
    "n_variants",
)
"""The columns of a hypothesis a reader scans first (the page, the Dagster metadata table)."""

PAGE_COLUMNS = (*SUMMARY_COLUMNS, "description", "shows", "reason")


def _embedded(path: Path, rank: int) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="evidence for hypothesis {rank}">'
        f"<figcaption>hypothesis {rank}</figcaption></figure>"
    )


def _table(rows: pl.DataFrame) -> str:
    head = "".join(f"<th>{name}</th>" for name in PAGE_COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(fmt(row.get(name)))}</td>" for name in PAGE_COLUMNS)
        + "</tr>"
        for row in rows.iter_rows(named=True)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def discovery_html(
    hypotheses: pl.DataFrame,
    sheets: Mapping[int, Path],
    out_html: str | Path,
    top: int = 30,
    shared: Sequence[Any] = (),
) -> Path:
    """A self-contained page: the failure modes, what they share (`shared`: SharedTrait's of
    core/discovery/shared.py), the user's vocabulary, the evidence sheets."""
    out = Path(out_html)
    common = "".join(f"<li>{html.escape(trait.sentence())}</li>" for trait in shared)
    if common:
        common = f"<h3>What the modes share</h3><p>{html.escape(SHARED_RULE)}</p><ul>{common}</ul>"
    modes = hypotheses.filter(pl.col("verdict") == "mode").head(top)
    vocab = hypotheses.filter(pl.col("source") == "vocabulary")
    figures = "".join(_embedded(path, rank) for rank, path in sorted(sheets.items()))
    n_kept = int(hypotheses["kept"].sum())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llm2loss failure discovery</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}img{{max-width:100%}}</style>
</head><body>
<h1>Failure discovery</h1>
<p><a href="report.html">Back to the report</a></p>
<p>{modes.height} distinct failure modes shown; {n_kept} of {hypotheses.height} candidate
descriptions verified. {html.escape(MODE_RULE)}. A description is {html.escape(KEEP_RULE)}.
<code>shown_as</code> is the description, or, when its matched images do not show what it names,
the attributes they do over-represent (<code>wording</code>). The full table is
<code>failure_hypotheses.parquet</code>; the evidence samples are in
<code>failure_evidence.parquet</code>.</p>
<h2>Failure modes</h2>{_table(modes) if modes.height else "<p>(no failure mode)</p>"}
{common}
<h2>Your vocabulary</h2>{_table(vocab) if vocab.height else "<p>(no vocabulary given)</p>"}
<h2>Evidence</h2>
<ul><li>{html.escape(PROPONENTS)}</li><li>{html.escape(COUNTER_EXAMPLES)}</li></ul>
{figures or "<p>(no failure mode)</p>"}
</body></html>
"""
    return write_text_atomic(out, page)
