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

With `--pipeline`, quality is measured through the pipeline instead, on the embedded default
resized to `--identities` x `--images`: per world seed the world, black box and losses once,
then per pool_size, in a copy of that home, the encoder, embeddings, heads and report (the
steps the Dagster assets call, `bench/scale.py`'s `run_stage`), printing the encoder's mean
zero-shot AUROC (validation split), the report's headline Spearman and the planted attributes'
ranks. A pool_size of at least the pool (2
captions per training image) is the whole pool, i.e. the behaviour before `pool_size` existed:

    nice -n 10 .venv/bin/python bench/encoder_quality.py --pipeline --home /tmp/q \
        --identities 60 --images 20 --world-seeds 0,1 --pool-sizes 1000000,512,160
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
    # the default (dual3) with more, smaller steps at the same epochs (stop 20)
    "dual3_b64": {"attribute_loss_weight": 3.0, "attribute_directions": "dual", "batch_size": 64},
    "dual3_b32": {"attribute_loss_weight": 3.0, "attribute_directions": "dual", "batch_size": 32},
    # bf16 autocast on a CPU with native bf16 dot products, and the epochs its speed buys
    "dual3_bf16": {
        "attribute_loss_weight": 3.0,
        "attribute_directions": "dual",
        "_precision": "bf16",
    },
    "dual3_bf16_e20": {
        "attribute_loss_weight": 3.0,
        "attribute_directions": "dual",
        "_precision": "bf16",
        "epochs": 20,
    },
    "dual3_bf16_e30": {
        "attribute_loss_weight": 3.0,
        "attribute_directions": "dual",
        "_precision": "bf16",
        "epochs": 30,
    },
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
    # stop 30: learning speed at the default 20 epochs (bf16 where native); "default" is the
    # embedded default's encoder section unchanged
    "default": {},
    "lr4": {"lr": 4e-3},
    "noaug": {"augment": False},
    "wd0.2": {"weight_decay": 0.2},
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
    # the training's autocast (DeviceSpec.precision); the validation embeddings stay fp32
    precision = overrides.get("_precision", device.precision)
    trained_on = device.model_copy(update={"precision": precision})
    metrics = train_caption_tuned(encoder, *train, config, trained_on)
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


def _pipeline_config(home: Path, world_seed: int, pool_size: int, args):
    config = load_config(None)
    world = config.world.model_copy(
        update={
            "seed": world_seed,
            "n_identities": args.identities,
            "images_per_identity": args.images,
        }
    )
    encoder = config.encoder.model_copy(update={"pool_size": pool_size, "seed": args.encoder_seed})
    return config.model_copy(update={"home": str(home), "world": world, "encoder": encoder})


def run_pipeline_variant(base: Path, world_seed: int, pool_size: int, args) -> dict:
    """The encoder-dependent stages (encoder, embeddings, heads, report) in a copy of `base`,
    a home where the world, the black box and the losses are done; the quality numbers."""
    import shutil

    from scale import run_stage  # bench/scale.py: the steps the Dagster assets call

    home = base.parent / f"{base.name}_p{pool_size}_e{args.encoder_seed}"
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(base, home, symlinks=True)
    config = _pipeline_config(home, world_seed, pool_size, args)
    started = time.perf_counter()
    for stage in ("encoder", "embeddings", "heads", "report"):
        run_stage(stage, config)
    sidecar = json.loads((home / "models" / "encoder" / "encoder.json").read_text())
    metrics = sidecar.get("metrics", {})
    headline = json.loads((home / "reports" / "headline.json").read_text())
    table = pl.read_parquet(home / "reports" / "attribute_disparity.parquet")
    ranked = table.sort("est_mean", descending=True, nulls_last=True)["attribute"].to_list()
    return {
        "world_seed": world_seed,
        "pool_size": pool_size,
        "encoder_seed": args.encoder_seed,
        "n_captions": metrics.get("n_captions"),
        "max_columns_per_step": metrics.get("max_columns_per_step"),
        "zero_shot_auroc_mean": metrics.get("zero_shot_auroc_mean"),
        "spearman_signed_overall": headline.get("spearman_signed_overall"),
        "planted_ranks": {name: ranked.index(name) + 1 for name in config.world.hard_attributes},
        "encoder_seconds_train": metrics.get("seconds_train"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def build_base(home: Path, world_seed: int, args) -> Path:
    """World, black box and losses: what every pool_size variant of one world shares."""
    from scale import run_stage

    if not (home / "tables" / "per_sample_losses").exists():
        config = _pipeline_config(home, world_seed, 1, args)
        for stage in ("world", "black_box", "losses"):
            run_stage(stage, config)
    return home


def pipeline_main(args) -> int:
    seeds = [int(value) for value in args.world_seeds.split(",")]
    sizes = [int(value) for value in args.pool_sizes.split(",")]
    results = []
    for seed in seeds:
        base = build_base(args.home / f"w{seed}", seed, args)
        for size in sizes:
            result = run_pipeline_variant(base, seed, size, args)
            results.append(result)
            print(json.dumps(result), flush=True)
    header = f"{'world':>5} {'pool_size':>9} {'columns':>7} {'zero-shot':>9} {'Spearman':>8}"
    print(f"\n{header}  planted")
    for r in results:
        ranks = " / ".join(str(rank) for rank in r["planted_ranks"].values())
        print(
            f"{r['world_seed']:>5} {r['pool_size']:>9} {r['max_columns_per_step']:>7} "
            f"{r['zero_shot_auroc_mean']:>9.3f} {r['spearman_signed_overall']:>+8.3f}  {ranks}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/disc_default"))
    parser.add_argument("--variants", default="baseline,aux", help=f"of {sorted(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--pipeline", action="store_true", help="through the whole pipeline")
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--images", type=int, default=20, help="images per identity")
    parser.add_argument("--world-seeds", default="0,1")
    parser.add_argument("--pool-sizes", default="1000000,512,160")
    parser.add_argument("--encoder-seed", type=int, default=0, help="its noise: run another seed")
    args = parser.parse_args(argv)
    if args.pipeline:
        torch.set_num_threads(1)
        return pipeline_main(args)
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
