"""The ensemble's spread is the uncertainty users read (P(A worse), quartiles): it must come from
resampling the data, and a sample a member did not draw must not move that member.

`heads.bootstrap` weights every training sample of a member by how often its bootstrap resample
drew it; without it the linear heads' convex objective pulls every seed onto one solution and the
comparison looks falsely certain (train.py's module docstring).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm2loss_pipeline.core.heads import HeadsConfig, train_ensemble
from llm2loss_pipeline.core.heads import train as train_module
from llm2loss_pipeline.core.heads.train import _bootstrap_weights, _ranker_objective
from tests.test_heads import planted

N = 600
FAST = {"n_seeds": 6, "epochs": 10, "min_steps": 400, "batch_size": 128}
# measured on this data (6 seeds, 400 steps): linear regressors 0.18 with resampling against 0.05
# without, linear rankers 0.18 against 0.07, mlp heads about 0.28 against 0.20 (an mlp's random
# initialisation alone already spreads it: its objective is not convex)
WIDER = {("regressor", "linear"): 2.5, ("ranker", "linear"): 2.0}
WIDER |= {("regressor", "mlp"): 1.2, ("ranker", "mlp"): 1.15}


def _pair_spread(ensemble, x: np.ndarray) -> float:
    """Mean over fixed pairs of points of the members' std of h(a) - h(b) (standardised units),
    the spread a `compare` of two inputs reports."""
    scores = ensemble.standardized(x)  # [M, n]
    half = x.shape[0] // 2
    return float((scores[:, :half] - scores[:, half : 2 * half]).std(axis=0).mean())


@pytest.fixture(scope="module")
def spreads():
    x, loss, _ = planted(N, seed=0)
    x_query, *_ = planted(400, seed=1)
    result = {}
    for kind, arch in WIDER:
        for bootstrap in (True, False):
            config = HeadsConfig(kinds=[kind], archs=[arch], bootstrap=bootstrap, **FAST)
            result[kind, arch, bootstrap] = _pair_spread(train_ensemble(x, loss, config), x_query)
    return result


@pytest.mark.parametrize(("kind", "arch"), list(WIDER))
def test_bootstrap_widens_the_members_spread(spreads, kind, arch) -> None:
    with_resampling, seeds_only = spreads[kind, arch, True], spreads[kind, arch, False]
    assert with_resampling > WIDER[kind, arch] * seeds_only, spreads


@pytest.mark.parametrize(("kind", "arch"), list(WIDER))
def test_bootstrap_spread_is_above_a_floor(spreads, kind, arch) -> None:
    # On 600 samples a member's bootstrap replicate moves a head's standardised output difference
    # by more than a tenth of a unit; a spread far below that is a falsely certain answer.
    assert spreads[kind, arch, True] > 0.1, spreads


def test_bootstrap_weights_are_draw_counts() -> None:
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    weights = _bootstrap_weights(generators, 5000, True)
    assert weights.shape == (4, 5000)
    assert (weights.sum(dim=1) == 5000).all()  # n draws with replacement
    unused = (weights == 0).float().mean().item()
    assert unused == pytest.approx(np.exp(-1.0), abs=0.02)  # (1 - 1/n)^n
    assert not torch.equal(weights[0], weights[1])  # each member its own resample
    assert torch.equal(_bootstrap_weights(generators, 7, False), torch.ones(4, 7))


# --- a sample of weight 0 has no effect on either objective --------------------------------------


def test_ranker_objective_ignores_a_zero_weight_sample_on_both_sides_of_its_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    size, k = 12, 4
    out = torch.randn(3, size, generator=gen, requires_grad=True)
    loss = torch.rand(size, generator=gen, dtype=torch.float64)
    weights = torch.randint(1, 3, (3, size), generator=gen).float()
    weights[:, 5] = 0.0
    uniforms = torch.rand(3, size * k, generator=gen)
    objective = _ranker_objective(out, loss, weights, uniforms)
    objective.backward()
    # sample 5 is an anchor of its own pairs and a partner in others': no gradient from either
    assert torch.equal(out.grad[:, 5], torch.zeros(3))
    assert (out.grad[:, [4, 6]].abs() > 0).all()
    changed = loss.clone()
    changed[5] = 100.0  # its loss, hence every target of its pairs, changes
    assert _ranker_objective(out.detach(), changed, weights, uniforms).item() == pytest.approx(
        objective.item(), rel=1e-6
    )
    # ...and with weight 1 the same change does move the objective
    weights[:, 5] = 1.0
    assert _ranker_objective(out.detach(), changed, weights, uniforms).item() != pytest.approx(
        _ranker_objective(out.detach(), loss, weights, uniforms).item(), rel=1e-6
    )


def _train_with_zero_weight(monkeypatch, x, loss, kind: str, column: int, weight: float):
    """Train one kind with the bootstrap weight of fit row `column` forced to `weight`."""

    def forced(generators, n, bootstrap, *rest):
        weights = _bootstrap_weights(generators, n, bootstrap, *rest)  # the same draws
        weights[:, column] = weight
        return weights

    monkeypatch.setattr(train_module, "_bootstrap_weights", forced)
    config = HeadsConfig(kinds=[kind], archs=["linear", "mlp"], n_seeds=2, hidden=16)
    config = config.model_copy(update={"epochs": 3, "min_steps": 0, "batch_size": 64})
    return train_ensemble(x, loss, config)


def _params(ensemble) -> dict[str, np.ndarray]:
    return {
        f"{arch}.{name}": tensor.detach().cpu().numpy()
        for arch, stack in ensemble.params.items()
        for name, tensor in stack.items()
    }


@pytest.mark.parametrize("kind", ["regressor", "ranker"])
def test_a_zero_weight_sample_does_not_move_any_member(monkeypatch, kind) -> None:
    # 200 samples: the holdout would be under 32 rows, so every row is a fit row (row = position)
    x, loss, _ = planted(200, seed=4)
    moved = x.copy()
    moved[17] = -moved[17]  # the sample's embedding changes; its loss (and the target scaler) not
    base = _params(_train_with_zero_weight(monkeypatch, x, loss, kind, 17, 0.0))
    same = _params(_train_with_zero_weight(monkeypatch, moved, loss, kind, 17, 0.0))
    for name in base:
        np.testing.assert_allclose(same[name], base[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # the check can fail: with weight 1 the same change moves every member
    base = _params(_train_with_zero_weight(monkeypatch, x, loss, kind, 17, 1.0))
    other = _params(_train_with_zero_weight(monkeypatch, moved, loss, kind, 17, 1.0))
    for name in ("linear.weight", "mlp.w1"):
        differs = np.abs(other[name] - base[name]).reshape(len(base[name]), -1).max(axis=1)
        assert (differs > 1e-4).all(), name
