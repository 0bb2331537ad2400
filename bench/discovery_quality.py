"""Failure discovery on materialized homes: are the planted failures among the distinct modes?

    llm2loss run --home /tmp/disc_default                    # once: the default world (~5 min)
    python bench/discovery_quality.py --home /tmp/disc_default --config configs/default.yaml
    python bench/discovery_quality.py --world /tmp/w1=w1.yaml --world /tmp/w2=w2.yaml   # several

Runs discovery (core/steps/discovery.compute_discovery; nothing is written) on each home and
prints, per world and over all of them:

- recall: every planted `hard_attributes` among the top k distinct failure modes (k = number
  planted + 2), as a value the mode states (`attributes`) or shows (`shown_attributes`);
- precision against measured truth: the share of those top-k modes that are backed, i.e. whose
  shown attributes' labelled group is worse on the evaluation split (one-sided Mann-Whitney,
  p < 0.05); a mode whose words the images do not bear out is not backed;
- wording: of all kept modes, how many are supported as tested, reworded, or not supported.

Targets (issue 18): recall in >= 90% of worlds; at most one top-k mode in ten not backed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _backed(mode: dict[str, Any], frame: Any) -> bool:
    import numpy as np
    from scipy import stats as sps

    stated = [part.strip() for part in (mode["shown_attributes"] or "").split(",") if part.strip()]
    if not stated:
        return False
    inside = np.ones(frame.height, dtype=bool)
    for label in stated:
        name, value = (label[4:], False) if label.startswith("not ") else (label, True)
        inside &= frame[name].to_numpy() == value
    losses = frame["loss"].to_numpy()
    if inside.sum() < 3 or (~inside).sum() < 3:
        return False
    return sps.mannwhitneyu(losses[inside], losses[~inside], alternative="greater").pvalue < 0.05


def _planted_in(mode: dict[str, Any], name: str) -> bool:
    stated = f"{mode['attributes'] or ''}, {mode['shown_attributes'] or ''}"
    return name in [part.strip() for part in stated.split(",")]


def score_world(home: str, config_path: str, default_discovery: bool = False) -> dict[str, Any]:
    import polars as pl

    from llm2loss_pipeline.core.config import load_config
    from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
    from llm2loss_pipeline.core.layout import Layout
    from llm2loss_pipeline.core.query import Diagnoser
    from llm2loss_pipeline.core.steps.diagnosis import training_frame
    from llm2loss_pipeline.core.steps.discovery import compute_discovery
    from llm2loss_pipeline.core.steps.tables import split_rows

    config = load_config(config_path)
    if default_discovery:  # a benchmark world may trim discovery to save time
        config = config.model_copy(update={"discovery": DiscoveryConfig()})
    planted = sorted(config.world.hard_attributes)
    layout = Layout.at(home)
    started = time.monotonic()
    result = compute_discovery(layout, config.discovery, Diagnoser.load(layout.home))
    seconds = time.monotonic() - started
    frame = split_rows(training_frame(layout), config.discovery.eval_split, "eval_split")
    modes = result.hypotheses.filter(pl.col("verdict") == "mode")
    top = modes.head(len(planted) + 2).to_dicts()
    return {
        "home": home,
        "seconds": seconds,
        "n_candidates": result.counts["n_candidates"],
        "n_kept": result.counts["n_kept"],
        "n_modes": modes.height,
        "top": top,
        "found": {name: any(_planted_in(mode, name) for mode in top) for name in planted},
        "backed": [_backed(mode, frame) for mode in top],
        "wording": Counter(modes["wording"].to_list()),
    }


def _print_world(score: dict[str, Any]) -> None:
    print(
        f"{score['home']}: {score['seconds']:.1f} s, {score['n_candidates']} candidates, "
        f"{score['n_kept']} verified, {score['n_modes']} modes"
    )
    for mode, backed in zip(score["top"], score["backed"], strict=True):
        print(
            f"  mode {mode['mode']} {mode['shown_as']!r} ({mode['wording']}; tested as "
            f"{mode['description']!r}): measured gap {mode['measured_gap']:+.3f} AUROC "
            f"{mode['measured_auc']:.3f} q {mode['q_value']:.1e}, {mode['n_variants']} variants, "
            f"{'backed' if backed else 'NOT backed'}"
        )
    print(f"  planted among the top {len(score['top'])} modes: {score['found']}")
    print(f"  wording of all modes: {dict(score['wording'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="one home (with --config)")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument(
        "--world", action="append", default=[], metavar="HOME=CONFIG", help="repeatable"
    )
    parser.add_argument(
        "--default-discovery",
        action="store_true",
        help="the default discovery settings instead of the configs' `discovery` sections",
    )
    args = parser.parse_args()
    worlds = [tuple(item.split("=", 1)) for item in args.world]
    if args.home:
        worlds.append((args.home, args.config))
    if not worlds:
        parser.error("give --home (and --config) or at least one --world HOME=CONFIG")

    import torch

    torch.set_num_threads(1)
    scores = [score_world(home, config, args.default_discovery) for home, config in worlds]
    for score in scores:
        _print_world(score)
    recalled = sum(all(score["found"].values()) for score in scores)
    backed = [flag for score in scores for flag in score["backed"]]
    wording = sum((score["wording"] for score in scores), Counter())
    print(f"worlds: {len(scores)}; all planted among the top k modes: {recalled}/{len(scores)}")
    print(f"top-k modes backed by measured truth: {sum(backed)}/{len(backed)}")
    print(f"wording of all modes: {dict(wording)}")


if __name__ == "__main__":
    main()
