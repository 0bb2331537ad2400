"""`dataset.on_bad_image` through model training: a tiny CelebA-layout world with corrupt JPEGs.

Fail mode must list every unreadable image (path, sample, reason) before any model is trained;
skip mode must leave them out and record them (training result, checkpoint sidecar, encoder
metrics, loss and embedding passes) rather than drop them silently. Skipping an image must train
exactly the model that the data set without it trains.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import polars as pl
import pytest
import torch

from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box, save_black_box
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.labels import builtin_label_map, map_labels
from llm2loss_pipeline.core.blackbox.losses import compute_losses
from llm2loss_pipeline.core.blackbox.train import train_classifier
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.encoder import (
    EncoderConfig,
    build_encoder,
    embed_images,
    train_caption_tuned,
)
from llm2loss_pipeline.core.images import ImageDecodeError, UnreadableImagesError
from llm2loss_pipeline.core.storage import read_sidecar
from tests.fault_helpers import one_thread

CPU = DeviceSpec(device="cpu", batch_size=16, num_workers=0)
BLACK_BOX = BlackBoxConfig(epochs=2, image_size=32, width=8, batch_size=8, seed=3)
ENCODER = EncoderConfig(
    image_size=32,
    vision_arch="resnet",
    vision_width=8,
    vision_layers=1,
    vision_head_width=8,
    epochs=2,
    batch_size=8,
    captions_per_image=1,
    seed=0,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, one truncated training JPEG and one zero-byte validation JPEG."""
    from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
    from llm2loss_pipeline.core.world import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("world") / "celeba"
    generate_world(
        WorldConfig(n_identities=6, images_per_identity=8, image_size=32, seed=0), root, workers=1
    )
    manifest = build_manifest(read_celeba(root), shard_size=32)
    label_map = builtin_label_map(manifest.filter(pl.col("split") == "train")["identity"])
    train = manifest.filter(pl.col("split") == "train").sort("index")
    valid = manifest.filter(pl.col("split") == "valid").sort("index")
    truncated = Path(train["path"][5])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    Path(valid["path"][1]).write_bytes(b"")
    bad = {
        train["sample_id"][5]: (str(truncated), "truncated image data"),
        valid["sample_id"][1]: (valid["path"][1], "zero-byte file"),
    }
    return manifest, label_map, train, valid, bad


def inputs(frame: pl.DataFrame, label_map, drop: set[str] = frozenset()):
    kept = frame.filter(~pl.col("sample_id").is_in(list(drop)))
    items = list(zip(kept["sample_id"].to_list(), kept["path"].to_list(), strict=True))
    return items, map_labels(kept["identity"].to_numpy(), label_map)


def listed(error: UnreadableImagesError, bad: dict[str, tuple[str, str]]) -> None:
    message = str(error)
    assert f"{len(bad)} unreadable image(s)" in message
    for sid, (path, reason) in bad.items():
        assert f"{path} (sample {sid}): {reason}" in message
    assert "dataset.on_bad_image: skip" in message
    assert [item[0] for item in error.bad] == list(bad)
    assert isinstance(error, ImageDecodeError)  # what callers caught before


# ---- the black box -------------------------------------------------------------------------


@pytest.mark.parametrize("cache_limit_bytes", [4 << 30, 0], ids=["cached", "streamed"])
def test_black_box_training_fails_listing_the_bad_images(world, cache_limit_bytes):
    _, label_map, train, valid, bad = world
    with pytest.raises(UnreadableImagesError) as caught:
        train_classifier(
            *inputs(train, label_map),
            *inputs(valid, label_map),
            BLACK_BOX,
            CPU,
            cache_limit_bytes=cache_limit_bytes,
        )
    assert "black box training" in str(caught.value)
    assert "no model was trained or saved" in str(caught.value)
    if cache_limit_bytes:  # decoded up front: both splits' bad images in one error
        listed(caught.value, bad)
    else:  # streamed: stops at the first batch that holds one, before a training step on it
        first = next(iter(bad))
        listed(caught.value, {first: bad[first]})


def test_black_box_skip_records_the_images_and_trains_the_model_without_them(world, tmp_path):
    manifest, label_map, train, valid, bad = world
    model, result = train_classifier(
        *inputs(train, label_map), *inputs(valid, label_map), BLACK_BOX, CPU, on_bad_image="skip"
    )
    assert result.skipped == list(bad)
    assert (result.n_train, result.n_val) == (train.height - 1, valid.height - 1)
    clean_model, clean = train_classifier(
        *inputs(train, label_map, set(bad)), *inputs(valid, label_map, set(bad)), BLACK_BOX, CPU
    )
    assert clean.skipped == []
    for name, tensor in clean_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    path = tmp_path / "model.safetensors"
    save_black_box(
        model,
        path,
        arch=BLACK_BOX.arch,
        num_classes=result.num_classes,
        image_size=BLACK_BOX.image_size,
        label_map=label_map,
        config=BLACK_BOX,
        train_result=result,
    )
    assert read_sidecar(path)["skipped"] == list(bad)

    # the loss pass over every sample records the same images and scores all others
    rows = manifest.sort("index")
    items, labels = inputs(rows, label_map)
    losses = compute_losses(
        load_black_box(path),
        items,
        labels,
        rows["split"].to_list(),
        device_spec=CPU,
        on_bad_image="skip",
    )
    assert sorted(losses.skipped) == sorted(bad)
    assert losses.frame.height == rows.height - len(bad)
    assert not set(losses.frame["sample_id"].to_list()) & set(bad)
    assert losses.frame["loss"].is_finite().all()


# ---- the encoder ---------------------------------------------------------------------------


def attribute_rows(frame: pl.DataFrame) -> list[dict[str, bool]]:
    return [
        {"Male": index % 2 == 0, "Eyeglasses": index % 3 == 0, "Smiling": index % 5 == 0}
        for index in frame["index"].to_list()
    ]


def test_encoder_training_fails_listing_the_bad_image_and_trains_nothing(world):
    _, label_map, train, _, bad = world
    encoder = build_encoder(ENCODER)
    before = {k: v.clone() for k, v in encoder.model.visual.state_dict().items()}
    items, _ = inputs(train, label_map)
    with pytest.raises(UnreadableImagesError) as caught:
        train_caption_tuned(encoder, items, attribute_rows(train), ENCODER, CPU)
    first = next(iter(bad))
    listed(caught.value, {first: bad[first]})
    assert "encoder training" in str(caught.value)
    after = encoder.model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_encoder_skip_records_the_image_and_trains_as_without_it(world):
    _, label_map, train, valid, bad = world
    first = next(iter(bad))
    items, _ = inputs(train, label_map)
    skipping = build_encoder(ENCODER)
    metrics = train_caption_tuned(
        skipping, items, attribute_rows(train), ENCODER, CPU, on_bad_image="skip"
    )
    assert metrics["skipped_images"] == [[first, "truncated image data"]]
    assert metrics["n_skipped_images"] == 1 and metrics["n_images"] == train.height - 1

    kept = train.filter(pl.col("sample_id") != first)
    clean = build_encoder(ENCODER)
    clean_metrics = train_caption_tuned(
        clean, inputs(kept, label_map)[0], attribute_rows(kept), ENCODER, CPU
    )
    assert clean_metrics["n_skipped_images"] == 0
    assert metrics["loss_curve"] == clean_metrics["loss_curve"]
    a, b = skipping.model.visual.state_dict(), clean.model.visual.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # embedding the validation split records its zero-byte image and embeds the rest
    embedded = embed_images(skipping, inputs(valid, label_map)[0], CPU, on_bad_image="skip")
    zero_byte = list(bad)[1]
    assert embedded.skipped == [(zero_byte, "zero-byte file")]
    assert len(embedded.sample_ids) == valid.height - 1 and zero_byte not in embedded.sample_ids
    np.testing.assert_allclose(np.linalg.norm(embedded.embeddings, axis=1), 1.0, atol=1e-5)
