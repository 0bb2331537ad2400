"""The README's commands run as written, so that they cannot drift from the code.

A ```bash block preceded by `<!-- runnable -->` runs in a scratch folder laid out like a fresh
clone (`.venv`, `configs/` and `workspace.yaml` linked in), with PATH=/usr/bin:/bin and no
LLM2LOSS_*/DAGSTER_HOME variables: `./.llm2loss` is the scratch folder's own. `/tmp/` in a
command means a private scratch folder. A block marked `<!-- runnable: home -->` runs after
"make run", here a copy of the tiny reference home (tests/fault_helpers.py) with its shards
registered in the Dagster instance, and LLM2LOSS_CONFIG naming the tiny configuration.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(
    r"^<!-- runnable(?:: (?P<needs>home))? -->\n```bash\n(?P<body>.*?)^```", re.M | re.S
)
ANY_BASH_BLOCK = re.compile(r"^```bash\n(?P<body>.*?)^```", re.M | re.S)
LINKED = (".venv", "configs", "workspace.yaml")


def runnable_blocks(needs: str) -> list[tuple[int, str]]:
    """(line number, commands) of the README's runnable blocks that need `needs` ('' or 'home')."""
    text = README.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match["body"])
        for match in BLOCK.finditer(text)
        if (match["needs"] or "") == needs
    ]


def _scratch(root: Path) -> tuple[Path, dict[str, str]]:
    """A fresh-clone-like working folder and the bare environment a newcomer's shell has."""
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    (root / "tmp").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1"}
    return root, env


def _run(line: int, body: str, cwd: Path, env: dict[str, str]) -> str:
    commands = body.replace("/tmp/", f"{cwd / 'tmp'}/")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"README.md block at line {line} failed ({done.returncode}):\n{body}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_the_readme_marks_cheap_and_home_blocks() -> None:
    assert len(runnable_blocks("")) >= 2
    assert len(runnable_blocks("home")) >= 2
    text = README.read_text()
    # a marker must sit right above a bash fence, or it marks nothing
    assert text.count("<!-- runnable") - text.count("`<!-- runnable") == len(
        list(BLOCK.finditer(text))
    )


def test_dagster_commands_name_the_instance_by_an_absolute_path() -> None:
    """`DAGSTER_HOME=.llm2loss/dagster` fails ("must be an absolute path"), and `dagster dev`
    without DAGSTER_HOME shows an empty throwaway instance instead of `llm2loss run`'s."""
    for match in ANY_BASH_BLOCK.finditer(README.read_text()):
        for line in match["body"].replace("\\\n", " ").splitlines():
            if ".venv/bin/dagster " not in line:
                continue
            home = re.search(r"DAGSTER_HOME=(\S+)", line)
            assert home, f"README: {line.strip()!r} does not set DAGSTER_HOME"
            assert home[1].startswith(("$PWD/", "/")), f"README: relative DAGSTER_HOME in {line!r}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, body", runnable_blocks(""), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_cheap_blocks_run_as_written(tmp_path, line, body) -> None:
    cwd, env = _scratch(tmp_path / "clone")
    _run(line, body, cwd, env)


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """A scratch clone whose ./.llm2loss is the tiny reference home, as after `make run`."""
    from tests import fault_helpers as fh

    cwd, env = _scratch(tmp_path_factory.mktemp("readme") / "clone")
    _, reference = fh.reference_home()
    models = ("black_box", "encoder", "heads", "per_sample_losses", "image_embeddings")
    layout = fh.clone_home(reference, cwd / ".llm2loss", models)
    _, config_path = fh.write_config(cwd / "tiny-fast.yaml", layout.home)
    env["LLM2LOSS_CONFIG"] = str(config_path)
    # what the prepare stage of `make run` registers in the instance
    shards = pl.read_parquet(layout.manifest)["shard"].unique(maintain_order=True).to_list()
    layout.dagster_home.mkdir(parents=True)
    (layout.dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(layout.dagster_home)) as instance:
        instance.add_dynamic_partitions("shards", shards)
    return cwd, env, layout


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, body", runnable_blocks("home"), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_home_blocks_run_as_written(materialized, line, body) -> None:
    cwd, env, layout = materialized
    losses = layout.shard_dir("per_sample_losses")
    before = {path: path.stat().st_mtime_ns for path in losses.iterdir()}
    out = _run(line, body, cwd, env)
    if "compare" in body:
        assert "h(A) - h(B)" in out and "estimated loss by text" in out
    if "--partition" in body:
        # the losses of that shard were written again, recorded in the instance the UI shows
        shard = re.search(r"--partition (\S+)", body)[1]
        table = layout.shard_table("per_sample_losses", shard)
        assert table.stat().st_mtime_ns > before[table]
        with dg.DagsterInstance.from_config(str(layout.dagster_home)) as instance:
            runs = instance.get_runs()
        # `llm2loss run --stage signals` and `dagster asset materialize`, in one instance
        assert len(runs) == 2 and all(run.is_success for run in runs)
