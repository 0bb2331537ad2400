"""Calibrated claims: from the heads' estimate of an attribute to a gap in loss units, with the
error the text side adds, learned on the labelled attributes themselves.

An estimate e (the ensemble mean of a grounded or direct estimate, in member-standard-deviation
units) has three kinds of error against the black box's real disparity:

1. the data's: how much e moves with the samples seen. The members are bootstrap replicates, so
   their standard deviation s already is this standard error (not s / sqrt(M));
2. the text side's: how well the probe picks out what it names, and what else it picks out with
   it (a probe for "gray hair" also reads "old"). This error is systematic per attribute and does
   not shrink with more members;
3. the scale: e is not in loss units.

Where attributes are labelled, the measured gaps g tell both the scale and the size of the text
side's error. Model: the estimate reads the real gap G_j (in estimate units) with errors,

    e_j = G_j + t_j + d_j,   g_j = b * G_j + m_j,
    t_j ~ (0, tau^2) the text error, d_j ~ (0, s_j^2) the data's, m_j ~ (0, v_j^2) the measurement's

so sum_j e_j g_j estimates b sum_j G_j^2 and sum_j (g_j^2 - v_j^2) estimates b^2 sum_j G_j^2: the
slope is b = sum (g^2 - v^2) / sum e g (no text signal, no gap), and tau^2 = mean_j (r_j^2 - s_j^2
- v_j^2 / b^2) with r_j = g_j / b - e_j, floored at 0. The least-squares slope of g on e
(sum e g / sum e^2, used until stop 28) is the same b shrunk by the estimates' reliability,
sum G^2 / sum e^2: the errors are in e, not in g. With it, a planted attribute's real gap came out
twice its estimate, its residual swelled tau, and on the tuning worlds 1001-1008 only 0.43 of the
planted attributes were claimed (0.76 with these moments, every world's claims at least 0.89
right; bench/RESULTS.md, "Stop 28"). Each attribute is judged with b and tau fitted on the
*other* attributes (leave-one-attribute-out), so its own measured gap never vouches for its own
estimate. Without the attribute that carries most of the signal (a world's one planting), the
others may say little of b: the moments then give a large b, so g / b is small and tau comes out
as the spread of the other estimates, and a claim needs its estimate to stand out from theirs.

Which measurement noise v belongs in that fit: the estimate, the measured gap and the
population truth are all taken on the *same* identities, so what separates g from the truth is
the images drawn (the per-image standard error, `gap_se_images`), not which people were drawn
(the identity-clustered standard error u, which is larger). Subtracting u^2 took the shared
identity noise out twice: on the default world tau came out 0.10 where the errors against the
population truth needed 0.21, and the 90% intervals covered the truth for 65% of attributes
(bench/RESULTS.md, "The default world against its population truth"). With the per-image
standard error tau is 0.19 and the coverage 0.88.

That moment estimate is noisy, and the wrong claims it let through were of one kind: probes that
do not pick out their attribute on these images (the mouth and cheek probes: Smiling,
Rosy_Cheeks, High_Cheekbones, zero-shot AUROC 0.5-0.6), whose estimates measure whatever else
the text picks out. Such a probe is not tested (`MIN_RESOLUTION`, with each probe's zero-shot
AUROC on its attribute's labels): it is "cannot tell" and takes no share of the FDR. Raising
tau^2 by `bound` of its own standard errors instead was the other candidate; on the tuning
worlds 1003-1006 (bench/text_error_fit.py; bench/RESULTS.md, "Choosing the text error's fit")
every claim held with the gate and no bound, while a bound of 0.5 without the gate claimed 3
(all right) of the 10 the old fit made (8 right) and lost planted attributes; with both, nothing
was claimed. So TEXT_ERROR_BOUND is 0.

A claim says more than "these people": an attribute that few identities carry can have a large
gap on them that says nothing about the next person with it, and a claim counts as correct only
when the population truth's identity-clustered interval excludes 0. So a claim's variance adds
the measured gap's identity-clustered variance, w^2 = u^2 / b^2. (Its identity part alone,
(u^2 - v^2) / b^2, let through claims on attributes a few identities carry that the population
did not confirm once the slope was no longer shrunk: Wearing_Necktie on tuning world 1007,
Bushy_Eyebrows on 1003.) u is put in estimate units by the slope of *every* attribute, not the
leave-one-out one: w is the scale of the attribute's own sampling noise, not a reading of its
estimate, and where one attribute carries most of a world's signal the others' slope says
little of b. On tuning world 1007 (30 encoder epochs) planted Wearing_Earrings had a measured
gap of +1.78 (population +1.83) and an estimate of 0.62 read by a probe at zero-shot AUROC 0.99;
the other 39 gave b = 0.32 against 1.65 with it, so w came out five times too large and z was
1.1. With every attribute's slope it is claimed, and no other claim changed, on those tuning
worlds or on the reporting worlds at 20 or 30 epochs (bench/RESULTS.md, stop 29).

    z = e / sqrt(s^2 + tau^2 + w^2),  P(worse with it) = Phi(z),  p = 2 Phi(-|z|),
    interval (level 90%) = b * (e -+ 1.645 sqrt(s^2 + tau^2 + w^2))   in loss units,

and Benjamini-Hochberg over the attributes' p-values decides which are claimed. (Without w, the
default world's 14 claims held for 10; the four wrong ones, Attractive, Pointy_Nose,
Receding_Hairline and Sideburns, are identity-level attributes whose true gap on 120 people is
not distinguishable from 0.) A free-text comparison (`compare`) uses the report's b and tau for
the same estimator; it has no labels, hence no w, and is judged against the population gap
itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

LEVEL = 0.9
MIN_ATTRIBUTES = 5  # below this the slope and the text error cannot be learned
TEXT_ERROR_BOUND = 0.0
"""How many standard errors above its moment estimate tau^2 is taken (see `fit_calibration`):
0, since with the resolution gate every claim on the tuning worlds held (see the module)."""
MIN_RESOLUTION = 0.7
"""The zero-shot AUROC a probe needs on its attribute's labels before its estimate may support a
claim: the conventional floor of "acceptable" discrimination (Hosmer and Lemeshow). Below it
the text does not pick out what it names on these images (the mouth and cheek probes, 0.5-0.6),
and its estimate measures whatever else it picks out: Smiling was claimed wrongly on worlds 1003
and 2010, where the model is no worse on smiling faces (bench/RESULTS.md)."""
NOISE_SHARE = 1.0
"""How much of the measured gaps' per-image noise is taken out of tau^2 (see `fit_calibration`)."""


@dataclass(frozen=True)
class Calibration:
    """The mapping of one estimator's estimates to loss units, and its text-side error.

    slope: loss units per estimate unit (b); text_error: tau, in estimate units; n_attributes:
    how many labelled attributes it was learned from (0: not calibrated, tau = 0, slope NaN).
    """

    estimator: str
    slope: float
    text_error: float
    n_attributes: int

    @property
    def calibrated(self) -> bool:
        return self.n_attributes >= MIN_ATTRIBUTES and math.isfinite(self.slope)

    def z(self, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
        """The claim's statistic: the estimate over its whole standard error."""
        total = np.sqrt(np.square(std) + self.text_error**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, np.asarray(mean) / total, np.sign(mean) * np.inf)

    def p_worse(self, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
        """P(the real gap is > 0) for estimates with member mean `mean` and spread `std`."""
        # the normal CDF by erfc: scipy's import costs a query more than the answer does
        z = np.asarray(self.z(mean, std), dtype=np.float64)
        return (0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-z / math.sqrt(2.0)))[()]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            estimator=str(data["estimator"]),
            slope=float(data["slope"]) if data.get("slope") is not None else math.nan,
            # null: an infinite error (estimates that ran against the gaps; JSON has no inf)
            text_error=float(data["text_error"]) if data["text_error"] is not None else math.inf,
            n_attributes=int(data["n_attributes"]),
        )

    @classmethod
    def uncalibrated(cls, estimator: str) -> Calibration:
        return cls(estimator, math.nan, 0.0, 0)


def per_image_gap_se(measured: pl.DataFrame) -> np.ndarray:
    """The measured loss gaps' standard errors with every image counted as independent (Welch's,
    from the measured table's per-side variances and counts): their noise on the same identities."""
    columns = ("loss_var_true", "n_true", "loss_var_false", "n_false")
    var_t, n_t, var_f, n_f = (measured[c].cast(pl.Float64).to_numpy() for c in columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(var_t / n_t + var_f / n_f)


def fit_calibration(
    estimator: str,
    mean: np.ndarray,
    std: np.ndarray,
    gap: np.ndarray,
    gap_se: np.ndarray,
    bound: float = TEXT_ERROR_BOUND,
    noise_share: float = NOISE_SHARE,
) -> Calibration:
    """b and tau from the labelled attributes (NaN rows are left out); `gap_se` is the measured
    gaps' noise on the same identities (the per-image standard error; see the module).

    tau^2 is the mean of one term per attribute, so its own standard error is the terms' spread
    over sqrt(n); `bound` of those are added, because a text error estimated too small makes
    every claim built on it too sure (see the module). `noise_share` of the measured gaps'
    per-image noise is taken out of each term, and out of the slope's sum of squared gaps."""
    e, s, g, u = (np.asarray(v, dtype=np.float64) for v in (mean, std, gap, gap_se))
    keep = np.isfinite(e) & np.isfinite(s) & np.isfinite(g) & np.isfinite(u)
    e, s, g, u = e[keep], s[keep], g[keep], u[keep]
    if e.size < MIN_ATTRIBUTES or float(e @ e) <= 0:
        return Calibration.uncalibrated(estimator)
    cross = float(e @ g)
    signal = float(g @ g) - noise_share * float(u @ u)  # b^2 sum G^2 (module docstring)
    slope = signal / cross if cross > 0 else cross / float(e @ e)
    if not slope > 0:
        # estimates that run against the measured gaps, or gaps that are all measurement noise,
        # carry no usable signal: no claim at all
        return Calibration(estimator, slope, math.inf, int(e.size))
    residual = g / slope - e
    terms = residual**2 - s**2 - noise_share * (u / slope) ** 2
    tau2 = float(np.mean(terms))
    if bound and terms.size > 1:
        tau2 += bound * float(np.std(terms, ddof=1)) / math.sqrt(terms.size)
    return Calibration(estimator, slope, math.sqrt(max(tau2, 0.0)), int(e.size))


CLAIM_SCHEMA: dict[str, Any] = {
    "attribute": pl.String,
    "est_gap": pl.Float64,
    "est_gap_low": pl.Float64,
    "est_gap_high": pl.Float64,
    "est_z": pl.Float64,
    "est_p_worse": pl.Float64,
    "est_p_value": pl.Float64,
    "est_q_value": pl.Float64,
    "bh_significant": pl.Boolean,
    "claim": pl.String,
    "probe_resolves": pl.Boolean,
    "calibration_slope": pl.Float64,
    "text_error": pl.Float64,
}


def claim_word(significant: bool, mean: float) -> str:
    if not significant or not math.isfinite(mean) or mean == 0:
        return "cannot tell"
    return "worse with" if mean > 0 else "better with"


def calibrated_claims(
    attributes: list[str],
    estimator: str,
    mean: np.ndarray,
    std: np.ndarray,
    gap: np.ndarray,
    gap_se: np.ndarray,
    alpha: float,
    level: float = LEVEL,
    gap_se_images: np.ndarray | None = None,
    bound: float = TEXT_ERROR_BOUND,
    noise_share: float = NOISE_SHARE,
    resolution: np.ndarray | None = None,
) -> tuple[pl.DataFrame, Calibration]:
    """One row per attribute (CLAIM_SCHEMA), each judged by a calibration fitted without it;
    and the calibration fitted on all of them (what free-text comparisons use).

    gap_se: the measured gaps' identity-clustered standard errors; gap_se_images: their per-image
    ones, which tau is fitted against (without, taken equal to the clustered ones)."""
    # lazy: scipy.stats (and core.stats, which imports it) would add 0.9 s to every `compare`,
    # and queries import this module for `Calibration` alone
    from scipy import stats as sps

    from llm2loss_pipeline.core.stats import bh_adjust

    e, s, g, u = (np.asarray(v, dtype=np.float64) for v in (mean, std, gap, gap_se))
    v = u if gap_se_images is None else np.asarray(gap_se_images, dtype=np.float64)
    clustered_var = np.nan_to_num(u**2)  # w^2 b^2 (see the module)
    whole = fit_calibration(estimator, e, s, g, v, bound, noise_share)
    quantile = float(sps.norm.ppf(0.5 + level / 2))
    rows = []
    for j, name in enumerate(attributes):
        others = np.arange(len(attributes)) != j
        cal = fit_calibration(
            estimator, e[others], s[others], g[others], v[others], bound, noise_share
        )
        # u into estimate units by every attribute's slope, not the others' (see the module)
        unit = whole.slope if whole.slope > 0 else cal.slope
        spread = math.sqrt(s[j] ** 2 + clustered_var[j] / unit**2) if unit > 0 else s[j]
        z = float(cal.z(e[j], spread)) if math.isfinite(e[j]) else math.nan
        half = quantile * math.sqrt(spread**2 + cal.text_error**2)
        # a slope <= 0 (estimates against the gaps) has no loss units to give: no gap, no interval
        scale = cal.slope if math.isfinite(cal.text_error) else math.nan
        rows.append(
            {
                "attribute": name,
                "est_gap": scale * e[j],
                "est_gap_low": scale * (e[j] - half),
                "est_gap_high": scale * (e[j] + half),
                "est_z": z,
                "est_p_worse": float(sps.norm.cdf(z)) if math.isfinite(z) else math.nan,
                "est_p_value": float(2 * sps.norm.sf(abs(z))) if math.isfinite(z) else math.nan,
                "calibration_slope": cal.slope,
                "text_error": cal.text_error,
            }
        )
    frame = pl.DataFrame(rows)
    # a probe that does not pick out its attribute is not tested at all (no p-value, so it takes
    # no share of the FDR either); without labels to tell, every probe is tested
    resolves = np.ones(len(attributes), dtype=bool)
    if resolution is not None:  # NaN: no labels to tell, tested
        resolves = ~(np.asarray(resolution, dtype=np.float64) < MIN_RESOLUTION)
    tested = np.where(resolves, frame["est_p_value"].fill_null(math.nan).to_numpy(), math.nan)
    q = bh_adjust(tested)
    significant = np.where(np.isfinite(q), q <= alpha, False)
    frame = frame.with_columns(
        pl.Series("est_q_value", q),
        pl.Series("bh_significant", significant),
        pl.Series("probe_resolves", resolves),
    ).with_columns(
        pl.Series(
            "claim", [claim_word(bool(k), float(m)) for k, m in zip(significant, e, strict=True)]
        )
    )
    return frame.select(list(CLAIM_SCHEMA)).cast(CLAIM_SCHEMA), whole
