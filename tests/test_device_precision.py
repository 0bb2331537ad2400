"""`precision: auto`: bf16 autocast only where the hardware multiplies bf16 (core/device.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.device import DeviceSpec, native_bf16

CPU = torch.device("cpu")


def _cpu_has_bf16(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx"), [(True, False), (False, True)])
def test_auto_is_bf16_on_a_cpu_with_bf16_arithmetic(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool
) -> None:
    _cpu_has_bf16(monkeypatch, avx512_bf16, amx)
    spec = DeviceSpec(device="cpu", precision="auto")
    assert native_bf16(CPU)
    assert spec.resolved_precision(CPU) == "bf16"
    with spec.autocast(CPU):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_auto_is_fp32_where_bf16_would_be_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_has_bf16(monkeypatch, False, False)
    spec = DeviceSpec(device="cpu", precision="auto")
    assert not native_bf16(CPU)
    assert spec.resolved_precision(CPU) == "fp32"
    assert isinstance(spec.autocast(CPU), contextlib.nullcontext)
    with spec.autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_a_torch_without_the_probes_gets_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert DeviceSpec(device="cpu", precision="auto").resolved_precision(CPU) == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    _cpu_has_bf16(monkeypatch, True, True)
    assert DeviceSpec(precision=precision).resolved_precision(CPU) == precision


def test_only_the_encoder_defaults_to_auto() -> None:
    devices = load_config(None).devices
    assert devices.encoder.precision == "auto"
    others = (devices.black_box, devices.losses, devices.embeddings, devices.heads)
    assert {spec.precision for spec in others} == {"fp32"}


def test_an_unknown_precision_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto"):
        DeviceSpec(precision="int8")
