"""The heads' estimate of a description, as `compare` makes it by default.

Discovery keeps a description only when the heads' estimate agrees with its matched samples
(hypotheses.py). Two estimators (config `estimator`):

- grounded (the default, where the home has a report): what `compare` answers with
  (core/query.py `compare_many`, core/heads/compare.py). A description t is asked as its contrast
  with the attribute probes' centroid (the mean of every attribute value's canonical prompt in
  the heads' input space: "a typical description of these images"), the direction t - centroid
  mapped into the report's probe basis (core/report/grounded.py `in_probe_basis`), and each
  member's estimate is the covariance of its predicted loss with the evaluation images' score
  along that direction, on its own identity-clustered bootstrap of the images. P(worse) is
  `Comparison.p_a_worse`: calibrated with the report's slope and text-side error (the free-text
  factor included) when the report has a calibration, else the members' share; a description
  one report probe holds takes the report's answer for it, as in `compare`
  (core/heads/probe_reading.py; it changed no mode on the tuning worlds 1001-1008: a
  description's contrast with the centroid is seldom held by one probe). So `discover` and
  `compare(t, ...)` read a text the same way. Issue 17 found the direct estimate the weaker
  estimator (Spearman against the measured gaps 0.44 vs 0.88 on the default world), and its
  member share dropped planted attributes whose matched samples were worse at q 1e-5
  (bench/RESULTS.md, "Discovery against population truth");
- direct: the paper's estimate, each member's standardised output at the text embedding minus
  its mean over the evaluation images; P(worse) the share of members above that mean. Used
  where there is no report (no probes or no images to ground on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from llm2loss_pipeline.core.heads.compare import compare_members
from llm2loss_pipeline.core.heads.probe_reading import ProbeReading, probe_readings
from llm2loss_pipeline.core.members import MemberInfo
from llm2loss_pipeline.core.report.calibration import Calibration
from llm2loss_pipeline.core.report.grounded import grounded_diffs, probe_basis

REFERENCE = "the attribute probes' centroid"
"""what a grounded description is contrasted with (the `text_b` of its comparison)"""


@dataclass(frozen=True)
class DescriptionGrounding:
    """What a grounded estimate reads, from a loaded `core.query.Diagnoser`: the evaluation
    images (heads' input space) with their member scores and bootstrap weights, the report's
    probe directions and duals, and its calibration (None: not calibrated)."""

    members: tuple[MemberInfo, ...]
    pool: np.ndarray
    member_scores: np.ndarray
    weights: np.ndarray
    probe_directions: np.ndarray
    probe_duals: np.ndarray
    calibration: Calibration | None
    answers: tuple[list[str], np.ndarray, np.ndarray] | None = None
    """the report's attributes with its P(worse with each) and gate (`Diagnoser.probe_answers`)"""

    @classmethod
    def from_diagnoser(cls, diagnoser: Any) -> DescriptionGrounding | None:
        """None when `diagnoser` cannot ground (no report probes, or no images): a bare scorer,
        or a home whose report is not built."""
        if not all(
            callable(getattr(diagnoser, name, None))
            for name in ("probes", "grounding_pool", "calibration")
        ):
            return None
        probes = diagnoser.probes()
        if probes is None:
            return None
        pool, scores, weights = diagnoser.grounding_pool()
        return cls(
            members=tuple(diagnoser.ensemble.members),
            pool=np.asarray(pool, dtype=np.float64),
            member_scores=np.asarray(scores, dtype=np.float64),
            weights=np.asarray(weights, dtype=np.float64),
            probe_directions=np.asarray(probes[0], dtype=np.float64),
            probe_duals=np.asarray(probes[1], dtype=np.float64),
            calibration=diagnoser.calibration("grounded"),
            answers=diagnoser.probe_answers() if hasattr(diagnoser, "probe_answers") else None,
        )

    def within(self, mask: np.ndarray) -> DescriptionGrounding:
        """The same grounding on the pool images `mask` selects (a class of an attribute task's
        labels). A member whose bootstrap drew none of them keeps them all, as `pool_weights`
        does for a resample that drew no image. Without the report's answers: those are over all
        images, and a question within a class is not the report's question."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self.pool),):
            raise ValueError(f"a mask of shape {mask.shape} for {len(self.pool)} pool images")
        weights = self.weights[:, mask].copy()
        weights[weights.sum(axis=1) == 0] = 1.0
        return dataclasses.replace(
            self,
            pool=self.pool[mask],
            member_scores=self.member_scores[:, mask],
            weights=weights,
            answers=None,
        )


def direct_estimates(members: np.ndarray) -> dict[str, np.ndarray]:
    """Per text, from members [M, T] (each member's estimate minus its population mean)."""
    above = (members > 0).sum(axis=0)
    n_members = members.shape[0]
    p_estimate = np.array([sps.binomtest(int(k), n_members, 0.5, "greater").pvalue for k in above])
    return {
        "estimated_gap": members.mean(axis=0),
        "estimated_q1": np.quantile(members, 0.25, axis=0),
        "estimated_q3": np.quantile(members, 0.75, axis=0),
        "p_worse": above / n_members,
        "p_estimate": p_estimate,
    }


def grounded_estimates(
    grounding: DescriptionGrounding,
    text_x: np.ndarray,
    reference_x: np.ndarray,
    texts: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per text (text_x [T, d] in the heads' input space): the grounded estimate of
    "t rather than the reference" and compare's P(worse) (module docstring). `p_estimate` is
    1 - P(worse), the one-sided p of a calibrated estimate."""
    directions = np.asarray(text_x, dtype=np.float64) - np.asarray(reference_x, dtype=np.float64)
    mapped, _ = probe_basis(grounding.probe_directions, grounding.probe_duals)(directions)
    apart = np.linalg.norm(mapped, axis=1) > 0.0  # the reference itself: no direction to ask
    diffs = np.zeros((len(grounding.members), len(directions)))
    if apart.any():
        diffs[:, apart] = grounded_diffs(
            grounding.member_scores, grounding.pool, mapped[apart], grounding.weights
        )
    readings: list[ProbeReading | None] = [None] * len(directions)
    if grounding.answers is not None:
        readings = probe_readings(directions @ grounding.probe_duals.T, *grounding.answers)
    p_worse = np.array(
        [
            compare_members(
                diffs[:, t],
                grounding.members,
                text,
                REFERENCE,
                "grounded",
                grounding.calibration,
                probe=readings[t],
            ).p_a_worse
            for t, text in enumerate(texts)
        ]
    )
    return {
        "estimated_gap": diffs.mean(axis=0),
        "estimated_q1": np.quantile(diffs, 0.25, axis=0),
        "estimated_q3": np.quantile(diffs, 0.75, axis=0),
        "p_worse": p_worse,
        "p_estimate": 1.0 - p_worse,
    }
