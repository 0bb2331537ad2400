"""Dataset assets: the manifest of every sample and the attribute table (CelebA's 40, the
generated world's, or a table dataset's own columns)."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
import dagster as dg

from llm2loss_pipeline.core.steps import data as steps
from llm2loss_pipeline.defs.metadata import markdown_table, table_metadata
from llm2loss_pipeline.defs.partitions import sync_shard_partitions
from llm2loss_pipeline.defs.preflight import SETTINGS_KEYS, preflight_once
from llm2loss_pipeline.defs.progress import progress_logger
from llm2loss_pipeline.defs.resources import (
    DatasetResource,
    StorageResource,
    TaskResource,
    WorldResource,
)

OWNERS = ["team:ml-diagnostics"]


@dg.asset(
    group_name="data",
    kinds={"parquet", "python"},
    owners=OWNERS,
    code_version="manifest-v1",
    required_resource_keys=SETTINGS_KEYS,
    description=(
        "Every sample: id, image path, split, identity and shard. Generates the offline face world "
        "when dataset.source is 'generated', else reads a CelebA root or a table (Parquet or "
        "CSV manifest). Registers the shard "
        "partitions of the per-sample assets."
    ),
)
def dataset_manifest(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    preflight_once(context)  # the graph's first asset: check the configuration before any work
    resources = context.resources
    layout = resources.storage.layout()
    result = steps.prepare_dataset(
        layout,
        resources.dataset.spec(),
        resources.world.spec(),
        progress=progress_logger(context, "world images"),
    )
    for line in result.removed_shards:
        context.log.info(line)
    added, removed = sync_shard_partitions(context.instance, result.shard_keys)
    context.log.info(
        f"{result.manifest.height} samples in {len(result.shard_keys)} shards "
        f"({added} shard partitions added, {removed} removed)"
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.manifest_sha256),
        metadata={
            **table_metadata(result.manifest, layout.manifest),
            "dataset_root": dg.MetadataValue.path(str(result.root)),
            "source": result.source,
            "n_identities": result.n_identities,
            "n_shards": len(result.shard_keys),
            "stale_shard_files_removed": len(result.removed_shards),
            "split_sizes": dg.MetadataValue.json(result.split_sizes),
            # the manifest's label k is label_values[k] (a text label column, numbered)
            **(
                {"label_values": dg.MetadataValue.json(result.label_values)}
                if result.label_values
                else {}
            ),
            **(
                {"contact_sheet": dg.MetadataValue.path(str(result.contact_sheet))}
                if result.contact_sheet
                else {}
            ),
        },
    )


@dg.asset(
    deps=[dataset_manifest],
    group_name="data",
    kinds={"parquet", "duckdb"},
    owners=OWNERS,
    code_version="attributes-v2",
    description=(
        "The dataset's attributes per sample (boolean columns), the attribute set (which are "
        "diagnosed, how each is phrased: tables/attribute_set.json), and per-attribute counts "
        "by split computed in DuckDB (assets_sql/attribute_counts_by_split.sql)."
    ),
)
def celeba_attributes(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    dataset: DatasetResource,
    world: WorldResource,
    task: TaskResource,
) -> dg.MaterializeResult:
    layout = storage.layout()
    result = steps.summarize_attributes(layout, dataset.spec(), world.spec(), task.spec())
    attribute_set = result.attribute_set
    context.log.info(
        f"{result.attributes.height} rows of {len(attribute_set.attributes)} attributes, "
        f"{len(attribute_set.diagnosed)} diagnosed"
    )
    if attribute_set.built:
        context.log.info(
            f"phrased from their names (no probes file entry): {', '.join(attribute_set.built)}"
        )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.attributes_sha256),
        metadata={
            **table_metadata(result.attributes, layout.attributes),
            "n_attributes": len(attribute_set.attributes),
            "diagnosed": dg.MetadataValue.json(list(attribute_set.diagnosed)),
            "built_phrasings": dg.MetadataValue.json(attribute_set.built),
            "positive_rate_by_split": dg.MetadataValue.md(
                markdown_table(result.rates_by_split.to_dicts())
            ),
        },
    )
