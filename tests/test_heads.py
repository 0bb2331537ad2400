"""The diagnosis-head ensemble: recovery of a planted loss, batching, determinism, checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import spearmanr

from llm2loss_pipeline.core.heads import (
    HeadMismatchError,
    HeadsConfig,
    MemberInfo,
    fit_gap,
    fit_transform,
    load_ensemble,
    member_grid,
    save_ensemble,
    train_ensemble,
)
from llm2loss_pipeline.core.heads import checkpoint as checkpoint_module
from llm2loss_pipeline.core.heads.evaluate import evaluate_ensemble, evaluate_members, rank_metrics
from llm2loss_pipeline.core.heads.gap import ModalityGap, measure_gap_effect, measured_disparity
from llm2loss_pipeline.core.heads.train import CHECK_ROWS, batch_bounds, holdout_split
from llm2loss_pipeline.core.storage import StorageError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 32
N = 1200  # per split


def planted(n: int, seed: int, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm embeddings and l = exp(2 z) * LogNormal(0, sigma), z the hidden projection."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = np.random.default_rng(1234).standard_normal(DIM)  # the same direction for every split
    w /= np.linalg.norm(w)
    z = (x @ w) * np.sqrt(DIM)
    return x, np.exp(2.0 * z) * rng.lognormal(0.0, sigma, n), z


@pytest.fixture(scope="module")
def data():
    x_train, l_train, _ = planted(N, seed=0)
    x_test, l_test, z_test = planted(N, seed=1)
    return x_train, l_train, x_test, l_test, z_test


@pytest.fixture(scope="module")
def ensemble(data):
    x_train, l_train, *_ = data
    return train_ensemble(x_train, l_train, HeadsConfig(epochs=10, batch_size=128))


# configuration


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"kinds": ["regressor", "classifier"]}, "kinds"),
        ({"archs": []}, "archs"),
        ({"n_seeds": 0}, "n_seeds"),
        ({"target_scaling": "sqrt"}, "target_scaling"),
        ({"modality_gap": "shift"}, "modality_gap"),
        ({"eval_split": "valid"}, "train_split and eval_split"),
        ({"lr": 0.0}, "lr"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_config_errors_name_the_field(update, field):
    with pytest.raises(ValidationError, match=field):
        HeadsConfig(**update)


def test_config_defaults_give_twenty_members_and_min_steps():
    config = HeadsConfig()
    assert config.n_members == 20 and len(member_grid(config)) == 20
    assert config.target_scaling == "rank"
    # 300 samples at batch 256 is 2 steps per epoch: 100 epochs reach min_steps=200
    assert config.effective_epochs(300) == 100
    assert config.effective_epochs(1_000_000) == config.epochs


# learning the planted ordering


def test_every_member_recovers_the_planted_ordering(ensemble, data):
    *_, x_test, l_test, z_test = data
    # the noiseless planted score against the noisy loss: the best any head can do (about 0.88)
    oracle = spearmanr(z_test, l_test).statistic
    assert 0.8 < oracle < 0.95
    metrics = evaluate_members(ensemble, x_test, l_test)
    assert len(metrics) == 20
    assert {(m["kind"], m["arch"]) for m in metrics} == {
        (k, a) for k in ("regressor", "ranker") for a in ("linear", "mlp")
    }
    for m in metrics:
        assert m["spearman"] >= 0.8 * oracle, m
        assert m["pairwise_accuracy"] > 0.75, m
    summary = evaluate_ensemble(ensemble, x_test, l_test)["groups"]
    for group in ("regressor", "ranker", "linear", "mlp", "overall"):
        assert summary[group]["ensemble_spearman"] >= 0.9 * oracle, (group, summary[group])


def test_standardized_outputs_have_unit_spread_on_the_training_embeddings(ensemble, data):
    x_train = data[0]
    z = ensemble.standardized(x_train)
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=1), 1.0, atol=1e-5)
    raw = ensemble.predict(x_train)
    assert raw.shape == (20, N) and raw.dtype == np.float32


def test_rank_metrics_on_a_perfect_and_a_reversed_predictor():
    losses = np.arange(50, dtype=float)
    perfect = rank_metrics(losses * 2 + 1, losses)
    assert perfect == pytest.approx({"spearman": 1.0, "kendall": 1.0, "pairwise_accuracy": 1.0})
    reversed_ = rank_metrics(-losses, losses)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["pairwise_accuracy"] == 0.0
    constant = rank_metrics(np.zeros(50), losses)
    assert np.isnan(constant["spearman"]) and constant["pairwise_accuracy"] == 0.5


# batching, independence, determinism


def test_a_member_trained_inside_the_batch_equals_it_trained_alone(data):
    x_train, l_train, *_ = data
    config = HeadsConfig(n_seeds=2, epochs=3, min_steps=0, batch_size=128)
    grid = member_grid(config)
    together = train_ensemble(x_train, l_train, config)
    for member in (grid[0], grid[3], grid[4], grid[7]):  # one of each kind x arch
        alone = train_ensemble(x_train, l_train, config, members=[member])
        assert len(alone) == 1 and alone.members[0].kind == member.kind
        a, b = alone.member_tensors(0), together.member_tensors(member.index)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    # and members do differ from each other (seeds give different heads)
    w0, w1 = together.member_tensors(0)["weight"], together.member_tensors(1)["weight"]
    assert not torch.allclose(w0, w1, atol=1e-3)


def test_training_twice_gives_identical_bytes(data):
    x_train, l_train, *_ = data
    config = HeadsConfig(n_seeds=1, epochs=2, min_steps=0, batch_size=128)
    runs = [train_ensemble(x_train, l_train, config) for _ in range(2)]
    for index in range(len(runs[0])):
        a, b = (run.member_tensors(index) for run in runs)
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    assert runs[0].out_std.tobytes() == runs[1].out_std.tobytes()
    other_seed = train_ensemble(x_train, l_train, config.model_copy(update={"base_seed": 1}))
    assert not torch.equal(
        other_seed.member_tensors(0)["weight"], runs[0].member_tensors(0)["weight"]
    )


def test_ranker_ignores_a_monotone_transform_of_the_loss_and_raw_regressor_does_not(data):
    x_train, l_train, *_ = data
    transformed = np.log(l_train) ** 3 + 7.0  # strictly increasing in l
    base = {"n_seeds": 1, "archs": ["linear"], "epochs": 2, "min_steps": 0, "batch_size": 128}

    def weights(kind: str, scaling: str, losses: np.ndarray) -> torch.Tensor:
        config = HeadsConfig(kinds=[kind], target_scaling=scaling, **base)
        return train_ensemble(x_train, losses, config).member_tensors(0)["weight"]

    assert torch.equal(weights("ranker", "raw", l_train), weights("ranker", "raw", transformed))
    assert torch.equal(
        weights("regressor", "rank", l_train), weights("regressor", "rank", transformed)
    )
    raw_a, raw_b = weights("regressor", "raw", l_train), weights("regressor", "raw", transformed)
    assert not torch.allclose(raw_a, raw_b, atol=1e-3)


def test_progress_is_reported_per_epoch(data):
    x_train, l_train, *_ = data
    calls: list[tuple[int, int]] = []
    config = HeadsConfig(n_seeds=1, epochs=2, min_steps=0, batch_size=512, holdout_fraction=0.0)
    ens = train_ensemble(
        x_train, l_train, config, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 2), (2, 2)]
    # without a holdout every member keeps its last epoch
    assert ens.training["best_epoch"] == [2] * 4 and ens.training["holdout_spearman"] == [None] * 4
    assert ens.training["n_holdout"] == 0 and ens.training["n_fit"] == N


def test_bad_training_inputs_are_named():
    x = np.zeros((4, DIM), dtype=np.float32)
    config = HeadsConfig(n_seeds=1, epochs=1)
    with pytest.raises(ValueError, match="sample 2 has loss nan"):
        train_ensemble(x, [0.1, 0.2, float("nan"), 0.3], config)
    with pytest.raises(ValueError, match="4 embeddings but 3 losses"):
        train_ensemble(x, [0.1, 0.2, 0.3], config)
    bad = x.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="row 1 contains"):
        train_ensemble(bad, [0.1, 0.2, 0.3, 0.4], config)
    # rows are checked in blocks: a bad row past the first block is found and named too
    tall = np.zeros((CHECK_ROWS + 10, DIM), dtype=np.float32)
    tall[CHECK_ROWS + 7, 0] = np.nan
    with pytest.raises(ValueError, match=f"row {CHECK_ROWS + 7} contains NaN"):
        train_ensemble(tall, np.arange(CHECK_ROWS + 10, dtype=float), config)
    with pytest.raises(ValueError, match="all 4 training losses equal"):
        train_ensemble(x, [0.5] * 4, config)


def test_training_accepts_strided_embeddings():
    """A reversed or column-sliced view trains like the same values in a fresh C-order array."""
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((64, 2 * DIM)).astype(np.float32)
    losses = rng.random(64)
    config = HeadsConfig(n_seeds=1, epochs=1, min_steps=0)
    for view in (wide[::-1, :DIM], wide[:, ::2]):
        got = train_ensemble(view, losses, config).standardized(view)
        want = train_ensemble(view.copy(), losses, config).standardized(view.copy())
        np.testing.assert_array_equal(got, want)


# target scaling


def test_target_scalings_standardise_and_invert():
    losses = np.random.default_rng(0).lognormal(0.0, 1.5, 500)
    for kind in ("raw", "log1p", "rank"):
        scaler, targets = fit_transform(losses, kind)
        assert abs(targets.mean()) < 1e-3 and abs(targets.std() - 1.0) < 1e-2
        assert spearmanr(targets, losses).statistic == pytest.approx(1.0)
        restored = scaler.inverse(scaler.transform(losses))
        rtol = 1e-4 if kind != "rank" else 0.05  # rank goes through a 513-point quantile grid
        np.testing.assert_allclose(np.median(restored), np.median(losses), rtol=rtol)
        assert type(scaler).from_dict(json.loads(json.dumps(scaler.to_dict()))) == scaler
    with pytest.raises(ValueError, match=r"sample 1 has loss -2\.0"):
        fit_transform([0.1, -2.0, 0.3], "log1p")


# modality gap


def test_gap_centres_each_modality_and_none_is_identity():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((200, DIM)) + 3.0
    texts = rng.standard_normal((50, DIM)) - 3.0
    gap = fit_gap(images, texts, "center")
    np.testing.assert_allclose(gap.image_mean, images.mean(axis=0), rtol=1e-5)
    mapped_images, mapped_texts = gap.image(images), gap.text(texts)
    np.testing.assert_allclose(np.linalg.norm(mapped_texts, axis=1), 1.0, rtol=1e-5)
    # centred, the two clouds overlap: their means are both near the origin
    assert np.linalg.norm(mapped_images.mean(axis=0)) < 0.2
    assert np.linalg.norm(mapped_texts.mean(axis=0)) < 0.3
    assert gap.gap_norm > 30
    none = ModalityGap(gap.image_mean, gap.text_mean, "none")
    np.testing.assert_array_equal(none.text(texts), texts.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        gap.text(np.zeros((2, 5)))


def test_measured_disparity_by_hand():
    losses = np.array([1.0, 3.0, 5.0, 7.0])
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=bool)
    np.testing.assert_allclose(measured_disparity(losses, labels), [2.0 - 6.0, 5.0 - 1.0])


def test_measure_gap_effect_recovers_planted_disparities():
    rng = np.random.default_rng(3)
    n_attr = 6
    basis = np.linalg.qr(rng.standard_normal((DIM, n_attr + 2)))[0].T
    directions, image_centre, text_centre = basis[:n_attr], basis[n_attr], basis[n_attr + 1]
    effects = np.array([-1.0, -0.6, -0.2, 0.3, 0.8, 1.5])

    def images(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = rng.random((n, n_attr)) < 0.5
        signs = np.where(labels, 1.0, -1.0)
        emb = 2.0 * image_centre + signs @ directions + 0.3 * rng.standard_normal((n, DIM))
        losses = np.exp(signs @ effects * 0.5 + 0.3 * rng.standard_normal(n))
        return emb / np.linalg.norm(emb, axis=1, keepdims=True), losses, labels

    vectors = {f"with {a}": directions[a] for a in range(n_attr)}
    vectors.update({f"without {a}": -directions[a] for a in range(n_attr)})

    def encode(texts):
        emb = np.stack([2.0 * text_centre + vectors[t] for t in texts])
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    x_train, l_train, _ = images(800)
    x_eval, l_eval, y_eval = images(800)
    corpus = encode(list(vectors))
    result = measure_gap_effect(
        train_embeddings=x_train,
        train_losses=l_train,
        eval_embeddings=x_eval,
        eval_losses=l_eval,
        eval_labels=y_eval,
        prompts=[(f"with {a}", f"without {a}") for a in range(n_attr)],
        encode_texts=encode,
        text_corpus_embeddings=corpus,
        config=HeadsConfig(n_seeds=1, epochs=5, min_steps=0, batch_size=128),
    )
    assert set(result) == {"measured_disparity", "center", "none"}
    centred = result["center"]
    assert centred["correlation"]["n_attributes"] == n_attr
    assert centred["correlation"]["spearman"]["r"] > 0.9
    assert centred["heldout_ensemble_spearman"] > 0.5
    assert np.sign(centred["estimated_disparity"]).tolist() == np.sign(effects).tolist()


# checkpoints


@pytest.fixture()
def small(data):
    x_train, l_train, *_ = data
    config = HeadsConfig(n_seeds=1, epochs=1, min_steps=0, batch_size=256)
    ens = train_ensemble(x_train, l_train, config)
    gap = fit_gap(x_train, x_train[:10] * -1.0, "center")
    return ens, gap


def test_checkpoint_round_trip(small, tmp_path, data):
    ens, gap = small
    metrics = evaluate_members(ens, data[2], data[3])
    sidecars = save_ensemble(
        ens, gap, tmp_path / "heads", embedding_dim=DIM, encoder_sha256="a" * 64,
        extra_meta={"train_split": "valid"}, metrics=metrics,
    )  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "heads").iterdir())
    assert "ensemble.json" in files and "gap.safetensors" in files
    assert "member-00-regressor-linear-s0.safetensors" in files
    assert "member-03-ranker-mlp-s0.json" in files
    assert [s["kind"] for s in sidecars] == ["regressor", "regressor", "ranker", "ranker"]
    side = json.loads((tmp_path / "heads" / "member-01-regressor-mlp-s0.json").read_text())
    assert side["encoder_sha256"] == "a" * 64 and side["embedding_dim"] == DIM
    assert side["target_scaling"]["kind"] == "rank" and side["metrics"]["spearman"] > 0
    assert side["standardization"]["std"] > 0 and side["extra"] == {"train_split": "valid"}
    assert side["training"]["best_epoch"] == ens.training["best_epoch"][1]

    loaded, loaded_gap, meta = load_ensemble(
        tmp_path / "heads", expected_dim=DIM, expected_encoder_sha256="a" * 64
    )
    assert loaded.members == ens.members and meta["n_members"] == 4
    assert loaded.training == ens.training and meta["training"]["n_holdout"] == 120
    np.testing.assert_array_equal(loaded.predict(data[2]), ens.predict(data[2]))
    np.testing.assert_array_equal(loaded.standardized(data[2]), ens.standardized(data[2]))
    np.testing.assert_array_equal(loaded_gap.text_mean, gap.text_mean)
    assert loaded_gap.mode == "center"
    # a member's file is a plain torch module state dict
    from safetensors.torch import load_file

    mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    mlp.load_state_dict(load_file(tmp_path / "heads" / "member-01-regressor-mlp-s0.safetensors"))
    with torch.no_grad():
        out = mlp(torch.from_numpy(data[2][:5]))[:, 0].numpy()
    np.testing.assert_allclose(out, ens.predict(data[2][:5])[1], rtol=1e-5, atol=1e-5)


def test_load_rejects_another_encoder(small, tmp_path):
    ens, gap = small
    save_ensemble(ens, gap, tmp_path / "h", embedding_dim=DIM, encoder_sha256="abc123" + "0" * 58)
    with pytest.raises(HeadMismatchError, match=r"encoder abc1230.* \(dim 32\).*def456.*dim 512"):
        load_ensemble(tmp_path / "h", expected_dim=512, expected_encoder_sha256="def456" + "0" * 58)
    with pytest.raises(HeadMismatchError, match="rematerialize diagnosis_heads: llm2loss run"):
        load_ensemble(tmp_path / "h", expected_dim=DIM, expected_encoder_sha256="f" * 64)


def test_incomplete_or_damaged_folders_are_rejected(small, tmp_path):
    ens, gap = small
    folder = tmp_path / "h"
    save_ensemble(ens, gap, folder, embedding_dim=DIM, encoder_sha256="a" * 64)
    kwargs = {"expected_dim": DIM, "expected_encoder_sha256": "a" * 64}
    member = folder / "member-02-ranker-linear-s0.safetensors"
    member.write_bytes(member.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StorageError, match=r"member-02-ranker-linear-s0\.safetensors: sha256"):
        load_ensemble(folder, **kwargs)
    (folder / "ensemble.json").unlink()
    with pytest.raises(StorageError, match=r"ensemble\.json is missing"):
        load_ensemble(folder, **kwargs)
    with pytest.raises(StorageError, match="no diagnosis heads"):
        load_ensemble(tmp_path / "nowhere", **kwargs)


def test_a_failed_save_leaves_the_previous_ensemble(small, tmp_path, monkeypatch):
    ens, gap = small
    folder = tmp_path / "h"
    save_ensemble(ens, gap, folder, embedding_dim=DIM, encoder_sha256="a" * 64)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save = checkpoint_module.save_checkpoint
    calls = []

    def dying_save(path, tensors, meta):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_save(path, tensors, meta)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_ensemble(ens, gap, folder, embedding_dim=DIM, encoder_sha256="b" * 64)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["h"]  # the staging folder was removed
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    save_ensemble(ens, gap, folder, embedding_dim=DIM, encoder_sha256="b" * 64)
    _, _, meta = load_ensemble(folder, expected_dim=DIM, expected_encoder_sha256="b" * 64)
    assert meta["encoder_sha256"] == "b" * 64


def test_subset_keeps_the_chosen_members(small, data):
    ens, _ = small
    rankers = [m.index for m in ens.members if m.kind == "ranker"]
    sub = ens.subset(rankers)
    assert [m.kind for m in sub.members] == ["ranker", "ranker"]
    assert [m.index for m in sub.members] == [0, 1]
    np.testing.assert_allclose(
        sub.standardized(data[2]), ens.standardized(data[2])[rankers], atol=1e-5
    )
    assert sub.training["best_epoch"] == [ens.training["best_epoch"][i] for i in rankers]


# inference: chunking, alignment, standardisation rows


def test_outputs_do_not_depend_on_chunking_or_where_the_buffer_lies(ensemble, data, monkeypatch):
    from llm2loss_pipeline.core.heads import ensemble as ensemble_module

    x_test = data[2]
    whole = ensemble.predict(x_test)
    for offset in (1, 2, 3):  # a float32 view 4, 8, 12 bytes past a 64-byte boundary
        buffer = np.empty(x_test.size + 32, dtype=np.float32)
        start = (offset - buffer.ctypes.data // 4) % 16
        shifted = buffer[start : start + x_test.size].reshape(x_test.shape)
        shifted[:] = x_test
        assert shifted.ctypes.data % 64 == 4 * offset
        assert ensemble.predict(shifted).tobytes() == whole.tobytes(), offset
    monkeypatch.setattr(ensemble_module, "CHUNK_FLOATS", 256 * 16)  # 256-row chunks
    chunked = ensemble.predict(x_test)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert ensemble.predict(x_test[:0]).shape == (len(ensemble), 0)


def test_standardization_rows_are_all_rows_up_to_the_cap_then_a_fixed_subset():
    from llm2loss_pipeline.core.heads.train import STATS_ROWS, standardization_rows

    assert standardization_rows(STATS_ROWS) == slice(None)
    rows = standardization_rows(3 * STATS_ROWS)
    assert len(rows) == STATS_ROWS == len(np.unique(rows))
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 3 * STATS_ROWS
    np.testing.assert_array_equal(rows, standardization_rows(3 * STATS_ROWS))
    assert abs(rows.mean() / (3 * STATS_ROWS) - 0.5) < 0.01  # spread over the whole split


@pytest.mark.parametrize(("n_linear", "n_mlp"), [(3, 2), (0, 2), (3, 0)])
def test_fused_backward_matches_autograd(n_linear, n_mlp):
    """`AllMembers`' hand-written backward, against numerical derivatives in float64, and its
    forward against the per-architecture forward the ensemble predicts with."""
    from llm2loss_pipeline.core.heads.ensemble import shared_forward
    from llm2loss_pipeline.core.heads.fused import AllMembers, FusedParameters

    gen = torch.Generator().manual_seed(7)
    dim, hidden, n = 6, 4, 9

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    stacks = {}
    if n_linear:
        stacks["linear"] = {"weight": rand(n_linear, dim), "bias": rand(n_linear)}
    if n_mlp:
        stacks["mlp"] = {
            "w1": rand(n_mlp, dim, hidden),
            "b1": rand(n_mlp, hidden),
            "w2": rand(n_mlp, hidden),
            "b2": rand(n_mlp),
        }
    fused = FusedParameters(stacks, torch.device("cpu"))
    x = rand(n, dim)
    expected = torch.cat([shared_forward(arch, p, x) for arch, p in stacks.items()])
    torch.testing.assert_close(fused.forward(x), expected)
    for arch, views in fused.views().items():
        for name, view in views.items():
            torch.testing.assert_close(view.detach(), stacks[arch][name])

    def outputs(weight, bias, w2, b2):
        return AllMembers.apply(x, weight, bias, w2, b2, fused.n_linear)

    assert torch.autograd.gradcheck(outputs, (fused.weight, fused.bias, fused.w2, fused.b2))
    # A non-contiguous upstream gradient, as the objective's index_select/gather produce.
    out = fused.forward(x)
    upstream = rand(n, out.shape[0]).T
    grads = torch.autograd.grad(out, list(fused.leaves().values()), upstream)
    reference = torch.autograd.grad(
        torch.cat([shared_forward(arch, p, x) for arch, p in fused.views().items()]),
        list(fused.leaves().values()),
        upstream,
    )
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(NotImplementedError, match="no gradient for x"):
        fused.forward(x.clone().requires_grad_(True)).sum().backward()

    # A training step's forward writes the same gradients into .grad, overwriting the last ones.
    for _ in range(2):
        fused.step_forward(x).backward(upstream)
        for leaf, want in zip(fused.leaves().values(), reference, strict=True):
            torch.testing.assert_close(leaf.grad, want)
    # Its buffers are reused, so a second forward before the first one's backward must not
    # silently give the first a wrong gradient.
    first = fused.step_forward(x)
    fused.step_forward(x + 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward(upstream)


def test_chunked_inference_reuses_one_scratch_block(monkeypatch):
    """Chunks of 256 rows (the last one partial) through one reused activation block give every
    row the mlp members' outputs, written out here without any of that machinery."""
    from llm2loss_pipeline.core.heads import ensemble as ensemble_module

    monkeypatch.setattr(ensemble_module, "CHUNK_FLOATS", 1)  # the 256-row minimum chunk
    gen = torch.Generator().manual_seed(3)
    members, dim, hidden, n = 3, 5, 4, 600
    p = {
        "w1": torch.randn(members, dim, hidden, generator=gen),
        "b1": torch.randn(members, hidden, generator=gen),
        "w2": torch.randn(members, hidden, generator=gen),
        "b2": torch.randn(members, generator=gen),
    }
    x = torch.randn(n, dim, generator=gen)
    act = torch.relu(torch.einsum("nd,mdh->mnh", x, p["w1"]) + p["b1"][:, None, :])
    want = torch.einsum("mnh,mh->mn", act, p["w2"]) + p["b2"][:, None]
    with torch.no_grad():
        got = ensemble_module.forward_in_chunks("mlp", p, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # with autograd on, the same numbers and a gradient that flows back to the parameters
    w2 = p["w2"].clone().requires_grad_(True)
    out = ensemble_module.forward_in_chunks("mlp", {**p, "w2": w2}, x)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(w2.grad, act.sum(dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("n", "batch", "want"),
    [
        (41, 8, [(0, 8), (8, 16), (16, 24), (24, 32), (32, 41)]),  # a lone last sample joins
        (42, 8, [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 42)]),
        (9, 8, [(0, 9)]),
        (8, 8, [(0, 8)]),
        (3, 8, [(0, 3)]),
    ],
)
def test_batch_bounds_never_leave_a_lone_sample(n, batch, want):
    assert batch_bounds(n, batch) == want


def test_a_lone_last_sample_joins_the_batch_before_it(monkeypatch):
    """An epoch of 8 x 5 + 1 samples makes 5 steps, not 6: the lone sample gives rankers no pair.
    It used to be its own step, which crashed rankers alone in backward and, beside regressors,
    moved the rankers on Adam's momentum alone, so a ranker trained in the batch was no longer
    the ranker trained alone (outputs 0.05 apart, where float rounding gives 1e-7)."""
    config = HeadsConfig(n_seeds=1, epochs=3, min_steps=0, batch_size=8, holdout_fraction=0.0)
    n = 8 * 5 + 1
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k)
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    losses = np.exp(3.0 * x[:, 0] * np.sqrt(DIM))
    together = train_ensemble(x, losses, config)
    assert together.training["steps"] == 3 * 5 and len(steps) == 3 * 5
    rankers_only = config.model_copy(update={"kinds": ["ranker"]})
    alone_rankers = train_ensemble(x, losses, rankers_only)  # used to fail in backward
    assert spearmanr(alone_rankers.standardized(x).mean(axis=0), x[:, 0]).statistic > 0.5
    for member in together.members:
        if member.kind == "ranker":
            alone = train_ensemble(x, losses, config, members=[member])
            np.testing.assert_allclose(
                alone.predict(x)[0], together.predict(x)[member.index], rtol=1e-5, atol=1e-5
            )


def test_members_outside_the_grid_are_refused(data):
    x_train, l_train, *_ = data
    config = HeadsConfig(n_seeds=1, epochs=1, min_steps=0)
    good = member_grid(config)[0]
    refused = {
        MemberInfo(1, "regressor", "cnn", 0): r"arch must be one of \['linear', 'mlp'\], got 'cnn'",
        MemberInfo(1, "classifier", "mlp", 0): r"kind must be one of \[.*\], got 'classifier'",
    }
    for bad, message in refused.items():
        with pytest.raises(ValueError, match=message):
            train_ensemble(x_train[:64], l_train[:64], config, members=[good, bad])


def test_a_holdout_without_loss_spread_selects_the_last_epoch(data):
    """Every epoch scores 0 on a holdout whose losses are all tied, and ties keep the earliest
    epoch: training used to stop, silently, after its first epoch."""
    x_train, l_train, *_ = data
    config = HeadsConfig(n_seeds=1, epochs=3, min_steps=0, batch_size=128)
    tied = l_train.copy()
    tied[holdout_split(len(tied), config.holdout_fraction)[1]] = 0.0
    ensemble = train_ensemble(x_train, tied, config)
    assert ensemble.training["best_epoch"] == [3, 3, 3, 3]
    assert ensemble.training["holdout_spearman"] == [None] * 4


def test_holdout_spearman_gives_tied_outputs_their_average_rank(data):
    """A one-unit mlp outputs one value wherever its relu is off: the holdout score must be
    Spearman's (average ranks for ties), which ordinal ranks biased by up to 0.07."""
    x_train, l_train, *_ = data
    config = HeadsConfig(kinds=["regressor"], archs=["mlp"], n_seeds=3, hidden=1, epochs=2,
                         min_steps=0, batch_size=128)  # fmt: skip
    ensemble = train_ensemble(x_train, l_train, config)
    holdout = holdout_split(len(x_train), config.holdout_fraction)[1]
    outputs = ensemble.predict(x_train[holdout])
    tied = [len(np.unique(row)) < len(row) for row in outputs]
    assert any(tied)  # the case under test occurs
    for member, row in enumerate(outputs):
        expected = spearmanr(row, l_train[holdout]).statistic
        assert ensemble.training["holdout_spearman"][member] == pytest.approx(expected, abs=1e-4)


def test_raw_scaling_standardises_losses_of_any_magnitude():
    """Moments of raw losses near 1e160 overflowed (std inf, every target 0: nothing learned)
    and near 1e-300 underflowed (refused as having no spread)."""
    losses = np.random.default_rng(0).lognormal(0.0, 1.0, 500)
    _, reference = fit_transform(losses, "raw")
    for factor in (1e160, 1e-300):
        scaler, targets = fit_transform(losses * factor, "raw")
        np.testing.assert_allclose(targets, reference, rtol=1e-5, atol=1e-6)
        assert scaler.scale == pytest.approx(losses.std() * factor, rel=1e-9)
        np.testing.assert_allclose(scaler.inverse(targets[:5]), losses[:5] * factor, rtol=1e-5)
    with pytest.raises(ValueError, match="float64 cannot standardise"):
        fit_transform(np.array([0.0, 5e-324]), "raw")  # the spread underflows to 0


def test_predictions_do_not_depend_on_a_tensors_strides(ensemble, data):
    x = torch.from_numpy(np.asfortranarray(data[2][:300]))
    assert not x.is_contiguous()
    contiguous = ensemble.predict(x.contiguous())
    assert ensemble.predict(x).tobytes() == contiguous.tobytes()
