"""Encoder steps: obtain the language-compatible encoder, then embed every sample of a shard."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm2loss_pipeline.core.attribute_set import with_home_phrasings
from llm2loss_pipeline.core.blackbox.train import cpu_threads
from llm2loss_pipeline.core.config import DatasetConfig
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder.checkpoint import load_encoder, loading_snippet, save_encoder
from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.encoder.embed import embed_images
from llm2loss_pipeline.core.encoder.evaluate import (
    prompt_texts,
    retrieval_accuracy,
    zero_shot_auroc,
)
from llm2loss_pipeline.core.encoder.factory import build_encoder
from llm2loss_pipeline.core.encoder.text_index import text_index
from llm2loss_pipeline.core.encoder.train import train_caption_tuned
from llm2loss_pipeline.core.env import CPU_THREADS
from llm2loss_pipeline.core.layout import EMBEDDINGS_TABLE, Layout
from llm2loss_pipeline.core.prompts import caption_for
from llm2loss_pipeline.core.steps.tables import (
    fail_on_bad_images,
    items_of,
    read_manifest,
    read_shards,
    shard_rows,
    write_shard,
)
from llm2loss_pipeline.core.storage import sha256_file

VALIDATION_SAMPLE = 2000
"""Validation images used for the encoder's zero-shot and retrieval metrics (enough for stable
AUROCs; all of them would cost a full embedding pass of the valid split on real data)."""


@dataclass(frozen=True)
class EncoderResult:
    mode: str
    path: Path
    sha256: str
    embed_dim: int
    load_snippet: str
    metrics: dict[str, float]
    zero_shot_auroc: dict[str, float] = field(default_factory=dict)
    train_precision: str | None = None
    """what the image tower trained in ("auto" resolved); None: nothing was trained"""


@dataclass(frozen=True)
class EmbeddingShardResult:
    frame: pl.DataFrame
    path: Path
    sha256: str
    embed_dim: int
    encoder_sha256: str
    skipped: list[Any] = field(default_factory=list)


def _rows_with_attributes(layout: Layout, rows: pl.DataFrame) -> list[dict[str, bool]]:
    if not layout.attributes.exists():
        raise FileNotFoundError(
            f"{layout.attributes} is missing: materialize celeba_attributes first (llm2loss run)"
        )
    attributes = pl.read_parquet(layout.attributes)
    joined = rows.select("sample_id", "index").join(attributes, on="sample_id", how="left")
    return joined.sort("index").drop("sample_id", "index").to_dicts()


def fit_encoder(
    layout: Layout,
    config: EncoderConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None = None,
    *,
    on_bad_image: str = "fail",
) -> EncoderResult:
    """`on_bad_image` is `dataset.on_bad_image`: fail listing every unreadable training image,
    or train without them and record them in the sidecar's metrics."""
    with pinned_cpu_threads(device):
        return _fit_encoder(layout, config, device, progress, on_bad_image)


CPU_THREADS_ENV = CPU_THREADS.name


def pinned_cpu_threads(device: DeviceSpec, threads: int | None = None) -> Any:
    """A fixed number of torch threads while a CPU step runs, restored after: `threads`, else
    `$LLM2LOSS_CPU_THREADS` (default 2, the encoder's training).

    Float sums split over threads add their partial sums in an order that depends on the
    thread count, so with torch's default (one thread per core) the same seed gave other
    encoder weights on another machine: on the tiny world OMP_NUM_THREADS=1 and =2 trained
    different encoders (issue 23: report Spearman 0.350 vs 0.317, p 0.040 vs 0.063). With a
    fixed count the weights are identical whatever the core count (measured: the same sha256
    with 1 and 2 OpenMP threads; bench/RESULTS.md, Red team, round two). The count is the
    result's, not the machine's: `$LLM2LOSS_CPU_THREADS=N` trades speed on a large CPU for
    results that match other runs with the same N. On a GPU this changes nothing.
    """
    cpu = device.torch_device().type == "cpu"
    return cpu_threads((threads or fixed_cpu_threads()) if cpu else None)


def fixed_cpu_threads() -> int:
    """`$LLM2LOSS_CPU_THREADS` (a whole number >= 1), default 2."""
    return CPU_THREADS.read_int()


# Captions phrase each attribute as the dataset's probes file says (else curated or built).
@with_home_phrasings
def _fit_encoder(
    layout: Layout,
    config: EncoderConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None,
    on_bad_image: str,
) -> EncoderResult:
    manifest = read_manifest(layout)
    encoder = build_encoder(config, device.torch_device())
    metrics: dict[str, Any] = {}
    train_precision = None
    if config.mode == "caption_tuned":
        train = manifest.filter(pl.col("split") == "train").sort("index")
        training = train_caption_tuned(
            encoder,
            items_of(train),
            _rows_with_attributes(layout, train),
            config,
            device,
            progress=progress,
            on_bad_image=on_bad_image,
        )
        metrics.update(
            {k: v for k, v in training.items() if isinstance(v, int | float) and k != "epochs"}
        )
        if training.get("skipped_images"):
            metrics["skipped_images"] = training["skipped_images"]
        train_precision = metrics["train_precision"] = training["precision"]  # and in the sidecar
    # "auto" buys training speed; the validation reads embeddings as the embeddings asset makes
    # them by default (fp32), so its AUROC is the one the report's embeddings have
    evaluated_on = (
        device.model_copy(update={"precision": "fp32"}) if device.precision == "auto" else device
    )
    zero_shot, validation = evaluate_encoder(layout, encoder, manifest, evaluated_on, config.seed)
    metrics.update(validation)
    encoder.metrics = {**metrics, "zero_shot_auroc": zero_shot}
    sidecar = save_encoder(encoder, layout.encoder_dir)
    # The report embeds the same prompts again (with the numpy text tower, seconds for 1,190 of
    # them); the index under the home hands them over, as it does to a later question.
    prompts = prompt_texts(zero_shot)
    index = text_index(layout.home, sidecar["sha256"], encoder.embed_dim)
    index.add(prompts, encoder.encode_texts(prompts))
    return EncoderResult(
        mode=config.mode,
        path=layout.encoder_dir,
        sha256=sidecar["sha256"],
        embed_dim=encoder.embed_dim,
        load_snippet=loading_snippet(layout.encoder_dir),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        zero_shot_auroc=zero_shot,
        train_precision=train_precision,
    )


def evaluate_encoder(
    layout: Layout, encoder: Any, manifest: pl.DataFrame, device: DeviceSpec, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Zero-shot attribute AUROC and caption retrieval on (a sample of) the validation split."""
    valid = manifest.filter(pl.col("split") == "valid").sort("index")
    if valid.height > VALIDATION_SAMPLE:
        valid = valid.sample(VALIDATION_SAMPLE, seed=seed).sort("index")
    rows = _rows_with_attributes(layout, valid)
    embedded = embed_images(encoder, items_of(valid), device, on_bad_image="skip")
    keep = set(embedded.sample_ids)
    rows = [row for sid, row in zip(valid["sample_id"], rows, strict=True) if sid in keep]
    zero_shot = zero_shot_auroc(embedded.embeddings, pl.DataFrame(rows), encoder.encode_texts)
    rng = random.Random(seed)
    captions = [caption_for(row, rng) for row in rows]
    retrieval = retrieval_accuracy(embedded.embeddings, captions, encoder.encode_texts)
    finite = [value for value in zero_shot.values() if np.isfinite(value)]
    summary = {
        f"retrieval_{key}": float(value)
        for key, value in retrieval.items()
        if isinstance(value, int | float)
    }
    summary["zero_shot_auroc_mean"] = float(np.mean(finite)) if finite else float("nan")
    summary["n_validation_images"] = float(len(rows))
    return {k: float(v) for k, v in zero_shot.items()}, summary


def shard_embeddings(
    layout: Layout,
    shard: str,
    dataset: DatasetConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None = None,
) -> EmbeddingShardResult:
    rows = shard_rows(read_manifest(layout), shard)
    encoder = load_encoder(layout.encoder_dir, device.torch_device())
    # skip mode, so that in fail mode every bad image is listed at once just below
    # One thread, fixed: the same embeddings whatever the core count, and a backfill runs the
    # shards side by side, where more threads per process would spin-wait for each other
    with pinned_cpu_threads(device, threads=1):
        result = embed_images(
            encoder, items_of(rows), device, on_bad_image="skip", progress=progress
        )
    skipped_ids = [sample_id for sample_id, _ in result.skipped]
    fail_on_bad_images(EMBEDDINGS_TABLE, shard, rows, skipped_ids, dataset.on_bad_image)
    frame = embedding_frame(result.sample_ids, result.embeddings)
    path = write_shard(layout, EMBEDDINGS_TABLE, shard, frame, rows)  # with its sha256 sidecar
    return EmbeddingShardResult(
        frame=frame,
        path=path,
        sha256=sha256_file(path),
        embed_dim=encoder.embed_dim,
        encoder_sha256=str(encoder.sha256),
        skipped=list(result.skipped),
    )


def embedding_frame(sample_ids: list[str], embeddings: np.ndarray) -> pl.DataFrame:
    dim = int(embeddings.shape[1])
    return pl.DataFrame(
        {
            "sample_id": pl.Series(sample_ids, dtype=pl.Utf8),
            "embedding": pl.Series(embeddings.astype(np.float32), dtype=pl.Array(pl.Float32, dim)),
        }
    )


def read_embeddings(layout: Layout, manifest: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    """Every shard's embeddings, in manifest order."""
    frame = read_shards(layout, EMBEDDINGS_TABLE, manifest)
    return frame["sample_id"].to_list(), frame["embedding"].to_numpy().astype(np.float32)
