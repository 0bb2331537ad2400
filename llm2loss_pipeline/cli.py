"""The `llm2loss` command: run the pipeline, generate a world, ask questions, open the UI."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llm2loss_pipeline import __version__
from llm2loss_pipeline.cli_common import EXIT_USAGE, run_handler
from llm2loss_pipeline.cli_common import fail as _fail  # the one error line of every command
from llm2loss_pipeline.discover_cli import register as register_discover
from llm2loss_pipeline.query_cli import register as register_queries

# Commands import what they run inside their handler, so that `llm2loss --help` stays at 86
# modules (0.1-0.3 s). Measured on top of the CLI: core.config +240 modules (1.5 s), the diagnoser
# +206 (0.9 s), defs.runner +578 (3.9 s), the report step +928 (8.8 s), rich.console +68 (0.3 s).

__all__ = ["build_parser", "main", "run_handler"]

WORKSPACE = Path(__file__).resolve().parent.parent / "workspace.yaml"
"""the repository's workspace file (absent from a wheel install: then the module is loaded)"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    return run_handler(args)


# long: declarative, one add_argument per option of every subcommand (split, the surface scatters)
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2loss",
        description="Where does your model fail, and whom does it treat worse? (LLM2Loss)",
    )
    parser.add_argument("--version", action="version", version=f"llm2loss {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser("run", help="materialize the whole asset graph (the main job)")
    run.add_argument(
        "--config",
        default=os.environ.get("LLM2LOSS_CONFIG") or None,
        help="YAML configuration (default: $LLM2LOSS_CONFIG, else the embedded default)",
    )
    run.add_argument("--home", help="artifact root (overrides the config and $LLM2LOSS_HOME)")
    run.add_argument(
        "--stage",
        action="append",
        choices=["prepare", "signals", "diagnose"],
        help="run only these stages (repeatable; default: all three in order)",
    )
    run.add_argument(
        "--shard", action="append", help="limit the signals stage to these shard keys (repeatable)"
    )
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    run.set_defaults(handler=_cmd_run)

    world = commands.add_parser(
        "generate-world", help="write a generated face world in the CelebA folder layout"
    )
    world.add_argument("out_dir", type=Path)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--n-identities", type=int, default=120)
    world.add_argument("--images-per-identity", type=int, default=30)
    world.add_argument("--image-size", type=int, default=64)
    world.add_argument(
        "--hard-attribute",
        action="append",
        default=[],
        metavar="NAME=STRENGTH",
        help="make images with this attribute harder for an identity model (repeatable)",
    )
    world.add_argument("--contact-sheet", type=Path, help="also write a PNG grid of sample faces")
    world.set_defaults(handler=_cmd_generate_world)

    check = commands.add_parser("check-config", help="validate a YAML configuration and print it")
    check.add_argument("config")
    check.set_defaults(handler=_cmd_check_config)

    shards = commands.add_parser("shards", help="list the shard partitions of the manifest")
    shards.add_argument("--home")
    shards.set_defaults(handler=_cmd_shards)

    ui = commands.add_parser(
        "ui",
        help="open the Dagster UI on this project's instance (the UI only; --daemon adds it)",
        description=(
            "Serve the Dagster UI on the instance `llm2loss run` records into "
            "($DAGSTER_HOME, default <home>/dagster). Without --daemon nothing runs by itself: "
            "sensors and automation stay off until the daemon runs."
        ),
    )
    ui.add_argument(
        "--config",
        default=os.environ.get("LLM2LOSS_CONFIG") or None,
        help="YAML configuration the UI's definitions load (default: $LLM2LOSS_CONFIG)",
    )
    ui.add_argument(
        "--home",
        help="artifact root whose instance to show (default: the config's, $LLM2LOSS_HOME or "
        "./.llm2loss)",
    )
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000)")
    ui.add_argument(
        "--daemon",
        action="store_true",
        help="also run the Dagster daemon (`dagster dev`): the registry sensor, the schedule and "
        "the automation that materializes stale assets",
    )
    ui.set_defaults(handler=_cmd_ui)

    register_queries(commands)
    register_discover(commands)
    return parser


def _load_config(path: str | None, home: str | None):
    """The validated configuration, its notices printed. What a run can check before it starts
    (paths, CUDA devices, the user's model: core.preflight.preflight) is left to the command."""
    # lazy: numpy, pydantic, yaml: +320 modules, 0.5 s of `llm2loss --help`
    from llm2loss_pipeline.core.config import ConfigError, load_config

    notices: list[str] = []
    try:
        config = load_config(path, notices)
        for line in notices:
            print(f"llm2loss: note: {line}", file=sys.stderr)
        return config.model_copy(update={"home": home}) if home else config
    except ConfigError as exc:
        raise SystemExit(_fail(str(exc))) from None


def _cmd_run(args: argparse.Namespace) -> int:
    # lazy: these three: dagster and the core, +1,160 modules, 1.0-3.9 s of `llm2loss --help`
    from rich.console import Console

    from llm2loss_pipeline.core.storage import StorageError
    from llm2loss_pipeline.defs.runner import STAGES, StageFailed, run_pipeline

    config = _load_config(args.config, args.home)  # run_pipeline runs the preflight
    console = Console(stderr=True, log_path=False)
    started = time.monotonic()
    status = console.status("starting", spinner="dots")

    def on_stage(stage: str, shard: str | None, index: int, total: int) -> None:
        label = f"{stage} {shard} ({index + 1}/{total})" if shard else stage
        status.update(f"[bold]{label}[/]")
        if not args.quiet:
            console.log(f"[bold cyan]stage[/] {label}")

    def on_message(message: str) -> None:
        if not args.quiet:
            console.log(message, markup=False, highlight=False)

    try:
        with status:
            outcome = run_pipeline(
                config,
                args.stage or STAGES,
                shards=args.shard,
                on_message=on_message,
                on_stage=on_stage,
                source=args.config or "<embedded default>",
            )
    except (StageFailed, StorageError, ValueError) as exc:
        return _fail(str(exc))
    elapsed = time.monotonic() - started
    runs = len(outcome.runs)
    print(f"llm2loss: {runs} run(s) in {elapsed:.0f}s; artifacts in {outcome.layout.home}")
    _print_report_summary(outcome.layout)
    return 0


def _print_report_summary(layout) -> None:
    # lazy: torch: +1,460 modules, 1.6 s of `llm2loss --help`
    from llm2loss_pipeline.core.steps.report import HEADLINE_KEYS

    headline_path = layout.headline
    html = layout.report_html
    if not headline_path.exists() or not html.exists():
        return
    headline = json.loads(headline_path.read_text())
    print(f"report:   {html}")
    print(f"query it: duckdb {layout.duckdb}")
    print("headline (estimated vs measured disparity across the diagnosed attributes):")
    for name in HEADLINE_KEYS:
        value = headline.get(name)
        shown = (
            "n/a"
            if value is None
            else (f"{value:.0f}" if name.startswith("n_") else f"{value:+.3f}")
        )
        print(f"  {name:<36} {shown}")


def _cmd_generate_world(args: argparse.Namespace) -> int:
    # lazy: these three: numpy, pydantic, PIL: +290 modules, 0.3 s of `llm2loss --help`
    from pydantic import ValidationError

    from llm2loss_pipeline.core.config import format_validation_error
    from llm2loss_pipeline.core.world import WorldConfig, contact_sheet, generate_world

    hard: dict[str, float] = {}
    for item in args.hard_attribute:
        name, sep, value = item.partition("=")
        try:
            hard[name] = float(value) if sep else 1.0
        except ValueError:
            return _fail(f"--hard-attribute {item!r}: STRENGTH must be a number in [0, 1]")
    try:
        config = WorldConfig(
            seed=args.seed,
            n_identities=args.n_identities,
            images_per_identity=args.images_per_identity,
            image_size=args.image_size,
            hard_attributes=hard,
        )
    except ValidationError as exc:
        return _fail(format_validation_error(exc, "generate-world"))
    # lazy: rich: +86 modules, 70 ms of `llm2loss --help`
    from rich.progress import Progress

    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("drawing faces", total=None)
            summary = generate_world(
                config,
                args.out_dir,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except OSError as exc:  # a target that is not an empty folder or a world, or not writable
        return _fail(str(exc))
    print(f"wrote {summary.n_images} images of {config.n_identities} identities to {args.out_dir}")
    if args.contact_sheet:
        contact_sheet(args.out_dir, args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    # lazy: these three: +530 modules, 0.65 s of `llm2loss --help`
    import yaml

    from llm2loss_pipeline.core.config import ConfigError
    from llm2loss_pipeline.core.preflight import preflight

    config = _load_config(args.config, None)
    try:  # checked before the dump: a bad configuration prints only its error (issue 21)
        preflight(config, source=args.config or "<embedded default>")
    except ConfigError as exc:
        return _fail(str(exc))
    print(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    # lazy: these two: polars, +310 modules, 0.3 s of `llm2loss --help`
    import polars as pl

    from llm2loss_pipeline.core.layout import Layout

    layout = Layout.at(args.home)
    if not layout.manifest.exists():
        return _fail(f"{layout.manifest} does not exist yet: run `llm2loss run --stage prepare`")
    counts = pl.read_parquet(layout.manifest).group_by("shard").len().sort("shard")
    for shard, n in counts.iter_rows():
        print(f"{shard}\t{n}")
    return 0


def ui_command(args: argparse.Namespace, workspace: Path = WORKSPACE) -> list[str]:
    """The command `llm2loss ui` replaces itself with.

    Run as `python -m` with this very interpreter, so that it works without the virtual
    environment's bin/ on PATH (an executable found by name would come from PATH, or not at all).
    `dagster-webserver` serves the UI alone; `dagster dev` adds the daemon."""
    module = ["-m", "llm2loss_pipeline.definitions"]
    where = ["-w", str(workspace)] if workspace.exists() else module
    program = ["dagster", "dev"] if args.daemon else ["dagster_webserver"]
    return [sys.executable, "-m", *program, "-h", args.host, "-p", str(args.port), *where]


def _cmd_ui(args: argparse.Namespace) -> int:
    # lazy: these two: dagster, +1,160 modules, 1.0-3.9 s of `llm2loss --help`
    from llm2loss_pipeline.core.layout import Layout
    from llm2loss_pipeline.defs.runner import use_dagster_home

    config = _load_config(args.config, args.home)
    layout = Layout.at(config.home)
    env = dict(os.environ)
    # The instance `llm2loss run` records into, as an absolute path (Dagster refuses others).
    env["DAGSTER_HOME"] = use_dagster_home(layout)
    env["LLM2LOSS_HOME"] = str(layout.home)
    if args.config:
        env["LLM2LOSS_CONFIG"] = str(Path(args.config).resolve())
    command = ui_command(args)
    mode = "the UI and the daemon" if args.daemon else "the UI only (no daemon)"
    print(
        f"llm2loss ui: {mode} on http://{args.host}:{args.port}; instance {env['DAGSTER_HOME']}",
        file=sys.stderr,
        flush=True,
    )
    os.execve(command[0], command, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
