"""Training every member of the head ensemble as one batched computation.

All members live in stacked tensors (one stack per architecture) and one AdamW optimiser steps them
together: each step gathers every member's own mini-batch into [M, B, d] and runs `torch.baddbmm`.
The summed objective has a block-diagonal gradient (no parameter is shared), and AdamW and weight
decay act element-wise, so each member follows exactly the trajectory it would follow alone; the
tests check that training a member inside the batch equals training it alone with the same seed.

Everything random about a member comes from its own generator, seeded from (seed, kind, arch):
initialisation, the data order of every epoch, and (rankers) the pair partners. Members therefore
differ by seed, and a member's randomness does not depend on which other members train with it.

Objectives (paper eq. 1-4):
- regressor: MSE(h(x_i), t_i) with t the scaled loss (scaling.py);
- ranker: for each sample i of a batch, `pairs_per_sample` partners j drawn from the same batch
  (j != i; batches are random subsets, so these are random pairs of the split);
  BCE(sigmoid(h(x_i) - h(x_j)), [l_i > l_j]), with target 1/2 for tied losses so that tied samples
  are pulled to equal scores rather than skipped. The objective only sees differences of outputs,
  so a ranker's output bias has no gradient; it is held at 0 (otherwise rounding residues of a
  zero gradient, normalised by Adam, would make it drift by up to lr per step).

Inputs are scaled by sqrt(d) during training so that coordinates of unit-norm embeddings have unit
variance (Adam's step size is per coordinate); the factor is folded into the first layer afterwards,
so the finished heads take the unit-norm embeddings directly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm2loss_pipeline.core.heads.config import ARCHS, HeadsConfig
from llm2loss_pipeline.core.heads.ensemble import (
    HeadEnsemble,
    MemberInfo,
    member_grid,
    stack_forward,
)
from llm2loss_pipeline.core.heads.scaling import check_losses, fit_transform

Progress = Callable[[int, int], None]
OUTPUT_BIAS = {"linear": "bias", "mlp": "b2"}


def member_stream_seed(member: MemberInfo) -> int:
    """The seed of a member's private generator: a stable hash of (seed, kind, arch)."""
    digest = hashlib.sha256(f"{member.seed}:{member.kind}:{member.arch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_embeddings(embeddings: Any, what: str = "embeddings") -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what}: row {int(np.flatnonzero(~finite)[0])} contains NaN or inf")
    return array


def _init_member(
    arch: str, dim: int, hidden: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from the member's stream."""

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound

    if arch == "linear":
        return {"weight": uniform((dim,), dim), "bias": uniform((), dim)}
    return {
        "w1": uniform((dim, hidden), dim),
        "b1": uniform((hidden,), dim),
        "w2": uniform((hidden,), hidden),
        "b2": uniform((), hidden),
    }


def train_ensemble(
    embeddings: np.ndarray,
    losses: np.ndarray,
    config: HeadsConfig,
    progress: Progress | None = None,
    *,
    device: str | torch.device = "cpu",
    members: list[MemberInfo] | None = None,
) -> HeadEnsemble:
    """Train all members of `config` on (embeddings [n, d], losses [n]); see the module docstring.

    `embeddings` are the gap-mapped image embeddings (`gap.image(...)`). `progress(done, total)`
    is called after every epoch (`config.effective_epochs(n)` of them). `members` restricts
    training to some members of the grid (used to show that a member trained alone equals the
    same member trained in the batch).
    """
    x_np = check_embeddings(embeddings)
    l_np = check_losses(losses)
    if l_np.shape[0] != x_np.shape[0]:
        raise ValueError(
            f"{x_np.shape[0]} embeddings but {l_np.shape[0]} losses: they must be the same samples"
        )
    n, dim = x_np.shape
    if n < 2:
        raise ValueError(f"need at least 2 training samples, got {n}")
    scaler, targets_np = fit_transform(l_np, config.target_scaling)
    device = torch.device(device)
    chosen = list(members) if members is not None else member_grid(config)
    order = [m for arch in ARCHS for m in chosen if m.arch == arch]  # stacks are contiguous rows
    generators = [torch.Generator().manual_seed(member_stream_seed(m)) for m in order]

    params: dict[str, dict[str, torch.Tensor]] = {}
    frozen_bias: dict[str, torch.Tensor] = {}  # ranker rows of each stack's output bias
    for arch in ARCHS:
        inits = []
        for m, g in zip(order, generators, strict=True):
            if m.arch == arch:
                init = _init_member(arch, dim, config.hidden, g)
                if m.kind == "ranker":
                    init[OUTPUT_BIAS[arch]] = torch.zeros(())
                inits.append(init)
        rankers = [
            i for i, m in enumerate(m for m in order if m.arch == arch) if m.kind == "ranker"
        ]
        if rankers:
            frozen_bias[arch] = torch.tensor(rankers, device=device)
        if inits:
            params[arch] = {
                name: torch.stack([p[name] for p in inits]).to(device).requires_grad_(True)
                for name in inits[0]
            }
    arch_counts = [(arch, sum(m.arch == arch for m in order)) for arch in ARCHS]
    reg_rows = torch.tensor(
        [r for r, m in enumerate(order) if m.kind == "regressor"], device=device
    )
    rank_rows = [r for r, m in enumerate(order) if m.kind == "ranker"]
    rank_rows_t = torch.tensor(rank_rows, device=device)

    x = torch.from_numpy(x_np).to(device) * math.sqrt(dim)
    targets = torch.from_numpy(targets_np).to(device)
    raw = torch.from_numpy(l_np.astype(np.float32)).to(device)
    optimizer = torch.optim.AdamW(
        [t for stack in params.values() for t in stack.values()],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    k = config.pairs_per_sample
    batch = config.batch_size
    epochs = config.effective_epochs(n)
    for epoch in range(epochs):
        perms = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        partners = (
            torch.stack([torch.rand(n * k, generator=generators[r]) for r in rank_rows]).to(device)
            if rank_rows
            else None
        )
        for start in range(0, n, batch):
            idx = perms[:, start : start + batch]
            size = idx.shape[1]
            xb = x[idx]
            outs, row = [], 0
            for arch, count in arch_counts:
                if count:
                    outs.append(stack_forward(arch, params[arch], xb[row : row + count]))
                    row += count
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            objective = out.new_zeros(())
            if len(reg_rows):
                err = out[reg_rows] - targets[idx[reg_rows]]
                objective = objective + err.square().mean(dim=1).sum()
            if partners is not None and size >= 2:
                objective = objective + _ranker_objective(
                    out[rank_rows_t],
                    raw[idx[rank_rows_t]],
                    partners[:, start * k : (start + size) * k],
                )
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            for arch, rows in frozen_bias.items():
                params[arch][OUTPUT_BIAS[arch]].grad[rows] = 0.0
            optimizer.step()
        if progress is not None:
            progress(epoch + 1, epochs)

    with torch.no_grad():
        scale = math.sqrt(dim)
        final: dict[str, dict[str, torch.Tensor]] = {}
        for arch, stack in params.items():
            final[arch] = {name: t.detach().clone() for name, t in stack.items()}
            final[arch]["weight" if arch == "linear" else "w1"].mul_(scale)
    indexed = sorted(order, key=lambda m: m.index)
    renumbered = [MemberInfo(i, m.kind, m.arch, m.seed) for i, m in enumerate(indexed)]
    provisional = HeadEnsemble(
        renumbered,
        _reorder(final, order, indexed),
        np.zeros(len(order)),
        np.ones(len(order)),
        scaler,
        config,
        dim,
    )
    outputs = provisional.predict(x_np).astype(np.float64)
    std = outputs.std(axis=1)
    std = np.where(std > 0.0, std, 1.0)  # a constant member stays constant; avoid 0/0
    provisional.out_mean = outputs.mean(axis=1)
    provisional.out_std = std
    return provisional


def _ranker_objective(
    out: torch.Tensor, loss: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Summed over members: mean BCE over each member's pairs (i, j) inside its batch."""
    members, size = out.shape
    k = uniforms.shape[1] // size
    anchor = torch.arange(size, device=out.device).repeat(k).expand(members, -1)
    offset = 1 + torch.floor(uniforms * (size - 1)).long().clamp_(max=size - 2)
    partner = (anchor + offset) % size
    logit = out.gather(1, anchor) - out.gather(1, partner)
    li, lj = loss.gather(1, anchor), loss.gather(1, partner)
    target = (li > lj).float() + 0.5 * (li == lj).float()
    return F.binary_cross_entropy_with_logits(logit, target, reduction="none").mean(dim=1).sum()


def _reorder(
    params: dict[str, dict[str, torch.Tensor]],
    order: list[MemberInfo],
    indexed: list[MemberInfo],
) -> dict[str, dict[str, torch.Tensor]]:
    """Stacks in training order -> stacks in member index order within each architecture."""
    result: dict[str, dict[str, torch.Tensor]] = {}
    for arch, stack in params.items():
        in_stack = [m for m in order if m.arch == arch]
        wanted = [m for m in indexed if m.arch == arch]
        rows = [in_stack.index(m) for m in wanted]
        result[arch] = {name: t[rows].contiguous() for name, t in stack.items()}
    return result
