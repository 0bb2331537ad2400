"""The trained ensemble of diagnosis heads `h`, held as stacked parameters per architecture.

Members are `kinds x archs x seeds`, indexed in that nesting order. Parameters of all members of
one architecture are stacked on a leading member axis (linear: weight [M, d], bias [M]; mlp:
w1 [M, d, H], b1 [M, H], w2 [M, H], b2 [M]) so that prediction and training are one batched
computation.

Inputs are the embeddings after the modality-gap map (`gap.image` for images, `gap.text` for text):
unit-norm vectors of dimension d. Each member can also be exported on its own in torch's
`nn.Linear(d, 1)` / `nn.Sequential(nn.Linear(d, H), nn.ReLU(), nn.Linear(H, 1))` state-dict naming.

Standardised outputs. A regressor predicts a loss in scaled-target units and a ranker a logit whose
scale the BCE objective leaves free, so raw outputs of different members are not comparable. Each
member's output is therefore standardised with the mean and std of that member's outputs on its own
training embeddings (at most 32,768 of them, see `train.standardization_rows`):
`z = (h(x) - mean_train) / std_train`. A standardised value is "standard
deviations of that member's predicted loss over the training images, above their average"; a
difference `z(a) - z(b)` is independent of the mean and reads the same for every member, which is
what makes statistics pooled over both kinds ("overall") meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llm2loss_pipeline.core.heads.config import ARCHS, KINDS, HeadsConfig
from llm2loss_pipeline.core.heads.scaling import TargetScaler
from llm2loss_pipeline.core.members import MemberInfo  # torch-free, for queries; re-exported

CHUNK_FLOATS = 1 << 20


def member_grid(config: HeadsConfig) -> list[MemberInfo]:
    """Members in index order: kinds, then archs, then seeds."""
    members: list[MemberInfo] = []
    for kind in config.kinds:
        for arch in config.archs:
            for offset in range(config.n_seeds):
                members.append(MemberInfo(len(members), kind, arch, config.base_seed + offset))
    return members


def shared_forward(
    arch: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs [M, n] of M stacked members on the same inputs x [n, d] (one GEMM per layer).

    Prediction's forward; training runs `fused.AllMembers`, which computes the same outputs for
    both architectures at once (the tests compare the two). `scratch` [n, M*H] (mlp, outside
    autograd) holds the activations instead of fresh memory: a fresh block of that size is memory
    glibc may have handed back to the kernel, to be faulted in again page by page.
    """
    if arch == "linear":
        return torch.addmm(params["bias"][None, :], x, params["weight"].T).T
    w1 = params["w1"]
    members, dim, hidden = w1.shape
    # One [n, d] x [d, M*H] product with the bias folded in.
    pre = torch.addmm(
        params["b1"].reshape(1, members * hidden),
        x,
        w1.permute(1, 0, 2).reshape(dim, members * hidden),
        out=scratch,
    )
    act = pre.relu_()
    second = (params["w2"], params["b2"])
    # Outside autograd the activations are not needed again, so the product overwrites them.
    return second_layer(act, *second, out=None if tracks_grad(act, *second) else act).T


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors (so none may be written in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def second_layer(
    act: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Outputs [n, M] of the mlp members' second layer from their activations [n, M*H].

    A multiply and a sum over H: as a batched product (einsum/bmm: M products [n, H] x [H, 1]) or
    a block-diagonal GEMM it is a run of thin products that MKL runs at a tenth of its rate;
    measured 3x slower forward and backward at n=256, M=10. `out` [n, M*H], if given, receives
    the product (it may be `act` itself when act is not needed afterwards).
    """
    members, hidden = w2.shape
    act3 = act.view(act.shape[0], members, hidden)
    product = torch.mul(act3, w2, out=None if out is None else out.view_as(act3))
    return product.sum(dim=2) + b2


def forward_in_chunks(arch: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`shared_forward` over row chunks whose activations stay in cache (for inference).

    At 16,384 rows the [rows, M*H] activations of 10 mlp members are 84 MB and every
    element-wise pass over them streams through memory; chunks of about 4 MiB do not.
    """
    if arch == "mlp":
        members, dim, hidden = params["w1"].shape
        flat = params["w1"].permute(1, 0, 2).reshape(dim, members * hidden)
        # The [d, M*H] layout once, shown as [M, d, H], so that no chunk copies the layer again.
        params = {**params, "w1": flat.view(dim, members, hidden).permute(1, 0, 2)}
        width = members * hidden
    else:
        width = params["weight"].shape[0]
    rows = max(256, CHUNK_FLOATS // width)
    starts = range(0, max(x.shape[0], 1), rows)
    in_place = arch == "mlp" and not tracks_grad(*params.values())
    scratch = x.new_empty(min(rows, len(x)), width) if in_place else None
    parts = []
    for s in starts:
        chunk = aligned(x[s : s + rows])
        parts.append(
            shared_forward(arch, params, chunk, None if scratch is None else scratch[: len(chunk)])
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself, or a copy of it in 64-byte aligned memory.

    MKL's GEMM rounds differently when an operand is not 64-byte aligned (measured on an AVX2
    EPYC: the same embeddings at an offset of 4 or 8 bytes give other output bits), and where a
    caller's buffer lies (an Arrow column, a row slice) differs from process to process; the copy
    makes the outputs depend on the values alone.
    """
    return x if x.data_ptr() % 64 == 0 else x.clone()


def _as_tensor(emb: np.ndarray | torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    # torch cannot view a numpy array with negative strides (x[::-1]); those are copied.
    tensor = torch.as_tensor(np.ascontiguousarray(emb) if isinstance(emb, np.ndarray) else emb)
    if tensor.ndim != 2 or tensor.shape[1] != dim:
        raise ValueError(
            f"embeddings must have shape [n, {dim}] (the heads' embedding dimension), "
            f"got {tuple(tensor.shape)}"
        )
    # contiguous: a strided tensor's GEMM rounds differently from its contiguous copy's.
    tensor = tensor.to(device=device, dtype=torch.float32).contiguous()
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"embedding row {row} contains NaN or inf")
    return tensor


class HeadEnsemble:
    """Members of the ensemble and their stacked parameters; see the module docstring for units."""

    def __init__(
        self,
        members: Sequence[MemberInfo],
        params: dict[str, dict[str, torch.Tensor]],
        out_mean: np.ndarray,
        out_std: np.ndarray,
        scaler: TargetScaler,
        config: HeadsConfig,
        embedding_dim: int,
        training: dict[str, Any] | None = None,
    ) -> None:
        self.members = list(members)
        self.training = dict(training or {})
        self.params = params
        self.out_mean = np.asarray(out_mean, dtype=np.float64)
        self.out_std = np.asarray(out_std, dtype=np.float64)
        self.scaler = scaler
        self.config = config
        self.embedding_dim = int(embedding_dim)
        self.rows: dict[str, list[int]] = {
            arch: [m.index for m in self.members if m.arch == arch] for arch in ARCHS
        }
        if [m.index for m in self.members] != list(range(len(self.members))):
            raise ValueError("ensemble members must be indexed 0..M-1 in order")
        for arch, rows in self.rows.items():
            if rows and arch not in params:
                raise ValueError(f"ensemble has {arch} members but no {arch} parameters")
        if self.out_mean.shape != (len(self.members),) or self.out_std.shape != self.out_mean.shape:
            raise ValueError("standardisation statistics must have one value per member")

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"HeadEnsemble({len(self)} members, dim {self.embedding_dim}, {self.scaler.kind})"

    @property
    def device(self) -> torch.device:
        return next(iter(next(iter(self.params.values())).values())).device

    @property
    def kinds(self) -> list[str]:
        return [kind for kind in KINDS if any(m.kind == kind for m in self.members)]

    @torch.no_grad()
    def predict(self, emb: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw outputs [M, n] (float32) in member index order."""
        x = _as_tensor(emb, self.embedding_dim, self.device)
        out = np.empty((len(self.members), x.shape[0]), dtype=np.float32)
        for arch, rows in self.rows.items():
            if rows:
                out[rows] = forward_in_chunks(arch, self.params[arch], x).cpu().numpy()
        return out

    def standardized(self, emb: np.ndarray | torch.Tensor) -> np.ndarray:
        """Outputs [M, n] (float64) in each member's training standard deviations."""
        raw = self.predict(emb).astype(np.float64)
        return (raw - self.out_mean[:, None]) / self.out_std[:, None]

    # one member in plain torch naming, for checkpoints

    def member_tensors(self, index: int) -> dict[str, torch.Tensor]:
        member = self.members[index]
        row = self.rows[member.arch].index(index)
        p = {
            name: tensor[row].detach().cpu().clone()
            for name, tensor in self.params[member.arch].items()
        }
        if member.arch == "linear":
            return {"weight": p["weight"][None, :], "bias": p["bias"].reshape(1)}
        return {
            "0.weight": p["w1"].T.contiguous(),
            "0.bias": p["b1"],
            "2.weight": p["w2"][None, :],
            "2.bias": p["b2"].reshape(1),
        }

    @staticmethod
    def stack_member_tensors(
        arch: str, tensors: Sequence[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The inverse of `member_tensors` for all members of one architecture."""
        if arch == "linear":
            return {
                "weight": torch.stack([t["weight"][0] for t in tensors]),
                "bias": torch.stack([t["bias"].reshape(()) for t in tensors]),
            }
        return {
            "w1": torch.stack([t["0.weight"].T for t in tensors]).contiguous(),
            "b1": torch.stack([t["0.bias"] for t in tensors]),
            "w2": torch.stack([t["2.weight"][0] for t in tensors]),
            "b2": torch.stack([t["2.bias"].reshape(()) for t in tensors]),
        }

    def subset(self, indices: Sequence[int]) -> HeadEnsemble:
        """An ensemble of some members (re-indexed 0..k-1), e.g. one kind for a report column."""
        chosen = [self.members[i] for i in indices]
        members = [MemberInfo(k, m.kind, m.arch, m.seed) for k, m in enumerate(chosen)]
        params: dict[str, dict[str, torch.Tensor]] = {}
        for arch in ARCHS:
            rows = [self.rows[arch].index(m.index) for m in chosen if m.arch == arch]
            if rows:
                params[arch] = {n: t[rows].clone() for n, t in self.params[arch].items()}
        return HeadEnsemble(
            members,
            params,
            self.out_mean[list(indices)],
            self.out_std[list(indices)],
            self.scaler,
            self.config,
            self.embedding_dim,
            training={
                key: [value[i] for i in indices] if isinstance(value, list) else value
                for key, value in self.training.items()
            },
        )
