"""Loading saved heads trusts nothing in the folder: every sidecar field, every file an index
names, and a save killed between its two renames."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm2loss_pipeline.core.heads import (
    HeadsConfig,
    fit_gap,
    load_ensemble,
    save_ensemble,
    train_ensemble,
)
from llm2loss_pipeline.core.storage import (
    ASIDE,
    StorageError,
    existing_dir,
    replace_dir,
    sha256_file,
)

DIM = 16
SHA = "a" * 64
LOAD = {"expected_dim": DIM, "expected_encoder_sha256": SHA}
MEMBER = "member-01-regressor-mlp-s0"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    losses = np.exp(2.0 * x[:, 0] * np.sqrt(DIM))
    config = HeadsConfig(n_seeds=1, hidden=8, epochs=2, min_steps=0, batch_size=64)
    ensemble = train_ensemble(x, losses, config)
    folder = tmp_path_factory.mktemp("saved") / "h"
    save_ensemble(ensemble, fit_gap(x, -x[:5], "center"), folder, embedding_dim=DIM,
                  encoder_sha256=SHA)  # fmt: skip
    return folder, ensemble, x


@pytest.fixture()
def heads(saved, tmp_path):
    folder = tmp_path / "h"
    shutil.copytree(saved[0], folder)
    return folder


def edit_sidecar(folder: Path, change, *, rehash: bool = True) -> None:
    """Apply `change` to a member's sidecar; with `rehash`, record the new hash in the index
    too, as a consistent forgery would, so that the field checks themselves are exercised."""
    side = folder / f"{MEMBER}.json"
    meta = json.loads(side.read_text())
    meta = change(meta)
    side.write_text(json.dumps(meta))
    if rehash:
        index = json.loads((folder / "ensemble.json").read_text())
        index["members"][1]["sidecar_sha256"] = sha256_file(side)
        (folder / "ensemble.json").write_text(json.dumps(index))


def with_field(key, value):
    return lambda meta: {**meta, key: value}


def test_a_modified_sidecar_is_caught_by_the_index(heads):
    edit_sidecar(heads, with_field("arch", "linear"), rehash=False)
    message = rf"{MEMBER}\.json: sha256 differs from .*ensemble\.json"
    with pytest.raises(StorageError, match=message):
        load_ensemble(heads, **LOAD)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (with_field("arch", "cnn"), r"arch 'cnn' is not one of \['linear', 'mlp'\]"),
        (with_field("kind", "foo"), r"kind 'foo' is not one of"),
        (with_field("seed", 1.7), r"seed 1\.7 is not a non-negative integer"),
        (with_field("seed", True), r"seed True is not"),
        (with_field("index", 3), r"index 3 disagrees with ensemble\.json \(1\)"),
        (with_field("encoder_sha256", "b" * 64), r"encoder_sha256 'b{64}' disagrees"),
        (with_field("standardization", {"mean": 0.0, "std": 0.0}), r"std 0\.0 must be finite"),
        (with_field("standardization", {"mean": 0.0}), r"standardization .* is malformed"),
        (with_field("training", [1]), r"'training' holds"),
        (lambda m: {k: v for k, v in m.items() if k != "training"}, r"'training' holds \[\]"),
        (lambda m: {k: v for k, v in m.items() if k != "kind"}, r"kind None is not one of"),
        (lambda m: [m], r"a sidecar is a JSON object, this holds list"),
    ],
)
def test_every_sidecar_field_is_checked_and_the_file_named(heads, change, message):
    """Each of these used to load (an unknown arch then answered with uninitialised memory, a
    zero std with inf, a missing `training` shifted every later member's record by one) or fail
    with a bare KeyError/TypeError that named no file."""
    edit_sidecar(heads, change)
    with pytest.raises(StorageError, match=rf"{MEMBER}\.json: .*{message}"):
        load_ensemble(heads, **LOAD)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x", "..", ""])
def test_index_entries_name_files_inside_the_folder(heads, name):
    index = json.loads((heads / "ensemble.json").read_text())
    index["members"][0]["file"] = name
    (heads / "ensemble.json").write_text(json.dumps(index))
    with pytest.raises(StorageError, match=r"members\[0\] names file .*entries must be file names"):
        load_ensemble(heads, **LOAD)


def test_unreadable_weights_with_a_matching_hash_name_the_file(heads):
    weights = heads / f"{MEMBER}.safetensors"
    weights.write_bytes(b"not safetensors")
    forged = sha256_file(weights)
    edit_sidecar(heads, with_field("sha256", forged))
    index = json.loads((heads / "ensemble.json").read_text())
    index["members"][1]["sha256"] = forged
    (heads / "ensemble.json").write_text(json.dumps(index))
    with pytest.raises(StorageError, match=rf"{MEMBER}\.safetensors: not a readable safetensors"):
        load_ensemble(heads, **LOAD)


def test_an_index_from_before_sidecar_hashes_still_loads(heads, saved):
    index = json.loads((heads / "ensemble.json").read_text())
    for entry in index["members"]:
        del entry["sidecar_sha256"]
    (heads / "ensemble.json").write_text(json.dumps(index))
    loaded, _, _ = load_ensemble(heads, **LOAD)
    x = saved[2]
    assert loaded.predict(x).tobytes() == saved[1].predict(x).tobytes()
    assert loaded.training == saved[1].training


def kill_between_the_renames(final: Path) -> Path:
    """What a replace_dir killed after moving `final` aside leaves: no `final`, the old folder
    under an aside name of a process that no longer runs."""
    aside = final.parent / f".{final.name}{ASIDE}999999999@{os.uname().nodename}-dead"
    os.replace(final, aside)
    return aside


def test_a_save_killed_between_its_renames_loses_nothing(heads, saved):
    """The old folder used to sit under a temporary name that a later sweep deleted, and loading
    said there were no heads."""
    ensemble, x = saved[1], saved[2]
    aside = kill_between_the_renames(heads)
    assert not heads.exists() and existing_dir(heads) == aside
    loaded, _, _ = load_ensemble(heads, **LOAD)  # readers find the old folder meanwhile
    assert loaded.predict(x).tobytes() == ensemble.predict(x).tobytes()
    gap = fit_gap(x, -x[:5], "center")
    save_ensemble(ensemble, gap, heads, embedding_dim=DIM, encoder_sha256="c" * 64)
    assert sorted(p.name for p in heads.parent.iterdir()) == ["h"]
    _, _, index = load_ensemble(heads, expected_dim=DIM, expected_encoder_sha256="c" * 64)
    assert index["encoder_sha256"] == "c" * 64


def test_replace_dir_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    final, staging = tmp_path / "out", tmp_path / "staging"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == staging:
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk went away"):
        replace_dir(staging, final)
    assert (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staging"]
    monkeypatch.setattr(os, "replace", real_replace)
    replace_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_dir_restores_a_killed_swap_then_replaces_it(tmp_path):
    final, staging = tmp_path / "out", tmp_path / "staging"
    final.mkdir()
    (final / "old.txt").write_text("old")
    kill_between_the_renames(final)
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
