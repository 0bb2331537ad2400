"""Failure modes: overlap folding, the refinement's interaction test, words checked against the
labels, the off-domain rule, evidence whose names fit, neutral wording, a self-contained page."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from PIL import Image

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.discovery.candidates import (
    NEUTRAL_WORDING,
    Candidate,
    describe_values,
    generate_candidates,
    neutral_phrase,
    single_candidates,
)
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.evidence import discovery_html, fmt
from llm2loss_pipeline.core.discovery.hypotheses import (
    EvalData,
    _q_values,
    discover,
    pick_evidence,
    simple_weights,
)
from llm2loss_pipeline.core.discovery.modes import (
    NOT_SUPPORTED,
    REWORDED,
    SUPPORTED,
    UNVERIFIED,
    assign_modes,
    interaction_p,
    labelled_test,
    mode_rank,
    probe_share,
    wording,
)
from llm2loss_pipeline.core.discovery.verify import clustered_p_values, match_count
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.heads.train import train_ensemble
from llm2loss_pipeline.core.prompts import PHRASES, Phrase

SUBJECTIVE_WORDS = ("attractive", "chubby", "big nose", "big lips", "double chin", "bags under")


# neutral vocabulary


def test_composed_descriptions_avoid_subjective_words_by_default() -> None:
    assert DiscoveryConfig().avoid_subjective is True
    neutral = single_candidates(CELEBA_ATTRIBUTES, avoid_subjective=True)
    texts = " | ".join(c.text.lower() for c in neutral)
    assert not any(word in texts for word in SUBJECTIVE_WORDS), texts
    assert not any(name == "Attractive" for c in neutral for name, _ in c.values)
    chubby = next(c for c in neutral if c.values == (("Chubby", True),))
    assert chubby.text == "face of a person with a round full face"
    # the value stays the description's, so the labels still verify it
    nose = describe_values([("Big_Nose", True), ("Gray_Hair", True)], neutral=True)
    assert nose.values == (("Big_Nose", True), ("Gray_Hair", True))
    assert "prominent nose" in nose.text and "gray hair" in nose.text
    with pytest.raises(ValueError, match="no neutral wording for Attractive"):
        describe_values([("Attractive", False)], neutral=True)
    # opted out: the report's canonical words, "unattractive" included
    canonical = " | ".join(
        c.text for c in single_candidates(CELEBA_ATTRIBUTES, avoid_subjective=False)
    )
    assert "face of an unattractive person" in canonical


def test_a_vocabulary_line_that_is_an_attribute_phrase_keeps_its_values() -> None:
    candidates = generate_candidates(
        lambda texts: np.zeros(len(texts)),
        max_arity=1,
        vocabulary=["Face of a person  with a goatee"],
        attributes=CELEBA_ATTRIBUTES,
    )
    first = candidates[0]
    assert first.source == "vocabulary" and first.values == (("Goatee", True),)
    assert sum("goatee" in c.text.lower() for c in candidates) == 1


def test_neutral_words_are_words_the_encoder_is_trained_on() -> None:
    # the caption-tuned encoder learns PHRASES' words; "shadows under the eyes", outside them,
    # matched bald men with sideburns on a world with planted Bags_Under_Eyes (stop 29)
    for (attribute, value), raw in NEUTRAL_WORDING.items():
        if raw is None:
            continue
        slot, _, words = raw.partition(":")
        trained = PHRASES[attribute][0 if value else 1]
        assert raw in trained, f"{attribute}={value}: {raw!r} is not one of {trained}"
        assert neutral_phrase(attribute, value) == Phrase(slot, words)


def test_pairs_grown_from_the_beam_are_neutral_too() -> None:
    def score(texts):  # rate the subjective singles worst, so the beam starts from them
        return np.array([5.0 if ("round" in t or "prominent" in t) else 0.0 for t in texts])

    candidates = generate_candidates(
        score, max_arity=2, beam=2, avoid_subjective=True, attributes=CELEBA_ATTRIBUTES
    )
    pairs = [c for c in candidates if c.source == "pair"]
    assert pairs and all(word not in c.text for c in pairs for word in SUBJECTIVE_WORDS)
    assert any(("Chubby", True) in c.values for c in pairs)


# off-domain


def test_probe_share_is_the_share_of_the_direction_the_probes_span() -> None:
    # probes at e0, e1, e2: centroid (1/3, 1/3, 1/3, 0), their directions from it span the plane
    # x0 + x1 + x2 = 0 of the first three axes
    probes = np.eye(4)[:3]
    texts = np.array(
        [
            [1.0, 0.0, 0.0, 0.0],  # a probe: 1
            [0.0, 0.0, 0.0, 1.0],  # e3: from the centroid (-1/3, -1/3, -1/3, 1), 0 spanned
            [1.0, 1.0, 1.0, 0.0],  # along the centroid itself: nothing the probes vary along
            [5 / 6, -1 / 6, 1 / 3, 0.5],  # c + (0.5, -0.5, 0, 0.5): 0.5 of |t - c|^2 0.75
        ]
    )
    share = probe_share(texts, probes)
    assert share == pytest.approx([1.0, 0.0, 0.0, 2 / 3], abs=1e-5)
    assert DiscoveryConfig().offdomain_min_share == 0.6
    with pytest.raises(ValueError, match="at least two attribute probes"):
        probe_share(texts, probes[:1])


# words against labels


def _labels(n: int = 200) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Goatee on samples 0-39 (20%), Gray_Hair on 0-29 and 100-129, hats at 10% everywhere."""
    idx = np.arange(n)
    labels = {
        "Goatee": idx < 40,
        "Gray_Hair": (idx < 30) | ((idx >= 100) & (idx < 130)),
        "Wearing_Hat": idx % 10 == 0,
    }
    return labels, idx[:40]  # the matched set: the goatee samples


def test_a_description_its_images_do_not_show_is_reworded_from_what_they_do() -> None:
    labels, matched = _labels()
    goatee = wording(describe_values([("Goatee", True)]), matched, labels)
    assert goatee.verdict == SUPPORTED
    assert goatee.precision == 1.0 and goatee.lift == pytest.approx(5.0)
    hat = wording(describe_values([("Wearing_Hat", True)]), matched, labels)
    assert hat.verdict == REWORDED
    assert hat.precision == pytest.approx(0.1) and hat.lift == pytest.approx(1.0)
    assert hat.shown_as == "face of a person with a goatee and gray hair"
    assert hat.shown_attributes == "Goatee, Gray_Hair" and goatee.shown_attributes == "Goatee"
    assert hat.shows.startswith("Goatee 100% (x5.0), Gray_Hair 75% (x2.5)")
    # two values over-represented on different samples are not one group: only the first named
    hair = {
        "Blond_Hair": np.arange(200) < 20,
        "Gray_Hair": (np.arange(200) >= 20) & (np.arange(200) < 40),
        "Wearing_Hat": labels["Wearing_Hat"],
    }
    apart = wording(describe_values([("Wearing_Hat", True)]), np.arange(40), hair)
    assert apart.verdict == REWORDED and apart.shown_attributes in ("Blond_Hair", "Gray_Hair")
    # ... nor is a description naming both supported by them
    both = describe_values([("Blond_Hair", True), ("Gray_Hair", True)])
    assert wording(both, np.arange(40), hair).verdict != SUPPORTED
    # a pair on a fifth of the matched samples, five times its base rate, is one group
    idx = np.arange(200)
    pair = {
        "Gray_Hair": idx < 20,
        "Pointy_Nose": (idx >= 12) & (idx < 30),
        "Wearing_Hat": labels["Wearing_Hat"],
    }
    rare = wording(describe_values([("Wearing_Hat", True)]), np.arange(40), pair)
    assert rare.shown_attributes == "Gray_Hair, Pointy_Nose"
    # nothing over-represented: marked, not reworded
    spread = np.arange(3, 200, 5)  # every attribute at its base rate, no hat at all
    flat = wording(describe_values([("Wearing_Hat", True)]), spread, labels)
    assert flat.verdict == NOT_SUPPORTED and flat.shown_as == "face of a person wearing a hat"
    # free text names no label; without labels nothing is verified
    assert flat.shows == ""  # "not Wearing_Hat 100%" is worded as an absence: not offered
    assert wording(Candidate("a cat", "vocabulary"), matched, labels).verdict == UNVERIFIED
    assert wording(describe_values([("Goatee", True)]), matched, None).verdict == UNVERIFIED


# modes


def _row(description: str, auc: float, q: float = 1e-6, wording_: str = SUPPORTED) -> dict:
    return {
        "description": description,
        "kept": True,
        "wording": wording_,
        "measured_auc": auc,
        "q_value": q,
        "p_worse": 1.0,
        "interaction_p": float("nan"),
        "interaction_q": float("nan"),
    }


def test_overlapping_descriptions_are_one_mode_and_refinements_need_an_interaction() -> None:
    rng = np.random.default_rng(0)
    n = 400
    losses = rng.exponential(1.0, n)
    losses[:40] += 2.0  # the goatee group is worse
    losses[200:220] += 6.0  # goatee + glasses is much worse than goatee alone
    goatee = describe_values([("Goatee", True)])
    glasses = describe_values([("Eyeglasses", True)])
    candidates = [
        goatee,
        glasses,
        describe_values([("Goatee", True), ("Gray_Hair", True)]),  # the same samples
        describe_values([("Goatee", True), ("Smiling", True)]),  # fewer, no worse
        describe_values([("Eyeglasses", True), ("Goatee", True)]),  # much worse
        Candidate("a second wording of goatee", "vocabulary"),
        describe_values([("Eyeglasses", True), ("Young", False)]),  # glasses' easy half
    ]
    matches = np.array(
        [
            np.arange(0, 40),
            np.r_[np.arange(200, 220), np.arange(300, 320)],
            np.r_[np.arange(2, 40), np.arange(50, 52)],
            np.r_[np.arange(0, 15), np.arange(100, 125)],
            np.r_[np.arange(200, 220), np.arange(20, 40)],
            np.r_[np.arange(0, 36), np.arange(60, 64)],
            np.r_[np.arange(300, 320), np.arange(320, 340)],
        ]
    )
    aurocs = [0.8, 0.6, 0.81, 0.7, 0.95, 0.79, 0.9]
    rows = [_row(c.text, auc) for c, auc in zip(candidates, aurocs, strict=True)]
    rows[1]["kept"] = False  # glasses alone: no failure
    heads = assign_modes(rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05)

    assert [rows[i]["description"] for i in heads] == [candidates[4].text, goatee.text]
    assert rows[4]["verdict"] == "mode" and rows[4]["mode"] == 1
    assert rows[4]["interaction_q"] <= 0.05
    assert rows[0]["verdict"] == "mode" and rows[0]["n_variants"] == 3
    for i in (2, 5):  # overlap
        assert rows[i]["verdict"] == "folded" and rows[i]["redundant_with"] == goatee.text
        assert "Jaccard" in rows[i]["reason"] and rows[i]["mode"] == 2
    assert rows[3]["verdict"] == "folded" and rows[3]["interaction_q"] > 0.05
    assert "not measurably worse than its parent" in rows[3]["reason"]
    # a refinement no worse than its parent, which is no failure mode: not a mode at all
    assert rows[6]["verdict"] == "dropped" and not rows[6]["kept"]
    assert "no failure mode" in rows[6]["reason"] and rows[6]["interaction_q"] > 0.05


@pytest.mark.parametrize("necklace_worse", [True, False])
def test_the_labels_keep_apart_what_the_matched_sets_cannot(necklace_worse: bool) -> None:
    """The encoder matches the same images for "earrings" and "necklace" (tuning world 1007), but
    the labels name other people: a necklace wearer without earrings who is worse is a failure
    of its own; one who is not is the earrings' mode again."""
    rng = np.random.default_rng(1)
    n, identities = 600, np.repeat(np.arange(120), 5)
    losses = rng.exponential(1.0, n)
    earrings = np.zeros(n, dtype=bool)
    earrings[:100] = True
    necklace = np.zeros(n, dtype=bool)
    necklace[50:150] = True  # half with earrings, half (100-149) without
    losses[:100] += 2.0
    if necklace_worse:
        losses[100:150] += 2.0
    candidates = [
        describe_values([("Wearing_Earrings", True)]),
        describe_values([("Wearing_Necklace", True)]),
    ]
    # the same matched samples for both texts (Jaccard 0.8), as the encoder reads them
    matches = np.array([np.arange(0, 100), np.arange(10, 110)])
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.9, 0.8], strict=True)]
    rows[0]["_named"], rows[1]["_named"] = earrings, necklace
    heads = assign_modes(
        rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05, clusters=identities
    )
    if necklace_worse:
        assert heads == [0, 1] and rows[1]["verdict"] == "mode"
        assert "only its words name are measurably worse than those neither" in rows[1]["reason"]
        assert candidates[0].text in rows[1]["reason"]
    else:
        assert heads == [0]
        assert rows[1]["verdict"] == "folded" and "Jaccard" in rows[1]["reason"]
    # without labels for both, matched sets alone decide, as before
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.9, 0.8], strict=True)]
    rows[1]["_named"] = necklace
    assert assign_modes(rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05) == [0]


def test_a_weaker_failure_is_kept_apart_from_a_stronger_one_it_overlaps() -> None:
    """A planted Male under a strongly planted Goatee (tuning world 1003): the men without a
    goatee are worse than the women, though not worse than everyone else, since everyone else
    holds the goatees. The labels' test compares them with the people neither names."""
    rng = np.random.default_rng(1)
    n, identities = 600, np.repeat(np.arange(120), 5)
    losses = rng.exponential(1.0, n)
    goatee, male = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    goatee[:200], male[:300] = True, True
    losses[:200] += 4.0
    losses[200:300] += 0.6
    candidates = [describe_values([("Goatee", True)]), describe_values([("Male", True)])]
    matches = np.array([np.arange(0, 100), np.arange(20, 120)])  # Jaccard 0.67
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.9, 0.7], strict=True)]
    rows[0]["_named"], rows[1]["_named"] = goatee, male
    only = np.flatnonzero(male & ~goatee)
    # against everyone else, the goatees included, the men without one look no worse
    assert clustered_p_values(losses, only[None, :], identities)[0] > 0.05
    heads = assign_modes(
        rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05, clusters=identities
    )
    assert heads == [0, 1] and rows[1]["verdict"] == "mode"
    assert candidates[0].text in rows[1]["reason"]


@pytest.mark.parametrize("planted", ["Male", "Goatee"])
def test_a_mode_whose_people_are_among_another_modes_is_one_finding(planted: str) -> None:
    """ "a goatee" names some of the people "a man" names, and the encoder matches other images
    for each (no overlap). Men planted: the goatee is a facet of it, folded under "a man".
    Goatees planted: "a man" only says it again, folded under "a goatee". Mode 1 is the group the
    labels say the model fails most, whatever its matched samples' AUROC."""
    rng = np.random.default_rng(2)
    n, identities = 600, np.repeat(np.arange(120), 5)
    losses = rng.exponential(1.0, n)
    male, goatee = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    male[:300], goatee[:100] = True, True
    losses[male if planted == "Male" else goatee] += 1.5
    candidates = [describe_values([("Male", True)]), describe_values([("Goatee", True)])]
    matches = np.array([np.arange(200, 260), np.arange(0, 60)])  # apart
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.6, 0.8], strict=True)]
    for row, named in zip(rows, [male, goatee], strict=True):
        row["_named"] = named
        row["labelled_gap"] = float(losses[named].mean() - losses[~named].mean())
    heads = assign_modes(
        rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05, clusters=identities
    )
    kept, folded = (0, 1) if planted == "Male" else (1, 0)
    assert heads == [kept]
    assert rows[folded]["verdict"] == "folded" and rows[folded]["mode"] == 1
    assert rows[folded]["folded_under"] == candidates[kept].text
    assert rows[kept]["n_variants"] == 1
    said = "among those of" if planted == "Male" else "are no worse than the rest"
    assert said in rows[folded]["reason"]


def test_modes_the_labels_check_rank_by_how_much_worse_their_people_are() -> None:
    rows = [_row("broad", 0.58), _row("narrow", 0.9), _row("free text", 0.95)]
    rows[0]["labelled_gap"], rows[1]["labelled_gap"] = 0.8, 0.3
    rows[2]["labelled_gap"] = float("nan")  # free text names no label
    assert sorted(range(3), key=lambda i: mode_rank(rows[i])) == [0, 1, 2]


def test_descriptions_whose_images_show_the_same_attributes_are_one_mode() -> None:
    losses = np.r_[np.full(100, 3.0), np.linspace(0, 1, 300)]
    candidates = [Candidate(f"text {i}", "vocabulary") for i in range(3)]
    matches = np.array([np.arange(0, 30), np.arange(50, 80), np.arange(200, 230)])
    rows = [_row(c.text, 0.9 - 0.1 * i) for i, c in enumerate(candidates)]
    for row, shown in zip(rows, ["Goatee, Gray_Hair", "Gray_Hair, Goatee", "Goatee"], strict=True):
        row["shown_attributes"] = shown
    heads = assign_modes(rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05)
    assert heads == [0, 2]
    assert rows[1]["verdict"] == "folded" and rows[1]["folded_under"] == "text 0"
    assert "show the same attributes" in rows[1]["reason"]
    assert rows[2]["verdict"] == "mode" and rows[0]["n_variants"] == 1


def test_the_interaction_test_compares_against_the_parents_own_samples() -> None:
    losses = np.r_[np.full(20, 5.0), np.full(20, 1.0), np.linspace(0, 1, 60)]
    parent = np.arange(40)
    assert interaction_p(losses, np.arange(20), parent) < 1e-6
    assert interaction_p(losses, np.arange(20, 40), parent) == 1.0 or (
        interaction_p(losses, np.arange(20, 40), parent) > 0.99
    )
    assert interaction_p(losses, np.arange(39), parent) == 1.0  # parent-only: 1 sample


# evidence


def test_counter_examples_are_the_easy_matched_samples_and_proponents_the_hard_ones() -> None:
    rng = np.random.default_rng(4)
    losses = rng.exponential(1.0, 300)
    matched = np.arange(60)
    influence = rng.normal(size=60)
    influence[np.argmax(losses[matched])] = -5.0  # a hard sample that pulls the estimate down
    proponents, counter = pick_evidence(losses, matched, influence, 8)
    median = np.median(losses[60:])
    assert proponents and counter
    assert max(losses[matched][counter]) <= median < min(losses[matched][proponents])
    assert int(np.argmax(losses[matched])) not in counter  # was the first counter-example
    assert all(influence[k] > 0 for k in proponents)
    assert list(influence[counter]) == sorted(influence[counter])


# the page


def test_the_page_stands_alone_links_back_and_explains_its_words(tmp_path) -> None:
    sheet = tmp_path / "discovery" / "hypothesis-01.png"
    sheet.parent.mkdir()
    Image.new("RGB", (4, 4), "red").save(sheet)
    table = pl.DataFrame(
        {
            "rank": [1, 2],
            "mode": [1, None],
            "verdict": ["mode", "dropped"],
            "description": ["face of a person wearing a hat", "a cat"],
            "shown_as": ["face of a person with gray hair and a goatee", "a cat"],
            "wording": [REWORDED, UNVERIFIED],
            "source": ["attribute", "vocabulary"],
            "kept": [True, False],
            "estimated_gap": [0.5, -0.1],
            "p_worse": [1.0, 0.2],
            "measured_gap": [1.4, 0.2],
            "measured_auc": [0.8, 0.55],
            "q_value": [1e-9, 0.3],
            "n_matched": [72, 72],
            "n_supporting": [40, 10],
            "n_variants": [3, None],
            "shows": ["Goatee 54% (x4.1)", None],
            "reason": ["kept: ...", "off-domain: matches little in the data"],
        }
    )
    page = discovery_html(table, {1: sheet}, tmp_path / "discovery.html").read_text()
    assert "data:image/png;base64," in page and "hypothesis-01.png" not in page
    assert 'href="report.html"' in page
    assert "proponents: matched samples the model does worse on" in page
    assert "counter-examples: matched samples the model does fine on" in page
    assert "kept only when both agree" in page and "Your vocabulary" in page
    assert ">True<" not in page and ">None<" not in page and ">nan<" not in page
    assert fmt(True) == "yes" and fmt(None) == "-" and fmt(float("nan")) == "-"


def test_discover_help_explains_proponents_and_counter_examples(capsys) -> None:
    from llm2loss_pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["discover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "proponents: matched samples the model does worse on" in text
    assert "counter-examples: matched samples the model does fine on" in text
    assert "--only-vocab" in text
    assert main(["discover", "--only-vocab"]) == 2
    assert "--only-vocab needs --vocab FILE" in capsys.readouterr().err


# the whole judgement on constructed embeddings

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def world():
    """Images in the span of e0..e7 (the data's domain, widest along e0), a faint trace of the
    worse group along e12; the 20% furthest along e0 are worse."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    def draw(n):
        x = np.zeros((n, DIM))
        x[:, :8] = rng.normal(size=(n, 8)) * np.r_[2.0, np.ones(7)]  # e0: the data's main axis
        x = _unit(x)
        group = x[:, 0] > np.quantile(x[:, 0], 0.8)
        x[:, 12] = 0.02 * group
        loss = rng.exponential(0.5, n) + 1.5 * (group & (rng.random(n) < 0.8))
        return _unit(x).astype(np.float32), loss

    train_x, train_loss = draw(800)
    eval_x, eval_loss = draw(600)
    ensemble = train_ensemble(
        train_x, train_loss, HeadsConfig(n_seeds=2, epochs=15, hidden=16, min_steps=50)
    )
    gap = ModalityGap(np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), mode="none")
    eval_data = EvalData([f"s{i:04d}.jpg" for i in range(600)], eval_x, eval_loss)
    probes = np.zeros((20, DIM))
    probes[:, :8] = rng.normal(size=(20, 8))
    return ensemble, gap, eval_data, train_x, train_loss, _unit(probes).astype(np.float32)


def _discover_in(world, candidates, texts, labels=None, config=None):
    """`discover` on the `world` fixture's heads, samples and probes (default settings unless
    `config`)."""
    ensemble, gap, eval_data, train_x, train_loss, probes = world
    return discover(
        candidates,
        np.asarray(texts, dtype=np.float32),
        ensemble,
        gap,
        eval_data,
        train_x,
        config or DiscoveryConfig(),
        train_losses=train_loss,
        labels=labels,
        probe_embeddings=probes,
    )


def test_off_domain_text_is_reported_not_kept_and_near_duplicates_fold(world) -> None:
    group = np.eye(DIM)[0]
    candidates = [
        Candidate("the group", "vocabulary"),
        Candidate("the group, said again", "vocabulary"),
        Candidate("a cat", "vocabulary"),
    ]
    texts = np.vstack([group, _unit(group + 0.05 * np.eye(DIM)[1]), np.eye(DIM)[12]])
    result = _discover_in(world, candidates, texts)
    rows = {row["description"]: row for row in result.hypotheses.to_dicts()}
    cat = rows["a cat"]
    assert cat["measured_gap"] > 0.5 and cat["q_value"] < 1e-6  # its top decile IS the group
    assert cat["verdict"] == "off-domain" and not cat["kept"]
    # e12 - centroid: only the centroid part, |c|^2 / (1 + |c|^2), is spanned
    assert cat["probe_share"] < 0.1 and "off-domain" in cat["reason"]
    assert rows["the group"]["probe_share"] > 0.99  # inside the probes' span
    assert rows["the group"]["verdict"] == "mode" and rows["the group"]["n_variants"] == 1
    again = rows["the group, said again"]
    assert again["verdict"] == "folded" and again["redundant_with"] == "the group"
    assert result.n_modes == 1 and result.n_kept == 2
    assert result.hypotheses.row(0, named=True)["description"] == "the group"
    assert all(row["reason"] for row in rows.values())


def test_a_mode_whose_images_show_other_attributes_is_shown_in_their_words(world) -> None:
    eval_data = world[2]
    group = eval_data.embeddings[:, 12] > 0  # the worse group, as labelled
    hats = np.random.default_rng(5).random(group.size) < 0.1  # unrelated to the group
    labels = {"Goatee": group, "Wearing_Hat": hats}
    hat = describe_values([("Wearing_Hat", True)])  # words about hats, embedding at the group
    result = _discover_in(world, [hat], np.eye(DIM)[:1], labels)
    row = result.hypotheses.row(0, named=True)
    assert row["verdict"] == "mode" and row["description"] == hat.text
    assert row["wording"] == REWORDED and row["shown_as"] == "face of a person with a goatee"
    assert row["named_lift"] < 1.5 and row["shown_attributes"] == "Goatee"
    assert row["shows"].startswith("Goatee 100% (x5.0)")


def _blurry_and_goatee(world, easy_share):
    """Discovery of "blurry" and "goatee" on the `world` fixture. Goatee labels the worse group;
    Blurry labels 80% of it and the `easy_share` of the others with the lowest losses, so the
    matched samples (the group, along e0) over-represent blurry while the blurry people as a
    whole fare as `easy_share` makes them. Returns (losses, labels, blurry's row, goatee's row)."""
    eval_data = world[2]
    loss = eval_data.losses
    group = eval_data.embeddings[:, 12] > 0
    rng = np.random.default_rng(3)
    easy = ~group & (loss < np.quantile(loss[~group], easy_share))
    labels = {"Goatee": group, "Blurry": (group & (rng.random(group.size) < 0.8)) | easy}
    blurry, goatee = describe_values([("Blurry", True)]), describe_values([("Goatee", True)])
    texts = np.vstack([np.eye(DIM)[0], _unit(np.eye(DIM)[0] + 0.01 * np.eye(DIM)[1])])
    result = _discover_in(world, [blurry, goatee], texts, labels)
    rows = {row["description"]: row for row in result.hypotheses.iter_rows(named=True)}
    return loss, labels, rows[blurry.text], rows[goatee.text]


def test_words_that_name_people_the_labels_show_no_worse_are_dropped(world) -> None:
    # The matched samples (the worse group, along e0) over-represent "blurry", but the blurry
    # people as a whole are the model's best: the matched set is worse for another reason, and
    # the words would mislead. A description of the group itself stays a mode.
    loss, labels, dropped, kept = _blurry_and_goatee(world, easy_share=0.35)
    blurry_gap = loss[labels["Blurry"]].mean() - loss[~labels["Blurry"]].mean()
    assert dropped["wording"] == SUPPORTED and dropped["measured_gap"] > 0
    assert dropped["labelled_gap"] == pytest.approx(blurry_gap) and blurry_gap < 0
    assert dropped["verdict"] == "dropped" and not dropped["kept"]
    assert "not worse on" in dropped["reason"] and "Blurry" in dropped["reason"]
    assert kept["verdict"] == "mode" and kept["labelled_gap"] > 0
    assert math.isnan(labelled_test(labels, [], loss, None)[1])  # no values named
    everyone = {"Goatee": np.ones(loss.size, bool)}
    assert math.isnan(labelled_test(everyone, [("Goatee", True)], loss, None)[1])


def test_words_that_name_people_not_measurably_worse_are_dropped(world) -> None:
    # As above, but the blurry people are worse on average (+0.07): the failing group's blurry
    # images lift the mean, while the rest of them are the model's easiest samples. The matched
    # samples' own test, run on the people the labels name, does not find them worse.
    loss, labels, dropped, kept = _blurry_and_goatee(world, easy_share=0.3)
    assert 0 < dropped["labelled_gap"] < 0.1 and dropped["labelled_p"] > 0.5
    assert dropped["labelled_p"] == pytest.approx(
        labelled_test(labels, [("Blurry", True)], loss, None)[2]
    )
    assert dropped["verdict"] == "dropped" and "not measurably worse on" in dropped["reason"]
    assert kept["verdict"] == "mode" and kept["labelled_p"] < 1e-6
    # one-sided, and identity-clustered: six samples to an identity widen it
    identities = np.arange(loss.size) // 6
    clustered = labelled_test(labels, [("Goatee", True)], loss, identities)[2]
    assert labelled_test(labels, [("Goatee", True)], loss, None)[2] < clustered < 0.05
    assert labelled_test(labels, [("Goatee", False)], loss, None)[2] > 0.99
    assert math.isnan(labelled_test(labels, [], loss, None)[2])


def test_labels_vouch_for_a_failure_the_heads_do_not_estimate_worse(world) -> None:
    # The estimate's gate set out of reach, so the heads "disagree" on every description. Where
    # the labels name people who are measurably worse, and the matched samples are worse too,
    # the description is kept on the labels and says so; without labels it is dropped.
    strict = DiscoveryConfig(min_p_worse=0.99, min_member_share=0.99)
    group = world[2].embeddings[:, 12] > 0
    goatee = describe_values([("Goatee", True)])
    text = np.eye(DIM)[12:13]
    alone = _discover_in(world, [goatee], text, config=strict).hypotheses.row(0, named=True)
    assert alone["verdict"] == "dropped" and alone["reason"].startswith("estimate disagrees")
    result = _discover_in(world, [goatee], text, {"Goatee": group}, strict)
    row = result.hypotheses.row(0, named=True)
    assert row["p_worse"] < 0.99 and row["measured_gap"] > 0.5 and row["labelled_p"] < 1e-6
    assert row["verdict"] == "mode" and row["kept"] and result.n_modes == 1
    assert row["reason"].startswith("kept on the labels") and "(Goatee: gap +1." in row["reason"]
    # the people named are worse on average but not measurably so (80% of the group and the
    # easiest 30% of the others, as in the tests above): no vouching
    labels = {"Goatee": _blurry_and_goatee(world, easy_share=0.3)[1]["Blurry"]}
    row = _discover_in(world, [goatee], text, labels, strict).hypotheses.row(0, named=True)
    assert row["shown_attributes"] == "Goatee" and row["labelled_p"] > 0.5
    assert row["verdict"] == "dropped" and row["reason"].startswith("estimate disagrees")


def _necklace_seen_on_easy_images(world, n_group: int) -> dict[str, np.ndarray]:
    """Labels where the images most like the words along e3 all wear a necklace and are no
    worse than the rest (e3 is not the failing axis), and so do `n_group` of the worse group:
    the people wearing one are worse, the images the encoder finds for them are not."""
    x = world[2].embeddings
    k = match_count(x.shape[0], DiscoveryConfig().match_fraction, DiscoveryConfig().min_matches)
    necklace = np.zeros(x.shape[0], dtype=bool)
    necklace[np.argsort(-x[:, 3], kind="stable")[:k]] = True
    necklace[np.flatnonzero(x[:, 0] > np.quantile(x[:, 0], 0.8))[:n_group]] = True
    hats = np.random.default_rng(7).random(x.shape[0]) < 0.1  # unrelated to anything
    return {"Wearing_Necklace": necklace, "Wearing_Hat": hats}


def test_labels_alone_keep_words_the_images_show_when_the_matched_samples_are_no_worse(
    world,
) -> None:
    # Tuning world 1006: the 72 images most like "wearing a necklace" show necklaces at 2.2
    # times the base rate and are no worse, while the people wearing one are worse by 0.66
    # (p 1e-6). Kept on its people alone, at the family-wise level alpha / candidates.
    necklace = describe_values([("Wearing_Necklace", True)])
    along_e3 = np.eye(DIM)[3:4]
    labels = _necklace_seen_on_easy_images(world, n_group=120)
    row = _discover_in(world, [necklace], along_e3, labels).hypotheses.row(0, named=True)
    assert row["named_precision"] == 1.0 and row["wording"] == SUPPORTED
    assert row["measured_gap"] < 0.1 and row["q_value"] > 0.5  # the matched samples: no worse
    assert row["labelled_gap"] > 0.5 and row["labelled_p"] < 1e-10
    assert row["verdict"] == "mode" and row["kept"]
    assert row["reason"].startswith("kept on the labels: its images show its words")
    assert "not measurably worse" in row["reason"]
    off = DiscoveryConfig(labels_alone=False)
    row = _discover_in(world, [necklace], along_e3, labels, off).hypotheses.row(0, named=True)
    assert row["verdict"] == "dropped" and row["reason"].startswith("matched samples not worse")
    # words the images do not show ("a hat", reworded to the necklace they show) are not kept
    # on the labels of what they show
    hat = describe_values([("Wearing_Hat", True)])
    row = _discover_in(world, [hat], along_e3, labels).hypotheses.row(0, named=True)
    assert row["wording"] == REWORDED and row["shown_attributes"] == "Wearing_Necklace"
    assert row["labelled_p"] < 1e-10 and row["verdict"] == "dropped"


def test_labels_alone_hold_their_people_to_alpha_over_the_candidates(world) -> None:
    # The people wearing a necklace are worse at p 0.007: under alpha (0.05) for one candidate,
    # over alpha / 10 with nine others tested beside it
    necklace = describe_values([("Wearing_Necklace", True)])
    labels = _necklace_seen_on_easy_images(world, n_group=30)
    alone = _discover_in(world, [necklace], np.eye(DIM)[3:4], labels).hypotheses
    row = alone.row(0, named=True)
    assert 0.05 / 10 < row["labelled_p"] < 0.05 and row["verdict"] == "mode"
    others = [Candidate(f"text {j}", "vocabulary") for j in range(9)]
    texts = np.vstack([np.eye(DIM)[3:4], _unit(np.eye(DIM)[4] + 0.1 * np.eye(DIM)[range(9)])])
    rows = _discover_in(world, [necklace, *others], texts, labels).hypotheses
    row = rows.filter(pl.col("description") == necklace.text).row(0, named=True)
    assert row["labelled_p"] == pytest.approx(alone["labelled_p"][0])
    assert row["verdict"] == "dropped" and not row["kept"]


def test_a_mode_is_headed_by_the_wording_whose_labelled_people_fare_worst() -> None:
    # "a man" and "a goatee" match mostly the same images (the encoder cannot tell them apart);
    # the goatee's matched set scores the higher AUROC, but the labels say men as a whole fare
    # worse than the goatee wearers among them: the mode is "a man", the goatee folded under it.
    losses = np.r_[np.full(40, 3.0), np.linspace(0, 1, 160)]
    candidates = [describe_values([("Goatee", True)]), describe_values([("Male", True)])]
    matches = np.array([np.arange(0, 30), np.arange(5, 35)])
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.9, 0.8], strict=True)]
    rows[0]["labelled_gap"], rows[1]["labelled_gap"] = 0.3, 0.8
    heads = assign_modes(rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05)
    assert heads == [1] and rows[0]["verdict"] == "folded"
    assert rows[0]["folded_under"] == candidates[1].text
    # without labels, the higher AUROC heads it
    rows = [_row(c.text, auc) for c, auc in zip(candidates, [0.9, 0.8], strict=True)]
    assert assign_modes(rows, candidates, matches, losses, max_overlap=0.5, alpha=0.05) == [0]


def test_discover_says_why_a_mode_the_heads_do_not_estimate_worse_is_shown(capsys) -> None:
    from llm2loss_pipeline.discover_cli import _print_rows

    row = {
        "rank": 1,
        "mode": 1,
        "estimated_gap": -0.67,
        "p_worse": 0.13,
        "measured_gap": 1.38,
        "measured_auc": 0.84,
        "q_value": 2e-23,
        "n_variants": 11,
        "description": "face of a person with gray hair",
        "shown_as": "face of a person with gray hair",
        "wording": SUPPORTED,
        "shows": None,
        "labelled_gap": 1.21,
        "labelled_p": 3e-9,
        "reason": "kept on the labels: the matched samples are worse ...",
    }
    alone = {**row, "rank": 3, "mode": 3, "reason": "kept on the labels: its images show its words"}
    _print_rows(
        [row, {**row, "rank": 2, "mode": 2, "reason": "kept: the heads estimate worse"}, alone]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2:4] == ["-0.67", "0.13"] and lines[1].endswith("with gray hair")
    assert lines[2].strip() == (
        "kept on the labels: the people it names are worse (gap +1.21, p 3e-09), the heads' "
        "estimate is not"
    )
    assert lines[5].strip() == (
        "kept on the labels: the people it names are worse (gap +1.21, p 3e-09), its matched "
        "samples are not"
    )
    assert len(lines) == 6  # the mode kept on its samples gets no such line


def test_the_simplest_descriptions_get_their_share_of_the_false_discovery_rate() -> None:
    singles = [describe_values([("Goatee", v)]) for v in (True, False)]
    others = [name for name in CELEBA_ATTRIBUTES if name != "Goatee"][:18]
    pairs = [describe_values([("Goatee", True), (name, True)]) for name in others]
    candidates = [*singles, Candidate("a free text", "vocabulary"), *pairs]
    family = np.arange(len(candidates))
    weights = simple_weights(candidates, [family], 0.5)
    assert weights.mean() == pytest.approx(1.0)  # what keeps the false discovery rate
    assert weights[:3] == pytest.approx([0.5 * 21 / 3] * 3)  # half the budget on 3 of 21
    assert np.all(weights[3:] == weights[3]) and weights[3] == pytest.approx(0.5 * 21 / 18)
    # a share below their count never weighs the simple ones under 1; one level: all 1
    assert np.all(simple_weights(candidates, [family], 0.05)[:3] == 1.0)
    assert np.all(simple_weights(singles, [np.arange(2)], 0.5) == 1.0)
    p = np.r_[0.003, np.full(len(candidates) - 1, 0.5)]  # one single stands out
    assert _q_values(p, [family], weights)[0] == pytest.approx(0.003 / 3.5 * 21)  # 0.018
    assert _q_values(p, [family], np.ones(len(p)))[0] == pytest.approx(0.003 * 21)  # 0.063
    # under the null the weighted procedure rejects no more often than alpha
    rng = np.random.default_rng(0)
    rejected = [
        (_q_values(rng.uniform(size=len(candidates)), [family], weights) <= 0.1).any()
        for _ in range(2000)
    ]
    assert np.mean(rejected) <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 2000)
