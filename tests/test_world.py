"""The generated face world: layout, determinism, attribute rules, hard attributes, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from pydantic import ValidationError

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.celeba import read_celeba
from llm2loss_pipeline.core.world import (
    ATTRIBUTE_RULES,
    RENDERED_ATTRIBUTES,
    WorldConfig,
    contact_sheet,
    generate_world,
    plan_world,
)
from llm2loss_pipeline.core.world.config import split_counts

TINY = WorldConfig(seed=3, n_identities=6, images_per_identity=6, image_size=32)
WORLD_FILES = (
    "list_attr_celeba.txt",
    "identity_CelebA.txt",
    "list_eval_partition.txt",
    "world.json",
)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "world"
    generate_world(TINY, root, workers=1)
    return root


@pytest.fixture(scope="module")
def medium_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("medium") / "world"
    config = WorldConfig(seed=11, n_identities=40, images_per_identity=10, image_size=24)
    generate_world(config, root, workers=2)
    return root


def test_same_config_gives_identical_bytes_for_any_worker_count(tiny_world: Path, tmp_path: Path):
    two_workers = generate_world(TINY, tmp_path / "two", workers=2)
    again = generate_world(TINY, tmp_path / "again", workers=1)
    assert not two_workers.reused and not again.reused
    reference = _all_bytes(tiny_world)
    assert len(reference) == 36 + len(WORLD_FILES)
    assert _all_bytes(tmp_path / "two") == reference
    assert _all_bytes(tmp_path / "again") == reference


def test_another_seed_gives_other_images(tiny_world: Path, tmp_path: Path):
    generate_world(TINY.model_copy(update={"seed": 4}), tmp_path / "other", workers=1)
    first = (tiny_world / "img_align_celeba" / "000001.jpg").read_bytes()
    other = (tmp_path / "other" / "img_align_celeba" / "000001.jpg").read_bytes()
    assert first != other
    assert (tiny_world / "list_attr_celeba.txt").read_text() != (
        tmp_path / "other" / "list_attr_celeba.txt"
    ).read_text()


def test_layout_matches_celeba(tiny_world: Path):
    images = sorted(p.name for p in (tiny_world / "img_align_celeba").iterdir())
    assert images == [f"{i:06d}.jpg" for i in range(1, 37)]
    with Image.open(tiny_world / "img_align_celeba" / "000001.jpg") as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    lines = (tiny_world / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == "36"
    assert tuple(lines[1].split()) == CELEBA_ATTRIBUTES
    assert len(lines) == 38
    assert lines[2].split()[0] == "000001.jpg" and len(lines[2].split()) == 41
    assert set(" ".join(lines[2:]).split()) - set(images) == {"1", "-1"}
    identity_rows = [
        row.split() for row in (tiny_world / "identity_CelebA.txt").read_text().splitlines()
    ]
    assert sorted({int(identity) for _, identity in identity_rows}) == [1, 2, 3, 4, 5, 6]
    partition_rows = (tiny_world / "list_eval_partition.txt").read_text().splitlines()
    codes = [int(row.split()[1]) for row in partition_rows]
    assert codes == sorted(codes), "like CelebA, train images are numbered first, then valid, test"
    assert codes.count(0) == 6 * split_counts(6, (0.6, 0.2, 0.2))[0]
    description = json.loads((tiny_world / "world.json").read_text())
    assert description["config"] == TINY.as_json()
    assert description["counts"] == {
        "images": 36,
        "identities": 6,
        "splits": {"train": 24, "valid": 6, "test": 6},
    }
    assert set(description["attribute_positive_rates"]) == set(CELEBA_ATTRIBUTES)


def test_every_identity_has_train_valid_and_test_images(medium_world: Path):
    tables = read_celeba(medium_world)
    joined = tables.identities.join(tables.partitions, on="sample_id")
    splits = joined.group_by("identity").agg(pl.col("split").n_unique())
    assert splits.height == 40
    assert splits["split"].to_list() == [3] * 40


def test_dependency_rules_hold_in_written_files(medium_world: Path):
    attrs = read_celeba(medium_world).attributes
    assert attrs.height == 400
    assert not (attrs["Goatee"] & attrs["No_Beard"]).any()
    for beard in ("Goatee", "Mustache", "Sideburns", "5_o_Clock_Shadow"):
        assert not (attrs[beard] & ~attrs["Male"]).any(), beard
        assert not (attrs[beard] & attrs["No_Beard"]).any(), beard
    hair = attrs.select("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair").sum_horizontal()
    assert hair.max() <= 1
    assert not (attrs["Bangs"] & attrs["Bald"]).any()
    assert not (attrs["Wavy_Hair"] & attrs["Straight_Hair"]).any()
    old = ~attrs["Young"]
    assert attrs["Gray_Hair"].filter(old).mean() > attrs["Gray_Hair"].filter(~old).mean() + 0.2


def test_dependency_rates_over_a_large_plan():
    plan = plan_world(WorldConfig(seed=5, n_identities=600, images_per_identity=5))
    rows = [image.attributes for image in plan.images]

    def rate(name: str, given) -> float:
        chosen = [row[name] for row in rows if given(row)]
        return sum(chosen) / len(chosen)

    assert rate("Gray_Hair", lambda r: not r["Young"]) > 5 * rate("Gray_Hair", lambda r: r["Young"])
    assert rate("Bald", lambda r: r["Male"]) > 10 * rate("Bald", lambda r: not r["Male"])
    assert rate("Bald", lambda r: r["Male"] and not r["Young"]) > rate(
        "Bald", lambda r: r["Male"] and r["Young"]
    )
    assert rate("Heavy_Makeup", lambda r: not r["Male"]) > 0.4
    assert rate("Heavy_Makeup", lambda r: r["Male"]) < 0.05
    assert rate("Wearing_Lipstick", lambda r: r["Heavy_Makeup"]) > 0.8
    assert rate("Mouth_Slightly_Open", lambda r: r["Smiling"]) > rate(
        "Mouth_Slightly_Open", lambda r: not r["Smiling"]
    )
    for row in rows:
        beard = any(row[n] for n in ("5_o_Clock_Shadow", "Goatee", "Mustache", "Sideburns"))
        assert row["No_Beard"] == (not beard)


def test_identity_attributes_are_fixed_and_image_attributes_vary():
    plan = plan_world(WorldConfig(seed=2, n_identities=30, images_per_identity=12))
    by_identity: dict[int, list[dict[str, bool]]] = {}
    for image in plan.images:
        by_identity.setdefault(image.identity, []).append(image.attributes)
    for rule in ATTRIBUTE_RULES:
        constant = all(len({row[rule.name] for row in rows}) == 1 for rows in by_identity.values())
        if rule.level == "identity":
            assert constant, rule.name
    for name in ("Smiling", "Mouth_Slightly_Open", "High_Cheekbones"):
        assert not all(len({row[name] for row in rows}) == 1 for rows in by_identity.values())


def test_rule_table_covers_every_attribute_and_draws_most():
    assert sorted(rule.name for rule in ATTRIBUTE_RULES) == sorted(CELEBA_ATTRIBUTES)
    assert len(RENDERED_ATTRIBUTES) >= 24
    for name in ("Eyeglasses", "Wearing_Hat", "Smiling", "Bald", "Male", "Young", "Blurry"):
        assert name in RENDERED_ATTRIBUTES


def _by_slot(config: WorldConfig, root: Path) -> dict[tuple[int, int], tuple[dict, bytes]]:
    plan = plan_world(config)
    return {
        (image.identity, image.slot): (
            image.attributes,
            (root / "img_align_celeba" / plan.filename(position)).read_bytes(),
        )
        for position, image in enumerate(plan.images)
    }


def _roughness(data: bytes) -> float:
    import io

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_hard_image_attribute_changes_only_images_that_have_it(tmp_path: Path):
    base = WorldConfig(seed=7, n_identities=8, images_per_identity=8, image_size=32)
    hard = base.model_copy(update={"hard_attributes": {"Eyeglasses": 1.0}})
    generate_world(base, tmp_path / "base", workers=1)
    summary = generate_world(hard, tmp_path / "hard", workers=1)
    plain, harder = _by_slot(base, tmp_path / "base"), _by_slot(hard, tmp_path / "hard")
    unchanged = changed = dropped = 0
    rough_plain, rough_hard = [], []
    for key, (plain_attributes, plain_data) in plain.items():
        if key not in harder:
            dropped += 1  # a train image dropped by effect (c)
            continue
        attributes, data = harder[key]
        if not attributes["Eyeglasses"] and attributes == plain_attributes:
            assert data == plain_data, key
            unchanged += 1
        elif attributes["Eyeglasses"]:
            assert data != plain_data
            changed += 1
            rough_hard.append(_roughness(data))
            rough_plain.append(_roughness(plain_data))
    assert unchanged > 20 and changed >= 5 and dropped >= 1
    assert np.mean(rough_hard) > np.mean(rough_plain) * 1.3, "occluders, noise: rougher images"
    report = summary.hard_attributes["Eyeglasses"]
    assert report["positive_rate"] > report["positive_rate_without_hardening"]
    assert report["images_affected"] == changed
    assert report["train_images_dropped"] == dropped


def test_hard_identity_attribute_drops_train_images_of_those_identities():
    base = WorldConfig(seed=9, n_identities=30, images_per_identity=10)
    hard = base.model_copy(update={"hard_attributes": {"Male": 1.0}})
    n_train = split_counts(10, base.split_fractions)[0]
    plan = plan_world(hard)
    train: dict[int, int] = {}
    male: dict[int, bool] = {}
    for image in plan.images:
        train[image.identity] = train.get(image.identity, 0) + (image.split == 0)
        male[image.identity] = image.attributes["Male"]
    assert any(male.values()) and not all(male.values())
    for identity, count in train.items():
        assert count == (round(n_train * 0.5) if male[identity] else n_train), identity
    splits_per_identity = {
        identity: {im.split for im in plan.images if im.identity == identity} for identity in train
    }
    assert all(splits == {0, 1, 2} for splits in splits_per_identity.values())
    assert plan.dropped_train["Male"] == sum(
        n_train - round(n_train * 0.5) for m in male.values() if m
    )


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"hard_attributes": {"Glasses": 0.5}}, "Glasses"),
        ({"hard_attributes": {"Eyeglasses": 1.5}}, "Eyeglasses"),
        ({"hard_attributes": {"Eyeglasses": -0.1}}, "Eyeglasses"),
        ({"n_identities": 1}, "n_identities"),
        ({"images_per_identity": 2}, "images_per_identity"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 1024}, "image_size"),
        ({"split_fractions": (0.5, 0.2, 0.2)}, "split_fractions"),
        ({"split_fractions": (0.8, 0.2, 0.0)}, "split_fractions"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(update: dict, field: str):
    with pytest.raises(ValidationError) as excinfo:
        WorldConfig(**update)
    assert field in str(excinfo.value)


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        TINY.seed = 5  # type: ignore[misc]


def test_complete_world_is_reused_and_a_foreign_folder_is_refused(tiny_world: Path, tmp_path: Path):
    stamp = os.stat(tiny_world / "world.json").st_mtime_ns
    summary = generate_world(TINY, tiny_world, workers=1)
    assert summary.reused and summary.n_images == 36
    assert os.stat(tiny_world / "world.json").st_mtime_ns == stamp
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="photos"):
        generate_world(TINY, foreign, workers=1)


def test_a_world_with_another_config_is_replaced(tmp_path: Path):
    root = tmp_path / "world"
    generate_world(TINY, root, workers=1)
    summary = generate_world(TINY.model_copy(update={"images_per_identity": 4}), root, workers=1)
    assert not summary.reused and summary.n_images == 24
    assert len(list((root / "img_align_celeba").iterdir())) == 24
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_generation_leaves_nothing(tmp_path: Path, workers: int):
    config = WorldConfig(n_identities=12, images_per_identity=6, image_size=16)
    seen = []

    def stop(done: int, total: int) -> None:
        seen.append((done, total))
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        generate_world(config, tmp_path / "world", progress=stop, workers=workers)
    assert seen and seen[0][1] == 72 and seen[0][0] < 72
    assert list(tmp_path.iterdir()) == []


def test_progress_reaches_the_total(tmp_path: Path):
    calls = []
    generate_world(TINY, tmp_path / "w", progress=lambda d, t: calls.append((d, t)), workers=1)
    assert calls[-1] == (36, 36)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_contact_sheet_writes_a_png(tiny_world: Path, tmp_path: Path):
    out = contact_sheet(tiny_world, tmp_path / "sheet.png", n=6, attributes=("Male", "Smiling"))
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width == 6 * 128 and image.height > 128
        pixels = np.asarray(image.convert("L"))
    assert pixels[:128].std() > 10, "faces, not a blank sheet"


def test_half_worlds_of_killed_generations_are_cleaned_up(tmp_path: Path):
    dead = tmp_path / ".world.partial-999999999-dead"
    alive = tmp_path / f".world.partial-{os.getpid()}-live"
    for folder in (dead, alive):
        (folder / "img_align_celeba").mkdir(parents=True)
    generate_world(TINY, tmp_path / "world", workers=1)
    assert not dead.exists(), "its process is gone: a leftover of a killed run"
    assert alive.exists(), "a running generation's folder is left alone"
