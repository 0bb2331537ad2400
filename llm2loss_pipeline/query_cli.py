"""`llm2loss compare` and `llm2loss rank`: text questions to the trained heads, from the shell.

    llm2loss compare "face of an old male" "face of a young female" [--json] [--plot out.png]
    llm2loss compare --pairs pairs.tsv          # one "A<TAB>B" per line; '-' reads stdin
    llm2loss rank "a person wearing glasses" "a person wearing a hat" [--file prompts.txt | -]
    llm2loss ask                                # loads once, then answers "A | B" lines

`register(subparsers)` adds both commands to the main `llm2loss` parser (cli.py); each handler
returns the exit code: 0, or 2 after printing one clear line to stderr for a problem the user can
fix (nothing materialized yet, an empty text, heads from another encoder, an unreadable file).
`python -m llm2loss_pipeline.query_cli ...` runs the commands on their own. With `--json` all of
them print one shape (cli_common.envelope); `ask --json` prints one such object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm2loss_pipeline.cli_common import envelope, fail, run_handler

# Commands import what they run inside their handler, so that `llm2loss --help` stays at 86
# modules (0.1-0.3 s). Measured on top of the CLI: core.config +240 modules (1.5 s), the diagnoser
# +206 (0.9 s), defs.runner +578 (3.9 s), the report step +928 (8.8 s), rich.console +68 (0.3 s).

PIPE_WIDTH = 120
WIDE = 110
RANK_ANSWER_WIDTH = 40  # what rank's P(worse) and verdict columns take


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or holds no prompts."""


def register(subparsers: Any) -> None:
    """Add `compare` and `rank` to an argparse subparsers object (handler in `handler`)."""
    compare = subparsers.add_parser(
        "compare",
        help="compare the expected loss on two kinds of input described in text",
        description="Distribution over the head ensemble of h(A) - h(B); > 0: worse on A.",
    )
    compare.add_argument("text_a", metavar="TEXT_A", nargs="?")
    compare.add_argument("text_b", metavar="TEXT_B", nargs="?")
    compare.add_argument(
        "--pairs",
        metavar="FILE",
        help="many comparisons at once: one 'A<TAB>B' per line ('-' reads stdin); blank lines "
        "and lines starting with # skipped",
    )
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

    ask = subparsers.add_parser(
        "ask",
        help="load once, then answer 'A | B' lines from stdin (a blank line or end of input quits)",
        description="Interactive or piped comparisons: each line 'A | B' is answered as "
        "`compare A B` would, without loading the heads again.",
    )
    _estimator(ask)
    _common(ask, plot=False)
    ask.set_defaults(handler=run_ask)


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


def _common(parser: argparse.ArgumentParser, plot: bool = True) -> None:
    parser.add_argument("--home", help="artifact root (default: $LLM2LOSS_HOME or ./.llm2loss)")
    parser.add_argument(
        "--device", default="cpu", help="text encoder device: cpu, cuda, cuda:N, auto (default cpu)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if not plot:
        parser.set_defaults(plot=None)
        return
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also write a chart to FILE, in the format its extension names (.png, .svg, .pdf)",
    )


def load_diagnoser(home: str | None, device: str):
    """The Diagnoser for `home` (a seam that tests replace)."""
    # lazy: numpy, polars, pydantic: +460 modules, 0.7 s of `llm2loss --help`
    from llm2loss_pipeline.diagnoser import Diagnoser

    return Diagnoser.load(home, device=device)


def _handled_errors() -> tuple[type[BaseException], ...]:
    # lazy: +40 modules, 26 ms of `llm2loss --help`
    from llm2loss_pipeline.core.storage import StorageError

    return (ValueError, StorageError, OSError)


def _check_options(args: argparse.Namespace) -> str:
    """Options that can be checked before the (slow) loading of the encoder and heads; returns
    the torch device to load on."""
    device = args.device
    if device != "cpu":  # resolving imports torch (seconds); "cpu" needs no resolving
        # lazy: pydantic: +150 modules, 0.2 s of `llm2loss --help`
        from llm2loss_pipeline.core.device import resolve_device

        try:
            device = resolve_device(args.device)
        except ValueError as exc:
            raise ValueError(f"--device {args.device}: {exc}") from exc
    if args.plot is not None:
        # lazy: numpy, polars: +400 modules, 0.5 s of `llm2loss --help`
        from llm2loss_pipeline.core.heads.plots import plot_format

        plot_format(args.plot)
    return device


def _notes(command: str, caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings of the query (a text truncated to the encoder's context), one line each on
    stderr; returned for the JSON's "notes"."""
    notes = list(dict.fromkeys(str(warning.message) for warning in caught))
    for note in notes:
        print(f"llm2loss {command}: note: {note}", file=sys.stderr)
    return notes


def _compare_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.pairs is not None:
        if args.text_a is not None:
            raise ValueError("give TEXT_A TEXT_B or --pairs FILE, not both")
        if args.plot is not None:
            raise ValueError("--plot draws one comparison; leave it out with --pairs")
        return read_pairs(args.pairs)
    if args.text_a is None or args.text_b is None:
        raise ValueError("compare needs two texts, TEXT_A TEXT_B (or --pairs FILE)")
    return [(args.text_a, args.text_b)]


def run_compare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            device = _check_options(args)
            pairs = _compare_inputs(args)
            diagnoser = load_diagnoser(args.home, device)
            comparisons = diagnoser.compare_many(pairs, grounded=args.grounded)
            if args.plot is not None:
                # lazy: numpy, polars: +400 modules, 0.5 s of `llm2loss --help`
                from llm2loss_pipeline.core.heads.plots import plot_comparison

                plot_comparison(comparisons[0], args.plot)
        except _handled_errors() as exc:
            return fail(str(exc), "compare")
    notes = _notes("compare", caught)
    if args.json:
        print(json.dumps(comparison_json(comparisons, notes), indent=2))
    elif args.pairs is not None:
        _print_pairs(comparisons)
    else:
        _print_comparison(comparisons[0])
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def comparison_json(comparisons: Sequence[Any], notes: list[str]) -> dict[str, Any]:
    first = comparisons[0]
    results = [comparison.to_dict() for comparison in comparisons]
    return envelope("compare", first.estimator, first.calibrated, results, notes)


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
                # lazy: numpy, polars: +400 modules, 0.5 s of `llm2loss --help`
                from llm2loss_pipeline.core.heads.plots import plot_ranking

                plot_ranking(ranking, args.plot)
        except _handled_errors() as exc:
            return fail(str(exc), "rank")
    notes = _notes("rank", caught)
    if args.json:
        estimator = ranking[0]["estimator"] if ranking else None
        calibrated = bool(ranking) and ranking[0]["p_worse"] is not None
        print(json.dumps(envelope("rank", estimator, calibrated, ranking, notes), indent=2))
    else:
        _print_ranking(ranking, n_members=len(diagnoser.members))
    if args.plot is not None:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


ASK_SEPARATOR = "|"


def run_ask(args: argparse.Namespace) -> int:
    """Answer 'A | B' lines until a blank line or the end of stdin; a bad line is named on
    stderr and skipped (exit 2 at the end, so that a script notices)."""
    try:
        device = _check_options(args)
        diagnoser = load_diagnoser(args.home, device)
    except _handled_errors() as exc:
        return fail(str(exc), "ask")
    interactive = sys.stdin.isatty()
    if interactive:
        print("ask: 'A | B' compares A with B; a blank line quits", file=sys.stderr)
    bad = 0
    for number, line in enumerate(_stdin_lines(interactive), start=1):
        if not line.strip():
            break
        try:
            pair = _ask_pair(line, number)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                (comparison,) = diagnoser.compare_many([pair], grounded=args.grounded)
        except _handled_errors() as exc:
            bad += 1
            fail(f"line {number}: {exc}", "ask")
            continue
        notes = _notes("ask", caught)
        if args.json:
            print(json.dumps(comparison_json([comparison], notes)), flush=True)
        else:
            print(comparison.verdict, flush=True)
    return 2 if bad else 0


def _stdin_lines(interactive: bool):
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def _ask_pair(line: str, number: int) -> tuple[str, str]:
    parts = [part.strip() for part in line.split(ASK_SEPARATOR)]
    if len(parts) != 2:
        raise ValueError(
            f"expected 'A | B' (two texts and one '|'), got {len(parts)} part(s): {line.strip()!r}"
        )
    return parts[0], parts[1]


def read_pairs(source: str) -> list[tuple[str, str]]:
    """Pairs from a file or stdin ('-'): one 'A<TAB>B' per line, UTF-8; blank lines and lines
    starting with # skipped. A line without exactly one tab, or with an empty side, is named by
    its number."""
    name = "stdin" if source == "-" else f"pairs file {source}"
    data = _read_bytes(source, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptFileError(f"{name} line {line}: not valid UTF-8") from exc
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [part.strip() for part in line.split("\t")]
        if len(parts) != 2:
            raise PromptFileError(
                f"{name} line {number}: expected two texts separated by one tab, "
                f"got {len(parts)} field(s): {line.strip()!r}"
            )
        for side, part in zip("AB", parts, strict=True):
            if not part:
                raise PromptFileError(f"{name} line {number}: text {side} is empty")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise PromptFileError(f"{name} has no pairs (one 'A<TAB>B' per line)")
    return pairs


def _read_bytes(source: str, name: str) -> bytes:
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None)  # bytes, to name the line of a bad one
        return stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
    path = Path(source)
    if path.is_dir():
        raise PromptFileError(f"{name} is a directory; give a file with one item per line")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PromptFileError(f"{name} does not exist") from exc
    except OSError as exc:
        raise PromptFileError(f"{name} cannot be read ({exc.strerror or exc})") from exc


def read_prompts(source: str) -> list[str]:
    """Prompts from a file or stdin ('-'), parsed by `core.prompts.text_lines` (one per line,
    UTF-8, blank lines and # comments skipped). Any readable path works (a pipe, /dev/stdin,
    process substitution), not only regular files."""
    name = "stdin" if source == "-" else f"prompt file {source}"
    data = _read_bytes(source, name)
    # lazy: +23 modules, 21 ms of `llm2loss --help`
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
    # lazy: rich: +68 modules, 60 ms of `llm2loss --help` and of every --json answer
    from rich.console import Console

    # a pipe or file gets 120 columns rather than rich's 80, so tables keep one line per row
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _print_comparison(comparison: Any) -> None:
    # lazy: rich: +60 modules, 50 ms of `llm2loss --help` and of every --json answer
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


def _print_pairs(comparisons: Sequence[Any]) -> None:
    # lazy: rich: +60 modules, 50 ms of `llm2loss --help` and of every --json answer
    from rich.table import Table
    from rich.text import Text

    console = _console()
    first = comparisons[0]
    share = "P(A worse)" if first.calibrated else "members A worse"
    table = Table(title=f"h(A) - h(B), {len(comparisons)} pairs", title_justify="left")
    for column in ("#", "A", "B", "mean", share, "verdict"):
        wide = column in ("A", "B", "verdict")
        table.add_column(column, justify="left" if wide else "right", overflow="fold")
    for number, comparison in enumerate(comparisons, start=1):
        overall = comparison.groups["overall"]
        value = comparison.p_a_worse if first.calibrated else overall.p_greater
        table.add_row(
            str(number),
            Text(comparison.text_a),
            Text(comparison.text_b),
            f"{overall.mean:+.3f}",
            f"{value:.2f}",
            Text(_short_verdict(comparison)),
        )
    console.print(table)
    console.print(
        f"estimator: {first.estimator}; units: {first.units}", style="dim", soft_wrap=True
    )


def _short_verdict(comparison: Any) -> str:
    """One table cell: the side named, else the verdict's opening words; and the probe asked."""
    if comparison.claimed:
        side = "A" if comparison.p_a_worse >= 0.5 else "B"
        short = f"worse on {side}"
    else:
        short = comparison.verdict.split(":")[0]
    if comparison.asked_as_probe:
        short += f" (asked as {comparison.probe.attribute})"
    elif comparison.scope is not None:
        label = "labelled" if comparison.scope.value else "not labelled"
        short += f" (among {label} {comparison.scope.target})"
    return short


def _meaning(comparison: Any) -> str:
    if comparison.asked_as_probe:
        probe = comparison.probe
        return (
            f"P(A worse) {comparison.p_a_worse:.2f}: the report's own calibrated P(worse with "
            f"{probe.attribute}), read for A: the texts' difference, written in the report's "
            f"probe directions, is {probe.share:.0%} {probe.attribute}'s, so it is asked as the "
            "report asks that attribute (its fifteen wordings, its text error, its identity "
            "term; the report itself claims only what holds over all attributes at its false "
            "discovery rate); a side is named only at 0.9 or more."
        )
    within = ""
    if comparison.scope is not None:
        within = (
            f"Both texts name one class of the task's target {comparison.scope.target}, whose "
            f"labels every evaluation image has, so the question is asked among "
            f"{comparison.scope.words} only, not over all images as the report's rows are. "
        )
    if comparison.calibrated and comparison.scope is not None and comparison.scope.empty_side:
        return within + (
            "P(A worse) 0.50: none of those images is labelled on one side of the attribute "
            "asked about, so the question is about people the data does not hold."
        )
    if comparison.calibrated and comparison.scope is not None and not comparison.probe_within_class:
        return within + (
            "P(A worse) 0.50: within a class only a question one report probe holds is answered; "
            "free text there named the right side about half the time on the tuning worlds "
            '(bench/RESULTS.md, "Stop 26"). Ask it in the words of one attribute.'
        )
    if comparison.calibrated and comparison.probe_within_class:
        probe = comparison.probe
        return within + (
            f"P(A worse) {comparison.p_a_worse:.2f}: the probability that the model's real loss "
            f"is higher on A, from the members' spread on those images (replicates of one fit, "
            f"so their spread is the standard error) plus the text side's error the report "
            f"learned for its probes, since the question is {probe.share:.0%} the "
            f"{probe.attribute} probe's; a side is named only at 0.9 or more."
        )
    if comparison.calibrated:
        # lazy: the CLI imports no query code up front (`comparison` has loaded this already)
        from llm2loss_pipeline.core.heads.compare import FREE_TEXT_ERROR, FREE_TEXT_FLOOR

        return (
            f"P(A worse) {comparison.p_a_worse:.2f}: the probability that the model's real loss "
            "is higher on A, from the members' spread (replicates of one fit, so their spread is "
            f"the standard error) plus the text side's error: {FREE_TEXT_ERROR:g} x the one "
            f"learned on the report's labelled attributes, and at least {FREE_TEXT_FLOOR:g}, "
            "since one wording of free text is read less surely than a probe; a side is named "
            "only at 0.9 or more."
        )
    return within + (
        "uncalibrated: 'members A worse' is only the share of ensemble members that say so, "
        "not a probability (build the report, and use the grounded estimator, to calibrate it)."
    )


RANK_MEANING = (
    "P(worse): the probability that the model's real loss is higher on the text than on the "
    "average of the texts ranked, judged as `compare` judges two texts (the same text-side error "
    "and the same 0.9 to name a side; a text one report probe holds takes the report's answer "
    "for that attribute, as in `compare`)."
)


def _print_ranking(ranking: Sequence[dict[str, Any]], n_members: int) -> None:
    # lazy: rich: +60 modules, 50 ms of `llm2loss --help` and of every --json answer
    from rich.table import Table
    from rich.text import Text

    console = _console()
    table = Table(
        title=f"estimated loss by text, worst first ({n_members} members)", title_justify="left"
    )
    kinds = [name for name in ranking[0]["groups"] if name != "overall"] if ranking else []
    judged = bool(ranking) and ranking[0]["p_worse"] is not None
    answers = ("P(worse)", "verdict") if judged else ()
    if console.width < WIDE + (RANK_ANSWER_WIDTH if judged else 0):
        kinds = []  # a narrow terminal keeps the text and the answer readable instead
    columns = ("rank", "text", "mean", "q1 .. q3", "min .. max", *answers)
    for column in (*columns, *(f"{k} mean" for k in kinds)):
        if column == "text":
            table.add_column(column, justify="left", overflow="fold", ratio=1, min_width=20)
        elif column == "verdict":
            table.add_column(column, justify="left", no_wrap=True)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in ranking:
        table.add_row(
            str(row["rank"]),
            Text(row["text"]),  # not markup: a prompt may hold "[/]" or "[bold]"
            f"{row['mean']:+.3f}",
            f"{row['q1']:+.2f} .. {row['q3']:+.2f}",
            f"{row['min']:+.2f} .. {row['max']:+.2f}",
            *((f"{row['p_worse']:.2f}", row["verdict"]) if judged else ()),
            *(f"{row['groups'][k]['mean']:+.3f}" for k in kinds),
        )
    console.print(table)
    if ranking:
        console.print(f"units: {ranking[0]['units']}", style="dim", soft_wrap=True)
    within = ranking[0].get("within") if ranking else None
    if within:
        label = "labelled" if within["value"] else "not labelled"
        console.print(
            f"ranked among the {within['n_images']} evaluation images {label} "
            f"{within['target']}, the class of the task's target every text names",
            style="dim",
            soft_wrap=True,
        )
    if judged:
        console.print(RANK_MEANING, style="dim", soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2loss", description="Query the LLM2Loss heads.")
    register(parser.add_subparsers(title="commands", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
