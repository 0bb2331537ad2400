"""Strict image loading: bad files are named errors, odd modes become RGB, loaders can skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from llm2loss_pipeline.core.images import (
    ImageDecodeError,
    ImageFolderDataset,
    check_image,
    collate_skipping,
    load_image,
    load_image_tensor,
    scan_images,
)


def _jpeg(path: Path, size: int = 64, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=90)
    return path


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = _jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: int(len(data) * 0.7)])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return {
        "good": good,
        "truncated": truncated,
        "empty": empty,
        "garbage": garbage,
        "missing": tmp_path / "missing.jpg",
    }


def test_good_jpeg_loads_as_rgb(files: dict[str, Path]):
    image = load_image(files["good"])
    assert image.mode == "RGB" and image.size == (64, 64)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing", "file does not exist"),
        ("empty", "zero-byte file"),
        ("truncated", "truncated image data"),
        ("garbage", "not a recognised image format"),
    ],
)
def test_bad_files_raise_with_path_and_reason(files: dict[str, Path], name: str, reason: str):
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(files[name])
    assert str(files[name]) in str(excinfo.value)
    assert reason in str(excinfo.value)
    assert excinfo.value.reason.startswith(reason)
    assert check_image(files[name]) is not None and check_image(files[name]).startswith(reason)


@pytest.mark.parametrize("name", ["missing", "empty", "truncated", "garbage"])
def test_fast_tensor_path_raises_the_same_named_errors(files: dict[str, Path], name: str):
    with pytest.raises(ImageDecodeError) as pil_error:
        load_image(files[name])
    with pytest.raises(ImageDecodeError) as fast_error:
        load_image_tensor(files[name])
    assert str(fast_error.value) == str(pil_error.value)


def _modes(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    paths = {name: tmp_path / f"{name}.jpg" for name in ("rgb", "grey", "cmyk", "progressive")}
    Image.fromarray(rgb, "RGB").save(paths["rgb"], format="JPEG", quality=85)
    Image.fromarray(rgb[..., 0], "L").save(paths["grey"], format="JPEG", quality=85)
    Image.fromarray(rgb, "RGB").convert("CMYK").save(paths["cmyk"], format="JPEG")
    Image.fromarray(rgb, "RGB").save(paths["progressive"], format="JPEG", progressive=True)
    paths["png"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(paths["png"])
    return paths


def test_fast_tensor_path_is_pixel_identical_to_pil(tmp_path: Path):
    for name, path in _modes(tmp_path).items():
        fast = load_image_tensor(path)
        reference = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 48, 40), name
        assert torch.equal(fast, reference), name


def test_truncation_is_caught_even_when_pil_is_told_to_pad(files: dict[str, Path]):
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageDecodeError, match="truncated"):
            load_image(files["truncated"])
        assert check_image(files["truncated"]) == "truncated image data"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the global flag is restored"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_directory_is_not_an_image(tmp_path: Path):
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_grayscale_becomes_rgb(tmp_path: Path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), "L").save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 8, 3) and (pixels == 77).all()


def test_rgba_is_composited_on_white(tmp_path: Path):
    path = tmp_path / "alpha.png"
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert (pixels[1:, :] == 255).all()


def test_palette_with_transparency_is_composited(tmp_path: Path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[0, 0]) == (250, 0, 0)
    assert tuple(pixels[3, 3]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image, dtype=np.int64).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_grey_is_rescaled(tmp_path: Path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels[..., 0].tolist() == [[0, 255], [128, 1]]


def test_scan_lists_every_bad_image_in_order(files: dict[str, Path], tmp_path: Path):
    goods = [_jpeg(tmp_path / f"ok{i}.jpg", size=16, seed=i) for i in range(70)]
    paths = [*goods[:30], files["truncated"], *goods[30:], files["empty"], files["missing"]]
    for workers in (1, 3):
        bad = scan_images(paths, workers=workers)
        assert bad == [
            (str(files["truncated"]), "truncated image data"),
            (str(files["empty"]), "zero-byte file"),
            (str(files["missing"]), "file does not exist"),
        ]


def test_dataset_fail_mode_names_sample(files: dict[str, Path]):
    dataset = ImageFolderDataset(
        [("a.jpg", files["good"]), ("b.jpg", files["truncated"])], _to_tensor
    )
    position, tensor = dataset[0]
    assert position == 0 and tensor.shape == (3, 64, 64)
    with pytest.raises(ImageDecodeError, match=r"truncated image data \(sample b.jpg\)"):
        dataset[1]


def test_dataset_skip_mode_and_collate(files: dict[str, Path]):
    items = [
        ("a.jpg", files["good"]),
        ("b.jpg", files["empty"]),
        ("c.jpg", files["good"]),
        ("d.jpg", files["garbage"]),
    ]
    dataset = ImageFolderDataset(items, _to_tensor, on_bad_image="skip")
    assert len(dataset) == 4 and dataset.sample_ids[3] == "d.jpg"
    assert dataset[1] == (1, None)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_skipping)
    batches = list(loader)
    positions, stacked, skipped = batches[0]
    assert positions.dtype == torch.long and positions.tolist() == [0, 2]
    assert stacked.shape == (2, 3, 64, 64)
    assert skipped == [1]
    positions, stacked, skipped = batches[1]
    assert positions.tolist() == [] and stacked.shape == (0,) and skipped == [3]


def test_dataset_rejects_unknown_mode(files: dict[str, Path]):
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageFolderDataset([("a", files["good"])], _to_tensor, on_bad_image="ignore")  # type: ignore[arg-type]
