"""Saving and loading the built-in black box: safetensors weights plus a JSON sidecar.

The sidecar carries everything needed to rebuild and trust the model without pickle: the
architecture, class count, image size and normalisation constants, the label map, the training
config, the final train/validation metrics and the per-epoch curve, and the weights' sha256
(checked on load by core/storage, so a modified or half-written checkpoint is refused).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from llm2loss_pipeline.core.blackbox.cnn import IMAGE_MEAN, IMAGE_STD, ResizeToUint8, build_model
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.labels import label_map_from_json, label_map_to_json
from llm2loss_pipeline.core.blackbox.train import TrainResult
from llm2loss_pipeline.core.storage import (
    StorageError,
    atomic_path,
    load_checkpoint,
    save_checkpoint,
)

CHECKPOINT_KIND = "llm2loss.black_box"
FORMAT_VERSION = 1

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass
class LoadedModel:
    """A ready-to-run black box: the module (eval mode, on its device) and how to feed it.

    label_map is dataset label (identity) -> output index, or None where the caller supplies it
    (a user's model whose label map is a separate file).
    """

    model: nn.Module
    preprocess: Preprocess
    label_map: dict[int, int] | None
    meta: dict[str, Any]


def save_black_box(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    label_map: Mapping[int, int],
    config: BlackBoxConfig,
    train_result: TrainResult,
    task: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out_path` (.safetensors) and its .json sidecar atomically; return the sidecar.
    `task` (core/task.py, as JSON) is what the model predicts; the loss pass reads it back."""
    if len(label_map) and max(label_map.values()) >= num_classes:
        raise ValueError(
            f"the label map uses output index {max(label_map.values())} but the model has "
            f"{num_classes} outputs"
        )
    meta = {
        "kind": CHECKPOINT_KIND,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "width": int(config.width),
        "input": "uint8 RGB (N, 3, H, W); the model scales by 1/255 and normalises itself",
        "normalisation": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "label_map": label_map_to_json(label_map),
        "config": config.model_dump(mode="json"),
        "metrics": {
            "train_accuracy": train_result.train_accuracy,
            "train_loss": train_result.train_loss,
            "val_accuracy": train_result.val_accuracy,
            "val_loss": train_result.val_loss,
            "n_train": train_result.n_train,
            "n_val": train_result.n_val,
            "train_seconds": train_result.seconds,
        },
        "curve": [row.__dict__ for row in train_result.epochs],
        "skipped": list(train_result.skipped),
    }
    if task is not None:
        meta["task"] = dict(task)
    return save_checkpoint(out_path, model.state_dict(), meta)


def load_black_box(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved black box on `device`, refusing a checkpoint whose sha256 does not match."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise StorageError(f"{path}: not a black-box checkpoint (kind {meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StorageError(
            f"{path}: checkpoint format {meta.get('format_version')} is not the supported "
            f"{FORMAT_VERSION}; retrain the black box"
        )
    norm = meta["normalisation"]
    model = build_model(
        meta["arch"],
        meta["num_classes"],
        meta["image_size"],
        width=meta.get("width", 32),
        mean=norm["mean"],
        std=norm["std"],
    )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise StorageError(f"{path}: weights do not fit {meta['arch']}: {exc}") from exc
    model.to(torch.device(device)).eval()
    return LoadedModel(
        model=model,
        preprocess=ResizeToUint8(meta["image_size"]),
        label_map=label_map_from_json(meta["label_map"]),
        meta=meta,
    )


def plot_training_curve(train_result: TrainResult, out_png: str | os.PathLike[str]) -> Path:
    """Loss and accuracy per epoch, train vs validation, as a PNG (written atomically)."""
    # lazy: matplotlib (+150 modules, 0.6 s of the definitions' load) for one chart
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row.epoch for row in train_result.epochs]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [row.train_loss for row in train_result.epochs], "o-", label="train")
    acc_ax.plot(epochs, [row.train_accuracy for row in train_result.epochs], "o-", label="train")
    if any(row.val_loss is not None for row in train_result.epochs):
        val_loss = [row.val_loss for row in train_result.epochs]
        val_acc = [row.val_accuracy for row in train_result.epochs]
        loss_ax.plot(epochs, val_loss, "s-", label="validation")
        acc_ax.plot(epochs, val_acc, "s-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(
        f"black box: train acc {train_result.train_accuracy:.3f}"
        + (
            f", validation acc {train_result.val_accuracy:.3f}"
            if train_result.val_accuracy is not None
            else ""
        )
    )
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png")
    return Path(out_png)
