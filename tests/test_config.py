"""The YAML configuration: defaults, validation errors that name the key, the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2loss_pipeline.core.config import ConfigError, PipelineConfig, load_config, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "celeba.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert isinstance(config, PipelineConfig)


def test_default_yaml_is_the_embedded_default() -> None:
    assert load_config(CONFIGS / "default.yaml") == load_config(None)


def test_embedded_default() -> None:
    config = load_config(None)
    assert config.world.hard_attributes == {"Gray_Hair": 0.9, "Goatee": 0.9}
    assert config.dataset.source == "generated"
    assert config.encoder.mode == "caption_tuned"
    assert config.black_box.source == "builtin"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("world:\n  n_identites: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "world.n_identites: unknown key" in str(info.value)
    assert str(path) in str(info.value)


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"world\.n_identities"):
        validate_config({"world": {"n_identities": 1}})
    with pytest.raises(ConfigError, match=r"devices\.losses\.device"):
        validate_config({"devices": {"losses": {"device": "gpu"}}})
    # The form of a pair is checked here; its names against the data when the report runs.
    with pytest.raises(ConfigError, match=r"report\.pairs"):
        validate_config({"report": {"pairs": ["Male"]}})
    with pytest.raises(ConfigError, match=r"report\.pairs.*two different"):
        validate_config({"report": {"pairs": ["Male:Male"]}})
    assert validate_config({"report": {"pairs": ["Male:Nope"]}}).report.pairs == ["Male:Nope"]
    with pytest.raises(ConfigError, match=r"world\.hard_attributes"):
        validate_config({"world": {"hard_attributes": {"Eyeglasses": 1.5}}})


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("world:\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")
