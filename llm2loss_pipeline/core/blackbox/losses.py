"""The per-sample loss pass: one batched forward pass of the black box, without gradients.

Output columns (in this order): sample_id, split, label (the target's output index), loss (the
per-sample task loss), predicted (argmax), correct, p_true (probability of the target), and
true_class_auroc: the fraction of the other classes whose score is strictly below the target's,
ties counting half. That is the one-vs-rest ranking AUROC of the true class for this one sample
(1.0: the target outranks every other class; 0.5: chance), the per-sample performance measure
that the paper's AUROC disparities aggregate.

Losses are computed in float32 from float32 scores even when the forward pass runs under
autocast: bf16 logits would quantise small losses to a handful of values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from queue import Empty, Full, Queue
from typing import TypeVar

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from llm2loss_pipeline.core.blackbox.checkpoint import LoadedModel, Preprocess
from llm2loss_pipeline.core.blackbox.config import NONFINITE_ACTIONS, TASK_LOSS_NAMES
from llm2loss_pipeline.core.blackbox.train import Progress, cpu_threads
from llm2loss_pipeline.core.blackbox.user_model import prepared_for_inference
from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.images import ImageFolderDataset, collate_skipping

LOSS_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String(),
    "split": pl.String(),
    "label": pl.Int64(),
    "loss": pl.Float64(),
    "predicted": pl.Int64(),
    "correct": pl.Boolean(),
    "p_true": pl.Float64(),
    "true_class_auroc": pl.Float64(),
}
MAX_NAMED = 10
T = TypeVar("T")


@dataclass(frozen=True)
class LossResult:
    """The loss table; `dropped` (non-finite loss) and `skipped` (unreadable image) sample ids."""

    frame: pl.DataFrame
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _cross_entropy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) with scores taken as logits."""
    return torch.log_softmax(scores, dim=1).gather(1, targets[:, None]).squeeze(1)


def _nll(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) with scores already log-probabilities (a model ending in log_softmax)."""
    return scores.gather(1, targets[:, None]).squeeze(1)


TASK_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "nll": _nll,
}
"""Task loss name -> log p(target | x) from float32 scores; the loss is its negation."""


def true_class_auroc(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: (#other classes scored strictly below the target + ties / 2) / (C - 1)."""
    num_classes = scores.shape[1]
    if num_classes < 2:
        raise ValueError("true_class_auroc needs at least 2 classes")
    target_score = scores.gather(1, targets[:, None])
    below = (scores < target_score).sum(1).to(torch.float64)
    ties = (scores == target_score).sum(1).to(torch.float64) - 1.0  # the target ties itself
    return (below + 0.5 * ties) / (num_classes - 1)


def _name_some(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_NAMED])
    return f"{shown}{', ...' if len(ids) > MAX_NAMED else ''} ({len(ids)} in all)"


def compute_losses(
    model_or_loaded: nn.Module | LoadedModel,
    items: Sequence[tuple[str, str]],
    labels: np.ndarray | Sequence[int],
    splits: Sequence[str],
    preprocess: Preprocess | None = None,
    device_spec: DeviceSpec | None = None,
    on_bad_image: str = "fail",
    nonfinite: str = "error",
    progress: Progress | None = None,
    *,
    loss: str = "cross_entropy",
    threads: int | None = 1,
) -> LossResult:
    """Per-sample task loss of the model on `items` (sample_id, path), in input order.

    labels are the target output indices (dataset labels already mapped through the label map).
    The model is put in eval mode on the spec's device; on the CPU the pass runs with `threads`
    torch threads (None or 0: torch's setting; see BlackBoxConfig.cpu_threads). Unreadable
    images fail, or with on_bad_image="skip" are left out and listed in `skipped`; non-finite
    losses raise a ValueError naming the samples, or with nonfinite="drop" are left out and
    listed in `dropped`.
    """

    if isinstance(model_or_loaded, LoadedModel):
        model = model_or_loaded.model
        preprocess = preprocess or model_or_loaded.preprocess
    else:
        model = model_or_loaded
    if preprocess is None:
        raise ValueError("compute_losses needs a preprocess (PIL image -> tensor) for a bare model")
    one_of("loss", loss, TASK_LOSS_NAMES)
    one_of("nonfinite", nonfinite, NONFINITE_ACTIONS)
    targets_all = np.asarray(labels, dtype=np.int64)
    if not (len(items) == len(targets_all) == len(splits)):
        raise ValueError(
            f"items ({len(items)}), labels ({len(targets_all)}) and splits ({len(splits)}) "
            "must have the same length"
        )
    negative = np.flatnonzero(targets_all < 0)
    if len(negative):
        raise ValueError(
            f"negative labels for samples {_name_some([items[i][0] for i in negative])}"
        )
    spec = device_spec or DeviceSpec(device="cpu")
    device = spec.torch_device()
    with cpu_threads(threads if device.type == "cpu" else None):
        return _compute(
            model,
            items,
            targets_all,
            splits,
            preprocess,
            spec,
            device,
            on_bad_image,
            nonfinite,
            progress,
            TASK_LOSSES[loss],
        )


def _compute(
    model: nn.Module,
    items: Sequence[tuple[str, str]],
    targets_all: np.ndarray,
    splits: Sequence[str],
    preprocess: Preprocess,
    spec: DeviceSpec,
    device: torch.device,
    on_bad_image: str,
    nonfinite: str,
    progress: Progress | None,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> LossResult:
    model = prepared_for_inference(model, device)
    targets_cpu = torch.from_numpy(targets_all)
    loader = _loader(items, preprocess, on_bad_image, spec, device)
    total_batches = len(loader)
    # Without worker processes, decode the next batch on a thread while this one runs: the JPEG
    # decoders (torchvision's, PIL's) and torch's kernels release the GIL, so they overlap.
    batches = prefetched(loader) if spec.num_workers == 0 else loader

    kept: list[torch.Tensor] = []
    outputs: dict[str, list[torch.Tensor]] = {"logp": [], "pred": [], "auroc": []}
    skipped_positions: list[int] = []
    num_classes: int | None = None
    with torch.inference_mode():
        for batch_no, (positions, x, skipped) in enumerate(batches, start=1):
            skipped_positions.extend(int(p) for p in skipped)
            if x is not None and len(positions):
                targets = targets_cpu[positions].to(device, non_blocking=True)
                with spec.autocast(device):
                    scores = model(x.to(device, non_blocking=True))
                scores = _checked_scores(scores, len(positions))
                if num_classes is None:
                    num_classes = _checked_classes(scores, targets_all, items)
                outputs["logp"].append(task_loss(scores, targets))
                outputs["pred"].append(scores.argmax(1))
                outputs["auroc"].append(true_class_auroc(scores, targets))
                kept.append(positions)
            if progress is not None:
                progress(batch_no, total_batches, f"loss pass: batch {batch_no}/{total_batches}")

    skipped_ids = [items[p][0] for p in sorted(skipped_positions)]
    if not kept:
        return LossResult(frame=pl.DataFrame(schema=LOSS_SCHEMA), skipped=skipped_ids)
    position = torch.cat(kept).numpy()
    log_p = torch.cat(outputs["logp"]).double().cpu().numpy()
    predicted = torch.cat(outputs["pred"]).cpu().numpy().astype(np.int64)
    auroc = torch.cat(outputs["auroc"]).cpu().numpy()
    order = np.argsort(position, kind="stable")
    position, predicted, auroc = position[order], predicted[order], auroc[order]
    per_sample_loss = -log_p[order]
    # -0.0 from log_softmax of a certain prediction reads oddly in a table; it is 0.
    per_sample_loss[per_sample_loss == 0.0] = 0.0

    dropped_ids: list[str] = []
    finite = np.isfinite(per_sample_loss)
    if not finite.all():
        bad_ids = [items[p][0] for p in position[~finite]]
        if nonfinite == "error":
            raise ValueError(
                f"non-finite loss (NaN or inf) for samples {_name_some(bad_ids)}; the model "
                "produced non-finite scores for them. Set black_box.nonfinite: drop to leave "
                "them out and report them."
            )
        dropped_ids = bad_ids
        position, per_sample_loss = position[finite], per_sample_loss[finite]
        predicted, auroc = predicted[finite], auroc[finite]

    target = targets_all[position]
    frame = pl.DataFrame(
        {
            "sample_id": [items[p][0] for p in position],
            "split": [splits[p] for p in position],
            **_loss_columns(target, per_sample_loss, predicted, auroc),
        },
        schema=LOSS_SCHEMA,
    )
    return LossResult(frame=frame, dropped=dropped_ids, skipped=skipped_ids)


def _loader(
    items: Sequence[tuple[str, str]],
    preprocess: Preprocess,
    on_bad_image: str,
    spec: DeviceSpec,
    device: torch.device,
) -> DataLoader:
    """The images in order; a bad image is skipped or fails as `on_bad_image` says."""

    return DataLoader(
        ImageFolderDataset(list(items), transform=preprocess, on_bad_image=on_bad_image),
        shuffle=False,
        collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(0),  # leave the caller's global RNG untouched
        **spec.loader_kwargs(device),
    )


def _loss_columns(
    target: np.ndarray, loss: np.ndarray, predicted: np.ndarray, auroc: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        "label": target,
        "loss": loss,
        "predicted": predicted,
        "correct": predicted == target,
        "p_true": np.exp(-loss),
        "true_class_auroc": auroc,
    }


def prefetched(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `iterable` on a background thread, up to `depth` items ahead.

    Exceptions from the producer are re-raised in the consumer; when the consumer stops early
    (an error in the loop body), the producer thread is told to stop and is joined.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        queue.put((item, None), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put((done, exc))

    thread = threading.Thread(target=produce, name="llm2loss-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(Empty):
                queue.get_nowait()  # unblock a producer waiting on a full queue
            thread.join(timeout=0.05)


def _checked_scores(scores: object, batch: int) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != batch:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"the model must return a (batch, classes) tensor; for a batch of {batch} it "
            f"returned {shape}"
        )
    return scores.float()


def _checked_classes(
    scores: torch.Tensor, targets: np.ndarray, items: Sequence[tuple[str, str]]
) -> int:
    num_classes = int(scores.shape[1])
    if num_classes < 2:
        raise ValueError(f"the model has {num_classes} output; a classifier needs 2 or more")
    too_big = np.flatnonzero(targets >= num_classes)
    if len(too_big):
        raise ValueError(
            f"the model has {num_classes} outputs but samples "
            f"{_name_some([items[i][0] for i in too_big])} have labels >= {num_classes}"
        )
    return num_classes
