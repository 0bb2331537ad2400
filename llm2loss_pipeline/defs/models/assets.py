"""Model assets: the black box under diagnosis and the language-compatible encoder."""

# No `from __future__ import annotations` here: Dagster inspects the `context` annotation.
import dagster as dg

from llm2loss_pipeline.core.steps import black_box as black_box_steps
from llm2loss_pipeline.core.steps import encoder as encoder_steps
from llm2loss_pipeline.defs.data.assets import OWNERS, celeba_attributes, dataset_manifest
from llm2loss_pipeline.defs.metadata import float_metadata, markdown_table, png_markdown
from llm2loss_pipeline.defs.placement import GPU_OP_TAGS, GPU_POOL
from llm2loss_pipeline.defs.preflight import SETTINGS_KEYS, preflight_once
from llm2loss_pipeline.defs.progress import progress_logger


@dg.asset(
    # celeba_attributes: an attribute task's labels are read from it (core/blackbox/task_labels)
    deps=[dataset_manifest, celeba_attributes],
    group_name="models",
    kinds={"pytorch", "safetensors"},
    owners=OWNERS,
    code_version="black-box-v1",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    required_resource_keys=SETTINGS_KEYS,
    description=(
        "The model f under diagnosis: the built-in classifier of the task (identity, an "
        "attribute or a table's label) trained on the train split, the user's own model (entry "
        "point or TorchScript), or a ready loss table. Saved as safetensors with a JSON sidecar "
        "(architecture, label map, task, sha256, curves); its data version joins the task."
    ),
)
def black_box_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    preflight_once(context)  # a run may start here (the manifest is already materialized)
    resources = context.resources
    result = black_box_steps.fit_black_box(
        resources.storage.layout(),
        resources.black_box.spec(),
        resources.black_box_device.spec(),
        progress=progress_logger(context, "black box training"),
        on_bad_image=resources.dataset.spec().on_bad_image,
        task=resources.task.spec(),
    )
    metadata = {
        "source": result.source,
        "task": dg.MetadataValue.json(result.task.model_dump(mode="json")),
        "checkpoint": dg.MetadataValue.path(str(result.path)),
        "sha256": result.sha256,
        **float_metadata(result.metrics),
    }
    if result.curve:
        metadata["training_curve"] = dg.MetadataValue.md(markdown_table(result.curve))
    if result.curve_png:
        metadata["training_curve_plot"] = png_markdown(result.curve_png, "training curve")
    return dg.MaterializeResult(data_version=dg.DataVersion(result.data_version), metadata=metadata)


@dg.asset(
    deps=[dataset_manifest, celeba_attributes],
    group_name="models",
    kinds={"pytorch", "safetensors"},
    owners=OWNERS,
    code_version="encoder-v1",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    required_resource_keys=SETTINGS_KEYS,
    description=(
        "The encoder g (image tower) and g~ (text tower): a pretrained open_clip model, or the "
        "offline default whose frozen text tower is all-MiniLM-L6-v2 and whose small image tower "
        "is trained contrastively on attribute captions. Saved as an open_clip-loadable folder."
    ),
)
def semantic_encoder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    preflight_once(context)  # before training: the black box may not have been checked yet
    resources = context.resources
    result = encoder_steps.fit_encoder(
        resources.storage.layout(),
        resources.encoder.spec(),
        resources.encoder_device.spec(),
        progress=progress_logger(context, "encoder training"),
        on_bad_image=resources.dataset.spec().on_bad_image,
    )
    metadata = {
        "mode": result.mode,
        "checkpoint": dg.MetadataValue.path(str(result.path)),
        "sha256": result.sha256,
        "embedding_dim": result.embed_dim,
        **({"train_precision": result.train_precision} if result.train_precision else {}),
        "load_with_open_clip": dg.MetadataValue.md(f"```python\n{result.load_snippet}\n```"),
        **float_metadata(result.metrics),
    }
    if result.zero_shot_auroc:
        rows = [
            {"attribute": name, "zero_shot_auroc": value}
            for name, value in sorted(result.zero_shot_auroc.items(), key=lambda kv: -kv[1])
        ]
        metadata["zero_shot_auroc"] = dg.MetadataValue.md(markdown_table(rows))
    return dg.MaterializeResult(data_version=dg.DataVersion(result.sha256), metadata=metadata)
