"""Reliability, round two: shard content hashes, stale shards, and the image pixel cap.

- A bit flipped in a shard on disk is an error naming the file, on the polars path
  (`read_shards`) and on the DuckDB path (`parquet_source`), never a silently wrong value.
- A shard written before hashes existed is read with one warning.
- Rewriting the manifest removes shard files that do not belong to it (fewer shards after a
  `shard_size` change, or another dataset's rows under the same shard name), each with a line.
- An image whose header declares more pixels than the cap is refused before decoding, naming
  the file, and `on_bad_image: skip` skips it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from llm2loss_pipeline.core import images
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.sql import connect, parquet_source, run_sql, shard_glob
from llm2loss_pipeline.core.steps import tables
from llm2loss_pipeline.core.steps.tables import (
    read_shards,
    remove_stale_shards,
    shard_rows,
    write_shard,
)
from llm2loss_pipeline.core.storage import StorageError, sidecar_path

TABLE = "per_sample_losses"


def _manifest(n: int, shard_size: int, prefix: str = "img") -> pl.DataFrame:
    ids = [f"{i + 1:06d}.jpg" for i in range(n)]
    return pl.DataFrame(
        {
            "sample_id": ids,
            "path": [f"/data/{prefix}/{sid}" for sid in ids],
            "split": ["test"] * n,
            "index": list(range(n)),
            "shard": [f"shard-{i // shard_size:05d}" for i in range(n)],
        }
    )


def _losses(rows: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": rows["sample_id"],
            "split": rows["split"],
            "loss": [0.25 + 0.01 * i for i in rows["index"].to_list()],
        }
    )


def _write_all(layout: Layout, manifest: pl.DataFrame) -> None:
    for key in manifest["shard"].unique(maintain_order=True).to_list():
        rows = shard_rows(manifest, key)
        write_shard(layout, TABLE, key, _losses(rows), rows)


def _flip_bit(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.at(tmp_path / "home")


def test_shards_carry_a_sidecar_with_their_sha256(layout: Layout):
    manifest = _manifest(10, 4)
    _write_all(layout, manifest)
    shard = layout.shard_table(TABLE, "shard-00001")
    import json

    meta = json.loads(sidecar_path(shard).read_text())
    from llm2loss_pipeline.core.storage import sha256_file

    assert meta["sha256"] == sha256_file(shard)
    assert meta["rows"] == 4 and meta["shard"] == "shard-00001"
    frame = read_shards(layout, TABLE, manifest)
    assert frame["loss"].to_list() == pytest.approx([0.25 + 0.01 * i for i in range(10)])


def test_a_flipped_bit_is_an_error_naming_the_shard_on_both_read_paths(layout: Layout):
    manifest = _manifest(10, 4)
    _write_all(layout, manifest)
    shard = layout.shard_table(TABLE, "shard-00001")
    _flip_bit(shard)
    with pytest.raises(StorageError, match=r"shard-00001\.parquet: sha256 .* does not match"):
        read_shards(layout, TABLE, manifest)
    with pytest.raises(StorageError, match=r"shard-00001\.parquet: sha256"):
        parquet_source(shard_glob(layout.shard_dir(TABLE)))
    with pytest.raises(StorageError, match="--shard shard-00001"):
        run_sql(connect(), "read_table", tables={"path": shard_glob(layout.shard_dir(TABLE))})


def test_a_shard_that_makes_polars_panic_is_an_error_naming_the_file(layout: Layout, monkeypatch):
    """Issue 23, crashes 4: a malformed shard written before hashes existed made polars panic
    (a Rust panic, a BaseException) with no file named."""
    from polars.exceptions import PanicException

    manifest = _manifest(10, 4)
    _write_all(layout, manifest)
    shard = layout.shard_table(TABLE, "shard-00001")
    sidecar_path(shard).unlink()  # an old, unhashed shard: no sha256 to catch the damage first
    real = pl.read_parquet

    def panicking(path, *args, **kwargs):
        if Path(path) == shard:
            raise PanicException("index out of bounds: the len is 3 but the index is 7")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tables.pl, "read_parquet", panicking)
    with pytest.raises(StorageError) as caught:
        read_shards(layout, TABLE, manifest)
    assert str(caught.value).startswith(f"{shard}: polars cannot decode it (index out of bounds")
    monkeypatch.setattr(tables.pl, "read_parquet", real)
    data = bytearray(shard.read_bytes())  # and real damage: the footer's first bytes inverted
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for offset in range(footer, min(footer + 56, len(data) - 8)):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"shard-00001\.parquet: (not a readable|polars cannot)"):
        read_shards(layout, TABLE, manifest)


def test_a_shard_without_a_sidecar_is_read_with_one_warning(layout: Layout, caplog):
    manifest = _manifest(10, 4)
    _write_all(layout, manifest)
    for key in ("shard-00000", "shard-00001"):
        sidecar_path(layout.shard_table(TABLE, key)).unlink()
    tables_logger = "llm2loss_pipeline.core.storage"
    with caplog.at_level(logging.WARNING, logger=tables_logger):
        first = read_shards(layout, TABLE, manifest)
        read_shards(layout, TABLE, manifest)
    warnings = [r for r in caplog.records if "no content hash" in r.getMessage()]
    assert len(warnings) == 1 and str(layout.shard_dir(TABLE)) in warnings[0].getMessage()
    assert first.height == 10


def test_a_shard_size_change_removes_the_stale_shards_and_says_so(layout: Layout, caplog):
    old = _manifest(10, 4)  # shards 0..2
    _write_all(layout, old)
    new = _manifest(10, 5)  # shards 0..1, each with other rows than before
    with caplog.at_level(logging.INFO, logger=tables.__name__):
        removed = remove_stale_shards(layout, new)
    assert len(removed) == 3
    assert any("shard-00002.parquet (the manifest has no shard shard-00002)" in r for r in removed)
    assert any("shard-00000.parquet (computed for other samples" in r for r in removed)
    assert sorted(p.name for p in layout.shard_dir(TABLE).iterdir()) == []
    assert [r.getMessage() for r in caplog.records if "removed stale" in r.getMessage()] == removed
    # rewritten for the new manifest: exactly its shards, nothing removed on the next pass
    _write_all(layout, new)
    assert remove_stale_shards(layout, new) == []
    assert read_shards(layout, TABLE, new).height == 10


def test_a_same_named_shard_of_another_dataset_is_never_read(layout: Layout):
    old = _manifest(10, 5, prefix="old-world")  # the same ids and shard names, other images
    _write_all(layout, old)
    new = _manifest(10, 5, prefix="new-world")
    with pytest.raises(StorageError, match="computed for other samples than the manifest's"):
        read_shards(layout, TABLE, new)
    assert len(remove_stale_shards(layout, new)) == 2


def test_an_unhashed_stale_shard_with_colliding_ids_is_removed(layout: Layout):
    old = _manifest(12, 4)
    _write_all(layout, old)
    for path in layout.shard_dir(TABLE).glob("*.json"):
        path.unlink()  # shards written before hashes existed
    new = _manifest(12, 6)  # shard-00000 now holds 000001..000006: the old one is a subset
    removed = remove_stale_shards(layout, new)
    assert [Path(line.split()[3]).name for line in removed] == [
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert "holds samples that the manifest puts outside shard-00001" in removed[0]
    # the old shard-00000 (a subset of the new one's rows) stays; the reader fills no gaps with
    # foreign rows: a glob over the folder now sees only shards of the current manifest
    assert sorted(p.name for p in layout.shard_dir(TABLE).glob("*.parquet")) == [
        "shard-00000.parquet"
    ]


# ---- the pixel cap ---------------------------------------------------------------------------


def _bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A 16x16 JPEG whose frame header declares width x height (a few hundred bytes on disk)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 7] = height.to_bytes(2, "big")
    data[at + 7 : at + 9] = width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("loader", [images.load_image, images.load_image_tensor])
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path: Path, loader):
    bomb = _bomb(tmp_path / "bomb.jpg")
    with pytest.raises(images.ImageDecodeError) as caught:
        loader(bomb)
    message = str(caught.value)
    assert message.startswith(str(bomb))
    assert "20000x20000 is 400000000 pixels, over the limit of 67108864" in message
    assert "LLM2LOSS_MAX_IMAGE_PIXELS" in message
    assert "over the limit" in images.check_image(bomb)


def test_the_pixel_cap_is_one_setting_and_skip_skips(tmp_path: Path, monkeypatch):
    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(small, format="JPEG")
    png = tmp_path / "small.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(png)
    assert images.load_image_tensor(small).shape == (3, 40, 50)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1999")  # 50 x 40 = 2000
    for path, loader in ((small, images.load_image_tensor), (png, images.load_image)):
        with pytest.raises(images.ImageDecodeError, match=r"50x40 is 2000 pixels, over .* 1999"):
            loader(path)
    items = [("a", small), ("b", _bomb(tmp_path / "bomb.jpg")), ("c", png)]
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "2000")
    dataset = images.ImageFolderDataset(items, transform=lambda image: image, on_bad_image="skip")
    assert [dataset[i][1] is None for i in range(3)] == [False, True, False]
    failing = images.ImageFolderDataset(items, transform=lambda image: image)
    with pytest.raises(images.ImageDecodeError, match=r"bomb\.jpg: 20000x20000 .*\(sample b\)"):
        failing[1]
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "many")
    with pytest.raises(
        ValueError, match="LLM2LOSS_MAX_IMAGE_PIXELS='many' must be a whole number of pixels"
    ):
        images.load_image(png)


def test_the_pixel_cap_is_not_left_in_pil_for_other_work(tmp_path: Path, monkeypatch):
    """A low cap stayed in PIL after a load, and the world renderer's 64x64 crops in the same
    process then failed as decompression bombs."""
    small = tmp_path / "small.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(small)
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "2000")
    images.load_image(small)
    with pytest.raises(images.ImageDecodeError):
        images.load_image(_bomb(tmp_path / "bomb.jpg"))
    left = Image.MAX_IMAGE_PIXELS
    assert left == before
    Image.new("RGB", (200, 200)).crop((0, 0, 64, 64))  # 4,096 pixels: no bomb outside the loader


# ---- a ready loss table with exactly the README's columns ------------------------------------


def test_a_loss_table_with_only_the_documented_columns_reaches_the_report(tmp_path: Path):
    """README: `loss_table_path` with columns `sample_id, loss` (and optional `predicted`).

    Before, the report always crashed in intersectional.py (`float(None)`) unless `p_true` and
    `true_class_auroc` were given too. Now the loss-based numbers are computed and the metrics
    the table cannot give (accuracy, AUROC) are NaN, i.e. missing, in every table.
    """
    import json
    import math

    from tests.fault_helpers import clone_home, fast_config, reference_home, run_steps

    _, reference = reference_home()
    home = clone_home(reference, tmp_path / "home", models=["encoder", "image_embeddings"])
    shards = sorted(reference.shard_dir("per_sample_losses").glob("shard-*.parquet"))
    measured = pl.concat([pl.read_parquet(path) for path in shards])
    table = tmp_path / "losses.parquet"
    measured.select("sample_id", "loss").write_parquet(table)
    config = fast_config(
        home.home, black_box={"source": "loss_table", "loss_table_path": str(table)}
    )
    run_steps(config, ["black_box", "losses", "heads", "report"])

    cells = pl.read_parquet(home.reports / "pair_cells.parquet")
    filled = cells.filter(pl.col("n") > 0)
    assert filled.height > 0 and filled["mean_loss"].is_nan().sum() == 0
    assert filled["accuracy"].is_nan().all() and filled["auroc"].is_nan().all()
    disparity = pl.read_parquet(home.reports / "attribute_disparity.parquet")
    assert disparity["gap_loss"].is_nan().sum() < disparity.height
    assert disparity["gap_accuracy"].is_nan().all()
    headline = json.loads((home.reports / "headline.json").read_text())
    assert any(isinstance(v, float) and not math.isnan(v) for v in headline.values())
    assert (home.reports / "report.html").stat().st_size > 0


# ---- training does not depend on the machine's core count -----------------------------------


def test_the_encoder_trains_with_a_fixed_thread_count_whatever_torch_was_set_to(monkeypatch):
    """Measured: OMP_NUM_THREADS=1 and =2 trained different encoders (same seed); with the
    count pinned, the same sha256 (bench/RESULTS.md, Red team, round two)."""
    import torch

    from llm2loss_pipeline.core.device import DeviceSpec
    from llm2loss_pipeline.core.steps import encoder as step

    seen: list[int] = []
    monkeypatch.setattr(step, "_fit_encoder", lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.delenv(step.CPU_THREADS_ENV, raising=False)  # tests/conftest.py sets 1
        step.fit_encoder(None, None, DeviceSpec(device="cpu"))
        monkeypatch.setenv(step.CPU_THREADS_ENV, "1")
        step.fit_encoder(None, None, DeviceSpec(device="cpu"))
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]  # the default, then the variable's
    monkeypatch.setenv(step.CPU_THREADS_ENV, "0")
    with pytest.raises(ValueError, match="LLM2LOSS_CPU_THREADS='0' must be a whole number"):
        step.fit_encoder(None, None, DeviceSpec(device="cpu"))


def test_the_embedding_shards_run_on_one_thread_whatever_the_encoder_is_pinned_to(monkeypatch):
    """A backfill runs the shards side by side: two threads per process spun waiting for each
    other's cores (bench/RESULTS.md, "Stop 30"), so the shards keep one, fixed."""
    import torch

    from llm2loss_pipeline.core.device import DeviceSpec
    from llm2loss_pipeline.core.steps import encoder as step

    class Seen(Exception):
        pass

    def embed(*args, **kwargs):
        raise Seen(torch.get_num_threads())

    monkeypatch.setattr(step, "read_manifest", lambda layout: None)
    monkeypatch.setattr(
        step, "shard_rows", lambda manifest, shard: pl.DataFrame({"sample_id": [], "path": []})
    )
    monkeypatch.setattr(step, "load_encoder", lambda *args: None)
    monkeypatch.setattr(step, "embed_images", embed)
    monkeypatch.setenv(step.CPU_THREADS_ENV, "3")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    layout = SimpleNamespace(encoder_dir=None)
    try:
        with pytest.raises(Seen) as caught:
            step.shard_embeddings(layout, "shard-00000", None, DeviceSpec(device="cpu"))
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert caught.value.args == (1,)
