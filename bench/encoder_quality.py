"""Encoder quality: zero-shot attribute AUROC of the caption-tuned encoder, variants side by side.

Trains the caption-tuned encoder on the training split of a materialized home (its
`tables/manifest.parquet` and `tables/attributes.parquet`, e.g. after `llm2loss run` on the
embedded default) once per variant, and prints for each the mean zero-shot AUROC over the
rendered attributes on the validation split (the report's probe prompts), the per-image
attributes the baseline misses, the planted hard attributes, and the training seconds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/encoder_quality.py --home /tmp/disc_default \\
        --variants baseline,aux

One torch thread: the default machine has 2 shared cores, and the pipeline's own timings are
taken the same way. Every variant builds a fresh encoder, so caption embedding is paid (and
timed) by each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import polars as pl
import torch

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder import (
    EncoderConfig,
    build_encoder,
    embed_images,
    train_caption_tuned,
    zero_shot_auroc,
)

# overrides of the default EncoderConfig (the embedded default's `encoder` section)
VARIANTS: dict[str, dict] = {
    "baseline": {"attribute_loss_weight": 0.0},
    "dual3": {"attribute_loss_weight": 3.0, "attribute_directions": "dual"},
    "dual10": {"attribute_loss_weight": 10.0, "attribute_directions": "dual"},
    "aux": {"attribute_loss_weight": 1.0, "attribute_directions": "text"},
    "aux0.3": {"attribute_loss_weight": 0.3, "attribute_directions": "text"},
    "aux3": {"attribute_loss_weight": 3.0, "attribute_directions": "text"},
    "aux_lr4": {"attribute_loss_weight": 1.0, "attribute_directions": "text", "lr": 4e-3},
    "aux3_c1e12": {
        "attribute_loss_weight": 3.0,
        "attribute_directions": "text",
        "captions_per_image": 1,
        "epochs": 12,
    },
    "aux_e12": {"attribute_loss_weight": 1.0, "attribute_directions": "text", "epochs": 12},
    "aux_w32": {
        "attribute_loss_weight": 1.0,
        "attribute_directions": "text",
        "vision_width": 32,
        "vision_head_width": 32,
    },
    "aux_noaug": {"attribute_loss_weight": 1.0, "attribute_directions": "text", "augment": False},
    "aux_b64": {"attribute_loss_weight": 1.0, "attribute_directions": "text", "batch_size": 64},
    "e20": {"attribute_loss_weight": 0.0, "epochs": 20},
    "aux_unbal": {"attribute_loss_weight": 1.0, "attribute_directions": "text", "_balanced": False},
    "aux3_unbal": {
        "attribute_loss_weight": 3.0,
        "attribute_directions": "text",
        "_balanced": False,
    },
    "aux10": {"attribute_loss_weight": 10.0, "attribute_directions": "text"},
    "aux10_unbal": {
        "attribute_loss_weight": 10.0,
        "attribute_directions": "text",
        "_balanced": False,
    },
}
"""Keys starting with '_' set module switches of `train.py` instead of config fields."""
IMAGE_LEVEL = ("Eyeglasses", "Wearing_Hat", "Smiling", "Mouth_Slightly_Open", "Bald")
PLANTED = ("Gray_Hair", "Goatee")


def _split(home: Path, split: str) -> tuple[list[tuple[str, str]], list[dict[str, bool]]]:
    manifest = pl.read_parquet(home / "tables" / "manifest.parquet")
    attributes = pl.read_parquet(home / "tables" / "attributes.parquet")
    rows = manifest.filter(pl.col("split") == split).sort("index")
    joined = rows.select("sample_id", "index", "path").join(attributes, on="sample_id", how="left")
    joined = joined.sort("index")
    items = list(zip(joined["sample_id"].to_list(), joined["path"].to_list(), strict=True))
    table = joined.drop("sample_id", "index", "path").to_dicts()
    return items, [{name: bool(value) for name, value in row.items()} for row in table]


def _default_encoder_config() -> EncoderConfig:
    return load_config(None).encoder


def run_variant(name: str, overrides: dict, train: tuple, valid: tuple, device: DeviceSpec) -> dict:
    from llm2loss_pipeline.core.encoder import train as train_module

    train_module.BALANCED = overrides.get("_balanced", True)
    fields = {key: value for key, value in overrides.items() if not key.startswith("_")}
    config = _default_encoder_config().model_copy(update=fields)
    EncoderConfig.model_validate(config.model_dump())  # overrides are validated too
    encoder = build_encoder(config)
    started = time.perf_counter()
    metrics = train_caption_tuned(encoder, *train, config, device)
    seconds = time.perf_counter() - started
    items, rows = valid
    embeddings = embed_images(encoder, items, device).embeddings
    labels = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    aurocs = zero_shot_auroc(embeddings, labels, encoder.encode_texts)
    finite = [value for value in aurocs.values() if not math.isnan(value)]
    return {
        "variant": name,
        "overrides": overrides,
        "mean_auroc": float(np.mean(finite)),
        "auroc": aurocs,
        "seconds": round(seconds, 1),
        "seconds_train": metrics["seconds_train"],
        "seconds_embed_captions": metrics["seconds_embed_captions"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/disc_default"))
    parser.add_argument("--variants", default="baseline,aux", help=f"of {sorted(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    torch.set_num_threads(1)
    device = DeviceSpec(device="cpu", batch_size=128, num_workers=0)
    train, valid = _split(args.home, "train"), _split(args.home, "valid")
    print(f"{len(train[0])} training, {len(valid[0])} validation images from {args.home}")
    results = []
    for name in names:
        result = run_variant(name, VARIANTS[name], train, valid, device)
        results.append(result)
        print(
            f"  {name}: mean AUROC {result['mean_auroc']:.3f} in {result['seconds']:.0f} s",
            flush=True,
        )
    shown = (*IMAGE_LEVEL, *PLANTED)
    header = f"{'variant':<12} {'mean':>6} " + " ".join(f"{n[:11]:>11}" for n in shown)
    print("\n" + header + f" {'train s':>8} {'total s':>8}")
    for result in results:
        cells = " ".join(f"{result['auroc'].get(n, float('nan')):>11.3f}" for n in shown)
        print(
            f"{result['variant']:<12} {result['mean_auroc']:>6.3f} {cells} "
            f"{result['seconds_train']:>8.1f} {result['seconds']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
