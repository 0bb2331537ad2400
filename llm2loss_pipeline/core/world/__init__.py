"""A generated world of cartoon faces in the CelebA layout, with known identities and attributes."""

from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.contact_sheet import contact_sheet
from llm2loss_pipeline.core.world.generate import WorldSummary, generate_world, plan_world
from llm2loss_pipeline.core.world.traits import (
    ATTRIBUTE_RULES,
    RENDERED_ATTRIBUTES,
    UNRENDERED_ATTRIBUTES,
    AttributeRule,
)

__all__ = [
    "ATTRIBUTE_RULES",
    "RENDERED_ATTRIBUTES",
    "UNRENDERED_ATTRIBUTES",
    "AttributeRule",
    "WorldConfig",
    "WorldSummary",
    "contact_sheet",
    "generate_world",
    "plan_world",
]
