"""How much the loss pass costs over the model itself: pipeline rate vs a bare forward loop.

    python bench/loss_throughput.py [--world DIR] [--limit N] [--batch-size 256] [--workers 0 1]

Both sides use the same model (the built-in small CNN, seeded), the same images and this machine,
measured alternately in one run (best of --repeats, so a burst of load from another process
hurts both alike):

- pipeline: `compute_losses` from the JPEG files: decoding, resizing, batching, the forward pass,
  per-sample loss / argmax / p_true / true-class AUROC, and the polars table; once for each
  DataLoader worker count in --workers;
- bare: `model(x)` in batches over tensors decoded beforehand, under inference_mode;
- decode only (for reference): the pipeline's decoder (`load_image_tensor`: torchvision's
  libjpeg-turbo binding) + preprocess of every file, one thread.

Prints images/s for each and the overhead ratio bare_rate / pipeline_rate (target: <= 1.3 on
two CPU cores), plus CPU milliseconds per image, which stays meaningful when other processes
share the cores. The pipeline overlaps decoding with the forward pass (a prefetch thread, or
DataLoader worker processes), so on two free cores its rate approaches
min(bare, decode only); on one busy core it is bounded by 1 / (1/bare + 1/decode). The world
defaults to the embedded default (120 identities x 30 images, 64 px), generated once into
--world if it is not there.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from llm2loss_pipeline.core.blackbox.cnn import ResizeToUint8, build_model
from llm2loss_pipeline.core.blackbox.losses import compute_losses
from llm2loss_pipeline.core.blackbox.train import cpu_threads
from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.images import load_image, load_image_tensor
from llm2loss_pipeline.core.world import WorldConfig, generate_world


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - start, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path(".llm2loss/bench/world"))
    parser.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = WorldConfig()
    summary = generate_world(config, args.world)
    manifest = build_manifest(read_celeba(summary.root), shard_size=1024)
    if args.limit:
        manifest = manifest.head(args.limit)
    items = list(zip(manifest["sample_id"].to_list(), manifest["path"].to_list(), strict=True))
    num_classes = manifest["identity"].n_unique()
    labels = (manifest["identity"].to_numpy() - 1) % num_classes
    splits = manifest["split"].to_list()
    n = len(items)

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes, config.image_size, width=args.width).eval()
    preprocess = ResizeToUint8(config.image_size)
    preloaded = torch.stack([preprocess(load_image(path)) for _, path in items])

    def bare() -> None:
        with cpu_threads(args.threads), torch.inference_mode():
            for start in range(0, n, args.batch_size):
                model(preloaded[start : start + args.batch_size])

    def pipeline(workers: int):
        spec = DeviceSpec(device="cpu", batch_size=args.batch_size, num_workers=workers)
        return lambda: compute_losses(
            model, items, labels, splits, preprocess, spec, threads=args.threads
        )

    def decode_only() -> None:  # the pipeline's decoder (`load_image_tensor`, ResizeToUint8)
        for _, path in items:
            preprocess(load_image_tensor(path))

    runs = {"bare": bare, "decode only": decode_only}
    runs |= {f"pipeline workers={w}": pipeline(w) for w in args.workers}
    for fn in runs.values():  # warm-up: allocator, oneDNN kernels, file cache
        fn()
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, cpu = _timed(fn)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, cpu)

    print(
        f"{n} images of {config.image_size}px, small_cnn width {args.width}, batch "
        f"{args.batch_size}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
        f"best of {args.repeats}"
    )
    bare_rate = n / best["bare"][0]
    for name, (seconds, cpu) in best.items():
        rate = n / seconds
        ratio = (
            f"  overhead bare/pipeline = {bare_rate / rate:.2f}x"
            if name.startswith("pipeline")
            else ""
        )
        print(
            f"{name:>20}: {rate:8,.0f} images/s ({seconds:.2f} s, "
            f"CPU {cpu / n * 1e3:.2f} ms/image){ratio}"
        )
    result = compute_losses(model, items, labels, splits, preprocess, threads=args.threads)
    assert result.frame.height == n and np.isfinite(result.frame["loss"].to_numpy()).all()


if __name__ == "__main__":
    main()
