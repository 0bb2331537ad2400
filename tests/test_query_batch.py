"""Fast questions (issue 21, items 5 and 6): `compare --pairs`, `llm2loss ask`, the JSON shape
that compare, rank and discover share, what a cold `compare` imports, and the small things
(check-config on a bad configuration, charts that name their estimator).

The home is test_diagnoser's: heads trained on a fake word-vector encoder, without images (so
the direct estimator answers); a copy gets the encoder sidecar a real encoder folder has.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.query import ENCODER_SIDECAR, TEXT_INDEX_DIR
from llm2loss_pipeline.diagnoser import Diagnoser
from llm2loss_pipeline.query_cli import main
from tests import test_diagnoser as base
from tests.test_diagnoser import DIM, GLASSES, HAT, SHA, SMILING, FakeEncoder, fake_loader

home = base.home  # the fixtures: heads trained on the fake encoder, and its CLI seam
cli_home = base.cli_home

ROOT = Path(__file__).resolve().parents[1]
SHARED_KEYS = ["command", "estimator", "calibrated", "results", "notes"]
HEAVY = ("matplotlib", "dagster", "open_clip", "transformers", "torchvision", "scipy.stats")


def diffs_of(result: dict) -> list[float]:
    return [member["diff"] for member in result["members"]]


def test_pairs_file_answers_each_pair_as_compare_does(cli_home, capsys, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(f"# planted: glasses are worse\n\n{GLASSES}\t{HAT}\n{SMILING}\t{GLASSES}\n")
    assert main(["compare", "--pairs", str(pairs), "--home", str(cli_home), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[:5] == SHARED_KEYS and out["command"] == "compare"
    assert out["estimator"] == "direct" and out["calibrated"] is False
    assert [(r["text_a"], r["text_b"]) for r in out["results"]] == [
        (GLASSES, HAT),
        (SMILING, GLASSES),
    ]
    diagnoser = Diagnoser.load(cli_home, encoder_loader=fake_loader)
    for result, (a, b) in zip(out["results"], [(GLASSES, HAT), (SMILING, GLASSES)], strict=True):
        np.testing.assert_allclose(diffs_of(result), diagnoser.compare(a, b).diffs, atol=1e-9)
    assert out["results"][0]["members_a_worse"] >= 0.8  # glasses planted worse than a hat
    assert out["results"][1]["members_a_worse"] <= 0.2

    assert main(["compare", "--pairs", str(pairs), "--home", str(cli_home)]) == 0
    table = capsys.readouterr().out
    assert "2 pairs" in table and GLASSES in table and "members A worse" in table
    # a row's verdict is the side named: glasses worse than a hat, then A (smiling) better
    assert "worse on A" in table and "worse on B" in table


def test_pairs_bad_line_is_named_by_its_number(cli_home, capsys, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(f"{GLASSES}\t{HAT}\n# fine\n{GLASSES} {HAT}\n")
    assert main(["compare", "--pairs", str(pairs), "--home", str(cli_home)]) == 2
    err = capsys.readouterr().err
    assert f"pairs file {pairs} line 3: expected two texts separated by one tab" in err
    assert "Traceback" not in err

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{HAT}\t \n".encode())))
    assert main(["compare", "--pairs", "-", "--home", str(cli_home)]) == 2
    assert "stdin line 1: text B is empty" in capsys.readouterr().err

    assert main(["compare", GLASSES, HAT, "--pairs", str(pairs), "--home", str(cli_home)]) == 2
    assert "not both" in capsys.readouterr().err


def test_ask_answers_piped_lines_until_a_blank_one(cli_home, capsys, monkeypatch):
    lines = f"{GLASSES} | {HAT}\nno separator here\n{SMILING}|{GLASSES}\n\n{HAT} | {SMILING}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))  # not a tty: no prompt is printed
    assert main(["ask", "--home", str(cli_home), "--json"]) == 2  # one bad line
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert [(a["results"][0]["text_a"], a["results"][0]["text_b"]) for a in answers] == [
        (GLASSES, HAT),
        (SMILING, GLASSES),
    ]  # the line after the blank one is not read
    assert all(list(a)[:5] == SHARED_KEYS for a in answers)
    diagnoser = Diagnoser.load(cli_home, encoder_loader=fake_loader)
    expected = diagnoser.compare(GLASSES, HAT)
    np.testing.assert_allclose(diffs_of(answers[0]["results"][0]), expected.diffs, atol=1e-9)
    assert "llm2loss ask: error: line 2: expected 'A | B'" in captured.err
    assert "> " not in captured.err

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{GLASSES} | {HAT}\n"))
    assert main(["ask", "--home", str(cli_home)]) == 0
    assert capsys.readouterr().out.strip() == expected.verdict


def test_compare_rank_and_discover_share_one_json_shape(cli_home, capsys):
    assert main(["compare", GLASSES, HAT, "--home", str(cli_home), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert main(["rank", GLASSES, HAT, SMILING, "--home", str(cli_home), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert list(compared) == list(ranked) == SHARED_KEYS
    assert (compared["command"], ranked["command"]) == ("compare", "rank")
    assert compared["estimator"] == ranked["estimator"] == "direct"
    assert [row["rank"] for row in ranked["results"]] == [1, 2, 3]
    assert ranked["results"][0]["text"] == GLASSES

    from llm2loss_pipeline.core.query import DiscoveryReport
    from llm2loss_pipeline.discover_cli import _print_json

    modes = pl.DataFrame({"rank": [1], "description": [GLASSES], "verdict": ["mode"]})
    vocab = pl.DataFrame({"rank": [2], "description": [HAT], "verdict": ["dropped"]})
    evidence = pl.DataFrame(
        {"rank": [1], "role": ["proponent"], "sample_id": [7], "loss": [2.5], "influence": [0.4]}
    )
    report = DiscoveryReport(modes, evidence, n_candidates=40, n_kept=1)
    assert _print_json(report, modes, vocab, 1) == 0
    discovered = json.loads(capsys.readouterr().out)
    assert list(discovered)[:5] == SHARED_KEYS and discovered["command"] == "discover"
    assert discovered["results"] == modes.to_dicts() and discovered["n_modes"] == 1
    assert discovered["evidence"][0]["sample_id"] == 7


@pytest.fixture()
def indexed_home(home, tmp_path) -> Path:
    """A copy of the home whose encoder folder has a sidecar, as a real one does: its
    identity can be read without loading it."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    sidecar = {"sha256": SHA, "embed_dim": DIM, "mode": "fake"}
    (Layout.at(copy).encoder_dir / ENCODER_SIDECAR).write_text(json.dumps(sidecar))
    return copy


def test_known_texts_need_no_encoder_and_no_heavy_imports(indexed_home):
    loads = []

    def counting_loader(folder, device):
        loads.append(folder)
        return FakeEncoder()

    diagnoser = Diagnoser.load(indexed_home, encoder_loader=counting_loader)
    assert loads == []  # nothing asked yet: the encoder waits
    expected = diagnoser.compare(GLASSES, HAT)
    assert len(loads) == 1
    index = indexed_home.joinpath(*TEXT_INDEX_DIR, f"{SHA}.safetensors")
    assert index.is_file()
    again = Diagnoser.load(indexed_home, encoder_loader=counting_loader)
    np.testing.assert_allclose(again.compare(GLASSES, HAT).diffs, expected.diffs, atol=1e-9)
    assert len(loads) == 1  # both texts came from the index

    # A fresh process with the default loader, which cannot load this fake encoder folder:
    # it answers only because the index holds both texts, and imports nothing heavy.
    (result,) = _compare_in_fresh_process(indexed_home, HEAVY)["results"]
    np.testing.assert_allclose(diffs_of(result), expected.diffs, atol=1e-6)


def test_a_damaged_index_is_rebuilt(indexed_home, home):
    index = indexed_home.joinpath(*TEXT_INDEX_DIR, f"{SHA}.safetensors")
    index.parent.mkdir(parents=True)
    index.write_bytes(b"not a safetensors file")
    diagnoser = Diagnoser.load(indexed_home, encoder_loader=fake_loader)
    expected = Diagnoser.load(home, encoder_loader=fake_loader)  # no sidecar: no index
    assert diagnoser.compare(GLASSES, HAT).verdict == expected.compare(GLASSES, HAT).verdict
    from safetensors.numpy import load_file

    assert load_file(str(index))["embeddings"].shape == (2, DIM)


def test_check_config_on_a_bad_path_prints_only_the_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llm2loss_pipeline.cli", "check-config", "configs/celeba.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stdout == ""  # no configuration dump before the error
    assert "dataset.celeba_root" in done.stderr and "Traceback" not in done.stderr


def test_charts_name_their_estimator(cli_home, tmp_path, monkeypatch):
    from llm2loss_pipeline.core.heads import plots

    titles = []
    monkeypatch.setattr(
        plots,
        "_save",
        lambda fig, out: titles.append(
            fig.axes[0].get_title(loc="left") or fig.axes[0].get_title()
        ),
    )
    diagnoser = Diagnoser.load(cli_home, encoder_loader=fake_loader)
    plots.plot_comparison(diagnoser.compare(GLASSES, HAT), tmp_path / "c.png")
    plots.plot_ranking(diagnoser.rank([GLASSES, HAT]), tmp_path / "r.png")
    assert "estimator: direct" in titles[0] and "uncalibrated" in titles[0]
    assert "estimator: direct" in titles[1]


def test_a_query_snapshot_answers_grounded_questions_without_torch(indexed_home):
    from llm2loss_pipeline.core.heads.checkpoint import INDEX
    from llm2loss_pipeline.core.query import (
        HEADS_INDEX,
        SNAPSHOT_DIR,
        LazyEnsemble,
        snapshot_key,
        write_snapshot,
    )

    assert HEADS_INDEX == INDEX
    diagnoser = Diagnoser.load(indexed_home, encoder_loader=fake_loader)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((60, DIM)).astype(np.float32)
    diagnoser.use_pool(images / np.linalg.norm(images, axis=1, keepdims=True), np.arange(60) % 20)
    grounded = diagnoser.compare(GLASSES, HAT, grounded=True)
    direct = diagnoser.compare(GLASSES, HAT, grounded=False)
    layout = Layout.at(indexed_home)
    key = snapshot_key(layout, layout.heads_dir, SHA)
    write_snapshot(indexed_home.joinpath(*SNAPSHOT_DIR, f"{key}.safetensors"), diagnoser)

    loaded = Diagnoser.load(indexed_home, encoder_loader=fake_loader)
    assert isinstance(loaded.ensemble, LazyEnsemble) and loaded.members == diagnoser.members
    np.testing.assert_array_equal(loaded.gap.text_mean, diagnoser.gap.text_mean)
    assert loaded.compare(GLASSES, HAT).estimator == "grounded"  # the pool came with it
    np.testing.assert_allclose(loaded.compare(GLASSES, HAT).diffs, grounded.diffs, atol=1e-9)
    # a direct question loads the heads themselves, and says what they say
    np.testing.assert_allclose(
        loaded.compare(GLASSES, HAT, grounded=False).diffs, direct.diffs, atol=1e-9
    )

    out = _compare_in_fresh_process(indexed_home, (*HEAVY, "torch"))
    assert out["estimator"] == "grounded"
    np.testing.assert_allclose(diffs_of(out["results"][0]), grounded.diffs, atol=1e-9)

    (layout.heads_dir / HEADS_INDEX).touch()  # the heads changed: the snapshot no longer fits
    again = Diagnoser.load(indexed_home, encoder_loader=fake_loader)
    assert not isinstance(again.ensemble, LazyEnsemble)


def test_quartiles_are_numpys_bit_for_bit():
    from llm2loss_pipeline.core.heads.compare import quartiles

    rng = np.random.default_rng(0)
    for trial in range(3000):
        values = rng.standard_normal(int(rng.integers(1, 41))) * 10 ** rng.uniform(-5, 5)
        if trial % 5 == 0:
            values = np.round(values, 1)  # ties
        assert quartiles(values) == [float(q) for q in np.quantile(values, [0.25, 0.5, 0.75])]
    assert np.isnan(quartiles(np.array([1.0, np.nan]))).all()


def _compare_in_fresh_process(home: Path, heavy: tuple[str, ...]) -> dict:
    """`llm2loss compare GLASSES HAT --json` in a new interpreter: its JSON answer, after checking
    that it exited 0 and imported none of the `heavy` modules."""
    script = (
        "import json, sys\n"
        "from llm2loss_pipeline.cli import main\n"
        f"code = main(['compare', {GLASSES!r}, {HAT!r}, '--home', {str(home)!r}, '--json'])\n"
        f"heavy = sorted(m for m in {heavy!r} if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    answer, status = done.stdout.strip().rsplit("\n", 1)
    assert json.loads(status) == {"code": 0, "heavy": []}
    return json.loads(answer)
