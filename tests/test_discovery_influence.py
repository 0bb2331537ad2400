"""The influence of a sample on a head's estimate at a text: closed forms against retraining."""

from __future__ import annotations

import numpy as np
import pytest

from llm2loss_pipeline.core.discovery.influence import (
    fit_ridge,
    hessian_inverse,
    linear_influence,
    mlp_tangent_kernel,
    pool_members,
    with_bias,
)


@pytest.fixture()
def problem():
    rng = np.random.default_rng(3)
    n, d = 40, 5
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 + rng.normal(scale=0.7, size=n)
    texts = rng.normal(size=(3, d))
    return x, y, texts


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_leave_one_out_closed_form_equals_retraining(problem, ridge) -> None:
    x, y, texts = problem
    phi, phi_t = with_bias(x), with_bias(texts)
    theta = fit_ridge(phi, y, ridge)
    residual = y - phi @ theta
    closed = linear_influence(hessian_inverse(phi, ridge), phi, residual, phi_t, mode="remove")
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        theta_minus = fit_ridge(phi[keep], y[keep], ridge)
        brute = phi_t @ theta - phi_t @ theta_minus  # f(t) - f_{-i}(t)
        np.testing.assert_allclose(closed[i], brute, rtol=1e-8, atol=1e-10)


def test_add_one_closed_form_equals_retraining(problem) -> None:
    x, y, texts = problem
    ridge = 0.3
    phi, phi_t = with_bias(x[:30]), with_bias(texts)
    theta = fit_ridge(phi, y[:30], ridge)
    new_phi, new_y = with_bias(x[30:]), y[30:]
    residual = new_y - new_phi @ theta
    closed = linear_influence(hessian_inverse(phi, ridge), new_phi, residual, phi_t, mode="add")
    for k in range(len(new_y)):
        theta_plus = fit_ridge(
            np.vstack([phi, new_phi[k : k + 1]]), np.append(y[:30], new_y[k]), ridge
        )
        np.testing.assert_allclose(closed[k], phi_t @ theta_plus - phi_t @ theta, rtol=1e-8)


def test_first_order_form_has_the_sign_and_size_of_the_exact_one(problem) -> None:
    x, y, texts = problem
    phi, phi_t = with_bias(x), with_bias(texts)
    h_inv = hessian_inverse(phi, 0.1)
    residual = y - phi @ fit_ridge(phi, y, 0.1)
    exact = linear_influence(h_inv, phi, residual, phi_t, mode="remove")
    first = linear_influence(h_inv, phi, residual, phi_t, mode="first_order")
    assert np.mean(np.sign(exact) == np.sign(first)) == 1.0
    assert np.corrcoef(exact.ravel(), first.ravel())[0, 1] > 0.95


def test_mlp_tangent_kernel_is_the_dot_product_of_parameter_gradients() -> None:
    import torch

    rng = np.random.default_rng(0)
    d, hidden = 4, 6
    w1, b1, w2 = rng.normal(size=(d, hidden)), rng.normal(size=hidden), rng.normal(size=hidden)
    b2 = 0.3
    points = rng.normal(size=(5, d))

    def grad(point: np.ndarray) -> np.ndarray:
        params = [torch.tensor(p, requires_grad=True) for p in (w1, b1, w2, np.array(b2))]
        out = torch.relu(torch.tensor(point) @ params[0] + params[1]) @ params[2] + params[3]
        out.backward()
        return np.concatenate([p.grad.numpy().ravel() for p in params])

    grads = np.stack([grad(p) for p in points])
    kernel = mlp_tangent_kernel(w1, b1, w2, points[:3], points[3:])
    np.testing.assert_allclose(kernel, grads[:3] @ grads[3:].T, rtol=1e-10)
    no_bias = mlp_tangent_kernel(w1, b1, w2, points[:3], points[3:], output_bias=False)
    np.testing.assert_allclose(no_bias, kernel - 1.0)


def test_pooling_is_invariant_to_each_members_scale() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 10, 2))
    scaled = values * np.array([1.0, 100.0, 0.01])[:, None, None]
    np.testing.assert_allclose(pool_members(values), pool_members(scaled))
