"""One training step of the head ensemble: reused buffers vs fresh allocations, side by side.

    python bench/heads_step.py                 # 20 members and one mlp ranker, 15 rounds
    python bench/heads_step.py --rounds 30

Both variants run the training loop's body of `train_ensemble` (gather and scale a mini-batch,
forward, regressor and ranker objectives, backward, fused AdamW) on the same data:
- `fresh`: `FusedParameters.forward` and `zero_grad(set_to_none=True)`, so every step allocates
  its batch-sized temporaries and a new weight gradient (what training did up to 62ce8a4);
- `reused`: `FusedParameters.step_forward`, which writes into buffers kept across steps and into
  the leaves' `.grad` in place (what training does now).
The variants alternate, each keeps its fastest round, and the minor page faults per step are
printed with the times: on glibc the fresh variant's few-MB blocks are returned to the kernel and
faulted in again, in some processes hundreds of pages per step, in others hardly any.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm2loss_pipeline.core.heads import HeadsConfig, MemberInfo, member_grid
from llm2loss_pipeline.core.heads.train import (
    _initial_parameters,
    _ranker_objective,
    member_stream_seed,
)


class Step:
    """The training loop's body for `members`, with fresh or reused memory."""

    def __init__(self, members: list[MemberInfo], config: HeadsConfig, dim: int, reused: bool):
        generators = [torch.Generator().manual_seed(member_stream_seed(m)) for m in members]
        device = torch.device("cpu")
        self.fused, _ = _initial_parameters(members, generators, dim, config.hidden, device)
        self.optimizer = torch.optim.AdamW(
            list(self.fused.leaves().values()), lr=config.lr, fused=True
        )
        self.reg = torch.tensor([r for r, m in enumerate(members) if m.kind == "regressor"])
        self.rank = torch.tensor([r for r, m in enumerate(members) if m.kind == "ranker"])
        self.reused, self.dim, self.k = reused, dim, config.pairs_per_sample

    def run(self, x: torch.Tensor, losses: torch.Tensor, rows: torch.Tensor, draws: torch.Tensor):
        size, scale = rows.shape[0], math.sqrt(self.dim)
        if self.reused:
            batch = self.fused.buffer("x", size, self.dim)
            torch.index_select(x, 0, rows, out=batch).mul_(scale)
            out = self.fused.step_forward(batch)
        else:
            out = self.fused.forward(x.index_select(0, rows).mul_(scale))
        target = losses.index_select(0, rows)
        objective = out.new_zeros(())
        if len(self.reg):
            objective = objective + (out.index_select(0, self.reg) - target).square().mean(1).sum()
        if len(self.rank):
            weights = torch.ones(len(self.rank), size)
            ranker_out = out.index_select(0, self.rank)
            objective = objective + _ranker_objective(ranker_out, target, weights, draws)
        if not self.reused:
            self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compare(label: str, members: list[MemberInfo], args: argparse.Namespace) -> None:
    config = HeadsConfig(batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    x /= x.norm(dim=1, keepdim=True)
    losses = torch.from_numpy(rng.lognormal(size=args.n).astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    variants = {
        name: Step(members, config, args.dim, name == "reused") for name in ("fresh", "reused")
    }
    best = dict.fromkeys(variants, math.inf)
    per_step_faults = dict.fromkeys(variants, 0)
    n_rank = sum(m.kind == "ranker" for m in members)

    def steps(name: str, count: int) -> None:
        for _ in range(count):
            rows = torch.randint(args.n, (args.batch_size,), generator=gen)
            draws = torch.rand(n_rank, args.batch_size * config.pairs_per_sample, generator=gen)
            variants[name].run(x, losses, rows, draws)

    for name in variants:
        steps(name, 20)  # warm-up
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else reversed(list(variants)):
            f0, t0 = faults(), time.perf_counter()
            steps(name, args.steps)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps * 1e3)
            per_step_faults[name] += faults() - f0
    total = args.rounds * args.steps
    print(
        f"{label:14s}: fresh {best['fresh']:7.3f} ms/step ({per_step_faults['fresh'] / total:5.0f} "
        f"faults/step), reused {best['reused']:7.3f} ms/step "
        f"({per_step_faults['reused'] / total:5.0f} faults/step), "
        f"ratio {best['fresh'] / best['reused']:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per variant")
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    args = parser.parse_args()
    grid = member_grid(HeadsConfig())
    print(f"n={args.n} dim={args.dim} batch={args.batch_size} threads={torch.get_num_threads()}")
    compare(f"{len(grid)} members", grid, args)
    one = [m for m in grid if m.arch == "mlp" and m.kind == "ranker"][:1]
    compare("1 mlp ranker", one, args)


if __name__ == "__main__":
    main()
