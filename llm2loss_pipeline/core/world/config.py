"""What a generated face world is: its size, its seed, and which attributes are made harder."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.choices import one_of

HAIR_COLOUR_TARGETS = ("Blond_Hair", "Black_Hair", "Brown_Hair", "Gray_Hair")
"""Targets whose cue `SpuriousConfig.attribute_hair` can weaken."""

ATTRIBUTE_HAIR = ("as_drawn", "buzz_cut")
"""world.spurious.attribute_hair (see `SpuriousConfig`)."""

GENERATOR_VERSION = 1
"""Bumped whenever the drawing or the sampling changes, so that a cached world is regenerated."""


class SpuriousConfig(BaseModel):
    """A spurious correlation between two identity-level attributes, the classic
    group-robustness failure (CelebA's blond men): `target` becomes rare among `attribute`-positive
    images of the train split, while valid and test stay closer to balanced.

    How (both attributes are fixed per identity, and every identity has images in every split):
      (1) among identities with `attribute`, `target` is drawn with rate `eval_rate` instead of
          its rule's rate (its exclusions still hold: a black-haired man is not blond), so the
          valid and test splits, whose images are never dropped, show the group at about that
          rate;
      (2) identities with both keep only a few of their train images: `K = train_rate /
          (1 - train_rate) * T` of them in all, where T counts the train images of identities
          with `attribute` but without `target`, spread as evenly as possible over those
          identities (some keep none). Among `attribute`-positive train images the target's
          share is then about `train_rate`.
    Dropped images are never generated. world.json records, per split, the target's rate among
    `attribute`-positive and -negative images. Identities may lose all their train images, so
    a spurious world is for attribute tasks (task.kind: attribute), not identity tasks.

    `attribute_hair` sets how much the target shows on `attribute` identities when the target
    is a hair colour (Blond_Hair, Black_Hair, Brown_Hair, Gray_Hair):
      - as_drawn (default): their hair is drawn as everyone's; the world is byte-identical to
        one made before the option existed;
      - buzz_cut: every `attribute` identity that is not bald wears a buzz cut: no hair below
        the crown, and a thin cap whose colour is 40% the hair colour and 60% the skin's (the
        scalp shows through; render.BUZZ_SKIN_SHARE), as are any bangs. Brows and facial hair
        (beard, moustache, goatee, sideburns, stubble) are drawn in the full hair colour, the
        few places it shows. The hair colour is then a weak cue on them, weaker than their
        gender cue, as with CelebA's men (short hair that shows little colour). Without it a
        small CNN reads the yellow of blond men's full-size hair and barely fails them (0.88
        against CelebA's 0.47; bench/RESULTS.md, "Spurious correlation").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="the identity-level attribute a classifier predicts")
    attribute: str = Field(description="the identity-level attribute it is confounded with")
    train_rate: float = Field(
        0.02, gt=0.0, lt=1.0, description="share of target among attribute images in train"
    )
    eval_rate: float = Field(
        0.4, gt=0.0, lt=1.0, description="rate of target among attribute identities (eval)"
    )
    attribute_hair: str = Field(
        "as_drawn",
        description="as_drawn, or buzz_cut: attribute identities' hair a thin, skin-mixed cap",
    )

    @field_validator("attribute_hair")
    @classmethod
    def _attribute_hair(cls, value: str) -> str:
        return one_of("attribute_hair", value, ATTRIBUTE_HAIR)

    @model_validator(mode="after")
    def _identity_level_pair(self) -> SpuriousConfig:
        # lazy: traits imports this module (boosted_rate), so it cannot be imported at its top
        from llm2loss_pipeline.core.world.traits import RULE_INDEX, RULES_BY_NAME

        for key in ("target", "attribute"):
            name = getattr(self, key)
            if name not in CELEBA_ATTRIBUTES:
                raise ValueError(
                    f"spurious.{key} {name!r} is not a CelebA attribute, e.g. 'Blond_Hair'"
                )
            if RULES_BY_NAME[name].level != "identity":
                raise ValueError(
                    f"spurious.{key} {name!r} is drawn per image; a spurious pair must be "
                    "fixed per identity (e.g. Male, Young, Blond_Hair, Gray_Hair)"
                )
        if self.target == self.attribute:
            raise ValueError(f"spurious.target and spurious.attribute are both {self.target!r}")
        if RULE_INDEX[self.attribute] > RULE_INDEX[self.target]:
            raise ValueError(
                f"spurious.target {self.target!r} is drawn before {self.attribute!r}, so it "
                "cannot depend on it; swap them or choose another pair"
            )
        if self.attribute_hair != "as_drawn":
            # it weakens the cue of a hair-colour target, so only such a target may have it
            one_of(
                f"spurious.target with attribute_hair {self.attribute_hair!r}",
                self.target,
                HAIR_COLOUR_TARGETS,
            )
        if self.train_rate >= self.eval_rate:
            raise ValueError(
                f"spurious.train_rate {self.train_rate} must be below eval_rate "
                f"{self.eval_rate}: the target is made rare in train"
            )
        return self

    @model_serializer(mode="wrap")
    def _default_hair_left_out(self, handler: Any) -> dict[str, Any]:
        # as _unset_spurious_left_out below: a spurious world made before `attribute_hair`
        # existed keeps its folder name (a hash of this JSON) and its world.json
        data = handler(self)
        if self.attribute_hair == "as_drawn":
            data.pop("attribute_hair", None)
        return data


class WorldConfig(BaseModel):
    """A generated world of cartoon faces, written in the exact CelebA folder layout.

    Every identity gets `images_per_identity` image slots, split per identity into train, valid and
    test by `split_fractions` (each split gets at least one image). The same config always gives
    byte-identical files.

    `hard_attributes` maps a CelebA attribute name to a strength `s` in [0, 1]. It makes images
    that HAVE the attribute harder for an identity classifier through the data alone (no loss is
    touched), while the attribute itself stays visible. For each such image, with
    `s` the largest strength among the image's positive hard attributes:

    (a) identity-cue corruption:
        - occluders: with probability `0.35 + 0.6*s`, `1 + round(2*s)` opaque or noise patches of
          size `(0.25 + 0.3*s)` face widths are drawn over identity cues (eyes, nose, mouth,
          forehead, cheeks, jaw), never over the region that shows the attribute itself, and
          before accessories (glasses, hats, earrings, necklaces, neckties) are drawn, so an
          occluded face still shows its eyeglasses;
        - identity traits are perturbed for that image: eye colour, background colour family,
          clothing colour and nose shape are redrawn with probability `0.5*s`; face proportions,
          eye spacing, mouth width and (except for Pale_Skin faces) skin tone are jittered by
          amounts proportional to `s`;
        - pixel noise with standard deviation `1.5 + 12*s` (0-255 scale) instead of 1.5, and a
          Gaussian blur of radius `0.7*s` pixels (per 64 pixels of image size; Blurry images use
          1.2-2.2);
        - pose jitter (shift, scale, rotation) multiplied by `1 + 1.5*s`.
    (b) the attribute's positive rate is raised: every non-zero rate `r` of its rule becomes
        `r + 0.5*s*max(0, 0.35 - r)`, so small groups become big enough to measure. Derived
        attributes (No_Beard) keep their rule.
    (c) fewer training images: an identity with a hard identity-level attribute keeps
        `max(1, round(n_train * (1 - 0.5*s)))` of its train images; for a hard image-level
        attribute, each identity drops `floor(0.5*s * k)` of its `k` train images that have it
        (keeping at least one train image). Dropped images are never generated; valid and test
        images are never dropped.

    world.json records, per hard attribute, these numbers and what they did (rates before and
    after, images affected, train images dropped).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_identities: int = Field(default=120, ge=2)
    images_per_identity: int = Field(default=30, ge=3)
    image_size: int = Field(default=64, ge=16, le=512)
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    hard_attributes: dict[str, float] = Field(default_factory=dict)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    spurious: SpuriousConfig | None = Field(
        default=None,
        description="a spurious correlation: {target, attribute, train_rate, eval_rate}",
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not (fraction > 0) for fraction in value):
            raise ValueError(f"every split fraction must be > 0, got {value}")
        if not math.isclose(sum(value), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, got {value} (sum {sum(value)})")
        return value

    @field_validator("hard_attributes")
    @classmethod
    def _known_attributes(cls, value: dict[str, float]) -> dict[str, float]:
        for name, strength in value.items():
            if name not in CELEBA_ATTRIBUTES:
                raise ValueError(
                    f"hard_attributes key {name!r} is not a CelebA attribute; "
                    "expected one of the 40 names, e.g. 'Eyeglasses'"
                )
            if not (0.0 <= strength <= 1.0):
                raise ValueError(
                    f"hard_attributes[{name!r}] = {strength} is outside [0, 1] (a strength)"
                )
        return dict(sorted(value.items()))

    @model_serializer(mode="wrap")
    def _unset_spurious_left_out(self, handler: Any) -> dict[str, Any]:
        # A world without `spurious` serializes as before the key existed: its folder name
        # (a hash of this JSON) and world.json stay byte-identical across versions.
        data = handler(self)
        if self.spurious is None:
            data.pop("spurious", None)
        return data

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train, valid and test counts for `n` images: rounded, then each split given at least one."""
    counts = [max(1, round(n * fraction)) for fraction in fractions]
    while sum(counts) > n:
        largest = max(range(3), key=lambda i: (counts[i], -i))
        if counts[largest] <= 1:
            break
        counts[largest] -= 1
    while sum(counts) < n:
        counts[0] += 1
    return counts[0], counts[1], counts[2]


@dataclass(frozen=True)
class HardEffect:
    """The concrete knobs that a hard-attribute strength turns (see WorldConfig)."""

    strength: float
    occlusion_probability: float
    occluder_count: int
    occluder_size: float
    trait_redraw_probability: float
    noise_sigma: float
    blur_radius_per_64px: float
    pose_jitter_scale: float
    train_fraction_kept: float

    @classmethod
    def of(cls, strength: float) -> HardEffect:
        s = float(strength)
        return cls(
            strength=s,
            occlusion_probability=0.0 if s <= 0 else min(1.0, 0.35 + 0.6 * s),
            occluder_count=1 + round(2 * s),
            occluder_size=0.25 + 0.3 * s,
            trait_redraw_probability=0.5 * s,
            noise_sigma=1.5 + 12.0 * s,
            blur_radius_per_64px=0.7 * s,
            pose_jitter_scale=1.0 + 1.5 * s,
            train_fraction_kept=1.0 - 0.5 * s,
        )

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


NO_HARDNESS = HardEffect.of(0.0)


def boosted_rate(rate: float, strength: float) -> float:
    """Effect (b): raise a non-zero positive rate towards 0.35, by half the way at strength 1."""
    if rate <= 0.0 or strength <= 0.0:
        return rate
    return rate + 0.5 * strength * max(0.0, 0.35 - rate)
