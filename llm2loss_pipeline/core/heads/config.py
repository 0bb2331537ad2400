"""Settings of the diagnosis-head ensemble `h` (paper section 2.1, equations 1-4).

The defaults were chosen by measurement, not taste: `target_scaling` by the held-out Spearman of the
regressor on planted heavy-tailed losses (numbers in `scaling.py`); the optimiser settings on three
planted problems (n=1,200/d=32, n=500/d=384, n=10,000/d=128): linear heads underfit at lr 1e-3
within a few hundred steps, mlp heads overfit after a few epochs, so the peak lr is 1e-2 with cosine
decay, every member keeps its best epoch on a 10% holdout of the training split, and `min_steps`
gives small splits enough steps. Held-out ensemble Spearman with these defaults was within 0.01 of
the oracle on the first and third problem (the second, n close to d, is limited by its data).

Fields are plain `str`/`int`/`float`/`list[str]` so that the Dagster resource derived from this
model (defs/resources.py) shows the same keys; the validators give the allowed values by name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llm2loss_pipeline.core.attributes import check_split
from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.members import ARCHS, KINDS

TARGET_SCALINGS: tuple[str, ...] = ("log1p", "raw", "rank")
GAP_MODES: tuple[str, ...] = ("center", "none")


def _unique_choices(field: str, values: list[str], allowed: tuple[str, ...]) -> list[str]:
    if not values:
        raise ValueError(f"{field} must name at least one of {list(allowed)}")
    unknown = [value for value in values if value not in allowed]
    if unknown:
        raise ValueError(f"{field}: unknown {unknown}; allowed values are {list(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field} lists a value twice: {values}")
    return list(values)


class HeadsConfig(BaseModel):
    """kinds x archs x seeds members, trained together as one batched computation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kinds: list[str] = Field(
        default_factory=lambda: list(KINDS),
        description="head objectives: regressor (MSE, eq. 1) and/or ranker (pairwise BCE, eq. 2-4)",
    )
    archs: list[str] = Field(
        default_factory=lambda: list(ARCHS),
        description="head architectures: linear and/or mlp (Linear-ReLU-Linear)",
    )
    n_seeds: int = Field(5, ge=1, le=100, description="members per kind and architecture")
    base_seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds are base_seed .. +n_seeds-1")
    hidden: int = Field(128, ge=1, le=8192, description="hidden width of the mlp heads")
    epochs: int = Field(10, ge=1, le=10_000, description="passes over the training split")
    min_steps: int = Field(
        200,
        ge=0,
        le=10_000_000,
        description="at least this many optimiser steps: a small split gets more epochs",
    )
    holdout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="share of the training split held back to pick each member's best epoch "
        "(early stopping on holdout Spearman); 0, or fewer than 32 samples, keeps the last epoch",
    )
    lr: float = Field(
        1e-2, gt=0.0, le=1.0, description="AdamW peak learning rate (cosine decay to 0)"
    )
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    batch_size: int = Field(
        256, ge=2, le=1_000_000, description="samples per step (one mini-batch all members share)"
    )
    bootstrap: bool = Field(
        True,
        description="each member trains on its own bootstrap resample of the training split "
        "(as sample weights), so the ensemble's spread includes the uncertainty of the data",
    )
    pairs_per_sample: int = Field(
        4, ge=1, le=1024, description="ranker: partners drawn for each sample of a batch"
    )
    target_scaling: str = Field(
        "rank",
        description="regressor target: rank (default, measured best), log1p, or raw loss; "
        "each is standardised with statistics fitted on the training split",
    )
    train_split: str = Field("valid", description="split the heads are trained on")
    eval_split: str = Field("test", description="split the heads are evaluated on")
    modality_gap: str = Field(
        "center",
        description="center: subtract each modality's mean embedding and renormalise; none",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        return _unique_choices("kinds", value, KINDS)

    @field_validator("archs")
    @classmethod
    def _archs(cls, value: list[str]) -> list[str]:
        return _unique_choices("archs", value, ARCHS)

    @field_validator("target_scaling")
    @classmethod
    def _scaling(cls, value: str) -> str:
        return one_of("target_scaling", value, TARGET_SCALINGS)

    @field_validator("modality_gap")
    @classmethod
    def _gap(cls, value: str) -> str:
        return one_of("modality_gap", value, GAP_MODES)

    @field_validator("train_split", "eval_split")
    @classmethod
    def _split(cls, value: str, info) -> str:
        return check_split(info.field_name, value)

    @model_validator(mode="after")
    def _distinct_splits(self) -> HeadsConfig:
        if self.train_split == self.eval_split:
            raise ValueError(
                f"train_split and eval_split are both {self.train_split!r}: the held-out "
                "evaluation needs a split the heads were not trained on"
            )
        return self

    @property
    def n_members(self) -> int:
        return len(self.kinds) * len(self.archs) * self.n_seeds

    def effective_epochs(self, n_samples: int) -> int:
        """`epochs`, raised so that training makes at least `min_steps` steps on n_samples."""
        steps_per_epoch = max(1, -(-n_samples // self.batch_size))
        return max(self.epochs, -(-self.min_steps // steps_per_epoch))
