"""How fast the data layer is: world generation with 1 and 2 workers, and reading a CelebA root.

    python bench/world_generation.py [--identities 40 --images 30 --size 64 --reader-rows 202599]

Prints images per minute for each worker count measured side by side in one run, their ratio,
the CPU time spent (which stays meaningful when other processes share the cores),
whether both runs wrote byte-identical worlds, and the time to read and validate CelebA text
files of the real data set's size (202,599 rows) and to build the manifest from them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
from llm2loss_pipeline.core.world import WorldConfig, generate_world


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def bench_generation(config: WorldConfig, scratch: Path) -> None:
    rates, digests = {}, {}
    for workers in (1, 2):
        out = scratch / f"world-{workers}"
        start, cpu = time.perf_counter(), _cpu_seconds()
        summary = generate_world(config, out, workers=workers)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        rates[workers] = summary.n_images / seconds * 60.0
        digests[workers] = _digest(out)
        print(
            f"workers={workers}: {summary.n_images} images of {config.image_size}px "
            f"in {seconds:.1f} s = {rates[workers]:,.0f} images/min "
            f"(CPU {cpu:.1f} s = {summary.n_images / cpu * 60:,.0f} images per CPU-minute)"
        )
    print(f"speed-up 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    print(f"byte-identical worlds: {digests[1] == digests[2]}")


def _write_synthetic_root(root: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, rows + 1)]
    values = np.where(rng.random((rows, 40)) < 0.3, " 1", "-1")
    body = [name + " " + " ".join(row) for name, row in zip(names, values.tolist(), strict=True)]
    header = [str(rows), " ".join(CELEBA_ATTRIBUTES)]
    (root / "list_attr_celeba.txt").write_text("\n".join(header + body) + "\n")
    identities = rng.integers(1, 10_178, rows)
    (root / "identity_CelebA.txt").write_text(
        "".join(f"{n} {i}\n" for n, i in zip(names, identities.tolist(), strict=True))
    )
    splits = np.digitize(np.arange(rows), [int(rows * 0.8), int(rows * 0.9)])
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {s}\n" for n, s in zip(names, splits.tolist(), strict=True))
    )


def bench_reader(rows: int, scratch: Path) -> None:
    root = scratch / "celeba"
    root.mkdir()
    _write_synthetic_root(root, rows)
    start, cpu = time.perf_counter(), time.process_time()
    tables = read_celeba(root)
    read_seconds, read_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    manifest = build_manifest(tables, shard_size=5_000)
    manifest_seconds = time.perf_counter() - start
    print(
        f"read_celeba: {tables.n_samples:,} rows in {read_seconds:.2f} s (CPU {read_cpu:.2f} s); "
        f"build_manifest: {manifest.height:,} rows, {manifest['shard'].n_unique()} shards "
        f"in {manifest_seconds:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reader-rows", type=int, default=202_599)
    args = parser.parse_args()
    config = WorldConfig(
        n_identities=args.identities, images_per_identity=args.images, image_size=args.size
    )
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="llm2loss-bench-") as scratch:
        bench_generation(config, Path(scratch))
        if args.reader_rows > 0:
            bench_reader(args.reader_rows, Path(scratch))


if __name__ == "__main__":
    main()
