"""Temporary files of killed writers: never read as output, swept by the next write to the target.

The writers are real processes: one is SIGKILLed inside `atomic_path` (its temporary file is on
disk, the rename has not happened), another is still writing when a second writer of the same
target starts, and must not lose its file to the sweep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from llm2loss_pipeline.core.sql import connect, shard_glob
from llm2loss_pipeline.core.storage import (
    STALE_TEMP_AFTER_S,
    atomic_path,
    sweep_stale_temps,
    write_bytes_atomic,
    write_parquet_atomic,
)
from tests import fault_helpers as fh

WRITER = """
import sys, time
from pathlib import Path
from llm2loss_pipeline.core.storage import atomic_path
target, marker, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with atomic_path(target) as tmp:
    tmp.write_bytes(b"written by the slow writer")
    # whole or not at all: the test reads the name as soon as the marker exists
    marker.with_suffix(".part").write_text(tmp.name)
    marker.with_suffix(".part").rename(marker)
    while not go.exists():
        time.sleep(0.02)
"""


def paused_writer(target: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A process inside `atomic_path(target)`, its temporary file written, waiting for `go`."""
    marker, go = tmp_path / "inside", tmp_path / "go"
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(marker), str(go)],
        cwd=fh.REPO,
        env={**os.environ, **fh.ONE_THREAD_ENV},
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, "the writer ended before writing its temporary file"
        assert time.monotonic() < deadline, "the writer did not start in time"
        time.sleep(0.02)
    return process, marker, go


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writers_temp_is_hidden_then_swept_by_the_next_write(tmp_path):
    folder = tmp_path / "tables" / "per_sample_losses"
    target = folder / "shard-00000.parquet"
    write_parquet_atomic(pl.DataFrame({"sample_id": ["a"], "loss": [1.0]}), target)
    process, marker, _ = paused_writer(target, tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    left = temps(folder)
    assert left == [marker.read_text()]
    assert left[0].startswith(f".{target.name}.{process.pid}@")
    # no reader takes it for output: the old shard is intact and the DuckDB glob skips the temp
    assert pl.read_parquet(target)["loss"].to_list() == [1.0]
    with connect(None) as con:
        rows = con.execute("SELECT count(*) FROM read_parquet(?)", [shard_glob(folder)])
        assert rows.fetchone()[0] == 1

    # its writer is dead, so the next write of the same target removes it at once
    write_parquet_atomic(pl.DataFrame({"sample_id": ["a"], "loss": [2.0]}), target)
    assert temps(folder) == []
    assert pl.read_parquet(target)["loss"].to_list() == [2.0]


def test_a_live_concurrent_writer_keeps_its_temp_and_renames_it_into_place(tmp_path):
    target = tmp_path / "shard-00000.parquet"
    process, marker, go = paused_writer(target, tmp_path)
    try:
        write_bytes_atomic(target, b"written by the fast writer")
        assert temps(tmp_path) == [marker.read_text()]  # the live writer's file survived
        assert target.read_bytes() == b"written by the fast writer"
    finally:
        go.write_text("")
        process.wait(timeout=60)
    assert process.returncode == 0
    assert target.read_bytes() == b"written by the slow writer"
    assert temps(tmp_path) == []


def test_temps_of_other_hosts_and_unnamed_writers_go_only_when_old(tmp_path):
    target = tmp_path / "model.safetensors"
    names = {
        "remote_young": f".{target.name}.12@other-host@abcd1234.tmp",
        "remote_old": f".{target.name}.12@other-host@efgh5678.tmp",
        "unnamed_old": f".{target.name}.ijkl9012.tmp",
        "other_target": ".model.json.999999999@x@mnop3456.tmp",
        "mine_alive": f".{target.name}.{os.getpid()}@{socket.gethostname()}@qrst7890.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - STALE_TEMP_AFTER_S - 60
    for key in ("remote_old", "unnamed_old", "other_target"):
        os.utime(tmp_path / names[key], (old, old))

    removed = sweep_stale_temps(target)
    assert sorted(p.name for p in removed) == sorted([names["remote_old"], names["unnamed_old"]])
    assert temps(tmp_path) == sorted(
        [names["remote_young"], names["other_target"], names["mine_alive"]]
    )
    assert sweep_stale_temps(target, older_than_s=0) == [tmp_path / names["remote_young"]]


def test_a_failed_write_leaves_nothing_and_the_old_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and temps(tmp_path) == []
