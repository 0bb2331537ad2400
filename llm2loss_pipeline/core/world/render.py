"""Drawing one cartoon face with PIL, from an identity's traits and an image's attributes.

The face is drawn at `supersample` times the output size on a canvas with a margin, then
box-downscaled (which antialiases every edge), rotated about the face centre and cropped.
Positions are given in face units: `u` across (1 = half the face width), `v` down (1 = half the
face height), both from the face centre.

Each drawing component takes its randomness from its own stream, seeded by (world seed,
identity, image slot, component name), so whether one component is drawn never shifts the
random numbers of another: an image whose attributes do not change renders the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llm2loss_pipeline.core.world.config import HardEffect
from llm2loss_pipeline.core.world.traits import (
    EYE_COLOURS,
    NOSE_SHAPES,
    RGB,
    IdentityTraits,
    hsv,
)

Point = tuple[float, float]

OCCLUDER_TARGETS: dict[str, tuple[float, float, float]] = {
    # name: (u, v, width factor); the eye targets move with the identity's eye position
    "eye_left": (-0.42, -0.04, 0.8),
    "eye_right": (0.42, -0.04, 0.8),
    "eyes": (0.0, -0.04, 1.6),
    "nose": (0.0, 0.22, 0.7),
    "mouth": (0.0, 0.62, 1.0),
    "forehead": (0.0, -0.55, 1.4),
    "cheek_left": (-0.58, 0.35, 0.8),
    "cheek_right": (0.58, 0.35, 0.8),
    "jaw": (0.0, 0.88, 1.2),
}
PROTECTED_TARGETS: dict[str, tuple[str, ...]] = {
    # region of an attribute (traits.AttributeRule.region) -> occluder targets that would hide it
    "eyes": ("eye_left", "eye_right", "eyes"),
    "brows": ("eye_left", "eye_right", "eyes", "forehead"),
    "nose": ("nose",),
    "mouth": ("mouth", "jaw"),
    "cheeks": ("cheek_left", "cheek_right"),
    "jaw": ("jaw", "mouth", "cheek_left", "cheek_right"),
    "hair": ("forehead",),
    "face": (),
    "accessory": (),
    "image": (),
}


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to draw and encode one image; small, so it travels to worker processes."""

    filename: str
    seed: int
    slot: int
    traits: IdentityTraits
    attributes: Mapping[str, bool]
    hardness: HardEffect
    protect: tuple[str, ...]
    image_size: int
    jpeg_quality: int


class Streams:
    """Independent random generators per drawing component of one image."""

    def __init__(self, seed: int, identity: int, slot: int) -> None:
        self._key = (seed, 3, identity, slot)

    def __call__(self, component: str) -> np.random.Generator:
        tag = zlib.crc32(component.encode("utf-8"))
        return np.random.default_rng(np.random.SeedSequence([*self._key, tag]))


def identity_stream(seed: int, identity: int, component: str) -> np.random.Generator:
    """Randomness shared by all images of an identity (freckle positions, for instance)."""
    tag = zlib.crc32(component.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, 4, identity, tag]))


def supersample_factor(image_size: int) -> int:
    return max(1, min(4, round(192 / image_size)))


# ---- colour helpers ----------------------------------------------------------------------------


def _byte(value: float) -> int:
    return int(min(255.0, max(0.0, value)))


def shade(colour: Sequence[float], factor: float, add: float = 0.0) -> RGB:
    return (
        _byte(colour[0] * factor + add),
        _byte(colour[1] * factor + add),
        _byte(colour[2] * factor + add),
    )


def mix(c1: Sequence[float], c2: Sequence[float], t: float) -> RGB:
    r, g, b = (_byte(a * (1 - t) + c * t) for a, c in zip(c1[:3], c2[:3], strict=True))
    return r, g, b


def rgba(colour: Sequence[float], alpha: int) -> tuple[int, int, int, int]:
    return (int(colour[0]), int(colour[1]), int(colour[2]), int(alpha))


# ---- geometry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Maps face units to canvas pixels, and knows the face outline."""

    cx: float
    cy: float
    a: float
    b: float
    jaw: float
    square: float
    chubby: bool

    def p(self, u: float, v: float) -> Point:
        return (self.cx + u * self.a, self.cy + v * self.b)

    def pts(self, us: np.ndarray, vs: np.ndarray) -> list[Point]:
        xs = self.cx + np.asarray(us) * self.a
        ys = self.cy + np.asarray(vs) * self.b
        return list(zip(xs.tolist(), ys.tolist(), strict=True))

    def box(self, u: float, v: float, hu: float, hv: float) -> list[float]:
        x, y = self.p(u, v)
        return [x - hu * self.a, y - hv * self.b, x + hu * self.a, y + hv * self.b]

    def circle(self, u: float, v: float, r: float) -> list[float]:
        """A circle of radius `r` face half-widths."""
        x, y = self.p(u, v)
        return [x - r * self.a, y - r * self.a, x + r * self.a, y + r * self.a]

    def px(self, fraction: float) -> int:
        return max(1, round(fraction * self.b))

    def _narrow(self, y: np.ndarray) -> np.ndarray:
        yy = np.clip(y, 0.0, 1.0)
        factor = 1.0 - (1.0 - self.jaw) * yy**1.6
        if self.chubby:
            factor = factor * (1.0 + 0.05 * np.sin(np.pi * yy))
        return factor

    def outline(self, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        e = 2.0 / self.square
        lower = s > 0
        x = np.where(lower, np.sign(c) * np.abs(c) ** e, c)
        y = np.where(lower, np.abs(s) ** e, s)
        return x * self._narrow(y), y

    def half_width(self, v: float) -> float:
        if v <= 0:
            return math.sqrt(max(0.0, 1.0 - v * v))
        v = min(v, 1.0)
        e = 2.0 / self.square
        s = v ** (1.0 / e)
        c = math.sqrt(max(0.0, 1.0 - s * s))
        return float(c**e * self._narrow(np.array(v)))


# ---- the scene ---------------------------------------------------------------------------------


@dataclass
class Scene:
    draw: ImageDraw.ImageDraw
    canvas: Image.Image
    f: Frame
    t: IdentityTraits
    attrs: Mapping[str, bool]
    streams: Streams
    seed: int

    def on(self, name: str) -> bool:
        return bool(self.attrs.get(name, False))

    @property
    def line(self) -> int:
        return self.f.px(0.035)

    @property
    def hair_dark(self) -> RGB:
        return shade(self.t.hair_colour, 0.72)

    @property
    def facial_hair(self) -> RGB:
        if self.t.hair_style == "buzz":  # a buzz cut's colour shows in full only here
            return self.t.hair_colour
        return shade(self.t.hair_colour, 0.8 if sum(self.t.hair_colour) > 300 else 0.95)


def perturbed_traits(
    t: IdentityTraits, hard: HardEffect, rng: np.random.Generator
) -> IdentityTraits:
    """Identity-cue corruption of a hard image: redraw or jitter traits no attribute depends on."""
    s, p = hard.strength, hard.trait_redraw_probability
    u = rng.random(8)
    normals = rng.normal(0.0, 1.0, 4)
    if s <= 0:
        return t
    changes: dict[str, object] = {
        "face_ratio": t.face_ratio + 0.04 * s * normals[0],
        "eye_spacing": t.eye_spacing + 0.03 * s * normals[1],
        "mouth_width": float(np.clip(t.mouth_width + 0.05 * s * normals[2], 0.24, 0.5)),
    }
    if u[0] < p:
        changes["eye_colour"] = EYE_COLOURS[int(u[1] * len(EYE_COLOURS)) % len(EYE_COLOURS)]
    if u[2] < p:
        changes["bg_hue"] = float(u[3])
    if u[4] < p:
        changes["clothing"] = hsv(float(u[5]), 0.55, 0.35 + 0.5 * float(u[6]))
    if u[7] < p and t.nose_shape in NOSE_SHAPES:
        changes["nose_shape"] = NOSE_SHAPES[int(u[1] * 97) % len(NOSE_SHAPES)]
    if not t.attributes.get("Pale_Skin", False):
        changes["skin"] = shade(t.skin, 1.0, 25.0 * s * float(normals[3]))
    return dataclasses.replace(t, **changes)  # type: ignore[arg-type]


def render_face(job: ImageJob) -> Image.Image:
    """Draw one face as an RGB image of `job.image_size` pixels."""
    size = job.image_size
    k = supersample_factor(size)
    side = size * k
    pad = k * round(0.2 * size)
    streams = Streams(job.seed, job.traits.identity, job.slot)
    hard = job.hardness
    t = perturbed_traits(job.traits, hard, streams("hard_traits"))
    attrs = job.attributes

    pose = streams("pose")
    jitter = hard.pose_jitter_scale
    dx, dy = np.clip(pose.normal(0.0, 0.025 * side * jitter, 2), -0.1 * side, 0.1 * side)
    scale = float(np.exp(np.clip(pose.normal(0.0, 0.05 * jitter), -0.25, 0.25)))
    angle = float(np.clip(t.tilt + pose.normal(0.0, 3.5 * jitter), -28.0, 28.0))
    b = 0.29 * side * scale
    frame = Frame(
        cx=pad + 0.5 * side + dx,
        cy=pad + 0.5 * side + dy,
        a=b * t.face_ratio,
        b=b,
        jaw=t.jaw,
        square=t.squareness,
        chubby=bool(attrs.get("Chubby")),
    )
    canvas, bg_mean = _background(side + 2 * pad, t, streams("background"))
    scene = Scene(
        draw=ImageDraw.Draw(canvas, "RGBA"),
        canvas=canvas,
        f=frame,
        t=t,
        attrs=attrs,
        streams=streams,
        seed=job.seed,
    )

    _back_hair(scene)
    _torso(scene)
    _ears(scene)
    _face(scene)
    _skin_details(scene)
    _beard(scene)
    _eyes(scene)
    _brows(scene)
    _nose(scene)
    _mouth(scene)
    _mustache_goatee(scene)
    _hair_top(scene)
    _occluders(scene, hard, job.protect)
    _necklace(scene)
    _necktie(scene)
    _earrings(scene)
    _glasses(scene)
    _hat(scene)

    # Downscale first (the box filter antialiases the drawing), then rotate the small image:
    # nine times fewer pixels to resample, and the bicubic kernel adds only camera-like softness.
    small = canvas.reduce(k) if k > 1 else canvas
    rotated = small.rotate(
        angle,
        resample=Image.Resampling.BICUBIC,
        center=(frame.cx / k, frame.cy / k),
        fillcolor=bg_mean,
    )
    image = rotated.crop((pad // k, pad // k, pad // k + size, pad // k + size))
    return _photograph(image, attrs, hard, streams("photo"))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---- background, body ----------------------------------------------------------------------------


def _background(size: int, t: IdentityTraits, rng: np.random.Generator) -> tuple[Image.Image, RGB]:
    hue = t.bg_hue + rng.normal(0.0, 0.012)
    sat = float(np.clip(t.bg_saturation * rng.uniform(0.8, 1.2), 0.05, 0.8))
    top = np.array(hsv(hue, sat, float(rng.uniform(0.72, 0.92))), dtype=np.float32)
    bottom = np.array(hsv(hue, sat * 1.1, float(rng.uniform(0.45, 0.7))), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = top[None, None, :] * (1 - ramp) + bottom[None, None, :] * ramp
    pixels = np.broadcast_to(rows, (size, size, 3)).astype(np.uint8)
    mean = tuple(int(c) for c in ((top + bottom) / 2))
    return Image.fromarray(pixels, "RGB"), mean  # type: ignore[return-value]


def _torso(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    rng = sc.streams("clothing")
    clothing = t.clothing if rng.random() < 0.85 else hsv(rng.random(), 0.5, rng.uniform(0.3, 0.9))
    neck_skin = shade(t.skin, 0.9)
    d.polygon(
        f.pts(np.array([-0.4, 0.4, 0.46, -0.46]), np.array([0.55, 0.55, 1.5, 1.5])), fill=neck_skin
    )
    d.ellipse(
        f.box(0.0, 2.15, 2.1, 0.85), fill=clothing, outline=shade(clothing, 0.7), width=sc.line
    )
    d.chord(f.box(0.0, 1.27, 0.46, 0.22), 0, 180, fill=neck_skin)


def _hair_wave(sc: Scene) -> float:
    if sc.on("Wavy_Hair"):
        return 0.06
    if sc.t.hair_style == "curly":
        return 0.05
    return 0.0


def _back_hair(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    colour, dark = t.hair_colour, sc.hair_dark
    style = t.hair_style
    wave = _hair_wave(sc)
    if style in ("long", "bob"):
        bottom = 1.55 if style == "long" else 0.78
        theta = np.linspace(np.pi, 2 * np.pi, 24)
        top_u, top_v = 1.16 * np.cos(theta), -0.1 + 1.06 * np.sin(theta)
        vs = np.linspace(-0.1, bottom, 14)
        right_u = 1.2 + 0.04 * vs + wave * np.sin(vs * 11.0)
        bottom_u = np.linspace(1.2, -1.2, 9)
        bottom_v = bottom + wave * np.sin(bottom_u * 9.0) + (0.0 if wave else 0.02)
        us = np.concatenate([top_u, right_u, bottom_u, -right_u[::-1]])
        vv = np.concatenate([top_v, vs, bottom_v, vs[::-1]])
        d.polygon(f.pts(us, vv), fill=colour, outline=dark, width=sc.line)
        for offset in (-0.95, -0.75, 0.75, 0.95):
            strand_v = np.linspace(0.1, bottom - 0.1, 8)
            strand_u = offset + (wave * 0.8 * np.sin(strand_v * 11.0) if wave else 0.0 * strand_v)
            d.line(f.pts(strand_u, strand_v), fill=dark, width=max(1, sc.line // 2))
    elif style == "curly":
        theta = np.linspace(0.78 * np.pi, 2.22 * np.pi, 15)
        for th in theta:
            u, v = 1.08 * math.cos(th), -0.08 + 1.02 * math.sin(th)
            d.ellipse(f.circle(u, v, 0.3), fill=colour, outline=dark, width=sc.line)
    elif style == "bun":
        d.ellipse(f.circle(0.0, -1.12, 0.36), fill=colour, outline=dark, width=sc.line)
        d.arc(f.circle(0.0, -1.12, 0.22), 200, 340, fill=dark, width=sc.line)


def _ears(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    for side in (-1, 1):
        u = side * (f.half_width(0.08) * 0.97)
        hu, hv = 0.13 * t.ear_size, 0.19 * t.ear_size
        d.ellipse(f.box(u, 0.1, hu, hv), fill=t.skin, outline=shade(t.skin, 0.72), width=sc.line)
        d.arc(
            f.box(u, 0.1, hu * 0.5, hv * 0.6),
            90 - side * 90 - 60,
            90 - side * 90 + 60,
            fill=shade(t.skin, 0.75),
            width=sc.line,
        )


def _face(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    if sc.on("Double_Chin"):
        d.ellipse(
            f.box(0.0, 0.98, 0.5, 0.14),
            fill=shade(t.skin, 0.96),
            outline=shade(t.skin, 0.75),
            width=sc.line,
        )
    xs, ys = f.outline()
    d.polygon(f.pts(xs, ys), fill=t.skin, outline=shade(t.skin, 0.7), width=sc.line)
    if sc.on("Double_Chin"):
        d.arc(f.box(0.0, 0.84, 0.32, 0.1), 20, 160, fill=shade(t.skin, 0.78), width=sc.line)


# ---- skin ---------------------------------------------------------------------------------------


def _skin_details(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    line_colour = rgba(shade(t.skin, 0.58), 230)
    thin = sc.line
    if t.freckles:
        rng = identity_stream(sc.seed, t.identity, "freckles")
        for _ in range(18):
            u, v = rng.uniform(-0.6, 0.6), rng.uniform(0.05, 0.42)
            if abs(u) > 0.12:
                d.ellipse(f.circle(u, v, 0.018), fill=rgba((150, 90, 50), 170))
    if t.mole is not None:
        d.ellipse(f.circle(t.mole[0], t.mole[1], 0.03), fill=(60, 38, 30))
    if not sc.on("Young"):
        for i, v in enumerate((-0.48, -0.6, -0.72)):
            half = 0.42 - 0.06 * i
            d.arc(f.box(0.0, v + 0.12, half, 0.12), 200, 340, fill=line_colour, width=thin)
        for side in (-1, 1):
            ex = side * (t.eye_spacing + 0.27)
            for dv in (-0.05, 0.02, 0.09):
                d.line(
                    [f.p(ex, t.eye_y + dv * 0.6), f.p(ex + side * 0.12, t.eye_y + dv)],
                    fill=line_colour,
                    width=thin,
                )
            nose_u = side * 0.2
            mouth_u = side * (t.mouth_width + 0.08)
            d.line(
                f.pts(np.array([nose_u, side * 0.3, mouth_u]), np.array([0.36, 0.5, 0.7])),
                fill=line_colour,
                width=thin,
                joint="curve",
            )
    if sc.on("Bags_Under_Eyes"):
        for side in (-1, 1):
            u = side * t.eye_spacing
            for dv, alpha in ((0.1, 190), (0.16, 130)):
                d.arc(
                    f.box(u, t.eye_y + dv, 0.17, 0.08),
                    20,
                    160,
                    fill=rgba(mix(t.skin, (90, 50, 80), 0.45), alpha),
                    width=sc.line,
                )
    if sc.on("Rosy_Cheeks"):
        for side in (-1, 1):
            d.ellipse(f.box(side * 0.55, 0.33, 0.2, 0.11), fill=rgba((236, 96, 112), 120))
    if sc.on("Heavy_Makeup"):
        for side in (-1, 1):
            d.ellipse(f.box(side * 0.56, 0.3, 0.17, 0.09), fill=rgba((226, 120, 130), 70))
    if sc.on("High_Cheekbones"):
        for side in (-1, 1):
            d.ellipse(f.box(side * 0.55, 0.17, 0.16, 0.06), fill=rgba((255, 255, 255), 60))
            d.line(
                [f.p(side * 0.78, 0.3), f.p(side * 0.5, 0.46)],
                fill=rgba(shade(t.skin, 0.75), 170),
                width=sc.line,
            )


def _beard(sc: Scene) -> None:
    f, d = sc.f, sc.draw
    hair = sc.facial_hair
    if sc.on("5_o_Clock_Shadow"):
        rng = sc.streams("stubble")
        vs = np.linspace(0.32, 1.0, 12)
        widths = np.array([f.half_width(v) * 0.97 for v in vs])
        us = np.concatenate([widths, -widths[::-1]])
        d.polygon(f.pts(us, np.concatenate([vs, vs[::-1]])), fill=rgba((70, 80, 96), 70))
        for _ in range(90):
            v = rng.uniform(0.34, 0.98)
            u = rng.uniform(-1, 1) * f.half_width(v) * 0.92
            d.point(f.p(u, v), fill=rgba(shade(hair, 0.6), 220))
    if sc.on("Sideburns"):
        for side in (-1, 1):
            vs = np.linspace(-0.35, 0.42, 6)
            outer = np.array([f.half_width(v) * 0.99 for v in vs])
            inner = outer - 0.16
            us = side * np.concatenate([outer, inner[::-1]])
            d.polygon(f.pts(us, np.concatenate([vs, vs[::-1]])), fill=hair)


# ---- eyes, brows, nose, mouth -------------------------------------------------------------------


def _eye_height(sc: Scene) -> float:
    h = 0.085 * sc.t.eye_size
    if sc.on("Narrow_Eyes"):
        h *= 0.34
    if sc.on("Smiling"):
        h *= 0.8
    return h


def _eyes(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    rng = sc.streams("gaze")
    gaze_u, gaze_v = rng.uniform(-0.04, 0.04), rng.uniform(-0.015, 0.015)
    ew = 0.15 * t.eye_size
    eh = _eye_height(sc)
    makeup = sc.on("Heavy_Makeup")
    shadow = hsv(sc.streams("makeup").random(), 0.45, 0.6)
    for side in (-1, 1):
        u, v = side * t.eye_spacing, t.eye_y
        if makeup:
            d.ellipse(f.box(u, v - eh * 0.8, ew * 1.15, eh + 0.06), fill=rgba(shadow, 150))
        d.ellipse(
            f.box(u, v, ew, eh), fill=(246, 244, 240), outline=shade(t.skin, 0.55), width=sc.line
        )
        iris = min(0.065 * t.eye_size, ew * 0.55)
        iris_v = min(iris * f.a / f.b, eh * 0.95)
        d.ellipse(f.box(u + gaze_u, v + gaze_v, iris, iris_v), fill=t.eye_colour)
        d.ellipse(f.box(u + gaze_u, v + gaze_v, iris * 0.45, iris_v * 0.45), fill=(12, 10, 10))
        d.ellipse(
            f.circle(u + gaze_u - iris * 0.3, v + gaze_v - iris_v * 0.3, iris * 0.18),
            fill=(255, 255, 255),
        )
        lid_width = sc.line * (2 if makeup else 1)
        d.arc(f.box(u, v, ew, eh), 185, 355, fill=(30, 22, 20), width=lid_width)
        if makeup or not sc.on("Male"):
            outer = side * (t.eye_spacing + ew)
            for i in range(3 if makeup else 2):
                du = side * 0.035 * i
                d.line(
                    [f.p(outer - du, v - eh * 0.5), f.p(outer - du + side * 0.05, v - eh - 0.03)],
                    fill=(25, 20, 20),
                    width=max(1, sc.line // 2 + (1 if makeup else 0)),
                )


def _brows(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    raise_ = sc.streams("brows").uniform(-0.02, 0.03) + (
        0.03 if sc.on("Mouth_Slightly_Open") else 0
    )
    colour = sc.hair_dark if sum(t.hair_colour) < 600 else shade(t.hair_colour, 0.6)
    if t.hair_style == "buzz":  # as the beard: a buzz cut's colour shows in full only here
        colour = t.hair_colour
    width = f.px(0.045 * t.brow_thickness)
    for side in (-1, 1):
        inner, outer = t.eye_spacing - 0.13, t.eye_spacing + 0.2 + 0.03 * (t.brow_thickness > 1.8)
        us = np.linspace(inner, outer, 7)
        x = (us - inner) / (outer - inner)
        base = t.eye_y - 0.2 - raise_
        if t.brow_shape == "arched":
            vs = base - 0.1 * np.sin(np.pi * x**0.8) + 0.02 * x
        elif t.brow_shape == "angled":
            vs = base - 0.07 * np.minimum(x / 0.65, (1 - x) / 0.35 * 0.6 + 0.4 * (x < 0.65))
        elif t.brow_shape == "soft":
            vs = base - 0.04 * np.sin(np.pi * x)
        else:
            vs = base - 0.015 * x
        d.line(f.pts(side * us, vs), fill=colour, width=width, joint="curve")
        if t.brow_thickness > 1.8:
            d.line(f.pts(side * us, vs - 0.025), fill=colour, width=max(1, width // 2))


def _nose(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    s = t.nose_size
    top, tip = t.eye_y + 0.12, 0.3 + 0.04 * (s - 1)
    fill = shade(t.skin, 0.88)
    dark = shade(t.skin, 0.62)
    w = sc.line
    if t.nose_shape == "pointy":
        d.polygon(
            [f.p(0, top), f.p(0.1, tip + 0.06), f.p(-0.1, tip + 0.06)],
            fill=fill,
            outline=dark,
            width=w,
        )
    elif t.nose_shape == "triangle":
        d.polygon([f.p(0, top + 0.05), f.p(0.12 * s, tip), f.p(-0.12 * s, tip)], fill=fill)
        d.line([f.p(0.02, top), f.p(0.1 * s, tip), f.p(-0.08 * s, tip)], fill=dark, width=w)
    elif t.nose_shape == "round":
        d.line([f.p(0.03, top), f.p(0.06 * s, tip - 0.08 * s)], fill=dark, width=w)
        d.ellipse(f.box(0, tip - 0.02, 0.13 * s, 0.08 * s), fill=fill, outline=dark, width=w)
    elif t.nose_shape == "hook":
        d.line(
            f.pts(
                np.array([0.0, 0.08 * s, 0.1 * s, 0.0]) * 1.0,
                np.array([top, (top + tip) / 2, tip, tip + 0.02]),
            ),
            fill=dark,
            width=w,
            joint="curve",
        )
    else:  # button
        d.ellipse(f.box(0, tip - 0.02, 0.08 * s, 0.055 * s), fill=fill, outline=dark, width=w)
    for side in (-1, 1):
        d.ellipse(f.circle(side * 0.055 * s, tip + 0.02, 0.025 * s), fill=shade(t.skin, 0.45))


def _mouth_curve(sc: Scene) -> tuple[np.ndarray, np.ndarray, float]:
    """Points along the line between the lips (corners up when smiling), and the half width."""
    t = sc.t
    rng = sc.streams("mouth")
    half = t.mouth_width * (1.08 if sc.on("Smiling") else 1.0)
    centre_v = 0.62 + rng.uniform(-0.015, 0.015)
    curve = 0.09 if sc.on("Smiling") else rng.uniform(-0.02, 0.015)
    us = np.linspace(-half, half, 15)
    vs = centre_v + curve * (0.5 - (us / half) ** 2)
    return us, vs, half


def _mouth(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    us, vs, half = _mouth_curve(sc)
    lip = t.lip_colour
    if sc.on("Wearing_Lipstick"):
        lip = ((196, 24, 48), (214, 74, 120), (128, 20, 48))[
            int(sc.streams("lipstick").random() * 3) % 3
        ]
    thick = 0.1 if sc.on("Big_Lips") else 0.05
    bulge = np.sqrt(np.clip(1 - (us / half) ** 2, 0, 1))
    dark = (70, 24, 28)
    if sc.on("Mouth_Slightly_Open"):
        gap = 0.13 if sc.on("Smiling") else 0.08
        upper = vs - gap * 0.25 * bulge
        lower = vs + gap * bulge
        d.polygon(
            f.pts(np.concatenate([us, us[::-1]]), np.concatenate([upper, lower[::-1]])), fill=dark
        )
        teeth = upper + gap * 0.45 * bulge
        d.polygon(
            f.pts(
                np.concatenate([us * 0.85, us[::-1] * 0.85]), np.concatenate([upper, teeth[::-1]])
            ),
            fill=(246, 244, 236),
        )
    else:
        upper, lower = vs, vs
    upper_lip = upper - thick * 0.8 * bulge - 0.012 * bulge * (1 + np.cos(us / half * 6.0))
    lower_lip = lower + thick * 1.1 * bulge
    d.polygon(
        f.pts(np.concatenate([us, us[::-1]]), np.concatenate([upper, upper_lip[::-1]])), fill=lip
    )
    d.polygon(
        f.pts(np.concatenate([us, us[::-1]]), np.concatenate([lower, lower_lip[::-1]])),
        fill=shade(lip, 1.08),
    )
    d.line(f.pts(us, upper), fill=dark, width=sc.line, joint="curve")
    if not sc.on("Mouth_Slightly_Open"):
        d.line(f.pts(us, vs), fill=dark, width=sc.line, joint="curve")
    if sc.on("Smiling"):
        for side in (-1, 1):
            end_u, end_v = side * half, vs[0 if side < 0 else -1]
            d.arc(
                f.box(end_u + side * 0.04, end_v - 0.02, 0.05, 0.06),
                -90 + side * 60,
                90 + side * 60,
                fill=shade(t.skin, 0.7),
                width=sc.line,
            )


def _mustache_goatee(sc: Scene) -> None:
    f, d = sc.f, sc.draw
    hair = sc.facial_hair
    us, vs, half = _mouth_curve(sc)
    if sc.on("Goatee"):
        chin = 0.97
        lower = vs + (0.19 if sc.on("Mouth_Slightly_Open") else 0.1)
        mid = slice(3, 12)
        gu = us[mid] * 0.85
        gv = lower[mid]
        bottom_u = np.linspace(gu[-1], gu[0], 9)
        bottom_v = chin - 0.06 * (bottom_u / max(abs(gu[0]), 1e-6)) ** 2
        d.polygon(f.pts(np.concatenate([gu, bottom_u]), np.concatenate([gv, bottom_v])), fill=hair)
    if sc.on("Mustache"):
        mu = us * 1.12
        top = vs - 0.2 + 0.03 * (mu / (half * 1.12)) ** 2
        bottom = vs - 0.07 + 0.05 * (mu / (half * 1.12)) ** 2
        d.polygon(
            f.pts(np.concatenate([mu, mu[::-1]]), np.concatenate([top, bottom[::-1]])),
            fill=hair,
            outline=shade(hair, 0.8),
            width=1,
        )


# ---- hair --------------------------------------------------------------------------------------


def _hairline(sc: Scene, us: np.ndarray) -> tuple[np.ndarray, float]:
    """The lower edge of the hair over the forehead, and the side height where hair stops."""
    t = sc.t
    framing = t.hair_style in ("long", "bob", "curly")
    side_v = 0.12 if framing else (-0.2 if t.hair_style == "bun" else -0.12)
    centre_v = -0.62 if framing else -0.56
    if sc.on("Receding_Hairline"):
        centre_v = -0.74
    x = np.clip(np.abs(us) / 1.0, 0, 1)
    vs = side_v + (centre_v - side_v) * np.sqrt(1 - x**2)
    if sc.on("Receding_Hairline"):
        vs = vs - 0.24 * np.exp(-(((np.abs(us) - 0.5) / 0.16) ** 2))
    if t.hair_style == "side_part":
        vs = vs + 0.12 * t.part_side * us * (np.abs(us) < 0.95)
    return vs, side_v


def _hair_top(sc: Scene) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    colour, dark = t.hair_colour, sc.hair_dark
    if t.hair_style == "bald":
        for side in (-1, 1):
            vs = np.linspace(-0.5, 0.05, 7)
            outer = np.array([f.half_width(v) * 1.04 for v in vs])
            us = side * np.concatenate([outer, outer[::-1] - 0.13])
            d.polygon(f.pts(us, np.concatenate([vs, vs[::-1]])), fill=colour)
        d.ellipse(f.box(-0.3, -0.74, 0.2, 0.08), fill=rgba((255, 255, 255), 110))
        return
    style = t.hair_style
    inner_u = np.linspace(0.99, -0.99, 25)
    inner_v, side_v = _hairline(sc, inner_u)
    if style == "buzz":
        _buzz_cut(sc, inner_u, inner_v, side_v)
        return
    rx, top = (1.14, -1.16) if style == "curly" else (1.07, -1.1)
    theta = np.linspace(np.pi, 2 * np.pi, 41)
    radius = np.ones_like(theta)
    if style == "spiky":
        radius = radius + 0.1 * (np.arange(theta.size) % 4 == 1) * (np.sin(theta) < -0.4)
    wave = _hair_wave(sc)
    if wave:
        radius = radius + wave * np.abs(np.sin(theta * 9.0))
    outer_u = rx * radius * np.cos(theta)
    outer_v = side_v + (side_v - top) * radius * np.sin(theta)
    us = np.concatenate([outer_u, inner_u])
    vs = np.concatenate([outer_v, inner_v])
    d.polygon(f.pts(us, vs), fill=colour, outline=dark, width=sc.line)
    if style == "side_part":
        part_u = t.part_side * 0.35
        d.line([f.p(part_u, -0.6), f.p(part_u * 1.1, -1.02)], fill=dark, width=sc.line)
    strokes = sc.streams("hair_strokes")
    for _ in range(5):
        u0 = strokes.uniform(-0.6, 0.6)
        if sc.on("Straight_Hair"):
            pts = [f.p(u0, -1.0), f.p(u0 * 1.15, -0.7)]
        else:
            pts = [f.p(u0, -0.95), f.p(u0 + 0.1, -0.85), f.p(u0, -0.75)]
        d.line(pts, fill=dark, width=max(1, sc.line // 2))
    if sc.on("Bangs"):
        _bangs(sc, rx, top, side_v)


BUZZ_SKIN_SHARE = 0.6
"""How much of a buzz cut's colour is the scalp's (world.spurious.attribute_hair: buzz_cut):
tuned on worlds of seeds 7 and 13 (bench/RESULTS.md, "A weaker hair cue for men")."""


def _buzz_cut(sc: Scene, inner_u: np.ndarray, inner_v: np.ndarray, side_v: float) -> None:
    """A thin cap of short hair, its colour mostly the scalp's: the hair colour shows weakly."""
    f, d, t = sc.f, sc.draw, sc.t
    colour = mix(t.hair_colour, t.skin, BUZZ_SKIN_SHARE)
    edge = shade(colour, 0.9)
    rx, top = 1.03, -1.03
    theta = np.linspace(np.pi, 2 * np.pi, 41)
    radius = 1.0 + 0.5 * _hair_wave(sc) * np.abs(np.sin(theta * 9.0))
    outer_u = rx * radius * np.cos(theta)
    outer_v = side_v + (side_v - top) * radius * np.sin(theta)
    us = np.concatenate([outer_u, inner_u])
    vs = np.concatenate([outer_v, inner_v])
    d.polygon(f.pts(us, vs), fill=colour, outline=edge, width=max(1, sc.line // 2))
    if sc.on("Bangs"):
        _bangs(sc, rx, top, side_v, colour, edge)


def _bangs(
    sc: Scene,
    rx: float,
    top: float,
    side_v: float,
    colour: RGB | None = None,
    edge: RGB | None = None,
) -> None:
    f, d, t = sc.f, sc.draw, sc.t
    colour = t.hair_colour if colour is None else colour
    edge = sc.hair_dark if edge is None else edge
    rng = sc.streams("bangs")
    swept = rng.random() < 0.4
    us = np.linspace(-0.92, 0.92, 19)
    top_v = side_v - (side_v - top) * np.sqrt(np.clip(1 - (us / rx) ** 2, 0, 1))
    bottom = -0.36 + 0.045 * (np.arange(us.size) % 2)
    if swept:
        bottom = bottom + 0.12 * t.part_side * us
    bottom_u = us[::-1]
    d.polygon(
        f.pts(np.concatenate([us, bottom_u]), np.concatenate([top_v, bottom[::-1]])),
        fill=colour,
        outline=edge,
        width=sc.line,
    )
    for u in (-0.5, -0.2, 0.15, 0.45):
        d.line(
            [f.p(u, -0.7), f.p(u + (0.08 * t.part_side if swept else 0.0), -0.42)],
            fill=edge,
            width=max(1, sc.line // 2),
        )


# ---- identity-cue occluders of hard images -----------------------------------------------------


def _occluders(sc: Scene, hard: HardEffect, protect: Sequence[str]) -> None:
    rng = sc.streams("occluders")
    draws = rng.random(2 + 6 * hard.occluder_count)
    if hard.strength <= 0 or draws[0] >= hard.occlusion_probability:
        return
    f, t = sc.f, sc.t
    allowed = [name for name in OCCLUDER_TARGETS if name not in protect]
    patch_rng = sc.streams("occluder_pixels")
    for i in range(hard.occluder_count):
        u_pick, du, dv, size_draw, kind, hue = draws[2 + 6 * i : 8 + 6 * i]
        name = allowed[int(u_pick * len(allowed)) % len(allowed)]
        u, v, widen = OCCLUDER_TARGETS[name]
        if name.startswith("eye"):  # follow this identity's eyes
            u, v = float(np.sign(u)) * t.eye_spacing, t.eye_y
        u += (du - 0.5) * 0.15
        v += (dv - 0.5) * 0.15
        half = hard.occluder_size * widen * (0.8 + 0.4 * size_draw)
        box = f.box(u, v, half, half * 0.55 * f.a / f.b * 1.3)
        x0, y0, x1, y1 = (round(c) for c in box)
        if kind < 0.5:
            sc.draw.rounded_rectangle(
                [x0, y0, x1, y1],
                radius=max(1, (y1 - y0) // 4),
                fill=hsv(float(hue), 0.4, 0.3 + 0.6 * float(size_draw)),
            )
        else:
            w, h = max(1, x1 - x0), max(1, y1 - y0)
            noise = patch_rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            sc.canvas.paste(Image.fromarray(noise, "RGB"), (x0, y0))


# ---- accessories (drawn after occluders so that they stay visible) ---------------------------


def _metal(rng: np.random.Generator) -> RGB:
    return ((226, 186, 64), (206, 208, 218), (240, 236, 226), (200, 60, 90))[
        int(rng.random() * 4) % 4
    ]


def _necklace(sc: Scene) -> None:
    if not sc.on("Wearing_Necklace"):
        return
    f, d = sc.f, sc.draw
    rng = sc.streams("necklace")
    colour = _metal(rng)
    theta = np.linspace(0.12 * np.pi, 0.88 * np.pi, 15)
    us, vs = 0.55 * np.cos(theta), 1.2 + 0.36 * np.sin(theta)
    if rng.random() < 0.5:
        for u, v in zip(us, vs, strict=True):
            d.ellipse(f.circle(u, v, 0.05), fill=colour, outline=shade(colour, 0.7))
    else:
        d.line(f.pts(us, vs), fill=colour, width=sc.line * 2, joint="curve")
    d.ellipse(f.circle(0.0, 1.64, 0.1), fill=colour, outline=shade(colour, 0.6), width=1)


def _necktie(sc: Scene) -> None:
    if not sc.on("Wearing_Necktie"):
        return
    f, d = sc.f, sc.draw
    rng = sc.streams("necktie")
    colour = hsv(rng.random(), 0.75, rng.uniform(0.45, 0.85))
    white = (244, 244, 244)
    d.polygon([f.p(-0.46, 1.3), f.p(0.0, 1.5), f.p(-0.1, 1.62), f.p(-0.5, 1.45)], fill=white)
    d.polygon([f.p(0.46, 1.3), f.p(0.0, 1.5), f.p(0.1, 1.62), f.p(0.5, 1.45)], fill=white)
    d.polygon(
        [f.p(-0.1, 1.42), f.p(0.1, 1.42), f.p(0.07, 1.56), f.p(-0.07, 1.56)],
        fill=colour,
        outline=shade(colour, 0.6),
        width=1,
    )
    d.polygon(
        [f.p(-0.07, 1.56), f.p(0.07, 1.56), f.p(0.16, 2.2), f.p(0.0, 2.35), f.p(-0.16, 2.2)],
        fill=colour,
        outline=shade(colour, 0.6),
        width=1,
    )
    if rng.random() < 0.5:
        for v in (1.75, 1.95):
            d.line([f.p(-0.1, v), f.p(0.12, v + 0.06)], fill=shade(colour, 0.5), width=sc.line)


def _earrings(sc: Scene) -> None:
    if not sc.on("Wearing_Earrings"):
        return
    f, d, t = sc.f, sc.draw, sc.t
    rng = sc.streams("earrings")
    colour = _metal(rng)
    kind = rng.random()
    for side in (-1, 1):
        u = side * (f.half_width(0.08) * 0.97)
        lobe_v = 0.1 + 0.19 * t.ear_size
        if kind < 0.4:
            d.ellipse(f.circle(u, lobe_v + 0.1, 0.11), outline=colour, width=2 * sc.line)
        elif kind < 0.7:
            d.ellipse(f.circle(u, lobe_v + 0.02, 0.07), fill=colour, outline=shade(colour, 0.6))
        else:
            d.line([f.p(u, lobe_v), f.p(u, lobe_v + 0.12)], fill=colour, width=sc.line)
            d.ellipse(f.circle(u, lobe_v + 0.17, 0.08), fill=colour, outline=shade(colour, 0.6))


def _glasses(sc: Scene) -> None:
    if not sc.on("Eyeglasses"):
        return
    f, d, t = sc.f, sc.draw, sc.t
    rng = sc.streams("glasses")
    sun = rng.random() < 0.15
    thick = rng.random() < 0.35
    colour = t.glasses_colour
    width = sc.line * (2 if thick else 1) + 1
    lens = rgba((20, 22, 30), 235) if sun else rgba((200, 230, 255), 50)
    hw, hh = max(0.15 * t.eye_size * 1.45, 0.21), 0.13
    for side in (-1, 1):
        u, v = side * t.eye_spacing, t.eye_y
        if t.glasses_style == "round":
            d.ellipse(f.box(u, v, hw, hh * 1.15), fill=lens, outline=colour, width=width)
        elif t.glasses_style == "rect":
            d.rounded_rectangle(
                f.box(u, v, hw, hh),
                radius=max(1, round(0.03 * f.b)),
                fill=lens,
                outline=colour,
                width=width,
            )
        else:
            pts = [
                f.p(u - side * hw, v - hh * 0.6),
                f.p(u + side * hw * 1.1, v - hh * 1.3),
                f.p(u + side * hw, v + hh * 0.7),
                f.p(u - side * hw * 0.8, v + hh),
            ]
            d.polygon(pts, fill=lens, outline=colour, width=width)
        d.line(
            [
                f.p(side * (t.eye_spacing + hw), v - 0.03),
                f.p(side * f.half_width(0.0) * 0.98, v + 0.02),
            ],
            fill=colour,
            width=width,
        )
    d.line(
        [
            f.p(-(t.eye_spacing - hw), t.eye_y - 0.03),
            f.p(0.0, t.eye_y - 0.06),
            f.p(t.eye_spacing - hw, t.eye_y - 0.03),
        ],
        fill=colour,
        width=width,
    )


def _hat(sc: Scene) -> None:
    if not sc.on("Wearing_Hat"):
        return
    f, d = sc.f, sc.draw
    rng = sc.streams("hat")
    kind = ("cap", "beanie", "fedora", "sunhat")[int(rng.random() * 4) % 4]
    colour = hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
    edge = shade(colour, 0.65)
    cut = -0.52
    theta = np.linspace(np.pi, 2 * np.pi, 31)
    dome_u, dome_v = 1.12 * np.cos(theta), cut + 0.72 * np.sin(theta)
    if kind == "fedora":
        crown = [
            f.p(-0.8, cut),
            f.p(-0.72, -1.38),
            f.p(0.0, -1.28),
            f.p(0.72, -1.38),
            f.p(0.8, cut),
        ]
        d.polygon(crown, fill=colour, outline=edge, width=sc.line)
        d.rectangle(f.box(0.0, cut - 0.12, 0.79, 0.06), fill=shade(colour, 0.5))
        d.ellipse(f.box(0.0, cut, 1.55, 0.12), fill=colour, outline=edge, width=sc.line)
        return
    d.polygon(
        f.pts(dome_u, dome_v - (0.1 if kind == "beanie" else 0.0)),
        fill=colour,
        outline=edge,
        width=sc.line,
    )
    if kind == "cap":
        d.chord(
            f.box(0.35, cut, 0.95, 0.14),
            0,
            180,
            fill=shade(colour, 0.85),
            outline=edge,
            width=sc.line,
        )
        d.ellipse(f.circle(0.0, cut - 0.7, 0.06), fill=edge)
    elif kind == "beanie":
        d.rounded_rectangle(
            f.box(0.0, cut - 0.06, 1.12, 0.12),
            radius=3,
            fill=shade(colour, 0.8),
            outline=edge,
            width=sc.line,
        )
        for u in np.linspace(-0.9, 0.9, 7):
            d.line([f.p(u, cut - 0.16), f.p(u, cut + 0.04)], fill=edge, width=1)
    else:
        d.ellipse(f.box(0.0, cut + 0.02, 1.9, 0.16), fill=colour, outline=edge, width=sc.line)
        d.polygon(
            f.pts(dome_u * 0.9, dome_v * 0.9 + cut * 0.1), fill=colour, outline=edge, width=sc.line
        )


# ---- the camera: lighting, blur, noise ------------------------------------------------------


def _photograph(
    image: Image.Image, attrs: Mapping[str, bool], hard: HardEffect, rng: np.random.Generator
) -> Image.Image:
    size = image.width
    contrast = rng.uniform(0.82, 1.15)
    brightness = rng.uniform(-22.0, 18.0)
    side_light = rng.uniform(-0.18, 0.18)
    warmth = rng.uniform(-0.05, 0.05)
    blurry_radius = rng.uniform(1.2, 2.2) * size / 64.0
    noise_seed = int(rng.integers(0, 2**31 - 1))

    blur = math.hypot(
        blurry_radius if attrs.get("Blurry") else 0.0, hard.blur_radius_per_64px * size / 64.0
    )
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    pixels = np.asarray(image, dtype=np.float32)
    ramp = 1.0 + side_light * (np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :, None])
    pixels = ((pixels - 128.0) * contrast + 128.0 + brightness) * ramp
    pixels = pixels * np.array([1 + warmth, 1.0, 1 - warmth], dtype=np.float32)
    noise = np.random.default_rng(noise_seed).normal(0.0, hard.noise_sigma, pixels.shape)
    pixels = np.clip(pixels + noise.astype(np.float32), 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def render_job(job: ImageJob) -> bytes:
    return encode_jpeg(render_face(job), job.jpeg_quality)
