"""A free-text question that one report probe holds is answered as the report answers that probe.

`compare` writes the difference of its two texts in the report's probe basis, c = duals @ t
(core/report/grounded.py `in_probe_basis`). Where one probe's coefficient holds most of c
(`share` = c_j^2 / |c|^2 of at least `PROBE_SHARE`), the question is that probe's question in
other words: "a man" vs "a woman" is Male's, "a photo of a blond man" vs "... blond woman" too
(the shared "blond" cancels). One wording is read less surely than a probe's fifteen, which is
why free text's P(A worse) carries twice the report's text error and at least 0.6
(compare.py); such a question instead takes the report's own calibrated P(worse with the
attribute), with the probe's text error, its identity term and its resolution gate, so that
`compare` and the report say the same thing about the same attribute. A probe that does not
resolve its attribute (zero-shot AUROC under the gate) gives no answer, as in the report.

Where the wording spreads over several probes ("a person with a goatee" vs "... without a
goatee" shares its "with - without" component with every such probe) nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PROBE_SHARE = 0.5
"""The least share of a question one probe must hold to be asked as that probe: a majority, so
no other probe holds as much. Measured on the tuning worlds 1001-1008 (bench/compare_probes.py;
bench/RESULTS.md, "Stop 24"), over 240 questions in a user's own words: the Brier score fell
from 0.215 (free text only) to 0.192, 0.197, 0.200, 0.207, 0.214 with the probe's answer from a
share of 0.5, 0.6, 0.7, 0.8, 0.9, the ECE stayed 0.02-0.03 and every answer stated at P >= 0.9
was right. Under 0.5 the largest coefficient often names another attribute ("a gray-haired
person" vs "... not gray" leans on Black_Hair at 0.35), so lower shares were not candidates. On
the reporting worlds 2009-2016, run once with 0.5: Brier 0.210 -> 0.189, ECE 0.092 -> 0.041,
answers at P >= 0.9 from 3 to 30, all right."""


@dataclass(frozen=True)
class ProbeReading:
    """The report probe that holds most of a free-text question, and the report's answer."""

    attribute: str
    share: float
    """c_j^2 / |c|^2 of the question's coefficients in the report's probe basis"""
    sign: int
    """+1 when text A is the attribute's side, -1 when text B is"""
    p_worse: float
    """the report's calibrated P(the model is worse with the attribute)"""
    resolves: bool
    """whether the report tests this probe (its resolution gate)"""

    @property
    def holds(self) -> bool:
        """Whether the question is asked as this probe."""
        return self.share >= PROBE_SHARE and self.resolves and math.isfinite(self.p_worse)

    @property
    def p_a_worse(self) -> float:
        return self.p_worse if self.sign > 0 else 1.0 - self.p_worse

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "holds": self.holds}


def probe_readings(
    coefficients: np.ndarray,
    attributes: Sequence[str],
    p_worse: Sequence[float],
    resolves: Sequence[bool],
) -> list[ProbeReading | None]:
    """For each question's coefficients [q, k] in the probe basis, its largest probe with the
    report's answer for it; None for a question with no coefficient at all."""
    c = np.asarray(coefficients, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(attributes):
        raise ValueError(f"coefficients must be [q, {len(attributes)}], got {c.shape}")
    readings: list[ProbeReading | None] = []
    for row in c:
        total = float(row @ row)
        if not total > 0:
            readings.append(None)
            continue
        j = int(np.argmax(np.abs(row)))
        readings.append(
            ProbeReading(
                attribute=str(attributes[j]),
                share=float(row[j] ** 2 / total),
                sign=1 if row[j] > 0 else -1,
                p_worse=float(p_worse[j]),
                resolves=bool(resolves[j]),
            )
        )
    return readings
