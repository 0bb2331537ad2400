"""Questions asked within one class of an attribute task, against the population's truth.

`compare` asks two texts that name one class of an attribute task's target ("a blond man" vs "a
blond woman", for a Blond_Hair classifier) among that class's images only
(core/heads/within_class.py). This checks those answers: on each home of an attribute task, for
every diagnosed attribute whose probe the report tests and each class of the target, it asks
"face of a person with blond hair and X" vs "... without X" (composed as the report composes
its sentences) and judges P(A worse) against the population's gap within the class (fresh images
of the same identities, never used by the pipeline; the black box's loss on their target
labels): a calibration table, and how often the answers that name a side are right.

    .venv/bin/llm2loss run --config configs/spurious.yaml --home /tmp/sp/h0   # one per seed
    .venv/bin/python bench/within_class.py /tmp/sp/h0 --config configs/spurious.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import polars as pl

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.prompts import composed_prompt
from llm2loss_pipeline.core.query import Diagnoser
from llm2loss_pipeline.core.stats import clustered_mean_gap
from llm2loss_pipeline.core.truth import calibration_table, population_losses
from llm2loss_pipeline.core.world.population import write_population

ACCEPTANCE = ("a photo of a blond man", "a photo of a blond woman")
TRUTH_Z = 1.96  # a claim is right when its side is the truth's and the truth's 95% CI excludes 0


def _questions(home: Path, target: str) -> list[tuple[str, str, str, bool]]:
    """(text A, text B, attribute, class) for each tested probe and each class."""
    report = pl.read_parquet(Layout.at(home).reports / "attribute_disparity.parquet")
    tested = report.filter(pl.col("probe_resolves"))["attribute"].to_list()
    return [
        (
            composed_prompt({target: value, name: True}),
            composed_prompt({target: value, name: False}),
            name,
            value,
        )
        for value in (True, False)
        for name in tested
    ]


def one_home(home: Path, config_path: Path, per_identity: int) -> dict[str, Any]:
    config = load_config(config_path)
    target = config.task.target
    if config.task.kind != "attribute" or target is None:
        raise SystemExit(f"{home}: not an attribute task")
    table = write_population(config.world, home / "population", per_identity)
    loss = population_losses(Layout.at(home).black_box, home / "population", table, target)
    diagnoser = Diagnoser.load(home)
    questions = _questions(home, target)
    answers = diagnoser.compare_many([*((a, b) for a, b, _, _ in questions), ACCEPTANCE])
    identity = table["identity"].to_numpy()
    in_class = {v: table[target].to_numpy().astype(bool) == v for v in (True, False)}
    rows = []
    for (a, b, name, value), answer in zip(questions, answers[:-1], strict=True):
        keep = in_class[value]
        labels = table[name].to_numpy().astype(bool)[keep]
        gap, se = clustered_mean_gap(loss[keep], labels[:, None], identity[keep])
        rows.append(
            {
                "a": a,
                "b": b,
                "attribute": name,
                "class": value,
                "scoped": answer.scope is not None,
                "as_probe": answer.probe_within_class,
                "mean": answer.overall.mean,
                "std": answer.overall.std,
                "p_a_worse": answer.p_a_worse,
                "claimed": answer.claimed,
                "truth": float(gap[0]),
                "truth_se": float(se[0]),
            }
        )
    acceptance = answers[-1]
    return {
        "home": str(home),
        "seed": config.world.seed,
        "target": target,
        "n_population": table.height,
        "acceptance": {"verdict": acceptance.verdict, "p_a_worse": acceptance.p_a_worse},
        "rows": rows,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    usable = [r for r in rows if math.isfinite(r["truth"])]
    p = np.array([r["p_a_worse"] for r in usable])
    outcome = np.array([r["truth"] > 0 for r in usable])
    claimed = [r for r in usable if r["claimed"]]
    right = [
        r
        for r in claimed
        if (r["truth"] > 0) == (r["p_a_worse"] > 0.5) and abs(r["truth"]) > TRUTH_Z * r["truth_se"]
    ]
    table = calibration_table(p, outcome)
    return {
        "n_questions": len(usable),
        "n_scoped": sum(r["scoped"] for r in usable),
        "n_claims": len(claimed),
        "n_claims_right": len(right),
        "brier": float(np.mean((p - outcome) ** 2)) if usable else math.nan,
        "ece": table["ece"],
        "calibration": table["bins"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("homes", nargs="+", type=Path, help="homes of `llm2loss run`")
    parser.add_argument(
        "--config", type=Path, action="append", required=True, help="each home's config, in order"
    )
    parser.add_argument("--per-identity", type=int, default=60, help="population images each")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if len(args.config) != len(args.homes):
        parser.error(f"{len(args.homes)} homes but {len(args.config)} --config")
    worlds = [
        one_home(home, config, args.per_identity)
        for home, config in zip(args.homes, args.config, strict=True)
    ]
    for world in worlds:
        s = summary(world["rows"])
        print(
            f"seed {world['seed']}: {s['n_questions']} questions ({s['n_scoped']} within the "
            f"class), ECE {s['ece']:.3f}, Brier {s['brier']:.3f}, claims {s['n_claims_right']}/"
            f"{s['n_claims']} right; acceptance P {world['acceptance']['p_a_worse']:.2f}"
        )
    total = summary([row for world in worlds for row in world["rows"]])
    print(json.dumps(total, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"worlds": worlds, "aggregate": total}, indent=1))


if __name__ == "__main__":
    main()
