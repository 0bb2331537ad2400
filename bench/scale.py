"""Scale: each pipeline stage's wall time, time per sample and peak memory as the world grows.

Runs the real pipeline steps (`core.steps`, what the Dagster assets call) on generated worlds of
1x, 4x, ... the base configuration's images (the embedded default's: 120 identities x 30): the
same identities with more images each, plus a variant with more identities
(`--identities-variant 4`: 4 x the identities, as many images each as the base).
Every stage runs in its own child process, so its peak resident memory is that child's own
(`os.wait4`'s ru_maxrss), and its wall time excludes imports (stated separately as start-up).
Per world and stage it prints wall seconds, CPU seconds (the child's process time: on a shared
machine wall time mostly measures the other jobs), CPU milliseconds per image of the world, and
peak RSS, and per stage the growth exponent b of seconds ~ images^b fitted (least squares,
log-log) over the more-images series, on CPU and on wall time: 1 is linear.

    nice -n 10 .venv/bin/python bench/scale.py --scales 1,4 --home /tmp/scale --json out.json

`--after-encoder-only SCALE[,SCALE]` runs those scales' worlds without training the black box
and the encoder: their checkpoints are copied from the smallest world's home (same identities,
so the same classes), which is how a 16x world fits the time: the two training stages are timed
at the smaller scales, where their cost per epoch is images x constant.

Torch runs one intra-op thread per child (`--threads`): the default machine has 2 cores shared
with other jobs, where several threads per op mostly wait for each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STAGES = ("world", "black_box", "encoder", "losses", "embeddings", "heads", "report", "discovery")
TRAINED = ("black_box", "encoder")
"""Stages whose checkpoints a larger world may take from a smaller one (same identities)."""


# ---- child: one stage ---------------------------------------------------------------------------


def _config(args: argparse.Namespace):
    from llm2loss_pipeline.core.config import load_config

    config = load_config(args.config)
    world = config.world.model_copy(
        update={"n_identities": args.identities, "images_per_identity": args.images}
    )
    return config.model_copy(update={"home": str(args.home), "world": world})


def _shards(layout) -> list[str]:
    from llm2loss_pipeline.core.steps.tables import read_manifest

    return read_manifest(layout)["shard"].unique().sort().to_list()


def _discovery(layout, config) -> None:
    import inspect

    from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
    from llm2loss_pipeline.core.steps import discovery

    settings = DiscoveryConfig(**config.discovery.model_dump())
    if "diagnoser" in inspect.signature(discovery.run_discovery).parameters:
        from llm2loss_pipeline.core.query import Diagnoser

        discovery.run_discovery(layout, settings, Diagnoser.load(layout.home))
    else:
        discovery.run_discovery(layout, settings)


def run_stage(stage: str, config) -> None:
    """What the stage's assets do, without Dagster (every shard of the signals stages)."""
    from llm2loss_pipeline.core.layout import Layout
    from llm2loss_pipeline.core.steps import black_box, data, diagnosis, encoder, report

    layout = Layout.at(config.home)
    devices = config.devices
    if stage == "world":
        data.prepare_dataset(layout, config.dataset, config.world)
        data.summarize_attributes(layout, config.dataset, config.world)
    elif stage == "black_box":
        black_box.fit_black_box(layout, config.black_box, devices.black_box)
    elif stage == "encoder":
        encoder.fit_encoder(layout, config.encoder, devices.encoder)
    elif stage == "losses":
        for shard in _shards(layout):
            black_box.shard_losses(layout, shard, config.black_box, config.dataset, devices.losses)
    elif stage == "embeddings":
        for shard in _shards(layout):
            encoder.shard_embeddings(layout, shard, config.dataset, devices.embeddings)
    elif stage == "heads":
        diagnosis.fit_heads(layout, config.heads, devices.heads)
    elif stage == "report":
        report.make_report(layout, config.report)
    elif stage == "discovery":
        _discovery(layout, config)
    else:
        raise ValueError(f"unknown stage {stage!r}; choose from {list(STAGES)}")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (world generation renders in a
    process pool, whose time `time.process_time` would miss)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def child_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    config = _config(args)
    started, cpu = time.perf_counter(), _cpu_seconds()
    run_stage(args.child, config)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    print(json.dumps({"stage": args.child, "seconds": seconds, "cpu_seconds": cpu}))
    return 0


# ---- parent: worlds x stages, each stage a child process ---------------------------------------


def _spawn(stage: str, home: Path, identities: int, images: int, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        stage,
        "--home",
        str(home),
        "--identities",
        str(identities),
        "--images",
        str(images),
        "--threads",
        str(args.threads),
    ]
    if args.config:
        command += ["--config", args.config]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LLM2LOSS_HOME": str(home)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    output = process.stdout.read() if process.stdout else ""
    # wait4: this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"stage {stage} failed in {home} (exit {process.returncode})")
    measured = json.loads(output.strip().splitlines()[-1])
    seconds = measured["seconds"]
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(measured["cpu_seconds"], 2),
        "startup_seconds": round(wall - seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    }


def _n_images(home: Path) -> int:
    import polars as pl

    return pl.read_parquet(home / "tables" / "manifest.parquet").height


def run_world(label: str, identities: int, images: int, args, reuse: Path | None) -> dict:
    home = args.home / label
    if home.exists():
        shutil.rmtree(home)
    stages: dict[str, dict] = {}
    for stage in STAGES:
        if reuse is not None and stage in TRAINED:
            continue
        stages[stage] = _spawn(stage, home, identities, images, args)
        if stage == "world" and reuse is not None:
            for name in ("black_box", "encoder"):
                shutil.copytree(reuse / "models" / name, home / "models" / name)
        print(f"  {label:<14} {stage:<10} {json.dumps(stages[stage])}", flush=True)
    n = _n_images(home)
    for row in stages.values():
        row["ms_per_image"] = round(1000 * row["seconds"] / n, 3)
        row["cpu_ms_per_image"] = round(1000 * row["cpu_seconds"] / n, 3)
    return {
        "label": label,
        "identities": identities,
        "images_per_identity": images,
        "n": n,
        "stages": stages,
    }


def growth_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(seconds) over log(images)."""
    if len(points) < 2:
        return math.nan
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(seconds, 1e-6)) for _, seconds in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def print_table(worlds: list[dict]) -> None:
    series = [w for w in worlds if w["identities"] == worlds[0]["identities"]]
    header = " | ".join(f"{w['label']} ({w['n']:,})" for w in worlds)
    print(f"\n| stage | {header} | exponent CPU / wall |")
    print("|---|" + "---|" * len(worlds) + "---|")
    for stage in STAGES:
        cells = []
        for w in worlds:
            row = w["stages"].get(stage)
            cells.append(
                "-"
                if row is None
                else f"{row['seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU = "
                f"{row['cpu_ms_per_image']:.2f} ms/img, {row['peak_rss_mb']:.0f} MB"
            )
        measured = [w for w in series if stage in w["stages"]]
        exponents = [
            f"{growth_exponent([(w['n'], w['stages'][stage][key]) for w in measured]):.2f}"
            for key in ("cpu_seconds", "seconds")
        ]
        print(f"| {stage} | " + " | ".join(cells) + f" | {' / '.join(exponents)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/llm2loss-scale"))
    parser.add_argument("--config", help="base configuration (default: the embedded default)")
    parser.add_argument("--scales", default="1,4", help="multiples of the default's images")
    parser.add_argument(
        "--identities-variant",
        type=int,
        default=0,
        help="also a world with this many times the identities, 30 images each",
    )
    parser.add_argument(
        "--after-encoder-only",
        default="",
        help="scales run with the smallest world's black box and encoder",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    # child mode (one stage of one world)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--identities", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.config:
        args.config = str(Path(args.config).resolve())
    from llm2loss_pipeline.core.config import load_config

    base = load_config(args.config).world  # the 1x world: its identities and images each
    scales = sorted({int(value) for value in args.scales.split(",")})
    reuse_scales = {int(value) for value in args.after_encoder_only.split(",") if value}
    args.home.mkdir(parents=True, exist_ok=True)
    plan = [
        (f"images-x{scale}", base.n_identities, base.images_per_identity * scale, scale)
        for scale in scales
    ]
    if args.identities_variant:
        label = f"identities-x{args.identities_variant}"
        plan.append(
            (label, base.n_identities * args.identities_variant, base.images_per_identity, 0)
        )
    worlds = []
    first = args.home / plan[0][0]
    for label, identities, images, scale in plan:
        reuse = first if scale in reuse_scales and scale != scales[0] else None
        worlds.append(run_world(label, identities, images, args, reuse))
        if args.json:  # after every world: a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps(worlds, indent=1))
    print_table(worlds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
