"""From verified descriptions to distinct failure modes whose words the images bear out.

Three judgements on the hypotheses table (hypotheses.py calls them in this order):

Off-domain. A free text (the user's vocabulary, a language model's proposal) that matches little
in the data, "face of a cat" on faces, still has a top 10% of most similar samples, and those may
well be worse; what it names is not what they show. The statistic (`probe_share`) is the share of
the text's direction from the attribute probes' centroid (every attribute value's canonical
prompt, texts known to describe this data) that the probes span: the `explained` share of
core/report/grounded.py `in_probe_basis`, which `compare` uses for its "off the data" cut. A text
below `offdomain_min_share` (0.6) is off-domain and never kept. It is a property of the wording:
the text tower is frozen, and the share is taken on its raw embeddings, the same in every world.
Measured with the default sentence model: off-domain texts 0.30-0.50 (an airplane 0.30, a
spaceship 0.32, a car 0.37, face of a cat 0.50), paraphrases of attributes 0.71-0.94 (a man
wearing glasses 0.71, an elderly man with a white beard 0.72, gray hair 0.86); 0.6 is midway.
What the labels do not describe is below too (a face in dim light 0.44, face of a child 0.54):
the rule reads "describes little the labelled attributes vary along", and says so. Composed
descriptions are made of probe words and are not filtered.

Wording. Where attribute labels exist, every kept description is checked against its own matched
samples (`wording`): for each attribute value it names, its precision (share of matched samples
with the value) and lift (precision / the split's base rate). A value is shown by the images when
its lift is at least `min_lift` or, for a value too common for that lift to be possible (base rate
above 1 / min_lift), when its precision closes half the distance from the base rate to 1. A
description whose named values are not all shown is reworded from the values its matched set does
over-represent ("goatee, gray hair" rather than "hat"), or marked "words not supported by the
images" when none stands out. Several values are one group only when the samples with all of
them pass the same test (`_together`): two hair colours each on half of the matched samples are
not "blond hair and gray hair". Free text names no label:
"unverified". Without labels: "unverified".

Modes (`assign_modes`). Kept descriptions are visited simplest first (free text and single
attributes, then pairs, then triples), better-worded first, then by measured AUROC. In turn:
1. one whose matched samples overlap an existing mode's by Jaccard >= `max_overlap` is folded
   under it, unless the labels tell the two apart: the people only its words name (its labels
   hold, the mode's do not) are measurably worse than the people neither names
   (identity-clustered, at `alpha`).
   The encoder can match the same images for two texts ("a necklace" and "earrings") whose
   people the labels tell apart; on tuning world 1007 the planted necklace was folded under
   earrings (bench/RESULTS.md, "Stop 27");
2. a refinement (a pair or triple) whose parents (its attribute values alone) are candidates must
   be worse than every parent: its matched losses against the losses of the samples only the
   parent matches (one-sided Mann-Whitney, the largest p over parents, Benjamini-Hochberg across
   refinements at `alpha`). If not, it is folded under its best parent's mode, or dropped when no
   parent is in a mode (its samples are no worse than samples it does not single out);
3. one whose images show the same labelled values as a mode's (`shown_attributes`: the same
   words to a reader, though found on other samples) is folded under it;
4. what is left is a new mode.
Then the labels judge modes whose people nest (`_fold_nested`): where one mode's people are among
another's ("a goatee" within "a man"), the narrower stands only when its people are worse than
the broader's others, the broader only when those others are worse than the people neither
names; one that fails while the other passes is folded under it. Modes are numbered by
`mode_rank`: those whose words the labels check by how much worse the people they name are
(`labelled_gap`), then the rest by their matched samples' measured AUROC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from llm2loss_pipeline.core.discovery.candidates import (
    Candidate,
    describe_values,
    is_negation,
    neutral_phrase,
)
from llm2loss_pipeline.core.discovery.verify import clustered_p_values, jaccard
from llm2loss_pipeline.core.report.grounded import in_probe_basis
from llm2loss_pipeline.core.stats import bh_adjust

SUPPORTED = "supported"
REWORDED = "reworded"
NOT_SUPPORTED = "words not supported by the images"
UNVERIFIED = "unverified"
_WORDING_ORDER = {SUPPORTED: 0, UNVERIFIED: 1, REWORDED: 2, NOT_SUPPORTED: 3}
KEPT_ON_LABELS = "kept on the labels"
"""how the reason of a mode the labels vouch for opens (hypotheses.py `_judge`; the CLI reads it)"""
KEPT_ON_LABELS_ALONE = f"{KEPT_ON_LABELS}: its images show its words"
"""how the reason opens when the labels alone vouch for it (the CLI reads it)"""
VOUCHED_WITH_SAMPLES = "with its samples"
"""kept on the labels: its matched samples and its named people are worse, the estimate is not"""
VOUCHED_LABELS_ALONE = "labels alone"
"""kept on the labels: its images show its words and its named people are worse (family-wise),
its matched samples are not measurably worse"""
MIN_PRECISION = 0.25
"""a value offered for a rewording must be on a quarter of the matched samples"""


def probe_share(texts: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """[T]: the share of each text's squared distance from the probes' centroid that the probes'
    own directions from it span (texts [T, d], probes [k, d], raw embeddings; module docstring).
    A probe itself scores 1; a text about something else, little more than its chance share."""
    probes = np.asarray(probes, dtype=np.float64)
    if probes.ndim != 2 or len(probes) < 2:
        raise ValueError("the off-domain rule needs at least two attribute probes")
    centre = probes.mean(axis=0)
    spanned = probes - centre
    # the duals only shape the mapped directions, which this rule does not use
    _, share = in_probe_basis(np.asarray(texts, dtype=np.float64) - centre, spanned, spanned)
    return share


@dataclass(frozen=True)
class Wording:
    verdict: str
    precision: float | None
    """lowest precision among the named values (None: nothing named, or no labels)"""
    lift: float | None
    """lowest lift among the named values"""
    shows: str
    """the values the matched set over-represents most, 'Goatee 54% (x4.1)'"""
    shown_as: str
    """the words the output shows: the description, or its rewording"""
    shown_attributes: str = ""
    """the labelled values `shown_as` states and the images show ('Goatee, Gray_Hair'); empty
    when the words are unverified or not supported"""
    shown_values: tuple[tuple[str, bool], ...] = ()
    """the same values as (attribute, value) keys"""


def value_rates(
    labels: Mapping[str, np.ndarray], matched: np.ndarray
) -> dict[tuple[str, bool], tuple]:
    """(precision, base rate, lift) of every attribute value over the matched samples."""
    rates = {}
    for name, column in labels.items():
        for value in (True, False):
            has = column == value
            base = float(has.mean())
            precision = float(has[matched].mean())
            rates[(name, value)] = (precision, base, precision / base if base > 0 else 0.0)
    return rates


def _shown(precision: float, base: float, lift: float, min_lift: float) -> bool:
    if precision <= base:
        return False
    if base * min_lift <= 1.0:
        return lift >= min_lift
    return precision >= (1.0 + base) / 2.0  # too common for the lift: half the way to all


def _over_represented(rates: dict, min_lift: float, avoid_subjective: bool) -> list:
    """Values the matched set over-represents by at least `min_lift`, highest lift first, that
    have wording to say them in: not worded as an absence ("without a hat": the text tower
    ignores the negation). A common value at 100% (lift 1.2) says nothing about the set."""
    shown = [
        (key, precision, lift)
        for key, (precision, _, lift) in rates.items()
        if lift >= min_lift and precision >= MIN_PRECISION and not is_negation(*key)
    ]
    if avoid_subjective:
        shown = [item for item in shown if neutral_phrase(*item[0]) is not None]
    return sorted(shown, key=lambda item: (-item[2], -item[1], item[0]))


def _together(
    labels: Mapping[str, np.ndarray],
    matched: np.ndarray,
    keys: Sequence[tuple[str, bool]],
    min_lift: float,
) -> bool:
    """Whether the matched set shows several values as one group: the samples with all of them
    pass the same test (`_shown`) as a single value. Two values over-represented on different
    samples (blond hair, gray hair) are not one group: "blond hair and gray hair" would name
    images that do not exist."""
    if len(keys) < 2:
        return True
    joint = np.ones(len(next(iter(labels.values()))), dtype=bool)
    for name, value in keys:
        joint &= np.asarray(labels[name]) == value
    base, precision = float(joint.mean()), float(joint[matched].mean())
    return base > 0 and _shown(precision, base, precision / base, min_lift)


def _label(key: tuple[str, bool]) -> str:
    name, value = key
    return name if value else f"not {name}"


def wording(
    candidate: Candidate,
    matched: np.ndarray,
    labels: Mapping[str, np.ndarray] | None,
    *,
    min_lift: float = 1.5,
    avoid_subjective: bool = True,
) -> Wording:
    """How well the matched samples show what `candidate` names (module docstring)."""
    if not labels:
        return Wording(UNVERIFIED, None, None, "", candidate.text)
    rates = value_rates(labels, matched)
    over = _over_represented(rates, min_lift, avoid_subjective)
    shows = ", ".join(f"{_label(key)} {p:.0%} (x{lift:.1f})" for key, p, lift in over[:3])
    named = [key for key in candidate.values if key in rates]
    if not named:
        return Wording(UNVERIFIED, None, None, shows, candidate.text)
    precision = min(rates[key][0] for key in named)
    lift = min(rates[key][2] for key in named)
    if all(_shown(*rates[key], min_lift) for key in named) and _together(
        labels, matched, named, min_lift
    ):
        stated = ", ".join(_label(key) for key in named)
        return Wording(SUPPORTED, precision, lift, shows, candidate.text, stated, tuple(named))
    usable = [key for key, _, _ in over][:2]
    if not _together(labels, matched, usable, min_lift):
        usable = usable[:1]
    if not usable:
        return Wording(NOT_SUPPORTED, precision, lift, shows, candidate.text)
    reworded = describe_values(usable, neutral=avoid_subjective)
    stated = ", ".join(_label(key) for key in reworded.values)
    values = tuple(reworded.values)
    return Wording(REWORDED, precision, lift, shows, reworded.text, stated, values)


def named_samples(
    labels: Mapping[str, np.ndarray], values: Sequence[tuple[str, bool]], n: int
) -> np.ndarray | None:
    """The samples whose labels hold every value; None when no value is named, or when every
    sample or none holds them (nothing to compare)."""
    if not values:
        return None
    group = np.ones(n, dtype=bool)
    for attribute, value in values:
        group &= np.asarray(labels[attribute], dtype=bool) == value
    return None if group.all() or not group.any() else group


def labelled_test(
    labels: Mapping[str, np.ndarray],
    values: Sequence[tuple[str, bool]],
    losses: np.ndarray,
    clusters: np.ndarray | None,
) -> tuple[np.ndarray | None, float, float]:
    """What the labels say of the people a mode's words name, with those people found once:
    (`named_samples`, the gap of their mean loss over the others', the one-sided p that their
    losses are larger: the matched-set test of verify.py, mid-ranks, identity-clustered). The gap
    and p are NaN when either side is empty."""
    group = named_samples(labels, values, losses.shape[0])
    if group is None:
        return None, float("nan"), float("nan")
    gap = float(losses[group].mean() - losses[~group].mean())
    p = float(clustered_p_values(losses, np.flatnonzero(group)[None, :], clusters)[0])
    return group, gap, p


def _parents(candidates: Sequence[Candidate]) -> dict[int, list[int]]:
    """For each composed candidate, the indices of its single-value candidates that exist."""
    singles = {c.values[0]: i for i, c in enumerate(candidates) if len(c.values) == 1}
    return {
        i: [singles[value] for value in c.values if value in singles]
        for i, c in enumerate(candidates)
        if len(c.values) >= 2 and any(value in singles for value in c.values)
    }


def interaction_p(losses: np.ndarray, matched: np.ndarray, parent: np.ndarray) -> float:
    """One-sided Mann-Whitney: are the refinement's matched losses larger than those of the
    samples only its parent matches? 1.0 when fewer than 3 such samples (the same group)."""
    only_parent = np.setdiff1d(parent, matched)
    if only_parent.size < 3 or np.ptp(losses) == 0:
        return 1.0
    test = sps.mannwhitneyu(losses[matched], losses[only_parent], alternative="greater")
    return float(test.pvalue)


def interaction_tests(
    rows: list[dict[str, Any]],
    candidates: Sequence[Candidate],
    matches: np.ndarray,
    losses: np.ndarray,
) -> dict[int, list[int]]:
    """Fill `interaction_p` / `interaction_q` of kept refinements; returns their parents."""
    parents = {i: p for i, p in _parents(candidates).items() if rows[i]["kept"]}
    tested = sorted(parents)
    p = [max(interaction_p(losses, matches[i], matches[j]) for j in parents[i]) for i in tested]
    q = bh_adjust(np.asarray(p, dtype=np.float64)) if tested else np.zeros(0)
    for i, p_i, q_i in zip(tested, p, q, strict=True):
        rows[i]["interaction_p"], rows[i]["interaction_q"] = float(p_i), float(q_i)
    return parents


def _named_worse(row: dict[str, Any]) -> float:
    """Sort key: the people a row's words name, worst off first (no labels: after)."""
    gap = row.get("labelled_gap", float("nan"))
    return -gap if np.isfinite(gap) else np.inf


def _visit_order(rows: list[dict[str, Any]], candidates: Sequence[Candidate]) -> list[int]:
    # Among equally simple and supported wordings, the one whose labelled people the model
    # fails most heads a mode. Two descriptions match the same images when the encoder cannot
    # tell them apart ("a man" and "a goatee"), and the labels can: the cause's own group is
    # worse than a subset or superset of it (stop 22, bench/RESULTS.md)
    kept = [i for i, row in enumerate(rows) if row["kept"]]
    return sorted(
        kept,
        key=lambda i: (
            max(1, len(candidates[i].values)),
            _WORDING_ORDER.get(rows[i]["wording"], 1),
            _named_worse(rows[i]),
            -rows[i]["measured_auc"],
            rows[i]["q_value"],
            i,
        ),
    )


def _fold(row: dict[str, Any], into: dict[str, Any], reason: str) -> None:
    row.update(verdict="folded", folded_under=into["description"], reason=reason)
    row["redundant_with"] = into["description"]


def assign_modes(
    rows: list[dict[str, Any]],
    candidates: Sequence[Candidate],
    matches: np.ndarray,
    losses: np.ndarray,
    *,
    max_overlap: float,
    alpha: float,
    clusters: np.ndarray | None = None,
) -> list[int]:
    """Group kept rows into modes (module docstring); returns the representatives, best first,
    after setting each kept row's verdict, mode, folded_under and reason. `clusters` (identity
    per sample) make the labels' test of overlapping descriptions identity-clustered."""
    parents = interaction_tests(rows, candidates, matches, losses)
    heads: list[int] = []
    for i in _visit_order(rows, candidates):
        row = rows[i]
        overlapping = [j for j in heads if jaccard(matches[i], matches[j]) >= max_overlap]
        apart = {j: _apart_p(row, rows[j], losses, clusters) for j in overlapping}
        twin = next((j for j in overlapping if not apart[j] <= alpha), None)
        if twin is not None:
            share = jaccard(matches[i], matches[twin])
            _fold(row, rows[twin], f"matches the same samples (Jaccard {share:.2f})")
            row["_head"] = twin
            continue
        if i in parents and _judge_refinement(rows, i, parents[i], alpha):
            continue
        same = _same_words(row, rows, heads)
        if same is not None:
            reason = f"its images show the same attributes ({row['shown_attributes']})"
            _fold(row, rows[same], reason)
            row["_head"] = same
            continue
        row.update(verdict="mode", reason=_kept_reason(row, alpha) + _apart_reason(rows, apart))
        row["_head"] = i
        heads.append(i)
    heads = _fold_nested(rows, heads, losses, clusters, alpha)
    return _number_modes(rows, heads)


MIN_APART = 5
"""The fewest people only a description names for the labels to set it apart: below it the
clustered test has nothing to rank."""


def _apart_p(
    row: dict[str, Any], twin: dict[str, Any], losses: np.ndarray, clusters: np.ndarray | None
) -> float:
    """One-sided identity-clustered p that the people only `row`'s words name (its labels hold,
    the twin's do not) have larger losses than the people neither names: a failure of its own
    where the matched sets overlap. The twin's own people are left out of the comparison: they
    are a failure mode already, and beside them a second, weaker one looks no worse than "the
    rest" (a planted Male under a strongly planted Goatee; bench/RESULTS.md, "Stop 28"). NaN
    (never apart) without labels for both, or too few people on either side."""
    mine, theirs = row.get("_named"), twin.get("_named")
    if mine is None or theirs is None:
        return float("nan")
    return _worse_p(losses, mine & ~theirs, ~(mine | theirs), clusters)


def _worse_p(
    losses: np.ndarray, group: np.ndarray, baseline: np.ndarray, clusters: np.ndarray | None
) -> float:
    """One-sided identity-clustered p that the `group` samples have larger losses than the
    `baseline` samples (two disjoint masks); NaN when either has fewer than MIN_APART."""
    if group.sum() < MIN_APART or baseline.sum() < MIN_APART:
        return float("nan")
    compared = group | baseline
    inside = np.flatnonzero(group[compared])[None, :]
    within = None if clusters is None else np.asarray(clusters)[compared]
    return float(clustered_p_values(losses[compared], inside, within)[0])


NESTED_SHARE = 0.9
"""A mode's labelled people are among another's when this share of them are (Goatee in Male)."""


def _fold_nested(
    rows: list[dict[str, Any]],
    heads: list[int],
    losses: np.ndarray,
    clusters: np.ndarray | None,
    alpha: float,
) -> list[int]:
    """One finding told by the labels, whatever the encoder matched: where one mode's people are
    among another's ("a goatee" within "a man"), the narrower stands apart only when its people
    are worse than the broader mode's others, and the broader only when those others are worse
    than the people neither names. A mode that fails its test while the other passes is folded
    under it; where both pass (or neither can tell), both stay. On tuning world 1003, a planted
    Male was outranked by its own goatee and beard modes (bench/RESULTS.md, "Stop 28")."""
    standing = list(heads)
    for narrow, broad in _nested_pairs(rows, heads):
        if narrow not in standing or broad not in standing:
            continue
        mine, theirs = rows[narrow]["_named"], rows[broad]["_named"]
        others = theirs & ~mine
        refine = _worse_p(losses, mine, others, clusters)
        rest = _worse_p(losses, others, ~(mine | theirs), clusters)
        refined, rest_worse = refine <= alpha, rest <= alpha
        if rest_worse and not refined:
            folded, into = narrow, broad
            reason = (
                f"the people its words name are among those of '{rows[broad]['description']}', "
                f"and no worse than the others of them (p {refine:.2g} > {alpha})"
            )
        elif refined and not rest_worse:
            folded, into = broad, narrow
            reason = (
                f"beyond the people of '{rows[narrow]['description']}', those its words name "
                f"are no worse than the rest (p {rest:.2g} > {alpha})"
            )
        else:
            continue
        _fold(rows[folded], rows[into], reason)
        # its variants join the mode; `folded_under` still names the words their reason
        # compares them with
        for row in rows:
            if row.get("_head") == folded:
                row["_head"] = into
        standing.remove(folded)
    return standing


def _nested_pairs(rows: list[dict[str, Any]], heads: list[int]) -> list[tuple[int, int]]:
    """(narrow, broad) pairs of modes with labels whose narrow people are mostly broad's, in
    the modes' visit order."""
    pairs = []
    for a in heads:
        for b in heads:
            mine, theirs = rows[a].get("_named"), rows[b].get("_named")
            if a == b or mine is None or theirs is None or mine.sum() >= theirs.sum():
                continue
            if (mine & theirs).sum() >= NESTED_SHARE * mine.sum():
                pairs.append((a, b))
    return pairs


def _apart_reason(rows: list[dict[str, Any]], apart: dict[int, float]) -> str:
    """What a mode's reason adds when its matched samples overlap other modes' (every one of
    them set apart by the labels, or it would have been folded)."""
    said = [f"'{rows[j]['description']}' (p {p:.2g})" for j, p in apart.items()]
    if not said:
        return ""
    return (
        "; it matches the same samples as "
        + ", ".join(said)
        + ", but the people only its words name are measurably worse than those neither names"
    )


def _judge_refinement(rows: list[dict[str, Any]], i: int, parents: list[int], alpha: float) -> bool:
    """Fold (under its best parent's mode) or drop a refinement no worse than its parents;
    returns whether it was (False: it is worse than them, and may stand as a mode)."""
    row = rows[i]
    if row["interaction_q"] <= alpha:
        return False
    in_modes = [j for j in parents if rows[j].get("verdict") in ("mode", "folded")]
    if not in_modes:
        row.update(
            kept=False,
            verdict="dropped",
            reason=f"not measurably worse than its parents (interaction q "
            f"{row['interaction_q']:.2g} > {alpha}), and they are no failure mode",
        )
        return True
    parent = min(in_modes, key=lambda j: rows[j]["q_value"])
    home = parent if rows[parent]["verdict"] == "mode" else rows[parent]["_head"]
    reason = (
        f"not measurably worse than its parent '{rows[parent]['description']}' "
        f"(interaction q {row['interaction_q']:.2g} > {alpha})"
    )
    _fold(row, rows[home], reason)
    row["_head"] = home
    return True


def _same_words(row: dict[str, Any], rows: list[dict[str, Any]], heads: list[int]) -> int | None:
    """The mode whose images show the same labelled values as `row`'s (None: none does): two
    descriptions that end up saying the same words are one finding to a reader."""
    mine = _value_set(row.get("shown_attributes"))
    if not mine:
        return None
    return next((j for j in heads if _value_set(rows[j].get("shown_attributes")) == mine), None)


def _value_set(stated: str | None) -> frozenset[str]:
    return frozenset(part.strip() for part in (stated or "").split(",") if part.strip())


def _kept_reason(row: dict[str, Any], alpha: float) -> str:
    if row.get("_vouched") == VOUCHED_LABELS_ALONE:
        reason = (
            f"{KEPT_ON_LABELS_ALONE} ({row['shown_attributes']} at "
            f"{row['named_lift']:.1f} times the base rate) and the people they name are worse "
            f"(gap {row['labelled_gap']:+.2f}, p {row['labelled_p']:.2g}, family-wise over "
            f"every candidate), though its matched samples are not measurably worse (gap "
            f"{row['measured_gap']:+.2f}, q {row['q_value']:.2g})"
        )
    elif row.get("_vouched"):
        reason = (
            f"{KEPT_ON_LABELS}: the matched samples are worse (q {row['q_value']:.2g} <= "
            f"{alpha}) and so are the people its words name ({row['shown_attributes']}: gap "
            f"{row['labelled_gap']:+.2f}, p {row['labelled_p']:.2g}), though the heads do not "
            f"estimate worse (P(worse) {row['p_worse']:.2f})"
        )
    else:
        reason = (
            f"kept: the heads estimate worse (P(worse) {row['p_worse']:.2f}) and the matched "
            f"samples are worse (q {row['q_value']:.2g} <= {alpha})"
        )
    if np.isfinite(row.get("interaction_q", np.nan)):
        reason += f"; worse than its parents (interaction q {row['interaction_q']:.2g})"
    return reason


def mode_rank(row: dict[str, Any]) -> tuple:
    """Sort key of a mode's representative, first first: modes whose words the labels check,
    by how much worse the people they name are (`labelled_gap`); then the others (free text, or
    no labels) by their matched samples' measured AUROC. The matched samples of a broad group
    ("a man", half the people) are a tenth of the data mixed with its other half, so their
    AUROC ranked a planted Male below its own facets (bench/RESULTS.md, "Stop 28")."""
    gap = row.get("labelled_gap", float("nan"))
    if np.isfinite(gap):
        return (0, -gap, row["q_value"])
    return (1, -row["measured_auc"], row["q_value"])


def _number_modes(rows: list[dict[str, Any]], heads: list[int]) -> list[int]:
    ordered = sorted(heads, key=lambda i: (*mode_rank(rows[i]), i))
    ids = {i: position + 1 for position, i in enumerate(ordered)}
    for i in ordered:
        rows[i]["mode"] = ids[i]
        rows[i]["n_variants"] = 0
    for row in rows:
        if row.get("verdict") == "folded":
            row["mode"] = ids[row["_head"]]
            rows[row["_head"]]["n_variants"] += 1
    return ordered


def dropped_reason(row: dict[str, Any], config: Any) -> str:
    """Why a candidate that is not a failure mode was dropped, in one line."""
    if row.get("reason"):  # off-domain, or a refinement no worse than its parents
        return row["reason"]
    samples_worse = row["measured_gap"] > 0 and row["measured_auc"] > 0.5
    significant = samples_worse and row["q_value"] <= config.alpha
    gate = row.get("_p_gate", config.min_p_worse)  # the estimator's own (hypotheses.py)
    heads_worse = row["estimated_gap"] > 0 and row["p_worse"] >= gate
    if not significant:
        return (
            f"matched samples not measurably worse (gap {row['measured_gap']:+.2f}, "
            f"q {row['q_value']:.2g} > {config.alpha})"
            if samples_worse
            else f"matched samples not worse (gap {row['measured_gap']:+.2f})"
        )
    if not heads_worse:
        return (
            f"estimate disagrees: the matched samples are worse (q {row['q_value']:.2g}) but the "
            f"heads do not estimate worse (estimate {row['estimated_gap']:+.2f}, P(worse) "
            f"{row['p_worse']:.2f} < {gate}); kept only when both agree"
        )
    return "dropped"
