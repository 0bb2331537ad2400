"""`llm2loss ui` started the way a person starts it, and its asset graph in a real browser.

The installed entry point (`.venv/bin/llm2loss`, next to this interpreter) runs in a clean
environment: PATH without the virtual environment's bin/, no DAGSTER_HOME, no LLM2LOSS_HOME, a
temporary working directory. It used to exec `dagster` by name and died there. The page is loaded
in headless Chromium (Debian's `chromium`); where that is missing, only the browser test is
skipped and the HTTP and GraphQL checks still run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm2loss_pipeline.cli import build_parser, ui_command
from llm2loss_pipeline.core.layout import Layout
from tests.test_definitions import EXPECTED_GROUPS

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).with_name("llm2loss")
CLEAN_PATH = "/usr/bin:/bin"
SEEDED_SHARD = "shard-00042"
DAEMON_MODULE = "dagster._daemon"


def _script():
    """scripts/screenshot_asset_graph.py: the webserver helpers tests/test_webserver.py uses."""
    path = REPO / "scripts" / "screenshot_asset_graph.py"
    spec = importlib.util.spec_from_file_location("screenshot_asset_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def _seed_instance(home: Path) -> None:
    """Record a shard in the instance `llm2loss run` would use for this home (its default
    DAGSTER_HOME), so the UI can be shown to read that instance and no other."""
    import dagster as dg

    dagster_home = Layout.at(home).dagster_home
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("shards", [SEEDED_SHARD])


def _session_commands(session: int) -> list[str]:
    """Command lines of the processes in one session (the UI and everything it started)."""
    commands = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if int(fields[3]) == session:
            commands.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return commands


@contextlib.contextmanager
def started_ui(root: Path, *options: str) -> Iterator[object]:
    """`llm2loss ui --home ROOT/home --port FREE [options]` from the entry point; stopped (its
    whole session) on exit."""
    home = root / "home"
    port = SCRIPT.free_port()
    env = {
        "PATH": CLEAN_PATH,
        "HOME": str(root),
        "HF_HUB_OFFLINE": "1",
        "LLM2LOSS_MODEL_REGISTRY": "",
    }
    log = root / f"ui-{port}.log"
    command = [str(ENTRY_POINT), "ui", "--home", str(home), "--port", str(port), *options]
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its code server and daemon go down with it
        )
    server = SCRIPT.Webserver(f"http://{SCRIPT.HOST}:{port}", process, log)
    try:
        SCRIPT._wait_for(server, timeout=300)
        SCRIPT.wait_for_code_location(server, timeout=300)
        yield server
    finally:
        SCRIPT._stop(process)


def test_ui_execs_dagster_with_this_interpreter() -> None:
    """Nothing is looked up on PATH: the UI is `python -m` of the running interpreter."""
    parser = build_parser()
    ui_only = parser.parse_args(["ui", "--port", "3001"])
    with_daemon = parser.parse_args(["ui", "--daemon", "--host", "0.0.0.0"])
    workspace = REPO / "workspace.yaml"
    assert ui_command(ui_only, workspace) == [
        sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", "3001",
        "-w", str(workspace),
    ]  # fmt: skip
    assert ui_command(with_daemon, workspace)[:8] == [
        sys.executable, "-m", "dagster", "dev", "-h", "0.0.0.0", "-p", "3000",
    ]  # fmt: skip
    # without the repository's workspace file (a wheel install) the module is loaded
    assert ui_command(ui_only, REPO / "missing.yaml")[-2:] == [
        "-m",
        "llm2loss_pipeline.definitions",
    ]


def test_ui_options_have_help(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--home HOME artifact root whose instance to show" in help_text
    assert "--port PORT port to listen on (default 3000)" in help_text
    assert "--daemon also run the Dagster daemon" in help_text


@pytest.fixture(scope="module")
def ui_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-entry")
    _seed_instance(root / "home")
    with started_ui(root) as server:
        yield server


@pytest.mark.slow
def test_ui_serves_the_run_instance_from_a_clean_environment(ui_only) -> None:
    node = ui_only.graphql(
        '{ assetNodeOrError(assetKey: {path: ["per_sample_losses"]}) '
        "{ ... on AssetNode { partitionKeys } } }"
    )["assetNodeOrError"]
    assert node["partitionKeys"] == [SEEDED_SHARD]  # the seeded instance, not a throwaway one
    first_line = ui_only.log.read_text().splitlines()[0]
    dagster_home = Layout.at(Path(ui_only.log).parent / "home").dagster_home
    assert first_line == (
        f"llm2loss ui: the UI only (no daemon) on {ui_only.url}; instance {dagster_home}"
    )
    nodes = ui_only.graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]
    assert {"/".join(n["assetKey"]["path"]) for n in nodes} == set(EXPECTED_GROUPS)
    commands = _session_commands(ui_only.process.pid)
    assert any("dagster_webserver" in command for command in commands), commands
    assert not any(DAEMON_MODULE in command for command in commands), commands


def _shown_names(dom: str) -> set[str]:
    """Asset names as the graph draws them; a long one is shortened to `head…tail`."""
    return set(re.findall(r">([A-Za-z0-9_…]+)</div>", dom))


def _is_shown(name: str, shown: set[str]) -> bool:
    for text in shown:
        head, ellipsis, tail = text.partition("…")
        if text == name or (ellipsis and name.startswith(head) and name.endswith(tail)):
            return True
    return False


@pytest.mark.slow
def test_asset_graph_page_in_headless_chromium(ui_only) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium): HTTP/GraphQL checked only")
    SCRIPT.dismiss_welcome_dialog(ui_only)
    with tempfile.TemporaryDirectory(prefix="llm2loss-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                *SCRIPT.CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--dump-dom",
                SCRIPT.graph_url(ui_only),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    shown = _shown_names(done.stdout)
    missing = [name for name in EXPECTED_GROUPS if not _is_shown(name, shown)]
    assert not missing, f"not drawn: {missing}; drawn: {sorted(shown)}"
    for group in ("data", "models", "signals", "diagnosis", "report"):
        assert f">{group}<" in done.stdout


@pytest.mark.slow
def test_the_daemon_runs_only_on_request(tmp_path) -> None:
    with started_ui(tmp_path, "--daemon") as server:
        deadline = time.monotonic() + 60
        commands = _session_commands(server.process.pid)
        while not any(DAEMON_MODULE in c for c in commands) and time.monotonic() < deadline:
            time.sleep(1)
            commands = _session_commands(server.process.pid)
        assert any(DAEMON_MODULE in command for command in commands), commands
        assert "the UI and the daemon" in server.log.read_text().splitlines()[0]
