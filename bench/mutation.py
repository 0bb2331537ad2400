"""Mutation testing: does the suite notice a small, plausible bug in code whose numbers users read?

    python bench/mutation.py --max-per-file 8            # a sample of mutants per target file
    python bench/mutation.py --files core/stats.py --max-per-file 0     # every mutant of one file
    python bench/mutation.py --list                      # the mutants, without running anything

For each target file, one mutation at a time is applied to a copy of the repository under
`--workdir` (never to this checkout: other people's uncommitted work lives here), the test files
mapped to that target run with `pytest -x -q` under a timeout, and the file is restored before the
next mutant, also when the run is interrupted. A mutant is killed when the tests fail (or time
out), survived when they pass. The copy holds the tracked and untracked-but-not-ignored files of
the checkout as they are on disk, and tests run with this interpreter from the copy's root, so
the copy's package is the one imported (checked before the first mutant).

Mutations (found with `ast`, applied as text to the exact source span of the node, so the rest of
the file keeps its bytes): comparison flips (< <=, > >=, == !=, is / is not, in / not in),
arithmetic swaps (+ -, * /, // /, ** *), numeric constant tweaks (0 -> 1, n -> n + 1, a float ->
0.0, 0.0 -> 1.0), boolean negation (`not x` -> x, True <-> False, and <-> or), a dropped unary
minus, the first two positional arguments of a call swapped, a call statement dropped (-> pass).
String constants, f-strings, docstrings and type annotations are left alone: a mutated error
message is a different message, not a bug these tests should catch.

The sample is deterministic (`--seed`). Prints killed / survived per file and every survivor with
its line and the mutated source; `--json FILE` writes the same. Not part of CI (too slow): run it
before resolving an issue that touches these files, and judge each survivor: an equivalent
mutant (no observable change) is recorded in bench/RESULTS.md, a real one gets a test.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llm2loss_pipeline"

TARGETS: dict[str, list[str]] = {
    "core/stats.py": ["tests/test_pins.py", "tests/test_stats.py", "tests/test_calibration.py"],
    "core/report/calibration.py": ["tests/test_mutation_pins.py", "tests/test_calibration.py"],
    "core/report/measured.py": [
        "tests/test_pins.py",
        "tests/test_mutation_pins.py",
        "tests/test_report.py",
    ],
    "core/report/grounded.py": [
        "tests/test_mutation_pins.py",
        "tests/test_report_grounded.py",
        "tests/test_calibration.py",
    ],
    "core/report/estimated.py": [
        "tests/test_mutation_pins.py",
        "tests/test_report.py",
        "tests/test_report_grounded.py",
    ],
    "core/heads/train.py": [
        "tests/test_mutation_pins.py",
        "tests/test_uncertainty.py",
        "tests/test_heads.py",
        "tests/test_calibration.py",
    ],
    "core/heads/compare.py": [
        "tests/test_mutation_pins.py",
        "tests/test_compare.py",
        "tests/test_calibration.py",
    ],
    "core/celeba.py": [
        "tests/test_pins.py",
        "tests/test_mutation_pins.py",
        "tests/test_celeba_reader.py",
    ],
    "core/storage.py": [
        "tests/test_pins.py",
        "tests/test_mutation_pins.py",
        "tests/test_reliability_tempfiles.py",
        "tests/test_home_lock.py",
        "tests/test_reliability_storage.py",
    ],
    "core/discovery/verify.py": [
        "tests/test_pins.py",
        "tests/test_mutation_pins.py",
        "tests/test_discovery_gates.py",
        "tests/test_discovery_hypotheses.py",
    ],
}
"""target (under the package) -> the test files that guard it, the fastest first (-x stops at the
first failure, so a killed mutant usually costs only the fast file)."""

COMPARE_FLIPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BINOP_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult,
}


@dataclass(frozen=True)
class Mutant:
    target: str
    line: int
    kind: str
    start: int  # character offsets of the replaced span in the file's text
    end: int
    replacement: str
    original: str

    def describe(self) -> str:
        before = " ".join(self.original.split())
        after = " ".join(self.replacement.split())
        return f"{self.target}:{self.line} [{self.kind}] {before[:70]!r} -> {after[:70]!r}"


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timeout, error (the mutant does not compile)
    seconds: float


def _offsets(text: str) -> list[int]:
    """Character offset of the start of each line (1-based lines at index line - 1)."""
    starts, total = [], 0
    for line in text.splitlines(keepends=True):
        starts.append(total)
        total += len(line)
    return starts


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes under f-strings, annotations and docstrings, which are not mutated."""
    skipped: set[int] = set()

    def skip(node: ast.AST | None) -> None:
        if node is not None:
            skipped.update(id(child) for child in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip(node)
        elif isinstance(node, ast.AnnAssign | ast.arg):
            skip(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            skip(node.returns)
    return skipped


def _variants(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """(kind, mutated copy of node) for each mutation of this node itself."""
    out: list[tuple[str, ast.AST]] = []

    def copy() -> ast.AST:
        return ast.parse(ast.unparse(node), mode="eval").body

    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE_FLIPS:
                new = copy()
                new.ops[i] = COMPARE_FLIPS[type(op)]()
                out.append(("compare", new))
    elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        new = copy()
        new.op = BINOP_SWAPS[type(node.op)]()
        out.append(("arithmetic", new))
    elif isinstance(node, ast.BoolOp):
        new = copy()
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("boolean", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("negation", copy().operand))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        if not isinstance(node.operand, ast.Constant):  # -1 is a constant, tweaked below
            out.append(("sign", copy().operand))
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        out.append(("boolean", ast.Constant(not node.value)))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out.append(("constant", ast.Constant(1 if node.value == 0 else node.value + 1)))
    elif isinstance(node, ast.Constant) and type(node.value) is float:
        out.append(("constant", ast.Constant(1.0 if node.value == 0.0 else 0.0)))
    elif (
        isinstance(node, ast.Call)
        and len(node.args) >= 2
        and not any(isinstance(arg, ast.Starred) for arg in node.args[:2])
    ):
        new = copy()
        new.args[0], new.args[1] = new.args[1], new.args[0]
        out.append(("argument swap", new))
    return out


def find_mutants(target: str, text: str) -> list[Mutant]:
    tree = ast.parse(text)
    starts = _offsets(text)
    skipped = _skipped_nodes(tree)
    docstrings = {
        id(body[0].value)
        for body in (
            getattr(n, "body", None)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        )
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    }
    mutants: list[Mutant] = []
    for node in ast.walk(tree):
        if id(node) in skipped or id(node) in docstrings or not hasattr(node, "end_col_offset"):
            continue
        start = starts[node.lineno - 1] + _char_col(text, starts, node.lineno, node.col_offset)
        end = starts[node.end_lineno - 1] + _char_col(
            text, starts, node.end_lineno, node.end_col_offset
        )
        original = text[start:end]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            mutants.append(
                Mutant(target, node.lineno, "dropped call", start, end, "pass", original)
            )
            continue
        if not isinstance(node, ast.expr):
            continue
        for kind, new in _variants(node):
            replacement = f"({ast.unparse(new)})"
            mutants.append(Mutant(target, node.lineno, kind, start, end, replacement, original))
    return sorted(mutants, key=lambda m: (m.start, m.kind, m.replacement))


def _char_col(text: str, starts: list[int], line: int, byte_col: int) -> int:
    """ast columns count UTF-8 bytes; the text is indexed by characters."""
    line_start = starts[line - 1]
    line_end = starts[line] if line < len(starts) else len(text)
    return len(text[line_start:line_end].encode("utf-8")[:byte_col].decode("utf-8"))


def apply(text: str, mutant: Mutant) -> str:
    return text[: mutant.start] + mutant.replacement + text[mutant.end :]


def make_copy(workdir: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as on disk, under workdir."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    if workdir.exists():
        shutil.rmtree(workdir)
    for raw in filter(None, listed):
        source = REPO / os.fsdecode(raw)
        if source.is_file():
            destination = workdir / os.fsdecode(raw)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started
    return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - started


def check_import_path(workdir: Path) -> None:
    probe = f"import {PACKAGE}, sys; sys.stdout.write({PACKAGE}.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout
    if not Path(found).resolve().is_relative_to(workdir.resolve()):
        raise SystemExit(f"the copy's tests would import {found}, not the copy under {workdir}")


def run_target(workdir: Path, target: str, mutants: list[Mutant], timeout: float) -> list[Outcome]:
    path = workdir / PACKAGE / target
    original = path.read_text(encoding="utf-8")
    outcomes = []
    for number, mutant in enumerate(mutants, start=1):
        mutated = apply(original, mutant)
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError:
            outcomes.append(Outcome(mutant, "error", 0.0))
            continue
        try:
            path.write_text(mutated, encoding="utf-8")
            status, seconds = run_tests(workdir, TARGETS[target], timeout)
        finally:
            path.write_text(original, encoding="utf-8")  # always, also on Ctrl-C
        outcomes.append(Outcome(mutant, status, seconds))
        print(f"  {number}/{len(mutants)} {status:8s} {seconds:6.1f}s  {mutant.describe()}")
        sys.stdout.flush()
    return outcomes


def sample(mutants: list[Mutant], limit: int, seed: int) -> list[Mutant]:
    if limit <= 0 or len(mutants) <= limit:
        return mutants
    chosen = random.Random(seed).sample(range(len(mutants)), limit)
    return [mutants[i] for i in sorted(chosen)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--files", nargs="*", default=list(TARGETS), help="targets, e.g. core/stats.py"
    )
    parser.add_argument("--max-per-file", type=int, default=8, help="0: every mutant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's tests")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm2loss-mutation"))
    parser.add_argument("--json", type=Path, help="write every outcome to this file")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    args = parser.parse_args()
    unknown = [name for name in args.files if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {list(TARGETS)}")

    chosen = {}
    for target in args.files:
        text = (REPO / PACKAGE / target).read_text(encoding="utf-8")
        found = find_mutants(target, text)
        chosen[target] = sample(found, args.max_per_file, args.seed)
        print(f"{target}: {len(found)} mutants, {len(chosen[target])} chosen")
    if args.list:
        for mutants in chosen.values():
            for mutant in mutants:
                print("  " + mutant.describe())
        return 0

    if args.workdir.resolve() == REPO.resolve():
        parser.error("--workdir must not be this checkout")
    make_copy(args.workdir)
    check_import_path(args.workdir)
    outcomes: list[Outcome] = []
    for target, mutants in chosen.items():
        status, seconds = run_tests(args.workdir, TARGETS[target], args.timeout)
        if status != "survived":
            print(f"{target}: the unmutated tests do not pass ({status}); skipped")
            continue
        print(f"{target}: tests pass unmutated in {seconds:.0f}s; {len(mutants)} mutants")
        outcomes += run_target(args.workdir, target, mutants, args.timeout)
    _summary(outcomes)
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**asdict(o.mutant), "status": o.status, "seconds": o.seconds} for o in outcomes],
                indent=2,
            )
            + "\n"
        )
    return 0


def _summary(outcomes: list[Outcome]) -> None:
    print("\ntarget                          killed  survived  (timeout, not compiling)")
    for target in dict.fromkeys(o.mutant.target for o in outcomes):
        mine = [o for o in outcomes if o.mutant.target == target]
        count = {
            s: sum(o.status == s for o in mine) for s in ("killed", "survived", "timeout", "error")
        }
        print(
            f"{target:32s}{count['killed'] + count['timeout']:6d}{count['survived']:10d}"
            f"  ({count['timeout']}, {count['error']})"
        )
    judged = [o for o in outcomes if o.status != "error"]
    killed = sum(o.status in ("killed", "timeout") for o in judged)
    if judged:
        print(f"total: {killed} of {len(judged)} killed ({killed / len(judged):.0%})")
    survivors = [o for o in outcomes if o.status == "survived"]
    if survivors:
        print("\nsurvivors:")
        for outcome in survivors:
            print("  " + outcome.mutant.describe())


if __name__ == "__main__":
    raise SystemExit(main())
