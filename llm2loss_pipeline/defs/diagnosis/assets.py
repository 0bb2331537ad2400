"""The ensemble of diagnosis heads h: loss predicted from the embedding."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
import dagster as dg

from llm2loss_pipeline.core.steps import diagnosis as steps
from llm2loss_pipeline.defs.automation import FOLLOW_UPSTREAM
from llm2loss_pipeline.defs.data.assets import OWNERS
from llm2loss_pipeline.defs.metadata import float_metadata, markdown_table
from llm2loss_pipeline.defs.models.assets import semantic_encoder
from llm2loss_pipeline.defs.progress import progress_logger
from llm2loss_pipeline.defs.resources import DeviceResource, HeadsResource, StorageResource
from llm2loss_pipeline.defs.signals.assets import image_embeddings, per_sample_losses


@dg.asset(
    deps=[per_sample_losses, image_embeddings, semantic_encoder],
    group_name="diagnosis",
    kinds={"pytorch", "safetensors"},
    owners=OWNERS,
    code_version="heads-v1",
    automation_condition=FOLLOW_UPSTREAM,
    description=(
        "An ensemble of small heads (regressor and pairwise ranker, linear and 2-layer MLP, 5 "
        "seeds each) trained as one batched computation to predict the per-sample loss from the "
        "image embedding; validated on a held-out split. Each member is saved on its own."
    ),
)
def diagnosis_heads(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    heads: HeadsResource,
    heads_device: DeviceResource,
) -> dg.MaterializeResult:
    result = steps.fit_heads(
        storage.layout(),
        heads.spec(),
        heads_device.spec(),
        progress=progress_logger(context, "head training"),
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={
            "n_members": len(result.member_metrics),
            "train_split": result.train_split,
            "eval_split": result.eval_split,
            "n_train": result.n_train,
            "n_eval": result.n_eval,
            "member_metrics": dg.MetadataValue.md(markdown_table(result.member_metrics)),
            "kind_metrics": dg.MetadataValue.md(markdown_table(result.kind_metrics)),
            "modality_gap_effect": dg.MetadataValue.md(markdown_table(result.gap_effect)),
            **float_metadata(result.headline),
            "heads_dir": dg.MetadataValue.path(str(result.path)),
        },
    )
