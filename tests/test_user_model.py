"""The user's own model as the black box: entry points, TorchScript files, and their errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from llm2loss_pipeline.core.blackbox.cnn import ResizeToFloat
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.losses import compute_losses
from llm2loss_pipeline.core.blackbox.user_model import (
    UserModelError,
    load_entry_point,
    load_torchscript,
    load_user_model,
)
from llm2loss_pipeline.core.device import DeviceSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NUM_CLASSES = 5
HERE = "tests.test_user_model"


class ColourClassifier(nn.Module):
    """Scores class k by how close the image's mean colour is to a fixed reference colour."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("reference", torch.rand(num_classes, 3, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.float().mean(dim=(2, 3))
        return -((mean[:, None, :] - self.reference[None]) ** 2).sum(-1) * 10.0


def make_model() -> nn.Module:
    return ColourClassifier()


def make_model_with_preprocess() -> tuple[nn.Module, object]:
    return ColourClassifier(), ResizeToFloat(16)


def make_wrong_type() -> str:
    return "not a model"


def make_wrong_classes() -> nn.Module:
    return ColourClassifier(num_classes=NUM_CLASSES + 2)


def make_failing() -> nn.Module:
    raise RuntimeError("weights file not found")


NOT_A_FUNCTION = 42


def test_entry_point_returns_a_checked_model():
    loaded = load_entry_point(f"{HERE}:make_model", NUM_CLASSES, image_size=16)
    assert isinstance(loaded.model, ColourClassifier)
    assert not loaded.model.training
    assert loaded.meta["num_classes"] == NUM_CLASSES
    x = loaded.preprocess(Image.new("RGB", (40, 30), (255, 0, 0)))
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 16, 16)
    assert torch.allclose(x[0], torch.ones(16, 16)) and float(x[1:].abs().max()) == 0.0


def test_entry_point_may_return_its_own_preprocess():
    loaded = load_entry_point(f"{HERE}:make_model_with_preprocess", NUM_CLASSES, image_size=64)
    assert isinstance(loaded.preprocess, ResizeToFloat) and loaded.preprocess.size == 16


def test_user_model_from_config_runs_the_loss_pass(tmp_path):
    paths = []
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    for i, colour in enumerate(colours):
        path = tmp_path / f"{i:06d}.jpg"
        Image.new("RGB", (20, 20), colour).save(path)
        paths.append((path.name, str(path)))
    config = BlackBoxConfig(source="entry_point", entry_point=f"{HERE}:make_model", image_size=16)
    loaded = load_user_model(config, NUM_CLASSES)
    labels = np.array([0, 1, 2])
    result = compute_losses(
        loaded, paths, labels, ["test"] * 3, device_spec=DeviceSpec(device="cpu", batch_size=2)
    )
    reference = loaded.model(torch.stack([loaded.preprocess(Image.open(p)) for _, p in paths]))
    expected = nn.functional.cross_entropy(reference, torch.from_numpy(labels), reduction="none")
    assert np.allclose(result.frame["loss"].to_numpy(), expected.detach().numpy(), atol=1e-6)
    assert result.frame["sample_id"].to_list() == [name for name, _ in paths]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_package_xyz.models:make", "module 'no_such_package_xyz.models' does not import"),
        (f"{HERE}:no_such_function", "has no function 'no_such_function'"),
        (f"{HERE}:NOT_A_FUNCTION", "is a int, not a function"),
        (f"{HERE}:make_wrong_type", "returned a str"),
        (f"{HERE}:make_failing", "calling make_failing() failed (RuntimeError: weights file"),
        (f"{HERE}:make_wrong_classes", "has 7 outputs but the label map needs 5"),
        ("not an entry point", "must look like 'package.module:function'"),
    ],
)
def test_entry_point_errors_say_what_is_wrong(spec, needle):
    with pytest.raises(UserModelError) as caught:
        load_entry_point(spec, NUM_CLASSES)
    assert needle in str(caught.value)


def test_import_error_is_included():
    with pytest.raises(UserModelError, match="ModuleNotFoundError: No module named 'no_such_pkg'"):
        load_entry_point("no_such_pkg:make", NUM_CLASSES)


def test_extra_outputs_allowed_only_when_asked():
    loaded = load_entry_point(f"{HERE}:make_wrong_classes", NUM_CLASSES, allow_extra_outputs=True)
    assert loaded.meta["num_classes"] == NUM_CLASSES + 2
    with pytest.raises(UserModelError, match="has 7 outputs but the label map needs 9"):
        load_entry_point(f"{HERE}:make_wrong_classes", 9, allow_extra_outputs=True)


def test_torchscript_round_trip(tmp_path):
    model = ColourClassifier().eval()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.10+
        torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_torchscript(path, NUM_CLASSES, image_size=16)
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))
    config = BlackBoxConfig(source="torchscript", torchscript_path=str(path), image_size=16)
    assert load_user_model(config, NUM_CLASSES).meta["source"] == "torchscript"
    with pytest.raises(UserModelError, match="has 5 outputs but the label map needs 6"):
        load_torchscript(path, NUM_CLASSES + 1)


def test_exported_programs_are_refused_before_loading(tmp_path):
    # torch.export.load unpickles (tests/test_model_file_security.py plants a payload); a .pt2
    # is refused by name, before any of its bytes are read.
    model = ColourClassifier().eval()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(exported, str(path))
    with pytest.raises(UserModelError, match=r"torch\.export programs \(\.pt2\) are refused"):
        load_torchscript(path, NUM_CLASSES, image_size=16)


def test_torchscript_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserModelError, match=f"{missing} does not exist"):
        load_torchscript(missing, NUM_CLASSES)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(UserModelError, match=f"{garbage} is not a loadable TorchScript archive"):
        load_torchscript(garbage, NUM_CLASSES)


def test_builtin_source_is_not_a_user_model():
    with pytest.raises(UserModelError, match="needs 'entry_point' or 'torchscript'"):
        load_user_model(BlackBoxConfig(), NUM_CLASSES)
