"""How the black box `f` is obtained: trained here, the user's own model, or a ready loss table."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llm2loss_pipeline.core.choices import one_of

ENTRY_POINT_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")

SOURCES = ("builtin", "entry_point", "torchscript", "loss_table")
ARCHITECTURES = ("small_cnn", "resnet18")
TASK_LOSS_NAMES = ("cross_entropy", "nll")
NONFINITE_ACTIONS = ("error", "drop")


class BlackBoxConfig(BaseModel):
    """Where `f` comes from and which per-sample task loss it is judged by.

    source:
      - builtin: an identity classifier trained by the pipeline (`arch`, `epochs`, ... apply);
      - entry_point: `package.module:function` returning a torch module, or (module, preprocess);
      - torchscript: a `torch.jit.save` archive at `torchscript_path`;
      - loss_table: a Parquet/CSV table of per-sample losses at `loss_table_path`, for a model
        that cannot run in-process.

    loss is the per-sample task loss `l(f(x), y)` whose values the diagnosis heads learn to
    predict: `cross_entropy` takes the model's outputs as logits; `nll` takes them as
    log-probabilities (a model ending in log_softmax). Other task losses slot in beside them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("builtin", description="builtin, entry_point, torchscript or loss_table")

    # the built-in classifier
    arch: str = Field("small_cnn", description="small_cnn (CPU, generated world) or resnet18")
    image_size: int = Field(64, ge=16, le=1024, description="square input side in pixels")
    epochs: int = Field(16, ge=1, le=1000)
    lr: float = Field(4e-3, gt=0.0, le=10.0, description="peak learning rate (AdamW, one-cycle)")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    batch_size: int = Field(64, ge=2, le=65536)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augment: bool = Field(True, description="random shifted crops and horizontal flips")
    width: int = Field(32, ge=4, le=512, description="small_cnn channels of its first stage")
    cpu_threads: int = Field(
        1,
        ge=0,
        le=1024,
        description="torch threads for CPU training and the loss pass (0: torch's default). "
        "One thread is fastest on shared cores: OpenMP threads spin-wait for each other, and "
        "with other processes on the same cores that wait dominates (15x slower measured)",
    )

    # the user's own model
    entry_point: str | None = Field(None, description="'package.module:function'")
    torchscript_path: str | None = Field(None, description="a torch.jit.save archive")
    label_map_path: str | None = Field(
        None,
        description="JSON object {identity: output index} or 2-column CSV; "
        "default: sorted train identities -> 0..C-1",
    )

    # a ready loss table
    loss_table_path: str | None = Field(None, description="Parquet or CSV: sample_id, loss, ...")

    loss: str = Field("cross_entropy", description="the per-sample task loss")
    nonfinite: str = Field(
        "error", description="error, or drop samples whose loss is NaN/inf (and report them)"
    )

    @field_validator("source", "arch", "loss", "nonfinite")
    @classmethod
    def _choice(cls, value: str, info) -> str:
        allowed = {
            "source": SOURCES,
            "arch": ARCHITECTURES,
            "loss": TASK_LOSS_NAMES,
            "nonfinite": NONFINITE_ACTIONS,
        }[info.field_name]
        return one_of(info.field_name, value, allowed)

    @model_validator(mode="after")
    def _source_has_its_inputs(self) -> BlackBoxConfig:
        needed = {
            "entry_point": "entry_point",
            "torchscript": "torchscript_path",
            "loss_table": "loss_table_path",
        }.get(self.source)
        if needed is not None and not getattr(self, needed):
            raise ValueError(f"source {self.source!r} needs {needed} to be set")
        if self.entry_point is not None and not ENTRY_POINT_PATTERN.match(self.entry_point):
            raise ValueError(
                f"entry_point must look like 'package.module:function', got {self.entry_point!r}"
            )
        return self
