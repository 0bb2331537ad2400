"""Discovery against population truth (issue 18, item 1), on world homes made by bench/worlds.py.

Each home (`OUT/world-SEED/`) holds a full `llm2loss run` (discovery included: the
failure_hypotheses asset's reports/failure_hypotheses.parquet), its `world.yaml` (the plantings
under world.hard_attributes) and `population/` (population.parquet and the images, fresh images of
the world's identities the pipeline never saw). Per world:

- the kept failure modes in rank order (`verdict` == "mode"), each read as the attribute values it
  names: `shown_attributes` (the values its words state and its images show, "Goatee, not
  No_Beard"), else the candidate's own `attributes` (a mode whose words the images do not bear
  out); a mode naming no labelled value (free text) has no condition;
- planted recall in the top k modes (k = number planted + 2): a planted attribute is found when
  a top-k mode names it with value True;
- each mode's population truth (core/truth.py `condition_truth`): the black box's mean loss on
  the population images meeting every named value, minus that on all others, with an
  identity-clustered 95% interval. A mode is *backed* when that gap is > 0 and its interval
  excludes 0; a mode with no condition, or no population image meeting it, is not backed.

The issue's targets: all planted attributes among the top k modes in >= 90% of the worlds that
plant any; at most one mode in ten not backed.

    python bench/discovery_worlds.py /tmp/rep/world-2001 /tmp/rep/world-2002 ...
    python bench/discovery_worlds.py --root /tmp/rep            # every complete world-* home

The population losses are cached per home in population/losses.parquet (with the black box's
sha256, so a retrained black box is scored afresh); nothing else is written into a home.

`--rediscover` runs discovery afresh on each home's materialized encoder, heads, losses and
embeddings with the current code (nothing written), with `--set key=value` overriding discovery
settings (e.g. `--set min_p_worse=0.55`, `--set estimator=direct`, `--set
identity_clustered=false`). Settings are chosen on the tuning worlds, never on the reported ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import polars as pl
import yaml

from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.storage import sha256_file, write_parquet_atomic
from llm2loss_pipeline.core.truth import condition_truth, population_losses

LOSS_CACHE = "losses.parquet"
EXTRA_MODES = 2
"""k = number planted + EXTRA_MODES (the issue's top k)"""


def mode_condition(row: Mapping[str, Any]) -> dict[str, bool]:
    """The attribute values a mode names, from its `shown_attributes` ("Goatee, not No_Beard")
    or, when its images do not show its words, its candidate's `attributes`."""
    stated = row.get("shown_attributes") or row.get("attributes") or ""
    condition: dict[str, bool] = {}
    for part in str(stated).split(","):
        part = part.strip()
        if not part:
            continue
        name, value = (part[4:].strip(), False) if part.startswith("not ") else (part, True)
        condition[name] = value
    return condition


def score_modes(
    modes: Sequence[Mapping[str, bool]],
    truths: Sequence[Mapping[str, float] | None],
    planted: Sequence[str],
    variants: Sequence[Sequence[Mapping[str, bool]]] | None = None,
) -> dict[str, Any]:
    """A world's modes (conditions in rank order) and their truths (None: no condition) against
    its plantings: planted recall in the top k, and the share of modes the truth backs.
    `variants`: per mode, the conditions of the descriptions folded under it; a planted value
    one of them names is counted apart (`planted_in_variants`: found under a broader word)."""
    if len(modes) != len(truths):
        raise ValueError(f"{len(modes)} modes but {len(truths)} truths")
    k = len(planted) + EXTRA_MODES
    found = [name for name in planted if name in _named(modes[:k])]
    folded = [c for group in (variants or [])[:k] for c in group]
    in_variants = [name for name in planted if name not in found and name in _named(folded)]
    backed = [_backed(truth) for truth in truths]
    return {
        "k": k,
        "n_modes": len(modes),
        "planted_found": found,
        "planted_in_variants": in_variants,
        "planted_recall": len(found) / len(planted) if planted else math.nan,
        "all_planted_in_top_k": (len(found) == len(planted)) if planted else None,
        "n_backed": int(sum(backed)),
        "backed": backed,
        "n_backed_top_k": int(sum(backed[:k])),
        "n_top_k": min(k, len(modes)),
    }


def _named(conditions: Sequence[Mapping[str, bool]]) -> set[str]:
    return {name for condition in conditions for name, value in condition.items() if value}


def _backed(truth: Mapping[str, float] | None) -> bool:
    if truth is None:
        return False
    gap, low = truth["truth_gap"], truth["truth_low"]
    return bool(math.isfinite(gap) and math.isfinite(low) and gap > 0 and low > 0)


def cached_losses(home: Path, table: pl.DataFrame, use_cache: bool = True) -> np.ndarray:
    """The black box's population losses, from population/losses.parquet when it matches."""
    layout = Layout.at(home)
    population = home / "population"
    cache = population / LOSS_CACHE
    sha = sha256_file(layout.black_box)
    if use_cache and cache.exists():
        cached = pl.read_parquet(cache)
        if (
            cached["black_box_sha256"].unique().to_list() == [sha]
            and cached["sample_id"].to_list() == table["sample_id"].to_list()
        ):
            return cached["loss"].to_numpy().astype(np.float64)
    loss = population_losses(layout.black_box, population, table)
    if use_cache:
        frame = pl.DataFrame(
            {"sample_id": table["sample_id"], "loss": loss, "black_box_sha256": [sha] * len(loss)}
        )
        write_parquet_atomic(frame, cache)
    return loss


def planted_of(home: Path) -> dict[str, float]:
    path = home / "world.yaml"
    config = yaml.safe_load(path.read_text()) or {}
    world = config.get("world")
    if not isinstance(world, dict):
        raise ValueError(f"{path}: no `world` section")
    planted = world.get("hard_attributes") or {}
    if not isinstance(planted, dict):
        raise ValueError(f"{path}: world.hard_attributes must be a mapping, got {planted!r}")
    return {str(name): float(strength) for name, strength in planted.items()}


def rediscover(home: Path, config: DiscoveryConfig) -> Any:
    """Discovery's findings (hypotheses table, shared traits) computed afresh on `home`, nothing
    written: a Diagnoser made from the loaded encoder and heads (Diagnoser.load would write its
    text and query caches into the home), with the home's report for the grounded estimate, as
    the pipeline's asset has."""
    # lazy: torch and the encoder (seconds), only with --rediscover
    from llm2loss_pipeline.core.encoder.checkpoint import load_encoder
    from llm2loss_pipeline.core.heads.checkpoint import load_ensemble
    from llm2loss_pipeline.core.query import Diagnoser
    from llm2loss_pipeline.core.steps.discovery import compute_discovery

    layout = Layout.at(home)
    encoder = load_encoder(layout.encoder_dir, "cpu")
    ensemble, gap, meta = load_ensemble(
        layout.heads_dir,
        expected_dim=int(encoder.embed_dim),
        expected_encoder_sha256=str(encoder.sha256),
    )
    diagnoser = Diagnoser(encoder.encode_texts, ensemble, gap, {**meta, "home": str(home)})
    return compute_discovery(layout, config, diagnoser)


def score_shared(
    shared: Sequence[Any], loss: np.ndarray, table: pl.DataFrame
) -> list[dict[str, Any]]:
    """Each value the modes share (core/discovery/shared.py) with its population truth: the
    line's "worse" is backed when the people with the value are worse in the population
    (`_backed`), and its "not measurably worse" is contradicted when they are."""
    scored = []
    for trait in shared:
        truth = condition_truth(loss, table, {trait.attribute: trait.value})
        scored.append(
            {**trait.to_dict(), **(truth or {}), "label": trait.label, "backed": _backed(truth)}
        )
    return scored


def one_world(
    home: Path, use_cache: bool = True, config: DiscoveryConfig | None = None
) -> dict[str, Any]:
    """`config`: rediscover with it (None: the home's own failure_hypotheses.parquet)."""
    layout = Layout.at(home)
    findings = None if config is None else rediscover(home, config)
    hypotheses = pl.read_parquet(layout.hypotheses) if findings is None else findings.hypotheses
    modes = hypotheses.filter(pl.col("verdict") == "mode").sort("mode").to_dicts()
    table = pl.read_parquet(home / "population" / "population.parquet")
    loss = cached_losses(home, table, use_cache)
    conditions = [mode_condition(row) for row in modes]
    truths = [condition_truth(loss, table, c) if c else None for c in conditions]
    planted = planted_of(home)
    folded = hypotheses.filter(pl.col("verdict") == "folded")
    variants = [
        [mode_condition(r) for r in folded.filter(pl.col("mode") == row["mode"]).to_dicts()]
        for row in modes
    ]
    scores = score_modes(conditions, truths, list(planted), variants)
    # what the modes share is not stored in the home: only a rediscovery has it
    shared = None if findings is None else score_shared(findings.shared, loss, table)
    # a planted attribute the shared line names (True, said worse): found as a shared trait
    said = {t["attribute"] for t in shared or [] if t["value"] and t["worse"]}
    return {
        "home": str(home),
        "planted": planted,
        "planted_shared": None if shared is None else [name for name in planted if name in said],
        "n_candidates": hypotheses.height,
        "n_kept": int(hypotheses["kept"].sum()),
        **scores,
        "modes": [
            {
                "mode": row["mode"],
                "shown_as": row["shown_as"],
                "wording": row["wording"],
                "condition": conditions[i],
                "measured_gap": row["measured_gap"],
                "q_value": row["q_value"],
                **(truths[i] or {}),
                "backed": scores["backed"][i],
            }
            for i, row in enumerate(modes)
        ],
        "shared": shared,
    }


def summarize(worlds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    planted = [w for w in worlds if w["planted"]]
    n_modes = sum(w["n_modes"] for w in worlds)
    n_top = sum(w["n_top_k"] for w in worlds)
    shared = [t for w in worlds for t in (w.get("shared") or [])]
    return {
        "n_shared": len(shared),
        "n_shared_worse": sum(t["worse"] for t in shared),
        "n_shared_worse_backed": sum(t["worse"] and t["backed"] for t in shared),
        "n_shared_not_worse_backed": sum(not t["worse"] and t["backed"] for t in shared),
        "n_planted_shared": sum(len(w.get("planted_shared") or []) for w in planted),
        "n_planted": sum(len(w["planted"]) for w in planted),
        "n_worlds": len(worlds),
        "worlds_with_planting": len(planted),
        "all_planted_in_top_k": sum(bool(w["all_planted_in_top_k"]) for w in planted),
        "share_all_planted_in_top_k": (
            float(np.mean([bool(w["all_planted_in_top_k"]) for w in planted]))
            if planted
            else math.nan
        ),
        "mean_planted_recall": (
            float(np.mean([w["planted_recall"] for w in planted])) if planted else math.nan
        ),
        "n_modes": n_modes,
        "n_backed": sum(w["n_backed"] for w in worlds),
        "share_backed": sum(w["n_backed"] for w in worlds) / n_modes if n_modes else math.nan,
        "n_top_k": n_top,
        "share_backed_top_k": (
            sum(w["n_backed_top_k"] for w in worlds) / n_top if n_top else math.nan
        ),
    }


def print_tables(worlds: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    print("| world | planted | modes (kept) | k | planted in top k | modes backed | top k |")
    print("|---|---|---|---|---|---|---|")
    for w in worlds:
        planted = ", ".join(f"{n} {s:.2f}" for n, s in w["planted"].items()) or "-"
        found = ", ".join(w["planted_found"]) or "none"
        recall = f"{found} ({w['planted_recall']:.2f})" if w["planted"] else "-"
        if w["planted_in_variants"]:
            recall += f"; folded: {', '.join(w['planted_in_variants'])}"
        top = ", ".join(
            f"{m['shown_as']} [{'backed' if m['backed'] else 'not backed'}"
            f" {m.get('truth_gap', math.nan):+.2f}]"
            for m in w["modes"][: w["k"]]
        )
        print(
            f"| {Path(w['home']).name} | {planted} | {w['n_modes']} ({w['n_kept']}) | {w['k']} "
            f"| {recall} | {w['n_backed']}/{w['n_modes']} | {top or '-'} |"
        )
    s = summary
    print(
        f"\nall planted in the top k: {s['all_planted_in_top_k']}/{s['worlds_with_planting']} "
        f"worlds ({s['share_all_planted_in_top_k']:.2f}; target >= 0.90), mean planted recall "
        f"{s['mean_planted_recall']:.2f}; modes backed by population truth {s['n_backed']}/"
        f"{s['n_modes']} ({s['share_backed']:.2f}; target >= 0.90), in the top k "
        f"{s['share_backed_top_k']:.2f} of {s['n_top_k']}"
    )
    with_shared = [w for w in worlds if w.get("shared") is not None]
    if not with_shared:
        return
    print("\n| world | what the modes share (said worse?; population truth) |\n|---|---|")
    for w in with_shared:
        said = "; ".join(
            f"{t['label']} in {len(t['modes'])} of {t['n_modes']} modes ("
            f"{'worse' if t['worse'] else 'not measurably worse'}; truth "
            f"{t.get('truth_gap', math.nan):+.2f}, {'backed' if t['backed'] else 'not backed'})"
            for t in w["shared"]
        )
        print(f"| {Path(w['home']).name} | {said or '-'} |")
    print(
        f"\nshared values said worse: {s['n_shared_worse_backed']} of {s['n_shared_worse']} "
        f"backed by population truth; said not measurably worse but backed: "
        f"{s['n_shared_not_worse_backed']} of {s['n_shared'] - s['n_shared_worse']}; planted "
        f"attributes named by it: {s['n_planted_shared']} of {s['n_planted']}"
    )


def complete_homes(root: Path) -> list[Path]:
    """world-* homes under `root` whose run, discovery and population are all there."""
    return [
        home
        for home in sorted(root.glob("world-*"))
        if (home / "reports" / "attribute_disparity.parquet").exists()
        and Layout.at(home).hypotheses.exists()
        and (home / "population" / "population.parquet").exists()
    ]


def discovery_config(settings: Sequence[str]) -> DiscoveryConfig:
    """DiscoveryConfig with `key=value` overrides (values read as YAML scalars)."""
    overrides: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return DiscoveryConfig.model_validate(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("homes", nargs="*", help="world homes made by bench/worlds.py")
    parser.add_argument("--root", help="score every complete world-* home under this folder")
    parser.add_argument("--no-cache", action="store_true", help="write nothing into the homes")
    parser.add_argument("--json", help="write the per-world results and the summary here")
    parser.add_argument(
        "--rediscover", action="store_true", help="run discovery afresh (nothing written)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a discovery setting for --rediscover (YAML value), repeatable",
    )
    args = parser.parse_args(argv)
    config = discovery_config(args.set) if args.rediscover else None
    if args.set and not args.rediscover:
        parser.error("--set needs --rediscover")
    homes = [Path(h) for h in args.homes]
    if args.root:
        homes += complete_homes(Path(args.root))
    if not homes:
        parser.error("no world home: name homes or --root with complete world-* homes")
    worlds = []
    for home in homes:
        worlds.append(one_world(home, use_cache=not args.no_cache, config=config))
        print(f"{home}: scored", file=sys.stderr, flush=True)
    summary = summarize(worlds)
    print_tables(worlds, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"worlds": worlds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
