"""Paths from the configuration: resolved when read, checked before a run, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm2loss_pipeline.core.config import (
    ConfigError,
    check_paths,
    load_config,
    path_keys,
    path_problems,
    validate_config,
)
from llm2loss_pipeline.defs.resources import BlackBoxResource, build_resources

KNOWN_PATH_KEYS = {
    ("home",),
    ("dataset", "celeba_root"),
    ("black_box", "torchscript_path"),
    ("black_box", "label_map_path"),
    ("black_box", "loss_table_path"),
    ("encoder", "checkpoint_path"),
    ("encoder", "cache_dir"),
    ("encoder", "text_model_dir"),
}


def write_yaml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_path_key_is_found():
    assert set(path_keys()) >= KNOWN_PATH_KEYS


def test_relative_paths_in_a_file_are_taken_from_the_files_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere than the file: the file's folder must win
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    folder = tmp_path / "project" / "configs"
    path = write_yaml(
        folder / "run.yaml",
        {
            "home": "../artifacts",
            "dataset": {"source": "celeba", "celeba_root": "data/celeba"},
            "black_box": {
                "source": "loss_table",
                "loss_table_path": "~/losses.parquet",
                "label_map_path": "/abs/labels.json",
            },
            "encoder": {"mode": "pretrained", "checkpoint_path": "./models/../ckpt.bin"},
        },
    )
    config = load_config(path)
    project = (tmp_path / "project").resolve()
    assert config.home == str(project / "artifacts")
    assert config.dataset.celeba_root == str(project / "configs" / "data" / "celeba")
    assert config.black_box.loss_table_path == str((tmp_path / "user").resolve() / "losses.parquet")
    assert config.black_box.label_map_path == "/abs/labels.json"
    assert config.encoder.checkpoint_path == str(project / "configs" / "ckpt.bin")
    assert config.encoder.model_name == "ViT-B-32"  # not a path key: untouched
    # the Dagster resources carry the resolved paths, and re-validating them keeps them
    resources = build_resources(config)
    assert resources["black_box"].spec().loss_table_path == config.black_box.loss_table_path
    assert resources["storage"].home == config.home
    assert isinstance(resources["black_box"], BlackBoxResource)


def test_a_mapping_without_a_file_resolves_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = validate_config({"encoder": {"text_model_dir": "models/minilm"}})
    assert config.encoder.text_model_dir == str(tmp_path.resolve() / "models" / "minilm")
    assert validate_config({}).home is None  # unset stays unset: LLM2LOSS_HOME decides
    base = tmp_path / "elsewhere"
    config = validate_config({"dataset": {"celeba_root": "c"}}, base_dir=base)
    assert config.dataset.celeba_root == str(base.resolve() / "c")


def test_path_values_of_the_wrong_type_are_still_reported_by_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"black_box\.loss_table_path: Input should be"):
        validate_config({"black_box": {"loss_table_path": 3}})
    with pytest.raises(ConfigError, match=r"dataset: Input should be"):
        validate_config({"dataset": "not a mapping"})


def test_check_paths_names_each_key_and_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "a-folder").mkdir()
    config = validate_config(
        {
            "dataset": {"source": "celeba", "celeba_root": "a-file.txt"},
            "black_box": {
                "source": "loss_table",
                "loss_table_path": "a-folder",
                "label_map_path": "missing.json",
            },
            "encoder": {"text_model_dir": "no-model"},
        }
    )
    with pytest.raises(ConfigError) as caught:
        check_paths(config, source="run.yaml")
    message = str(caught.value)
    root = tmp_path.resolve()
    assert message.splitlines() == [
        "run.yaml: paths that cannot be used",
        f"  dataset.celeba_root: {root}/a-file.txt is not a folder",
        f"  black_box.label_map_path: {root}/missing.json does not exist (expected a file)",
        f"  black_box.loss_table_path: {root}/a-folder is not a file",
        f"  encoder.text_model_dir: {root}/no-model does not exist (expected a folder)",
    ]


def test_check_paths_accepts_good_paths_and_ignores_unused_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "celeba").mkdir()
    (tmp_path / "labels.csv").write_text("1,0\n")
    config = validate_config(
        {
            "home": "not-yet-created",  # created by the run
            "dataset": {"source": "celeba", "celeba_root": "celeba"},
            "black_box": {"label_map_path": "labels.csv"},
            "encoder": {"checkpoint_path": "unused.bin", "cache_dir": "unused-cache"},
        }
    )
    # validation infers source: torchscript from a torchscript_path, so an unused one can only
    # come from code that builds the config itself
    unused = str(tmp_path / "unused.pt")
    config = config.model_copy(
        update={"black_box": config.black_box.model_copy(update={"torchscript_path": unused})}
    )
    assert path_problems(config) == []
    assert check_paths(config) is config
    # the same unused paths count once the run reads them
    used = config.model_copy(
        update={
            "black_box": config.black_box.model_copy(update={"source": "torchscript"}),
            "encoder": config.encoder.model_copy(update={"mode": "pretrained"}),
        }
    )
    assert [line.split(":")[0].strip() for line in path_problems(used)] == [
        "black_box.torchscript_path",
        "encoder.checkpoint_path",
    ]
    # a cache folder may be missing (open_clip creates it) but must not be a file
    (tmp_path / "unused-cache").write_text("x")
    assert path_problems(used)[-1].endswith("unused-cache is not a folder")


def test_home_that_is_a_file_is_named(tmp_path):
    (tmp_path / "home").write_text("x")
    path = write_yaml(tmp_path / "run.yaml", {"home": "home"})
    with pytest.raises(ConfigError, match=rf"  home: {tmp_path.resolve()}/home is not a folder"):
        check_paths(load_config(path), source=str(path))


def test_shipped_celeba_template_validates_but_its_placeholders_are_named():
    path = Path(__file__).resolve().parents[1] / "configs" / "celeba.yaml"
    config = load_config(path)
    problems = path_problems(config)
    if Path(config.dataset.celeba_root).is_dir():  # pragma: no cover - a machine with CelebA
        pytest.skip("CelebA is present at the template's path")
    assert problems[0] == (
        f"  dataset.celeba_root: {config.dataset.celeba_root} does not exist (expected a folder)"
    )
