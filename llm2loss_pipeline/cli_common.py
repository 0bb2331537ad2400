"""What every `llm2loss` command shares: exit codes, the one-line error, strict JSON, the runner.

cli.py, query_cli.py and discover_cli.py all import this module and none imports another's
plumbing, so the command modules form no cycle (pyproject.toml, [tool.importlinter]). It imports
only the standard library: `llm2loss --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

EXIT_OK = 0
EXIT_PIPE_CLOSED = 1
"""the reader of our output went away (`llm2loss rank ... | head`)"""
EXIT_USAGE = 2
"""a problem the user can fix, told in one line on stderr (argparse uses 2 for its errors too)"""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as a shell reports it)"""


def fail(message: str, command: str | None = None) -> int:
    """Print `llm2loss [command]: error: message` to stderr; returns EXIT_USAGE."""
    prog = f"llm2loss {command}" if command else "llm2loss"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null, in nested dicts, lists and tuples, so that the output is
    strict JSON (json.dumps writes NaN, which most parsers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    return obj


def envelope(
    command: str,
    estimator: str | None,
    calibrated: bool,
    results: list[Any],
    notes: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one top-level JSON shape of `compare`, `rank` and `discover` (README, "Reading compare
    and rank"): what was asked, how it was estimated, the answers, and the notes (warnings) met;
    a command's own fields follow. Strict JSON (json_safe)."""
    return json_safe(
        {
            "command": command,
            "estimator": estimator,
            "calibrated": bool(calibrated),
            "results": results,
            "notes": list(notes or []),
            **extra,
        }
    )


def run_handler(args: argparse.Namespace) -> int:
    """A command's exit code; a reader that closed our output early (`| head`) is not an error
    worth a traceback."""
    try:
        code = int(args.handler(args) or EXIT_OK)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt as exc:  # Ctrl-C is an answer, not a crash: one line, no traceback
        reason = f": {exc}" if str(exc) else ""
        print(f"llm2loss: interrupted{reason}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code
