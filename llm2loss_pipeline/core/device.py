"""Choosing a torch device and precision, without touching CUDA until a model actually runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm2loss_pipeline.core.choices import one_of

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEVICES = ("cpu", "cuda", "auto")
"""Device names besides "cuda:N" (any CUDA index, checked by `is_cuda_index`)."""


class DeviceSpec(BaseModel):
    """How a model-running step places its work.

    device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU).
    precision: "fp32", or "bf16"/"fp16" autocast on CUDA (bf16 also on CPU); "auto" is bf16 where
    the device computes it natively (`native_bf16`) and fp32 elsewhere.
    Nothing here calls CUDA until `torch_device()` is asked, so importing and configuring is safe
    on a machine without a GPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    precision: str = Field(
        "fp32", description="fp32, bf16 or fp16 (autocast), or auto (bf16 where native, else fp32)"
    )
    batch_size: int = Field(256, ge=1, le=65536, description="samples per forward batch")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        return one_of("precision", value, PRECISIONS)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return one_of("device", value, DEVICES, family=("cuda:N", is_cuda_index))

    def torch_device(self):
        # lazy: torch (+930 modules, 2 s); `compare` imports this module and needs no torch
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {self.device!r} was asked for but torch sees no CUDA device; "
                "use device: cpu or auto"
            )
        return torch.device(self.device)

    def resolved_precision(self, device) -> str:
        """The precision that runs on `device`: "auto" made bf16 or fp32 (`native_bf16`)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16(device) else "fp32"

    def autocast(self, device) -> contextlib.AbstractContextManager:
        """Mixed precision for inference/training where asked; a no-op for fp32."""
        # lazy: torch (+930 modules, 2 s); `compare` imports this module and needs no torch
        import torch

        precision = self.resolved_precision(device)
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if device.type == "cpu" and dtype is torch.float16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def loader_kwargs(self, device) -> dict:
        """DataLoader settings: pinned memory and persistent workers only where they help."""
        kwargs: dict = {"batch_size": self.batch_size, "num_workers": self.num_workers}
        if device.type == "cuda":
            kwargs["pin_memory"] = True
        if self.num_workers > 0:
            kwargs["persistent_workers"] = False
            kwargs["prefetch_factor"] = 4
        return kwargs


def native_bf16(device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA device that supports it, or a CPU with
    AVX512-BF16 or AMX tiles. Elsewhere bf16 autocast is emulated, and slower than fp32.

    On a 2-core AMD EPYC with AVX512-BF16 the caption-tuned encoder trains 1.5x as fast in bf16,
    with the same zero-shot AUROC (0.837 both; bench/RESULTS.md, "Stop 27")."""
    # lazy: torch (+930 modules, 2 s); `compare` imports this module and needs no torch
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return False
    # private probes (torch >= 2.1); a torch without them gets fp32, the safe side
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_device(name: str) -> str:
    """The torch device a user's `--device` / `device=` names ("auto" resolved), or one line of
    ValueError saying why it cannot be used here."""

    try:
        return str(DeviceSpec(device=name).torch_device())
    except ValidationError as exc:  # pydantic's report spans lines; the reason is one
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from exc
    except RuntimeError as exc:  # CUDA asked for on a machine without it
        raise ValueError(str(exc)) from exc


def is_cuda_index(device: str) -> bool:
    """`device` names one CUDA device by its index ("cuda:0")."""
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and make CPU kernels deterministic for the duration of a training run."""
    # lazy: torch (+930 modules, 2 s); `compare` imports this module and needs no torch
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
