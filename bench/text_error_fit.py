"""Choosing how the text error is fitted: each candidate fit re-judged on finished world homes.

The report's claims, intervals and `compare`'s P(A worse) all rest on one fitted number, the text
error tau (core/report/calibration.py). Its moment estimate from 40 attributes is noisy, and where
it comes out small every claim built on it is too sure (bench/RESULTS.md, "The reporting worlds
at the default size"). This script takes the homes that `bench/worlds.py` left behind (a report,
its heads and the world's population), and for each candidate `bound` (how many of its own
standard errors tau^2 is raised by) recomputes the claims, the intervals and the `compare`
answers from the same estimates, then scores them against the population truth: nothing is
retrained, so the candidates differ in the fit alone.

    .venv/bin/python bench/text_error_fit.py /tmp/tune/world-100*         # choose on these
    .venv/bin/python bench/text_error_fit.py --bounds 0,0.5 --noise-shares 1 /tmp/rep/world-*

Run it on the tuning worlds (1001-1008) to choose, and on the reporting worlds only with the
chosen bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import polars as pl
import yaml
from discovery_worlds import cached_losses
from worlds import compare_answers

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.query import Diagnoser
from llm2loss_pipeline.core.report.calibration import calibrated_claims, per_image_gap_se
from llm2loss_pipeline.core.truth import calibration_table, population_gaps, score_world
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.population import POPULATION_TABLE

OVERALL = "overall"
AUROC = {"grounded": "zero_shot_auroc_dual", "direct": "zero_shot_auroc"}


def world_inputs(home: Path) -> dict[str, Any]:
    """The report's estimates and measured gaps, the population truth, and the loaded diagnoser."""
    raw = yaml.safe_load((home / "world.yaml").read_text())
    world = WorldConfig.model_validate(raw["world"])
    # the population bench/worlds.py drew into the home (as bench/discovery_worlds.py reads it)
    table = pl.read_parquet(home / "population" / POPULATION_TABLE)
    loss = cached_losses(home, table)
    reports = home / "reports"
    measured = pl.read_parquet(reports / "attribute_disparity.parquet")
    estimates = pl.read_parquet(reports / "attribute_estimates.parquet").filter(
        pl.col("group") == OVERALL
    )
    measured = measured.join(
        estimates.select("attribute", pl.col("mean").alias("_mean"), pl.col("std").alias("_std")),
        on="attribute",
        how="left",
        maintain_order="left",
    )
    return {
        "seed": world.seed,
        "planted": dict(world.hard_attributes),
        "measured": measured,
        "truth": population_gaps(loss, table, list(CELEBA_ATTRIBUTES)),
        "loss": loss,
        "table": table,
        "diagnoser": Diagnoser.load(home),
        "alpha": load_config(home / "world.yaml").report.alpha,
    }


def judge(inputs: dict[str, Any], bound: float, noise_share: float, gate: bool) -> dict[str, Any]:
    """The claims and `compare` answers of one world with tau fitted at `bound` and
    `noise_share` (and the probes that do not resolve their attribute untested when `gate`),
    scored."""
    measured: pl.DataFrame = inputs["measured"]
    diagnoser = inputs["diagnoser"]
    estimator = str(diagnoser.meta.get("extra", {}).get("estimator", "grounded"))
    claims, calibration = calibrated_claims(
        measured["attribute"].to_list(),
        estimator,
        measured["_mean"].to_numpy(),
        measured["_std"].to_numpy(),
        measured["gap_loss"].to_numpy(),
        measured["gap_loss_se"].to_numpy(),
        inputs["alpha"],
        gap_se_images=per_image_gap_se(measured),
        bound=bound,
        noise_share=noise_share,
        resolution=measured[AUROC[estimator]].to_numpy() if gate else None,
    )
    report = claims.join(
        measured.select("attribute", pl.col("_mean").alias("est_mean")), on="attribute"
    )
    scores = score_world(report, inputs["truth"], list(inputs["planted"]), None)
    diagnoser._calibration[estimator] = calibration  # what `compare` reads from the report
    answers = compare_answers(diagnoser, inputs["loss"], inputs["table"])
    return {"seed": inputs["seed"], "tau": calibration.text_error, **scores, "answers": answers}


def summary(judged: list[dict[str, Any]]) -> dict[str, Any]:
    answers = [a for w in judged for a in w["answers"] if math.isfinite(a["truth"])]
    off = [a for w in judged for a in w["answers"] if not math.isfinite(a["truth"])]
    p = np.array([a["p_a_worse"] for a in answers])
    right = np.where(p >= 0.5, [a["truth"] > 0 for a in answers], [a["truth"] < 0 for a in answers])
    sure = np.maximum(p, 1 - p) >= 0.9
    claims = sum(w["n_claims"] for w in judged)
    precisions = [w["claim_precision"] for w in judged if math.isfinite(w["claim_precision"])]
    planted = [w["planted_significant"] for w in judged if math.isfinite(w["planted_significant"])]
    return {
        "claims": claims,
        "correct": sum(w["n_correct_claims"] for w in judged),
        "precision_mean": float(np.mean(precisions)) if precisions else math.nan,
        "precision_min": min(precisions, default=math.nan),
        "planted_significant": float(np.mean(planted)) if planted else math.nan,
        "coverage": float(np.mean([w["coverage"] for w in judged])),
        "ece": calibration_table(p, np.array([a["truth"] > 0 for a in answers]))["ece"],
        "sure_answers": int(sure.sum()),
        "sure_right": float(right[sure].mean()) if sure.any() else math.nan,
        "off_domain_claims": sum(a["claimed"] for a in off),
        "tau_min": min(w["tau"] for w in judged),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("homes", nargs="+", type=Path)
    parser.add_argument("--bounds", default="0,0.5,1,1.5,2", help="comma-separated candidates")
    parser.add_argument(
        "--noise-shares", default="1,0.5,0", help="share of the per-image noise taken out"
    )
    parser.add_argument(
        "--gates", default="on,off", help="on: probes under MIN_RESOLUTION are not tested"
    )
    parser.add_argument("--json", type=Path, help="write every world's scores here")
    args = parser.parse_args(argv)
    homes = [h for h in args.homes if (h / "reports" / "attribute_disparity.parquet").exists()]
    inputs = [world_inputs(home) for home in homes]
    print(f"{len(inputs)} worlds: {', '.join(str(i['seed']) for i in inputs)}", flush=True)
    results = {}
    head = "gate | noise share | bound | claims | correct | prec mean | prec min | planted sig | "
    print(head + "coverage | ECE | P>=0.9 (n, right) | off-domain claims | tau min")
    candidates = [
        (gate, float(n), float(b))
        for gate in args.gates.split(",")
        for n in args.noise_shares.split(",")
        for b in args.bounds.split(",")
    ]
    for gate, share, bound in candidates:
        judged = [judge(i, bound, share, gate == "on") for i in inputs]
        s = summary(judged)
        results[f"{gate}:{share:g}:{bound:g}"] = {"summary": s, "worlds": judged}
        print(
            f"{gate} | {share:g} | {bound:g} | {s['claims']} | {s['correct']} | "
            f"{s['precision_mean']:.2f} | "
            f"{s['precision_min']:.2f} | {s['planted_significant']:.2f} | {s['coverage']:.2f} | "
            f"{s['ece']:.3f} | {s['sure_answers']}, {s['sure_right']:.2f} | "
            f"{s['off_domain_claims']} | {s['tau_min']:.2f}",
            flush=True,
        )
        for w in judged:
            print(
                f"    {w['seed']}: tau {w['tau']:.2f}, claims {w['n_claims']} "
                f"({w['n_correct_claims']} right), coverage {w['coverage']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
