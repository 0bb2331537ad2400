"""`llm2loss compare` and `llm2loss rank`: text questions to the trained heads, from the shell.

    llm2loss compare "face of an old male" "face of a young female" [--json] [--plot out.png]
    llm2loss rank "a person wearing glasses" "a person wearing a hat" [--file prompts.txt | -]

`register(subparsers)` adds both commands to the main `llm2loss` parser (cli.py); each handler
returns the exit code: 0, or 2 after printing one clear line to stderr for a problem the user can
fix (nothing materialized yet, an empty text, heads from another encoder, an unreadable file).
`python -m llm2loss_pipeline.query_cli ...` runs the two commands on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2loss_pipeline.cli_common import fail, json_safe, run_handler

PIPE_WIDTH = 120
WIDE = 110


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or holds no prompts."""


def register(subparsers: Any) -> None:
    """Add `compare` and `rank` to an argparse subparsers object (handler in `handler`)."""
    compare = subparsers.add_parser(
        "compare",
        help="compare the expected loss on two kinds of input described in text",
        description="Distribution over the head ensemble of h(A) - h(B); > 0: worse on A.",
    )
    compare.add_argument("text_a", metavar="TEXT_A")
    compare.add_argument("text_b", metavar="TEXT_B")
    _estimator(compare)
    _common(compare)
    compare.set_defaults(handler=run_compare)

    rank = subparsers.add_parser(
        "rank",
        help="order text descriptions by expected loss, worst first",
        description="Order texts by the ensemble-mean estimated loss, with member intervals.",
    )
    rank.add_argument("texts", nargs="*", metavar="TEXT")
    rank.add_argument(
        "--file",
        metavar="FILE",
        help="one prompt per line ('-' reads stdin); blank lines and lines starting with # skipped",
    )
    _estimator(rank)
    _common(rank)
    rank.set_defaults(handler=run_rank)


def _estimator(parser: argparse.ArgumentParser) -> None:
    # default None: grounded, the best estimator on the many-worlds benchmark (bench/RESULTS.md)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--grounded",
        dest="grounded",
        action="store_const",
        const=True,
        help="answer on the evaluation images, as the report does (the default)",
    )
    choice.add_argument(
        "--direct",
        dest="grounded",
        action="store_const",
        const=False,
        help="the paper's estimate: the heads read the texts' own embeddings (uncalibrated)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="artifact root (default: $LLM2LOSS_HOME or ./.llm2loss)")
    parser.add_argument(
        "--device", default="cpu", help="text encoder device: cpu, cuda, cuda:N, auto (default cpu)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also write a chart to FILE, in the format its extension names (.png, .svg, .pdf)",
    )


def load_diagnoser(home: str | None, device: str):
    """The Diagnoser for `home` (a seam that tests replace)."""
    from llm2loss_pipeline.diagnoser import Diagnoser

    return Diagnoser.load(home, device=device)


def _handled_errors() -> tuple[type[BaseException], ...]:
    from llm2loss_pipeline.core.storage import StorageError

    return (ValueError, StorageError, OSError)


def _check_options(args: argparse.Namespace) -> str:
    """Options that can be checked before the (slow) loading of the encoder and heads; returns
    the torch device to load on."""
    from llm2loss_pipeline.core.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise ValueError(f"--device {args.device}: {exc}") from exc
    if args.plot is not None:
        from llm2loss_pipeline.core.heads.plots import plot_format

        plot_format(args.plot)
    return device


def _notes(command: str, caught: list[warnings.WarningMessage]) -> None:
    """Warnings of the query (a text truncated to the encoder's context) as one line each."""
    for warning in caught:
        print(f"llm2loss {command}: note: {warning.message}", file=sys.stderr)


def run_compare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            device = _check_options(args)
            diagnoser = load_diagnoser(args.home, device)
            comparison = diagnoser.compare(args.text_a, args.text_b, grounded=args.grounded)
            if args.plot is not None:
                from llm2loss_pipeline.core.heads.plots import plot_comparison

                plot_comparison(comparison, args.plot)
        except _handled_errors() as exc:
            return fail(str(exc), "compare")
    _notes("compare", caught)
    if args.json:
        print(json.dumps(json_safe(comparison.to_dict()), indent=2))
    else:
        _print_comparison(comparison)
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_rank(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            device = _check_options(args)
            texts = list(args.texts)
            if args.file:
                texts = read_prompts(args.file) + texts
            if not texts:
                raise ValueError("no texts to rank: give them as arguments or with --file FILE")
            diagnoser = load_diagnoser(args.home, device)
            ranking = diagnoser.rank(texts, grounded=args.grounded)
            if args.plot is not None:
                from llm2loss_pipeline.core.heads.plots import plot_ranking

                plot_ranking(ranking, args.plot)
        except _handled_errors() as exc:
            return fail(str(exc), "rank")
    _notes("rank", caught)
    if args.json:
        print(json.dumps(json_safe(ranking), indent=2))
    else:
        _print_ranking(ranking, n_members=len(diagnoser.members))
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def read_prompts(source: str) -> list[str]:
    """Prompts from a file or stdin ('-'), parsed by `core.prompts.text_lines` (one per line,
    UTF-8, blank lines and # comments skipped). Any readable path works (a pipe, /dev/stdin,
    process substitution), not only regular files."""
    name = "stdin" if source == "-" else f"prompt file {source}"
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # bytes, to name the line of a bad one
        data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
    else:
        path = Path(source)
        if path.is_dir():
            raise PromptFileError(f"{name} is a directory; give a file with one prompt per line")
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise PromptFileError(f"{name} does not exist") from exc
        except OSError as exc:
            raise PromptFileError(f"{name} cannot be read ({exc.strerror or exc})") from exc
    from llm2loss_pipeline.core.prompts import text_lines

    try:
        prompts = text_lines(data)
    except ValueError as exc:  # an undecodable byte, with its line
        raise PromptFileError(f"{name} {exc}") from exc
    if not prompts:
        raise PromptFileError(
            f"{name} has no prompts (one per line; blank lines and # comments are skipped)"
        )
    return prompts


def _console():
    from rich.console import Console

    # a pipe or file gets 120 columns rather than rich's 80, so tables keep one line per row
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _print_comparison(comparison: Any) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"A: {comparison.text_a}", markup=False, soft_wrap=True)
    console.print(f"B: {comparison.text_b}", markup=False, soft_wrap=True)
    table = Table(title="h(A) - h(B) over ensemble members (> 0: worse on A)", title_justify="left")
    for column in ("group", "n", "mean", "min", "q1", "median", "q3", "max", "members A worse"):
        table.add_column(column, justify="left" if column == "group" else "right", no_wrap=True)
    for name, stats in comparison.groups.items():
        table.add_row(
            name,
            str(stats.n),
            *(
                f"{value:+.3f}"
                for value in (stats.mean, stats.min, stats.q1, stats.median, stats.q3, stats.max)
            ),
            f"{stats.p_greater:.2f}",
        )
    console.print(table)
    console.print(comparison.verdict, markup=False, soft_wrap=True)
    console.print(_meaning(comparison), style="dim", soft_wrap=True)
    console.print(
        f"estimator: {comparison.estimator}; units: {comparison.units}",
        style="dim",
        soft_wrap=True,
    )


def _meaning(comparison: Any) -> str:
    if comparison.calibrated:
        return (
            f"P(A worse) {comparison.p_a_worse:.2f}: the probability that the model's real loss "
            "is higher on A, from the members' spread (replicates of one fit, so their spread is "
            "the standard error) plus the text side's error learned on the report's labelled "
            "attributes; a side is named only at 0.9 or more."
        )
    return (
        "uncalibrated: 'members A worse' is only the share of ensemble members that say so, "
        "not a probability (build the report, and use the grounded estimator, to calibrate it)."
    )


def _print_ranking(ranking: Sequence[dict[str, Any]], n_members: int) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    table = Table(
        title=f"estimated loss by text, worst first ({n_members} members)", title_justify="left"
    )
    kinds = [name for name in ranking[0]["groups"] if name != "overall"] if ranking else []
    if console.width < WIDE:
        kinds = []  # a narrow terminal keeps the text readable instead
    for column in ("rank", "text", "mean", "q1 .. q3", "min .. max", *(f"{k} mean" for k in kinds)):
        if column == "text":
            table.add_column(column, justify="left", overflow="fold", ratio=1, min_width=20)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in ranking:
        table.add_row(
            str(row["rank"]),
            Text(row["text"]),  # not markup: a prompt may hold "[/]" or "[bold]"
            f"{row['mean']:+.3f}",
            f"{row['q1']:+.2f} .. {row['q3']:+.2f}",
            f"{row['min']:+.2f} .. {row['max']:+.2f}",
            *(f"{row['groups'][k]['mean']:+.3f}" for k in kinds),
        )
    console.print(table)
    console.print(
        "units: standard deviations of each member's predicted loss above its training average",
        style="dim",
        soft_wrap=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2loss", description="Query the LLM2Loss heads.")
    register(parser.add_subparsers(title="commands", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
