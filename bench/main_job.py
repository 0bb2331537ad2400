"""The main job end to end: wall time per stage, and whether the report finds the planted failures.

    python bench/main_job.py --config configs/default.yaml     # the README's `make run`
    python bench/main_job.py --config configs/tiny.yaml        # what the end-to-end test runs

Runs `llm2loss run` in-process in a fresh home (a temporary folder unless --home is given) and
prints: seconds per stage and in total; the head validation Spearman; the rank of each planted
`hard_attributes` entry by estimated disparity; and the Spearman/Pearson/Kendall correlation of
estimated vs measured signed disparity across the 40 attributes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--home", help="artifact root (default: a fresh temporary folder)")
    args = parser.parse_args()

    import dagster as dg
    import polars as pl

    from llm2loss_pipeline.core.config import load_config
    from llm2loss_pipeline.core.steps.report import HEADLINE_KEYS
    from llm2loss_pipeline.defs.runner import run_pipeline

    home = Path(args.home or tempfile.mkdtemp(prefix="llm2loss-bench-"))
    config = load_config(args.config).model_copy(update={"home": str(home)})
    started = time.perf_counter()
    outcome = run_pipeline(config, instance=dg.DagsterInstance.ephemeral())
    total = time.perf_counter() - started

    per_stage: dict[str, float] = defaultdict(float)
    for run in outcome.runs:
        per_stage[run.stage] += run.seconds
    print(f"config: {args.config}   home: {home}   cpu cores: {os.cpu_count()}")
    for stage, seconds in per_stage.items():
        print(f"  stage {stage:<9} {seconds:7.1f} s")
    print(f"  total           {total:7.1f} s")

    layout = outcome.layout
    kinds = json.loads((layout.models / "heads_metrics" / "kind_metrics.json").read_text())
    for row in kinds:
        print(f"  heads held-out Spearman [{row['group']:<9}] {row['ensemble_spearman']:+.3f}")
    gap = json.loads((layout.models / "heads_metrics" / "gap_effect.json").read_text())
    for row in gap:
        print(
            f"  modality gap {row['modality_gap']:<6}: disparity Spearman "
            f"{row['disparity_spearman']:+.3f}, held-out Spearman "
            f"{row['heldout_ensemble_spearman']:+.3f}"
        )
    table = pl.read_parquet(layout.reports / "attribute_disparity.parquet")
    ranked = table.sort("est_mean", descending=True, nulls_last=True)["attribute"].to_list()
    for name in config.world.hard_attributes:
        print(f"  planted {name:<18} rank by estimated disparity: {ranked.index(name) + 1} / 40")
    print(f"  top 5 by estimated disparity: {', '.join(ranked[:5])}")
    headline = json.loads((layout.reports / "headline.json").read_text())
    for key in HEADLINE_KEYS:
        value = headline.get(key)
        print(f"  {key:<28} {'n/a' if value is None else f'{value:+.3f}'}")


if __name__ == "__main__":
    main()
