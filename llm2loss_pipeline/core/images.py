"""Loading images strictly: a bad file is an error that names it, never a silently padded picture.

PIL decodes lazily and, with `ImageFile.LOAD_TRUNCATED_IMAGES` set (some libraries set it), fills
the missing part of a truncated JPEG with grey. Here every image is decoded fully with that flag
off, so truncation and corruption surface where the file is read, with the path in the message.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from llm2loss_pipeline.core.choices import ON_BAD_IMAGE, one_of
from llm2loss_pipeline.core.env import MAX_IMAGE_PIXELS

try:  # torch is only needed for the Dataset; the loaders work without it
    import torch
    from torch.utils.data import Dataset
except ImportError:  # pragma: no cover - torch is a dependency of the package
    torch = None  # type: ignore[assignment]
    Dataset = object  # type: ignore[assignment,misc]

PathLike = str | os.PathLike[str]
_PIL_SETTINGS = threading.Lock()  # PIL's process-wide decoding switches, set per decode

MAX_PIXELS_ENV = MAX_IMAGE_PIXELS.name
DEFAULT_MAX_IMAGE_PIXELS = int(MAX_IMAGE_PIXELS.default)
"""The one cap on width x height of any image this module decodes (64 Mpx, 192 MB as RGB).

A small file can declare a huge canvas (a 20000x20000 JPEG of a few kB decodes to 1.2 GB), so
the size is read from the header and checked before any pixel is decoded, on every path (the
fast JPEG decoder included). `$LLM2LOSS_MAX_IMAGE_PIXELS` raises or lowers it; PIL's own
`MAX_IMAGE_PIXELS` is set to the same value so that there is one limit, not two."""


def max_image_pixels() -> int:
    """The pixel cap: `$LLM2LOSS_MAX_IMAGE_PIXELS` if set, else `DEFAULT_MAX_IMAGE_PIXELS`."""
    return MAX_IMAGE_PIXELS.read_int()


class ImageDecodeError(ValueError):
    """An image file is missing, empty, truncated or not decodable."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


SHOWN_BAD_IMAGES = 20


class UnreadableImagesError(ImageDecodeError):
    """Every unreadable image that one pass met, each as (sample_id, path, reason).

    `dataset.on_bad_image: fail` means one error listing them all, not a stop at the first: a
    user fixing a data set should not need one run per bad file.
    """

    def __init__(self, where: str, bad: Sequence[tuple[str, str, str]], outcome: str) -> None:
        self.bad = [tuple(item) for item in bad]
        self.path, self.reason = bad[0][1], bad[0][2]
        shown = "; ".join(
            f"{path} (sample {sid}): {why}" for sid, path, why in bad[:SHOWN_BAD_IMAGES]
        )
        more = f"; ... ({len(bad)} in all)" if len(bad) > SHOWN_BAD_IMAGES else ""
        ValueError.__init__(
            self,
            f"{where}: {len(bad)} unreadable image(s): {shown}{more}. Fix or remove them, "
            "or set dataset.on_bad_image: skip to leave them out (they are then listed in the "
            f"step's result); {outcome}",
        )


def describe_bad_images(
    items: Sequence[tuple[str, PathLike]], positions: Iterable[int]
) -> list[tuple[str, str, str]]:
    """(sample_id, path, reason) for the given positions of `items`, in position order."""
    return [
        (str(items[p][0]), str(items[p][1]), check_image(items[p][1]) or "could not be loaded")
        for p in sorted(set(int(p) for p in positions))
    ]


def _read_bytes(path: PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise ImageDecodeError(path, "zero-byte file")
    return data


def _check_pixels(path: PathLike, width: int, height: int) -> None:
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageDecodeError(
            path,
            f"{width}x{height} is {width * height} pixels, over the limit of {limit} "
            f"(a decompression bomb?); set ${MAX_PIXELS_ENV} higher if the image is genuine",
        )


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding; None if not found."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


@contextlib.contextmanager
def _pil_settings(max_pixels: int) -> Iterator[None]:
    """PIL's own bomb check at our cap, and truncated data an error, for one decode; both are
    process-wide, so they are restored after. Left set, a low cap failed other PIL work in the
    same process (the world renderer's crops, tests/test_world_spurious.py)."""
    with _PIL_SETTINGS:
        previous = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(path: PathLike, data: bytes, draft: bool) -> Image.Image:
    with _pil_settings(max_image_pixels()):
        return _decode_with_settings(path, data, draft)


def _decode_with_settings(path: PathLike, data: bytes, draft: bool) -> Image.Image:
    try:
        with warnings.catch_warnings():  # over the cap is an error just below, not a warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        size = _jpeg_size(data) if data[:2] == b"\xff\xd8" else None
        if size is not None:
            _check_pixels(path, *size)
        raise ImageDecodeError(
            path, f"declares more than {max_image_pixels()} pixels (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format (garbage bytes?)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        message = str(exc)
        reason = "truncated image data" if "runcated" in message else f"corrupt header ({message})"
        raise ImageDecodeError(path, reason) from None
    _check_pixels(path, image.width, image.height)  # from the header: nothing is decoded yet
    if draft and image.format == "JPEG":
        # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation is caught.
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    try:
        image.load()
    except OSError as exc:
        message = str(exc)
        reason = "truncated image data" if "runcated" in message else f"corrupt ({message})"
        raise ImageDecodeError(path, reason) from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path, f"corrupt ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16-bit grey is rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """Read and fully decode an image, as RGB; raise ImageDecodeError naming the path if bad."""
    data = _read_bytes(path)
    return to_rgb(_decode(path, data, draft=False))


def load_image_tensor(path: PathLike) -> Any:
    """Read and fully decode an image as a uint8 tensor [3, H, W], pixel-identical to `load_image`.

    Baseline and progressive JPEGs with one or three components go through torchvision's
    libjpeg-turbo binding: for the small images of a face data set it decodes about 3x faster
    than PIL (which spends most of a 64 px image in per-call overhead), and it raises on truncated
    or corrupt data just as strictly. Anything else (PNG, CMYK JPEG, or a JPEG torchvision
    rejects) goes through `load_image`, so every error carries the same path-naming message.
    """
    data = _read_bytes(path)
    if data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
        if size is not None:  # checked before the fast decoder allocates the canvas
            _check_pixels(path, *size)
        decoded = _decode_jpeg_fast(data)
        if decoded is not None:
            return decoded
    array = np.asarray(to_rgb(_decode(path, data, draft=False)))
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _decode_jpeg_fast(data: bytes) -> Any:
    try:
        # lazy: torchvision (about 1 s) stays off the Dagster definitions load
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - torchvision is a dependency of the package
        return None
    try:
        image = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED
        )
    except RuntimeError:
        return None  # PIL decodes it again and names the problem
    if image.shape[0] == 3:
        return image
    if image.shape[0] == 1:  # PIL's L -> RGB replicates the channel
        return image.expand(3, -1, -1).contiguous()
    return None  # CMYK / YCCK: PIL's conversion is the reference


def check_image(path: PathLike) -> str | None:
    """The reason `path` is not a usable image, or None if it decodes (JPEGs at 1/8 scale)."""
    try:
        _decode(path, _read_bytes(path), draft=True)
    except ImageDecodeError as exc:
        return exc.reason
    return None


def scan_images(paths: Iterable[PathLike], workers: int = 4) -> list[tuple[str, str]]:
    """Every bad image among `paths`, as (path, reason), in input order: one pass, all errors."""
    items = [str(p) for p in paths]
    if workers <= 1 or len(items) < 64:
        reasons = [check_image(p) for p in items]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image, items, chunksize=64))
    return [(p, r) for p, r in zip(items, reasons, strict=True) if r is not None]


class ImageFolderDataset(Dataset):  # type: ignore[misc,valid-type]
    """Images listed as (sample_id, path), yielding (position, tensor).

    With on_bad_image="skip" a bad image yields (position, None); `collate_skipping` drops it and
    reports its position, so a loader can record which samples had no result instead of dying.
    A transform with `takes_tensor = True` receives uint8 [3, H, W] tensors (`load_image_tensor`,
    the fast JPEG path) instead of PIL images.
    """

    def __init__(
        self,
        items: Sequence[tuple[str, PathLike]],
        transform: Callable[[Image.Image], Any],
        on_bad_image: str = "fail",
    ) -> None:
        one_of("on_bad_image", on_bad_image, ON_BAD_IMAGE)
        self.sample_ids = [sample_id for sample_id, _ in items]
        self.paths = [str(path) for _, path in items]
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._load = load_image_tensor if getattr(transform, "takes_tensor", False) else load_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        try:
            image = self._load(self.paths[position])
        except ImageDecodeError as exc:
            if self.on_bad_image == "fail":
                raise ImageDecodeError(
                    exc.path, f"{exc.reason} (sample {self.sample_ids[position]})"
                ) from None
            return position, None
        return position, self.transform(image)


def collate_skipping(batch: Sequence[tuple[int, Any]]) -> tuple[Any, Any, list[int]]:
    """(positions LongTensor, stacked tensors, skipped positions) for a batch with Nones.

    When every item of the batch is bad, the stacked tensor is an empty float tensor of shape (0,).
    """
    good = [(position, tensor) for position, tensor in batch if tensor is not None]
    skipped = [position for position, tensor in batch if tensor is None]
    positions = torch.tensor([position for position, _ in good], dtype=torch.long)
    stacked = torch.stack([tensor for _, tensor in good]) if good else torch.empty(0)
    return positions, stacked, skipped
