"""Many worlds: the diagnosis against population truth on generated worlds it was not tuned on.

For every world (seed and plantings drawn from the world's seed): run the real pipeline
(`llm2loss run`) in its own home, draw a population of fresh images of the same identities
(10 x the test split by default, never used by the pipeline), compute the black box's population
disparity per attribute (identity-clustered intervals), and score the report and `compare`
against it (core/truth.py):

- Spearman(estimate, population truth), with the labels ceiling beside it (the same grounded
  covariance with each image's true label instead of its text score);
- planted recall at 3, and how often the planted attributes are claimed;
- claims made, and the precision of the claims (sign right and truth's 95% interval excludes 0);
- coverage of the stated 90% intervals (loss units);
- pairs Spearman (estimated vs population signed pair disparity);
- the groups estimated from text: Spearman with the population's mean loss per group, beside the
  measured test split's, and how often each names the population's worst group;
- a calibration table of `compare` answers (paraphrased probes and hand-written questions).

    .venv/bin/python bench/worlds.py --set report          # the 8 reporting worlds
    .venv/bin/python bench/worlds.py --set tune            # the 2 worlds settings are chosen on
    .venv/bin/python bench/worlds.py --tiny --seeds 1,2    # what the test runs

Tuning worlds: seeds 1001-1008. Reporting worlds: seeds 2009-2016 (2001-2008 until stop 17).
The first world of each set plants nothing; the second plants one identity-level and one
image-level attribute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import polars as pl
import yaml

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.report.grounded import covariance_with, standardized_scores
from llm2loss_pipeline.core.steps.diagnosis import training_frame
from llm2loss_pipeline.core.truth import (
    calibration_table,
    condition_gap,
    population_gaps,
    population_losses,
    score_world,
)
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.population import write_population
from llm2loss_pipeline.core.world.traits import ATTRIBUTE_RULES

# 2001-2008 were the reporting worlds until stop 17, when their results chose the next change
# (the text error's fit): they are looked at now, so the reporting set moved to fresh seeds
SETS = {
    "tune": tuple(range(1001, 1009)),
    "report": tuple(range(2009, 2017)),
    "looked_at": tuple(range(2001, 2009)),
}
IDENTITY_LEVEL = [r.name for r in ATTRIBUTE_RULES if r.rendered and r.level == "identity"]
IMAGE_LEVEL = [r.name for r in ATTRIBUTE_RULES if r.rendered and r.level == "image"]
TINY = {
    "dataset": {"shard_size": 256},
    "world": {"n_identities": 24, "images_per_identity": 16, "image_size": 32},
    "black_box": {"image_size": 32, "epochs": 4, "width": 16},
    "encoder": {"mode": "caption_tuned", "image_size": 32, "epochs": 2},
    "heads": {"n_seeds": 2, "epochs": 10},
    "report": {"n_pairs": 3, "min_group_size": 5},
}
# (text A, conditions of A, text B, conditions of B): questions a user asks in their own words
QUESTIONS: list[tuple[str, dict[str, bool], str, dict[str, bool]]] = [
    (
        "face of an old man",
        {"Young": False, "Male": True},
        "face of a young woman",
        {"Young": True, "Male": False},
    ),
    (
        "face of an old man",
        {"Young": False, "Male": True},
        "face of a young man",
        {"Young": True, "Male": True},
    ),
    (
        "a photo of a person with gray hair",
        {"Gray_Hair": True},
        "a photo of a person with dark hair",
        {"Gray_Hair": False, "Black_Hair": True},
    ),
    ("a face with a goatee", {"Goatee": True}, "a clean-shaven face", {"No_Beard": True}),
    (
        "a person wearing spectacles",
        {"Eyeglasses": True},
        "a person without spectacles",
        {"Eyeglasses": False},
    ),
    (
        "a smiling person",
        {"Smiling": True},
        "a person with a neutral expression",
        {"Smiling": False},
    ),
    (
        "a person wearing a hat",
        {"Wearing_Hat": True},
        "a bareheaded person",
        {"Wearing_Hat": False},
    ),
    ("a blurry photo of a face", {"Blurry": True}, "a sharp photo of a face", {"Blurry": False}),
    ("face of a woman", {"Male": False}, "face of a man", {"Male": True}),
    ("a bald man", {"Bald": True}, "a man with a full head of hair", {"Bald": False, "Male": True}),
]
# texts the data cannot answer: their truth is "no difference", so only the claim rate is scored
OFF_DOMAIN = [("a photo of a cat", "a photo of a dog"), ("a red car", "a blue car")]


def plantings(seed: int, position: int) -> dict[str, float]:
    """The hard attributes of the world at `position` in its set, drawn from its seed."""
    rng = np.random.default_rng([seed, 17])
    if position == 0:
        return {}
    if position == 1:
        names = [str(rng.choice(IDENTITY_LEVEL)), str(rng.choice(IMAGE_LEVEL))]
    else:
        pool = IDENTITY_LEVEL + IMAGE_LEVEL
        names = [str(n) for n in rng.choice(pool, size=int(rng.integers(1, 4)), replace=False)]
    return {name: round(float(rng.uniform(0.5, 1.0)), 2) for name in names}


def _part(text: str | None) -> tuple[int, int]:
    """--part K/N as (K - 1, N); (0, 1) without it."""
    if text is None:
        return 0, 1
    try:
        k, n = (int(value) for value in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise SystemExit(f"--part {text!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
    return k - 1, n


def set_position(seed: int, index: int) -> int:
    """A seed's place in its set (what its plantings depend on), or its place in the list."""
    for seeds in SETS.values():
        if seed in seeds:
            return seeds.index(seed)
    return index


def world_config(seed: int, position: int, tiny: bool, base: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(TINY if tiny else {}))
    config.setdefault("world", {}).update(base)
    config["world"].update({"seed": seed, "hard_attributes": plantings(seed, position)})
    config["dataset"] = {**config.get("dataset", {}), "source": "generated"}
    return config


def apply_settings(config: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """`config` with each KEY=VALUE set (a dotted key, a YAML value): a candidate default under
    trial on every world, e.g. encoder.batch_size=64."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--setting {item!r}: expected KEY=VALUE, e.g. encoder.batch_size=64")
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = yaml.safe_load(value)
    return config


def run_pipeline(home: Path, config: dict[str, Any], log: Path) -> float:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "world.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    if not (home / "reports" / "attribute_disparity.parquet").exists():
        cli = Path(sys.executable).parent / "llm2loss"
        # one encoder thread unless the caller says otherwise: the worlds run two streams side by
        # side, and every figure in bench/RESULTS.md up to stop 29 was trained with one
        env = {
            "LLM2LOSS_CPU_THREADS": "1",
            **os.environ,
            "LLM2LOSS_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
        }
        with log.open("w") as out:
            done = subprocess.run(
                [str(cli), "run", "--config", str(path)], env=env, stdout=out, stderr=out
            )
        if done.returncode:
            raise RuntimeError(f"pipeline failed for {home} (see {log})")
    return time.perf_counter() - start


def labels_ceiling(layout: Layout, diagnoser: Any, attributes: list[str]) -> np.ndarray:
    """Per attribute: the grounded estimate with the true label as the text score."""
    split = str(diagnoser.meta.get("extra", {}).get("eval_split", "test"))
    frame = training_frame(layout).filter(pl.col("split") == split)
    pool = diagnoser.image_features(np.asarray(frame["embedding"].to_list(), dtype=np.float32))
    scores = diagnoser.score_features(pool)
    labels = np.stack([frame[n].to_numpy().astype(np.float64) for n in attributes], axis=1)
    usable = labels.std(axis=0) > 0
    out = np.full(len(attributes), np.nan)
    out[usable] = covariance_with(
        scores, standardized_scores(labels[:, usable], np.eye(usable.sum()))
    ).mean(0)
    return out


def retrieval_lift(layout: Layout, diagnoser: Any, share: float = 0.1) -> dict[str, dict]:
    """Per attribute: the precision of its probe's top `share` of the evaluation images (ranked
    by the report's decorrelated probe score, the grounded estimator's reading) and that over the
    attribute's base rate (issue 17, item 3: at least 2; unreachable above a 50% base rate)."""
    probes = diagnoser.probes()
    if probes is None:
        return {}
    attributes = json.loads((layout.home / "reports" / "calibration.json").read_text())[
        "attributes"
    ]
    split = str(diagnoser.meta.get("extra", {}).get("eval_split", "test"))
    frame = training_frame(layout).filter(pl.col("split") == split)
    pool = diagnoser.image_features(np.asarray(frame["embedding"].to_list(), dtype=np.float32))
    scores = standardized_scores(pool, probes[1])
    top = max(1, round(share * len(frame)))
    out = {}
    for j, name in enumerate(attributes):
        labels = frame[name].to_numpy().astype(bool)
        chosen = np.argsort(-scores[:, j], kind="stable")[:top]
        precision, base = float(labels[chosen].mean()), float(labels.mean())
        lift = precision / base if base > 0 else math.nan  # nothing to find on this split
        out[name] = {"precision": precision, "base_rate": base, "lift": lift}
    return out


def encoder_scores(layout: Layout, retrieval: dict[str, dict]) -> dict[str, Any]:
    """Issue 17 item 3 on one world: the encoder's zero-shot AUROC over the attributes (its
    sidecar, validation split) and the share of probes whose retrieval precision is at least
    twice the base rate."""
    sidecar = json.loads((layout.encoder_dir / "encoder.json").read_text())
    metrics = sidecar.get("metrics", sidecar)
    aurocs = [v for v in metrics.get("zero_shot_auroc", {}).values() if math.isfinite(v)]
    lifted = summarize_retrieval(retrieval)
    return {
        "zero_shot_auroc_mean": float(np.mean(aurocs)) if aurocs else math.nan,
        "zero_shot_below_0_75": float(sum(v < 0.75 for v in aurocs)),
        "retrieval_lift_2_share": (
            lifted["lift_at_least_2"] / lifted["attributes"] if lifted["attributes"] else math.nan
        ),
    }


def summarize_retrieval(lifts: dict[str, dict]) -> dict[str, Any]:
    usable = [v for v in lifts.values() if 0 < v["base_rate"] <= 0.5]
    return {
        "attributes": len(usable),
        "lift_at_least_2": sum(v["lift"] >= 2 for v in usable),
        "mean_lift": float(np.mean([v["lift"] for v in usable])) if usable else math.nan,
    }


def pair_truth(report_dir: Path, loss: np.ndarray, table: pl.DataFrame) -> tuple[float, int]:
    pairs = pl.read_parquet(report_dir / "pair_disparity.parquet")
    if pairs.height < 3:
        return math.nan, pairs.height
    truth = [
        condition_gap(loss, table, {a: True, b: True}, {a: False, b: False})
        for a, b in (name.split(" & ") for name in pairs["pair"].to_list())
    ]
    from llm2loss_pipeline.core.truth import _spearman

    return _spearman(pairs["est_signed_mean"].to_numpy(), np.asarray(truth)), pairs.height


def group_truth(report_dir: Path, loss: np.ndarray, table: pl.DataFrame) -> dict[str, float]:
    """The groups estimated from text (core/report/group_estimates.py) against the population:
    Spearman of each declared group's estimate with its population mean loss, beside the same
    for the measured test-split mean loss (what a user with labels sees), and whether the
    estimated and the measured worst groups are the population's worst by mean loss. Groups
    of an attribute task (target x attribute) are not scored: the population holds the identity
    task's losses."""
    from llm2loss_pipeline.core.truth import _spearman

    nan = {k: math.nan for k in GROUP_KEYS}
    path = report_dir / "groups.parquet"
    if not path.is_file():
        return nan
    groups = pl.read_parquet(path)
    if "est_rank" not in groups.columns or groups["target"].drop_nulls().len():
        return nan
    groups = groups.filter(pl.col("declared") & ~pl.col("small_group"))
    truth = np.array(
        [
            float(loss[table[name].to_numpy().astype(bool) == value].mean())
            for name, value in zip(groups["attribute"], groups["value"], strict=True)
        ]
    )
    worst = int(np.nanargmax(truth))
    # the report's own order (est_rank: by estimate, among groups the text gives enough images)
    estimated = np.argsort(groups["est_rank"].fill_null(1 << 30).to_numpy(), kind="stable")
    return {
        "groups_spearman": _spearman(groups["est_loss"].to_numpy(), truth),
        "groups_measured_spearman": _spearman(groups["mean_loss"].to_numpy(), truth),
        "groups_estimated_worst_is_true": float(estimated[0] == worst),
        "groups_true_worst_in_estimated_top3": float(worst in estimated[:3]),
        "groups_measured_worst_is_true": float(
            int(np.nanargmax(groups["mean_loss"].to_numpy())) == worst
        ),
    }


ENCODER_KEYS = ("zero_shot_auroc_mean", "zero_shot_below_0_75", "retrieval_lift_2_share")
"""`encoder_scores`' figures, averaged over the worlds that have them (older JSON files do not)."""
GROUP_KEYS = (
    "groups_spearman",
    "groups_measured_spearman",
    "groups_estimated_worst_is_true",
    "groups_true_worst_in_estimated_top3",
    "groups_measured_worst_is_true",
)


def compare_answers(diagnoser: Any, loss: np.ndarray, table: pl.DataFrame) -> list[dict]:
    from llm2loss_pipeline.core.prompts import attribute_prompt_pairs

    questions = list(QUESTIONS)
    for name in CELEBA_ATTRIBUTES:
        positive, negative = attribute_prompt_pairs(name)[-1]  # a phrasing unlike the first
        questions.append((positive, {name: True}, negative, {name: False}))
    answers = diagnoser.compare_many([(a, b) for a, _, b, _ in questions])
    rows = []
    for (a, cond_a, b, cond_b), answer in zip(questions, answers, strict=True):
        truth = condition_gap(loss, table, cond_a, cond_b)
        rows.append(
            {
                "a": a,
                "b": b,
                "p_a_worse": answer.p_a_worse,
                "explained": answer.explained,
                "truth": truth,
                "claimed": answer.claimed,
                "verdict": answer.verdict,
            }
        )
    for a, b in OFF_DOMAIN:
        answer = diagnoser.compare(a, b)
        rows.append(
            {
                "a": a,
                "b": b,
                "p_a_worse": answer.p_a_worse,
                "explained": answer.explained,
                "truth": math.nan,
                "claimed": answer.claimed,
                "verdict": answer.verdict,
            }
        )
    return rows


def one_world(seed: int, position: int, args: argparse.Namespace) -> dict[str, Any]:
    from llm2loss_pipeline.core.query import Diagnoser

    home = Path(args.out) / f"world-{seed}"
    base = {
        k: v
        for k, v in (
            ("n_identities", args.n_identities),
            ("images_per_identity", args.images_per_identity),
        )
        if v
    }
    config = apply_settings(world_config(seed, position, args.tiny, base), args.setting or [])
    if args.default_world:  # the embedded default's own world and plantings, as users see it
        home = Path(args.out) / "world-default"
        config = {"world": load_config(None).world.model_dump(mode="json")}
    seconds = run_pipeline(home, config, home / "run.log")
    layout = Layout.at(home)
    world = WorldConfig.model_validate(json.loads(json.dumps(config["world"])))
    per_identity = args.population_per_identity or max(
        10, 10 * round(world.images_per_identity * world.split_fractions[2])
    )
    population = home / "population"
    table = write_population(world, population, per_identity)
    loss = population_losses(layout.black_box, population, table)
    truth = population_gaps(loss, table, list(CELEBA_ATTRIBUTES))
    report_dir = layout.home / "reports"
    report = pl.read_parquet(report_dir / "attribute_disparity.parquet")
    diagnoser = Diagnoser.load(home)
    ceiling = labels_ceiling(layout, diagnoser, list(report["attribute"]))
    ceiling_by_name = dict(zip(report["attribute"].to_list(), ceiling, strict=True))
    truth_ceiling = np.array([ceiling_by_name.get(n, np.nan) for n in truth["attribute"]])
    ordered = report.join(truth.select("attribute"), on="attribute", how="inner")
    scores = score_world(ordered, truth, list(world.hard_attributes), None)
    scores["ceiling_spearman"] = score_world(
        ordered.with_columns(pl.Series("est_mean", truth_ceiling)), truth, [], None
    )["spearman"]
    scores["pairs_spearman"], scores["n_pairs"] = pair_truth(report_dir, loss, table)
    scores.update(group_truth(report_dir, loss, table))
    answers = compare_answers(diagnoser, loss, table)
    retrieval = retrieval_lift(layout, diagnoser)
    headline = json.loads((report_dir / "headline.json").read_text())
    return {
        "seed": seed,
        "planted": world.hard_attributes,
        "n_population": table.height,
        "pipeline_seconds": round(seconds, 1),
        **scores,
        "trust_check": {
            k: headline.get(k)
            for k in ("n_claims", "claim_precision_measured", "interval_coverage_measured")
        },
        "answers": answers,
        "retrieval": retrieval,
        **encoder_scores(layout, retrieval),
    }


def summarize(worlds: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        values = [w[key] for w in worlds if isinstance(w.get(key), float) and math.isfinite(w[key])]
        return float(np.mean(values)) if values else math.nan

    answers = [a for w in worlds for a in w["answers"] if math.isfinite(a["truth"])]
    off = [a for w in worlds for a in w["answers"] if not math.isfinite(a["truth"])]
    claims = sum(w["n_claims"] for w in worlds)
    correct = sum(w["n_correct_claims"] for w in worlds)
    return {
        "worlds": len(worlds),
        "spearman": mean("spearman"),
        "ceiling_spearman": mean("ceiling_spearman"),
        "planted_recall_at_3": mean("planted_recall_at_3"),
        "planted_significant": mean("planted_significant"),
        "claims": claims,
        "claim_precision_pooled": correct / claims if claims else math.nan,
        "claim_precision_mean": mean("claim_precision"),
        "claim_precision_min": min(
            (w["claim_precision"] for w in worlds if math.isfinite(w["claim_precision"])),
            default=math.nan,
        ),
        "coverage": mean("coverage"),
        "pairs_spearman": mean("pairs_spearman"),
        "pairs_spearman_min": min(
            (w["pairs_spearman"] for w in worlds if math.isfinite(w["pairs_spearman"])),
            default=math.nan,
        ),
        **{key: mean(key) for key in GROUP_KEYS if any(key in w for w in worlds)},
        **{key: mean(key) for key in ENCODER_KEYS if any(key in w for w in worlds)},
        "compare_calibration": calibration_table(
            np.array([a["p_a_worse"] for a in answers]), np.array([a["truth"] > 0 for a in answers])
        ),
        "off_domain_claims": f"{sum(a['claimed'] for a in off)} of {len(off)}",
    }


def print_tables(worlds: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    head = (
        "seed",
        "planted",
        "spearman",
        "ceiling",
        "recall@3",
        "claims",
        "precision",
        "coverage",
        "pairs",
        "secs",
    )
    print(" | ".join(head))
    for w in worlds:
        planted = ",".join(f"{k}={v}" for k, v in w["planted"].items()) or "-"
        print(
            f"{w['seed']} | {planted} | {w['spearman']:.2f} | {w['ceiling_spearman']:.2f} | "
            f"{w['planted_recall_at_3']:.2f} | {w['n_claims']} | {w['claim_precision']:.2f} | "
            f"{w['coverage']:.2f} | {w['pairs_spearman']:.2f} | {w['pipeline_seconds']:.0f}"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "compare_calibration"}, indent=1))
    cal = summary["compare_calibration"]
    print(f"compare calibration (n={cal['n']}, ECE {cal['ece']:.3f}):")
    for row in cal["bins"]:
        print(
            f"  P in {row['bin']}: n={row['n']:3d} stated {row['stated']:.2f} "
            f"observed {row['observed']:.2f}"
        )


def print_retrieval(homes: list[str]) -> int:
    from llm2loss_pipeline.core.query import Diagnoser

    for home in homes:
        lifts = retrieval_lift(Layout.at(home), Diagnoser.load(home))
        low = sorted((v["lift"], k) for k, v in lifts.items() if 0 < v["base_rate"] <= 0.5)[:5]
        print(
            home,
            json.dumps(summarize_retrieval(lifts)),
            "lowest:",
            ", ".join(f"{k} {v:.2f}" for v, k in low),
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="report")
    parser.add_argument("--seeds", help="comma-separated world seeds instead of a set")
    parser.add_argument("--tiny", action="store_true", help="CI-sized worlds (the test)")
    parser.add_argument("--n-identities", type=int)
    parser.add_argument("--images-per-identity", type=int)
    parser.add_argument("--population-per-identity", type=int)
    parser.add_argument("--out", default="/tmp/llm2loss-worlds")
    parser.add_argument(
        "--setting",
        action="append",
        metavar="KEY=VALUE",
        help="a config setting for every world (dotted key, YAML value): a candidate default",
    )
    parser.add_argument("--json", help="write the per-world results and summary here")
    parser.add_argument("--merge", nargs="+", help="summarise these --json results instead")
    parser.add_argument(
        "--part",
        help="K/N: only the worlds at list places K, K+N, ... (1-based), each planted as at its "
        "place in the whole list, so N processes share a set and --merge sums it up",
    )
    parser.add_argument(
        "--retrieval",
        nargs="+",
        metavar="HOME",
        help="only the probes' retrieval precision (top 10%% of the evaluation images) on these "
        "existing homes",
    )
    parser.add_argument(
        "--default-world",
        action="store_true",
        help="the embedded default (`make run`'s world and plantings) in OUT/world-default, "
        "which may already hold its run",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.retrieval:
        return print_retrieval(args.retrieval)
    if args.merge:  # results of several invocations (e.g. a set run as two parallel halves)
        worlds = [w for path in args.merge for w in json.loads(Path(path).read_text())["worlds"]]
        seconds = sum(w["pipeline_seconds"] for w in worlds)
    else:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(SETS[args.set])
        if args.default_world:
            seeds = [load_config(None).world.seed]
        part, parts = _part(args.part)
        worlds = []
        for index, seed in enumerate(seeds):
            if index % parts != part:
                continue
            worlds.append(one_world(seed, set_position(seed, index), args))
            print(f"world {seed}: done ({time.perf_counter() - start:.0f} s)", flush=True)
        seconds = time.perf_counter() - start
    summary = summarize(worlds)
    summary["seconds"] = round(seconds, 1)
    print_tables(worlds, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"worlds": worlds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
