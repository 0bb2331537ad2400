"""Dagster resources generated from the core configuration models.

The pydantic models in `core/` are the single source of truth for every setting (name, default,
range). Each resource class here is derived from one of them field by field, so the launchpad shows
the same keys as the YAML file, and `spec()` re-validates the values through the core model (a bad
value typed in the launchpad fails with the same message as in the YAML).
"""

from __future__ import annotations

import types
from typing import Any, ClassVar, Union, get_args, get_origin

import dagster as dg
from pydantic import BaseModel, Field, create_model

from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.config import DatasetConfig, PipelineConfig, ReportConfig
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.discovery.config import DiscoverySettings, ProposerConfig
from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import ensure_writable_dir, resolve_home
from llm2loss_pipeline.core.task import TaskConfig
from llm2loss_pipeline.core.world.config import WorldConfig


class _SettingsResource(dg.ConfigurableResource):
    model: ClassVar[type[BaseModel]]

    def spec(self) -> Any:
        return self.model.model_validate(self.model_dump())


def _settings_resource(
    model: type[BaseModel],
    name: str,
    doc: str,
    base: type[_SettingsResource] = _SettingsResource,
    values: BaseModel | None = None,
) -> type[_SettingsResource]:
    """A resource class with `model`'s fields, defaulting to `values` (else the model's)."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        default = (
            getattr(values, field_name)
            if values is not None
            else info.get_default(call_default_factory=True)
        )
        # Dagster config has lists, not fixed-length tuples; the core model turns them back.
        if get_origin(annotation) is tuple:
            annotation = list[annotation.__args__[0]]  # type: ignore[union-attr]
            default = list(default)
        nested = _optional_model(annotation)
        if nested is not None:  # e.g. world.spurious: a nested section of its own keys
            annotation, default = _nested_config(nested, default)
        # A nested section's default is given as a dict (what Dagster's schema takes) and
        # validated into the section, so the resource holds the same type it is set with.
        field = Field(default=default, description=info.description, validate_default=bool(nested))
        fields[field_name] = (annotation, field)
    resource = create_model(name, __base__=base, __doc__=doc, **fields)
    resource.model = model
    resource.__module__ = __name__
    return resource


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """`M` for an annotation `M | None` (or `M`) where M is a pydantic model, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
            return members[0]
    return None


def _nested_config(model: type[BaseModel], default: Any) -> tuple[Any, Any]:
    """Dagster config cannot hold a plain pydantic model: an optional dg.Config with its fields
    (the core model validates the values again in spec())."""
    fields = {
        name: (info.annotation, Field(default=info.default, description=info.description))
        if not info.is_required()
        else (info.annotation, Field(description=info.description))
        for name, info in model.model_fields.items()
    }
    config = create_model(f"{model.__name__}Section", __base__=dg.Config, **fields)
    config.__module__ = __name__
    value = None if default is None else default.model_dump()
    return config | None, value


WorldResource = _settings_resource(
    WorldConfig,
    "WorldResource",
    "The generated face world (used when dataset.source is generated).",
)
DatasetResource = _settings_resource(
    DatasetConfig, "DatasetResource", "Which images to diagnose and how they are sharded."
)
TaskResource = _settings_resource(
    TaskConfig,
    "TaskResource",
    "What the black box predicts: identity, an attribute (target) or a table's label column.",
)
BlackBoxResource = _settings_resource(
    BlackBoxConfig, "BlackBoxResource", "The model under diagnosis and its task loss."
)
EncoderResource = _settings_resource(
    EncoderConfig, "EncoderResource", "The language-compatible encoder g (open_clip)."
)
HeadsResource = _settings_resource(
    HeadsConfig, "HeadsResource", "The ensemble of diagnosis heads h."
)
ReportResource = _settings_resource(
    ReportConfig, "ReportResource", "How disparities are measured and judged."
)
DiscoveryResource = _settings_resource(
    DiscoverySettings,
    "DiscoveryResource",
    "How failure hypotheses are generated, matched to samples and judged.",
)
ProposerResource = _settings_resource(
    ProposerConfig,
    "ProposerResource",
    "The optional language model that proposes descriptions (OpenAI-compatible endpoint).",
)
DeviceResource = _settings_resource(
    DeviceSpec,
    "DeviceResource",
    "Where a model-running asset runs: device (cpu, cuda, cuda:N, auto), precision, batching.",
)


class StorageResource(dg.ConfigurableResource):
    """The artifact root. Empty means $LLM2LOSS_HOME, else ./.llm2loss."""

    home: str = Field("", description="artifact root; empty: $LLM2LOSS_HOME or ./.llm2loss")

    def layout(self) -> Layout:
        layout = Layout(resolve_home(self.home or None))
        ensure_writable_dir(layout.home)
        return layout


DEVICE_KEYS = {
    "black_box": "black_box_device",
    "encoder": "encoder_device",
    "losses": "losses_device",
    "embeddings": "embeddings_device",
    "heads": "heads_device",
}


def configured(resource: type[_SettingsResource], values: BaseModel) -> _SettingsResource:
    """An instance of a subclass of `resource` whose field defaults are `values`.

    Run config replaces a resource's configuration as a whole, and keys it leaves out take the
    class defaults; with the configured values as the defaults, a launchpad edit of one key keeps
    every other value of the YAML file.
    """
    subclass = _settings_resource(
        resource.model, resource.__name__, resource.__doc__ or "", base=resource, values=values
    )
    return subclass()


def build_resources(config: PipelineConfig) -> dict[str, Any]:
    """Resource instances for one validated configuration."""
    resources: dict[str, Any] = {
        "storage": StorageResource(home=config.home or ""),
        "dataset": configured(DatasetResource, config.dataset),
        "world": configured(WorldResource, config.world),
        "task": configured(TaskResource, config.task),
        "black_box": configured(BlackBoxResource, config.black_box),
        "encoder": configured(EncoderResource, config.encoder),
        "heads": configured(HeadsResource, config.heads),
        "report": configured(ReportResource, config.report),
        "discovery": configured(DiscoveryResource, config.discovery),
        "discovery_proposer": configured(ProposerResource, config.discovery.proposer),
    }
    for section, key in DEVICE_KEYS.items():
        resources[key] = configured(DeviceResource, getattr(config.devices, section))
    return resources
