"""`llm2loss discover`: descriptions in language where the model is worse, verified on samples.

    llm2loss discover [--top N] [--vocab FILE] [--json] [--home DIR] [--config FILE]

Runs failure discovery (core/discovery) on the materialized encoder, heads, losses and
embeddings and prints the ranked hypotheses; nothing is written (the failure_hypotheses asset
writes the report's copy). Exit 2 with one line on stderr for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llm2loss_pipeline.cli_common import fail, json_safe

COLUMNS = (
    ("rank", "#", 3),
    ("kept", "kept", 4),
    ("estimated_gap", "est", 6),
    ("p_worse", "P(worse)", 8),
    ("measured_gap", "measured", 8),
    ("measured_auc", "AUROC", 5),
    ("q_value", "q", 8),
    ("n_supporting", "support", 7),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "discover",
        help="find descriptions of inputs on which the model is worse, with evidence",
        description=(
            "Candidate descriptions (attribute phrases, their pairs, your vocabulary) scored by "
            "the head ensemble and verified on the evaluation split's samples."
        ),
    )
    parser.add_argument("--top", type=int, default=10, help="hypotheses to show (default 10)")
    parser.add_argument("--vocab", metavar="FILE", help="extra descriptions, one per line")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--home", help="artifact root (default: $LLM2LOSS_HOME or ./.llm2loss)")
    parser.add_argument(
        "--config",
        default=os.environ.get("LLM2LOSS_CONFIG") or None,
        help="YAML configuration whose `discovery` section applies (default: $LLM2LOSS_CONFIG)",
    )
    parser.set_defaults(handler=run_discover)


def run_discover(args: argparse.Namespace) -> int:
    from llm2loss_pipeline.core.config import ConfigError, load_config
    from llm2loss_pipeline.core.discovery.candidates import VocabularyError
    from llm2loss_pipeline.core.storage import StorageError
    from llm2loss_pipeline.diagnoser import Diagnoser

    if args.top < 1:
        return fail(f"--top must be at least 1, got {args.top}", "discover")
    try:
        config = load_config(args.config)
        home = args.home or config.home
        diagnoser = Diagnoser.load(home)
        report = diagnoser.discover(
            top=args.top, vocab=args.vocab, config=config.discovery, home=home
        )
    except (ConfigError, VocabularyError, StorageError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc), "discover")
    if args.json:
        rows = json_safe(report.to_dicts())
        evidence = report.evidence.select("rank", "role", "sample_id", "loss", "influence")
        print(
            json.dumps(
                {
                    "n_candidates": report.n_candidates,
                    "n_kept": report.n_kept,
                    "hypotheses": rows,
                    "evidence": evidence.to_dicts(),
                },
                indent=2,
            )
        )
        return 0
    print(f"{report.n_kept} of {report.n_candidates} candidate descriptions kept; top {args.top}:")
    header = "  ".join(f"{label:>{width}}" for _, label, width in COLUMNS)
    print(f"{header}  description")
    for row in report.to_dicts():
        cells = []
        for key, _, width in COLUMNS:
            value = row[key]
            if isinstance(value, bool):
                text = "yes" if value else "no"
            elif isinstance(value, float):
                signed = key in ("estimated_gap", "measured_gap")
                text = f"{value:.2e}" if key == "q_value" else f"{value:{'+' if signed else ''}.2f}"
            else:
                text = str(value)
            cells.append(f"{text:>{width}}")
        print("  ".join(cells) + "  " + row["description"])
    return 0
