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
chosen bound. `--free-text 2:0:0,2:0.6:0` re-judges `compare` alone under each free-text error
(FACTOR x tau, at least FLOOR, tau fitted at BOUND), with the ECE and the Brier score:

    .venv/bin/python bench/text_error_fit.py --bounds 0 --noise-shares 1 --gates on \
        --free-text 2:0:0,2:0.6:0 /tmp/tune/world-100?
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
from llm2loss_pipeline.core.heads import compare
from llm2loss_pipeline.core.query import Diagnoser
from llm2loss_pipeline.core.report.calibration import (
    calibrated_claims,
    fit_calibration,
    per_image_gap_se,
)
from llm2loss_pipeline.core.truth import calibration_table, population_gaps, score_world
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.population import POPULATION_TABLE

OVERALL = "overall"
AUROC = {"grounded": "zero_shot_auroc_dual", "direct": "zero_shot_auroc"}
DEFAULT_FREE_TEXT = (compare.FREE_TEXT_ERROR, compare.FREE_TEXT_FLOOR)


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


def judge(
    inputs: dict[str, Any],
    bound: float,
    noise_share: float,
    gate: bool,
    free_text: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """The claims and `compare` answers of one world with tau fitted at `bound` and
    `noise_share` (and the probes that do not resolve their attribute untested when `gate`),
    scored. `free_text` (factor, floor, bound): `compare`'s text error is
    max(factor * tau, floor) with tau fitted at that bound (core/heads/compare.py)."""
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
    if free_text is not None:
        factor, floor, free_bound = free_text
        calibration = fit_calibration(
            estimator,
            measured["_mean"].to_numpy(),
            measured["_std"].to_numpy(),
            measured["gap_loss"].to_numpy(),
            per_image_gap_se(measured),
            free_bound,
            noise_share,
        )
        compare.FREE_TEXT_ERROR, compare.FREE_TEXT_FLOOR = factor, floor
    diagnoser._calibration[estimator] = calibration  # what `compare` reads from the report
    try:
        answers = compare_answers(diagnoser, inputs["loss"], inputs["table"])
    finally:
        compare.FREE_TEXT_ERROR, compare.FREE_TEXT_FLOOR = DEFAULT_FREE_TEXT
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
        # a proper score: calibration and sharpness at once (an always-0.5 answer scores 0.25)
        "brier": float(np.mean((p - np.array([a["truth"] > 0 for a in answers])) ** 2)),
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
    parser.add_argument(
        "--free-text",
        help="only `compare`'s free-text error, claims at the first gate, share and bound: "
        "comma-separated FACTOR:FLOOR:BOUND candidates (core/heads/compare.py; the default is "
        f"{compare.FREE_TEXT_ERROR:g}:{compare.FREE_TEXT_FLOOR:g}:0)",
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
    if args.free_text:
        results = free_text_candidates(inputs, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def free_text_candidates(inputs: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    """`compare`'s answers under each FACTOR:FLOOR:BOUND free-text error, the claims at the first
    gate, noise share and bound (what the report would use)."""
    gate = args.gates.split(",")[0] == "on"
    share, bound = float(args.noise_shares.split(",")[0]), float(args.bounds.split(",")[0])
    print("free text (factor:floor:bound) | ECE | Brier | P>=0.9 (n, right) | off-domain claims")
    results = {}
    for candidate in args.free_text.split(","):
        factor, floor, free_bound = (float(v) for v in candidate.split(":"))
        judged = [judge(i, bound, share, gate, (factor, floor, free_bound)) for i in inputs]
        s = summary(judged)
        results[f"free:{candidate}"] = {"summary": s, "worlds": judged}
        print(
            f"{candidate} | {s['ece']:.3f} | {s['brier']:.4f} | "
            f"{s['sure_answers']}, {s['sure_right']:.2f} | "
            f"{s['off_domain_claims']}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
