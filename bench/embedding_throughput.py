"""Embedding throughput: the pipeline's `embed_images` against a plain per-image loop.

Both embed the same images with the same model on the same machine in one run:
- loop:     for each file, `preprocess(PIL image)` then `model.encode_image` on a batch of one;
- pipeline: `embed_images` (DataLoader over ImageFolderDataset, batches of `--batch-size`,
            `--workers` decoding workers, torch.inference_mode).
It prints both rates (images/s), their ratio, and checks that the two give the same vectors.
Target: at least 3x on 2 CPU cores with the default caption-tuned encoder (64 px images).

    python bench/embedding_throughput.py --n 512
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder import EncoderConfig, build_encoder, embed_images
from llm2loss_pipeline.core.images import load_image


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[tuple[str, str]]:
    """JPEG files like the generated world's (smooth colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    items = []
    ramp = np.linspace(0, 1, size)[None, :, None]
    for index in range(n):
        base = rng.integers(40, 215, size=3)[None, None, :]
        pixels = base + 40 * ramp + rng.normal(0, 12, size=(size, size, 3))
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        items.append((path.name, str(path)))
    return items


def per_image_loop(encoder, items) -> np.ndarray:
    vectors = []
    with torch.inference_mode():
        for _, path in items:
            x = encoder.preprocess(load_image(path))[None]
            vectors.append(encoder.model.encode_image(x, normalize=True)[0].numpy())
    return np.stack(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=512, help="images to embed")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoder = build_encoder(EncoderConfig(image_size=args.size))
    spec = DeviceSpec(device="cpu", batch_size=args.batch_size, num_workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp), args.n, args.size)
        per_image_loop(encoder, items[:8])  # warm-up both paths
        embed_images(encoder, items[:8], spec)
        loop_times, pipeline_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loop_vectors = per_image_loop(encoder, items)
            loop_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = embed_images(encoder, items, spec)
            pipeline_times.append(time.perf_counter() - start)
    difference = float(np.abs(result.embeddings - loop_vectors).max())
    loop_rate = args.n / min(loop_times)
    pipeline_rate = args.n / min(pipeline_times)
    print(
        f"images: {args.n} x {args.size}px, torch threads: {args.threads}, "
        f"batch {args.batch_size}, workers {args.workers}, best of {args.repeats}"
    )
    print(f"per-image loop : {loop_rate:8.1f} images/s")
    print(f"embed_images   : {pipeline_rate:8.1f} images/s")
    print(f"ratio          : {pipeline_rate / loop_rate:8.2f}x  (target >= 3x)")
    print(f"max |difference| between the two: {difference:.2e}")
    if difference > 1e-4:
        raise SystemExit("the two paths disagree: the benchmark compares different computations")


if __name__ == "__main__":
    main()
