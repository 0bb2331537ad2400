"""What the black box is trained and judged on: the task's kind and, for an attribute task, its
target. The diagnosis describes samples by attributes; an attribute that *is* the task's label
would explain every loss trivially, so it leaves the diagnosed attribute set (`diagnosed`)."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llm2loss_pipeline.core.choices import one_of

TASK_KINDS: tuple[str, ...] = ("identity", "attribute", "label")
"""identity: classify who is in the image (CelebA's identities, the generated world's people);
attribute: binary classification of one attribute column (`target`); label: a table's label
column (dataset.source table)."""


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field("identity", description="identity, attribute (needs target) or label")
    target: str | None = Field(
        None, description="attribute tasks: the attribute column the black box predicts"
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return one_of("kind", value, TASK_KINDS)

    @model_validator(mode="after")
    def _target(self) -> TaskConfig:
        if self.kind == "attribute" and not self.target:
            raise ValueError("task.kind 'attribute' needs task.target, the attribute to predict")
        if self.kind != "attribute" and self.target is not None:
            raise ValueError(
                f"task.target is only read when task.kind is 'attribute', not {self.kind!r}"
            )
        return self


def diagnosed(attributes: Iterable[str], task: TaskConfig) -> tuple[str, ...]:
    """The attributes the diagnosis describes samples by: all but the task's own target."""
    return tuple(name for name in attributes if name != task.target)
