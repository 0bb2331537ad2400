"""The semantic encoder: building offline, text embeddings, caption training, checkpoints,
embedding images, and the zero-shot / retrieval evaluation."""

from __future__ import annotations

import json
import math
import os
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder import (
    EncoderConfig,
    build_encoder,
    embed_images,
    load_encoder,
    retrieval_accuracy,
    save_encoder,
    train_caption_tuned,
    zero_shot_auroc,
    zero_shot_scores,
)
from llm2loss_pipeline.core.encoder.captions import build_caption_pool, truth
from llm2loss_pipeline.core.encoder.evaluate import attribute_direction
from llm2loss_pipeline.core.encoder.train import (
    NegativeQueue,
    attribute_directions,
    attribute_loss,
    step_columns,
)
from llm2loss_pipeline.core.images import ImageDecodeError
from llm2loss_pipeline.core.metrics import auroc
from llm2loss_pipeline.core.prompts import attribute_prompt_pairs, describe
from llm2loss_pipeline.core.storage import StorageError

CPU = DeviceSpec(device="cpu", batch_size=16, num_workers=0)
TINY = EncoderConfig(
    image_size=32,
    vision_arch="resnet",
    vision_width=8,
    vision_layers=1,
    vision_head_width=8,
    epochs=24,
    batch_size=16,
    lr=3e-3,
    captions_per_image=2,
    seed=0,
)


# ---- a tiny synthetic world: Eyeglasses is a red square, Wearing_Hat a blue band on top ------


def _draw(rng: random.Random, glasses: bool, hat: bool, size: int = 32) -> Image.Image:
    background = tuple(rng.randrange(90, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pixels = image.load()
    for _ in range(40):  # speckle, so no two images are the same
        pixels[rng.randrange(size), rng.randrange(size)] = tuple(
            rng.randrange(256) for _ in range(3)
        )
    if glasses:
        x, y = rng.randrange(8, 14), rng.randrange(12, 16)
        for i in range(x, x + 10):
            for j in range(y, y + 8):
                pixels[i, j] = (220, 20, 20)
    if hat:
        for i in range(size):
            for j in range(0, 7):
                pixels[i, j] = (20, 40, 220)
    return image


def _make_world(folder: Path, n: int, seed: int) -> tuple[list[tuple[str, str]], list[dict]]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items, rows = [], []
    for index in range(n):
        glasses, hat = index % 2 == 0, (index // 2) % 2 == 0
        path = folder / f"{seed}_{index:03d}.png"
        _draw(rng, glasses, hat).save(path)
        items.append((path.name, str(path)))
        rows.append({"Eyeglasses": glasses, "Wearing_Hat": hat, "Male": rng.random() < 0.5})
    return items, rows


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a shared 2-core machine several
    threads per op spend far longer waiting for each other than computing (measured 40x)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("world")
    train_items, train_rows = _make_world(root / "train", 64, seed=1)
    valid_items, valid_rows = _make_world(root / "valid", 40, seed=2)
    return {"train": (train_items, train_rows), "valid": (valid_items, valid_rows)}


@pytest.fixture(scope="module")
def trained(world: dict) -> dict:
    encoder = build_encoder(TINY)
    text_before = {k: v.clone() for k, v in encoder.model.text.state_dict().items()}
    valid_items, _ = world["valid"]
    untrained = embed_images(encoder, valid_items, CPU).embeddings
    metrics = train_caption_tuned(encoder, *world["train"], TINY, CPU)
    return {
        "encoder": encoder,
        "metrics": metrics,
        "text_before": text_before,
        "untrained": untrained,
    }


def _labels(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


# ---- building and the text tower --------------------------------------------------------------


def test_caption_tuned_builds_offline_with_a_frozen_text_tower(trained: dict) -> None:
    encoder = trained["encoder"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert encoder.embed_dim == 384
    assert encoder.sha256 is None
    assert not [n for n, p in encoder.model.text.named_parameters() if p.requires_grad]
    assert any(p.requires_grad for p in encoder.model.visual.parameters())
    # training left the text tower (projection included) bit-identical
    after = encoder.model.text.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained["text_before"].items())
    assert not encoder.model.training


def test_text_embeddings_are_the_sentence_model_embeddings(trained: dict) -> None:
    encoder = trained["encoder"]
    vectors = encoder.encode_texts(["a person wearing glasses", "face of a bald person"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # identity projection: equal to mean-pooled, normalised MiniLM embeddings
    from transformers import AutoModel, AutoTokenizer

    folder = str(encoder.text_model_dir)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tokenizer(["a person wearing glasses"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    pooled = (hidden * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum()
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()[0]
    np.testing.assert_allclose(vectors[0], expected, atol=1e-5)


def test_paraphrases_land_near_each_other(trained: dict) -> None:
    encoder = trained["encoder"]
    query, same, other = encoder.encode_texts(
        [
            "a person wearing glasses",
            "face of a person wearing eyeglasses",
            "face of a bald person",
        ]
    )
    assert query @ same > query @ other + 0.2


def test_text_cache_and_order(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = trained["encoder"]
    texts = ["face of a smiling man", "face of an old woman", "face of a smiling man"]
    first = encoder.encode_texts(texts)
    np.testing.assert_array_equal(first[0], first[2])
    calls = []
    original = encoder.model.encode_text
    monkeypatch.setattr(
        encoder.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    again = encoder.encode_texts(list(reversed(texts)))
    assert not calls  # served from the cache
    np.testing.assert_array_equal(again, first[::-1])
    encoder.encode_texts(["a brand new sentence about hats"])
    assert calls
    assert encoder.encode_texts([]).shape == (0, 384)


def test_empty_text_is_an_error_naming_its_position(trained: dict) -> None:
    with pytest.raises(ValueError, match="position 1"):
        trained["encoder"].encode_texts(["face of a man", "   "])
    with pytest.raises(TypeError, match="sequence"):
        trained["encoder"].encode_texts("face of a man")


def test_long_text_is_truncated_with_a_warning(trained: dict) -> None:
    encoder = trained["encoder"]
    long_text = "a person wearing glasses and " + "a very tall hat " * 40
    with pytest.warns(UserWarning, match="truncated") as record:
        vector = encoder.encode_texts([long_text, "face of a man"])
    assert "a person wearing glasses" in str(record[0].message)
    assert np.isclose(np.linalg.norm(vector[0]), 1.0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode_texts(["a short text that fits"])


# ---- caption training -------------------------------------------------------------------------


def test_training_teaches_the_rendered_attributes(trained: dict, world: dict) -> None:
    encoder, metrics = trained["encoder"], trained["metrics"]
    valid_items, valid_rows = world["valid"]
    result = embed_images(encoder, valid_items, CPU)
    scores = zero_shot_auroc(result.embeddings, _labels(valid_rows), encoder.encode_texts)
    before = zero_shot_auroc(trained["untrained"], _labels(valid_rows), encoder.encode_texts)
    assert scores["Eyeglasses"] > 0.85, (scores, before)
    assert scores["Wearing_Hat"] > 0.9, (scores, before)
    assert scores["Eyeglasses"] > before["Eyeglasses"] + 0.1 or before["Eyeglasses"] > 0.9
    assert len(metrics["loss_curve"]) == TINY.epochs
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    assert metrics["n_captions"] == 64 * TINY.captions_per_image
    assert metrics["seconds"] > 0
    retrieval = retrieval_accuracy(
        result.embeddings,
        [describe({k: r[k] for k in ("Eyeglasses", "Wearing_Hat")}) for r in valid_rows],
        encoder.encode_texts,
    )
    assert retrieval["top1"] > retrieval["chance_top1"] + 0.15, retrieval


def test_training_is_deterministic_for_a_seed(world: dict) -> None:
    config = TINY.model_copy(update={"epochs": 2})
    items, rows = world["train"]
    weights = []
    for _ in range(2):
        encoder = build_encoder(config)
        train_caption_tuned(encoder, items[:32], rows[:32], config, CPU)
        weights.append(encoder.model.visual.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_negative_queue_takes_a_fixed_number_and_covers_the_pool() -> None:
    queue = NegativeQueue(n_pool=100, size=30, generator=torch.Generator().manual_seed(3))
    taken = [queue.take() for _ in range(10)]  # 300 = three passes over the pool
    assert all(len(part) == 30 for part in taken)
    flat = torch.cat(taken)
    # every caption serves equally often: three times in three passes
    assert torch.equal(torch.bincount(flat, minlength=100), torch.full((100,), 3))
    again = NegativeQueue(n_pool=100, size=30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([again.take() for _ in range(10)]), flat)
    # a pool that fits is scored whole, and nothing is drawn from the generator
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    whole = NegativeQueue(n_pool=30, size=30, generator=generator)
    captions = torch.tensor([4, 4, 17])
    assert step_columns(whole, captions) == (None, captions)
    assert torch.equal(generator.get_state(), state)


def test_step_columns_hold_the_batch_captions_without_repeats() -> None:
    queue = NegativeQueue(n_pool=10_000, size=64, generator=torch.Generator().manual_seed(0))
    captions = torch.tensor([9_999, 5, 5, 123])
    for _ in range(5):
        columns, positions = step_columns(queue, captions)
        assert columns is not None and len(columns) <= len(captions) + 64
        assert len(set(columns.tolist())) == len(columns)
        assert torch.equal(columns[positions], captions)


def test_pool_loss_scores_a_bounded_number_of_captions_whatever_the_data(world: dict) -> None:
    """The per-step negatives do not grow with the dataset: with `pool_size` 8, a step scores at
    most batch + 8 captions for 32 or 64 images (64 or 128 in the pool), while the whole pool
    (the old behaviour, and still that of a pool that fits) grows with the images."""
    items, rows = world["train"]
    columns = {}
    for pool_size in (8, 10_000):
        config = TINY.model_copy(update={"epochs": 1, "pool_size": pool_size})
        for n in (32, 64):
            metrics = train_caption_tuned(build_encoder(config), items[:n], rows[:n], config, CPU)
            assert metrics["n_captions"] == 2 * n
            columns[pool_size, n] = metrics["max_columns_per_step"]
    assert columns[8, 32] <= TINY.batch_size + 8 and columns[8, 64] <= TINY.batch_size + 8
    assert columns[10_000, 32] == 64 and columns[10_000, 64] == 128


def test_training_with_sampled_negatives_is_deterministic_for_a_seed(world: dict) -> None:
    items, rows = world["train"]
    weights = {}
    for name, pool_size in (("a", 8), ("b", 8), ("whole", 10_000)):
        config = TINY.model_copy(update={"epochs": 2, "pool_size": pool_size})
        encoder = build_encoder(config)
        train_caption_tuned(encoder, items, rows, config, CPU)
        weights[name] = encoder.model.visual.state_dict()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    # and the sample is really in use: the whole pool trains other weights
    assert not all(torch.equal(weights["a"][k], weights["whole"][k]) for k in weights["a"])


def test_training_rejects_mismatched_inputs(trained: dict, world: dict) -> None:
    items, rows = world["train"]
    with pytest.raises(ValueError, match="pair up"):
        train_caption_tuned(trained["encoder"], items, rows[:-1], TINY, CPU)
    # any attribute name is the dataset's own (a table's columns); a row without any is not
    with pytest.raises(ValueError, match="attribute row 0 is empty"):
        train_caption_tuned(trained["encoder"], items[:4], [{}] * 4, TINY, CPU)


def test_attribute_directions_use_caption_wording_and_point_like_the_probes(
    trained: dict,
) -> None:
    encoder = trained["encoder"]
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return encoder.encode_texts(texts)

    directions = attribute_directions(encode, CELEBA_ATTRIBUTES)
    assert directions.shape == (len(CELEBA_ATTRIBUTES), encoder.embed_dim)
    assert np.allclose(np.linalg.norm(directions, axis=1), 1.0, atol=1e-5)
    # the report's probe prompts are never among the texts trained on
    probes = {
        text for name in CELEBA_ATTRIBUTES for pair in attribute_prompt_pairs(name) for text in pair
    }
    assert not probes & set(seen)
    # ... yet the caption-worded direction agrees with the probes' direction
    glasses = CELEBA_ATTRIBUTES.index("Eyeglasses")
    probe = attribute_direction(encoder.encode_texts, "Eyeglasses")
    cosine = directions[glasses] @ probe / np.linalg.norm(probe)
    assert cosine > 0.5, cosine
    # the dual basis: each dual direction is blind to every other attribute's text direction
    dual = attribute_directions(encoder.encode_texts, CELEBA_ATTRIBUTES, kind="dual")
    cross = dual @ directions.T
    assert np.allclose(cross - np.diag(np.diag(cross)), 0.0, atol=1e-4)
    assert (np.diag(cross) > 0).all()


def test_attribute_loss_moves_embeddings_along_the_text_direction() -> None:
    generator = torch.Generator().manual_seed(0)
    n, d = 256, 16
    directions = torch.nn.functional.normalize(torch.randn(3, d, generator=generator), dim=-1)
    labels = torch.rand(n, 3, generator=generator) < 0.4
    known = torch.ones(n, 3, dtype=torch.bool)
    known[:10, 2] = False  # unknown labels carry no loss
    raw = torch.randn(n, d, generator=generator).requires_grad_()
    log_scale = torch.full((3,), math.log(10.0), requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([raw, log_scale, bias], lr=0.05)

    def planted_auroc() -> float:
        features = torch.nn.functional.normalize(raw.detach(), dim=-1)
        return auroc((features @ directions[0]).numpy(), labels[:, 0].numpy())

    before, losses = planted_auroc(), []
    for _ in range(40):
        features = torch.nn.functional.normalize(raw, dim=-1)
        loss = attribute_loss(features, directions, log_scale, bias, labels, known)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert before < 0.65 and planted_auroc() > 0.95, (before, planted_auroc())
    assert log_scale.detach().exp().min() > 0  # the scale stays positive: no sign flip
    none_known = attribute_loss(
        features, directions, log_scale, bias, labels, torch.zeros_like(known)
    )
    assert none_known.item() == 0.0


def test_training_with_the_attribute_loss_records_its_curve(world: dict) -> None:
    config = TINY.model_copy(update={"epochs": 2, "attribute_loss_weight": 1.0})
    items, rows = world["train"]
    weights, curves = [], []
    for _ in range(2):
        encoder = build_encoder(config)
        metrics = train_caption_tuned(encoder, items[:32], rows[:32], config, CPU)
        weights.append(encoder.model.visual.state_dict())
        curves.append(metrics["attribute_loss_curve"])
    assert len(curves[0]) == 2 and curves[0][-1] < curves[0][0], curves[0]
    assert curves[0] == curves[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # a training-only head: the saved model has no extra parameters
    assert set(weights[0]) == set(build_encoder(TINY).model.visual.state_dict())


def test_caption_pool_truth_table() -> None:
    rows = [
        {"Eyeglasses": True, "Male": False},
        {"Eyeglasses": False, "Male": False},
        {"Eyeglasses": True, "Male": True},
    ]
    pool = build_caption_pool(rows, captions_per_image=3, seed=0)
    table = truth(pool.rows, pool.known, pool.stated, pool.values)
    for image in range(3):
        own = range(image * 3, image * 3 + 3)
        assert table[image, list(own)].all()  # an image's own captions are true of it
        listed = pool.true_of[image, : pool.n_true[image]]
        assert set(own) <= set(listed.tolist())
        assert table[image, listed].all()
    # a caption stating Eyeglasses=True is false of the image without glasses
    assert pool.attributes == ("Eyeglasses", "Male")  # the rows' own attributes, in order
    column = pool.attributes.index("Eyeglasses")
    glasses = np.flatnonzero(pool.stated[:, column] & pool.values[:, column])
    assert len(glasses) and not table[1, glasses].any()


# ---- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("files_map", [True, False], ids=["sidecar", "sidecar-before-files-map"])
def test_save_load_reproduces_embeddings_and_checks_sha(
    trained: dict, world: dict, tmp_path: Path, files_map: bool
) -> None:
    encoder = trained["encoder"]
    out = tmp_path / "encoder"
    sidecar = save_encoder(encoder, out)
    assert encoder.sha256 == sidecar["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no temporary left over
    assert json.loads((out / "encoder.json").read_text())["sha256"] == sidecar["sha256"]
    assert sidecar["metrics"]["training"]["epochs"] == TINY.epochs
    if files_map:
        loaded = load_encoder(out)
    else:  # a folder saved before every file was hashed still loads, the same, with a warning
        _drop_files_map(out)
        with pytest.warns(UserWarning, match="predates per-file hashes.*rematerialize"):
            loaded = load_encoder(out)
    assert loaded.sha256 == sidecar["sha256"]
    assert loaded.config == encoder.config
    items = world["valid"][0][:8]
    np.testing.assert_array_equal(
        embed_images(loaded, items, CPU).embeddings, embed_images(encoder, items, CPU).embeddings
    )
    np.testing.assert_array_equal(
        loaded.encode_texts(["face of a man"]), encoder.encode_texts(["face of a man"])
    )
    # saving again over the folder replaces it whole
    save_encoder(loaded, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]

    weights = out / "open_clip_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(StorageError, match="sha256"):
        load_encoder(out)
    (out / "encoder.json").unlink()
    with pytest.raises(StorageError, match="incomplete"):
        load_encoder(out)
    with pytest.raises(StorageError, match="no encoder folder"):
        load_encoder(tmp_path / "nowhere")


def test_saved_folder_loads_with_plain_open_clip(trained: dict, tmp_path: Path) -> None:
    encoder = trained["encoder"]
    sidecar = save_encoder(encoder, tmp_path / "encoder")
    namespace: dict = {}
    exec(sidecar["load_with_open_clip"], namespace)  # the snippet a user would paste
    model, preprocess, tokenizer = (
        namespace["model"],
        namespace["preprocess"],
        namespace["tokenizer"],
    )
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    x = preprocess(image)[None]
    np.testing.assert_allclose(preprocess(image).numpy(), encoder.preprocess(image).numpy(), atol=0)
    with torch.no_grad():
        plain_image = model.encode_image(x, normalize=True)
        plain_text = model.encode_text(tokenizer(["face of a man"]), normalize=True)
    torch.testing.assert_close(plain_image, encoder.encode_image_tensors(x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        plain_text.numpy(), encoder.encode_texts(["face of a man"]), atol=1e-6
    )


def test_moved_folder_still_loads(trained: dict, tmp_path: Path) -> None:
    save_encoder(trained["encoder"], tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    loaded = load_encoder(tmp_path / "b")
    np.testing.assert_allclose(
        loaded.encode_texts(["face of a man"]),
        trained["encoder"].encode_texts(["face of a man"]),
        atol=1e-6,
    )


# ---- pretrained mode through a local checkpoint file --------------------------------------------


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    name = "llm2loss-test-tiny-clip"
    (folder / f"{name}.json").write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "patch_size": 16,
                    "head_width": 16,
                },
                "text_cfg": {
                    "context_length": 77,
                    "vocab_size": 49408,
                    "width": 32,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(7)
    model = open_clip.create_model(name)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"name": name, "weights": weights, "model": model.eval()}


def test_pretrained_mode_from_a_local_checkpoint_file(tiny_open_clip: dict, tmp_path: Path) -> None:
    config = EncoderConfig(
        mode="pretrained",
        model_name=tiny_open_clip["name"],
        pretrained="a-tag-that-does-not-exist",
        checkpoint_path=str(tiny_open_clip["weights"]),
    )
    encoder = build_encoder(config)
    assert encoder.embed_dim == 16
    reference = tiny_open_clip["model"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference.encode_image(x, normalize=True)
        expected_text = reference.encode_text(encoder.tokenizer(["face of a man"]), normalize=True)
    torch.testing.assert_close(encoder.encode_image_tensors(x), expected)
    np.testing.assert_allclose(
        encoder.encode_texts(["face of a man"]), expected_text.numpy(), atol=1e-6
    )
    with pytest.warns(UserWarning, match="truncated"):
        encoder.encode_texts(["word " * 100])

    save_encoder(encoder, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert loaded.config.mode == "pretrained"
    torch.testing.assert_close(loaded.encode_image_tensors(x), expected)

    missing = config.model_copy(update={"checkpoint_path": str(tmp_path / "missing.safetensors")})
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        build_encoder(missing)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        EncoderConfig(mode="finetuned")
    with pytest.raises(ValueError, match=r"(?i)extra"):
        EncoderConfig(epoch=3)
    with pytest.raises(ValueError, match="attribute_loss_weight"):
        EncoderConfig(attribute_loss_weight=-0.5)
    with pytest.raises(ValueError, match="attribute_directions"):
        EncoderConfig(attribute_directions="orthogonal")
    with pytest.raises(ValueError, match="pool_size"):
        EncoderConfig(pool_size=0)
    with pytest.raises(ValueError, match="multiple of vision_patch_size"):
        EncoderConfig(vision_arch="vit", image_size=60, vision_patch_size=8)
    with pytest.raises(ValueError, match="identity"):
        build_encoder(
            EncoderConfig(embed_dim=128, image_size=32, vision_width=8, vision_head_width=8)
        )


# ---- embedding images --------------------------------------------------------------------------


def test_embed_images_keeps_order_normalises_and_skips_bad_images(
    trained: dict, world: dict, tmp_path: Path
) -> None:
    encoder = trained["encoder"]
    items = list(world["valid"][0][:7])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    items.insert(3, ("bad_sample", str(bad)))
    spec = DeviceSpec(device="cpu", batch_size=3, num_workers=0)
    result = embed_images(encoder, items, spec, on_bad_image="skip")
    assert result.sample_ids == [s for s, _ in items if s != "bad_sample"]
    assert result.skipped[0][0] == "bad_sample" and len(result.skipped) == 1
    assert "not a recognised image" in result.skipped[0][1]
    assert result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    # one image at a time gives the same vectors, in the same order
    single = [
        encoder.encode_image_tensors(encoder.preprocess(Image.open(path).convert("RGB"))[None])[0]
        for sample, path in items
        if sample != "bad_sample"
    ]
    np.testing.assert_allclose(result.embeddings, torch.stack(single).numpy(), atol=1e-5)
    with pytest.raises(ImageDecodeError, match="bad_sample"):
        embed_images(encoder, items, spec, on_bad_image="fail")


# ---- evaluation and metrics ---------------------------------------------------------------------


def test_zero_shot_on_text_embeddings_is_perfect(trained: dict) -> None:
    encoder = trained["encoder"]
    with_glasses = ["a man with glasses", "a woman wearing spectacles", "someone in eyeglasses"]
    without = ["a man without glasses", "a woman with bare eyes", "someone with no eyeglasses"]
    embeddings = encoder.encode_texts(with_glasses + without)
    labels = {"Eyeglasses": np.array([True] * 3 + [False] * 3), "Male": np.ones(6, bool)}
    result = zero_shot_auroc(embeddings, labels, encoder.encode_texts)
    assert result["Eyeglasses"] == 1.0
    assert np.isnan(result["Male"])
    scores = zero_shot_scores(encoder, embeddings, "Eyeglasses")
    assert scores.shape == (6,) and scores[:3].min() > scores[3:].max()
    import polars as pl

    frame = pl.DataFrame({"sample_id": list("abcdef"), "Eyeglasses": [1, 1, 1, -1, -1, -1]})
    assert zero_shot_auroc(embeddings, frame, encoder.encode_texts) == {"Eyeglasses": 1.0}
    with pytest.raises(ValueError, match="labels for 6"):
        zero_shot_auroc(embeddings, {"Eyeglasses": np.ones(5, bool)}, encoder.encode_texts)


def test_retrieval_accuracy_definition(trained: dict) -> None:
    encoder = trained["encoder"]
    captions = ["face of a smiling man", "face of an old woman", "a bald man with glasses"]
    captions = [*captions, captions[0]]  # a repeated caption counts once
    perfect = retrieval_accuracy(encoder.encode_texts(captions), captions, encoder.encode_texts)
    assert perfect["top1"] == 1.0 and perfect["n_images"] == 4
    assert perfect["chance_top1"] == pytest.approx(1 / 3, abs=1e-4)
    shuffled = retrieval_accuracy(
        encoder.encode_texts(captions[::-1]), captions, encoder.encode_texts, k=(1, 3)
    )
    assert shuffled["top3"] == 1.0 and shuffled["top1"] < 1.0
    groups = retrieval_accuracy(
        encoder.encode_texts(captions), captions, encoder.encode_texts, gallery_size=2
    )
    assert groups["top1"] == 1.0 and groups["chance_top1"] == 0.5


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    positives, negatives = scores[labels], scores[~labels]
    pairwise = (positives[:, None] > negatives[None, :]).mean() + 0.5 * (
        positives[:, None] == negatives[None, :]
    ).mean()
    assert auroc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert np.isnan(auroc([1, 2], [1, 1]))
    with pytest.raises(ValueError, match="pair up"):
        auroc([1, 2, 3], [0, 1])


# ---- every file of a saved encoder is checked, not just the weights ---------------------------


def _drop_files_map(folder: Path) -> None:
    """Make `folder`'s sidecar look like one written before the "files" map existed."""
    sidecar = json.loads((folder / "encoder.json").read_text())
    del sidecar["files"]
    (folder / "encoder.json").write_text(json.dumps(sidecar))


def test_sidecar_lists_every_file_and_round_trips(trained: dict, tmp_path: Path) -> None:
    from llm2loss_pipeline.core.storage import sha256_file

    out = tmp_path / "encoder"
    sidecar = save_encoder(trained["encoder"], out)
    on_disk = {p.name for p in out.iterdir()} - {"encoder.json"}
    assert set(sidecar["files"]) == on_disk
    assert {"tokenizer.json", "vocab.txt", "open_clip_config.json"} <= on_disk
    assert all(sidecar["files"][name] == sha256_file(out / name) for name in on_disk)
    # the identity stays the weights' hash, so heads trained against it still match
    assert sidecar["sha256"] == sidecar["files"]["open_clip_model.safetensors"]
    (out / "notes.txt").write_text("a file the sidecar does not list is ignored")
    loaded = load_encoder(out)
    assert loaded.sha256 == sidecar["sha256"] == trained["encoder"].sha256
    np.testing.assert_array_equal(
        loaded.encode_texts(["face of a man"]), trained["encoder"].encode_texts(["face of a man"])
    )


def test_swapped_tokens_in_tokenizer_json_are_refused(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "encoder"
    save_encoder(trained["encoder"], out)
    path = out / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["man"], vocab["woman"] = vocab["woman"], vocab["man"]  # flips a comparison's verdict
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(StorageError, match=r"tokenizer\.json: sha256 .* was modified"):
        load_encoder(out)


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.txt"])
def test_a_deleted_tokenizer_file_is_refused(trained: dict, tmp_path: Path, name: str) -> None:
    out = tmp_path / "encoder"
    save_encoder(trained["encoder"], out)
    (out / name).unlink()
    with pytest.raises(StorageError, match=re.escape(name) + " is missing.*incomplete"):
        load_encoder(out)


def test_a_truncated_open_clip_config_is_refused_naming_it(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "encoder"
    save_encoder(trained["encoder"], out)
    path = out / "open_clip_config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(StorageError, match=r"open_clip_config\.json: sha256"):
        load_encoder(out)
    # without the hashes (an old sidecar) the parse error still names the file
    _drop_files_map(out)
    with (
        pytest.warns(UserWarning, match="predates per-file hashes"),
        pytest.raises(StorageError, match=r"open_clip_config\.json line \d+: not valid JSON"),
    ):
        load_encoder(out)
    save_encoder(trained["encoder"], out)
    _drop_files_map(out)
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text()[:100])
    with (
        pytest.warns(UserWarning, match="predates per-file hashes"),
        pytest.raises(StorageError, match=r"tokenizer\.json line \d+: not valid JSON"),
    ):
        load_encoder(out)


def test_bf16_training_records_its_precision_and_is_deterministic(
    world: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`precision: auto` on a CPU with bf16 arithmetic (forced here, so any machine runs it)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    spec = CPU.model_copy(update={"precision": "auto"})
    config = TINY.model_copy(update={"epochs": 2})
    items, rows = world["train"]
    runs = []
    for _ in range(2):
        encoder = build_encoder(config)
        metrics = train_caption_tuned(encoder, items[:32], rows[:32], config, spec)
        runs.append((metrics, encoder.model.visual.state_dict()))
    assert runs[0][0]["precision"] == "bf16"
    weights = [state for _, state in runs]
    # the weights stay fp32 (autocast computes in bf16), so the checkpoint format is unchanged
    assert all(value.dtype != torch.bfloat16 for value in weights[0].values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    fp32 = train_caption_tuned(build_encoder(config), items[:32], rows[:32], config, CPU)
    assert fp32["precision"] == "fp32"
