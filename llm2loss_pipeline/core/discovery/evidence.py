"""Showing the evidence: a contact sheet per kept hypothesis and a small HTML page of all.

A sheet has two rows: the proponents (matched samples that push the heads' estimate towards
"worse" most) and the counter-examples (matched samples that pull it down, or are easy anyway),
each face labelled with its sample id, loss and influence, so a reader can see whether the
description fits the faces and whether the failure is real.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image, ImageDraw, ImageFont

from llm2loss_pipeline.core.storage import write_bytes_atomic, write_text_atomic

CELL = 96
LINE = 11
TITLE_HEIGHT = 18


def _load(path: str | Path, sample_id: str) -> Image.Image:
    from llm2loss_pipeline.core.images import ImageDecodeError, load_image

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
    """One sheet per kept hypothesis, best first, at most n_sheets: rank -> PNG path."""
    sheets: dict[int, Path] = {}
    kept = hypotheses.filter(pl.col("kept")).head(n_sheets)
    for row in kept.iter_rows(named=True):
        rank = int(row["rank"])
        mine = evidence.filter(pl.col("rank") == rank).sort("position")
        rows = [
            ("proponents", mine.filter(pl.col("role") == "proponent").to_dicts()),
            ("counter-examples", mine.filter(pl.col("role") == "counter_example").to_dicts()),
        ]
        title = f"#{rank} {row['description']}  (measured gap {row['measured_gap']:+.3g})"
        sheets[rank] = contact_sheet(
            title, rows, image_paths, Path(out_dir) / f"hypothesis-{rank:02d}.png"
        )
    return sheets


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))


SUMMARY_COLUMNS = (
    "rank",
    "description",
    "kept",
    "estimated_gap",
    "p_worse",
    "measured_gap",
    "measured_auc",
    "q_value",
    "n_matched",
    "n_supporting",
)
"""The columns of a hypothesis a reader scans first (the page, the Dagster metadata table)."""


def discovery_html(
    hypotheses: pl.DataFrame, sheets: Mapping[int, Path], out_html: str | Path, top: int = 30
) -> Path:
    """A page of the ranked hypotheses with their contact sheets (paths relative to the page)."""
    out = Path(out_html)
    columns = [*SUMMARY_COLUMNS, "redundant_with"]
    head = "".join(f"<th>{name}</th>" for name in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row[name])}</td>" for name in columns) + "</tr>"
        for row in hypotheses.head(top).iter_rows(named=True)
    )
    figures = "".join(
        f'<figure><img src="{html.escape(str(Path(path).relative_to(out.parent)))}" '
        f'alt="evidence for hypothesis {rank}"><figcaption>hypothesis {rank}</figcaption></figure>'
        for rank, path in sorted(sheets.items())
    )
    kept = int(hypotheses["kept"].sum())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llm2loss failure discovery</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}img{{max-width:100%}}</style>
</head><body>
<h1>Failure discovery</h1>
<p>{hypotheses.height} candidate descriptions; {kept} kept (the heads estimate worse and the
matched evaluation samples are measurably worse, Benjamini-Hochberg controlled).
The full table is <code>failure_hypotheses.parquet</code>; the evidence samples are in
<code>failure_evidence.parquet</code>.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Evidence</h2>{figures or "<p>(no kept hypothesis)</p>"}
</body></html>
"""
    return write_text_atomic(out, page)
