"""`compare` asked as the report's probe: free text against the probe's answer, on world homes.

A free-text question whose difference one report probe holds (its share of the question's
coefficients in the probe basis, core/heads/probe_reading.py) can take the report's calibrated
P(worse with that attribute) instead of free text's own P (twice the report's text error, at
least 0.6). This script re-asks, on the homes `bench/worlds.py` left behind (nothing retrained),
three sets of questions with known population truth:

- `hand`: the benchmark's questions in a user's own words (bench/worlds.py QUESTIONS);
- `new`: single-attribute questions in wordings of this script's own, none of them a probe's
  phrasing (PARAPHRASES);
- `probe`: one of each probe's own prompt pairs (what bench/worlds.py asks as well);

and scores each rule (free text only; the probe's answer where its share is at least S) with
the ECE, the Brier score, the share of answers on the right side and the answers stated at
P >= 0.9 (n, right):

    .venv/bin/python bench/compare_probes.py /tmp/tune/world-100?          # choose S on these
    .venv/bin/python bench/compare_probes.py --shares 0.8 /tmp/rep/world-20??
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from text_error_fit import world_inputs
from worlds import QUESTIONS

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.heads.compare import CLAIM, free_text_p_worse
from llm2loss_pipeline.core.prompts import PHRASES, attribute_prompt_pairs
from llm2loss_pipeline.core.truth import calibration_table, condition_gap

# (text A, text B, attribute): A has it, B has not; wordings not among the probes' phrases
PARAPHRASES: list[tuple[str, str, str]] = [
    ("a man", "a woman", "Male"),
    ("a photo of a blond man", "a photo of a blond woman", "Male"),
    ("a young person", "an elderly person", "Young"),
    ("someone with silver hair", "someone with brown hair", "Gray_Hair"),
    ("a gray-haired person", "a person whose hair is not gray", "Gray_Hair"),
    ("a man with a mustache", "a man without a mustache", "Mustache"),
    ("a person with bangs", "a person whose forehead is uncovered", "Bangs"),
    ("a woman wearing lipstick", "a woman with bare lips", "Wearing_Lipstick"),
    ("a person with a big nose", "a person with a small nose", "Big_Nose"),
    ("someone with pale skin", "someone with a tan", "Pale_Skin"),
    ("a chubby face", "a thin face", "Chubby"),
    ("a person wearing a tie", "a person with an open collar", "Wearing_Necktie"),
    ("a person with curly hair", "a person with straight hair", "Wavy_Hair"),
    ("a woman with earrings", "a woman without earrings", "Wearing_Earrings"),
    ("a person with a goatee", "a person without a goatee", "Goatee"),
    ("an out-of-focus photo", "an in-focus photo", "Blurry"),
    ("a person in a cap", "a hatless person", "Wearing_Hat"),
    ("a grinning face", "a serious face", "Smiling"),
    ("a person with a receding hairline", "a person with a full hairline", "Receding_Hairline"),
    ("a bearded man", "a beardless man", "No_Beard"),
]
PARAPHRASES_ATTRIBUTES = [name for _, _, name in PARAPHRASES]
DEFAULT_SHARES = "0.5,0.6,0.7,0.8,0.9"


def questions() -> list[tuple[str, dict[str, bool], str, dict[str, bool], str]]:
    asked = [(a, ca, b, cb, "hand") for a, ca, b, cb in QUESTIONS]
    for a, b, name in PARAPHRASES:
        # the beardless side of No_Beard: a bearded man is No_Beard False
        has = name != "No_Beard"
        asked.append((a, {name: has}, b, {name: not has}, "new"))
    for name in CELEBA_ATTRIBUTES:
        positive, negative = attribute_prompt_pairs(name)[-1]  # as bench/worlds.py asks
        asked.append((positive, {name: True}, negative, {name: False}, "probe"))
    return asked


def world_answers(home: Path) -> list[dict[str, Any]]:
    inputs = world_inputs(home)
    diagnoser = inputs["diagnoser"]
    asked = questions()
    answers = diagnoser.compare_many([(a, b) for a, _, b, _, _ in asked])
    calibration = diagnoser.calibration("grounded")
    rows = []
    for (a, cond_a, b, cond_b, kind), answer in zip(asked, answers, strict=True):
        probe = answer.probe
        rows.append(
            {
                "seed": inputs["seed"],
                "kind": kind,
                "a": a,
                "b": b,
                "truth": condition_gap(inputs["loss"], inputs["table"], cond_a, cond_b),
                "off_data": answer.off_data,
                "p_free": free_text_p_worse(np.asarray(answer.diffs), calibration),
                "probe": probe.to_dict() if probe is not None else None,
                "p_probe": probe.p_a_worse if probe is not None else math.nan,
            }
        )
    return rows


def p_under(rows: list[dict[str, Any]], share: float | None) -> np.ndarray:
    """Each answer's P(A worse) with questions asked as a probe from `share` on (None: never)."""

    def routed(row: dict[str, Any]) -> bool:
        probe = row["probe"]
        return (
            share is not None
            and probe is not None
            and probe["resolves"]
            and probe["share"] >= share
            and math.isfinite(probe["p_worse"])
        )

    return np.array([row["p_probe"] if routed(row) else row["p_free"] for row in rows])


def score(p: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    worse = truth > 0
    right = np.where(p >= 0.5, worse, ~worse)
    sure = np.maximum(p, 1 - p) >= CLAIM
    return {
        "n": int(p.size),
        "ece": calibration_table(p, worse)["ece"],
        "brier": float(np.mean((p - worse) ** 2)),
        "right": float(right.mean()),
        "sure": int(sure.sum()),
        "sure_right": float(right[sure].mean()) if sure.any() else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("homes", nargs="+", type=Path)
    parser.add_argument("--shares", default=DEFAULT_SHARES, help="comma-separated candidates")
    parser.add_argument("--json", type=Path, help="write every answer here")
    args = parser.parse_args(argv)
    missing = sorted(set(PARAPHRASES_ATTRIBUTES) - set(PHRASES))
    if missing:
        parser.error(f"PARAPHRASES name unknown attributes: {missing}")
    homes = [h for h in args.homes if (h / "reports" / "attribute_disparity.parquet").exists()]
    rows = [row for home in homes for row in world_answers(home)]
    rows = [row for row in rows if math.isfinite(row["truth"]) and not row["off_data"]]
    print(f"{len(homes)} worlds: {sorted({row['seed'] for row in rows})}; {len(rows)} answers")
    rules: list[tuple[str, float | None]] = [("free text only", None)]
    rules += [(f"probe from share {s}", float(s)) for s in args.shares.split(",")]
    print("questions | rule | answers (asked as a probe) | ECE | Brier | right | P>=0.9 (n, right)")
    for kinds in (("hand", "new"), ("hand", "new", "probe")):
        chosen = [row for row in rows if row["kind"] in kinds]
        truth = np.array([row["truth"] for row in chosen])
        free = p_under(chosen, None)
        for label, share in rules:
            p = p_under(chosen, share)
            s = score(p, truth)
            print(
                f"{'+'.join(kinds)} | {label} | {s['n']} ({int((p != free).sum())}) | "
                f"{s['ece']:.3f} | {s['brier']:.4f} | {s['right']:.2f} | "
                f"{s['sure']}, {s['sure_right']:.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
