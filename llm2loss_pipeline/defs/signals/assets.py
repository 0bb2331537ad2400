"""Per-shard signals: the black box's loss on every sample and every sample's embedding."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
import dagster as dg

from llm2loss_pipeline.core.steps import black_box as black_box_steps
from llm2loss_pipeline.core.steps import encoder as encoder_steps
from llm2loss_pipeline.defs.automation import FOLLOW_UPSTREAM
from llm2loss_pipeline.defs.data.assets import OWNERS, dataset_manifest
from llm2loss_pipeline.defs.metadata import table_metadata
from llm2loss_pipeline.defs.models.assets import black_box_model, semantic_encoder
from llm2loss_pipeline.defs.partitions import SHARDS
from llm2loss_pipeline.defs.placement import GPU_OP_TAGS, GPU_POOL
from llm2loss_pipeline.defs.progress import progress_logger
from llm2loss_pipeline.defs.resources import (
    BlackBoxResource,
    DatasetResource,
    DeviceResource,
    StorageResource,
)


@dg.asset(
    deps=[dataset_manifest, black_box_model],
    partitions_def=SHARDS,
    group_name="signals",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    code_version="losses-v1",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    automation_condition=FOLLOW_UPSTREAM,
    description=(
        "The task loss of f on every sample of one shard (cross-entropy of the task that "
        "black_box_model recorded: identity, an attribute or a table's label), with prediction, "
        "correctness, p(true) and the true class's ranking AUROC."
    ),
)
def per_sample_losses(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    dataset: DatasetResource,
    black_box: BlackBoxResource,
    losses_device: DeviceResource,
) -> dg.MaterializeResult:
    result = black_box_steps.shard_losses(
        storage.layout(),
        context.partition_key,
        black_box.spec(),
        dataset.spec(),
        losses_device.spec(),
        progress=progress_logger(context, f"losses {context.partition_key}"),
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={
            **table_metadata(result.frame, result.path),
            "mean_loss": dg.MetadataValue.float(result.summary["mean_loss"]),
            "accuracy": dg.MetadataValue.float(result.summary["accuracy"]),
            "mean_loss_by_split": dg.MetadataValue.json(result.summary["mean_loss_by_split"]),
            "dropped_nonfinite": len(result.dropped),
            "skipped_images": len(result.skipped),
            **(
                {"skipped": dg.MetadataValue.json(list(result.skipped)[:50])}
                if result.skipped
                else {}
            ),
        },
    )


@dg.asset(
    deps=[dataset_manifest, semantic_encoder],
    partitions_def=SHARDS,
    group_name="signals",
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    code_version="embeddings-v1",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    automation_condition=FOLLOW_UPSTREAM,
    description=(
        "The image embedding g(x) of every sample of one shard: L2-normalised float32 vectors, "
        "computed with the encoder's own preprocessing under torch.inference_mode."
    ),
)
def image_embeddings(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    dataset: DatasetResource,
    embeddings_device: DeviceResource,
) -> dg.MaterializeResult:
    result = encoder_steps.shard_embeddings(
        storage.layout(),
        context.partition_key,
        dataset.spec(),
        embeddings_device.spec(),
        progress=progress_logger(context, f"embeddings {context.partition_key}"),
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={
            **table_metadata(result.frame, result.path),
            "embedding_dim": result.embed_dim,
            "encoder_sha256": result.encoder_sha256,
            "skipped_images": len(result.skipped),
        },
    )
