"""Bad inputs through the pipeline's steps, each a clear error that names the file, line or sample
and leaves no partial output. Unit-level cases live beside their modules (test_images.py,
test_celeba_reader.py, test_losses.py, ...); these go through the steps that users run, on the
tiny world (tests/fault_helpers.py builds it once per test process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from llm2loss_pipeline.core.blackbox.loss_table import LossTableError
from llm2loss_pipeline.core.celeba import ATTR_FILE, IDENTITY_FILE, IMAGE_DIR, CelebaFormatError
from llm2loss_pipeline.core.heads import HeadMismatchError
from llm2loss_pipeline.core.images import ImageDecodeError
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.steps.black_box import (
    LOSSES_TABLE,
    fit_black_box,
    shard_losses,
)
from llm2loss_pipeline.core.steps.data import prepare_dataset
from llm2loss_pipeline.core.steps.encoder import EMBEDDINGS_TABLE, shard_embeddings
from llm2loss_pipeline.core.steps.tables import BadImagesError
from llm2loss_pipeline.core.storage import StorageError, sha256_file
from llm2loss_pipeline.diagnoser import Diagnoser
from tests import fault_helpers as fh

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARD = "shard-00000"


@pytest.fixture(scope="module")
def reference():
    return fh.reference_home()  # about a minute, once per test process: hence the slow marks


def copied_world(tmp_path: Path, reference, models=("black_box", "encoder"), **dataset):
    """A home over a private copy of the reference world (source: celeba), so tests may damage
    images and list files; models are linked read-only from the reference."""
    _, layout_ref = reference
    world = tmp_path / "celeba"
    source = Path(pl.read_parquet(layout_ref.manifest)["path"][0]).parents[1]
    shutil.copytree(source, world, ignore=shutil.ignore_patterns("*.png", "*.json"))
    config = fh.fast_config(
        tmp_path / "home", dataset={"source": "celeba", "celeba_root": str(world), **dataset}
    )
    layout = Layout.at(config.home)
    prepare_dataset(layout, config.dataset, config.world)
    layout.models.mkdir(parents=True)
    for name in models:
        (layout.models / name).symlink_to(layout_ref.models / name)
    return layout, config, world


def shard_items(layout, shard: str = SHARD) -> pl.DataFrame:
    manifest = pl.read_parquet(layout.manifest)
    return manifest.filter(pl.col("shard") == shard).sort("index")


def losses_of(layout, config):
    with fh.one_thread():
        return shard_losses(layout, SHARD, config.black_box, config.dataset, config.devices.losses)


def embeddings_of(layout, config):
    with fh.one_thread():
        return shard_embeddings(layout, SHARD, config.dataset, config.devices.embeddings)


# ---- images in the world ------------------------------------------------------------------


def damage(rows: pl.DataFrame) -> dict[str, tuple[str, str]]:
    """Three bad images in one shard: truncated, garbage and zero-byte (sample -> path, reason)."""
    picks = {
        rows["sample_id"][3]: "truncated image data",
        rows["sample_id"][40]: "not a recognised image format",
        rows["sample_id"][77]: "zero-byte file",
    }
    paths = dict(zip(rows["sample_id"], rows["path"], strict=True))
    truncated, garbage, empty = (Path(paths[sid]) for sid in picks)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 700, np.uint8).tobytes())
    empty.write_bytes(b"")
    return {sid: (paths[sid], reason) for sid, reason in picks.items()}


@pytest.mark.slow
@pytest.mark.parametrize("table", [LOSSES_TABLE, EMBEDDINGS_TABLE])
def test_bad_images_fail_listing_every_one_and_write_nothing(tmp_path, reference, table):
    layout, config, _ = copied_world(tmp_path, reference)
    bad = damage(shard_items(layout))
    run = losses_of if table == LOSSES_TABLE else embeddings_of
    with pytest.raises(BadImagesError) as caught:
        run(layout, config)
    message = str(caught.value)
    assert f"{table} {SHARD}: 3 unreadable image(s)" in message
    for sid, (path, reason) in bad.items():
        assert f"{path} (sample {sid}): {reason}" in message
    assert "dataset.on_bad_image: skip" in message
    assert isinstance(caught.value, ImageDecodeError)  # callers catching the old type still do
    assert [item[0] for item in caught.value.bad] == list(bad)
    assert not layout.shard_table(table, SHARD).exists()
    assert fh.leftovers(layout.home) == []


@pytest.mark.slow
def test_bad_images_are_skipped_and_recorded_when_asked(tmp_path, reference):
    _, layout_ref = reference
    layout, config, _ = copied_world(tmp_path, reference, on_bad_image="skip")
    bad = damage(shard_items(layout))

    losses = losses_of(layout, config)
    assert losses.skipped == list(bad)
    assert losses.frame.height == shard_items(layout).height - 3
    expected = pl.read_parquet(layout_ref.shard_table(LOSSES_TABLE, SHARD))
    assert losses.frame.equals(expected.filter(~pl.col("sample_id").is_in(list(bad))))
    assert pl.read_parquet(layout.shard_table(LOSSES_TABLE, SHARD)).equals(losses.frame)

    embedded = embeddings_of(layout, config)
    assert [sid for sid, _ in embedded.skipped] == list(bad)
    assert [reason for _, reason in embedded.skipped][2] == "zero-byte file"
    expected = pl.read_parquet(layout_ref.shard_table(EMBEDDINGS_TABLE, SHARD))
    kept = expected.filter(~pl.col("sample_id").is_in(list(bad)))
    np.testing.assert_array_equal(
        embedded.frame["embedding"].to_numpy(), kept["embedding"].to_numpy()
    )


def odd_modes(path: Path) -> dict[str, tuple[bytes, Image.Image]]:
    """The image at `path` as grayscale JPEG, RGBA PNG and CMYK JPEG bytes, each with the RGB
    picture the pipeline must see (alpha composited on white)."""
    import io

    original = Image.open(path).convert("RGB")
    rgba = original.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, original.width, dtype=np.uint8), (original.height, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out: dict[str, tuple[bytes, Image.Image]] = {}
    for mode, image, fmt in (
        ("L", original.convert("L"), "JPEG"),
        ("RGBA", rgba, "PNG"),
        ("CMYK", original.convert("CMYK"), "JPEG"),
    ):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=95)
        decoded = Image.open(io.BytesIO(buffer.getvalue()))
        decoded.load()
        assert decoded.mode == mode
        if mode == "RGBA":
            white = Image.new("RGBA", decoded.size, (255, 255, 255, 255))
            expected = Image.alpha_composite(white, decoded).convert("RGB")
        else:
            expected = decoded.convert("RGB")
        out[mode] = (buffer.getvalue(), expected)
    return out


@pytest.mark.slow
def test_grayscale_rgba_and_cmyk_images_are_converted_end_to_end(tmp_path, reference):
    odd, odd_config, _ = copied_world(tmp_path / "odd", reference)
    plain, plain_config, _ = copied_world(tmp_path / "plain", reference)
    rows = shard_items(odd)
    chosen = {}
    for position, mode in ((5, "L"), (17, "RGBA"), (60, "CMYK")):
        sid = rows["sample_id"][position]
        data, expected = odd_modes(Path(rows["path"][position]))[mode]
        Path(rows["path"][position]).write_bytes(data)  # a .jpg name with any content, as found
        expected.save(shard_items(plain)["path"][position], format="PNG")  # the same RGB pixels
        chosen[sid] = mode

    for run, column in ((losses_of, "loss"), (embeddings_of, "embedding")):
        got, want = run(odd, odd_config), run(plain, plain_config)
        assert got.skipped == [] and got.frame.height == rows.height
        picked = got.frame.filter(pl.col("sample_id").is_in(list(chosen)))
        assert picked.height == 3
        assert picked.equals(want.frame.filter(pl.col("sample_id").is_in(list(chosen))))
        if column == "loss":
            assert picked["loss"].is_finite().all()
        else:
            norms = np.linalg.norm(picked["embedding"].to_numpy(), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)


# ---- list files -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing id", "extra id"])
def test_identity_file_that_disagrees_with_the_attributes_writes_no_manifest(
    tmp_path, reference, case
):
    layout, config, world = copied_world(tmp_path, reference, models=())
    before = sha256_file(layout.manifest)
    identity = world / IDENTITY_FILE
    lines = identity.read_text().splitlines()
    if case == "missing id":
        named = lines[9].split()[0]
        identity.write_text("\n".join(lines[:9] + lines[10:]) + "\n")
        expected = f"{IDENTITY_FILE} lacks 1 sample ids that {ATTR_FILE} lists: {named}"
    else:
        named = "999999.jpg"
        identity.write_text("\n".join([*lines, "999999.jpg 3"]) + "\n")
        expected = f"{ATTR_FILE} lacks 1 sample ids that {IDENTITY_FILE} lists: {named}"
    with pytest.raises(CelebaFormatError) as caught:
        prepare_dataset(layout, config.dataset, config.world)
    assert expected in str(caught.value) and str(world) in str(caught.value)
    assert sha256_file(layout.manifest) == before  # the previous manifest stays as it was
    fresh = Layout.at(tmp_path / "fresh")  # a first run: no manifest at all afterwards
    with pytest.raises(CelebaFormatError):
        prepare_dataset(fresh, config.dataset, config.world)
    assert not fresh.manifest.exists()
    assert not fresh.home.exists() or fh.leftovers(fresh.home) == []


@pytest.mark.slow
def test_missing_image_listed_in_the_partition_file(tmp_path, reference):
    layout, config, world = copied_world(tmp_path, reference, models=())
    before = sha256_file(layout.manifest)
    gone = sorted((world / IMAGE_DIR).glob("*.jpg"))[4]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) listed in .* are missing.*{gone}"):
        prepare_dataset(layout, config.dataset, config.world)
    assert sha256_file(layout.manifest) == before


# ---- a ready loss table through fit_black_box ------------------------------------------------


def broken_loss_tables(table: pl.DataFrame) -> dict[str, tuple[pl.DataFrame, str]]:
    first, second = table["sample_id"][0], table["sample_id"][7]
    base = table.select("sample_id", "loss", "predicted")

    def with_loss(sid: str, value: float) -> pl.DataFrame:
        return base.with_columns(
            loss=pl.when(pl.col("sample_id") == sid).then(value).otherwise("loss")
        )

    return {
        "missing": (
            base.filter(pl.col("sample_id") != second),
            f"missing from the table: {second}",
        ),
        "duplicated": (pl.concat([base, base.slice(7, 1)]), f"more than once: {second}"),
        "nan": (with_loss(second, float("nan")), f"NaN or infinite loss for samples {second}"),
        "inf": (with_loss(first, float("inf")), f"NaN or infinite loss for samples {first}"),
        "negative": (with_loss(first, -0.25), f"negative loss for samples {first}"),
    }


@pytest.fixture(scope="module")
def all_losses(reference) -> pl.DataFrame:
    _, layout = reference
    paths = sorted(layout.shard_dir(LOSSES_TABLE).glob("*.parquet"))
    return pl.concat([pl.read_parquet(path) for path in paths])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "duplicated", "nan", "inf", "negative"])
def test_bad_loss_table_through_fit_black_box_names_samples_and_keeps_the_old(
    tmp_path, reference, all_losses, case
):
    good_path = tmp_path / "good.parquet"
    all_losses.select("sample_id", "loss", "predicted").write_parquet(good_path)
    layout = fh.clone_home(reference[1], tmp_path / "home")
    good = fh.fast_config(
        layout.home, black_box={"source": "loss_table", "loss_table_path": str(good_path)}
    )
    fit_black_box(layout, good.black_box, good.devices.black_box)
    copy = layout.black_box.parent / "loss_table.parquet"
    recorded = {path: sha256_file(path) for path in (copy, layout.black_box_reference)}

    frame, needle = broken_loss_tables(all_losses)[case]
    bad_path = tmp_path / f"{case}.csv"
    frame.write_csv(bad_path)
    bad = fh.fast_config(
        layout.home, black_box={"source": "loss_table", "loss_table_path": str(bad_path)}
    )
    with pytest.raises(LossTableError) as caught:
        fit_black_box(layout, bad.black_box, bad.devices.black_box)
    assert needle in str(caught.value) and str(bad_path) in str(caught.value)
    assert {path: sha256_file(path) for path in recorded} == recorded
    assert fh.leftovers(layout.home) == []

    served = shard_losses(layout, SHARD, good.black_box, good.dataset, good.devices.losses)
    expected = all_losses.filter(pl.col("sample_id").is_in(shard_items(layout)["sample_id"]))
    assert served.frame["loss"].to_list() == expected["loss"].to_list()


# ---- in-range settings on tiny data -----------------------------------------------------------


@pytest.mark.slow
def test_a_one_epoch_black_box_on_tiny_data_trains(tmp_path, reference):
    """Two optimiser steps in all: torch's OneCycleLR used to divide by zero for 4 steps or less."""
    from llm2loss_pipeline.core.blackbox.checkpoint import load_black_box

    layout = fh.clone_home(reference[1], tmp_path / "home")
    config = fh.fast_config(layout.home, black_box={"epochs": 1, "batch_size": 128})
    with fh.one_thread():
        result = fit_black_box(layout, config.black_box, config.devices.black_box)
    assert len(result.curve) == 1 and np.isfinite(result.curve[0]["train_loss"])
    assert load_black_box(layout.black_box).meta["sha256"] == result.sha256


# ---- the query side ---------------------------------------------------------------------------


@pytest.mark.slow
def test_encoder_of_another_dimension_is_refused_by_diagnoser_load(tmp_path, reference):
    from llm2loss_pipeline.core.encoder import EncoderConfig, build_encoder, save_encoder

    layout = fh.clone_home(reference[1], tmp_path / "home", ["heads"])
    config = EncoderConfig(
        image_size=32, embed_dim=64, text_projection="linear", vision_width=8, vision_head_width=8
    )
    with fh.one_thread():
        save_encoder(build_encoder(config), layout.encoder_dir)
    with pytest.raises(HeadMismatchError) as caught:
        Diagnoser.load(layout.home)
    message = str(caught.value)
    assert "(dim 384)" in message and "(dim 64)" in message
    assert "rematerialize diagnosis_heads" in message


@pytest.fixture(scope="module")
def diagnoser(reference) -> Diagnoser:
    return Diagnoser.load(reference[1].home)


@pytest.mark.slow
def test_empty_prompts_are_named(diagnoser):
    with pytest.raises(ValueError, match="text A is empty"):
        diagnoser.compare("", "a person wearing glasses")
    with pytest.raises(ValueError, match="text B is empty"):
        diagnoser.compare("a person wearing glasses", " \t\n")
    with pytest.raises(ValueError, match="text 2 is empty"):
        diagnoser.rank(["a smiling person", ""])


@pytest.mark.slow
def test_over_long_prompt_is_truncated_with_a_warning(diagnoser):
    long = "a smiling person wearing glasses and a hat " * 40
    with pytest.warns(UserWarning, match=r"tokens; it was truncated to the tokenizer context of"):
        scores = diagnoser.score_texts([long])
    assert np.isfinite(scores).all() and scores.shape == (8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        longer = diagnoser.score_texts([long + " with many more words after the cut"])
    np.testing.assert_array_equal(scores, longer)  # only the first context's tokens count


# ---- configuration and home through the command line ----------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm2loss_pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("heads", "n_seed", 3, "heads.n_seed: unknown key"),
        ("world", "n_identities", 1, "world.n_identities: Input should be greater than"),
        ("dataset", "on_bad_image", "ignore", "dataset.on_bad_image: Value error, on_bad_image"),
    ],
)
def test_cli_rejects_a_bad_config_naming_the_key(tmp_path, section, key, value, needle):
    raw = yaml.safe_load(fh.TINY.read_text())
    raw["home"] = str(tmp_path / "home")
    raw.setdefault(section, {})[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = cli("run", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()  # nothing ran, nothing was written


def test_cli_refuses_a_home_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, so nothing can be created beneath it, even by root\n")
    home = blocker / "sub"
    done = cli("run", "--config", str(fh.TINY), env={"LLM2LOSS_HOME": str(home)})
    assert done.returncode == 2, done.stderr
    assert f"{home} is not a writable directory" in done.stderr
    assert "LLM2LOSS_HOME" in done.stderr and "Traceback" not in done.stderr
    assert blocker.read_text().startswith("a regular file")


def test_run_pipeline_refuses_an_existing_read_only_directory(tmp_path):
    from llm2loss_pipeline.defs.runner import run_pipeline

    read_only = Path("/sys")  # sysfs: even root cannot create a file here
    try:
        (read_only / "llm2loss-probe").write_text("")
    except OSError:
        pass
    else:  # pragma: no cover - a kernel where sysfs takes files
        (read_only / "llm2loss-probe").unlink()
        pytest.skip("/sys is writable here")
    config = fh.fast_config(read_only)
    with pytest.raises(StorageError, match=r"/sys is not a writable directory \(Permission"):
        run_pipeline(config, ["prepare"])
