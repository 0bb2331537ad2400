"""Training every member of the head ensemble as one batched computation.

All members live in a few shared tensors and one AdamW optimiser steps them together. Every step
draws one mini-batch [B, d] that all members share, so the first layer of every member, linear and
mlp alike, is one GEMM ([B, d] x [d, L + K*H], `fused.AllMembers`) and its weight gradient another,
rather than 2M small ones: the mini-batch is gathered once, the per-step cost of dispatch, autograd
and the optimiser is paid once rather than M times, and on CPUs where a [256, 512] x [512, 128]
product runs below the FLOP rate of one ten times wider, the products themselves are faster.
Members share tensors but no parameter: the summed objective has a block-diagonal gradient, and
AdamW and weight decay act element-wise, so each member follows the trajectory it would follow
alone; the tests check that training a member inside the batch equals training it alone with the
same seed, up to float rounding (a GEMM over a different number of members may round
differently, Adam can amplify that in weights whose gradient is near zero, and a near-tie on the
holdout can then pick another epoch; on a fixed configuration and data, results are bit-for-bit
reproducible).

What members share and what they do not. The data order of every epoch comes from one generator
seeded from `base_seed` alone, so it does not depend on which members train. Everything that makes
members differ comes from each member's own generator, seeded from (seed, kind, arch):
initialisation, the bootstrap resample (`bootstrap`: each member weights every training sample by
how often it was drawn in n draws with replacement, i.e. trains on its own bootstrap replicate of
the split; about 37% of samples get weight 0) and, for rankers, the pair partners. The bootstrap is
what makes the ensemble's spread reflect how much the answer depends on which samples were seen,
not only on the random initialisation (Lakshminarayanan et al. 2017 note that seeds alone suffice
for deep nets; for the linear heads, whose objective is convex, seeds alone would collapse members
onto one solution and report a falsely certain answer).

Objectives (paper eq. 1-4), each member's terms weighted by its bootstrap counts w:
- regressor: mean over the batch of w_i (h(x_i) - t_i)^2 with t the scaled loss (scaling.py);
- ranker: for each sample i of a batch, `pairs_per_sample` partners j drawn from the same batch
  (j != i; batches are random subsets, so these are random pairs of the split);
  w_i w_j BCE(sigmoid(h(x_i) - h(x_j)), [l_i > l_j]), with target 1/2 for tied losses so that
  tied samples are pulled to equal scores rather than skipped. The objective only sees differences
  of outputs, so a ranker's output bias has no gradient; it is held at 0 (otherwise rounding
  residues of a zero gradient, normalised by Adam, would make it drift by up to lr per step).

Schedule and selection: AdamW with a cosine decay of the learning rate to 0 over all steps; a
fixed 10% of the training split (`holdout_fraction`) is held back, and after every epoch each
member's Spearman on it decides whether that member's parameters are kept (early stopping per
member, applied by masked copies so members stay independent). Linear heads typically keep a late
epoch, mlp heads an early one.

Inputs are scaled by sqrt(d) during training so that coordinates of unit-norm embeddings have unit
variance (Adam's step size is per coordinate); the factor is folded into the first layer afterwards,
so the finished heads take the unit-norm embeddings directly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.heads.config import ARCHS, KINDS, HeadsConfig
from llm2loss_pipeline.core.heads.ensemble import (
    HeadEnsemble,
    MemberInfo,
    forward_in_chunks,
    member_grid,
)
from llm2loss_pipeline.core.heads.fused import FusedParameters
from llm2loss_pipeline.core.heads.scaling import check_losses, fit_transform

Progress = Callable[[int, int], None]
OUTPUT_BIAS = {"linear": "bias", "mlp": "b2"}
MIN_HOLDOUT = 32
HOLDOUT_SEED = 0x11E55
ORDER_SEED = 0x0DE5
STATS_SEED = 0x57A7
STATS_ROWS = 1 << 15
CHECK_ROWS = 1 << 13


def member_stream_seed(member: MemberInfo) -> int:
    """The seed of a member's private generator: a stable hash of (seed, kind, arch)."""
    digest = hashlib.sha256(f"{member.seed}:{member.kind}:{member.arch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_embeddings(embeddings: Any, what: str = "embeddings") -> np.ndarray:
    # C order (a copy only if the caller's array is strided differently): torch cannot view an
    # array with negative strides, such as x[::-1].
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {array.shape}")
    # In blocks, so that the check's boolean temporary stays small (a whole 200,000 x 512 array
    # would need 100 MB for it).
    for start in range(0, array.shape[0], CHECK_ROWS):
        finite = np.isfinite(array[start : start + CHECK_ROWS]).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{what}: row {row} contains NaN or inf")
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


def holdout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, holdout rows) of the training split; the holdout is empty when it would be tiny.

    The split depends only on n and the fraction (a fixed generator), so every member, whatever its
    seed, fits on the same rows and is selected on the same rows.
    """
    n_holdout = round(n * fraction)
    if n_holdout < MIN_HOLDOUT or n - n_holdout < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def standardization_rows(n: int) -> slice | np.ndarray:
    """The training rows whose outputs give each member's standardisation mean and std.

    All of them up to STATS_ROWS, beyond that a fixed random subset (it depends on n alone): the
    std's relative standard error is then under 0.4%, and the pass over the rest, which at 200,000
    rows took a fifth of the whole training time, is skipped.
    """
    if n <= STATS_ROWS:
        return slice(None)
    return np.sort(np.random.default_rng(STATS_SEED).choice(n, STATS_ROWS, replace=False))


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """The [start, stop) of each mini-batch of an epoch over n samples.

    A lone last sample joins the batch before it: it would give the rankers no pair, so a ranker
    trained alone could not step on it while one trained beside regressors would (Adam moving it
    on momentum and weight decay alone), and the two would no longer be the same member.
    """
    stops = [*range(batch, n, batch), n]
    if len(stops) > 1 and stops[-1] - stops[-2] == 1:
        del stops[-2]
    return list(zip([0, *stops[:-1]], stops, strict=True))


def _check_members(members: list[MemberInfo]) -> None:
    for member in members:
        one_of(f"member {member}: kind", member.kind, KINDS)
        one_of(f"member {member}: arch", member.arch, ARCHS)


def train_ensemble(
    embeddings: np.ndarray,
    losses: np.ndarray,
    config: HeadsConfig,
    progress: Progress | None = None,
    *,
    device: str | torch.device = "cpu",
    members: list[MemberInfo] | None = None,
    groups: np.ndarray | None = None,
) -> HeadEnsemble:
    """Train all members of `config` on (embeddings [n, d], losses [n]); see the module docstring.

    `groups` (one identity per sample) makes each member's bootstrap resample whole groups: the
    images of one identity share its traits, so resampling them one by one would make the
    members agree more than the data allow.

    `embeddings` are the gap-mapped image embeddings (`gap.image(...)`). `progress(done, total)`
    is called after every epoch (`config.effective_epochs(n)` of them). `members` restricts
    training to some members of the grid (used to show that a member trained alone equals the
    same member trained in the batch).
    """
    run = _Run.setup(embeddings, losses, config, torch.device(device), members, groups)
    for epoch in range(run.epochs):
        _train_epoch(run, config, epoch)
        run.selector.update(epoch + 1)
        if progress is not None:
            progress(epoch + 1, run.epochs)
    return _finish(run, config)


@dataclass
class _Run:
    """One training run's fixed state (data on the device, parameters, optimiser, schedule)."""

    x_np: np.ndarray
    scaler: Any
    order: list[MemberInfo]
    generators: list[torch.Generator]
    fused: FusedParameters
    frozen_bias: dict[str, torch.Tensor]
    leaves: dict[str, torch.Tensor]
    reg_rows: torch.Tensor
    rank_rows: list[int]
    rank_rows_t: torch.Tensor
    x: torch.Tensor
    scale: float
    fit_rows: torch.Tensor
    holdout_np: np.ndarray
    targets_fit: torch.Tensor
    raw_fit: torch.Tensor
    selector: _Selector
    optimizer: torch.optim.Optimizer
    weights: torch.Tensor
    order_generator: torch.Generator
    epochs: int
    bounds: list[tuple[int, int]]
    step: int = 0

    @property
    def n_fit(self) -> int:
        return int(self.fit_rows.shape[0])

    @property
    def total_steps(self) -> int:
        return self.epochs * len(self.bounds)

    @classmethod
    def setup(
        cls,
        embeddings: np.ndarray,
        losses: np.ndarray,
        config: HeadsConfig,
        device: torch.device,
        members: list[MemberInfo] | None,
        groups: np.ndarray | None,
    ) -> _Run:
        x_np = check_embeddings(embeddings)
        l_np = check_losses(losses)
        if l_np.shape[0] != x_np.shape[0]:
            raise ValueError(
                f"{x_np.shape[0]} embeddings but {l_np.shape[0]} losses: they must be the same "
                "samples"
            )
        n, dim = x_np.shape
        if n < 2:
            raise ValueError(f"need at least 2 training samples, got {n}")
        scaler, targets_np = fit_transform(l_np, config.target_scaling)
        chosen = list(members) if members is not None else member_grid(config)
        if not chosen:
            raise ValueError("no members to train: `members` is empty")
        _check_members(chosen)
        order = [m for arch in ARCHS for m in chosen if m.arch == arch]  # stacks: contiguous rows
        # the order of every draw from these generators is part of each member's seed stream
        generators = [torch.Generator().manual_seed(member_stream_seed(m)) for m in order]
        fused, frozen_bias = _initial_parameters(order, generators, dim, config.hidden, device)
        arch_counts = [(arch, sum(m.arch == arch for m in order)) for arch in ARCHS]
        reg_rows = [r for r, m in enumerate(order) if m.kind == "regressor"]
        rank_rows = [r for r, m in enumerate(order) if m.kind == "ranker"]
        # The embeddings are neither copied nor scaled up front (at 200,000 x 512 that was two
        # passes of 400 MB and 0.4 s per call): each mini-batch is gathered and scaled in place.
        x = torch.from_numpy(x_np).to(device)
        targets = torch.from_numpy(targets_np).to(device)
        # float64: the rankers only compare losses, and float32 would tie losses that differ.
        raw = torch.tensor(l_np, dtype=torch.float64, device=device)
        fit_np, holdout_np = holdout_split(n, config.holdout_fraction)
        fit_rows = torch.from_numpy(fit_np).to(device)
        selector = _Selector(
            x, math.sqrt(dim), l_np, holdout_np, arch_counts, fused.views(), device
        )
        leaves = fused.leaves()
        optimizer = torch.optim.AdamW(
            list(leaves.values()), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        group_index = _group_index(groups, n, fit_np)
        weights = _bootstrap_weights(generators, len(fit_np), config.bootstrap, group_index)
        return cls(
            x_np=x_np,
            scaler=scaler,
            reg_rows=torch.tensor(reg_rows, device=device),
            order=order,
            generators=generators,
            scale=math.sqrt(dim),
            fused=fused,
            frozen_bias=frozen_bias,
            targets_fit=targets[fit_rows],
            leaves=leaves,
            rank_rows=rank_rows,
            rank_rows_t=torch.tensor(rank_rows, device=device),
            x=x,
            fit_rows=fit_rows,
            raw_fit=raw[fit_rows],
            holdout_np=holdout_np,
            selector=selector,
            weights=weights.to(device),
            optimizer=optimizer,
            order_generator=torch.Generator().manual_seed(ORDER_SEED + config.base_seed),
            epochs=config.effective_epochs(len(fit_np)),
            bounds=batch_bounds(len(fit_np), config.batch_size),
        )


def _train_epoch(run: _Run, config: HeadsConfig, epoch: int) -> None:
    """One pass over the fit rows in this epoch's order, every member stepping on each batch."""
    n_fit, k, dim = run.n_fit, config.pairs_per_sample, run.x.shape[1]
    device = run.x.device
    perm = torch.randperm(n_fit, generator=run.order_generator).to(device)  # positions in fit
    perm_rows = run.fit_rows.index_select(0, perm)  # the same samples as rows of x
    partners = None
    if run.rank_rows:
        draws = [torch.rand(n_fit * k, generator=run.generators[r]) for r in run.rank_rows]
        partners = torch.stack(draws).to(device)
    for start, stop in run.bounds:
        pos = perm[start:stop]
        # index_select rather than advanced indexing: 5x faster for these row gathers.
        xb = run.fused.buffer("x", pos.shape[0], dim)
        torch.index_select(run.x, 0, perm_rows[start:stop], out=xb).mul_(run.scale)
        out = run.fused.step_forward(xb)  # [M, B]
        w = run.weights.index_select(1, pos)
        objective = out.new_zeros(())
        if len(run.reg_rows):
            err = out.index_select(0, run.reg_rows) - run.targets_fit.index_select(0, pos)
            objective = objective + (w.index_select(0, run.reg_rows) * err.square()).mean(1).sum()
        if partners is not None:
            objective = objective + _ranker_objective(
                out.index_select(0, run.rank_rows_t),
                run.raw_fit.index_select(0, pos),
                w.index_select(0, run.rank_rows_t),
                partners[:, start * k : stop * k],
            )
        cosine = 0.5 * (1.0 + math.cos(math.pi * run.step / run.total_steps))
        for group in run.optimizer.param_groups:  # cosine decay, the same for every member
            group["lr"] = config.lr * cosine
        run.step += 1
        objective.backward()  # overwrites every leaf's .grad (FusedParameters.step_forward)
        for name, rows in run.frozen_bias.items():
            run.leaves[name].grad.index_fill_(0, rows, 0.0)
        run.optimizer.step()


def _finish(run: _Run, config: HeadsConfig) -> HeadEnsemble:
    """Each member's best epoch, the sqrt(d) scale folded in, members back in index order, and
    the output standardisation measured on the training embeddings."""
    dim = run.x_np.shape[1]
    selector, order = run.selector, run.order
    best = selector.best_params()
    with torch.no_grad():
        for arch, stack in best.items():
            stack["weight" if arch == "linear" else "w1"].mul_(math.sqrt(dim))
    indexed = sorted(order, key=lambda m: m.index)
    renumbered = [MemberInfo(i, m.kind, m.arch, m.seed) for i, m in enumerate(indexed)]
    position = [order.index(m) for m in indexed]
    training = {
        "epochs": run.epochs,
        "steps": run.total_steps,
        "n_fit": run.n_fit,
        "n_holdout": len(run.holdout_np),
        "best_epoch": [int(selector.best_epoch[p]) for p in position],
        "holdout_spearman": [
            None if np.isnan(selector.best_score[p]) else float(selector.best_score[p])
            for p in position
        ],
    }
    ensemble = HeadEnsemble(
        renumbered,
        _reorder(best, order, indexed),
        np.zeros(len(order)),
        np.ones(len(order)),
        run.scaler,
        config,
        dim,
        training=training,
    )
    outputs = ensemble.predict(run.x_np[standardization_rows(len(run.x_np))]).astype(np.float64)
    std = outputs.std(axis=1)
    ensemble.out_mean = outputs.mean(axis=1)
    ensemble.out_std = np.where(std > 0.0, std, 1.0)  # a constant member stays constant
    return ensemble


def _initial_parameters(
    order: list[MemberInfo],
    generators: list[torch.Generator],
    dim: int,
    hidden: int,
    device: torch.device,
) -> tuple[FusedParameters, dict[str, torch.Tensor]]:
    """Every member's initial parameters, and per leaf the rows of ranker output biases (held 0)."""
    stacks: dict[str, dict[str, torch.Tensor]] = {}
    frozen_bias: dict[str, torch.Tensor] = {}
    for arch in ARCHS:
        of_arch = [(m, g) for m, g in zip(order, generators, strict=True) if m.arch == arch]
        if not of_arch:
            continue
        inits = []
        for m, g in of_arch:
            init = _init_member(arch, dim, hidden, g)
            if m.kind == "ranker":
                init[OUTPUT_BIAS[arch]] = torch.zeros(())
            inits.append(init)
        stacks[arch] = {name: torch.stack([p[name] for p in inits]) for name in inits[0]}
        rankers = [row for row, (m, _) in enumerate(of_arch) if m.kind == "ranker"]
        if rankers:
            # Linear members come first in the fused bias, so a linear row is its own position.
            frozen_bias[OUTPUT_BIAS[arch]] = torch.tensor(rankers, device=device)
    return FusedParameters(stacks, device), frozen_bias


class _Selector:
    """Early stopping per member: keep each member's parameters from its best holdout epoch.

    The score is the Spearman correlation between the member's output and the loss on the holdout
    rows, the quantity the heads are judged by; ties keep the earlier epoch. Without a holdout, or
    with one whose losses are all tied, the last epoch is kept.
    """

    def __init__(
        self,
        x: torch.Tensor,
        scale: float,
        losses: np.ndarray,
        holdout: np.ndarray,
        arch_counts: list[tuple[str, int]],
        params: dict[str, dict[str, torch.Tensor]],
        device: torch.device,
    ) -> None:
        # lazy: scipy.stats (+570 modules, 1.3 s of the definitions' load) for early stopping
        from scipy.stats import rankdata

        self.params = params
        self.device = device
        self.arch_counts = arch_counts
        members = sum(count for _, count in arch_counts)
        self.best_score = np.full(members, np.nan)
        self.best_epoch = np.zeros(members, dtype=int)
        self.best = {
            arch: {n: t.detach().clone() for n, t in s.items()} for arch, s in params.items()
        }
        ranks = rankdata(losses[holdout]) - (len(holdout) + 1) / 2.0
        norm = float(np.linalg.norm(ranks))
        # A holdout whose losses are all tied scores every epoch 0, and ties keep the earliest:
        # training would silently stop after one epoch. Without a spread it selects nothing.
        self.x = x[torch.from_numpy(holdout).to(device)].mul_(scale) if norm > 0 else None
        self.loss_ranks = ranks / norm if norm > 0 else ranks

    @torch.no_grad()
    def update(self, epoch: int) -> None:
        if self.x is None:
            self.best = {
                a: {n: t.detach().clone() for n, t in s.items()} for a, s in self.params.items()
            }
            self.best_epoch[:] = epoch
            return
        scores = []
        for arch, count in self.arch_counts:
            if count:
                scores.append(forward_in_chunks(arch, self.params[arch], self.x))
        # lazy: scipy.stats (+570 modules, 1.3 s of the definitions' load) for early stopping
        from scipy.stats import rankdata

        out = torch.cat(scores).double().cpu().numpy()  # [M, h]
        # Average ranks: tied outputs (a narrow mlp's relu zeros) share a rank, as in Spearman's
        # definition; ordinal ranks broke ties by position and biased the score.
        ranks = rankdata(out, axis=1)
        ranks -= ranks.mean(axis=1, keepdims=True)
        spearman = (ranks @ self.loss_ranks) / np.linalg.norm(ranks, axis=1).clip(1e-12)
        score = np.where(out.std(axis=1) > 0, spearman, -1.0)
        improved = ~(score <= self.best_score)  # NaN (no score yet) counts as improved
        self.best_score = np.where(improved, score, self.best_score)
        self.best_epoch = np.where(improved, epoch, self.best_epoch)
        row = 0
        for arch, count in self.arch_counts:
            if count:
                mask = torch.from_numpy(improved[row : row + count]).to(self.device)
                for name, tensor in self.params[arch].items():
                    self.best[arch][name][mask] = tensor.detach()[mask]
                row += count

    def best_params(self) -> dict[str, dict[str, torch.Tensor]]:
        return {arch: {n: t.clone() for n, t in s.items()} for arch, s in self.best.items()}


def _ranker_objective(
    out: torch.Tensor, loss: torch.Tensor, weights: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Summed over members: mean over each member's pairs (i, j) of w_i w_j BCE.

    out [R, B] are the rankers' outputs on the shared batch, loss [B] its losses, weights [R, B]
    each ranker's bootstrap counts, uniforms [R, B*k] each ranker's draws of partners.
    """
    size = out.shape[1]
    k = uniforms.shape[1] // size
    anchor = torch.arange(size, device=out.device).repeat(k)
    offset = 1 + torch.floor(uniforms * (size - 1)).long().clamp_(max=size - 2)
    partner = (anchor + offset) % size
    logit = out.index_select(1, anchor) - out.gather(1, partner)
    li, lj = loss.index_select(0, anchor), loss[partner]
    target = (li > lj).float() + 0.5 * (li == lj).float()
    pair_weight = weights.index_select(1, anchor) * weights.gather(1, partner)
    bce = F.binary_cross_entropy_with_logits(logit, target.expand_as(logit), reduction="none")
    return (pair_weight * bce).mean(dim=1).sum()


def _group_index(groups: np.ndarray | None, n: int, fit_rows: np.ndarray) -> torch.Tensor | None:
    """[n_fit] int64: each fitted sample's group as 0 .. G-1 (None: every sample its own)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}; expected one group per sample ({n})")
    _, index = np.unique(groups[fit_rows], return_inverse=True)
    return torch.from_numpy(index.astype(np.int64))


def _bootstrap_weights(
    generators: list[torch.Generator],
    n: int,
    bootstrap: bool,
    group_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, n] float32: each member's draw counts of a bootstrap resample, or all ones.

    With `group_index`, G groups are drawn with replacement and every sample weighs its group's
    count (a cluster bootstrap); without, the n samples are drawn.
    """
    if not bootstrap:
        return torch.ones(len(generators), n)
    if group_index is None:
        return torch.stack(
            [
                torch.bincount(torch.randint(n, (n,), generator=g), minlength=n).float()
                for g in generators
            ]
        )
    n_groups = int(group_index.max()) + 1
    counts = torch.stack(
        [
            torch.bincount(torch.randint(n_groups, (n_groups,), generator=g), minlength=n_groups)
            for g in generators
        ]
    ).float()
    weights = counts[:, group_index]
    # a resample that drew only groups outside this split's fit rows cannot happen (the groups
    # are those of the fit rows), but one that leaves a member no weight would train nothing
    empty = weights.sum(dim=1) == 0
    weights[empty] = 1.0
    return weights


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
