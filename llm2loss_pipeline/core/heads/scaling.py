"""How the regressor's target is made from a heavy-tailed per-sample loss.

Cross-entropy losses of a classifier are heavy-tailed: most samples sit near zero and a few
misclassified ones are tens of times larger. A regressor trained with MSE on the raw loss spends its
capacity on those few samples, so the ordering of the bulk (which is what a disparity between groups
is made of) is learnt badly. Three choices, each standardised to mean 0 / std 1 with statistics
fitted on the training split and stored so the transform can be described and inverted:

- raw:   (l - mean) / std
- log1p: (log1p(l) - mean) / std
- rank:  the empirical CDF of the training losses, mapped to a standardised uniform
         ((u - 1/2) * sqrt(12)); new losses go through the stored quantiles (513 of them).

Measured (`python bench/heads_training.py --compare-scaling --threads 1`; regressor members only,
linear and mlp, 5 seeds each, default optimiser settings (10 epochs, lr 1e-2 cosine, 10% holdout),
train 20,000 / held-out 20,000 samples, d=64; mean held-out Spearman of the 10 members against the
actual loss; oracle = Spearman of the noiseless planted score z against the same noisy losses,
about the best a head can do):

  planted loss                                      raw     log1p   rank    oracle
  exp:       l = exp(2.5 z) * LogNormal(0, 0.5)     0.794   0.972   0.978   0.979
  exp_noisy: l = exp(z) * LogNormal(0, 1)           0.640   0.675   0.678   0.688
  ce:        l = softplus(-(1 - 2 z + N(0, 1)))     0.868   0.879   0.882   0.887
  (z = <x, w> * sqrt(d): x uniform on the unit sphere, w a hidden unit direction)

Rank scaling is best on all three (within 0.01 of the oracle), slightly ahead of log1p and far ahead
of raw on the heavy tail, and it needs no assumption about the loss's range (log1p needs l > -1),
so it is the default. The ranker does not use these targets at all: its pairs compare raw losses,
which any monotone scaling leaves unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.heads.config import TARGET_SCALINGS

N_QUANTILES = 513
_UNIFORM_STD = 1.0 / math.sqrt(12.0)


def check_losses(losses: Any, what: str = "losses") -> np.ndarray:
    """A 1-D float64 copy of `losses`, with an error naming the first non-finite sample."""
    array = np.asarray(losses, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D array of per-sample losses, got shape {array.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{what}: sample {int(bad[0])} has loss {float(array[bad[0]])} "
            f"({bad.size} non-finite values in all); losses must be finite"
        )
    return array


@dataclass(frozen=True)
class TargetScaler:
    """A fitted target transform; `to_dict`/`from_dict` store it in a checkpoint sidecar."""

    kind: str
    center: float
    scale: float
    quantiles: tuple[float, ...] = field(default=(), repr=False)

    def _pre(self, losses: np.ndarray) -> np.ndarray:
        if self.kind == "raw":
            return losses
        if self.kind == "log1p":
            low = np.flatnonzero(losses <= -1.0)
            if low.size:
                raise ValueError(
                    f"log1p target scaling: sample {int(low[0])} has loss {float(losses[low[0]])} "
                    "<= -1; use target_scaling rank or raw for losses that can be that negative"
                )
            return np.log1p(losses)
        probs = np.linspace(0.0, 1.0, len(self.quantiles))
        return np.interp(losses, np.asarray(self.quantiles), probs)

    def transform(self, losses: Any) -> np.ndarray:
        """Targets in standardised units for losses not seen at fit time (float32)."""
        pre = self._pre(check_losses(losses))
        return ((pre - self.center) / self.scale).astype(np.float32)

    def inverse(self, targets: Any) -> np.ndarray:
        """Losses back from standardised targets (rank: through the stored quantiles)."""
        pre = np.asarray(targets, dtype=np.float64) * self.scale + self.center
        if self.kind == "raw":
            return pre
        if self.kind == "log1p":
            return np.expm1(pre)
        probs = np.linspace(0.0, 1.0, len(self.quantiles))
        return np.interp(np.clip(pre, 0.0, 1.0), probs, np.asarray(self.quantiles))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "center": self.center,
            "scale": self.scale,
            "quantiles": list(self.quantiles),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetScaler:
        try:
            kind = str(data["kind"])
            scaler = cls(
                kind=kind,
                center=float(data["center"]),
                scale=float(data["scale"]),
                quantiles=tuple(float(q) for q in data.get("quantiles", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"target scaling record is malformed ({exc!r}): {data!r}") from exc
        one_of("target scaling kind", kind, TARGET_SCALINGS)
        if kind == "rank" and len(scaler.quantiles) < 2:
            raise ValueError("rank target scaling record has no quantiles")
        return scaler


def _average_ranks(values: np.ndarray) -> np.ndarray:
    # lazy: scipy.stats (+570 modules, 1.3 s of the definitions' load) for one function
    from scipy.stats import rankdata

    return rankdata(values, method="average")


def fit_transform(losses: Any, kind: str) -> tuple[TargetScaler, np.ndarray]:
    """Fit the scaling on the training losses; return it and their standardised targets (float32).

    For `rank` the training targets use exact average ranks (ties share a rank), not the quantile
    grid, so a training set's ordering is kept exactly.
    """
    one_of("target_scaling", kind, TARGET_SCALINGS)
    array = check_losses(losses)
    if array.size < 2:
        raise ValueError(
            f"need at least 2 training losses to fit a target scaling, got {array.size}"
        )
    if np.all(array == array[0]):
        raise ValueError(
            f"all {array.size} training losses equal {float(array[0])}: there is nothing for the "
            "heads to learn (is the loss table from a degenerate model?)"
        )
    if kind == "rank":
        quantiles = tuple(float(q) for q in np.quantile(array, np.linspace(0, 1, N_QUANTILES)))
        uniform = (_average_ranks(array) - 0.5) / array.size
        scaler = TargetScaler("rank", center=0.5, scale=_UNIFORM_STD, quantiles=quantiles)
        return scaler, ((uniform - 0.5) / _UNIFORM_STD).astype(np.float32)
    pre = TargetScaler(kind, 0.0, 1.0)._pre(array)
    # Moments of pre / max|pre|: those of pre itself overflow for raw losses near 1e155 (the
    # squares pass 1e308, the std became inf and every target 0) and underflow near 1e-160.
    peak = float(np.abs(pre).max())
    unit = pre / peak
    unit_center, unit_scale = float(unit.mean()), float(unit.std())
    center, scale = unit_center * peak, unit_scale * peak
    if not (unit_scale > 0.0 and 0.0 < scale < np.inf):
        raise ValueError(
            f"{kind} target scaling: the scaled training losses have a spread of {scale} "
            f"(their largest magnitude is {peak}), which float64 cannot standardise"
        )
    scaler = TargetScaler(kind, center=center, scale=scale)
    return scaler, ((unit - unit_center) / unit_scale).astype(np.float32)
