"""No model file may run code: a malicious file of each kind is loaded; its payload must not run.

Each payload is a pickle whose `__reduce__` creates a marker file, packaged the way the real file
would be: a `torch.save` zip named `.pt`, a TorchScript archive whose `data.pkl` is the payload,
and a genuine `torch.export.save` archive whose weight is marked as pickled (torch.export.load
reads such weights with `torch.load(weights_only=False)`, so it ran the payload before this fix).
The tests build the payloads with torch.save on purpose; the package itself never pickles.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import dagster as dg
import pytest
import torch

from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.user_model import (
    UserModelError,
    load_torchscript,
    load_user_model,
)
from llm2loss_pipeline.defs.sensors import black_box_run_config, build_model_registry_sensor


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker's existence proves the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": _Payload(marker)}, buffer)
    return buffer.getvalue()


def _rewrite_zip(source: Path, target: Path, replace) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, replace(name, zin.read(name)))


def torch_save_file(path: Path, marker: Path) -> Path:
    path.write_bytes(_pickled(marker))
    return path


def torchscript_with_payload(path: Path, marker: Path, tmp: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(tmp / "real.pt"))
    payload = zipfile.ZipFile(io.BytesIO(_pickled(marker)))
    evil = next(payload.read(n) for n in payload.namelist() if n.endswith("data.pkl"))

    def replace(name: str, data: bytes) -> bytes:
        return evil if name.endswith(("/data.pkl", "/constants.pkl")) else data

    _rewrite_zip(tmp / "real.pt", path, replace)
    return path


def exported_with_payload(path: Path, marker: Path, tmp: Path) -> Path:
    """A real .pt2 archive whose first weight is a pickle (use_pickle: true): the payload."""
    program = torch.export.export(torch.nn.Linear(2, 3), (torch.rand(1, 2),))
    torch.export.save(program, str(tmp / "real.pt2"))
    payload = _pickled(marker)

    def replace(name: str, data: bytes) -> bytes:
        if name.endswith("weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("weights/weight_0"):
            return payload
        return data

    _rewrite_zip(tmp / "real.pt2", path, replace)
    return path


def test_no_model_file_runs_its_pickle_payload_when_loaded(tmp_path):
    made = {
        "torch.save as .pt": torch_save_file(tmp_path / "a.pt", tmp_path / "ran-a"),
        "TorchScript .pt": torchscript_with_payload(
            tmp_path / "b.pt", tmp_path / "ran-b", tmp_path
        ),
        "torch.export .pt2": exported_with_payload(
            tmp_path / "c.pt2", tmp_path / "ran-c", tmp_path
        ),
    }
    for kind, path in made.items():
        with pytest.raises(UserModelError) as caught:
            load_torchscript(path, 3, image_size=16)
        assert str(path) in str(caught.value), kind
        config = BlackBoxConfig(source="torchscript", torchscript_path=str(path), image_size=16)
        with pytest.raises(UserModelError):
            load_user_model(config, 3)
    ran = sorted(marker.name for marker in tmp_path.glob("ran-*"))
    assert ran == [], f"payloads ran: {ran}"
    assert "refused" in _error(made["torch.export .pt2"])
    assert "save it with torch.jit.save" in _error(made["TorchScript .pt"])


def _error(path: Path) -> str:
    try:
        load_torchscript(path, 3)
    except UserModelError as exc:
        return str(exc)
    raise AssertionError(f"{path} loaded")


def test_no_file_in_the_model_registry_runs_code(tmp_path):
    """A .pt2 is refused by the sensor; a .pt is requested (the sensor only hashes it), and the
    run's loader does not unpickle it."""
    registry = tmp_path / "registry"
    registry.mkdir()
    exported = exported_with_payload(registry / "model-v2.pt2", tmp_path / "ran-pt2", tmp_path)
    os.utime(exported, (1e6, 1e6))
    sensor = build_model_registry_sensor(registry, settle_seconds=0)
    with dg.instance_for_test() as instance:
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=None))
        assert first.run_requests == []
        assert "refused 1 torch.export file(s) (model-v2.pt2" in (first.skip_message or "")
        with pytest.raises(ValueError, match="are refused because loading one unpickles"):
            black_box_run_config(exported, BlackBoxConfig())

        pickled = torch_save_file(registry / "model-v3.pt", tmp_path / "ran-pt")
        os.utime(pickled, (2e6, 2e6))
        context = dg.build_sensor_context(instance=instance, cursor=first.cursor)
        (request,) = sensor.evaluate_tick(context).run_requests
    settings = request.run_config["resources"]["black_box"]["config"]
    assert settings["torchscript_path"] == str(pickled)
    with pytest.raises(UserModelError, match="not a loadable TorchScript archive"):
        load_user_model(BlackBoxConfig.model_validate(settings), 3)
    assert sorted(marker.name for marker in tmp_path.glob("ran-*")) == []


def test_the_readme_says_who_may_write_to_the_registry_and_the_home():
    """Issue 23, security: an entry point is code the configuration names, so whoever may write
    to the configuration, the home or the registry folder may run code as the pipeline."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("**Who may write where.**")
    paragraph = readme[start : readme.index("\n\n", start)]
    for needle in ("torch.jit.load", "`.pt2`", "`LLM2LOSS_HOME`", "`$LLM2LOSS_MODEL_REGISTRY`"):
        assert needle in paragraph, needle
    assert "not group- or world-writable" in " ".join(paragraph.split())
