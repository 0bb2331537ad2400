"""Population truth for a generated world: many more images of the same identities.

A disparity measured on a few hundred test images is itself noisy, so judging the diagnosis
against it mixes the diagnosis's error with the measurement's. A generated world can do better:
every image is a pure function of (config, identity, slot), so slots past the dataset's
`images_per_identity` are new, independent draws of the same people under the same rules
(attributes, hardness of the planted ones), never part of the dataset, never seen by the black
box, the encoder or the heads. The black box's disparity on many of them is the world's
*population* disparity, which the benchmark (bench/worlds.py) measures every estimate against.

The population is written as `images/NNNNNN.jpg` plus `population.parquet` (sample_id, path,
identity and the 40 attributes as booleans), atomically as one folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.storage import replace_dir, write_parquet_atomic
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.generate import (
    PlannedImage,
    ProgressFn,
    WorldPlan,
    image_jobs,
    plan_identities,
    plan_image,
    render_images,
)

POPULATION_TABLE = "population.parquet"
IMAGES = "images"
TEST_SPLIT = 2  # population images are drawn as test images are: none is dropped


def plan_population(config: WorldConfig, per_identity: int) -> list[PlannedImage]:
    """`per_identity` new images of every identity, at slots the dataset never uses."""
    if per_identity < 1:
        raise ValueError(f"per_identity must be at least 1, got {per_identity}")
    first = config.images_per_identity  # the dataset's slots are 0 .. images_per_identity - 1
    return [
        plan_image(config, traits, slot, TEST_SPLIT)
        for traits in plan_identities(config)
        for slot in range(first, first + per_identity)
    ]


def population_table(planned: list[PlannedImage]) -> pl.DataFrame:
    """sample_id, path (relative to the population folder), identity, then the 40 attributes."""
    names = [f"{position + 1:06d}.jpg" for position in range(len(planned))]
    columns: dict[str, object] = {
        "sample_id": names,
        "path": [f"{IMAGES}/{name}" for name in names],
        "identity": [image.identity for image in planned],
    }
    for attribute in CELEBA_ATTRIBUTES:
        columns[attribute] = [image.attributes[attribute] for image in planned]
    return pl.DataFrame(columns).with_columns(pl.col("identity").cast(pl.Int64))


def write_population(
    config: WorldConfig,
    out_dir: str | Path,
    per_identity: int,
    progress: ProgressFn | None = None,
    workers: int = 2,
) -> pl.DataFrame:
    """Draw and write the population of `config` into `out_dir` (all or nothing); its table.

    An existing population with the same table is reused, so a benchmark can be rerun cheaply.
    """
    out = Path(out_dir).expanduser().absolute()
    planned = plan_population(config, per_identity)
    table = population_table(planned)
    existing = out / POPULATION_TABLE
    if existing.exists() and pl.read_parquet(existing).equals(table):
        return table
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / IMAGES).mkdir(parents=True)
        jobs = image_jobs(WorldPlan(config, plan_identities(config), planned))  # 000001.jpg, ...
        render_images(jobs, partial / IMAGES, progress, workers)
        write_parquet_atomic(table, partial / POPULATION_TABLE)
        replace_dir(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return table
