"""A grid of sample faces from a CelebA-layout root, each labelled with some positive attributes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llm2loss_pipeline.core.storage import write_bytes_atomic

DEFAULT_LABELS: tuple[str, ...] = (
    "Male",
    "Eyeglasses",
    "Wearing_Hat",
    "Smiling",
    "Bald",
    "Bangs",
    "Blond_Hair",
    "Black_Hair",
    "Gray_Hair",
    "Mustache",
    "Goatee",
    "Heavy_Makeup",
    "Wearing_Necktie",
    "Wearing_Earrings",
    "Blurry",
)
SHORT = {"Wearing_": "", "_Hair": " hair", "_": " "}


def _short(name: str) -> str:
    for old, new in SHORT.items():
        name = name.replace(old, new)
    return name.lower()


def contact_sheet(
    root: Path,
    out_png: Path,
    n: int = 16,
    attributes: Sequence[str] = DEFAULT_LABELS,
    cell: int = 128,
    max_labels: int = 4,
) -> Path:
    """Write a PNG grid of `n` faces spread evenly over the root's images, labelled below each."""
    # lazy: core.config imports this module: celeba adds pyarrow (0.2 s), images torch (3 s)
    from llm2loss_pipeline.core.celeba import read_celeba
    from llm2loss_pipeline.core.images import load_image

    tables = read_celeba(Path(root))
    rows = tables.attributes
    if rows.height == 0:
        raise ValueError(f"{root} lists no images to show")
    n = max(1, min(n, rows.height))
    step = rows.height / n
    picks = [int(i * step) for i in range(n)]
    identities = dict(zip(*tables.identities.get_columns(), strict=True))

    font = ImageFont.load_default()
    line_height = 11
    label_height = line_height * max_labels + 4
    columns = min(n, 8)
    grid_rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * cell, grid_rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, row_index in enumerate(picks):
        row = rows.row(row_index, named=True)
        face = load_image(tables.image_dir / row["sample_id"]).resize(
            (cell, cell), Image.Resampling.LANCZOS
        )
        x, y = (k % columns) * cell, (k // columns) * (cell + label_height)
        sheet.paste(face, (x, y))
        labels = [f"id {identities[row['sample_id']]}"]
        labels += [_short(name) for name in attributes if row.get(name)]
        for line, text in enumerate(labels[:max_labels]):
            draw.text((x + 3, y + cell + 2 + line * line_height), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return write_bytes_atomic(out_png, buffer.getvalue())
