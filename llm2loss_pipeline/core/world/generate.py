"""Generating a face world on disk, in the exact CelebA layout, all or nothing.

Planning (who is who, which image has which attribute and split) is cheap and done in the
calling process; drawing is spread over worker processes in chunks and written in file order.
Every image is a pure function of (config, identity, slot), so the bytes do not depend on the
number of workers. The world is built in a hidden sibling folder and renamed into place at the
end; `world.json` is written last inside it and marks a complete world.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES, SPLIT_NAMES
from llm2loss_pipeline.core.storage import replace_dir, write_json_atomic, write_text_atomic
from llm2loss_pipeline.core.world.config import (
    GENERATOR_VERSION,
    NO_HARDNESS,
    HardEffect,
    WorldConfig,
    boosted_rate,
    split_counts,
)
from llm2loss_pipeline.core.world.render import PROTECTED_TARGETS, ImageJob, render_job
from llm2loss_pipeline.core.world.traits import (
    ATTRIBUTE_RULES,
    RENDERED_ATTRIBUTES,
    RULES_BY_NAME,
    TRAIT_DRAWS,
    UNRENDERED_ATTRIBUTES,
    IdentityTraits,
    identity_traits,
    sample_attributes,
)

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
PARTITION_FILE = "list_eval_partition.txt"
WORLD_FILE = "world.json"
CHUNK = 32

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PlannedImage:
    identity: int
    slot: int
    split: int
    attributes: dict[str, bool]
    strength: float
    protect: tuple[str, ...]


@dataclass(frozen=True)
class WorldPlan:
    config: WorldConfig
    identities: list[IdentityTraits]
    images: list[PlannedImage]
    """In file order: 000001.jpg first."""
    dropped_train: dict[str, int] = field(default_factory=dict)

    def filename(self, position: int) -> str:
        return f"{position + 1:06d}.jpg"


@dataclass(frozen=True)
class WorldSummary:
    root: Path
    config: WorldConfig
    n_images: int
    n_identities: int
    split_counts: dict[str, int]
    attribute_rates: dict[str, float]
    hard_attributes: dict[str, dict[str, Any]]
    reused: bool

    @classmethod
    def from_world_json(cls, root: Path, data: dict[str, Any], reused: bool) -> WorldSummary:
        return cls(
            root=root,
            config=WorldConfig.model_validate(data["config"]),
            n_images=data["counts"]["images"],
            n_identities=data["counts"]["identities"],
            split_counts=dict(data["counts"]["splits"]),
            attribute_rates=dict(data["attribute_positive_rates"]),
            hard_attributes=dict(data["hard_attributes"]),
            reused=reused,
        )


# ---- planning ------------------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def plan_identities(config: WorldConfig) -> list[IdentityTraits]:
    boosts = config.hard_attributes
    spurious = config.spurious
    override = (
        (spurious.target, spurious.attribute, spurious.eval_rate) if spurious is not None else None
    )
    # SpuriousConfig.attribute_hair: only the style changes, after every draw is taken
    buzz_cut = spurious is not None and spurious.attribute_hair == "buzz_cut"
    identities = []
    for identity in range(1, config.n_identities + 1):
        rng = _rng(config.seed, 0, identity)
        uniforms = rng.random(len(ATTRIBUTE_RULES))
        draws = rng.random(len(TRAIT_DRAWS))
        attributes = sample_attributes("identity", uniforms, {}, boosts, override)
        traits = identity_traits(identity, attributes, draws)
        if buzz_cut and attributes[spurious.attribute] and traits.hair_style != "bald":  # type: ignore[union-attr]
            traits = dataclasses.replace(traits, hair_style="buzz")
        identities.append(traits)
    return identities


def _hardness(attributes: dict[str, bool], hard: dict[str, float]) -> tuple[float, tuple[str, ...]]:
    active = [name for name, s in hard.items() if s > 0 and attributes[name]]
    if not active:
        return 0.0, ()
    strength = max(hard[name] for name in active)
    protect = sorted({t for name in active for t in PROTECTED_TARGETS[RULES_BY_NAME[name].region]})
    return strength, tuple(protect)


def plan_image(config: WorldConfig, traits: IdentityTraits, slot: int, split: int) -> PlannedImage:
    """The image at `slot` of an identity: a pure function of (config, identity, slot), so slots
    past the dataset's are new draws of the same people (core/world/population.py)."""
    hard = config.hard_attributes
    uniforms = _rng(config.seed, 2, traits.identity, slot).random(len(ATTRIBUTE_RULES))
    attributes = sample_attributes("image", uniforms, traits.attributes, hard)
    strength, protect = _hardness(attributes, hard)
    return PlannedImage(traits.identity, slot, split, attributes, strength, protect)


def plan_world(config: WorldConfig) -> WorldPlan:
    """Decide every image's identity, split and attributes, without drawing anything."""
    hard = config.hard_attributes
    identities = plan_identities(config)
    n = config.images_per_identity
    n_train, n_valid, _ = split_counts(n, config.split_fractions)
    dropped: dict[str, int] = {name: 0 for name in hard}
    kept: list[PlannedImage] = []
    spurious_keep = _spurious_train_quota(config, identities, n_train)
    for traits in identities:
        order = _rng(config.seed, 5, traits.identity).permutation(n)
        split_of = np.empty(n, dtype=np.int64)
        split_of[order[:n_train]] = 0
        split_of[order[n_train : n_train + n_valid]] = 1
        split_of[order[n_train + n_valid :]] = 2
        images = [plan_image(config, traits, slot, int(split_of[slot])) for slot in range(n)]
        train_slots = [int(slot) for slot in order[:n_train]]
        drop = _train_slots_to_drop(traits, images, train_slots, hard, dropped)
        if traits.identity in spurious_keep:
            left = [slot for slot in train_slots if slot not in drop]
            drop.update(left[spurious_keep[traits.identity] :])
        kept.extend(image for image in images if image.slot not in drop)
    shuffled = _rng(config.seed, 6).permutation(len(kept))
    ordered = sorted(
        (kept[i] for i in shuffled), key=lambda image: image.split
    )  # CelebA numbers train images first, then valid, then test
    return WorldPlan(config=config, identities=identities, images=ordered, dropped_train=dropped)


def _spurious_train_quota(
    config: WorldConfig, identities: Sequence[IdentityTraits], n_train: int
) -> dict[int, int]:
    """SpuriousConfig (2): how many train images each identity with both the target and the
    attribute keeps, `K = r / (1 - r) * T` in all, spread evenly (the remainder to a seeded
    choice of identities). Empty without `spurious`."""
    spurious = config.spurious
    if spurious is None:
        return {}
    with_attribute = [t for t in identities if t.attributes[spurious.attribute]]
    both = [t.identity for t in with_attribute if t.attributes[spurious.target]]
    if not both:
        return {}
    others = n_train * (len(with_attribute) - len(both))
    total = round(spurious.train_rate / (1.0 - spurious.train_rate) * others)
    total = min(total, n_train * len(both))
    base, extra = divmod(total, len(both))
    order = _rng(config.seed, 7).permutation(len(both))
    lucky = {both[int(i)] for i in order[:extra]}
    return {identity: base + (identity in lucky) for identity in both}


def _train_slots_to_drop(
    traits: IdentityTraits,
    images: Sequence[PlannedImage],
    train_slots: list[int],
    hard: dict[str, float],
    dropped: dict[str, int],
) -> set[int]:
    """Effect (c): fewer training images for identities and images with a hard attribute."""
    drop: set[int] = set()
    identity_attrs = traits.attributes
    identity_level = [
        name
        for name, s in hard.items()
        if s > 0 and RULES_BY_NAME[name].level == "identity" and identity_attrs[name]
    ]
    if identity_level:
        s = max(hard[name] for name in identity_level)
        keep = max(1, round(len(train_slots) * (1.0 - 0.5 * s)))
        for slot in train_slots[keep:]:
            drop.add(slot)
        dropped[max(identity_level, key=lambda name: hard[name])] += len(train_slots) - keep
    for name, s in hard.items():
        if s <= 0 or RULES_BY_NAME[name].level == "identity":
            continue
        having = [
            slot for slot in train_slots if slot not in drop and images[slot].attributes[name]
        ]
        for slot in having[: int(0.5 * s * len(having))]:
            if len(train_slots) - len(drop) <= 1:
                break
            drop.add(slot)
            dropped[name] += 1
    return drop


def image_jobs(plan: WorldPlan) -> list[ImageJob]:
    config = plan.config
    by_id = {traits.identity: traits for traits in plan.identities}
    return [
        ImageJob(
            filename=plan.filename(position),
            seed=config.seed,
            slot=image.slot,
            traits=by_id[image.identity],
            attributes=image.attributes,
            hardness=HardEffect.of(image.strength) if image.strength > 0 else NO_HARDNESS,
            protect=image.protect,
            image_size=config.image_size,
            jpeg_quality=config.jpeg_quality,
        )
        for position, image in enumerate(plan.images)
    ]


# ---- writing -------------------------------------------------------------------------------------


def _render_chunk(task: tuple[str, list[ImageJob]]) -> int:
    folder, jobs = task
    for job in jobs:
        with open(os.path.join(folder, job.filename), "wb") as handle:
            handle.write(render_job(job))
    return len(jobs)


def _chunks(jobs: list[ImageJob], folder: Path) -> Iterator[tuple[str, list[ImageJob]]]:
    for start in range(0, len(jobs), CHUNK):
        yield str(folder), jobs[start : start + CHUNK]


def render_images(
    jobs: list[ImageJob], folder: Path, progress: ProgressFn | None, workers: int
) -> None:
    total, done = len(jobs), 0
    if workers <= 1 or total <= CHUNK:
        for count in map(_render_chunk, _chunks(jobs, folder)):
            done += count
            if progress is not None:
                progress(done, total)
        return
    # 'spawn' starts clean interpreters: safe even when the caller runs threads (torch, polars),
    # where 'fork' can deadlock. A worker that cannot start breaks the pool with an error
    # instead of being restarted forever, as multiprocessing.Pool would.
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=min(workers, -(-total // CHUNK)), mp_context=context)
    try:
        for count in executor.map(_render_chunk, _chunks(jobs, folder)):
            done += count
            if progress is not None:
                progress(done, total)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"the {workers} image-drawing worker processes stopped unexpectedly ({exc}); "
            "run with workers=1 to draw in this process"
        ) from exc
    finally:
        # Cancel what has not started and wait for the chunks in flight (a fraction of a second),
        # so that no worker writes into the folder after it is removed.
        executor.shutdown(wait=True, cancel_futures=True)


def _attribute_table(plan: WorldPlan) -> str:
    lines = [str(len(plan.images)), " ".join(CELEBA_ATTRIBUTES)]
    for position, image in enumerate(plan.images):
        values = " ".join(f"{1 if image.attributes[name] else -1:2d}" for name in CELEBA_ATTRIBUTES)
        lines.append(f"{plan.filename(position)} {values}")
    return "\n".join(lines) + "\n"


def _pairs_table(plan: WorldPlan, value: Callable[[PlannedImage], int]) -> str:
    rows = (f"{plan.filename(i)} {value(image)}" for i, image in enumerate(plan.images))
    return "\n".join(rows) + "\n"


def _positive_rates(images: Sequence[PlannedImage]) -> dict[str, float]:
    n = max(1, len(images))
    return {
        name: round(sum(im.attributes[name] for im in images) / n, 6) for name in CELEBA_ATTRIBUTES
    }


def _hard_report(plan: WorldPlan) -> dict[str, dict[str, Any]]:
    config = plan.config
    if not config.hard_attributes:
        return {}
    baseline = plan_world(config.model_copy(update={"hard_attributes": {}}))
    base_rates = _positive_rates(baseline.images)
    rates = _positive_rates(plan.images)
    report = {}
    for name, s in config.hard_attributes.items():
        rule = RULES_BY_NAME[name]
        affected = [im for im in plan.images if im.attributes[name]]
        report[name] = {
            "strength": s,
            "level": rule.level,
            "effect": HardEffect.of(s).as_json(),
            "protected_occluder_targets": list(PROTECTED_TARGETS[rule.region]),
            "rule_rates": {
                "base": [
                    rule.rate,
                    boosted_rate(rule.rate, s) if rule.level != "derived" else rule.rate,
                ],
                **{
                    cond: [rate, boosted_rate(rate, s) if rule.level != "derived" else rate]
                    for cond, rate in rule.when
                },
            },
            "positive_rate_without_hardening": base_rates[name],
            "positive_rate": rates[name],
            "images_affected": len(affected),
            "identities_affected": len({im.identity for im in affected}),
            "train_images_dropped": plan.dropped_train.get(name, 0),
        }
    return report


def _spurious_report(plan: WorldPlan) -> dict[str, Any]:
    """Per split: images and the target's rate among attribute-positive and -negative images."""
    spurious = plan.config.spurious
    assert spurious is not None
    by_split: dict[str, Any] = {}
    for code, split in enumerate(SPLIT_NAMES):
        row: dict[str, Any] = {}
        for has, key in ((True, "with_attribute"), (False, "without_attribute")):
            group = [
                im
                for im in plan.images
                if im.split == code and im.attributes[spurious.attribute] is has
            ]
            positive = sum(im.attributes[spurious.target] for im in group)
            row[key] = {
                "images": len(group),
                "with_target": positive,
                "target_rate": round(positive / max(1, len(group)), 6),
            }
        by_split[split] = row
    return {**spurious.model_dump(mode="json"), "by_split": by_split}


def world_description(plan: WorldPlan) -> dict[str, Any]:
    config = plan.config
    splits = {SPLIT_NAMES[k]: sum(1 for im in plan.images if im.split == k) for k in range(3)}
    extra = {"spurious": _spurious_report(plan)} if config.spurious is not None else {}
    return {
        "format": "llm2loss-world",
        "generator_version": GENERATOR_VERSION,
        "config": config.as_json(),
        "counts": {
            "images": len(plan.images),
            "identities": len({im.identity for im in plan.images}),
            "splits": splits,
        },
        "attribute_positive_rates": _positive_rates(plan.images),
        "hard_attributes": _hard_report(plan),
        "rendered_attributes": list(RENDERED_ATTRIBUTES),
        "unrendered_attributes": list(UNRENDERED_ATTRIBUTES),
        "attribute_rules": [
            {
                "name": rule.name,
                "level": rule.level,
                "rate": rule.rate,
                "when": [list(pair) for pair in rule.when],
                "excludes": list(rule.excludes),
                "none_of": list(rule.none_of),
                "region": rule.region,
                "rendered": rule.rendered,
            }
            for rule in ATTRIBUTE_RULES
        ],
        **extra,
    }


def read_world_json(root: Path) -> dict[str, Any] | None:
    path = Path(root) / WORLD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _matches(data: dict[str, Any] | None, config: WorldConfig) -> bool:
    return (
        data is not None
        and data.get("generator_version") == GENERATOR_VERSION
        and data.get("config") == json.loads(json.dumps(config.as_json()))
    )


def generate_world(
    config: WorldConfig,
    out_dir: Path,
    progress: ProgressFn | None = None,
    workers: int = 2,
) -> WorldSummary:
    """Write the world into `out_dir` (all or nothing); reuse it if it already holds this config."""
    out_dir = Path(out_dir).expanduser().absolute()
    existing = read_world_json(out_dir)
    if _matches(existing, config):
        return WorldSummary.from_world_json(out_dir, existing, reused=True)  # type: ignore[arg-type]
    if existing is None:
        check_world_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        images = partial / IMAGE_DIR
        images.mkdir(parents=True)
        plan = plan_world(config)
        render_images(image_jobs(plan), images, progress, workers)
        write_text_atomic(partial / ATTR_FILE, _attribute_table(plan))
        write_text_atomic(partial / IDENTITY_FILE, _pairs_table(plan, lambda im: im.identity))
        write_text_atomic(partial / PARTITION_FILE, _pairs_table(plan, lambda im: im.split))
        description = world_description(plan)
        write_json_atomic(partial / WORLD_FILE, description)
        current = read_world_json(out_dir)
        if _matches(current, config):  # another process finished the same world first
            return WorldSummary.from_world_json(out_dir, current, reused=True)  # type: ignore[arg-type]
        replace_dir(partial, out_dir)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return WorldSummary.from_world_json(out_dir, json.loads(json.dumps(description)), reused=False)


def check_world_target(out_dir: Path) -> None:
    """Raise FileExistsError unless `out_dir` is new or an empty folder: a world is written by
    replacing the folder whole, so anything else in it would be lost."""
    if not out_dir.exists():
        blocker = next((p for p in out_dir.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise FileExistsError(f"{out_dir}: {blocker} is a file, so no folder can be made there")
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder for a generated world")
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in out_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (
            f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        )
        raise FileExistsError(
            f"{out_dir} is not empty and is not a generated world (no {WORLD_FILE}; it holds "
            f"{shown}); choose an empty or new folder"
        )


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete half-built siblings left by generations that were killed (their process is gone)."""
    for sibling in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid_text = sibling.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
