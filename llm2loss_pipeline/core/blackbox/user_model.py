"""Bringing the user's own model in as the black box: a Python entry point or a TorchScript file.

An entry point `package.module:function` is imported and called with no arguments; it returns a
`torch.nn.Module`, or `(module, preprocess)` where `preprocess` turns a PIL RGB image into the
tensor the module expects. Without a preprocess the model gets float32 (3, S, S) tensors in
[0, 1] (shorter side resized to S = image_size, centre crop) and must normalise them itself.

Before any real work, one dry-run forward pass checks that the model runs and that its number of
outputs matches the label map, so a mismatch fails in a second with both numbers named, not
after an hour of loss computation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from llm2loss_pipeline.core.blackbox.checkpoint import LoadedModel
from llm2loss_pipeline.core.blackbox.cnn import ResizeToFloat
from llm2loss_pipeline.core.blackbox.config import ENTRY_POINT_PATTERN, BlackBoxConfig


class UserModelError(ValueError):
    """The user's model cannot be imported, loaded or run, or does not fit the label map."""


EXPORTED_SUFFIX = ".pt2"
USER_CODE_ERRORS = (Exception, SystemExit)
"""What user code may raise that is a user-model error: `sys.exit(3)` in an entry point is one
too (SystemExit is not an Exception), and must not end the pipeline with a bare `SystemExit: 3`.
KeyboardInterrupt stays uncaught so that Ctrl-C always stops a run."""


def refused_exported_program(path: str | os.PathLike[str]) -> str:
    """Why a torch.export (.pt2) file is not loaded, and what to give instead."""
    return (
        f"{path}: torch.export programs (.pt2) are refused because loading one unpickles parts "
        "of the file, which can run code from it; save the model with torch.jit.save "
        "(a .pt TorchScript archive) or name a Python entry_point"
    )


def _raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def load_entry_point(
    spec: str,
    num_classes_expected: int,
    *,
    image_size: int = 64,
    probe_image: Image.Image | None = None,
    device: str | torch.device = "cpu",
    allow_extra_outputs: bool = False,
) -> LoadedModel:
    """Import and call `package.module:function`; dry-run the result on one image."""
    if not ENTRY_POINT_PATTERN.match(spec or ""):
        raise UserModelError(f"entry point must look like 'package.module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserModelError(
            f"entry point {spec!r}: module {module_name!r} does not import "
            f"({type(exc).__name__}: {exc}); is its package installed or on PYTHONPATH?"
        ) from exc
    except USER_CODE_ERRORS as exc:
        raise UserModelError(
            f"entry point {spec!r}: importing module {module_name!r} failed ({_raised(exc)})"
        ) from exc
    factory = getattr(module, function_name, None)
    if factory is None:
        raise UserModelError(
            f"entry point {spec!r}: module {module_name!r} has no function {function_name!r}"
        )
    if not callable(factory):
        raise UserModelError(
            f"entry point {spec!r}: {function_name!r} is a {type(factory).__name__}, not a function"
        )
    try:
        returned = factory()
    except USER_CODE_ERRORS as exc:
        raise UserModelError(
            f"entry point {spec!r}: calling {function_name}() failed ({_raised(exc)})"
        ) from exc
    model, preprocess = _unpack(returned, spec)
    return _checked(
        model,
        preprocess or ResizeToFloat(image_size),
        source=f"entry point {spec!r}",
        meta={"source": "entry_point", "entry_point": spec},
        num_classes_expected=num_classes_expected,
        image_size=image_size,
        probe_image=probe_image,
        device=device,
        allow_extra_outputs=allow_extra_outputs,
    )


def load_torchscript(
    path: str | os.PathLike[str],
    num_classes_expected: int,
    *,
    image_size: int = 64,
    probe_image: Image.Image | None = None,
    device: str | torch.device = "cpu",
    allow_extra_outputs: bool = False,
) -> LoadedModel:
    """Load a `torch.jit.save` archive with `torch.jit.load`; dry-run it.

    `torch.jit.load` reads the archive's pickles with TorchScript's own unpickler, which builds
    only TorchScript types and refuses any other global (a `__reduce__` payload fails as "Unknown
    type name"), so the file cannot run Python code while loading; its TorchScript code runs in
    the interpreter only when the model is called. Exported programs (`torch.export.save`, .pt2)
    are refused: `torch.export.load` unpickles weights with `torch.load(weights_only=False)` and
    falls back to it for older archives, so a crafted .pt2 runs its code before any check. The
    input is float32 in [0, 1] as documented above.
    """
    source = Path(path)
    if source.suffix.lower() == EXPORTED_SUFFIX:
        raise UserModelError(refused_exported_program(source))
    if not source.is_file():
        raise UserModelError(
            f"TorchScript file {source.expanduser().resolve()} does not exist "
            "(black_box.torchscript_path)"
        )
    try:
        with warnings.catch_warnings():
            # The deprecation notice is for model authors, not for the people diagnosing them.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(source), map_location=torch.device(device))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserModelError(
            f"{source} is not a loadable TorchScript archive ({type(exc).__name__}: "
            f"{first_line[:200]}); save it with torch.jit.save"
        ) from exc
    return _checked(
        model,
        ResizeToFloat(image_size),
        source=f"TorchScript {source}",
        meta={"source": "torchscript", "torchscript_path": str(source)},
        num_classes_expected=num_classes_expected,
        image_size=image_size,
        probe_image=probe_image,
        device=device,
        allow_extra_outputs=allow_extra_outputs,
    )


def load_user_model(
    config: BlackBoxConfig,
    num_classes_expected: int,
    *,
    probe_image: Image.Image | None = None,
    device: str | torch.device = "cpu",
    allow_extra_outputs: bool = False,
) -> LoadedModel:
    """The model named by `config.source` ("entry_point" or "torchscript")."""
    kwargs: dict[str, Any] = {
        "image_size": config.image_size,
        "probe_image": probe_image,
        "device": device,
        "allow_extra_outputs": allow_extra_outputs,
    }
    if config.source == "entry_point":
        assert config.entry_point is not None  # guaranteed by BlackBoxConfig
        return load_entry_point(config.entry_point, num_classes_expected, **kwargs)
    if config.source == "torchscript":
        assert config.torchscript_path is not None
        return load_torchscript(config.torchscript_path, num_classes_expected, **kwargs)
    raise UserModelError(
        f"black_box.source is {config.source!r}; a user model needs 'entry_point' or 'torchscript'"
    )


def prepared_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in eval mode (where the module allows it)."""
    model = model.to(device)
    # Graph modules (torch.fx, torch.export) refuse eval(); they were traced in their run mode.
    with contextlib.suppress(NotImplementedError):
        model.eval()
    return model


def _unpack(returned: Any, spec: str) -> tuple[nn.Module, Callable | None]:
    if isinstance(returned, nn.Module):
        return returned, None
    if (
        isinstance(returned, tuple)
        and len(returned) == 2
        and isinstance(returned[0], nn.Module)
        and callable(returned[1])
    ):
        return returned[0], returned[1]
    described = (
        f"a tuple of ({', '.join(type(item).__name__ for item in returned)})"
        if isinstance(returned, tuple)
        else f"a {type(returned).__name__}"
    )
    raise UserModelError(
        f"entry point {spec!r} returned {described}; expected a torch.nn.Module or "
        "(module, preprocess) with preprocess a callable PIL image -> tensor"
    )


def _checked(
    model: nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    source: str,
    meta: dict[str, Any],
    num_classes_expected: int,
    image_size: int,
    probe_image: Image.Image | None,
    device: str | torch.device,
    allow_extra_outputs: bool,
) -> LoadedModel:
    target = torch.device(device)
    model = prepared_for_inference(model, target)
    image = (
        probe_image
        if probe_image is not None
        else Image.new("RGB", (image_size, image_size), (128, 128, 128))
    )
    try:
        x = preprocess(image)
    except USER_CODE_ERRORS as exc:
        raise UserModelError(
            f"{source}: preprocess failed on a probe image ({_raised(exc)})"
        ) from exc
    if not isinstance(x, torch.Tensor):
        raise UserModelError(
            f"{source}: preprocess returned a {type(x).__name__}, expected a torch.Tensor"
        )
    try:
        with torch.inference_mode():
            out = model(x.unsqueeze(0).to(target))
    except USER_CODE_ERRORS as exc:
        raise UserModelError(
            f"{source}: a dry-run forward pass on one image of shape {tuple(x.shape)} failed "
            f"({_raised(exc)})"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserModelError(
            f"{source}: the model must return a (batch, classes) tensor of scores; for one "
            f"image it returned {shape}"
        )
    outputs = int(out.shape[1])
    too_many = outputs > num_classes_expected and not allow_extra_outputs
    if outputs < num_classes_expected or too_many:
        raise UserModelError(
            f"{source}: the model has {outputs} outputs but the label map needs "
            f"{num_classes_expected}; check the label map (black_box.label_map_path) or the model"
        )
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        label_map=None,
        meta={**meta, "num_classes": outputs, "image_size": image_size},
    )


def check_user_model(
    config: BlackBoxConfig, device: str | torch.device = "cpu", num_classes: int | None = None
) -> dict[str, Any] | None:
    """Load and dry-run the user's model before anything else runs; None for other sources.

    The output count is checked when `num_classes` is known (from a label map file); the
    default label map needs the dataset, so black_box_model checks it. An entry point is called
    twice: a model whose weights differ between two calls
    (an unseeded random init) would give losses that no later run reproduces, and the loss step
    would then refuse it as "changed since black_box_model was materialized", which no rerun
    fixes."""
    if config.source not in ("entry_point", "torchscript"):
        return None
    kwargs: dict[str, Any] = {"device": device, "allow_extra_outputs": num_classes is None}
    first = load_user_model(config, num_classes or 1, **kwargs)
    if config.source == "entry_point":
        second = load_user_model(config, num_classes or 1, **kwargs)
        changed = _first_changed_weight(first.model, second.model)
        if changed is not None:
            raise UserModelError(
                f"entry point {config.entry_point!r} is not deterministic: two calls return "
                f"different weights ({changed}); seed it (torch.manual_seed) or load saved "
                "weights, so that every run diagnoses the same model"
            )
    return first.meta


def _first_changed_weight(a: nn.Module, b: nn.Module) -> str | None:
    left, right = a.state_dict(), b.state_dict()
    if left.keys() != right.keys():
        return "their parameter names differ"
    for name, tensor in left.items():
        other = right[name]
        if tensor.shape != other.shape or not torch.equal(tensor.cpu(), other.cpu()):
            return name
    return None
