"""Who the people of the generated world are: the attribute rules and each identity's traits.

`ATTRIBUTE_RULES` is the single place that says, for every CelebA attribute, whether it is fixed
per identity or drawn per image, its base rate, what it depends on, and how (or whether) it is
drawn. Sampling walks the table in order, so a rule may only depend on rules above it.
All 40 attributes are written to the files; all but Attractive are drawn (Oval_Face and
High_Cheekbones only lightly); Attractive is sampled from Young and Male alone.

Randomness is drawn so that changing one attribute's rate changes as little else as possible:
every identity draws one uniform per rule and a fixed vector of trait uniforms, every image one
uniform per rule, always the same count. A boosted rate therefore only turns some negatives
into positives, and identities or images that keep their attributes keep everything else.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.world.config import boosted_rate

Level = Literal["identity", "image", "derived"]
Region = Literal[
    "face", "eyes", "brows", "nose", "mouth", "cheeks", "jaw", "hair", "accessory", "image"
]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class AttributeRule:
    """How one attribute is sampled and drawn.

    when: ("Male & !Young", 0.3) pairs; the first condition that holds gives the rate, else `rate`.
    excludes: forced negative when any of these (sampled earlier) is positive.
    none_of: for a derived attribute, positive exactly when none of these is positive.
    region: where the attribute shows; identity-cue occluders of hard attributes avoid it.
    rendered: how it is drawn; empty when the attribute is sampled but not drawn.
    """

    name: str
    level: Level
    rate: float
    when: tuple[tuple[str, float], ...] = ()
    excludes: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    region: Region = "face"
    rendered: str = ""


def _rule(
    name: str, level: Level, rate: float, region: Region, rendered: str, **kw
) -> AttributeRule:
    return AttributeRule(name=name, level=level, rate=rate, region=region, rendered=rendered, **kw)


BEARD_ATTRIBUTES = ("5_o_Clock_Shadow", "Goatee", "Mustache", "Sideburns")

# fmt: off
ATTRIBUTE_RULES: tuple[AttributeRule, ...] = (
    # name, level, base rate, region; then how it is drawn ('' = not drawn), dependencies
    # ---- fixed per identity ----------------------------------------------------------------------
    _rule("Male", "identity", 0.45, "face",
          "squarer, wider jaw; short hair styles likelier; thicker brows; no lashes"),
    _rule("Young", "identity", 0.72, "face",
          "when negative: forehead lines, crow's feet and smile folds"),
    _rule("Attractive", "identity", 0.5, "face",
          "",
          when=(("Young & !Male", 0.7), ("Young", 0.55), ("!Male", 0.35))),
    _rule("Pale_Skin", "identity", 0.08, "face",
          "skin drawn from a very light, low-red palette"),
    _rule("Chubby", "identity", 0.08, "cheeks",
          "wider, rounder face with full jaw and cheeks",
          when=(("Male & !Young", 0.25),)),
    _rule("Double_Chin", "identity", 0.03, "jaw",
          "a second chin line and shadow under the jaw",
          when=(("Chubby", 0.6), ("!Young", 0.1))),
    _rule("Oval_Face", "identity", 0.3, "face",
          "narrower, smoothly tapering oval face (lightly rendered)",
          excludes=("Chubby",)),
    _rule("Big_Nose", "identity", 0.12, "nose",
          "nose drawn 1.5-1.8 times larger",
          when=(("Male", 0.35),)),
    _rule("Pointy_Nose", "identity", 0.3, "nose",
          "long triangular nose with a sharp tip",
          when=(("Male", 0.2),), excludes=("Big_Nose",)),
    _rule("Narrow_Eyes", "identity", 0.12, "eyes",
          "eye openings a third as tall"),
    _rule("Big_Lips", "identity", 0.15, "mouth",
          "lips drawn about twice as thick",
          when=(("!Male", 0.3),)),
    _rule("Bushy_Eyebrows", "identity", 0.06, "brows",
          "eyebrows about twice as thick and longer",
          when=(("Male", 0.3),)),
    _rule("Arched_Eyebrows", "identity", 0.05, "brows",
          "eyebrows drawn as high arches",
          when=(("!Male", 0.45),)),
    _rule("Bags_Under_Eyes", "identity", 0.1, "eyes",
          "dark double arcs under the eyes",
          when=(("!Young", 0.5),)),
    _rule("Bald", "identity", 0.0, "hair",
          "no hair on top, a shine on the scalp, hair at the sides",
          when=(("Male & !Young", 0.3), ("Male", 0.04), ("!Young", 0.01))),
    _rule("Receding_Hairline", "identity", 0.02, "hair",
          "hairline high with bare temples",
          when=(("Male & !Young", 0.35), ("Male", 0.08), ("!Young", 0.1)), excludes=("Bald",)),
    _rule("Gray_Hair", "identity", 0.01, "hair",
          "gray to white hair, beard and brows",
          when=(("!Young", 0.55),)),
    _rule("Black_Hair", "identity", 0.3, "hair",
          "near-black hair",
          excludes=("Gray_Hair",)),
    _rule("Blond_Hair", "identity", 0.15, "hair",
          "yellow to light-golden hair",
          when=(("!Male", 0.4),), excludes=("Gray_Hair", "Black_Hair")),
    _rule("Brown_Hair", "identity", 0.55, "hair",
          "brown hair (with no hair colour positive the hair is ginger or auburn)",
          excludes=("Gray_Hair", "Black_Hair", "Blond_Hair")),
    _rule("Straight_Hair", "identity", 0.3, "hair",
          "smooth hair outline with long strands",
          excludes=("Bald",)),
    _rule("Wavy_Hair", "identity", 0.2, "hair",
          "sinusoidal hair outline and curls",
          when=(("!Male", 0.55),), excludes=("Bald", "Straight_Hair")),
    _rule("Bangs", "identity", 0.1, "hair",
          "a fringe over the forehead",
          when=(("!Male", 0.3),), excludes=("Bald", "Receding_Hairline")),
    _rule("Goatee", "identity", 0.0, "jaw",
          "beard patch on the chin, hair-coloured",
          when=(("Male", 0.18),)),
    _rule("Mustache", "identity", 0.0, "mouth",
          "hair-coloured band over the upper lip",
          when=(("Male & Goatee", 0.5), ("Male", 0.1))),
    _rule("Sideburns", "identity", 0.0, "jaw",
          "hair-coloured strips down the face sides",
          when=(("Male", 0.15),)),
    # ---- drawn per image -------------------------------------------------------------------------
    _rule("5_o_Clock_Shadow", "image", 0.0, "jaw",
          "gray-blue tint and stubble dots on the jaw",
          when=(("Male", 0.22),)),
    _rule("No_Beard", "derived", 0.0, "jaw",
          "positive exactly when none of the beard attributes is drawn",
          none_of=BEARD_ATTRIBUTES),
    _rule("Smiling", "image", 0.48, "mouth",
          "upturned mouth, raised cheeks, slightly closed eyes"),
    _rule("Mouth_Slightly_Open", "image", 0.3, "mouth",
          "dark mouth opening with teeth",
          when=(("Smiling", 0.65),)),
    _rule("High_Cheekbones", "image", 0.15, "cheeks",
          "light highlight over and shadow under the cheekbones (lightly rendered)",
          when=(("Smiling", 0.7),)),
    _rule("Heavy_Makeup", "image", 0.01, "eyes",
          "eyeshadow, thick eyeliner, lashes, blush",
          when=(("!Male", 0.55),)),
    _rule("Wearing_Lipstick", "image", 0.005, "mouth",
          "red, pink or wine coloured lips",
          when=(("Heavy_Makeup", 0.9), ("!Male", 0.3))),
    _rule("Rosy_Cheeks", "image", 0.06, "cheeks",
          "pink blush ellipses on the cheeks",
          when=(("Heavy_Makeup", 0.25), ("Pale_Skin", 0.25))),
    _rule("Eyeglasses", "image", 0.1, "accessory",
          "round, rectangular or cat-eye frames (15% dark sunglasses), drawn over any occluder",
          when=(("!Young", 0.22),)),
    _rule("Wearing_Hat", "image", 0.08, "accessory",
          "cap, beanie, fedora or sun hat on the head"),
    _rule("Wearing_Earrings", "image", 0.02, "accessory",
          "hoops, studs or drops at the ear lobes",
          when=(("!Male", 0.4),)),
    _rule("Wearing_Necklace", "image", 0.02, "accessory",
          "a chain or beads with a pendant",
          when=(("!Male", 0.22),)),
    _rule("Wearing_Necktie", "image", 0.01, "accessory",
          "white collar and a coloured tie",
          when=(("Male", 0.18),)),
    _rule("Blurry", "image", 0.06, "image",
          "Gaussian blur of radius 1.2-2.2 px per 64 px"),
)
# fmt: on

RULES_BY_NAME: dict[str, AttributeRule] = {rule.name: rule for rule in ATTRIBUTE_RULES}
RULE_INDEX: dict[str, int] = {rule.name: i for i, rule in enumerate(ATTRIBUTE_RULES)}
RENDERED_ATTRIBUTES: tuple[str, ...] = tuple(r.name for r in ATTRIBUTE_RULES if r.rendered)
UNRENDERED_ATTRIBUTES: tuple[str, ...] = tuple(r.name for r in ATTRIBUTE_RULES if not r.rendered)


def _parse_condition(text: str) -> tuple[tuple[str, bool], ...]:
    terms = []
    for raw in text.split("&"):
        term = raw.strip()
        positive = not term.startswith("!")
        terms.append((term.lstrip("!").strip(), positive))
    return tuple(terms)


def _check_table() -> dict[str, tuple[tuple[tuple[tuple[str, bool], ...], float], ...]]:
    """Fail at import if the table misses an attribute or depends on a rule sampled later."""
    if sorted(RULES_BY_NAME) != sorted(CELEBA_ATTRIBUTES) or len(ATTRIBUTE_RULES) != 40:
        raise AssertionError("ATTRIBUTE_RULES must hold each of the 40 CelebA attributes once")
    parsed = {}
    for index, rule in enumerate(ATTRIBUTE_RULES):
        conditions = tuple((_parse_condition(text), rate) for text, rate in rule.when)
        names = [n for terms, _ in conditions for n, _ in terms] + [*rule.excludes, *rule.none_of]
        for name in names:
            if name not in RULE_INDEX or RULE_INDEX[name] >= index:
                raise AssertionError(f"rule {rule.name} depends on {name}, not sampled before it")
            if rule.level == "identity" and RULES_BY_NAME[name].level != "identity":
                raise AssertionError(f"identity rule {rule.name} depends on image rule {name}")
        parsed[rule.name] = conditions
    return parsed


_CONDITIONS = _check_table()


def rule_rate(rule: AttributeRule, known: Mapping[str, bool]) -> float:
    """The rule's positive rate given the attributes sampled so far (before any boost)."""
    if any(known[name] for name in rule.excludes):
        return 0.0
    for terms, rate in _CONDITIONS[rule.name]:
        if all(known[name] == positive for name, positive in terms):
            return rate
    return rule.rate


def sample_attributes(
    level: Literal["identity", "image"],
    uniforms: np.ndarray,
    known: Mapping[str, bool],
    boosts: Mapping[str, float],
    spurious: tuple[str, str, float] | None = None,
) -> dict[str, bool]:
    """Sample the rules of one level; `uniforms` holds one draw per rule, indexed by table order.

    `spurious` = (target, attribute, rate): where `attribute` is positive, `target` is drawn with
    `rate` (its exclusions still hold) instead of its rule's (boosted) rate; see SpuriousConfig.
    The same uniforms are drawn either way, so nothing else changes."""
    values = dict(known)
    for index, rule in enumerate(ATTRIBUTE_RULES):
        if rule.level == "derived" and level == "image":
            values[rule.name] = not any(values[name] for name in rule.none_of)
        elif rule.level == level:
            rate = boosted_rate(rule_rate(rule, values), boosts.get(rule.name, 0.0))
            if spurious is not None and rule.name == spurious[0] and values[spurious[1]]:
                excluded = any(values[name] for name in rule.excludes)
                rate = 0.0 if excluded else spurious[2]
            values[rule.name] = bool(uniforms[index] < rate)
    return values


# ---- identity traits ---------------------------------------------------------------------------

SKIN_TONES: tuple[RGB, ...] = (
    (246, 214, 190),
    (236, 196, 164),
    (226, 180, 142),
    (208, 160, 118),
    (186, 134, 96),
    (160, 110, 74),
    (124, 82, 54),
    (92, 60, 42),
)
PALE_TONES: tuple[RGB, ...] = ((252, 236, 226), (248, 232, 228), (244, 238, 234))
EYE_COLOURS: tuple[RGB, ...] = (
    (92, 58, 32),
    (48, 30, 22),
    (56, 110, 176),
    (64, 126, 72),
    (130, 100, 44),
    (110, 124, 136),
)
HAIR_COLOURS: dict[str, tuple[RGB, ...]] = {
    "Black_Hair": ((22, 18, 18), (34, 26, 24), (16, 16, 24)),
    "Brown_Hair": ((96, 60, 32), (118, 78, 44), (78, 50, 30), (136, 96, 58)),
    "Blond_Hair": ((232, 204, 124), (222, 186, 102), (240, 220, 160)),
    "Gray_Hair": ((168, 168, 168), (196, 194, 190), (140, 140, 144), (220, 220, 216)),
    "other": ((170, 72, 34), (122, 46, 30), (196, 112, 64), (146, 84, 70)),
}
MALE_STYLES = (("crop", 0.3), ("side_part", 0.27), ("spiky", 0.15), ("curly", 0.16), ("long", 0.12))
FEMALE_STYLES = (("long", 0.42), ("bob", 0.22), ("bun", 0.14), ("curly", 0.12), ("side_part", 0.1))
NOSE_SHAPES = ("triangle", "round", "hook", "button")
BROW_SHAPES = ("straight", "angled", "soft")
GLASSES_STYLES = ("round", "rect", "cat")
BACKGROUND_FAMILIES = 10

TRAIT_DRAWS: tuple[str, ...] = (
    "face_ratio",
    "jaw",
    "square",
    "skin",
    "skin_jitter",
    "eye_spacing",
    "eye_y",
    "eye_size",
    "eye_colour",
    "nose_shape",
    "nose_size",
    "mouth_width",
    "brow_shape",
    "brow_thickness",
    "hair_style",
    "hair_shade",
    "hair_jitter",
    "ear_size",
    "bg_family",
    "bg_hue",
    "bg_sat",
    "clothing_hue",
    "clothing_val",
    "mole",
    "mole_u",
    "mole_v",
    "freckles",
    "glasses_style",
    "glasses_colour",
    "tilt",
    "part_side",
    "lip",
)


@dataclass(frozen=True)
class IdentityTraits:
    """What makes one identity recognisable; fixed across its images (up to per-image noise)."""

    identity: int
    attributes: Mapping[str, bool]
    face_ratio: float
    jaw: float
    squareness: float
    skin: RGB
    eye_spacing: float
    eye_y: float
    eye_size: float
    eye_colour: RGB
    nose_shape: str
    nose_size: float
    mouth_width: float
    lip_colour: RGB
    brow_shape: str
    brow_thickness: float
    hair_style: str
    hair_colour: RGB
    ear_size: float
    bg_family: int
    bg_hue: float
    bg_saturation: float
    clothing: RGB
    mole: tuple[float, float] | None
    freckles: bool
    glasses_style: str
    glasses_colour: RGB
    tilt: float
    part_side: int


T = TypeVar("T")


def _pick(u: float, options: Sequence[T]) -> T:
    return options[min(int(u * len(options)), len(options) - 1)]


def _pick_weighted(u: float, options: tuple[tuple[str, float], ...]) -> str:
    total = sum(weight for _, weight in options)
    acc = 0.0
    for name, weight in options:
        acc += weight / total
        if u < acc:
            return name
    return options[-1][0]


def _jitter(colour: Sequence[float], amount: float, u: float) -> RGB:
    shift = (u - 0.5) * 2 * amount
    r, g, b = (int(min(255.0, max(0.0, c + shift))) for c in colour[:3])
    return r, g, b


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def hair_colour_name(attributes: Mapping[str, bool]) -> str:
    for name in ("Gray_Hair", "Black_Hair", "Blond_Hair", "Brown_Hair"):
        if attributes.get(name):
            return name
    return "other"


def identity_traits(
    identity: int, attributes: Mapping[str, bool], draws: np.ndarray
) -> IdentityTraits:
    """Map an identity's attributes and its fixed trait draws to concrete drawing parameters."""
    d = dict(zip(TRAIT_DRAWS, (float(x) for x in draws), strict=True))
    male, chubby = attributes["Male"], attributes["Chubby"]

    face_ratio = 0.76 + 0.1 * d["face_ratio"] + (0.03 if male else 0.0)
    face_ratio += 0.08 if chubby else 0.0
    face_ratio -= 0.05 if attributes["Oval_Face"] else 0.0
    jaw = (0.7 + 0.15 * d["jaw"]) if male else (0.56 + 0.14 * d["jaw"])
    jaw = min(0.95, jaw + (0.14 if chubby else 0.0))
    squareness = (2.3 + 0.6 * d["square"]) if male else (2.0 + 0.3 * d["square"])
    if attributes["Oval_Face"]:
        squareness, jaw = 2.0, min(jaw, 0.6)

    if attributes["Pale_Skin"]:
        skin = _jitter(_pick(d["skin"], PALE_TONES), 4, d["skin_jitter"])
    else:
        skin = _jitter(_pick(d["skin"], SKIN_TONES), 10, d["skin_jitter"])

    style = _pick_weighted(d["hair_style"], MALE_STYLES if male else FEMALE_STYLES)
    if attributes["Bald"]:
        style = "bald"
    elif attributes["Straight_Hair"] and style == "curly":
        style = "side_part" if male else "long"
    elif attributes["Wavy_Hair"] and style in ("spiky", "bun"):
        style = "curly"
    colour_name = hair_colour_name(attributes)
    hair = _jitter(_pick(d["hair_shade"], HAIR_COLOURS[colour_name]), 8, d["hair_jitter"])

    nose_shape = "pointy" if attributes["Pointy_Nose"] else str(_pick(d["nose_shape"], NOSE_SHAPES))
    nose_size = (
        (1.5 + 0.3 * d["nose_size"]) if attributes["Big_Nose"] else 0.8 + 0.3 * d["nose_size"]
    )
    if attributes["Arched_Eyebrows"]:
        brow_shape = "arched"
    else:
        brow_shape = str(_pick(d["brow_shape"], BROW_SHAPES))
    brow_thickness = 0.75 + 0.35 * d["brow_thickness"] + (0.2 if male else 0.0)
    if attributes["Bushy_Eyebrows"]:
        brow_thickness = 1.9 + 0.4 * d["brow_thickness"]

    family = min(int(d["bg_family"] * BACKGROUND_FAMILIES), BACKGROUND_FAMILIES - 1)
    lip_base = (np.array(skin, dtype=float) * 0.65 + np.array([196, 96, 96]) * 0.35) * 0.88
    lip = _jitter(lip_base.tolist(), 10, d["lip"])

    return IdentityTraits(
        identity=identity,
        attributes=dict(attributes),
        face_ratio=face_ratio,
        jaw=jaw,
        squareness=squareness,
        skin=skin,
        eye_spacing=0.36 + 0.13 * d["eye_spacing"],
        eye_y=-0.1 + 0.12 * d["eye_y"],
        eye_size=0.85 + 0.35 * d["eye_size"] - (0.1 if chubby else 0.0),
        eye_colour=_pick(d["eye_colour"], EYE_COLOURS),
        nose_shape=nose_shape,
        nose_size=nose_size,
        mouth_width=0.3 + 0.16 * d["mouth_width"],
        lip_colour=lip,
        brow_shape=brow_shape,
        brow_thickness=brow_thickness,
        hair_style=style,
        hair_colour=hair,
        ear_size=0.8 + 0.45 * d["ear_size"],
        bg_family=family,
        bg_hue=(family + 0.6 * d["bg_hue"]) / BACKGROUND_FAMILIES,
        bg_saturation=0.18 + 0.3 * d["bg_sat"],
        clothing=hsv(d["clothing_hue"], 0.55, 0.3 + 0.6 * d["clothing_val"]),
        mole=(-0.6 + 1.2 * d["mole_u"], 0.1 + 0.6 * d["mole_v"]) if d["mole"] < 0.25 else None,
        freckles=d["freckles"] < 0.15 and not attributes["Pale_Skin"] and skin[0] > 200,
        glasses_style=str(_pick(d["glasses_style"], GLASSES_STYLES)),
        glasses_colour=_pick(
            d["glasses_colour"], ((20, 20, 20), (96, 58, 30), (170, 170, 176), (150, 30, 40))
        ),
        tilt=(d["tilt"] - 0.5) * 6.0,
        part_side=1 if d["part_side"] < 0.5 else -1,
    )
