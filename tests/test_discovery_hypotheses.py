"""Failure hypotheses on constructed embeddings where a hidden direction makes a group worse."""

from __future__ import annotations

import numpy as np
import pytest

from llm2loss_pipeline.core.discovery import hypotheses
from llm2loss_pipeline.core.discovery.candidates import Candidate, class_candidates
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.hypotheses import (
    HYPOTHESIS_COLUMNS,
    EvalData,
    discover,
    scope_masks,
)
from llm2loss_pipeline.core.discovery.influence import member_influences, pool_members
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.heads.train import train_ensemble

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _world(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images on the sphere; the 20% furthest along e0 (the hidden group) are worse: 70% of them
    have a much higher loss, the others are as easy as anyone (counter-examples to find)."""
    x = _unit(rng.normal(size=(n, DIM)))
    group = x[:, 0] > np.quantile(x[:, 0], 0.8)
    loss = rng.exponential(0.5, size=n) + 1.5 * (group & (rng.random(n) < 0.7))
    return x.astype(np.float32), loss, group


@pytest.fixture(scope="module")
def setting():
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train_x, train_loss, _ = _world(rng, 800)
    eval_x, eval_loss, group = _world(rng, 600)
    config = HeadsConfig(n_seeds=2, epochs=15, hidden=16, min_steps=50)
    ensemble = train_ensemble(train_x, train_loss, config)
    gap = ModalityGap(np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), mode="none")
    eval_data = EvalData([f"s{i:04d}.jpg" for i in range(600)], eval_x, eval_loss)
    return ensemble, gap, eval_data, train_x, train_loss, group


def _texts(rng: np.random.Generator, n_null: int) -> tuple[list[Candidate], np.ndarray]:
    group = np.eye(DIM)[0]
    nulls = _unit(rng.normal(size=(n_null, DIM)) * np.r_[0.0, np.ones(DIM - 1)])  # orthogonal to e0
    candidates = [Candidate("a person of the hidden group", "vocabulary")]
    candidates += [Candidate(f"neutral description {i}", "vocabulary") for i in range(n_null)]
    return candidates, np.vstack([group, nulls]).astype(np.float32)


def test_the_worse_group_is_kept_and_neutral_descriptions_are_rejected(setting) -> None:
    ensemble, gap, eval_data, train_x, train_loss, group = setting
    candidates, texts = _texts(np.random.default_rng(1), 40)
    result = discover(
        candidates,
        texts,
        ensemble,
        gap,
        eval_data,
        train_x,
        DiscoveryConfig(),
        train_losses=train_loss,
    )
    table = result.hypotheses
    assert table.columns == list(HYPOTHESIS_COLUMNS)
    assert table.height == 41 and result.n_candidates == 41
    top = table.row(0, named=True)
    assert top["description"] == "a person of the hidden group"
    assert top["kept"] and top["rank"] == 1
    assert top["p_worse"] == 1.0 and top["estimated_gap"] > 0.5
    assert top["measured_gap"] > 0.5 and top["measured_auc"] > 0.7
    assert top["q_value"] < 1e-6
    assert top["n_supporting"] > 0 and top["n_matched"] == 60
    neutral = table.filter(table["description"].str.starts_with("neutral"))
    assert neutral["kept"].sum() <= 1  # BH at 5% over 40 nulls: rarely even one
    assert result.n_kept == int(table["kept"].sum())

    evidence = result.evidence.filter(evidence_rank := (result.evidence["rank"] == 1))
    assert evidence_rank.sum() > 0
    proponents = evidence.filter(evidence["role"] == "proponent")
    counter = evidence.filter(evidence["role"] == "counter_example")
    assert (proponents["influence"] > 0).all() and (counter["influence"] < 0).any()
    # proponents are the matched group's high-loss samples, counter-examples its easy ones
    assert proponents["loss"].mean() > counter["loss"].mean()
    ids = {sid: i for i, sid in enumerate(eval_data.sample_ids)}
    assert np.mean([group[ids[sid]] for sid in proponents["sample_id"]]) > 0.8


def test_benjamini_hochberg_rejects_what_a_raw_p_value_would_keep(setting) -> None:
    ensemble, gap, eval_data, train_x, _, _ = setting
    candidates, texts = _texts(np.random.default_rng(2), 60)
    loose = DiscoveryConfig(alpha=0.05)
    result = discover(candidates, texts, ensemble, gap, eval_data, train_x, loose)
    table = result.hypotheses
    nominal = table.filter((table["p_value"] <= 0.05) & (table["q_value"] > 0.05))
    assert (~nominal["kept"]).all()
    assert (table.filter(table["kept"])["q_value"] <= 0.05).all()
    q = table.sort("p_value")["q_value"].to_numpy()
    assert np.all(np.diff(q) >= -1e-12)  # q-values are monotone in p


def test_the_estimate_must_agree_with_the_samples(setting) -> None:
    ensemble, gap, eval_data, train_x, _, _ = setting
    # flip the losses: the heads still say the group is worse, the samples now say better
    flipped = EvalData(eval_data.sample_ids, eval_data.embeddings, -eval_data.losses + 10.0)
    candidates, texts = _texts(np.random.default_rng(3), 5)
    result = discover(candidates, texts, ensemble, gap, flipped, train_x, DiscoveryConfig())
    row = result.hypotheses.filter(
        result.hypotheses["description"] == "a person of the hidden group"
    ).row(0, named=True)
    assert row["p_worse"] == 1.0 and row["measured_gap"] < 0
    assert not row["kept"]
    assert result.evidence.height == 0 or row["rank"] not in result.evidence["rank"].to_list()


def test_duplicates_of_a_finding_are_ranked_after_distinct_ones(setting) -> None:
    ensemble, gap, eval_data, train_x, _, _ = setting
    group = np.eye(DIM)[0]
    near = _unit(group + 0.05 * np.eye(DIM)[1])
    candidates = [
        Candidate("the group", "vocabulary"),
        Candidate("the group, said again", "vocabulary"),
    ]
    result = discover(
        candidates,
        np.vstack([group, near]).astype(np.float32),
        ensemble,
        gap,
        eval_data,
        train_x,
        DiscoveryConfig(max_overlap=0.5),
    )
    second = result.hypotheses.row(1, named=True)
    assert second["kept"] and second["redundant_with"] is not None


def test_mismatched_inputs_are_clear_errors(setting) -> None:
    ensemble, gap, eval_data, train_x, _, _ = setting
    with pytest.raises(ValueError, match="2 candidates but 1 text embeddings"):
        discover(
            [Candidate("a", "vocabulary"), Candidate("b", "vocabulary")],
            np.ones((1, DIM), np.float32),
            ensemble,
            gap,
            eval_data,
            train_x,
            DiscoveryConfig(),
        )
    tiny = EvalData(eval_data.sample_ids[:12], eval_data.embeddings[:12], eval_data.losses[:12])
    with pytest.raises(ValueError, match="too small"):
        discover(
            [Candidate("a", "vocabulary")],
            np.ones((1, DIM), np.float32),
            ensemble,
            gap,
            tiny,
            train_x,
            DiscoveryConfig(min_matches=12),
        )


def test_influence_member_by_member_in_chunks_is_the_pooled_influence(setting, monkeypatch):
    """`_influences` takes each member's sample side once and the texts in chunks (its cost grew
    with the square of the samples when the sample side was redone per chunk); whatever the chunk
    size it must give the members' pooled influence taken all at once."""
    ensemble, _, eval_data, train_x, train_loss, _ = setting
    assert {m.arch for m in ensemble.members} == {"linear", "mlp"}
    assert {m.kind for m in ensemble.members} == {"regressor", "ranker"}
    texts = _unit(np.random.default_rng(3).normal(size=(7, DIM)))
    inputs = hypotheses._influence_inputs(
        train_x, eval_data.embeddings, eval_data.losses, train_loss, DiscoveryConfig()
    )
    whole = pool_members(member_influences(ensemble, inputs, texts))
    monkeypatch.setattr(hypotheses, "INFLUENCE_BUDGET", 2 * len(eval_data.losses))  # 2 texts
    chunked = hypotheses._influences(ensemble, inputs, texts, 1e-3, None)
    np.testing.assert_allclose(chunked, whole, rtol=1e-9, atol=1e-12)
    assert np.abs(whole).max() > 0.5  # unit RMS per member: not a vacuous comparison


def test_class_candidates_match_within_their_class_and_change_nothing_else(setting) -> None:
    ensemble, gap, eval_data, train_x, _, group = setting
    candidates, texts = _texts(np.random.default_rng(4), 10)
    # the task's labels: T holds on the images with a positive second coordinate, about half
    label = eval_data.embeddings[:, 1] > 0
    base = candidates[0]
    classes = class_candidates([Candidate(base.text, "attribute", (("Hidden", True),))], "T")
    assert [c.text for c in classes] == [
        "a person of the hidden group, among images labelled T",
        "a person of the hidden group, among images not labelled T",
    ]
    assert classes[0].scope == ("T", True) and classes[0].words == base.text
    assert classes[1].values == (("Hidden", True), ("T", False))
    hidden = {"Hidden": group}  # the attribute's labels, as a dataset has them
    plain = discover(
        candidates, texts, ensemble, gap, eval_data, train_x, DiscoveryConfig(), labels=hidden
    )
    result = discover(
        [*candidates, *classes],
        np.vstack([texts, texts[[0, 0]]]),
        ensemble,
        gap,
        eval_data,
        train_x,
        DiscoveryConfig(),
        labels={**hidden, "T": label},
    )
    table = result.hypotheses
    keys = ["description", "verdict", "kept", "q_value", "measured_auc", "p_worse"]
    before = plain.hypotheses.select(keys).sort("description")
    after = table.filter(table["source"] != "class").select(keys).sort("description")
    assert after.equals(before)  # its own BH family and modes: the rest is as it was
    ids = {sid: i for i, sid in enumerate(eval_data.sample_ids)}
    for value, row in zip((True, False), classes, strict=True):
        found = table.filter(table["description"] == row.text).row(0, named=True)
        assert found["kept"] and found["n_matched"] == 60 and found["measured_auc"] > 0.65
        matched = result.evidence.filter(result.evidence["rank"] == found["rank"])
        assert matched.height > 0
        assert all(label[ids[sid]] == value for sid in matched["sample_id"])
    assert result.n_modes == plain.n_modes + 2  # half the group each: two distinct modes


def test_a_class_needs_its_labels_and_more_samples_than_a_match() -> None:
    scoped = class_candidates([Candidate("x", "attribute", (("A", True),))], "T")
    with pytest.raises(ValueError, match=r"class candidates of 'T' need its labels"):
        scope_masks(scoped, {"A": np.ones(30, dtype=bool)}, 10)
    few = np.arange(30) < 10  # 10 labelled T: no more than the 10 a description matches
    with pytest.raises(ValueError, match=r"10 samples labelled T: a class needs more than the 10"):
        scope_masks(scoped, {"T": few}, 10)
    masks = scope_masks(scoped, {"T": np.arange(30) < 15}, 10)
    assert masks[("T", True)].sum() == 15 and masks[("T", False)].sum() == 15
