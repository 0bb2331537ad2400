"""One owner per home: a second run on a home in use fails at once, naming the first.

Before, `tiny.yaml` and then `tiny` with `black_box.epochs: 2` on one home mixed: run A exited 0
and printed run B's headline, because A's losses were computed with B's black box.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llm2loss_pipeline.core.storage import LOCK_NAME, HomeInUseError, home_lock

REPO = Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys, time\n"
    "from llm2loss_pipeline.core.storage import home_lock\n"
    "with home_lock(sys.argv[1], 'config 0123456789ab, command: llm2loss run --config a.yaml'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture
def holder(tmp_path: Path):
    home = tmp_path / "home"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield home, process
    process.kill()
    process.wait()


def test_a_second_owner_is_refused_with_the_holders_pid_and_config(holder):
    home, process = holder
    with pytest.raises(HomeInUseError) as caught, home_lock(home, "config ffff"):
        pass
    message = str(caught.value)
    assert f"home {home.resolve()} is in use by pid {process.pid} " in message
    assert "(config 0123456789ab, command: llm2loss run --config a.yaml)" in message
    assert "--home DIR or LLM2LOSS_HOME=DIR" in message
    recorded = json.loads((home / LOCK_NAME).read_text())
    assert recorded["pid"] == process.pid  # the refused run did not overwrite the record


def test_llm2loss_run_on_a_home_in_use_exits_2_naming_the_holder(holder, tmp_path: Path):
    home, process = holder
    run = subprocess.run(
        [sys.executable, "-m", "llm2loss_pipeline.cli", "run", "--home", str(home)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"is in use by pid {process.pid} (config 0123456789ab" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (home / "tables").exists()  # nothing ran


def test_a_killed_holders_lock_is_taken_over(holder, caplog):
    home, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    logger = "llm2loss_pipeline.core.storage"
    with caplog.at_level(logging.INFO, logger=logger), home_lock(home, "config 2"):
        recorded = json.loads((home / LOCK_NAME).read_text())
        assert recorded["pid"] == os.getpid() and recorded["config"] == "config 2"
        with home_lock(home, "config 2"):  # re-entry from the holder is fine
            pass
    assert f"took over the lock of pid {process.pid}, which has ended" in caplog.text


def test_run_pipeline_takes_the_lock_before_any_step(holder):
    from llm2loss_pipeline.defs.runner import run_pipeline
    from tests.fault_helpers import fast_config

    home, process = holder
    with pytest.raises(HomeInUseError, match=f"in use by pid {process.pid}"):
        run_pipeline(fast_config(home))
    assert not (home / "dagster").exists() and not (home / "tables").exists()
