"""Statistics of a comparison between two texts over the ensemble members (paper Figure 2).

Each member gives a point estimate of `h(a) - h(b)` in standardised units (ensemble.py); the spread
over members is the uncertainty. For each kind and overall we report mean, min, quartiles, max and
`P(h(a) > h(b))`, the fraction of members whose difference is positive, a tie (difference exactly 0)
counting one half, so that P(a > b) = 1 - P(b > a) always holds.

Quantiles use numpy's default "linear" method (type 7: interpolate between order statistics at
position p * (M - 1)); it is symmetric, so swapping a and b negates and swaps the quartiles
(q1(a, b) = -q3(b, a)).

Verdict without a calibration (a scorer with no report): the members agree when at least
`CONFIDENT` (80%) of them put the difference on the same side of zero, i.e. P >= 0.8 or P <= 0.2;
otherwise the comparison is reported as uncertain, with the count of members on the leaning side,
or as evenly split when P is exactly 1/2.

Verdict with the report's calibration (core/report/calibration.py), what `compare` uses:
P(A worse) = Phi(mean / sqrt(std^2 + tau^2)), the members' spread being the data's standard error
and tau the text side's error learned on the labelled attributes. The answer names a side only
when P >= `CLAIM` (0.9) or <= 0.1, and says "cannot tell" otherwise (naming the side it leans
to from `LEANING`, 0.6, on). A question that one report probe holds (probe_reading.py) takes the
report's own calibrated P for that attribute instead of free text's. A pair of texts whose
difference the report's probes barely span (`explained` < `MIN_EXPLAINED`) is "off the data":
the two texts describe the same images (synonyms), or something the images do not vary in (a cat
vs a dog, on faces), however many members agree. Two texts that name one class of an attribute
task's target are asked among that class's images (within_class.py), where only a question one
probe holds gets a P (that probe's text error on the class's own estimate) and free text gets
"cannot tell".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm2loss_pipeline.core.heads.probe_reading import PROBE_SHARE, ProbeReading
from llm2loss_pipeline.core.heads.within_class import ClassScope
from llm2loss_pipeline.core.members import OVERALL, MemberInfo, member_groups
from llm2loss_pipeline.core.report.calibration import Calibration

CONFIDENT = 0.8
CLAIM = 0.9
# Both chosen on the tuning worlds 1001-1002 (bench/worlds.py --set tune; bench/RESULTS.md,
# "Many worlds"), never on the reporting worlds 2001-2008:
# - off the data: the explained share is a property of the two wordings (the text tower is
#   frozen, so it came out the same in every world): off-domain questions 0.20 (a cat vs a dog)
#   and 0.38 (a red vs a blue car); users' in-domain questions down to 0.30 ("a person with gray
#   hair" vs "... dark hair") and 0.39 ("a face with a goatee" vs "a clean-shaven face"). No cut
#   separates the car from those two, so the cut stops only what is clearly off (0.25) and the
#   calibrated P answers the rest (on the tuning worlds the car questions got P 0.43-0.58);
# - a free-text question is one wording where a report probe averages fifteen, so its text-side
#   error is larger: with the report's tau as it is, the calibration table's ECE over 100
#   questions was 0.19 (answers stated 0.8-0.9 were right half the time); with 2 x tau, 0.09, the
#   smallest factor of 1, 1.5, 2, 3, 5 under the 0.1 target;
# - and never less than FREE_TEXT_FLOOR (stop 20, on the tuning worlds 1001-1008 at the default
#   size; bench/text_error_fit.py --free-text): a world's tau is a moment estimate from 40
#   attributes, and where it came out small (0.10 on 1008) 2 x tau made free text sure and wrong.
#   Over their 400 questions, answers stated at P >= 0.9 were right 71% of the time (n = 31),
#   ECE 0.062, Brier 0.2435. Floors of 0.3, 0.4, 0.5, 0.55 left 21, 16, 5, 1 such answers,
#   right 76%, 69%, 80%, 0%; 0.6 is the smallest that leaves none (ECE 0.024, Brier 0.2382). The
#   Brier score kept falling with larger errors (0.2364 at 3 x tau and 0.6): free text has
#   little skill on these worlds (72% right where the true gap exceeds 0.2, a coin flip under
#   0.1), so an honest P for it seldom leaves 0.2-0.8.
MIN_EXPLAINED = 0.25
LEANING = 0.6
"""From here to CLAIM an answer that names no side says which side it leans to; nearer 1/2 it
is "no measurable difference". Wording only: no claim rests on it. (On the reporting worlds
2009-2016, answers stated 0.6-0.9 named the right side 65-81% of the time: bench/RESULTS.md.)"""
FREE_TEXT_ERROR = 2.0
FREE_TEXT_FLOOR = 0.6
"""The least text-side error of a free-text answer, in estimate units (see above)."""


def free_text_p_worse(values: np.ndarray, calibration: Calibration) -> float:
    """P(the real gap is > 0) for a free-text estimate with member values `values`: their spread
    is the data's standard error, and the text side's is FREE_TEXT_ERROR x the report's tau, at
    least FREE_TEXT_FLOOR (see above)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    text_error = max(FREE_TEXT_ERROR * calibration.text_error, FREE_TEXT_FLOOR)
    total = math.sqrt(std**2 + text_error**2)
    if total == 0:
        return 0.5 if values.mean() == 0 else float(values.mean() > 0)
    return 0.5 * math.erfc(-float(values.mean()) / total / math.sqrt(2))


def quartiles(values: np.ndarray) -> list[float]:
    """`np.quantile(values, [0.25, 0.5, 0.75])` (its default 'linear' method), bit for bit, without
    its per-call overhead: a tenth of a millisecond, paid per group of every comparison, which
    was most of a batch question's time (issue 21; tests/test_query_batch.py checks equality)."""
    if values.size == 0 or not np.isfinite(values).all():
        return [float(v) for v in np.quantile(values, [0.25, 0.5, 0.75])]
    ordered = np.sort(values)
    n = ordered.size
    result = []
    for q in (0.25, 0.5, 0.75):
        virtual = n * q + (1 + q * -1) - 1  # numpy's virtual index, alpha = beta = 1
        below = int(np.floor(virtual))
        a, b = ordered[below], ordered[min(below + 1, n - 1)]
        t, step = virtual - below, ordered[min(below + 1, n - 1)] - ordered[below]
        result.append(float(b - step * (1 - t) if t >= 0.5 else a + step * t))  # numpy's _lerp
    return result


@dataclass(frozen=True)
class Spread:
    """Distribution of one value over a group of members."""

    n: int
    mean: float
    std: float
    min: float
    q1: float
    median: float
    q3: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        values = np.asarray(values, dtype=np.float64)
        q1, median, q3 = quartiles(values)
        return cls(
            n=int(values.size),
            mean=float(values.mean()),
            std=float(values.std()),
            min=float(values.min()),
            q1=float(q1),
            median=float(median),
            q3=float(q3),
            max=float(values.max()),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DiffStats(Spread):
    """Spread of h(a) - h(b) over a group, plus how many members put it above zero."""

    p_greater: float = 0.5
    n_positive: int = 0
    n_negative: int = 0

    @property
    def n_agree(self) -> int:
        """Members on the side the group leans to (the larger of positive and negative)."""
        return max(self.n_positive, self.n_negative)

    @classmethod
    def of(cls, values: np.ndarray) -> DiffStats:
        values = np.asarray(values, dtype=np.float64)
        base = Spread.of(values)
        positive, negative = int((values > 0).sum()), int((values < 0).sum())
        ties = values.size - positive - negative
        return cls(
            **base.__dict__,
            p_greater=(positive + 0.5 * ties) / values.size,
            n_positive=positive,
            n_negative=negative,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "n_agree": self.n_agree}


def kind_groups(members: Sequence[MemberInfo]) -> dict[str, list[int]]:
    """Member positions per kind present, then all of them under "overall" (`member_groups`
    without the kind x arch groups, in the order the answers list them)."""
    overall, *kinds = member_groups(members, by_arch=False)
    return {group.name: list(group.positions) for group in (*kinds, overall)}


@dataclass(frozen=True)
class Comparison:
    """h(a) - h(b) over the ensemble, per kind and overall, with a one-line verdict."""

    text_a: str
    text_b: str
    diffs: tuple[float, ...]
    members: tuple[MemberInfo, ...]
    groups: dict[str, DiffStats] = field(repr=False)
    estimator: str = "direct"
    calibration: Calibration | None = None
    explained: float | None = None
    """share of the texts' difference that the report's probes span (grounded only)"""
    probe: ProbeReading | None = None
    """the report probe that holds most of the question, with the report's answer for it"""
    scope: ClassScope | None = None
    """the class of an attribute task's target that both texts name, among whose images the
    question was asked (within_class.py); None: over all evaluation images"""

    @property
    def asked_as_probe(self) -> bool:
        """Whether P(A worse) is the report's answer for one probe (probe_reading.py). Not
        within a class: the report answers over all images."""
        return (
            self.scope is None and self.calibrated and self.probe is not None and self.probe.holds
        )

    @property
    def probe_within_class(self) -> bool:
        """Whether a question asked within a class is one report probe's (that probe's text
        error then applies, not free text's)."""
        probe = self.probe
        return (
            self.scope is not None
            and not self.scope.empty_side
            and probe is not None
            and probe.share >= PROBE_SHARE
            and probe.resolves
        )

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None and self.calibration.calibrated

    @property
    def off_data(self) -> bool:
        return self.explained is not None and self.explained < MIN_EXPLAINED

    @property
    def p_a_worse(self) -> float:
        """P(the model is worse on A): calibrated when the report's calibration is known, else
        the share of members that say so."""
        if not self.calibrated:
            return self.p_greater
        if self.asked_as_probe:
            return self.probe.p_a_worse  # type: ignore[union-attr]
        # within a class: one probe's question, or no answer (within_class.py)
        if self.scope is not None:
            if not self.probe_within_class:
                return 0.5
            values = np.asarray(self.diffs)
            return float(self.calibration.p_worse(values.mean(), values.std(ddof=1)))  # type: ignore[union-attr]
        return free_text_p_worse(np.asarray(self.diffs), self.calibration)  # type: ignore[arg-type]

    @property
    def claimed(self) -> bool:
        """Whether the answer names a side (a claim a user may act on)."""
        if not self.calibrated:
            return self.p_greater >= CONFIDENT or self.p_greater <= 1.0 - CONFIDENT
        p = self.p_a_worse
        return not self.off_data and (p >= CLAIM or p <= 1.0 - CLAIM)

    @property
    def units(self) -> str:
        if self.estimator == "grounded":
            return (
                "member standard deviations of predicted loss per standard deviation of the "
                "evaluation images' similarity to A rather than B (> 0: A worse)"
            )
        return "member standard deviations of predicted loss (h(A) - h(B); > 0: A worse)"

    @property
    def overall(self) -> DiffStats:
        return self.groups[OVERALL]

    @property
    def p_greater(self) -> float:
        return self.overall.p_greater

    @property
    def verdict(self) -> str:
        stats = self.overall
        # quoted as typed: repr() would double every backslash
        a, b = f"A ('{self.text_a}')", f"B ('{self.text_b}')"
        if stats.n_positive == 0 and stats.n_negative == 0:
            return f"no difference: all {stats.n} members give A and B the same estimated loss"
        if self.calibrated:
            return self._calibrated_verdict(a, b)
        if stats.p_greater == 0.5:  # naming a side here would flip with the order of A and B
            return (
                f"evenly split: {stats.n_positive} of {stats.n} members expect the model to do "
                f"worse on {a}, {stats.n_negative} on {b}"
            )
        worse, better = (a, b) if stats.p_greater > 0.5 else (b, a)
        agree = stats.n_agree
        if stats.p_greater >= CONFIDENT or stats.p_greater <= 1.0 - CONFIDENT:
            return (
                f"the model is expected to do worse on {worse} than on {better}; "
                f"{agree} of {stats.n} members agree"
            )
        return (
            f"uncertain: {agree} of {stats.n} members expect the model to do worse on {worse} "
            f"than on {better}"
        )

    def _calibrated_verdict(self, a: str, b: str) -> str:
        p = self.p_a_worse
        if self.off_data:
            return (
                f"cannot tell: what {a} and {b} differ in is mostly not something these images "
                f"vary in (the labelled attributes span {self.explained:.0%} of it): the two "
                "texts describe the same images, or something the data does not show"
            )
        asked = ""
        probe: ProbeReading = self.probe  # type: ignore[assignment]
        if self.scope is not None and self.scope.empty_side:
            with_it, without = self.scope.probe_sides  # type: ignore[misc]
            return (
                f"cannot tell: {a} and {b} both name one class, so they are asked among "
                f"{self.scope.words}; of those, {with_it} are labelled {probe.attribute} and "
                f"{without} are not: no such people to tell about"
            )
        if self.scope is not None and not self.probe_within_class:
            nearest = f" (the nearest, {probe.attribute}, holds {probe.share:.0%})" if probe else ""
            return (
                f"cannot tell: {a} and {b} both name one class, so they are asked among "
                f"{self.scope.words}, and there only a question one report probe holds is "
                f"answered; what they differ in is not one probe's{nearest}"
            )
        if self.asked_as_probe:
            asked = (
                f"; asked as the report asks {probe.attribute}, whose probe holds "
                f"{probe.share:.0%} of the question"
            )
        elif self.scope is not None:
            asked = f"; asked among {self.scope.words}, the class both texts name"
            if self.probe_within_class:
                asked += f", as {probe.attribute} ({probe.share:.0%} of the question) within it"
        if p >= CLAIM or p <= 1.0 - CLAIM:
            worse, better, sure = (a, b, p) if p >= 0.5 else (b, a, 1.0 - p)
            return (
                f"the model is expected to do worse on {worse} than on {better} "
                f"(P {sure:.2f}{asked})"
            )
        if abs(p - 0.5) < LEANING - 0.5:
            return (
                f"cannot tell: no measurable difference between {a} and {b} "
                f"(P(A worse) {p:.2f}; a claim needs {CLAIM:.1f}{asked})"
            )
        # 20 of 20 members may agree here: "no measurable difference" would misread an answer
        # whose side is known but not surely enough to name (the text error is the larger part)
        worse = a if p > 0.5 else b
        return (
            f"cannot tell: it leans worse on {worse}, not surely enough to name a side "
            f"(P(A worse) {p:.2f}; a claim needs {CLAIM:.1f}{asked})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_a": self.text_a,
            "text_b": self.text_b,
            "verdict": self.verdict,
            "p_a_worse": self.p_a_worse,
            "claimed": self.claimed,
            "calibrated": self.calibrated,
            "explained": self.explained,
            "asked_as_probe": self.asked_as_probe,
            "probe": self.probe.to_dict() if self.probe is not None else None,
            "scope": self.scope.to_dict() if self.scope is not None else None,
            "members_a_worse": self.p_greater,
            "groups": {name: stats.to_dict() for name, stats in self.groups.items()},
            "members": [
                {**m.to_dict(), "diff": d} for m, d in zip(self.members, self.diffs, strict=True)
            ],
            "estimator": self.estimator,
            "units": self.units,
        }


def compare_members(
    diff: np.ndarray,
    members: Sequence[MemberInfo],
    text_a: str = "A",
    text_b: str = "B",
    estimator: str = "direct",
    calibration: Calibration | None = None,
    explained: float | None = None,
    probe: ProbeReading | None = None,
    scope: ClassScope | None = None,
) -> Comparison:
    """Statistics of per-member differences `diff` [M] = h(a) - h(b) (standardised)."""
    values = np.asarray(diff, dtype=np.float64).reshape(-1)
    if values.size != len(members) or values.size == 0:
        raise ValueError(f"{values.size} differences for {len(members)} members")
    if not np.isfinite(values).all():
        raise ValueError("differences contain NaN or inf")
    groups = {name: DiffStats.of(values[rows]) for name, rows in kind_groups(members).items()}
    return Comparison(
        text_a=text_a,
        text_b=text_b,
        diffs=tuple(float(v) for v in values),
        members=tuple(members),
        groups=groups,
        estimator=estimator,
        calibration=calibration,
        explained=explained,
        probe=probe,
        scope=scope,
    )


RANK_UNITS = {
    "grounded": (
        "member standard deviations of predicted loss per standard deviation of the evaluation "
        "images' similarity to the text rather than to the average of the texts ranked "
        "(> 0: worse than that average)"
    ),
    "direct": "standard deviations of each member's predicted loss above its training average",
}


def rank_verdict(p_worse: float | None) -> str:
    """A ranked text's one-word answer: its contrast with the average of the texts ranked,
    judged as `compare` judges a pair (the same P and the same CLAIM level)."""
    if p_worse is None:
        return "uncalibrated"
    if p_worse >= CLAIM:
        return "worse than the average"
    if p_worse <= 1.0 - CLAIM:
        return "better than the average"
    return "cannot tell"


def rank_texts(
    texts: Sequence[str],
    scores: np.ndarray,
    members: Sequence[MemberInfo],
    estimator: str = "direct",
    calibration: Calibration | None = None,
    probes: Sequence[ProbeReading | None] | None = None,
    scopes: Sequence[ClassScope | None] | None = None,
) -> list[dict[str, Any]]:
    """Texts ordered by the ensemble-mean standardised estimate, highest (worst) first.

    `scores` is [M, T]. Each row carries the overall spread (intervals q1..q3 and min..max) and the
    spread per kind. Grounded scores are each text's contrast with the average of the texts
    ranked, a `compare` of the text against that average: with the report's `calibration` each
    row gets `compare`'s P(worse) (`p_worse`) and verdict; a contrast one report probe holds
    (`probes`) takes the report's answer for it, as in `compare`. (No off-the-data flag: a
    contrast with the average of texts worded alike or not, a cat among them, is mostly wording,
    so its share spanned by the probes says little about the one text.) Texts that all name
    one class of an attribute task's target were ranked among its images (`scopes`, one per text,
    each with what the class holds of its own probe's attribute), and each row says so
    (`within`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(members), len(texts)):
        raise ValueError(f"scores must be [{len(members)}, {len(texts)}], got {scores.shape}")
    groups = kind_groups(members)
    judged = estimator == "grounded" and calibration is not None and calibration.calibrated
    rows = []
    for t, text in enumerate(texts):
        per_group = {name: Spread.of(scores[idx, t]) for name, idx in groups.items()}
        scope = scopes[t] if scopes is not None else None
        p_worse, asked_as = None, None
        if judged:  # the text against the average, answered by compare's own rules
            probe = probes[t] if probes is not None else None
            answer = compare_members(
                scores[:, t],
                members,
                text,
                "the average",
                estimator,
                calibration,
                probe=probe,
                scope=scope,
            )
            p_worse = answer.p_a_worse
            asked_as = probe.attribute if answer.asked_as_probe else None  # type: ignore[union-attr]
        rows.append(
            {
                "text": text,
                **per_group[OVERALL].to_dict(),
                "groups": per_group,
                "estimator": estimator,
                "units": RANK_UNITS.get(estimator, RANK_UNITS["direct"]),
                "p_worse": p_worse,
                "asked_as": asked_as,
                "within": scope.to_dict() if scope is not None else None,
                "verdict": rank_verdict(p_worse),
            }
        )
    rows.sort(key=lambda row: -row["mean"])  # stable: equal means keep input order
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
        row["groups"] = {name: spread.to_dict() for name, spread in row["groups"].items()}
    return rows
