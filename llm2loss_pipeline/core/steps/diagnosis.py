"""Diagnosis step: train the head ensemble on image embeddings, validate it on held-out losses."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from llm2loss_pipeline.core.attribute_set import diagnosed_attributes, with_home_phrasings
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder import load_encoder
from llm2loss_pipeline.core.encoder.text_index import known_first, text_index
from llm2loss_pipeline.core.heads.checkpoint import save_ensemble
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.heads.gap import fit_gap, measure_gap_effect
from llm2loss_pipeline.core.heads.train import train_ensemble
from llm2loss_pipeline.core.layout import EMBEDDINGS_TABLE, LOSSES_TABLE, Layout
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs, caption_for
from llm2loss_pipeline.core.steps.tables import read_manifest, read_shards, split_rows
from llm2loss_pipeline.core.storage import sha256_file, write_json_atomic, write_parquet_atomic

CAPTION_CORPUS_SIZE = 2000
"""Training captions embedded to estimate the text modality's mean (plus every attribute
prompt); the mean is stable long before this many."""


@dataclass(frozen=True)
class HeadsResult:
    path: Path
    sha256: str
    train_split: str
    eval_split: str
    n_train: int
    n_eval: int
    member_metrics: list[dict[str, Any]]
    kind_metrics: list[dict[str, Any]]
    gap_effect: list[dict[str, Any]]
    headline: dict[str, float] = field(default_factory=dict)


def read_kind_metrics(layout: Layout) -> list[dict[str, Any]]:
    path = layout.kind_metrics
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize diagnosis_heads first")
    return json.loads(path.read_text())


def training_frame(layout: Layout) -> pl.DataFrame:
    """Losses joined with embeddings and attributes, one row per sample with both signals."""
    manifest = read_manifest(layout)
    losses = read_shards(layout, LOSSES_TABLE, manifest).select("sample_id", "split", "loss")
    embeddings = read_shards(layout, EMBEDDINGS_TABLE, manifest)
    frame = losses.join(embeddings, on="sample_id", how="inner")
    if layout.attributes.exists():
        frame = frame.join(pl.read_parquet(layout.attributes), on="sample_id", how="left")
    return frame


def _identities(layout: Layout, rows: pl.DataFrame) -> np.ndarray | None:
    """The identity of every row (the bootstrap resamples identities), or None without one."""
    manifest = read_manifest(layout)
    if "identity" not in manifest.columns:
        return None
    joined = rows.select("sample_id").join(
        manifest.select("sample_id", "identity"), on="sample_id", how="left", maintain_order="left"
    )
    return np.array(
        [
            f"i{i}" if i is not None else f"s{s}"
            for i, s in zip(joined["identity"], joined["sample_id"], strict=True)
        ]
    )


def text_corpus(frame: pl.DataFrame, seed: int, attributes: Sequence[str]) -> list[str]:
    """Texts whose mean embedding stands for 'the text modality' of this data set: the probes
    of its (diagnosed) attributes and captions of its first images."""

    texts = [text for name in attributes for pair in attribute_prompt_pairs(name) for text in pair]
    if attributes and all(name in frame.columns for name in attributes):
        sample = frame.head(CAPTION_CORPUS_SIZE).select(list(attributes)).to_dicts()
        rng = random.Random(seed)
        texts += [caption_for(row, rng) for row in sample]
    return texts


@with_home_phrasings  # the text corpus phrases attributes as the dataset's probes file says
def fit_heads(
    layout: Layout,
    config: HeadsConfig,
    device: DeviceSpec,
    progress: Callable[..., None] | None = None,
) -> HeadsResult:
    # lazy: pulls scipy.stats, +3.0 s on the Dagster definitions load (measured)
    from llm2loss_pipeline.core.heads.evaluate import evaluate_ensemble

    frame = training_frame(layout)
    train = split_rows(frame, config.train_split, "heads.train_split")
    held_out = split_rows(frame, config.eval_split, "heads.eval_split")
    train_emb = train["embedding"].to_numpy().astype(np.float32)
    eval_emb = held_out["embedding"].to_numpy().astype(np.float32)
    train_loss = train["loss"].to_numpy()
    eval_loss = held_out["loss"].to_numpy()

    encoder = load_encoder(layout.encoder_dir)
    attributes = diagnosed_attributes(layout)
    # the encoder step left its prompts' embeddings in the home's index (1,190 on CelebA's
    # attributes, seconds of the text tower): only the captions are embedded here
    index = text_index(layout.home, str(encoder.sha256), encoder.embed_dim)
    corpus = known_first(index, encoder.encode_texts)(
        text_corpus(train, config.base_seed, attributes)
    )
    gap = fit_gap(train_emb, corpus, config.modality_gap)
    torch_device = device.torch_device()
    ensemble = train_ensemble(
        gap.image(train_emb),
        train_loss,
        config,
        progress,
        device=torch_device,
        groups=_identities(layout, train),
    )
    evaluation = evaluate_ensemble(ensemble, gap.image(eval_emb), eval_loss)
    members = evaluation["members"]
    save_ensemble(
        ensemble,
        gap,
        layout.heads_dir,
        embedding_dim=encoder.embed_dim,
        encoder_sha256=str(encoder.sha256),
        metrics=members,
        extra_meta={
            "train_split": config.train_split,
            "eval_split": config.eval_split,
            "n_train": train.height,
            "n_eval": held_out.height,
        },
    )
    kind_rows = [{"group": name, **values} for name, values in evaluation["groups"].items()]
    gap_rows = gap_effect_rows(train, held_out, corpus, config, encoder, torch_device, attributes)

    write_parquet_atomic(pl.DataFrame(members), layout.member_metrics)
    write_json_atomic(layout.kind_metrics, kind_rows)
    write_json_atomic(layout.gap_effect, gap_rows)
    headline = {
        f"heldout_spearman_{row['group']}": float(row["ensemble_spearman"]) for row in kind_rows
    }
    for row in gap_rows:
        headline[f"gap_{row['modality_gap']}_disparity_spearman"] = row["disparity_spearman"]
    return HeadsResult(
        path=layout.heads_dir,
        sha256=sha256_file(layout.heads_index),
        train_split=config.train_split,
        eval_split=config.eval_split,
        n_train=train.height,
        n_eval=held_out.height,
        member_metrics=members,
        kind_metrics=kind_rows,
        gap_effect=gap_rows,
        headline=headline,
    )


def gap_effect_rows(
    train: pl.DataFrame,
    held_out: pl.DataFrame,
    corpus: np.ndarray,
    config: HeadsConfig,
    encoder: Any,
    device: Any,
    attributes: Sequence[str],
) -> list[dict[str, Any]]:
    """The measured effect of centring each modality: heads trained both ways, same data.

    For each mode: the held-out Spearman of the ensemble on images (centring should not hurt it)
    and the correlation, across attributes, between the disparity estimated from text and the
    one measured on held-out samples (what centring is for). `corpus`: the embedded
    `text_corpus(train, config.base_seed, attributes)`, the one the heads' own gap was fitted on
    (encoded once: it is the same texts).
    """

    present = [name for name in attributes if name in held_out.columns]
    if not present:
        return []
    labels = held_out.select(present).fill_null(False).to_numpy().astype(bool)
    usable = [i for i in range(len(present)) if 0 < labels[:, i].sum() < len(labels)]
    if len(usable) < 3:
        return []
    prompts = [attribute_prompt_pairs(present[i])[0] for i in usable]
    effect = measure_gap_effect(
        train_embeddings=train["embedding"].to_numpy().astype(np.float32),
        train_losses=train["loss"].to_numpy(),
        eval_embeddings=held_out["embedding"].to_numpy().astype(np.float32),
        eval_losses=held_out["loss"].to_numpy(),
        eval_labels=labels[:, usable],
        prompts=prompts,
        encode_texts=encoder.encode_texts,
        text_corpus_embeddings=corpus,
        config=config,
        device=str(device),
    )
    rows = []
    for mode in ("center", "none"):
        if mode not in effect:
            continue
        correlation = effect[mode]["correlation"]
        rows.append(
            {
                "modality_gap": mode,
                "heldout_ensemble_spearman": float(effect[mode]["heldout_ensemble_spearman"]),
                "disparity_spearman": float(correlation["spearman"]["r"]),
                "disparity_pearson": float(correlation["pearson"]["r"]),
                "gap_norm": float(effect[mode]["gap_norm"]),
                "n_attributes": len(usable),
            }
        )
    return rows
