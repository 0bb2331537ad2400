"""The public query API and the `compare` / `rank` commands, against a fake text encoder.

The fake encoder maps each word to a fixed random direction and a text to the normalised sum of
its words plus a text-modality offset; images are the normalised sum of their attributes' words plus
an image-modality offset. The planted black box does worst on images with glasses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2loss_pipeline.core import query as diagnoser_module  # where Diagnoser.load looks
from llm2loss_pipeline.core.heads import (
    HeadMismatchError,
    HeadsConfig,
    fit_gap,
    save_ensemble,
    train_ensemble,
)
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.diagnoser import Diagnoser, NotMaterializedError
from llm2loss_pipeline.query_cli import PromptFileError, main, read_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 32
SHA = "5" * 64
FAKE_FILE = "fake_encoder.json"
GLASSES = "a person wearing glasses"
HAT = "a person wearing a hat"
SMILING = "a smiling person"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return vector / np.linalg.norm(vector)


TEXT_OFFSET = 2.0 * word_vector("<text modality>")
IMAGE_OFFSET = 2.0 * word_vector("<image modality>")


class FakeEncoder:
    def __init__(self, sha256: str = SHA, dim: int = DIM) -> None:
        self.sha256 = sha256
        self.embed_dim = dim
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        texts = list(texts)
        self.calls.append(texts)
        rows = [sum(word_vector(w) for w in t.lower().split()) + TEXT_OFFSET for t in texts]
        emb = np.array(rows, dtype=np.float32).reshape(len(texts), DIM)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def fake_loader(encoder_dir: Path, device: str) -> FakeEncoder:
    record = json.loads((encoder_dir / FAKE_FILE).read_text())
    return FakeEncoder(record["sha256"], record["dim"])


def write_fake_encoder(home: Path, sha256: str = SHA) -> None:
    folder = Layout.at(home).encoder_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAKE_FILE).write_text(json.dumps({"sha256": sha256, "dim": DIM}))


def captions(labels: np.ndarray) -> list[str]:
    words = ["glasses", "hat", "smiling"]
    return [
        " ".join(["a", "person", *(w for w, on in zip(words, row, strict=True) if on)])
        for row in labels
    ]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    n = 800
    labels = rng.random((n, 3)) < 0.5
    attribute_words = np.stack([word_vector(w) for w in ("glasses", "hat", "smiling")])
    emb = word_vector("person") + labels @ attribute_words + IMAGE_OFFSET
    emb = emb + 0.3 * rng.standard_normal((n, DIM))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    losses = np.exp(labels @ np.array([1.5, 0.2, -0.5]) + 0.3 * rng.standard_normal(n))
    gap = fit_gap(emb, FakeEncoder().encode_texts(captions(labels)), "center")
    config = HeadsConfig(n_seeds=2, epochs=10, batch_size=128)
    ensemble = train_ensemble(gap.image(emb), losses, config)
    root = tmp_path_factory.mktemp("home")
    save_ensemble(ensemble, gap, Layout.at(root).heads_dir, embedding_dim=DIM, encoder_sha256=SHA)
    write_fake_encoder(root)
    return root


@pytest.fixture()
def diagnoser(home) -> Diagnoser:
    return Diagnoser.load(home, encoder_loader=fake_loader)


@pytest.fixture()
def cli_home(home, monkeypatch) -> Path:
    monkeypatch.setattr(diagnoser_module, "default_encoder_loader", fake_loader)
    return home


# the Python API


def test_compare_finds_the_planted_failure(diagnoser):
    assert len(diagnoser.members) == 8
    result = diagnoser.compare(GLASSES, HAT)
    assert result.p_greater >= 0.8
    assert result.overall.mean > 0.5
    assert result.verdict.startswith(f"the model is expected to do worse on A ({GLASSES!r})")
    assert set(result.groups) == {"regressor", "ranker", "overall"}
    mirrored = diagnoser.compare(HAT, GLASSES)
    assert mirrored.p_greater == pytest.approx(1.0 - result.p_greater)
    assert mirrored.overall.q1 == pytest.approx(-result.overall.q3)


def pool_embeddings(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fresh images of the fixture's world (labels [n, 3], embeddings [n, DIM])."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, 3)) < 0.5
    attribute_words = np.stack([word_vector(w) for w in ("glasses", "hat", "smiling")])
    emb = word_vector("person") + labels @ attribute_words + IMAGE_OFFSET
    emb = emb + 0.3 * rng.standard_normal((n, DIM))
    return labels, (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def test_grounded_compare_answers_on_the_pool(diagnoser):
    _, pool = pool_embeddings()
    diagnoser.use_pool(pool)
    result = diagnoser.compare(GLASSES, HAT, grounded=True)
    assert result.estimator == "grounded" and "per standard deviation" in result.units
    assert result.p_greater == 1.0 and result.overall.mean > 0.3
    mirrored = diagnoser.compare(HAT, GLASSES, grounded=True)
    assert np.allclose(mirrored.diffs, [-d for d in result.diffs], atol=1e-12)
    # smiling lowers the planted loss: grounded says so
    assert diagnoser.compare(SMILING, "a person", grounded=True).overall.mean < 0
    # the batch gives the single answers, and the pool is scored once
    many = diagnoser.compare_many([(GLASSES, HAT), (SMILING, HAT)], grounded=True)
    assert np.allclose(many[0].diffs, result.diffs)
    assert many[1].text_a == SMILING and many[1].estimator == "grounded"


def test_grounded_compare_needs_images(home, diagnoser):
    bare = Diagnoser(diagnoser.encode_texts, diagnoser.ensemble, diagnoser.gap)
    with pytest.raises(ValueError, match=r"grounded comparisons need images"):
        bare.compare(GLASSES, HAT, grounded=True)
    bare.use_pool(pool_embeddings()[1])
    same = bare.compare(GLASSES, GLASSES, grounded=True)  # as direct compare: no difference
    assert same.diffs == (0.0,) * 8 and same.verdict.startswith("no difference")
    with pytest.raises(ValueError, match=r"at least 2 images"):
        bare.use_pool(pool_embeddings()[1][:1])
    # the fixture home has heads but no tables: the error names the missing manifest
    with pytest.raises(FileNotFoundError, match=r"manifest.parquet is missing"):
        diagnoser.compare(GLASSES, HAT, grounded=True)


def test_rank_and_estimate(diagnoser):
    rows = diagnoser.rank([SMILING, GLASSES, HAT])
    assert rows[0]["text"] == GLASSES
    assert [r["rank"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["min"] <= row["q1"] <= row["median"] <= row["q3"] <= row["max"]
    estimates = diagnoser.estimate([GLASSES, SMILING])
    assert [e["text"] for e in estimates] == [GLASSES, SMILING]
    assert estimates[0]["mean"] > estimates[1]["mean"]
    assert set(estimates[0]["groups"]) == {"regressor", "ranker", "overall"}
    assert estimates[0]["groups"]["ranker"]["n"] == 4 and estimates[0]["std"] >= 0


def test_scores_are_standardised_cached_and_batched(home):
    encoder = FakeEncoder()
    diag = Diagnoser.load(home, encoder_loader=lambda folder, device: encoder)
    scores = diag.score_texts([GLASSES, HAT, GLASSES])
    assert scores.shape == (8, 3)
    np.testing.assert_array_equal(scores[:, 0], scores[:, 2])
    assert encoder.calls == [[GLASSES, HAT]]  # one batch, each distinct text once
    diag.score_texts([HAT])
    assert len(encoder.calls) == 1  # cached
    pairs = [(GLASSES, SMILING), (HAT, "a person"), (SMILING, "a person")]
    many = diag.compare_many(pairs)
    assert encoder.calls[1] == [SMILING, "a person"]  # only the new texts, in one call
    for (a, b), result in zip(pairs, many, strict=True):
        single = diag.compare(a, b)
        assert result.diffs == single.diffs and (result.text_a, result.text_b) == (a, b)


def test_standardised_scores_match_the_ensemble_directly(home, diagnoser):
    texts = [GLASSES, HAT]
    expected = diagnoser.ensemble.standardized(
        diagnoser.gap.text(FakeEncoder().encode_texts(texts))
    )
    np.testing.assert_allclose(diagnoser.score_texts(texts), expected)


def test_empty_texts_are_named(diagnoser):
    with pytest.raises(ValueError, match="text B is empty"):
        diagnoser.compare(GLASSES, "   ")
    with pytest.raises(ValueError, match="text 2 is empty"):
        diagnoser.rank([GLASSES, ""])
    with pytest.raises(ValueError, match="text A of pair 2 is empty"):
        diagnoser.compare_many([(GLASSES, HAT), ("", HAT)])


def test_nothing_materialized_names_what_and_the_command(tmp_path):
    with pytest.raises(NotMaterializedError) as caught:
        Diagnoser.load(tmp_path / "empty", encoder_loader=fake_loader)
    message = str(caught.value)
    assert "the encoder" in message and "the diagnosis heads" in message
    assert "llm2loss run" in message


def test_heads_from_another_encoder_are_refused(home):
    with pytest.raises(HeadMismatchError, match="rematerialize diagnosis_heads"):
        Diagnoser.load(home, encoder_loader=lambda folder, device: FakeEncoder(sha256="6" * 64))
    with pytest.raises(HeadMismatchError, match="dim 48"):
        Diagnoser.load(home, encoder_loader=lambda folder, device: FakeEncoder(dim=48))


def test_package_import_stays_light_and_exports_diagnoser():
    code = (
        "import sys, llm2loss_pipeline\n"
        "assert 'torch' not in sys.modules, 'import llm2loss_pipeline imported torch'\n"
        "from llm2loss_pipeline import Diagnoser\n"
        "assert Diagnoser.__name__ == 'Diagnoser'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# the command line


def test_cli_compare_prints_a_table_and_the_verdict(cli_home, capsys):
    assert main(["compare", GLASSES, HAT, "--home", str(cli_home)]) == 0
    out = capsys.readouterr().out
    assert f"A: {GLASSES}" in out and f"B: {HAT}" in out
    for word in ("regressor", "ranker", "overall", "median", "members A worse", "uncalibrated"):
        assert word in out
    assert f"the model is expected to do worse on A ({GLASSES!r})" in out


def test_cli_compare_json_and_plot(cli_home, capsys, tmp_path):
    plot = tmp_path / "cmp.png"
    assert (
        main(["compare", GLASSES, HAT, "--home", str(cli_home), "--json", "--plot", str(plot)]) == 0
    )
    captured = capsys.readouterr()
    data = json.loads(captured.out)["results"][0]  # the shape compare, rank, discover share
    assert data["text_a"] == GLASSES and data["p_a_worse"] >= 0.8
    assert data["groups"]["overall"]["n"] == 8 and len(data["members"]) == 8
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert str(plot) in captured.err


def test_cli_rank_from_arguments_file_and_stdin(cli_home, capsys, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# planted failures\n\n{HAT}\n  {GLASSES}  \n")
    assert main(["rank", SMILING, "--file", str(prompts), "--home", str(cli_home), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["text"] for r in rows) == sorted([HAT, GLASSES, SMILING])
    assert rows[0]["text"] == GLASSES

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{SMILING}\n# skipped\n{GLASSES}\n"))
    plot = tmp_path / "rank.png"
    assert main(["rank", "--file", "-", "--home", str(cli_home), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert GLASSES in out and SMILING in out and "skipped" not in out
    assert out.index(GLASSES) < out.index(SMILING)  # worst first
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "", HAT], "text A is empty"),
        (["rank", GLASSES, "  "], "text 2 is empty"),
        (
            ["rank", "--file", "/nonexistent/prompts.txt"],
            "prompt file /nonexistent/prompts.txt does not exist",
        ),
        (["rank"], "no texts to rank"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(cli_home, capsys, argv, message):
    assert main([*argv, "--home", str(cli_home)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_empty_prompt_file(cli_home, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert main(["rank", "--file", str(empty), "--home", str(cli_home)]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_cli_nothing_materialized(tmp_path, capsys):
    assert main(["compare", GLASSES, HAT, "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not materialized yet" in err and "llm2loss run" in err


def test_cli_heads_from_another_encoder(home, capsys, monkeypatch, tmp_path):
    other = tmp_path / "other"
    (other / "models").mkdir(parents=True)
    os.symlink(Layout.at(home).heads_dir, Layout.at(other).heads_dir)
    write_fake_encoder(other, sha256="7" * 64)
    monkeypatch.setattr(diagnoser_module, "default_encoder_loader", fake_loader)
    assert main(["rank", GLASSES, "--home", str(other)]) == 2
    err = capsys.readouterr().err
    assert "were trained on encoder 555555555555 (dim 32)" in err
    assert str(Layout.at(other).heads_dir) in err
    assert "rematerialize diagnosis_heads: llm2loss run" in err


def test_module_entry_point_reports_errors_without_a_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm2loss_pipeline.query_cli",
            "compare",
            "a",
            "b",
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    assert "llm2loss compare: error:" in done.stderr and "llm2loss run" in done.stderr
    assert "Traceback" not in done.stderr


# the command line: awkward inputs


def test_cli_prompts_are_text_not_markup(cli_home, capsys):
    odd = ["face [/]", "[bold red]face of a man", "a hat costing $10 and $20"]
    assert main(["rank", *odd, "--home", str(cli_home)]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in odd)


def test_cli_plot_formats_and_dollar_signs(cli_home, capsys, tmp_path):
    svg, png = tmp_path / "cmp.svg", tmp_path / "rank.png"
    argv = ["compare", "face $\\frac{a$ x", HAT, "--home", str(cli_home), "--plot", str(svg)]
    assert main(argv) == 0
    assert b"<svg" in svg.read_bytes()[:400]
    assert main(["rank", "a hat costing $10 and $20", HAT, "--home", str(cli_home),
                 "--plot", str(png)]) == 0  # fmt: skip
    assert png.read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plot", "chart"], "the extension must name an image format"),
        (["--plot", "out.docx"], "the extension must name an image format"),
        (["--plot", ""], "a plot path needs a file name"),
        (["--plot", "/tmp"], "plot path /tmp is a directory"),
        (["--device", "foo"], "device must be one of ['cpu', 'cuda', 'auto', 'cuda:N'], got 'foo'"),
    ],
)
def test_cli_bad_options_fail_before_any_work(cli_home, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(
        "llm2loss_pipeline.query_cli.load_diagnoser", lambda *a: pytest.fail("loaded")
    )
    assert main(["compare", GLASSES, HAT, "--home", str(cli_home), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_one_line(cli_home, capsys):
    assert main(["rank", GLASSES, "--home", str(cli_home), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:" in err and "no CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\u200b", "text A is empty"),  # a zero-width space shows nothing
        ("old \udcff man", "text A is not valid UTF-8 text"),  # argv's undecodable byte
    ],
)
def test_cli_texts_that_show_nothing_or_are_not_utf8(cli_home, capsys, text, message):
    assert main(["compare", text, HAT, "--home", str(cli_home)]) == 2
    assert message in capsys.readouterr().err


def test_prompt_files_bom_line_ends_bad_bytes_and_odd_paths(tmp_path, monkeypatch):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf# my prompts\r\nold man\rface\x0cof a man\n")
    assert read_prompts(str(bom)) == ["old man", "face\x0cof a man"]  # no split at a form feed
    only_bom = tmp_path / "only_bom.txt"
    only_bom.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(PromptFileError, match=r"only_bom\.txt has no prompts"):
        read_prompts(str(only_bom))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nold \xff man\n")
    with pytest.raises(PromptFileError, match=r"bad\.txt line 2 is not UTF-8 .*byte 0xff"):
        read_prompts(str(bad))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\n\xfe b\n")))
    with pytest.raises(PromptFileError, match=r"stdin line 2 is not UTF-8"):
        read_prompts("-")
    with pytest.raises(PromptFileError, match=r"is a directory"):
        read_prompts(str(tmp_path))
    with pytest.raises(PromptFileError, match=r"/dev/null has no prompts"):
        read_prompts("/dev/null")  # not a regular file, and still read
    reader, writer = os.pipe()  # what `--file <(printf ...)` passes
    os.write(writer, b"a person\n")
    os.close(writer)
    try:
        assert read_prompts(f"/dev/fd/{reader}") == ["a person"]
    finally:
        os.close(reader)


def test_compare_many_refuses_a_string_as_a_pair(diagnoser):
    with pytest.raises(ValueError, match=r"pair 1 is 'ab': each pair is two texts"):
        diagnoser.compare_many(("ab", "cd"))


def test_a_closed_pipe_ends_the_command_without_a_traceback():
    code = (
        "import argparse, sys\n"
        "from llm2loss_pipeline.cli import run_handler\n"
        "def handler(args):\n"
        "    for i in range(200000):\n"
        "        print('row', i)\n"
        "    return 0\n"
        "sys.exit(run_handler(argparse.Namespace(handler=handler)))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.readline() == b"row 0\n"
    process.stdout.close()  # as `| head -1` does
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and b"Traceback" not in err and err == b""


def test_devices_resolve_or_fail_in_one_line(cli_home, home, capsys, monkeypatch):
    """`auto` passed the option check but reached torch.device("auto") and a traceback."""
    seen = []
    monkeypatch.setattr(
        diagnoser_module,
        "default_encoder_loader",
        lambda d, device: seen.append(device) or fake_loader(d, device),
    )
    assert main(["rank", GLASSES, "--home", str(cli_home), "--device", "auto"]) == 0
    assert seen[-1] == ("cuda" if torch.cuda.is_available() else "cpu")
    capsys.readouterr()
    with pytest.raises(
        ValueError, match=r"device must be one of \['cpu', 'cuda', 'auto', 'cuda:N'\], got 'tpu'"
    ):
        Diagnoser.load(home, device="tpu")
    Diagnoser.load(home, device=torch.device("cpu"), encoder_loader=fake_loader)  # as before


@pytest.mark.parametrize(
    ("plot", "message"),
    [
        ("chart.pgf", "the extension must name an image format, one of .png, .svg, .pdf"),
        ("chart.eps", "the extension must name an image format"),
        ("afile/chart.png", "afile is a file, not a folder"),
    ],
)
def test_cli_plot_paths_refused_before_loading(cli_home, capsys, tmp_path, plot, message):
    (tmp_path / "afile").write_text("")
    argv = ["rank", GLASSES, "--home", str(cli_home), "--plot", str(tmp_path / plot)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_prompt_lines_that_show_nothing_are_blank(tmp_path):
    joined = tmp_path / "joined.txt"  # two BOM files joined with cat, and invisible lines
    joined.write_bytes(
        "\ufeffa bald man\n\u200b\n\ufeff# second file\n\ufeffan old man\n\u034f\n".encode()
    )
    assert read_prompts(str(joined)) == ["a bald man", "an old man"]


def test_texts_of_combining_marks_alone_are_empty(diagnoser):
    with pytest.raises(ValueError, match="text 1 is empty"):
        diagnoser.rank(["\u034f\u0301"])


def test_verdicts_quote_texts_as_typed(diagnoser):
    result = diagnoser.compare("face $\\frac{a$ x", HAT)
    assert "'face $\\frac{a$ x'" in result.verdict and "\\\\" not in result.verdict


def test_the_report_s_answers_per_probe_are_read_once_and_checked(diagnoser, tmp_path):
    import polars as pl

    from llm2loss_pipeline.core.storage import StorageError

    def answers_at(home: Path):
        fresh = Diagnoser.load(diagnoser.meta["home"], encoder_loader=fake_loader)
        fresh.meta["home"] = str(home)  # the report files are read from this home
        return fresh.probe_answers()

    reports = Layout.at(tmp_path).reports
    assert answers_at(tmp_path) is None  # no report yet
    reports.mkdir(parents=True)
    (reports / "calibration.json").write_text(json.dumps({"attributes": ["Hat", "Glasses"]}))
    table = reports / "attribute_disparity.parquet"
    pl.DataFrame(
        {
            "attribute": ["Glasses", "Hat"],
            "est_p_worse": [0.97, 0.2],
            "probe_resolves": [True, False],
        }
    ).write_parquet(table)
    names, p_worse, resolves = answers_at(tmp_path)
    assert names == ["Hat", "Glasses"]  # in the probes' order, not the table's
    assert list(p_worse) == [0.2, 0.97] and list(resolves) == [False, True]
    # a report from before these columns: no answers, free text as it was
    pl.DataFrame({"attribute": ["Glasses", "Hat"], "gap_loss": [0.1, 0.2]}).write_parquet(table)
    assert answers_at(tmp_path) is None
    # a table from another report run (other attributes) is not mixed in
    pl.DataFrame(
        {"attribute": ["Smiling"], "est_p_worse": [0.5], "probe_resolves": [True]}
    ).write_parquet(table)
    assert answers_at(tmp_path) is None
    table.write_bytes(b"not parquet")
    broken = Diagnoser.load(diagnoser.meta["home"], encoder_loader=fake_loader)
    broken.meta["home"] = str(tmp_path)
    for _ in range(2):  # on every ask, not once and then silently nothing
        with pytest.raises(StorageError, match=r"attribute_disparity\.parquet: unreadable"):
            broken.probe_answers()
