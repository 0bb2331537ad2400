"""How much one sample moves the heads' estimate h(t) for a text t: closed form and TracIn.

Question answered. The heads learned "inputs like t have a high loss" from samples; a sample z
(embedding x_z, loss l_z) supports that estimate if having z in the heads' training data pushes
h(t) up. Discovery verifies hypotheses on the evaluation split, which the heads never saw, so the
influence of an evaluation sample is "what adding z to the training data would do to h(t)"; for a
training sample it is "what removing z would undo". Both are positive when z pushes towards worse.

Linear heads, closed form. For a ridge / least-squares head f(x) = theta^T phi(x) with
phi(x) = [x, 1], Hessian H = Phi^T Phi + lambda I over the n training inputs and residual
e_z = y_z - f(x_z) (target minus prediction), Sherman-Morrison gives exactly

    remove training sample i:  f(t) - f_{-i}(t) = phi(t)^T H^-1 phi(x_i) e_i / (1 - h_ii)
    add a new sample z:        f_{+z}(t) - f(t) = phi(t)^T H^-1 phi(x_z) e_z / (1 + h_zz)

with leverage h_zz = phi(x_z)^T H^-1 phi(x_z). (Derivation: theta_{-i} = (H - phi_i phi_i^T)^-1
(Phi^T y - phi_i y_i) = theta - H^-1 phi_i e_i / (1 - h_ii); adding is the same with signs
flipped.) Dropping the leverage term gives Koh & Liang's first-order influence
-phi(t)^T H^-1 grad l_z up to the factor 2 of the squared error. The tests check both forms
against retraining. The pipeline's linear regressors are trained by AdamW with weight decay,
not solved exactly; they are treated as the least-squares fit they approximate: H from their
training inputs (damped by `damping` x the mean eigenvalue, which also keeps H invertible when
the dimension exceeds the sample count), e_z from their actual outputs and scaled targets.

Linear rankers minimise BCE(sigma(h_i - h_j), [l_i > l_j]) over pairs. The descent direction of
sample z's own terms is g_z = mean_j r_zj (phi(x_z) - phi(x_j)) with pairwise residual
r_zj = [l_z > l_j] (1/2 for ties) - sigma(h_z - h_j), over reference partners j; the Gauss-Newton
Hessian of the pairwise objective is proportional to the covariance of the inputs, so
H = Xc^T Xc + lambda I on centred training inputs, and influence = t^T H^-1 g_z (first order).

MLP heads, TracIn. No closed form: the influence is TracIn at the final parameters
(Pruthi et al., 2020), the change of h(t) from one gradient step on z's loss,
-grad_theta l_z . grad_theta h(t) (learning rate dropped). With l_z a function of h(x_z), that
is (-dl/dh) K(x_z, t) with the tangent kernel K(x, t) = grad h(x) . grad h(t); for
h(x) = w2 . relu(W1^T x + b1) + b2 it has the closed form
K(x, t) = a(x).a(t) + 1 + (delta(x).delta(t)) (1 + x.t), a = relu activations,
delta = w2 * [pre-activation > 0], so no per-sample gradient is ever materialised.

Pooling over members. Each member's influences are in its own units (scaled loss, logits, one
Hessian or none), so each member's column for a text is divided by its root mean square over the
scored samples before the ensemble mean is taken: the pooled value says how strongly, relative to
the other samples, z pushes the ensemble's estimate for t, and its sign is the direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble


def with_bias(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def ridge_lambda(features: np.ndarray, damping: float) -> float:
    """`damping` times the mean eigenvalue of Phi^T Phi (its trace over its size)."""
    features = np.asarray(features, dtype=np.float64)
    mean_eig = float(np.einsum("ij,ij->", features, features)) / max(features.shape[1], 1)
    return damping * mean_eig if mean_eig > 0 else damping


def hessian_inverse(features: np.ndarray, ridge: float) -> np.ndarray:
    """(Phi^T Phi + ridge I)^-1 for the training features Phi [n, p]."""
    features = np.asarray(features, dtype=np.float64)
    hessian = features.T @ features + ridge * np.eye(features.shape[1])
    return np.linalg.inv(hessian)


def fit_ridge(features: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """theta = (Phi^T Phi + ridge I)^-1 Phi^T y: the head the closed form is exact for."""
    features = np.asarray(features, dtype=np.float64)
    return hessian_inverse(features, ridge) @ (features.T @ np.asarray(targets, dtype=np.float64))


def linear_influence(
    h_inv: np.ndarray,
    sample_features: np.ndarray,
    residuals: np.ndarray,
    text_features: np.ndarray,
    *,
    mode: str = "add",
) -> np.ndarray:
    """Closed-form influence [n, T] of samples on the predictions at texts (module docstring).

    mode: "add" (held-out samples: f_{+z}(t) - f(t)), "remove" (training samples:
    f(t) - f_{-z}(t)) or "first_order" (no leverage term).
    """
    projected, weight = _linear_sample_side(h_inv, sample_features, residuals, mode)
    return (projected @ np.asarray(text_features, dtype=np.float64).T) * weight[:, None]


def _linear_sample_side(
    h_inv: np.ndarray, sample_features: np.ndarray, residuals: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """What `linear_influence` needs of the samples alone: phi H^-1 [n, p] and each sample's
    weight, its residual times the leverage term of `mode` [n]."""
    phi = np.asarray(sample_features, dtype=np.float64)
    projected = phi @ h_inv  # [n, p]
    leverage = np.einsum("np,np->n", projected, phi)
    if mode == "add":
        scale = 1.0 / (1.0 + leverage)
    elif mode == "remove":
        scale = 1.0 / np.maximum(1.0 - leverage, 1e-12)
    elif mode == "first_order":
        scale = np.ones_like(leverage)
    else:
        raise ValueError(f"mode must be add, remove or first_order, got {mode!r}")
    return projected, np.asarray(residuals, dtype=np.float64) * scale


def mlp_tangent_kernel(
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    x: np.ndarray,
    t: np.ndarray,
    *,
    output_bias: bool = True,
) -> np.ndarray:
    """K(x, t) = grad_theta h(x) . grad_theta h(t) [n, T] of one 2-layer MLP (w1 [d, H])."""
    return _TangentSide(w1, b1, w2, x).kernel(t, output_bias=output_bias)


class _TangentSide:
    """One side (the samples) of an MLP's tangent kernel, computed once for many texts."""

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, x: np.ndarray) -> None:
        self.w1, self.b1, self.w2 = w1, b1, w2
        self.x = np.asarray(x, dtype=np.float64)
        pre_x = self.x @ w1 + b1
        self.act_x, self.delta_x = np.maximum(pre_x, 0.0), w2 * (pre_x > 0)

    def kernel(self, t: np.ndarray, *, output_bias: bool = True) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        pre_t = t @ self.w1 + self.b1
        act_t, delta_t = np.maximum(pre_t, 0.0), self.w2 * (pre_t > 0)
        kernel = self.act_x @ act_t.T + (self.delta_x @ delta_t.T) * (1.0 + self.x @ t.T)
        return kernel + 1.0 if output_bias else kernel


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))


def pairwise_residuals(
    out_z: np.ndarray, loss_z: np.ndarray, out_ref: np.ndarray, loss_ref: np.ndarray
) -> np.ndarray:
    """r_zj = [l_z > l_j] (1/2 for ties) - sigma(h_z - h_j): [n, J]."""
    target = (loss_z[:, None] > loss_ref[None, :]) + 0.5 * (loss_z[:, None] == loss_ref[None, :])
    return target - _sigmoid(out_z[:, None] - out_ref[None, :])


@dataclass(frozen=True)
class InfluenceInputs:
    """What the ensemble's influences need, all gap-mapped embeddings (as the heads see them)."""

    train_x: np.ndarray
    """the heads' training inputs [n, d]: the linear heads' Hessian"""
    sample_x: np.ndarray
    """the samples whose influence is wanted [n_s, d] ..."""
    sample_loss: np.ndarray
    """... and their losses [n_s]"""
    ref_x: np.ndarray
    """reference partners of the rankers' pairwise residuals [J, d] ..."""
    ref_loss: np.ndarray
    """... and their losses [J]"""


def member_influences(
    ensemble: HeadEnsemble,
    inputs: InfluenceInputs,
    text_x: np.ndarray,
    *,
    damping: float = 1e-3,
) -> np.ndarray:
    """Influence of every sample on every member's output at every text: [M, n_s, T]."""
    return np.stack([influence(text_x) for influence in each_member(ensemble, inputs, damping)])


def each_member(
    ensemble: HeadEnsemble, inputs: InfluenceInputs, damping: float = 1e-3
) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """Per member, in order: a function from texts [T, d] to the influence [n_s, T] of every
    sample on that member's output at them. What depends on the samples alone (outputs,
    residuals, Hessians, the rankers' pairwise residuals) is computed once per member, when it
    is reached, so that many texts can be taken in chunks at a cost of samples x texts; computed
    again for every chunk, it grew with the square of the samples (the chunks shrink as the
    samples grow; bench/RESULTS.md, "A CelebA-sized run"). One member's state is alive at a
    time."""
    sample_x = np.asarray(inputs.sample_x, dtype=np.float64)
    ref_x = np.asarray(inputs.ref_x, dtype=np.float64)
    out_s = ensemble.predict(inputs.sample_x).astype(np.float64)
    out_r = ensemble.predict(inputs.ref_x).astype(np.float64)
    targets = ensemble.scaler.transform(inputs.sample_loss).astype(np.float64)
    ref_loss = np.asarray(inputs.ref_loss, dtype=np.float64)
    sample_loss = np.asarray(inputs.sample_loss, dtype=np.float64)

    regressor_inv = ranker_inv = None
    if any(m.arch == "linear" for m in ensemble.members):
        phi = with_bias(inputs.train_x)
        regressor_inv = hessian_inverse(phi, ridge_lambda(phi, damping))
        centred = np.asarray(inputs.train_x, dtype=np.float64)
        centred = centred - centred.mean(axis=0)
        ranker_inv = hessian_inverse(centred, ridge_lambda(centred, damping))
    sample_phi = with_bias(sample_x)

    for member in ensemble.members:
        m = member.index
        row = ensemble.rows[member.arch].index(m)
        params = {
            k: v[row].detach().cpu().double().numpy()
            for k, v in ensemble.params[member.arch].items()
        }
        if member.kind == "regressor":
            residual = targets - out_s[m]
            if member.arch == "linear":
                # linear_influence's "add" form, its sample side once
                projected, weight = _linear_sample_side(regressor_inv, sample_phi, residual, "add")
                yield lambda t, p=projected, w=weight: (p @ with_bias(t).T) * w[:, None]
            else:
                side = _TangentSide(params["w1"], params["b1"], params["w2"], sample_x)
                yield lambda t, k=side, r=residual: k.kernel(t) * r[:, None]
            continue
        pair = pairwise_residuals(out_s[m], sample_loss, out_r[m], ref_loss)  # [n_s, J]
        mean_r = pair.mean(axis=1)
        if member.arch == "linear":
            own_x, partner_x = sample_x @ ranker_inv, ref_x @ ranker_inv

            def ranker(t, own_x=own_x, partner_x=partner_x, pair=pair, mean_r=mean_r):
                t = np.asarray(t, dtype=np.float64)
                own, partner = own_x @ t.T, partner_x @ t.T
                return own * mean_r[:, None] - (pair @ partner) / pair.shape[1]

        else:
            w1, b1, w2 = params["w1"], params["b1"], params["w2"]
            own_side, partner_side = (
                _TangentSide(w1, b1, w2, sample_x),
                _TangentSide(w1, b1, w2, ref_x),
            )

            def ranker(t, own_side=own_side, partner_side=partner_side, pair=pair, mean_r=mean_r):
                own = own_side.kernel(t, output_bias=False)
                partner = partner_side.kernel(t, output_bias=False)
                return own * mean_r[:, None] - (pair @ partner) / pair.shape[1]

        yield ranker


def unit_rms(influence: np.ndarray) -> np.ndarray:
    """One member's [n, T]: each column (a text) scaled to unit root mean square over samples."""
    rms = np.sqrt(np.mean(np.square(influence), axis=0, keepdims=True))
    return influence / np.where(rms > 0, rms, 1.0)


def pool_members(influences: np.ndarray) -> np.ndarray:
    """[M, n, T] -> [n, T]: each member's column scaled to unit RMS over samples, then averaged."""
    return np.mean([unit_rms(member) for member in influences], axis=0)
