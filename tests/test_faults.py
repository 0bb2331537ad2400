"""Faults with real processes: SIGKILL in the middle of a write, and two writers at once.

Each test runs a pipeline step in its own interpreter (tests/fault_helpers.py) that pauses at a
chosen point of a write (inside the temporary-file phase, or between two renames) and is killed
there with SIGKILL. Then: nothing a later run reads is half-written (the final file is absent or
the old one is intact, and loaders refuse incomplete checkpoints), temporary files are hidden
names that every reader ignores, and a rerun gives the bytes of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box
from llm2loss_pipeline.core.encoder import load_encoder
from llm2loss_pipeline.core.sql import connect, shard_glob
from llm2loss_pipeline.core.steps.black_box import LOSSES_TABLE, shard_losses
from llm2loss_pipeline.core.steps.encoder import EMBEDDINGS_TABLE
from llm2loss_pipeline.core.steps.tables import read_manifest, read_shards
from llm2loss_pipeline.core.storage import StorageError, sha256_file, write_parquet_atomic
from llm2loss_pipeline.diagnoser import Diagnoser
from tests import fault_helpers as fh

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARD = "shard-00000"


@pytest.fixture(scope="module")
def reference():
    config, layout = fh.reference_home()
    return config, layout, fh.digests(layout)


def make_home(tmp_path: Path, reference, models=(), **sections):
    """A writable home sharing the reference's images, with copies of the named models."""
    clone = fh.clone_home(reference[1], tmp_path / "home", models)
    config, path = fh.write_config(tmp_path / "config.yaml", clone.home, **sections)
    return clone, config, path


def killed(config_path: Path, steps: list[str], fault_at: str, tmp_path: Path, half=False):
    marker = tmp_path / "paused"
    process = fh.start(config_path, steps, fault_at=fault_at, marker=marker, half=half)
    fh.kill_at_marker(process, marker)


def rows_through_duckdb(folder: Path) -> int:
    """Rows of the shard glob that DuckDB views read (temporary files must not match it)."""
    with connect(None) as con:
        return con.execute("SELECT count(*) FROM read_parquet(?)", [shard_glob(folder)]).fetchone()[
            0
        ]


# ---- per-shard Parquet tables ---------------------------------------------------------------


def test_losses_shard_killed_mid_write_leaves_no_shard_and_rerun_is_identical(tmp_path, reference):
    layout, _, config_path = make_home(tmp_path, reference, ["black_box", LOSSES_TABLE])
    name = f"{SHARD}.parquet"
    final = layout.shard_table(LOSSES_TABLE, SHARD)
    final.unlink()  # the other shards are there; this one is being materialized for the first time
    killed(config_path, [f"losses:{SHARD}"], name, tmp_path, half=True)

    assert not final.exists()
    temps = fh.leftovers(layout.shard_dir(LOSSES_TABLE))
    assert len(temps) == 1 and temps[0].startswith(f".{name}.") and temps[0].endswith(".tmp")
    # the half file is not even Parquet: nobody could have used it
    with pytest.raises((pl.exceptions.PolarsError, OSError)):
        pl.read_parquet(layout.shard_dir(LOSSES_TABLE) / temps[0])
    with pytest.raises(FileNotFoundError, match=f"no file for 1 of 3 shards \\({SHARD}\\)"):
        read_shards(layout, LOSSES_TABLE, read_manifest(layout))

    fh.finish(fh.start(config_path, [f"losses:{SHARD}"]))
    assert sha256_file(final) == reference[2][f"tables/{LOSSES_TABLE}/{name}"]
    assert rows_through_duckdb(layout.shard_dir(LOSSES_TABLE)) == read_manifest(layout).height
    assert fh.leftovers(layout.home) == []  # the rerun swept the dead writer's temporary file


def test_losses_shard_killed_before_rename_keeps_the_old_shard(tmp_path, reference):
    layout, _, config_path = make_home(tmp_path, reference, ["black_box"])
    name = f"{SHARD}.parquet"
    final = layout.shard_table(LOSSES_TABLE, SHARD)
    new = pl.read_parquet(reference[1].shard_table(LOSSES_TABLE, SHARD))
    old = new.with_columns(loss=pl.col("loss") + 1.0)  # an earlier materialization
    write_parquet_atomic(old, final)
    old_sha = sha256_file(final)
    killed(config_path, [f"losses:{SHARD}"], name, tmp_path)

    assert sha256_file(final) == old_sha and pl.read_parquet(final).equals(old)
    temps = fh.leftovers(layout.shard_dir(LOSSES_TABLE))
    assert len(temps) == 1  # complete, but never renamed: the kill hit between write and rename
    assert pl.read_parquet(layout.shard_dir(LOSSES_TABLE) / temps[0]).equals(new)
    assert rows_through_duckdb(layout.shard_dir(LOSSES_TABLE)) == old.height  # the temp is unseen

    fh.finish(fh.start(config_path, [f"losses:{SHARD}"]))
    assert sha256_file(final) == reference[2][f"tables/{LOSSES_TABLE}/{name}"]
    assert fh.leftovers(layout.home) == []


def test_embeddings_shard_killed_before_rename_then_rerun_is_identical(tmp_path, reference):
    layout, config, config_path = make_home(tmp_path, reference, ["encoder"])
    shard = "shard-00001"
    killed(config_path, [f"embeddings:{shard}"], f"{shard}.parquet", tmp_path)

    assert not layout.shard_table(EMBEDDINGS_TABLE, shard).exists()
    assert len(fh.leftovers(layout.shard_dir(EMBEDDINGS_TABLE))) == 1
    fh.run_steps(config, [f"embeddings:{shard}"])  # the rerun (in this process: same threads)
    assert (
        sha256_file(layout.shard_table(EMBEDDINGS_TABLE, shard))
        == reference[2][f"tables/{EMBEDDINGS_TABLE}/{shard}.parquet"]
    )
    assert fh.leftovers(layout.home) == []


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault_at", "with_old"),
    [("model.safetensors", True), ("model.json", True), ("model.json", False)],
    ids=["before-weights-rename", "between-weights-and-sidecar", "first-save-without-sidecar"],
)
def test_black_box_killed_while_saving(tmp_path, reference, fault_at, with_old):
    config_ref, _, digests = reference
    layout, config, config_path = make_home(tmp_path, reference)
    if with_old:  # a complete checkpoint of an earlier training (seed 1)
        shutil.copytree(fh.alternative_black_box(), layout.black_box.parent)
        old_sha = sha256_file(layout.black_box)
        assert old_sha != digests["models/black_box/model.safetensors"]
    killed(config_path, ["black_box"], fault_at, tmp_path)

    if fault_at == "model.safetensors":
        loaded = load_black_box(layout.black_box)  # the old checkpoint, untouched and valid
        assert loaded.meta["sha256"] == old_sha == sha256_file(layout.black_box)
    else:
        # new weights are in place but their sidecar is not: the pair must be refused
        needle = "does not match its sidecar" if with_old else "model.json is missing"
        with pytest.raises(StorageError, match=needle):
            load_black_box(layout.black_box)
        with pytest.raises(StorageError, match=needle), fh.one_thread():
            shard_losses(layout, SHARD, config.black_box, config.dataset, config.devices.losses)
        assert not layout.shard_table(LOSSES_TABLE, SHARD).exists()
    temps = fh.leftovers(layout.models)
    assert len(temps) == 1 and Path(temps[0]).name.startswith(f".{fault_at}.")

    fh.run_steps(config, ["black_box"])
    assert sha256_file(layout.black_box) == digests["models/black_box/model.safetensors"]
    assert fh.leftovers(layout.models) == []  # swept by the rerun's write of the same file
    assert load_black_box(layout.black_box).meta["config"] == config_ref.black_box.model_dump(
        mode="json"
    )


def test_encoder_killed_between_folder_renames(tmp_path, reference):
    layout, config, config_path = make_home(tmp_path, reference, ["encoder", "heads"])
    killed(config_path, ["encoder"], "encoder", tmp_path)

    # the old folder was renamed aside, the new one not yet in: loaders find the old one there
    # (they used to find nothing, and the next sweep of temporary folders deleted it)
    assert not layout.encoder_dir.exists()
    temps = fh.leftovers(layout.models)
    assert any(name.startswith(".encoder.aside-") for name in temps)  # the previous folder
    assert any(name.endswith(".tmp") for name in temps)  # the new, complete staging folder
    weights_name = "open_clip_model.safetensors"
    assert load_encoder(layout.encoder_dir).sha256 == reference[2][f"models/encoder/{weights_name}"]
    # the direct estimate reads only the encoder and the heads (this home has no signal shards)
    before = Diagnoser.load(layout.home).compare("a smiling person", "a person", grounded=False)
    assert len(before.diffs) == 8

    fh.run_steps(config, ["encoder"])  # puts the old folder back, then replaces it
    assert not any(".aside-" in name for name in fh.leftovers(layout.models))
    weights = layout.encoder_dir / weights_name
    assert sha256_file(weights) == reference[2][f"models/encoder/{weights_name}"]
    comparison = Diagnoser.load(layout.home).compare("a smiling person", "a person", grounded=False)
    np.testing.assert_array_equal(comparison.diffs, before.diffs)


@pytest.mark.parametrize(
    "fault_at", ["member-00-regressor-linear-s0.safetensors", "heads"], ids=["staging", "swap"]
)
def test_heads_killed_while_saving(tmp_path, reference, fault_at):
    layout, config, config_path = make_home(
        tmp_path, reference, ["encoder", "heads", LOSSES_TABLE, EMBEDDINGS_TABLE]
    )
    members = {key: value for key, value in reference[2].items() if key.startswith("models/heads/")}
    killed(config_path, ["heads"], fault_at, tmp_path)

    staged = [path for path in layout.models.iterdir() if path.name.startswith(".")]
    if fault_at == "heads":  # the old folder is aside, the new one staged: loaders use the old
        assert not layout.heads_dir.exists()
        assert sorted(path.name.split("-")[0] for path in staged) == [".heads.aside", ".heads.tmp"]
    else:  # killed while the new ensemble was being staged: the old one is whole
        assert {k: v for k, v in fh.digests(layout).items() if k in members} == members
        assert staged and all(path.name.startswith(".heads.tmp-") for path in staged)
    assert len(Diagnoser.load(layout.home).members) == 8
    an_hour_ago = time.time() - 7200
    for path in staged:  # as if the kill were long ago: the next save clears them
        os.utime(path, (an_hour_ago, an_hour_ago))

    fh.run_steps(config, ["heads"])
    assert {k: v for k, v in fh.digests(layout).items() if k in members} == members
    assert fh.leftovers(layout.models) == []
    assert len(Diagnoser.load(layout.home).members) == 8


# ---- two writers at once --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "model"), [(LOSSES_TABLE, "black_box"), (EMBEDDINGS_TABLE, "encoder")]
)
def test_two_processes_write_the_same_shard_at_the_same_moment(tmp_path, reference, table, model):
    layout, _, config_path = make_home(tmp_path, reference, [model])
    step = "losses" if table == LOSSES_TABLE else "embeddings"
    marker = tmp_path / "barrier"
    processes = [
        fh.start(
            config_path, [f"{step}:{SHARD}"], fault_at=f"{SHARD}.parquet", marker=marker, parties=2
        )
        for _ in range(2)
    ]
    for process in processes:
        fh.finish(process)
    assert len(list(tmp_path.glob("barrier.*"))) == 2  # both reached the rename together
    final = layout.shard_table(table, SHARD)
    assert sha256_file(final) == reference[2][f"tables/{table}/{SHARD}.parquet"]
    assert pl.read_parquet(final).equals(pl.read_parquet(reference[1].shard_table(table, SHARD)))
    assert fh.leftovers(layout.shard_dir(table)) == []


def test_two_processes_save_the_black_box_at_the_same_moment(tmp_path, reference):
    layout, _, config_path = make_home(tmp_path, reference)
    marker = tmp_path / "barrier"
    processes = [
        fh.start(config_path, ["black_box"], fault_at="model.json", marker=marker, parties=2)
        for _ in range(2)
    ]
    for process in processes:
        fh.finish(process)
    loaded = load_black_box(layout.black_box)
    assert loaded.meta["sha256"] == reference[2]["models/black_box/model.safetensors"]
    assert fh.leftovers(layout.models) == []
