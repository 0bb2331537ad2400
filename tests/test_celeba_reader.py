"""Reading CelebA roots: a generated world round-trips, every broken file is named with its line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.celeba import (
    CelebaFormatError,
    build_manifest,
    read_celeba,
    shard_keys,
)
from llm2loss_pipeline.core.world import WorldConfig, generate_world, plan_world

CONFIG = WorldConfig(seed=1, n_identities=5, images_per_identity=6, image_size=24)
ATTR, IDENT, PART = "list_attr_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader") / "world"
    generate_world(CONFIG, root, workers=1)
    return root


def test_round_trip_of_a_generated_world(world: Path):
    tables = read_celeba(world, check_images=True)
    assert tables.root == world
    assert tables.attributes.columns == ["sample_id", *CELEBA_ATTRIBUTES]
    assert all(tables.attributes[name].dtype == pl.Boolean for name in CELEBA_ATTRIBUTES)
    assert tables.identities.schema == {"sample_id": pl.String, "identity": pl.Int64}
    assert tables.partitions.schema == {"sample_id": pl.String, "split": pl.String}
    plan = plan_world(CONFIG)
    assert tables.n_samples == len(plan.images) == 30
    for position, image in enumerate(plan.images):
        row = tables.attributes.row(position, named=True)
        assert row["sample_id"] == plan.filename(position)
        assert {name: row[name] for name in CELEBA_ATTRIBUTES} == image.attributes
        assert tables.identities["identity"][position] == image.identity
        assert tables.partitions["split"][position] == ("train", "valid", "test")[image.split]


def _write_root(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    rows = [
        name + " " + " ".join(f"{1 if (i + k) % 3 == 0 else -1:2d}" for k in range(40))
        for i, name in enumerate(names)
    ]
    (root / ATTR).write_text("\n".join([str(n), " ".join(CELEBA_ATTRIBUTES) + " ", *rows]) + "\n")
    (root / IDENT).write_text("".join(f"{name} {i % 2 + 1}\n" for i, name in enumerate(names)))
    (root / PART).write_text("".join(f"{name} {min(i, 2)}\n" for i, name in enumerate(names)))
    return root


def _replace_line(file: str, line: int, text: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        lines = (root / file).read_text().splitlines()
        lines[line - 1] = text
        (root / file).write_text("\n".join(lines) + "\n")

    return mutate


def _attr_row(name: str, values: list[str]) -> str:
    return name + " " + " ".join(values)


PLUS = ["1"] * 40
BROKEN = {
    "count not an int": (_replace_line(ATTR, 1, "four"), ATTR, 1, "'four'"),
    "count disagrees": (_replace_line(ATTR, 1, "7"), ATTR, 1, "7 images but the file has 4"),
    "header differs": (
        _replace_line(ATTR, 2, " ".join(["5_o_Clock_Shadow", "Arched_Eyebrows", "Pretty"])),
        ATTR,
        2,
        "position 3 is 'Pretty', expected 'Attractive'",
    ),
    "header too short": (
        _replace_line(ATTR, 2, " ".join(CELEBA_ATTRIBUTES[:39])),
        ATTR,
        2,
        "39 names",
    ),
    "row too short": (
        _replace_line(ATTR, 4, _attr_row("000002.jpg", PLUS[:39])),
        ATTR,
        4,
        "found 40",
    ),
    "blank row": (_replace_line(ATTR, 5, "   "), ATTR, 5, "found 0"),
    "bad value": (
        _replace_line(ATTR, 5, _attr_row("000003.jpg", ["1"] * 4 + ["0"] + ["1"] * 35)),
        ATTR,
        5,
        "column Bald has value '0'",
    ),
    "duplicate id": (_replace_line(ATTR, 6, _attr_row("000002.jpg", PLUS)), ATTR, 6, "000002.jpg"),
    "identity not int": (_replace_line(IDENT, 2, "000002.jpg x17"), IDENT, 2, "'x17'"),
    "identity row too long": (_replace_line(IDENT, 3, "000003.jpg 1 2"), IDENT, 3, "found 3"),
    "duplicate identity id": (_replace_line(IDENT, 4, "000001.jpg 1"), IDENT, 4, "000001.jpg"),
    "partition code": (_replace_line(PART, 3, "000003.jpg 3"), PART, 3, "code 3"),
    "partition not int": (_replace_line(PART, 1, "000001.jpg train"), PART, 1, "'train'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_names_file_and_line(tmp_path: Path, case: str):
    mutate, file, line, detail = BROKEN[case]
    root = _write_root(tmp_path / "root")
    read_celeba(root)  # the unbroken fixture is valid
    mutate(root)
    with pytest.raises(CelebaFormatError) as excinfo:
        read_celeba(root)
    message = str(excinfo.value)
    assert f"{file} line {line}" in message
    assert detail in message


@pytest.mark.parametrize("file", [ATTR, IDENT, PART])
def test_missing_file_names_file_and_root(tmp_path: Path, file: str):
    root = _write_root(tmp_path / "root")
    (root / file).unlink()
    with pytest.raises(CelebaFormatError, match=file) as excinfo:
        read_celeba(root)
    assert str(root) in str(excinfo.value)


def test_empty_attribute_file(tmp_path: Path):
    root = _write_root(tmp_path / "root")
    (root / ATTR).write_text("")
    with pytest.raises(CelebaFormatError, match=f"{ATTR} line 1: file is empty"):
        read_celeba(root)


def test_ids_that_disagree_between_files_are_named(tmp_path: Path):
    root = _write_root(tmp_path / "root", n=9)
    lines = (root / IDENT).read_text().splitlines()
    (root / IDENT).write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(CelebaFormatError) as excinfo:
        read_celeba(root)
    message = str(excinfo.value)
    assert f"{IDENT} lacks 1 sample ids" in message and "000003.jpg" in message
    root2 = _write_root(tmp_path / "root2", n=3)
    with (root2 / PART).open("a") as handle:
        handle.write("000099.jpg 2\n")
    with pytest.raises(CelebaFormatError, match=rf"{ATTR} lacks 1 sample ids.*000099\.jpg"):
        read_celeba(root2)


def test_any_whitespace_and_line_endings_are_accepted(tmp_path: Path):
    root = _write_root(tmp_path / "root")
    reference = read_celeba(root)
    for file in (ATTR, IDENT, PART):
        text = (root / file).read_text()
        spaced = "\r\n".join(
            "\t " + line.replace(" ", " \t  ") + "  " for line in text.splitlines()
        )
        (root / file).write_text(spaced + "\r\n\r\n")
    again = read_celeba(root)
    assert again.attributes.equals(reference.attributes)
    assert again.identities.equals(reference.identities)
    assert again.partitions.equals(reference.partitions)


def test_check_images_names_missing_and_broken_images(world: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(world, root)
    (root / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(CelebaFormatError, match=r"lacks 1 images.*000004\.jpg"):
        read_celeba(root, check_images=True)
    read_celeba(root)  # without the image check the tables still read
    shutil.copy(world / "img_align_celeba" / "000004.jpg", root / "img_align_celeba" / "000004.jpg")
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"")
    data = (world / "img_align_celeba" / "000009.jpg").read_bytes()
    (root / "img_align_celeba" / "000009.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CelebaFormatError) as excinfo:
        read_celeba(root, check_images=True)
    message = str(excinfo.value)
    assert "2 unreadable images" in message
    assert "000002.jpg: zero-byte file" in message and "000009.jpg" in message


def test_manifest_columns_order_and_shards(world: Path):
    tables = read_celeba(world)
    manifest = build_manifest(tables, shard_size=8)
    assert manifest.schema == {
        "sample_id": pl.String,
        "index": pl.Int64,
        "path": pl.String,
        "split": pl.String,
        "identity": pl.Int64,
        "shard": pl.String,
    }
    assert manifest["sample_id"].to_list() == sorted(manifest["sample_id"].to_list())
    assert manifest["index"].to_list() == list(range(30))
    assert manifest["shard"].to_list() == [f"shard-{i // 8:05d}" for i in range(30)]
    assert sorted(set(manifest["shard"])) == shard_keys(30, 8)
    for path in manifest["path"]:
        assert Path(path).is_absolute() and Path(path).is_file()
    joined = manifest.join(tables.identities, on="sample_id", suffix="_t")
    assert (joined["identity"] == joined["identity_t"]).all()
    assert set(manifest["split"]) == {"train", "valid", "test"}


def test_shard_keys():
    assert shard_keys(10, 4) == ["shard-00000", "shard-00001", "shard-00002"]
    assert shard_keys(8, 4) == ["shard-00000", "shard-00001"]
    assert shard_keys(0, 4) == []
    assert len(shard_keys(202_599, 5_000)) == 41
    with pytest.raises(ValueError, match="shard_size"):
        shard_keys(10, 0)
