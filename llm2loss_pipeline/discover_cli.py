"""`llm2loss discover`: distinct failure modes in words, verified on samples.

    llm2loss discover [--top N] [--vocab FILE] [--only-vocab] [--json] [--home DIR] [--config FILE]

Runs failure discovery (core/discovery) on the materialized encoder, heads, losses and
embeddings and prints the top failure modes, then every line of the user's vocabulary with its
verdict and reason; nothing is written (the failure_hypotheses asset writes the report's copy).
Exit 2 with one line on stderr for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from llm2loss_pipeline.cli_common import envelope, fail

# Commands import what they run inside their handler, so that `llm2loss --help` stays at 86
# modules (0.1-0.3 s). Measured on top of the CLI: core.config +240 modules (1.5 s), the diagnoser
# +206 (0.9 s), defs.runner +578 (3.9 s), the report step +928 (8.8 s), rich.console +68 (0.3 s).

COLUMNS = (
    ("rank", "#", 3),
    ("mode", "mode", 4),
    ("estimated_gap", "est", 6),
    ("p_worse", "P(worse)", 8),
    ("measured_gap", "measured", 8),
    ("measured_auc", "AUROC", 5),
    ("q_value", "q", 8),
    ("n_variants", "variants", 8),
)

# The same sentences as the page (core/discovery/evidence.py), kept here so `--help` stays fast.
EPILOG = """\
proponents: matched samples the model does worse on (loss above the unmatched samples' median)
  that push the heads' estimate towards 'worse' most.
counter-examples: matched samples the model does fine on (loss at or below that median), those
  that pull the estimate down most first: cases of the description that do not fail.
A description is kept only when the heads' estimate and the matched samples both say worse;
  "estimate disagrees": the samples are worse but the heads, which generalise from the training
  split, do not rate it worse: a lead to check, not a finding. With attribute labels, such a
  description is still kept when the people its words name are measurably worse ("kept on the
  labels"), and so is one whose images show its words and whose people are worse at the level
  alpha / candidates, though its matched samples are not.
Descriptions whose matched samples overlap are one failure mode, shown under its best wording."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "discover",
        help="find distinct failure modes in words, with evidence",
        description=(
            "Candidate descriptions (attribute phrases, their pairs, your vocabulary) scored by "
            "the head ensemble, verified on the evaluation split's samples and grouped into "
            "distinct failure modes."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--top", type=int, default=10, help="failure modes to show (default 10)")
    parser.add_argument(
        "--vocab",
        metavar="FILE",
        help="extra descriptions, one per line; each is always shown with its verdict",
    )
    parser.add_argument(
        "--only-vocab", action="store_true", help="show only the --vocab descriptions"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--home", help="artifact root (default: $LLM2LOSS_HOME or ./.llm2loss)")
    parser.add_argument(
        "--config",
        default=os.environ.get("LLM2LOSS_CONFIG") or None,
        help="YAML configuration whose `discovery` section applies (default: $LLM2LOSS_CONFIG)",
    )
    parser.set_defaults(handler=run_discover)


def run_discover(args: argparse.Namespace) -> int:
    # lazy: these four: +530 modules, 0.4-0.7 s of `llm2loss --help` (cli.py imports this module)
    from llm2loss_pipeline.core.config import ConfigError, load_config
    from llm2loss_pipeline.core.discovery.candidates import VocabularyError
    from llm2loss_pipeline.core.storage import StorageError
    from llm2loss_pipeline.diagnoser import Diagnoser

    if args.top < 1:
        return fail(f"--top must be at least 1, got {args.top}", "discover")
    if args.only_vocab and not args.vocab:
        return fail("--only-vocab needs --vocab FILE", "discover")
    try:
        config = load_config(args.config)
        home = args.home or config.home
        diagnoser = Diagnoser.load(home)
        report = diagnoser.discover(top=None, vocab=args.vocab, config=config.discovery, home=home)
    except (ConfigError, VocabularyError, StorageError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc), "discover")
    table = report.table
    modes = [] if args.only_vocab else table.filter(table["verdict"] == "mode").head(args.top)
    vocab = table.filter(table["source"] == "vocabulary")
    n_modes = int((table["verdict"] == "mode").sum())
    if args.json:
        return _print_json(report, modes, vocab, n_modes)
    if not args.only_vocab:
        print(
            f"{n_modes} distinct failure modes at a {config.discovery.alpha:.0%} false discovery "
            f"rate ({report.n_kept} of {report.n_candidates} candidate descriptions verified); "
            f"top {len(modes)}:"
        )
        _print_rows(modes.to_dicts())
        _print_shared(report.shared)
    if vocab.height:
        print(f"{'' if args.only_vocab else chr(10)}your vocabulary ({vocab.height}):")
        _print_rows(vocab.to_dicts(), vocabulary=True)
    print("\n" + EPILOG)
    return 0


def _print_json(report: Any, modes: Any, vocab: Any, n_modes: int) -> int:
    shown = [] if isinstance(modes, list) else modes.to_dicts()
    ranks = {row["rank"] for row in shown} | set(vocab["rank"].to_list())
    evidence = report.evidence.filter(report.evidence["rank"].is_in(sorted(ranks)))
    # the shape compare and rank share (cli_common.envelope): the hypotheses are the results;
    # they are the heads' reading of each description's own embedding, verified on samples
    body = envelope(
        "discover",
        "direct",
        False,
        shown,
        n_candidates=report.n_candidates,
        n_kept=report.n_kept,
        n_modes=n_modes,
        shared=[trait.to_dict() for trait in report.shared],
        vocabulary=vocab.to_dicts(),
        evidence=evidence.select("rank", "role", "sample_id", "loss", "influence").to_dicts(),
    )
    print(json.dumps(body, indent=2))
    return 0


def _print_shared(shared: Any) -> None:
    """What most modes' images have in common, when the labels say so (core/discovery/shared.py)."""
    if not shared:
        return
    # lazy: core.discovery.evidence pulls polars and PIL; at module level on every `--help`
    from llm2loss_pipeline.core.discovery.evidence import SHARED_HEADING

    print(f"\n{SHARED_HEADING}:")
    for trait in shared:
        print(f"  {trait.sentence()}")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if key == "q_value":
            return f"{value:.2e}"
        return f"{value:+.2f}" if key in ("estimated_gap", "measured_gap") else f"{value:.2f}"
    return str(value)


def _print_rows(rows: list[dict[str, Any]], vocabulary: bool = False) -> None:
    """Modes under the words their images bear out; the user's lines under their own words,
    with what the images show and the verdict's reason."""
    # lazy: core.discovery pulls numpy and scipy; at module level they would load on `--help`
    from llm2loss_pipeline.core.discovery.modes import KEPT_ON_LABELS, KEPT_ON_LABELS_ALONE

    header = "  ".join(f"{label:>{width}}" for _, label, width in COLUMNS)
    print(f"{header}  description")
    indent = " " * (len(header) + 2)
    for row in rows:
        cells = "  ".join(f"{_cell(key, row[key]):>{width}}" for key, _, width in COLUMNS)
        print(f"{cells}  {row['description'] if vocabulary else row['shown_as']}")
        if row["shown_as"] != row["description"]:
            said = "the images show" if vocabulary else f"tested as '{row['description']}'"
            shown = row["shown_as"] if vocabulary else row["wording"]
            print(f"{indent}{said}: {shown}")
        elif row["wording"] != "supported":
            extra = f"; the images show {row['shows']}" if row["shows"] else ""
            print(f"{indent}wording: {row['wording']}{extra}")
        if vocabulary:
            print(f"{indent}{row['verdict']}: {row['reason']}")
        elif str(row.get("reason") or "").startswith(KEPT_ON_LABELS):
            # its est, P(worse) or q say "not worse": say why it is a mode all the same
            alone = str(row["reason"]).startswith(KEPT_ON_LABELS_ALONE)
            print(
                f"{indent}{KEPT_ON_LABELS}: the people it names are worse (gap "
                f"{row['labelled_gap']:+.2f}, p {row['labelled_p']:.2g}), "
                + ("its matched samples are not" if alone else "the heads' estimate is not")
            )
