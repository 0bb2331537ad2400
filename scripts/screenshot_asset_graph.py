"""Screenshot the Dagster UI's global asset graph into docs/asset_graph.png.

Starts the real `dagster-webserver -w workspace.yaml` on a free local port (throwaway DAGSTER_HOME
and LLM2LOSS_HOME unless given), waits for it to answer, and asks headless Chromium for a
screenshot of the asset graph page. Needs the Debian `chromium` package
(`apt-get install -y chromium`); no network beyond 127.0.0.1.

    .venv/bin/python scripts/screenshot_asset_graph.py [--out docs/asset_graph.png]
        [--dagster-home DIR --llm2loss-home DIR]   # show an existing instance's materializations

`webserver()` is also what tests/test_webserver.py starts the server with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# The global asset lineage graph in Dagster 1.13 ("Lineage" in the sidebar). It draws each group
# collapsed unless the group is listed in `expanded` (ids "global@global:<group>").
GRAPH_PATH = "/asset-groups"
GROUPS = ("data", "models", "signals", "diagnosis", "report")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    "--virtual-time-budget=15000",
)


@dataclass(frozen=True)
class Webserver:
    url: str
    process: subprocess.Popen
    log: Path

    def graphql(self, query: str, timeout: float = 60) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def webserver(
    dagster_home: Path,
    llm2loss_home: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Iterator[Webserver]:
    """The real webserver on workspace.yaml; stopped (its whole process group) on exit."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(
            "# SQLite instance storage under DAGSTER_HOME\ntelemetry:\n  enabled: false\n"
        )
    port = free_port()
    log = dagster_home / f"webserver-{port}.log"
    command = [
        str(Path(sys.executable).with_name("dagster-webserver")),
        "-w",
        str(REPO / "workspace.yaml"),
        "-h",
        HOST,
        "-p",
        str(port),
    ]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DAGSTER_HOME": str(dagster_home),
        "LLM2LOSS_HOME": str(llm2loss_home),
        **(env or {}),
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its code-server child goes down with it
        )
    server = Webserver(f"http://{HOST}:{port}", process, log)
    try:
        _wait_for(server, timeout)
        yield server
    finally:
        _stop(process)


def _wait_for(server: Webserver, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"dagster-webserver exited ({server.process.returncode}):\n{server.log.read_text()}"
            )
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(
        f"dagster-webserver did not answer on {server.url} in {timeout:.0f}s:\n"
        f"{server.log.read_text()[-3000:]}"
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_for_code_location(server: Webserver, timeout: float = 180) -> None:
    """The server answers before its code location has loaded; wait for the assets to appear."""
    deadline = time.monotonic() + timeout
    query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
        name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    while time.monotonic() < deadline:
        entries = server.graphql(query)["workspaceOrError"].get("locationEntries", [])
        for entry in entries:
            error = entry["locationOrLoadError"]
            if error and error["__typename"] == "PythonError":
                raise RuntimeError(f"code location {entry['name']} failed: {error['message']}")
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            return
        time.sleep(1)
    raise TimeoutError(f"the code location did not load in {timeout:.0f}s")


def graph_url(server: Webserver, path: str = GRAPH_PATH, groups: tuple[str, ...] = GROUPS) -> str:
    expanded = ",".join(f"global@global:{group}" for group in groups)
    return f"{server.url}{path}?{urllib.parse.urlencode({'expanded': expanded})}"


def dismiss_welcome_dialog(server: Webserver) -> None:
    """The UI greets a fresh local instance with a newsletter dialog; mark it seen, as a click
    on Skip would."""
    server.graphql("mutation { setNuxSeen }")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise FileNotFoundError("no chromium on PATH: apt-get install -y chromium")
    return found


def screenshot(url: str, out: Path, *, timeout: float = 120) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm2loss-chromium-") as profile:
        partial = out.with_name(f".{out.name}.tmp.png")
        command = [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={partial}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not partial.exists():
            raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
        os.replace(partial, out)  # atomic: a failed run leaves the previous image in place
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "asset_graph.png")
    parser.add_argument("--dagster-home", type=Path, help="default: a throwaway folder")
    parser.add_argument("--llm2loss-home", type=Path, help="default: a throwaway folder")
    parser.add_argument("--path", default=GRAPH_PATH, help=f"UI page (default {GRAPH_PATH})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llm2loss-ui-") as scratch:
        dagster_home = args.dagster_home or Path(scratch) / "dagster"
        llm2loss_home = args.llm2loss_home or Path(scratch) / "home"
        with webserver(dagster_home.resolve(), llm2loss_home.resolve()) as server:
            wait_for_code_location(server)
            dismiss_welcome_dialog(server)
            out = screenshot(graph_url(server, args.path), args.out.resolve())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
