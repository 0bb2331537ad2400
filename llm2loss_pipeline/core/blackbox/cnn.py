"""The built-in identity classifiers, and the preprocessing that feeds them.

The models take uint8 RGB images (N, 3, H, W) and do the scaling and normalisation themselves, as
their first layer: a batch then crosses to the device as bytes (4x less than float32), the
per-image work in the data loader is only decode + resize, and the normalisation constants travel
with the checkpoint instead of living in a separate transform that could drift.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from llm2loss_pipeline.core.blackbox.config import ARCHITECTURES
from llm2loss_pipeline.core.choices import one_of

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class InputNormalize(nn.Module):
    """uint8 [0, 255] (or float [0, 1]) RGB -> standardised float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Not persistent: the constants are recorded in the checkpoint sidecar, not as weights.
        shape = (1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
        std_t = torch.tensor(std, dtype=torch.float32).view(shape)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
        self.register_buffer("scale_u8", 1.0 / (255.0 * std_t), False)
        self.register_buffer("scale", 1.0 / std_t, False)
        self.register_buffer("shift", -mean_t / std_t, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return torch.addcmul(self.shift, x.to(torch.float32), self.scale_u8)
        return torch.addcmul(self.shift, x, self.scale)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A 4x4 stride-4 patch stem, four 3x3 conv-BN-ReLU layers, global average pool, linear.

    Sized to train in a couple of minutes on two busy CPU cores on 64 px faces (about 7.5 M
    multiply-adds per image at width 32): the patch stem cuts the resolution to a quarter at once,
    which keeps the colours and coarse shapes that tell cartoon identities apart, and skips the
    full-resolution 3x3 layers that would cost most of the compute.
    """

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(3, w, 4, stride=4, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
            ),
            _conv_bn_relu(w, w, 1),
            _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 2 * w, 1),
            _conv_bn_relu(2 * w, 4 * w, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def build_model(
    arch: str,
    num_classes: int,
    image_size: int,
    *,
    width: int = 32,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> ImageClassifier:
    """A freshly initialised classifier (the caller seeds torch for reproducible weights)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 for a classifier, got {num_classes}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if one_of("arch", arch, ARCHITECTURES) == "small_cnn":
        backbone: nn.Module = SmallCNN(num_classes, width=width)
    else:
        # lazy: torchvision (+1,050 modules, 3.6 s of the definitions' load) for resnet18 only
        from torchvision.models import resnet18

        backbone = resnet18(weights=None, num_classes=num_classes)
    return ImageClassifier(backbone, mean, std)


class ResizeToUint8:
    """PIL RGB -> uint8 tensor (3, size, size): shorter side resized to `size`, centre crop.

    Also takes a decoded uint8 tensor [3, H, W] (`takes_tensor`: the dataset then uses the fast
    JPEG decoder); one already at the size passes through untouched, so it equals the PIL path.
    A class rather than a closure so that DataLoader worker processes can pickle it.
    """

    takes_tensor = True

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) == (3, self.size, self.size):
                return image
            image = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
        image = fit_square(image, self.size)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def __repr__(self) -> str:
        return f"ResizeToUint8(size={self.size})"


class ResizeToFloat(ResizeToUint8):
    """PIL RGB -> float32 tensor in [0, 1]: the default input for a user's model."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return super().__call__(image).to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return f"ResizeToFloat(size={self.size})"


def fit_square(image: Image.Image, size: int) -> Image.Image:
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # Resizing straight into the crop box avoids resampling pixels that would be thrown away.
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
