"""The 40 CelebA attributes, in the order of CelebA's `list_attr_celeba.txt` header."""

from __future__ import annotations

from collections.abc import Iterable

from llm2loss_pipeline.core.choices import one_of

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

assert len(CELEBA_ATTRIBUTES) == 40

SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
"""CelebA's `list_eval_partition.txt` codes 0, 1, 2, in that order."""


def check_split(field: str, value: str) -> str:
    """`value` if it names a split; else a ValueError naming the setting."""
    return one_of(field, value, SPLIT_NAMES)


NOT_ATTRIBUTES: tuple[str, ...] = ("sample_id",)
"""The attribute table's columns that are not attributes."""


def attribute_columns(columns: Iterable[str]) -> tuple[str, ...]:
    """The attribute names among an attribute table's columns, in the table's order: a dataset's
    attributes are what its table holds (CelebA's 40, or a table dataset's own)."""
    return tuple(name for name in columns if name not in NOT_ATTRIBUTES)


def check_attribute(name: str) -> str:
    """`name` if it is one of CelebA's 40 (the CelebA reader and the generated world)."""
    if name not in CELEBA_ATTRIBUTES:
        raise ValueError(
            f"unknown attribute {name!r}; expected one of the 40 CelebA names, e.g. 'Eyeglasses'"
        )
    return name
