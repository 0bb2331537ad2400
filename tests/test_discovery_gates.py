"""Discovery's two gates: the heads' estimate is compare's, and the samples' test counts
identities, on constructed embeddings (core/discovery/estimate.py, verify.py)."""

from __future__ import annotations

import numpy as np
import pytest

from llm2loss_pipeline.core.discovery.candidates import Candidate
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.estimate import DescriptionGrounding, grounded_estimates
from llm2loss_pipeline.core.discovery.hypotheses import EvalData, discover
from llm2loss_pipeline.core.discovery.verify import clustered_p_values, measure, top_matches
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.heads.train import train_ensemble
from llm2loss_pipeline.core.report.calibration import Calibration
from llm2loss_pipeline.core.report.grounded import dual_directions

DIM = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _identities(rng: np.random.Generator, n_ids: int = 60, per: int = 10, spread: float = 0.15):
    """Images clustered by identity: each identity's images lie near its own centre."""
    centres = _unit(rng.normal(size=(n_ids, DIM)))
    identity = np.repeat(np.arange(n_ids), per)
    x = _unit(centres[identity] + spread * rng.normal(size=(identity.size, DIM)))
    return centres, identity, x.astype(np.float32)


def test_a_set_two_hard_identities_make_worse_is_not_significant_by_identity() -> None:
    rng = np.random.default_rng(0)
    centres, identity, x = _identities(rng)
    hardness = rng.exponential(0.3, size=len(centres))
    hardness[[0, 1]] = 3.0  # two people the model gets wrong, whatever they look like
    loss = hardness[identity] + rng.exponential(0.3, size=identity.size)
    matched = top_matches((x @ _unit(centres[0] + centres[1]))[:, None], 60)[0]
    assert np.unique(identity[matched]).size >= 10  # 60 images from many identities ...
    images = measure(loss, matched).p_value
    clustered = clustered_p_values(loss, matched[None], identity)[0]
    assert images < 0.01  # ... worse by Mann-Whitney over images
    assert clustered > 0.05  # but carried by two identities: not by identity

    # a group that is worse in every identity it touches stays significant
    group = x[:, 0] > np.quantile(x[:, 0], 0.9)
    loss = hardness[identity] + rng.exponential(0.3, size=identity.size) + 1.0 * group
    matched = top_matches(x[:, [0]], 60)[0]
    assert clustered_p_values(loss, matched[None], identity)[0] < 1e-10


def test_without_identities_the_clustered_test_is_close_to_mann_whitney() -> None:
    rng = np.random.default_rng(1)
    loss = rng.exponential(1.0, size=600)
    matches = np.stack([rng.choice(600, 60, replace=False) for _ in range(20)])
    matches[0] = np.argsort(-loss)[20:80]  # one clearly worse set
    mw = np.array([measure(loss, m).p_value for m in matches])
    clustered = clustered_p_values(loss, matches)
    assert clustered.shape == (20,)
    assert np.allclose(clustered[1:], mw[1:], atol=0.03)  # the null sets
    assert clustered[0] < 1e-20 and mw[0] < 1e-20
    # equal losses: nothing can be worse
    assert (clustered_p_values(np.ones(600), matches) == 1.0).all()
    with pytest.raises(ValueError, match="clusters for 600 samples"):
        clustered_p_values(loss, matches, np.zeros(5))


@pytest.fixture(scope="module")
def heads():
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(600, DIM))).astype(np.float32)
    loss = rng.exponential(0.5, size=600) + 1.5 * (x[:, 0] > 0.4)
    ensemble = train_ensemble(x, loss, HeadsConfig(n_seeds=2, epochs=10, hidden=8, min_steps=30))
    return ensemble, x, loss


class _Encoder:
    """Texts with chosen embeddings."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def __call__(self, texts):
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def test_the_grounded_estimate_is_compares_answer_for_the_same_text(heads, monkeypatch) -> None:
    from llm2loss_pipeline.core.query import Diagnoser

    ensemble, x, _ = heads
    gap = ModalityGap(np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), mode="none")
    directions = np.eye(DIM)[:5]  # the probes span the first five axes
    probes = (directions, dual_directions(directions, 0.01))
    reference = np.full(DIM, 0.1)
    texts = {
        "the worse group": reference + np.eye(DIM)[0],
        "its opposite": reference - np.eye(DIM)[0],
        "what the probes do not span": reference + np.eye(DIM)[7],
        "the centroid": reference,
    }
    diagnoser = Diagnoser(_Encoder(texts), ensemble, gap)
    diagnoser.use_pool(x, np.repeat(np.arange(60), 10))
    tau = Calibration("grounded", slope=1.0, text_error=0.05, n_attributes=40)
    monkeypatch.setattr(diagnoser, "probes", lambda: probes)
    monkeypatch.setattr(diagnoser, "calibration", lambda estimator: tau)
    grounding = DescriptionGrounding.from_diagnoser(diagnoser)
    assert grounding is not None and grounding.calibration is tau
    names = list(texts)[:3]
    est = grounded_estimates(grounding, np.stack([texts[t] for t in names]), reference, names)
    for t, name in enumerate(names):
        answer = diagnoser.compare(name, "the centroid")
        assert est["p_worse"][t] == pytest.approx(answer.p_a_worse, abs=1e-6)
        assert est["estimated_gap"][t] == pytest.approx(answer.overall.mean, abs=1e-6)
    # worse along e0, not against it (not near certainty: free text's floor on the text error)
    assert est["p_worse"][0] > 0.8 and est["p_worse"][1] < 0.2
    assert est["p_worse"][2] == 0.5  # nothing the probes span: no direction to ask
    assert np.allclose(est["p_estimate"], 1.0 - est["p_worse"])

    # a large text error keeps the answer near a coin flip, as compare's does
    loose = Calibration("grounded", slope=1.0, text_error=50.0, n_attributes=40)
    monkeypatch.setattr(diagnoser, "calibration", lambda estimator: loose)
    grounding = DescriptionGrounding.from_diagnoser(diagnoser)
    est = grounded_estimates(grounding, np.stack([texts[t] for t in names]), reference, names)
    assert 0.5 < est["p_worse"][0] < 0.6

    # a description one report probe holds takes the report's answer for it, in both
    answers = (["a0", "a1", "a2", "a3", "a4"], np.array([0.99, 0.5, 0.5, 0.5, 0.5]), np.ones(5))
    monkeypatch.setattr(diagnoser, "calibration", lambda estimator: tau)
    monkeypatch.setattr(diagnoser, "probe_answers", lambda: answers)
    grounding = DescriptionGrounding.from_diagnoser(diagnoser)
    est = grounded_estimates(grounding, np.stack([texts[t] for t in names]), reference, names)
    assert est["p_worse"][:2] == pytest.approx([0.99, 0.01])
    assert est["p_worse"][2] == 0.5
    for t, name in enumerate(names):
        answer = diagnoser.compare(name, "the centroid")
        assert answer.asked_as_probe == (t < 2)
        assert est["p_worse"][t] == pytest.approx(answer.p_a_worse, abs=1e-6)

    # a bare scorer (no report, no images) cannot ground: discovery falls back to direct
    assert DescriptionGrounding.from_diagnoser(object()) is None


def test_discover_gates_on_the_chosen_estimate_and_test(heads) -> None:
    ensemble, x, loss = heads
    gap = ModalityGap(np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), mode="none")
    groups = np.repeat(np.arange(60), 10)
    eval_data = EvalData([f"s{i}" for i in range(600)], x, loss, groups=groups)
    candidates = [Candidate("the worse group", "attribute")] + [
        Candidate(f"probe {k}", "attribute") for k in range(4)
    ]
    texts = np.vstack([np.eye(DIM)[0], np.eye(DIM)[1:5]]).astype(np.float32)
    args = (candidates, texts, ensemble, gap, eval_data, x)
    for clustered in (True, False):
        config = DiscoveryConfig(identity_clustered=clustered)
        table = discover(*args, config).hypotheses
        top = table.filter(table["description"] == "the worse group").row(0, named=True)
        matched = top_matches(x @ texts.T, 60)[0]
        expected = (
            clustered_p_values(loss, matched[None], groups)[0]
            if clustered
            else measure(loss, matched).p_value
        )
        assert top["p_value"] == pytest.approx(expected) and top["kept"]
    # without a grounding the estimate is the direct one: the members' share
    direct = discover(*args, DiscoveryConfig()).hypotheses.row(0, named=True)
    assert direct["p_worse"] in {k / len(ensemble) for k in range(len(ensemble) + 1)}


def test_the_estimator_is_a_checked_choice() -> None:
    assert DiscoveryConfig().estimator == "grounded" and DiscoveryConfig().identity_clustered
    with pytest.raises(ValueError, match=r"estimator must be one of \['grounded', 'direct'\]"):
        DiscoveryConfig(estimator="grounde")
