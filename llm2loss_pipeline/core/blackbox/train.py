"""Training the built-in identity classifier: deterministic for a seed, fast on a few CPU cores.

Every image is decoded once per run into a uint8 tensor cache (JPEG decoding every epoch is what
bounds training speed on two cores otherwise); only a data set too large for `cache_limit_bytes`
is streamed from disk each epoch. Augmentation (shifted crops with edge replication, horizontal
flips) is one gather per batch on the training device, drawn from a seeded generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from llm2loss_pipeline.core.blackbox.cnn import ResizeToUint8, build_model
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.device import DeviceSpec, deterministic
from llm2loss_pipeline.core.images import (
    ImageFolderDataset,
    UnreadableImagesError,
    collate_skipping,
    describe_bad_images,
)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch CPU threads (None or 0: leave torch's setting), restoring it after."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


Progress = Callable[[int, int, str], None]
"""progress(done, total, message): called after each unit of work (an epoch, a batch)."""

DEFAULT_CACHE_LIMIT_BYTES = 4 << 30
DECODE_BATCH = 256


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """The per-epoch curve and the final clean (eval-mode, no augmentation) metrics."""

    epochs: list[EpochStats]
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    num_classes: int
    n_train: int
    n_val: int
    seconds: float
    decode_seconds: float
    skipped: list[str] = field(default_factory=list)

    def curve_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            [asdict(row) for row in self.epochs],
            schema={
                "epoch": pl.Int64,
                "train_loss": pl.Float64,
                "train_accuracy": pl.Float64,
                "val_loss": pl.Float64,
                "val_accuracy": pl.Float64,
                "lr": pl.Float64,
                "seconds": pl.Float64,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainResult:
        data = dict(raw)
        data["epochs"] = [EpochStats(**row) for row in data["epochs"]]
        return cls(**data)


class _Images:
    """A labelled image set that yields uint8 batches, from a decoded cache or streamed."""

    def __init__(
        self,
        items: Sequence[tuple[str, str]],
        labels: np.ndarray,
        image_size: int,
        device_spec: DeviceSpec,
        on_bad_image: str,
        cache_limit_bytes: int,
    ) -> None:
        self.items = list(items)
        self.image_size = image_size
        self.device_spec = device_spec
        self.on_bad_image = on_bad_image
        self.skipped: list[str] = []
        self.skipped_positions: list[int] = []
        self._skipped_set: set[str] = set()
        self.cache: torch.Tensor | None = None
        self._streaming = False
        labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.items) * 3 * image_size * image_size <= cache_limit_bytes:
            positions, self.cache = self._decode_all()
            self.labels = labels_t[positions]
        else:
            self.labels = labels_t
            self._streaming = True

    def __len__(self) -> int:
        return len(self.labels) if self.cache is not None else len(self.items)

    def _loader(self, order: Sequence[int] | None, batch_size: int) -> DataLoader:
        # Always skip here: fail mode then lists every bad image at once (`check_bad_images`).
        dataset = ImageFolderDataset(
            self.items, transform=ResizeToUint8(self.image_size), on_bad_image="skip"
        )
        workers = self.device_spec.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_skipping,
            # Its own generator: a DataLoader otherwise draws its worker seed from the global
            # RNG, which would shift dropout's random stream between cached and streamed runs.
            generator=torch.Generator().manual_seed(0),
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _note_skipped(self, skipped: Any) -> None:
        for position in skipped:
            sample_id = self.items[int(position)][0]
            if sample_id not in self._skipped_set:  # streamed epochs meet the same bad files
                self._skipped_set.add(sample_id)
                self.skipped.append(sample_id)
                self.skipped_positions.append(int(position))
        if skipped and self.on_bad_image == "fail" and self._streaming:
            # streamed: the bad files are only met batch by batch; stop before training on more
            check_bad_images([self], "black box training")

    def bad_images(self) -> list[tuple[str, str, str]]:
        return describe_bad_images(self.items, self.skipped_positions)

    def _decode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        kept: list[torch.Tensor] = []
        chunks: list[torch.Tensor] = []
        for positions, batch, skipped in self._loader(None, DECODE_BATCH):
            self._note_skipped(skipped)
            if batch is not None and len(positions):
                kept.append(positions)
                chunks.append(batch)
        if not chunks:
            check_bad_images([self], "black box training")
            raise ValueError("no image could be decoded; every sample was skipped")
        return torch.cat(kept), torch.cat(chunks)

    def batches(
        self, batch_size: int, order: torch.Tensor | None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if self.cache is not None:
            index = order if order is not None else torch.arange(n)
            stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
            for start in range(0, stop, batch_size):
                chunk = index[start : start + batch_size]
                yield self.cache[chunk], self.labels[chunk]
            return
        sampler = order.tolist() if order is not None else None
        for positions, batch, skipped in self._loader(sampler, batch_size):
            self._note_skipped(skipped)
            if batch is None or len(positions) < (2 if drop_last else 1):
                continue
            yield batch, self.labels[positions]


def check_bad_images(sets: Sequence[_Images | None], where: str) -> None:
    """In fail mode, one error listing every unreadable image the given sets met."""

    present = [images for images in sets if images is not None]
    if not present or present[0].on_bad_image != "fail":
        return
    bad = [item for images in present for item in images.bad_images()]
    if bad:
        raise UnreadableImagesError(where, bad, "no model was trained or saved")


def _augment(x: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Random shifts (edges replicated) and horizontal flips, as one gather over the batch."""
    b, _, h, w = x.shape
    dy = torch.randint(-shift, shift + 1, (b,), generator=generator)
    dx = torch.randint(-shift, shift + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (torch.arange(h)[None, :] + dy[:, None]).clamp_(0, h - 1)
    cols = (torch.arange(w)[None, :] + dx[:, None]).clamp_(0, w - 1)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    device = x.device
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=device)[None, :, None, None]
    return x[
        batch_index,
        channel_index,
        rows.to(device)[:, None, :, None],
        cols.to(device)[:, None, None, :],
    ]


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation scales: decaying them only hurts."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: _Images, device: torch.device, device_spec: DeviceSpec
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in images.batches(device_spec.batch_size, None):
        x, y = _to_device(x, device), _to_device(y, device)
        with device_spec.autocast(device):
            logits = model(x)
        logits = logits.float()
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan
    return total_loss / count, correct / count


def train_classifier(
    items: Sequence[tuple[str, str]],
    labels: np.ndarray,
    val_items: Sequence[tuple[str, str]],
    val_labels: np.ndarray,
    config: BlackBoxConfig,
    device_spec: DeviceSpec,
    progress: Progress | None = None,
    *,
    num_classes: int | None = None,
    on_bad_image: str = "fail",
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
) -> tuple[nn.Module, TrainResult]:
    """Train `config.arch` on (items, labels) with class indices 0..C-1; validate on val_items.

    Returns the model in eval mode on the training device. Deterministic on CPU for a seed and
    `config.cpu_threads`: weights are initialised under `deterministic(config.seed)`, data order
    and augmentation come from a generator seeded with the same seed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    if len(items) != len(labels):
        raise ValueError(f"{len(items)} training items but {len(labels)} labels")
    if len(val_items) != len(val_labels):
        raise ValueError(f"{len(val_items)} validation items but {len(val_labels)} labels")
    if len(items) < 2:
        raise ValueError(f"training needs at least 2 images, got {len(items)}")
    classes = int(num_classes if num_classes is not None else labels.max() + 1)
    for name, split_items, split_labels in (
        ("training", items, labels),
        ("validation", val_items, val_labels),
    ):
        bad = np.flatnonzero((split_labels < 0) | (split_labels >= classes))
        if len(bad):
            examples = ", ".join(f"{split_items[i][0]}={split_labels[i]}" for i in bad[:5])
            raise ValueError(
                f"{len(bad)} {name} labels are outside 0..{classes - 1} (e.g. {examples})"
            )

    device = device_spec.torch_device()
    with cpu_threads(config.cpu_threads if device.type == "cpu" else None):
        return _train(
            items,
            labels,
            val_items,
            val_labels,
            config,
            device_spec,
            device,
            classes,
            progress,
            on_bad_image,
            cache_limit_bytes,
        )


# long: one training loop; its statement order fixes the RNG stream and LR schedule (bit-exact)
def _train(
    items: Sequence[tuple[str, str]],
    labels: np.ndarray,
    val_items: Sequence[tuple[str, str]],
    val_labels: np.ndarray,
    config: BlackBoxConfig,
    device_spec: DeviceSpec,
    device: torch.device,
    classes: int,
    progress: Progress | None,
    on_bad_image: str,
    cache_limit_bytes: int,
) -> tuple[nn.Module, TrainResult]:
    started = time.perf_counter()
    train_set = _Images(
        items, labels, config.image_size, device_spec, on_bad_image, cache_limit_bytes
    )
    val_set = (
        _Images(
            val_items, val_labels, config.image_size, device_spec, on_bad_image, cache_limit_bytes
        )
        if len(val_items)
        else None
    )
    check_bad_images([train_set, val_set], "black box training")
    decode_seconds = time.perf_counter() - started

    batch_size = min(config.batch_size, len(train_set))
    steps_per_epoch = max(1, len(train_set) // batch_size)
    total_steps = steps_per_epoch * config.epochs
    shift = max(1, config.image_size // 8)
    use_scaler = device.type == "cuda" and device_spec.precision == "fp16"

    with deterministic(config.seed):
        model = build_model(config.arch, classes, config.image_size, width=config.width)
        model.to(device)
        optimizer = torch.optim.AdamW(
            _parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.99)
        )
        # OneCycleLR divides by the length of its warm-up phase, which is zero (ZeroDivisionError)
        # or negative for 4 steps or fewer: such short runs follow the start of an 8-step cycle.
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 8), pct_start=0.25
        )
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        generator = torch.Generator().manual_seed(config.seed)
        curve: list[EpochStats] = []
        for epoch in range(1, config.epochs + 1):
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(train_set), generator=generator)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            steps = 0
            for x_cpu, y_cpu in train_set.batches(batch_size, order, drop_last=True):
                if steps == steps_per_epoch:
                    break
                x, y = _to_device(x_cpu, device), _to_device(y_cpu, device)
                if config.augment:
                    x = _augment(x, generator, shift)
                with device_spec.autocast(device):
                    logits = model(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                steps += 1
            # The streamed path may yield fewer steps (skipped images); keep the schedule aligned.
            for _ in range(steps, steps_per_epoch):
                schedule.step()
            val_loss, val_acc = (
                evaluate(model, val_set, device, device_spec)
                if val_set is not None
                else (None, None)
            )
            row = EpochStats(
                epoch=epoch,
                train_loss=float(loss_sum) / max(seen, 1),
                train_accuracy=int(correct) / max(seen, 1),
                val_loss=val_loss,
                val_accuracy=val_acc,
                lr=float(optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - epoch_started,
            )
            curve.append(row)
            if progress is not None:
                val_text = "" if val_acc is None else f", val acc {val_acc:.3f}"
                progress(
                    epoch,
                    config.epochs,
                    f"epoch {epoch}/{config.epochs}: train loss {row.train_loss:.3f}, "
                    f"train acc {row.train_accuracy:.3f}{val_text}",
                )

    model.eval()
    train_loss, train_acc = evaluate(model, train_set, device, device_spec)
    result = TrainResult(
        epochs=curve,
        train_loss=train_loss,
        train_accuracy=train_acc,
        val_loss=curve[-1].val_loss,
        val_accuracy=curve[-1].val_accuracy,
        num_classes=classes,
        n_train=len(train_set),
        n_val=len(val_set) if val_set is not None else 0,
        seconds=time.perf_counter() - started,
        decode_seconds=decode_seconds,
        skipped=train_set.skipped + (val_set.skipped if val_set is not None else []),
    )
    return model, result
