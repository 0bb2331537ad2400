"""The per-sample loss pass and ready loss tables."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from torch import nn

from llm2loss_pipeline.core.blackbox.cnn import ResizeToUint8
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.labels import builtin_label_map, map_labels
from llm2loss_pipeline.core.blackbox.loss_table import (
    LossTableError,
    read_loss_table,
    split_loss_table,
)
from llm2loss_pipeline.core.blackbox.losses import (
    LOSS_SCHEMA,
    compute_losses,
    prefetched,
    true_class_auroc,
)
from llm2loss_pipeline.core.blackbox.train import train_classifier
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.images import ImageDecodeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = DeviceSpec(device="cpu", batch_size=16)
CONFIG = BlackBoxConfig(epochs=8, image_size=32, width=8, batch_size=8, seed=0)
PREPROCESS = ResizeToUint8(32)


def tiny_manifest(root) -> pl.DataFrame:
    from llm2loss_pipeline.core.celeba import build_manifest, read_celeba
    from llm2loss_pipeline.core.world import WorldConfig, generate_world

    config = WorldConfig(n_identities=8, images_per_identity=9, image_size=32, seed=0)
    generate_world(config, root, workers=1)
    return build_manifest(read_celeba(root), shard_size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny world, its built-in label map, and a small CNN trained on its train split."""
    manifest = tiny_manifest(tmp_path_factory.mktemp("world") / "celeba")
    label_map = builtin_label_map(manifest.filter(pl.col("split") == "train")["identity"])
    labels = map_labels(manifest["identity"].to_numpy(), label_map)
    items = list(zip(manifest["sample_id"].to_list(), manifest["path"].to_list(), strict=True))
    splits = manifest["split"].to_list()
    train = [i for i, split in enumerate(splits) if split == "train"]
    val = [i for i, split in enumerate(splits) if split == "valid"]
    model, _ = train_classifier(
        [items[i] for i in train],
        labels[train],
        [items[i] for i in val],
        labels[val],
        CONFIG,
        CPU,
    )
    return manifest, label_map, items, labels, splits, model


def losses(setup, **kwargs):
    _, _, items, labels, splits, model = setup
    return compute_losses(model, items, labels, splits, PREPROCESS, CPU, **kwargs)


# the per-sample ranking AUROC


def test_true_class_auroc_by_hand():
    scores = torch.tensor(
        [
            [3.0, 1.0, 2.0, 3.0],  # target 0: 2 below, 1 tie -> 2.5 / 3
            [3.0, 1.0, 2.0, 3.0],  # target 1: lowest -> 0
            [3.0, 1.0, 2.0, 3.0],  # target 2: 1 below -> 1 / 3
            [0.0, 5.0, -1.0, 4.0],  # target 1: highest -> 1
            [7.0, 7.0, 7.0, 7.0],  # all tied -> 0.5
        ]
    )
    targets = torch.tensor([0, 1, 2, 1, 3])
    auroc = true_class_auroc(scores, targets)
    assert auroc.dtype == torch.float64
    assert auroc.tolist() == pytest.approx([2.5 / 3, 0.0, 1 / 3, 1.0, 0.5])


# the loss pass


def test_schema_and_dtypes_are_exact(setup):
    frame = losses(setup).frame
    assert list(frame.schema.items()) == list(LOSS_SCHEMA.items())
    assert frame.columns == [
        "sample_id",
        "split",
        "label",
        "loss",
        "predicted",
        "correct",
        "p_true",
        "true_class_auroc",
    ]
    assert frame.height == len(setup[2]) and frame.null_count().sum_horizontal().item() == 0


def test_output_follows_input_order(setup):
    _, _, items, labels, splits, model = setup
    order = np.random.default_rng(0).permutation(len(items))
    shuffled = compute_losses(
        model,
        [items[i] for i in order],
        labels[order],
        [splits[i] for i in order],
        PREPROCESS,
        DeviceSpec(device="cpu", batch_size=5),
    ).frame
    assert shuffled["sample_id"].to_list() == [items[i][0] for i in order]
    straight = losses(setup).frame
    assert np.allclose(
        shuffled.sort("sample_id")["loss"].to_numpy(), straight["loss"].to_numpy(), atol=1e-6
    )


def test_losses_are_the_cross_entropy_of_the_model(setup):
    _, _, items, labels, splits, model = setup
    frame = losses(setup).frame
    loss = frame["loss"].to_numpy()
    assert np.isfinite(loss).all() and (loss >= 0).all()
    assert np.allclose(loss, -np.log(frame["p_true"].to_numpy()), rtol=1e-9, atol=1e-12)
    x = torch.stack([PREPROCESS(Image.open(path).convert("RGB")) for _, path in items])
    with torch.inference_mode():
        scores = model(x)
    expected = nn.functional.cross_entropy(scores, torch.from_numpy(labels), reduction="none")
    assert np.allclose(loss, expected.numpy(), atol=1e-5)
    assert frame["predicted"].to_list() == scores.argmax(1).tolist()
    assert frame["correct"].to_list() == (scores.argmax(1).numpy() == labels).tolist()
    assert frame["label"].to_list() == labels.tolist()
    assert frame["split"].to_list() == splits
    assert np.allclose(
        frame["true_class_auroc"].to_numpy(),
        true_class_auroc(scores, torch.from_numpy(labels)).numpy(),
    )
    # a correct prediction outranks every other class
    assert (frame.filter(pl.col("correct"))["true_class_auroc"] == 1.0).all()


def test_train_loss_is_below_held_out_loss(setup):
    means = dict(losses(setup).frame.group_by("split").agg(pl.col("loss").mean()).iter_rows())
    held_out = (means["valid"] + means["test"]) / 2
    assert means["train"] < held_out
    assert means["train"] < math.log(8)  # better than a uniform guess over 8 identities


def test_bf16_autocast_still_computes_losses_in_float(setup):
    _, _, items, labels, splits, model = setup
    spec = DeviceSpec(device="cpu", precision="bf16", batch_size=16)
    frame = compute_losses(model, items, labels, splits, PREPROCESS, spec).frame
    assert frame.schema["loss"] == pl.Float64
    reference = losses(setup).frame["loss"].to_numpy()
    assert np.abs(frame["loss"].to_numpy() - reference).max() < 0.25
    assert np.allclose(frame["loss"].to_numpy(), -np.log(frame["p_true"].to_numpy()))


def test_nll_takes_log_probabilities(setup):
    _, _, items, labels, splits, model = setup
    log_model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    frame = compute_losses(log_model, items, labels, splits, PREPROCESS, CPU, loss="nll").frame
    assert np.allclose(frame["loss"].to_numpy(), losses(setup).frame["loss"].to_numpy(), atol=1e-5)


class NanOnWhite(nn.Module):
    """Wraps a model; gives NaN scores for all-white images (a stand-in for a numerical bug)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.model(x)
        white = (x == 255).flatten(1).all(1)
        return torch.where(white[:, None], torch.full_like(scores, math.nan), scores)


def with_white_images(setup, tmp_path, count: int):
    _, _, items, labels, splits, model = setup
    extra = []
    for i in range(count):
        path = tmp_path / f"white{i}.jpg"
        Image.new("RGB", (32, 32), (255, 255, 255)).save(path, quality=100)
        extra.append((f"white{i}.jpg", str(path)))
    position = [3, 10, 20, 30, 40, 50, 60, 65, 68, 70, 71][:count]
    items, labels, splits = list(items), list(labels), list(splits)
    for offset, (where, item) in enumerate(zip(position, extra, strict=True)):
        items.insert(where + offset, item)
        labels.insert(where + offset, 0)
        splits.insert(where + offset, "test")
    return NanOnWhite(model), items, np.array(labels), splits


def test_nonfinite_losses_are_an_error_naming_the_samples(setup, tmp_path):
    model, items, labels, splits = with_white_images(setup, tmp_path, 1)
    with pytest.raises(ValueError, match=r"non-finite loss .* samples white0\.jpg \(1 in all\)"):
        compute_losses(model, items, labels, splits, PREPROCESS, CPU)
    model, items, labels, splits = with_white_images(setup, tmp_path, 11)
    with pytest.raises(ValueError) as caught:
        compute_losses(model, items, labels, splits, PREPROCESS, CPU)
    assert "white9.jpg, ... (11 in all)" in str(caught.value)
    assert "white10.jpg" not in str(caught.value)


def test_nonfinite_losses_can_be_dropped_and_reported(setup, tmp_path):
    model, items, labels, splits = with_white_images(setup, tmp_path, 2)
    result = compute_losses(model, items, labels, splits, PREPROCESS, CPU, nonfinite="drop")
    assert result.dropped == ["white0.jpg", "white1.jpg"]
    assert result.frame["sample_id"].to_list() == [s for s, _ in setup[2]]
    assert result.frame["loss"].is_finite().all()


def test_unreadable_images_fail_or_are_skipped(setup, tmp_path):
    _, _, items, labels, splits, model = setup
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Image.open(items[0][1]).tobytes()[:100])
    items = [items[0], ("broken.jpg", str(broken)), *items[1:]]
    labels = np.insert(labels, 1, 0)
    splits = [splits[0], "test", *splits[1:]]
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        compute_losses(model, items, labels, splits, PREPROCESS, CPU)
    result = compute_losses(model, items, labels, splits, PREPROCESS, CPU, on_bad_image="skip")
    assert result.skipped == ["broken.jpg"]
    assert "broken.jpg" not in result.frame["sample_id"].to_list()
    assert result.frame.height == len(items) - 1


def test_bad_arguments_are_named(setup):
    _, _, items, labels, splits, model = setup
    with pytest.raises(ValueError, match="must have the same length"):
        compute_losses(model, items, labels[:-1], splits, PREPROCESS, CPU)
    too_big = labels.copy()
    too_big[[4, 9]] = 8
    with pytest.raises(
        ValueError, match=rf"has 8 outputs but samples {items[4][0]}, {items[9][0]}"
    ):
        compute_losses(model, items, too_big, splits, PREPROCESS, CPU)
    with pytest.raises(ValueError, match="needs a preprocess"):
        compute_losses(model, items, labels, splits, None, CPU)


def test_progress_reports_every_batch(setup):
    seen = []
    losses(setup, progress=lambda done, total, message: seen.append((done, total)))
    batches = math.ceil(len(setup[2]) / CPU.batch_size)
    assert seen == [(i, batches) for i in range(1, batches + 1)]


def test_worker_processes_give_the_same_table(setup):
    _, _, items, labels, splits, model = setup
    spec = DeviceSpec(device="cpu", batch_size=16, num_workers=1)
    frame = compute_losses(model, items, labels, splits, PREPROCESS, spec).frame
    assert frame.equals(losses(setup).frame)


def test_loss_pass_restores_the_thread_count(setup):
    before = torch.get_num_threads()
    losses(setup, threads=1)
    assert torch.get_num_threads() == before


def test_prefetched_keeps_order_reraises_and_stops():
    assert list(prefetched(range(10), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("decoder exploded")

    with pytest.raises(RuntimeError, match="decoder exploded"):
        list(prefetched(failing()))
    endless = prefetched(iter(range(10**9)), depth=1)
    assert next(endless) == 0
    endless.close()  # the consumer stops early: the producer thread must end too
    names = [thread.name for thread in threading.enumerate()]
    assert "llm2loss-prefetch" not in names


# ready loss tables


@pytest.fixture(scope="module")
def reference(setup):
    return losses(setup).frame


def write(frame: pl.DataFrame, path) -> str:
    if str(path).endswith(".csv"):
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return str(path)


def test_loss_table_happy_path(setup, reference, tmp_path):
    manifest, label_map = setup[0], setup[1]
    shuffled = reference.select("sample_id", "loss", "predicted", "p_true").sample(
        fraction=1.0, shuffle=True, seed=1
    )
    for name in ("table.parquet", "table.csv"):
        table = read_loss_table(write(shuffled, tmp_path / name), manifest, label_map=label_map)
        assert list(table.schema.items()) == list(LOSS_SCHEMA.items())
        assert table.drop("true_class_auroc").equals(reference.drop("true_class_auroc"))
        assert table["true_class_auroc"].null_count() == table.height


def test_loss_table_with_only_the_required_columns(setup, reference, tmp_path):
    manifest = setup[0]
    path = write(reference.select("sample_id", "loss"), tmp_path / "t.parquet")
    table = read_loss_table(path, manifest)
    assert table["label"].to_list() == manifest["identity"].to_list()  # no label map: identity
    for column in ("predicted", "correct", "p_true", "true_class_auroc"):
        assert table[column].null_count() == table.height
    assert table["loss"].to_list() == reference["loss"].to_list()


def broken_tables(reference: pl.DataFrame) -> dict[str, tuple[pl.DataFrame, str]]:
    first, second = reference["sample_id"][0], reference["sample_id"][1]
    base = reference.select("sample_id", "loss", "predicted", "p_true")
    extra = pl.DataFrame({"sample_id": ["999999.jpg"], "loss": [0.1]})
    return {
        "missing_loss": (base.drop("loss"), "lacks column(s) loss"),
        "duplicated": (
            pl.concat([base, base.head(2)]),
            f"appear more than once: {first}, {second} (2 in all)",
        ),
        "unknown_ids": (
            pl.concat([base.select("sample_id", "loss"), extra]),
            "not in the manifest: 999999.jpg (1 in all)",
        ),
        "missing_ids": (base.slice(3), f"missing from the table: {first}, {second}, "),
        "nan": (
            base.with_columns(
                pl.when(pl.col("sample_id") == second)
                .then(float("nan"))
                .otherwise("loss")
                .alias("loss")
            ),
            f"NaN or infinite loss for samples {second} (1 in all)",
        ),
        "inf": (
            base.with_columns(
                pl.when(pl.col("sample_id") == first)
                .then(float("inf"))
                .otherwise("loss")
                .alias("loss")
            ),
            f"NaN or infinite loss for samples {first} (1 in all)",
        ),
        "negative": (
            base.with_columns(
                pl.when(pl.col("sample_id") == first).then(-0.5).otherwise("loss").alias("loss")
            ),
            f"negative loss for samples {first} (1 in all)",
        ),
        "p_true": (
            base.with_columns(p_true=pl.col("p_true") + 2.0),
            "p_true outside [0, 1]",
        ),
        "text_loss": (base.with_columns(loss=pl.lit("high")), "column 'loss' (String)"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing_loss",
        "duplicated",
        "unknown_ids",
        "missing_ids",
        "nan",
        "inf",
        "negative",
        "p_true",
        "text_loss",
    ],
)
def test_loss_table_errors_name_the_samples(setup, reference, tmp_path, case):
    frame, needle = broken_tables(reference)[case]
    path = write(frame, tmp_path / f"{case}.parquet")
    with pytest.raises(LossTableError) as caught:
        read_loss_table(path, setup[0], label_map=setup[1])
    assert needle in str(caught.value) and path in str(caught.value)


def test_loss_table_file_errors(setup, reference, tmp_path):
    with pytest.raises(LossTableError, match="does not exist"):
        read_loss_table(tmp_path / "none.parquet", setup[0])
    text = tmp_path / "table.txt"
    text.write_text("sample_id,loss\n")
    with pytest.raises(LossTableError, match=r"expected a \.parquet or \.csv file"):
        read_loss_table(text, setup[0])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(LossTableError, match="could not be read"):
        read_loss_table(garbage, setup[0])


def test_loss_table_labels_must_agree_with_the_label_map(setup, reference, tmp_path):
    frame = reference.select("sample_id", "loss", "label").with_columns(
        label=pl.when(pl.col("sample_id") == reference["sample_id"][5])
        .then(pl.col("label") + 1)
        .otherwise("label")
    )
    path = write(frame, tmp_path / "labels.parquet")
    with pytest.raises(
        LossTableError,
        match=f"disagrees with the label map for samples {reference['sample_id'][5]}",
    ):
        read_loss_table(path, setup[0], label_map=setup[1])
    partial_map = dict(list(setup[1].items())[1:])
    with pytest.raises(LossTableError, match="not in the label map"):
        read_loss_table(path, setup[0], label_map=partial_map)


def test_split_loss_table_serves_one_shard(setup, reference):
    manifest = setup[0]
    shards = manifest["shard"].unique().sort().to_list()
    assert len(shards) == 3  # 72 samples in shards of 32
    parts = [split_loss_table(reference, manifest, shard) for shard in shards]
    assert [part.height for part in parts] == [32, 32, 8]
    assert pl.concat(parts).equals(reference)
    assert (
        parts[1]["sample_id"].to_list()
        == manifest.filter(pl.col("shard") == shards[1])["sample_id"].to_list()
    )
    with pytest.raises(LossTableError, match="shard 'nope' is not in the manifest"):
        split_loss_table(reference, manifest, "nope")
