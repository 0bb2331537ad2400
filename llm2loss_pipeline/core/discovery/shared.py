"""What distinct failure modes have in common: a labelled value most of their images show.

Modes are distinct when their matched samples overlap little (modes.py), yet several can be
facets of one group. On the spurious world (configs/spurious.yaml) the model fails blond men,
and discovery's modes are a mustache, a five o'clock shadow, a beard, bushy eyebrows and a hat:
each matched set is nearly all men, while "face of a man" itself is not a mode, since the
encoder's most masculine faces are not the blond ones. A reader of five rows would not see the
one group behind them; the labels do.

The rule, where attribute labels exist: a value is shared when the matched samples of at least
half of the modes, and of at least `MIN_MODES`, show it: it is on most of their images
(`MIN_PRECISION`) and at least `min_lift` times as common there as among all samples, the lift
a mode's own words must reach. A value too common for that lift (base rate above 1 / min_lift:
"a rounded nose", on 88% of the faces) is not what sets any images apart, and is never shared.
Values worded as an absence and, with `avoid_subjective`, values without neutral words are left
out, as they are from rewordings. Each shared value carries what the labels say of the people
with it: their loss gap against the others and the matched-set test's identity-clustered p
(modes.py `labelled_test`), so the line says whether those people, not only these
images, are worse. It describes the modes; it is not a mode, and
no false discovery rate is spent on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llm2loss_pipeline.core.discovery.candidates import describe_values, is_negation, neutral_phrase
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.modes import labelled_test, value_rates

MIN_MODES = 3
"""fewer modes than this sharing a value is no pattern: two modes can share it by chance"""
MIN_PRECISION = 0.5
"""a value said of a mode's images must be on most of them: a rare value over-represented at 12%
(against 8%) is a correlate of the mode, not what its images are"""
MAX_SHOWN = 3
"""shared values listed at most, most widely shared first"""


@dataclass(frozen=True)
class SharedTrait:
    attribute: str
    value: bool
    words: str
    """the value in discovery's words ('face of a man')"""
    modes: tuple[int, ...]
    """the numbers of the modes whose images show it"""
    n_modes: int
    """how many modes there are in all"""
    base_rate: float
    """its share of the evaluation samples"""
    min_precision: float
    """its lowest share among those modes' matched samples"""
    labelled_gap: float
    """mean loss of the samples with it minus the others' (NaN: one side empty)"""
    labelled_p: float
    """one-sided identity-clustered p that they are worse"""
    worse: bool
    """whether they are measurably worse: a positive gap at p <= discovery's `alpha`"""

    @property
    def label(self) -> str:
        return self.attribute if self.value else f"not {self.attribute}"

    def sentence(self) -> str:
        """One line for the CLI, the page and the asset's metadata."""
        modes = ", ".join(str(mode) for mode in self.modes)
        said = (
            f"{len(self.modes)} of {self.n_modes} modes (#{modes}) show {self.label} "
            f"('{self.words}') on at least {self.min_precision:.0%} of their matched samples, "
            f"against {self.base_rate:.0%} of all"
        )
        if not math.isfinite(self.labelled_gap):
            return said
        verdict = "worse" if self.worse else "not measurably worse"
        return (
            f"{said}; the samples labelled {self.label} are {verdict} (gap "
            f"{self.labelled_gap:+.2f}, p {self.labelled_p:.2g})"
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "modes": list(self.modes), "sentence": self.sentence()}


def shared_traits(
    modes: Sequence[tuple[int, np.ndarray]],
    labels: Mapping[str, np.ndarray] | None,
    losses: np.ndarray,
    clusters: np.ndarray | None,
    config: DiscoveryConfig,
) -> list[SharedTrait]:
    """The values shared by the modes (module docstring); `modes`: (mode number, matched sample
    indices) of every mode; `config`: its `min_lift`, `avoid_subjective` and `alpha`. Empty
    without labels or with fewer than `MIN_MODES` modes."""
    min_lift, avoid_subjective = config.min_lift, config.avoid_subjective
    if not labels or len(modes) < MIN_MODES:
        return []
    needed = max(MIN_MODES, math.ceil(len(modes) / 2))
    losses = np.asarray(losses, dtype=np.float64)
    rates = [(number, value_rates(labels, matched)) for number, matched in modes]
    found = []
    for key in rates[0][1]:
        if is_negation(*key) or (avoid_subjective and neutral_phrase(*key) is None):
            continue
        showing = [
            (number, rate[key])
            for number, rate in rates
            if rate[key][0] >= MIN_PRECISION and rate[key][2] >= min_lift
        ]
        if len(showing) < needed:
            continue
        _, gap, p_named = labelled_test(labels, [key], losses, clusters)
        found.append(
            SharedTrait(
                attribute=key[0],
                value=key[1],
                words=describe_values([key], neutral=avoid_subjective).text,
                modes=tuple(sorted(number for number, _ in showing)),
                n_modes=len(modes),
                base_rate=showing[0][1][1],
                min_precision=min(precision for _, (precision, _, _) in showing),
                labelled_gap=gap,
                labelled_p=p_named,
                worse=bool(gap > 0 and p_named <= config.alpha),
            )
        )
    found.sort(key=lambda trait: (-len(trait.modes), trait.labelled_p, trait.attribute))
    return found[:MAX_SHOWN]
