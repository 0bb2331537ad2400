"""Pins written against the survivors of bench/mutation.py's second sample (seed 2, issue 24).

Each test fails on one plausible one-token bug that the mapped test files let through, and says
which (bench/RESULTS.md, "Mutation testing (issue 24)", lists them). They compare with a
definition or an independent computation, not with a range.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from llm2loss_pipeline.core import storage
from llm2loss_pipeline.core.celeba import CelebaFormatError, read_celeba
from llm2loss_pipeline.core.discovery.verify import clustered_p_values, match_count
from llm2loss_pipeline.core.heads.compare import FREE_TEXT_ERROR, FREE_TEXT_FLOOR, compare_members
from llm2loss_pipeline.core.heads.ensemble import MemberInfo
from llm2loss_pipeline.core.heads.train import CHECK_ROWS, check_embeddings
from llm2loss_pipeline.core.members import MemberGroup
from llm2loss_pipeline.core.report.calibration import Calibration, fit_calibration
from llm2loss_pipeline.core.report.estimated import (
    collect_prompt_pairs,
    summarize,
    zero_shot_auroc,
)
from llm2loss_pipeline.core.report.grounded import probe_basis
from llm2loss_pipeline.core.report.measured import EvalInputs, load_zero_shot_inputs
from tests.test_celeba_reader import ATTR, _write_root

# --- heads: the embeddings check names the bad row, wherever it is -------------------------------


def test_check_embeddings_rejects_arrays_that_are_not_n_by_d() -> None:
    # train.py:90 `ndim != 2 or shape[1] < 1` made `and`: a 1-D array got an IndexError, an
    # [n, 0] array went through
    for bad in (np.ones(5), np.ones((3, 0)), np.ones((2, 2, 2))):
        with pytest.raises(ValueError, match=r"must be a 2-D array \[n, d\], got shape"):
            check_embeddings(bad, "image embeddings")
    assert check_embeddings(np.ones((3, 1))).shape == (3, 1)


@pytest.mark.parametrize("row", [0, 2, CHECK_ROWS - 1, CHECK_ROWS, CHECK_ROWS + 3])
def test_check_embeddings_names_the_first_non_finite_row(row: int) -> None:
    # train.py:95 the block `start : start + CHECK_ROWS` made `start - CHECK_ROWS` checked nothing
    array = np.zeros((CHECK_ROWS + 5, 2), dtype=np.float32)
    array[row, 1] = np.nan
    array[-1, 0] = np.inf  # a later bad row: the first one is named
    with pytest.raises(ValueError, match=rf"^embeddings: row {row} contains NaN or inf$"):
        check_embeddings(array)


# --- calibration: the text-side error by its definition -----------------------------------------


def test_fit_calibration_text_error_is_its_moment_estimate() -> None:
    # calibration.py:109 `(u / slope) ** 2` made `** 3`: the measured gaps' own error entered the
    # text-side error in the wrong units; tests/test_calibration.py's tolerance let it through
    e = np.array([1.0, -0.5, 2.0, 0.3, -1.2, 0.8])
    s = np.array([0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    g = np.array([2.9, 0.4, 3.1, 1.9, -2.9, 0.2])
    u = np.array([0.4, 0.6, 0.5, 0.7, 0.3, 0.5])
    slope = float((g @ g - u @ u) / (e @ g))  # the errors-in-variables moments
    tau2 = np.mean((g / slope - e) ** 2 - s**2 - (u / slope) ** 2)
    assert tau2 > 0  # the floor at zero is not what is tested
    cal = fit_calibration("direct", e, s, g, u)
    assert cal.slope == pytest.approx(slope, rel=1e-12)
    assert cal.text_error == pytest.approx(np.sqrt(tau2), rel=1e-12)
    assert cal.n_attributes == 6


def test_calibrated_z_and_p_worse_add_the_text_error_in_quadrature() -> None:
    # calibration.py:64 `text_error**2` made `**3`: the whole standard error is
    # sqrt(std^2 + tau^2), and P(worse) is the normal CDF of mean over it
    cal = Calibration("direct", slope=2.0, text_error=0.5, n_attributes=40)
    mean, std = np.array([0.4, -0.1, 0.0]), np.array([0.3, 0.2, 0.1])
    expected = mean / np.sqrt(std**2 + 0.25)
    np.testing.assert_allclose(cal.z(mean, std), expected, rtol=1e-12)
    np.testing.assert_allclose(cal.p_worse(mean, std), sps.norm.cdf(expected), rtol=1e-12)
    exact = Calibration("direct", slope=2.0, text_error=0.0, n_attributes=40)
    assert exact.z(0.4, 0.3) == pytest.approx(0.4 / 0.3, rel=1e-12)
    assert exact.z(1.0, 0.0) == np.inf and exact.p_worse(-1.0, 0.0) == 0.0


def test_compare_p_a_worse_is_the_normal_cdf_of_the_whole_error() -> None:
    # compare.py `std**2` (or the text error's square) made `**3`: P(A worse) for free text is
    # Phi(mean / sqrt(std^2 + max(FREE_TEXT_ERROR * tau, FREE_TEXT_FLOOR)^2)), std the members'
    # spread (ddof 1); tau 0.4 is above the floor, 0.2 and 0 below it
    members = [MemberInfo(i, "regressor" if i < 5 else "ranker", "linear", i) for i in range(10)]
    diffs = np.array([0.9, -0.4, 1.6, 0.2, 0.7, -0.9, 1.1, 0.5, 0.0, 1.3])
    assert FREE_TEXT_ERROR * 0.4 > FREE_TEXT_FLOOR > FREE_TEXT_ERROR * 0.2
    for tau in (0.4, 0.2, 0.0):
        cal = Calibration("grounded", slope=1.0, text_error=tau, n_attributes=40)
        answer = compare_members(diffs, members, "a", "b", "grounded", cal, explained=0.9)
        text = max(FREE_TEXT_ERROR * tau, FREE_TEXT_FLOOR)
        total = np.sqrt(diffs.std(ddof=1) ** 2 + text**2)
        assert answer.p_a_worse == pytest.approx(sps.norm.cdf(diffs.mean() / total), rel=1e-12)


def test_probe_basis_explained_share_of_short_and_zero_directions() -> None:
    # grounded.py:304 `norms > 0` made `> 1`: a text direction shorter than 1 (most are: a
    # difference of two unit text embeddings) was called 0% explained; made `>= 0`, a zero
    # direction got NaN instead of 0
    probes = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    apply = probe_basis(probes, probes)
    texts = np.array([[0.3, 0.4, 0.0], [0.0, 0.0, 0.5], [0.3, 0.0, 0.4], [0.0, 0.0, 0.0]])
    _, explained = apply(texts)
    np.testing.assert_allclose(explained, [1.0, 0.0, 0.36, 0.0], atol=1e-5)


# --- the estimated table: prompt pairs checked, quantiles by definition -------------------------


@pytest.mark.parametrize(
    "pair", [("a face",), ("a face", "a face", "a face"), ("a face", "  "), ("a face", 3)]
)
def test_collect_prompt_pairs_rejects_a_bad_pair(pair: tuple) -> None:
    # estimated.py:103 `len(pair) != 2 or not all(...)` made `and`: every bad pair went through
    def prompts(name: str):
        return [("a smiling face", "a face"), pair]

    with pytest.raises(ValueError, match=r"attribute_prompt_pairs\('Smiling'\) gave a bad pair"):
        collect_prompt_pairs(["Smiling"], prompts)
    good = collect_prompt_pairs(["Smiling"], lambda name: [["a smiling face", "a face"]])
    assert good == {"Smiling": [("a smiling face", "a face")]}


def test_summarize_publishes_the_members_quantiles() -> None:
    # estimated.py:156 the quantile 0.0 made 1.0 (min published the max) and :175 q3 read from
    # the wrong row (the max): the columns are numpy's quantiles of each group's diffs
    rng = np.random.default_rng(4)
    diffs = rng.normal(size=(9, 3))
    groups = [MemberGroup("all", None, None, tuple(range(9))), MemberGroup("r", "r", None, (0, 2))]
    table = summarize(diffs, ["a", "b", "c"], groups)
    columns = ("min", "q1", "median", "q3", "max")
    for row in table.iter_rows(named=True):
        group = next(g for g in groups if g.name == row["group"])
        values = diffs[list(group.positions), "abc".index(row["attribute"])]
        expected = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
        np.testing.assert_allclose([row[c] for c in columns], expected, rtol=1e-12)
        assert row["min"] == values.min() and row["max"] == values.max()
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert table.height == 6


def test_zero_shot_inputs_of_a_one_sample_split(tmp_path: Path) -> None:
    # measured.py:309 the embedding width read from `lengths[0]` made `lengths[1]`: equal on any
    # split of two or more samples (all lengths are checked equal first), an IndexError on one
    ids = ["a", "b", "c"]
    pl.DataFrame({"sample_id": ids, "split": ["train", "test", "train"]}).write_parquet(
        tmp_path / "manifest.parquet"
    )
    labels = {"sample_id": ids, "Smiling": [True, False, True], "Bald": [False, True, False]}
    pl.DataFrame(labels).write_parquet(tmp_path / "attributes.parquet")
    embeddings = [[1.0, 0.0, 2.0], [0.5, 0.25, -1.0], [3.0, 1.0, 0.0]]
    pl.DataFrame({"sample_id": ids, "embedding": embeddings}).write_parquet(tmp_path / "e.parquet")
    manifest = str(tmp_path / "manifest.parquet")
    inputs = EvalInputs(
        manifest, str(tmp_path / "attributes.parquet"), manifest, str(tmp_path / "e.parquet")
    )
    with duckdb.connect() as con:
        got_ids, got, labels_out = load_zero_shot_inputs(con, inputs, "test", ["Smiling", "Bald"])
        assert got_ids == ["b"]
        np.testing.assert_array_equal(got, np.array([[0.5, 0.25, -1.0]], dtype=np.float32))
        assert {k: v.tolist() for k, v in labels_out.items()} == {
            "Smiling": [False],
            "Bald": [True],
        }
        train_ids, train, _ = load_zero_shot_inputs(con, inputs, "train", ["Smiling"])
        assert train_ids == ["a", "c"] and train.shape == (2, 3)


# --- the CelebA reader: a decoding error names the file and its line ----------------------------


def test_celeba_names_the_line_that_is_not_utf8(tmp_path: Path) -> None:
    # celeba.py:131 `_fail(path, line, ...)` with path and line swapped named neither
    root = _write_root(tmp_path / "root")
    data = (root / ATTR).read_bytes().split(b"\n")
    data[2] = data[2] + b" \xff\xfe"
    (root / ATTR).write_bytes(b"\n".join(data))
    with pytest.raises(CelebaFormatError) as info:
        read_celeba(root)
    assert str(info.value).startswith(f"{ATTR} line 3: not UTF-8 text (invalid start byte)")
    assert str(root) in str(info.value)


def test_zero_shot_auroc_takes_unit_embeddings_and_refuses_a_zero_one() -> None:
    # estimated.py:226 `norms == 0` made `== 1`: the encoder's unit-norm embeddings were refused
    # and an all-zero one went through (to a NaN score)
    images = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vectors = {"a smiling face": [1.0, 0.0], "a face": [0.0, 1.0]}

    def encode(texts):
        return np.array([vectors[t] for t in texts])

    def auroc(scores, y):  # P(score of a positive > score of a negative), ties half
        diff = scores[y][:, None] - scores[~y][None, :]
        return float(np.mean((diff > 0) + 0.5 * (diff == 0)))

    pairs = {"Smiling": [("a smiling face", "a face")]}
    labels = {"Smiling": np.array([True, False, False, True])}
    table = zero_shot_auroc(images, labels, pairs, encode, auroc)
    # scores x - y: 1, -1, -1, 1: the two positives score above both negatives
    assert table.row(0, named=True) == {
        "attribute": "Smiling",
        "zero_shot_auroc": 1.0,
        "n_positive": 2,
        "n_negative": 2,
    }
    images[1] = 0.0
    with pytest.raises(ValueError, match="image embedding 1 is all zeros"):
        zero_shot_auroc(images, labels, pairs, encode, auroc)


# --- storage: the host field, the sweep's name filter, the fsync before the rename --------------


def test_host_field_replaces_the_separators(monkeypatch) -> None:
    # storage.py:87 `.replace("@", "_")` with its arguments swapped: a host name with '@' would
    # split a temporary name's fields wrongly
    monkeypatch.setattr(socket, "gethostname", lambda: "rack@7/node_1")
    assert storage._host() == "rack_7_node_1"
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert storage._host() == "localhost"


def test_the_temp_sweep_touches_only_this_targets_temp_names(tmp_path: Path) -> None:
    # storage.py:107 `startswith(prefix) and endswith(".tmp")` made `or`: an old file of another
    # target, or a non-temporary file that starts like one, was deleted
    target = tmp_path / "table.parquet"
    others = [
        tmp_path / ".other.parquet.5@elsewhere@abcd.tmp",  # another target's temp file
        tmp_path / ".table.parquet.notes",  # starts like a temp file, is not one
        tmp_path / "table.parquet.tmp",
    ]
    stale = tmp_path / ".table.parquet.5@elsewhere@abcd.tmp"  # another host's, old
    for path in [*others, stale]:
        path.write_bytes(b"x")
        os.utime(path, (0, 0))  # 1970: older than any threshold
    assert storage.sweep_stale_temps(target, older_than_s=60) == [stale]
    assert all(path.exists() for path in others)


def test_atomic_writes_fsync_the_file_before_renaming_it(tmp_path: Path, monkeypatch) -> None:
    # storage.py:78 `_fsync_file(tmp)` dropped: after a power cut the renamed file could be empty
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.write_bytes_atomic(tmp_path / "a.bin", b"payload")
    renamed = [path for kind, path in events if kind == "replace"]
    assert len(renamed) == 1
    synced_before = [path for kind, path in events[: events.index(("replace", renamed[0]))]]
    assert renamed[0] in synced_before, events
    assert (tmp_path / "a.bin").read_bytes() == b"payload"


def test_asides_of_a_live_mover_are_listed_only_when_asked(tmp_path: Path) -> None:
    # storage.py:213 `live or not mover_alive` made `live and not mover_alive`: the asides of
    # dead movers were never restored or cleaned, and `live` listed only the dead ones
    final = tmp_path / "heads"
    prefix = f".{final.name}{storage.ASIDE}"
    dead = 2**22 + 12345  # above the default pid_max, so no process has it
    names = [
        f"{prefix}{dead}@{storage._host()}-aaaa1111",  # a dead mover on this host
        f"{prefix}{os.getpid()}@{storage._host()}-bbbb2222",  # a live one: may be mid-swap
        f"{prefix}{dead}@another-host-cccc3333",  # another host's: not known to be alive
    ]
    for age, name in enumerate(names):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + age, 1000 + age))  # oldest first, in this order
    (tmp_path / f"{prefix}{dead}@{storage._host()}-dddd4444").write_text("a file, not a folder")
    everything = [tmp_path / name for name in names]
    assert storage._asides(final, live=True) == everything
    assert storage._asides(final, live=False) == [everything[0], everything[2]]


def test_home_lock_records_its_holder(tmp_path: Path) -> None:
    # storage.py:468 the holder's JSON line written with `-` for `+` (a TypeError): none of
    # the test files then mapped to storage.py took the home lock (tests/test_home_lock.py is now)
    with storage.home_lock(tmp_path, "configs/planted_tiny.yaml") as path:
        holder = json.loads(path.read_text())
        assert path.read_text().endswith("}\n")
    assert (holder["pid"], holder["host"]) == (os.getpid(), storage._host())
    assert holder["config"] == "configs/planted_tiny.yaml"
    assert holder["since"].endswith(" UTC")


# --- discovery: how many samples a text matches -------------------------------------------------


def test_match_count_is_the_fraction_rounded_up_and_leaves_samples_over() -> None:
    # verify.py:30 `fraction * n_samples` made `/` and :31 `k >= n_samples` made `>`
    assert match_count(200, 0.1, 3) == 20
    assert match_count(205, 0.1, 3) == 21  # rounded up
    assert match_count(200, 0.001, 3) == 3  # the floor
    assert match_count(10, 0.9, 1) == 9  # all but one is allowed
    for n, fraction, floor in ((10, 1.0, 1), (10, 0.5, 10), (10, 0.95, 1)):
        with pytest.raises(ValueError, match=rf"matching 10 of {n} samples leaves none"):
            match_count(n, fraction, floor)


def test_clustered_p_values_by_hand() -> None:
    """Survivors of the stop-19 sample (verify.py: the empty/equal return's length, the se == 0
    branch, the degrees of freedom). Two identities of two images, one of each matched."""
    clusters = np.array([0, 0, 1, 1])
    # ranks / n = [1, 1/4, 3/4, 1/2]: matched mean 7/8, rest 3/8, gap 1/2; per-sample terms
    # +1/16, +1/16, -1/16, -1/16, cluster sums +1/8 and -1/8: var = 2/1 * 2/64, se 1/4, t = 2
    p = clustered_p_values(np.array([3.0, 0.0, 2.0, 1.0]), np.array([[0, 2]]), clusters)
    assert p[0] == pytest.approx(sps.t.sf(2.0, df=1), rel=1e-12)  # df = identities - 1
    # [3, 1, 2, 0]: both identities' terms cancel, se = 0: a sure gap, p 0 one way and 1 the other
    zero_se = clustered_p_values(
        np.array([3.0, 1.0, 2.0, 0.0]), np.array([[0, 2], [1, 3]]), clusters
    )
    assert zero_se.tolist() == [0.0, 1.0]
    # equal losses: one p of 1 per candidate, whatever the matched sets' size
    assert clustered_p_values(np.ones(6), np.array([[0], [1], [2]])).tolist() == [1.0, 1.0, 1.0]


def test_compare_with_no_error_at_all_is_certain_or_a_coin_flip(monkeypatch) -> None:
    # compare.py `return 0.5 if values.mean() == 0 ...` made 0.0: with no spread and no text
    # error (a floor of 0, as bench/text_error_fit.py --free-text tries), equal texts are a coin
    # flip and a difference is certain
    from llm2loss_pipeline.core.heads import compare

    monkeypatch.setattr(compare, "FREE_TEXT_FLOOR", 0.0)
    members = [MemberInfo(i, "regressor", "linear", i) for i in range(4)]
    cal = Calibration("grounded", slope=1.0, text_error=0.0, n_attributes=40)
    same = compare_members(np.zeros(4), members, "a", "b", "grounded", cal, explained=0.9)
    worse = compare_members(np.full(4, 0.3), members, "a", "b", "grounded", cal, explained=0.9)
    assert same.p_a_worse == 0.5 and worse.p_a_worse == 1.0
