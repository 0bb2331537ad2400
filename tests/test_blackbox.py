"""The built-in black box: configuration, training, checkpoints and label maps."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from llm2loss_pipeline.core.blackbox.checkpoint import (
    load_black_box,
    plot_training_curve,
    save_black_box,
)
from llm2loss_pipeline.core.blackbox.cnn import ResizeToUint8, build_model
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.labels import (
    LabelMapError,
    builtin_label_map,
    map_labels,
    num_outputs_needed,
    read_label_map,
)
from llm2loss_pipeline.core.blackbox.train import _augment, train_classifier
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.storage import StorageError, sha256_file, sidecar_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = DeviceSpec(device="cpu", batch_size=32)
CONFIG = BlackBoxConfig(epochs=3, image_size=32, width=8, batch_size=8, seed=3)


def tiny_manifest(root) -> pl.DataFrame:
    from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
    from llm2loss_pipeline.core.world import WorldConfig, generate_world

    config = WorldConfig(n_identities=8, images_per_identity=9, image_size=32, seed=0)
    generate_world(config, root, workers=1)
    return build_manifest(read_celeba(root), shard_size=32)


def split_inputs(manifest: pl.DataFrame, split: str, label_map: dict[int, int]):
    part = manifest.filter(pl.col("split") == split)
    items = list(zip(part["sample_id"].to_list(), part["path"].to_list(), strict=True))
    return items, map_labels(part["identity"].to_numpy(), label_map)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    manifest = tiny_manifest(tmp_path_factory.mktemp("world") / "celeba")
    label_map = builtin_label_map(manifest.filter(pl.col("split") == "train")["identity"])
    return manifest, label_map


def train(world, config=CONFIG, **kwargs):
    manifest, label_map = world
    items, labels = split_inputs(manifest, "train", label_map)
    val_items, val_labels = split_inputs(manifest, "valid", label_map)
    return train_classifier(items, labels, val_items, val_labels, config, CPU, **kwargs)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    events = []
    model, result = train(world, progress=lambda done, total, msg: events.append((done, total)))
    path = tmp_path_factory.mktemp("bb") / "model.safetensors"
    sidecar = save_black_box(
        model,
        path,
        arch=CONFIG.arch,
        num_classes=result.num_classes,
        image_size=CONFIG.image_size,
        label_map=world[1],
        config=CONFIG,
        train_result=result,
    )
    return model, result, path, sidecar, events


def save(model, result, path, label_map, config=CONFIG):
    return save_black_box(
        model,
        path,
        arch=config.arch,
        num_classes=result.num_classes,
        image_size=config.image_size,
        label_map=label_map,
        config=config,
        train_result=result,
    )


# configuration


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"image_size": 8}, "image_size"),
        ({"source": "onnx"}, "source"),
        ({"arch": "vgg"}, "arch"),
        ({"loss": "hinge"}, "loss"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"source": "entry_point"}, "needs entry_point"),
        ({"source": "torchscript"}, "needs torchscript_path"),
        ({"source": "loss_table"}, "needs loss_table_path"),
        ({"entry_point": "pkg.mod.function"}, "package.module:function"),
        ({"epoch": 3}, "epoch"),
    ],
)
def test_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValidationError) as caught:
        BlackBoxConfig(**kwargs)
    assert needle in str(caught.value)


def test_config_is_frozen_and_round_trips():
    config = BlackBoxConfig(source="entry_point", entry_point="my_pkg.models:load")
    assert BlackBoxConfig.model_validate(config.model_dump()) == config
    with pytest.raises(ValidationError):
        config.epochs = 2  # type: ignore[misc]


# models and preprocessing


def test_models_take_uint8_and_give_one_score_per_class():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for arch in ("small_cnn", "resnet18"):
        model = build_model(arch, 7, 32, width=8).eval()
        scores = model(x)
        assert scores.shape == (2, 7) and scores.dtype == torch.float32
        # uint8 input equals the same pixels given as float in [0, 1]
        assert torch.allclose(model(x.float() / 255), scores, atol=1e-5)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        build_model("small_cnn", 1, 32)


def test_preprocess_resizes_the_shorter_side_and_centre_crops():
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 6, 40))  # a white band at the far left, cropped away
    x = ResizeToUint8(20)(image)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 20, 20)
    assert int(x.max()) == 0
    assert tuple(ResizeToUint8(20)(Image.new("L", (20, 20))).shape) == (3, 20, 20)


def test_augmentation_is_a_seeded_shift_and_flip():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    first = _augment(x, torch.Generator().manual_seed(1), shift=2)
    again = _augment(x, torch.Generator().manual_seed(1), shift=2)
    assert torch.equal(first, again)
    flips = _augment(x, torch.Generator().manual_seed(5), shift=0)
    flipped = [torch.equal(flips[i], x[i].flip(-1)) for i in range(4)]
    kept = [torch.equal(flips[i], x[i]) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    # every output pixel comes from its own image (shifted, edges replicated)
    for i in range(4):
        assert set(first[i].flatten().tolist()) <= set(x[i].flatten().tolist())


# training


def test_training_curve_has_one_row_per_epoch(world, trained):
    _, result, _, _, events = trained
    curve = result.curve_frame()
    assert curve["epoch"].to_list() == [1, 2, 3]
    assert curve.columns == [
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "seconds",
    ]
    assert curve.null_count().sum_horizontal().item() == 0
    assert events == [(1, 3), (2, 3), (3, 3)]
    manifest = world[0]
    assert result.n_train == manifest.filter(pl.col("split") == "train").height
    assert result.n_val == manifest.filter(pl.col("split") == "valid").height
    assert result.num_classes == 8
    assert 0.0 <= result.val_accuracy <= 1.0 and np.isfinite(result.train_loss)
    assert curve["train_loss"][-1] < curve["train_loss"][0]


def test_training_is_deterministic(world, trained, tmp_path):
    _, _, _, sidecar, _ = trained
    model, result = train(world)
    again = save(model, result, tmp_path / "again.safetensors", world[1])
    assert again["sha256"] == sidecar["sha256"]
    model, result = train(world, config=CONFIG.model_copy(update={"seed": 4}))
    other = save(model, result, tmp_path / "other.safetensors", world[1])
    assert other["sha256"] != sidecar["sha256"]


def test_streaming_from_disk_trains_the_same_model_as_the_cache(world, trained, tmp_path):
    _, _, _, sidecar, _ = trained
    model, result = train(world, cache_limit_bytes=0)
    streamed = save(model, result, tmp_path / "streamed.safetensors", world[1])
    assert streamed["sha256"] == sidecar["sha256"]


def test_training_rejects_labels_outside_the_classes(world):
    manifest, label_map = world
    items, labels = split_inputs(manifest, "train", label_map)
    labels = labels.copy()
    labels[2] = 99
    with pytest.raises(ValueError, match=rf"outside 0..7 \(e.g. {items[2][0]}=99\)"):
        train_classifier(items, labels, [], np.array([]), CONFIG, CPU, num_classes=8)


def test_training_skips_unreadable_images_when_asked(world, tmp_path):
    manifest, label_map = world
    items, labels = split_inputs(manifest, "train", label_map)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [*items, ("broken.jpg", str(broken))]
    labels = np.append(labels, 0)
    config = CONFIG.model_copy(update={"epochs": 1})
    _, result = train_classifier(items, labels, [], [], config, CPU, on_bad_image="skip")
    assert result.skipped == ["broken.jpg"] and result.n_train == len(items) - 1
    assert result.val_accuracy is None
    with pytest.raises(Exception, match=r"broken\.jpg"):
        train_classifier(items, labels, [], [], config, CPU)


# checkpoints


def test_checkpoint_round_trip_reproduces_logits(world, trained):
    model, result, path, sidecar, _ = trained
    loaded = load_black_box(path)
    assert loaded.label_map == world[1]
    assert loaded.meta["metrics"]["val_accuracy"] == result.val_accuracy
    assert loaded.meta["num_classes"] == 8 and loaded.meta["arch"] == "small_cnn"
    assert len(loaded.meta["curve"]) == 3 and loaded.meta["sha256"] == sidecar["sha256"]
    assert loaded.meta["config"] == CONFIG.model_dump(mode="json")
    manifest = world[0]
    images = [Image.open(p).convert("RGB") for p in manifest["path"].head(6).to_list()]
    x = torch.stack([loaded.preprocess(image) for image in images])
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_tampered_checkpoint_is_rejected(trained, tmp_path):
    _, _, path, _, _ = trained
    copy = tmp_path / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    copy.write_bytes(bytes(blob))
    sidecar_path(copy).write_text(sidecar_path(path).read_text())
    with pytest.raises(StorageError, match="sha256"):
        load_black_box(copy)
    sidecar_path(copy).unlink()
    with pytest.raises(StorageError, match="is missing"):
        load_black_box(copy)


def test_checkpoint_of_another_kind_is_rejected(trained, tmp_path):
    _, _, path, _, _ = trained
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(path.read_bytes())
    meta = json.loads(sidecar_path(path).read_text())
    meta["kind"] = "llm2loss.heads"
    sidecar_path(copy).write_text(json.dumps(meta))
    with pytest.raises(StorageError, match="not a black-box checkpoint"):
        load_black_box(copy)


def test_training_curve_plot_is_a_png(trained, tmp_path):
    _, result, _, _, _ = trained
    out = plot_training_curve(result, tmp_path / "plots" / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sha256_file(out) and not list(out.parent.glob(".*tmp"))


# label maps


def test_builtin_label_map_numbers_sorted_train_identities():
    assert builtin_label_map([30, 10, 20, 10]) == {10: 0, 20: 1, 30: 2}
    with pytest.raises(LabelMapError, match="1 distinct identities"):
        builtin_label_map([5, 5])


def test_label_map_files(tmp_path):
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"10": 2, "20": 0, "30": 1}))
    as_csv = tmp_path / "map.csv"
    as_csv.write_text("identity,index\n10,2\n20,0\n\n30,1\n")
    assert read_label_map(as_json) == read_label_map(as_csv) == {10: 2, 20: 0, 30: 1}
    assert num_outputs_needed(read_label_map(as_json)) == 3


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("a.json", '{"10": 0,\n "20": }', "line 2: not valid JSON"),
        ("a.json", "[1, 2]", "expected a JSON object"),
        ("a.json", '{"ten": 0}', "identity 'ten' is not an integer"),
        ("a.json", '{"10": -1}', "output index -1 is not a non-negative integer"),
        ("a.json", '{"10": 0, "20": 0}', "output index 0 is already the index of identity 10"),
        ("a.json", "{}", "the label map is empty"),
        ("a.csv", "10,0\n20,1\n20,2\n", "line 3: identity 20 is mapped twice"),
        ("a.csv", "10,0\n20,1,5\n", "line 2: expected 2 columns"),
        ("a.csv", "10,0\n20,x\n", "line 2: output index 'x'"),
        ("a.yaml", "10: 0", "expected a .json or .csv file"),
    ],
)
def test_label_map_errors_name_the_line(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LabelMapError) as caught:
        read_label_map(path)
    assert needle in str(caught.value) and name in str(caught.value)


def test_unmapped_identities_are_named():
    mapped = map_labels(np.array([20, 10, 20]), {10: 5, 20: 7})
    assert mapped.tolist() == [7, 5, 7] and mapped.dtype == np.int64
    with pytest.raises(LabelMapError) as caught:
        map_labels([10, 99, 98, 99], {10: 0}, sample_ids=["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    message = str(caught.value)
    assert "2 identities are not in the label map (98, 99)" in message
    assert "affecting 3 samples" in message and "b.jpg, c.jpg, d.jpg" in message


def test_reported_validation_accuracy_is_the_saved_models_share_correct(world, trained) -> None:
    """The published val_accuracy is a count, not just a number in [0, 1]: the saved model, read
    back as the pipeline reads it, gets that share of the validation images right (issue 24's
    range-only assertion above)."""
    from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box
    from llm2loss_pipeline.core.blackbox.losses import compute_losses

    _, result, path, _, _ = trained
    items, labels = split_inputs(world[0], "valid", world[1])
    frame = compute_losses(load_black_box(path), items, labels, ["valid"] * len(items)).frame
    assert frame.height == result.n_val == len(items)
    assert result.val_accuracy == pytest.approx(frame["correct"].mean(), abs=1e-12)
    assert result.curve_frame()["val_accuracy"][-1] == result.val_accuracy
