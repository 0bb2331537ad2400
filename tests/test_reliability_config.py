"""Reliability, round two (issue 23): configurations and inputs that ran with answers that were
not the user's, or crashed with a traceback, now give a correct result or one clear error.

Each test names the red-team case it reproduces; each failed on the code before the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.blackbox.user_model import UserModelError, load_entry_point
from llm2loss_pipeline.core.celeba import CelebaFormatError, read_attribute_file, read_celeba
from llm2loss_pipeline.core.config import ConfigError, load_config, validate_config
from llm2loss_pipeline.core.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
HERE = "tests.test_reliability_config"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm2loss_pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        timeout=300,
    )


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- entry points the tests name --------------------------------------------------------------


def exits() -> nn.Module:
    sys.exit(3)


def unseeded() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))


def seeded() -> nn.Module:
    torch.manual_seed(0)
    return unseeded()


def seeded_20() -> nn.Module:
    """One output per identity of the tiny world's train split (20): fits the default map."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 20))


# ---- silent wrong results 1: a path key without `source:` -------------------------------------


def test_a_path_key_without_source_picks_its_source_and_check_config_shows_it(tmp_path):
    (tmp_path / "celeba").mkdir()
    notices: list[str] = []
    config = load_config(_yaml(tmp_path, "dataset: {celeba_root: celeba}\n"), notices)
    assert config.dataset.source == "celeba"
    assert config.dataset.celeba_root == str(tmp_path / "celeba")
    assert notices == ["dataset.source: celeba (inferred from dataset.celeba_root)"]
    for key, source in [
        ("entry_point", "entry_point"),
        ("torchscript_path", "torchscript"),
        ("loss_table_path", "loss_table"),
    ]:
        value = "pkg.mod:make" if key == "entry_point" else "f.bin"
        assert validate_config({"black_box": {key: value}}).black_box.source == source, key

    done = cli("check-config", str(tmp_path / "run.yaml"))
    shown = yaml.safe_load(done.stdout)
    assert shown["dataset"]["source"] == "celeba", done.stderr
    assert "note: dataset.source: celeba (inferred from dataset.celeba_root)" in done.stderr


def test_two_source_keys_or_a_contradicting_source_are_refused_naming_both_keys():
    with pytest.raises(ConfigError) as caught:
        validate_config({"black_box": {"entry_point": "a.b:c", "loss_table_path": "x.csv"}})
    assert "black_box.entry_point and black_box.loss_table_path are both set" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        validate_config({"dataset": {"source": "generated", "celeba_root": "/data"}})
    message = str(caught.value)
    assert "dataset.celeba_root is set but dataset.source is 'generated'" in message
    assert "set dataset.source: celeba" in message


# ---- silent wrong results 7: loose types, duplicate keys --------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "black_box: {epochs: true}\n",
            "black_box.epochs: Input should be a valid integer, got True (a boolean)",
        ),
        (
            'black_box: {epochs: "10"}\n',
            "black_box.epochs: Input should be a valid integer, got '10' (a string)",
        ),
        ("black_box: {augment: 1}\n", "black_box.augment: Input should be a valid boolean"),
        ("heads: {epochs: 2.0}\n", "heads.epochs: Input should be a valid integer, got 2.0"),
    ],
)
def test_loose_types_are_refused_with_the_value_and_its_kind(tmp_path, text, needle):
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(tmp_path, text))
    assert needle in str(caught.value)


def test_strict_types_take_yaml_numbers_and_lists_but_not_numbers_as_text(tmp_path):
    text = "black_box: {lr: 1}\ndataset: {resplit_fractions: [0.6, 0.2, 0.2]}\n"
    config = load_config(_yaml(tmp_path, text))
    assert config.black_box.lr == 1.0 and config.dataset.resplit_fractions == (0.6, 0.2, 0.2)
    assert load_config(TINY).black_box.epochs == 4
    with pytest.raises(ConfigError, match=r"black_box.lr: Input should be a valid number"):
        load_config(_yaml(tmp_path, 'black_box: {lr: "0.01"}\n'))


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    text = "black_box:\n  epochs: 2\n  width: 16\n  epochs: 20\nheads: {n_seeds: 2}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(tmp_path, text))
    assert str(caught.value) == (
        f"{tmp_path / 'run.yaml'} line 4: key 'epochs' is given twice (lines 2 and 4); keep one"
    )
    with pytest.raises(ConfigError, match=r"key 'heads' is given twice \(lines 1 and 2\)"):
        load_config(_yaml(tmp_path, "heads: {}\nheads: {n_seeds: 2}\n"))
    # a merge key may be overridden explicitly: that is YAML's own semantics, not a duplicate
    merged = "x: &d {epochs: 3}\nblack_box: {<<: *d, epochs: 5}\n"
    assert yaml.safe_load(merged)["black_box"]["epochs"] == 5
    with pytest.raises(ConfigError, match="x: unknown key"):
        load_config(_yaml(tmp_path, merged))


# ---- silent wrong results 8: an empty file ------------------------------------------------------


def test_an_empty_config_file_says_so_in_one_line(tmp_path):
    path = _yaml(tmp_path, "# nothing set yet\n")
    notices: list[str] = []
    assert load_config(path, notices) == load_config(None)
    assert notices == [f"{path} is empty: running the embedded default configuration"]
    done = cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"llm2loss: note: {path} is empty: running the embedded default configuration"
    ]


# ---- crashes 4: tracebacks instead of errors ----------------------------------------------------


def test_a_config_that_is_a_folder_or_not_utf8_is_one_clear_error(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"black_box:\n  epochs: 2 # caf\xe9\n")
    for path, needle in [
        (tmp_path, f"{tmp_path} is a folder, not a YAML configuration file"),
        (latin1, f"{latin1} line 2: not UTF-8 text (byte 0xe9); save the configuration as UTF-8"),
    ]:
        for command in (["check-config", str(path)], ["run", "--config", str(path)]):
            done = cli(*command)
            assert done.returncode == 2, done.stderr
            assert done.stderr == f"llm2loss: error: {needle}\n"


def test_generate_world_into_a_foreign_folder_is_one_clear_error(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    (foreign / "album").mkdir()
    done = cli("generate-world", str(foreign), "--n-identities", "4", "--images-per-identity", "3")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"llm2loss: error: {foreign} is not empty and is not a generated world (no world.json; "
        "it holds album/, holiday.jpg); choose an empty or new folder"
    )
    assert sorted(p.name for p in foreign.iterdir()) == ["album", "holiday.jpg"]
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    done = cli("generate-world", str(blocker / "world"))
    assert done.returncode == 2 and "is a file, so no folder can be made there" in done.stderr


def test_an_entry_point_that_calls_sys_exit_is_a_user_model_error():
    with pytest.raises(
        UserModelError, match=r"calling exits\(\) failed \(it called sys.exit\(3\)\)"
    ):
        load_entry_point(f"{HERE}:exits", 5)


# ---- crashes 5: checks that came too late -------------------------------------------------------


def _entry_point_config(tmp_path: Path, function: str) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["home"] = str(tmp_path / "home")
    raw["black_box"] = {"entry_point": f"{HERE}:{function}", "image_size": 32}
    return _yaml(tmp_path, yaml.safe_dump(raw), f"{function}.yaml")


def test_a_user_entry_point_is_checked_before_anything_runs(tmp_path):
    done = cli("run", "--config", str(_entry_point_config(tmp_path, "exits")))
    assert done.returncode == 2, done.stderr
    assert "calling exits() failed (it called sys.exit(3))" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()  # nothing ran, nothing was written


def test_an_unseeded_entry_point_is_named_not_deterministic(tmp_path):
    done = cli("check-config", str(_entry_point_config(tmp_path, "unseeded")))
    assert done.returncode == 2
    assert f"entry point '{HERE}:unseeded' is not deterministic" in done.stderr
    assert "rematerialize" not in done.stderr
    config = load_config(_entry_point_config(tmp_path, "seeded_20"))
    assert preflight(config) is config


def test_cuda_without_a_gpu_fails_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = validate_config({"devices": {"encoder": {"device": "cuda"}}})
    with pytest.raises(ConfigError) as caught:
        preflight(config, "run.yaml")
    assert str(caught.value).splitlines() == [
        "run.yaml: devices that cannot be used",
        "  devices.encoder.device: cuda, but torch sees no CUDA device on this machine; "
        "use cpu or auto",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_check_config_refuses_cuda_on_a_machine_without_a_gpu(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["devices"]["losses"] = {"device": "cuda:1"}
    done = cli("check-config", str(_yaml(tmp_path, yaml.safe_dump(raw))))
    assert done.returncode == 2
    assert "devices.losses.device: cuda:1, but torch sees no CUDA device" in done.stderr


# ---- config errors suggest the closest name; errors do not flood ------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"heads": {"n_seed": 3}}, "heads.n_seed: unknown key (did you mean `n_seeds`?)"),
        ({"world": {"hard_attributes": {"Grey_Hair": 0.9}}}, "(did you mean `Gray_Hair`?)"),
        ({"black_box": {"source": "torchscipt"}}, "(did you mean `torchscript`?)"),
        ({"report": {"eval_split": "tset"}}, "(did you mean `test`?)"),
        ({"blackbox": {}}, "blackbox: unknown key (did you mean `black_box`?)"),
    ],
)
def test_config_errors_suggest_the_closest_key_or_name(raw, needle):
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert needle in str(caught.value)


def test_an_enormous_value_is_quoted_in_at_most_about_200_characters(tmp_path):
    huge = "x" * 3_000_000
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(tmp_path, f"dataset: {{source: {huge}}}\n"))
    assert len(str(caught.value)) < 500
    assert "more characters)" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(_yaml(tmp_path, f"dataset: [{huge}\n"))
    assert len(str(caught.value)) < 1000


# ---- CelebA files: ids that are paths, CR-only lines, enormous lines ---------------------------


def _write_root(root: Path, names: list[str], newline: str = "\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [name + " " + " ".join(["-1"] * 40) for name in names]
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES), *rows]
    (root / "list_attr_celeba.txt").write_text(newline.join(lines) + newline)
    identities = "".join(f"{name} 1{newline}" for name in names)
    (root / "identity_CelebA.txt").write_text(identities)
    (root / "list_eval_partition.txt").write_text(identities.replace(" 1", " 0"))
    return root


@pytest.mark.parametrize("bad", ["../world.json", "/etc/passwd", "sub/001.jpg", "..", "a\\b.jpg"])
def test_a_sample_id_that_is_a_path_is_refused_naming_the_file_and_line(tmp_path, bad):
    root = _write_root(tmp_path / "celeba", ["000001.jpg", bad])
    with pytest.raises(CelebaFormatError) as caught:
        read_celeba(root)
    message = str(caught.value)
    assert message.startswith("list_attr_celeba.txt line 4: sample id "), message
    assert "is a path, not a file name in img_align_celeba/" in message


def test_a_path_id_in_the_identity_file_alone_is_refused_too(tmp_path):
    root = _write_root(tmp_path / "celeba", ["000001.jpg"])
    (root / "identity_CelebA.txt").write_text("000001.jpg 1\n../world.json 2\n")
    with pytest.raises(CelebaFormatError, match=r"identity_CelebA.txt line 2: sample id '\.\./"):
        read_celeba(root)


def test_cr_only_line_endings_read_like_lf_and_enormous_lines_are_clipped(tmp_path):
    names = ["000001.jpg", "000002.jpg"]
    lf = read_celeba(_write_root(tmp_path / "lf", names))
    cr = read_celeba(_write_root(tmp_path / "cr", names, newline="\r"))
    assert cr.attributes.equals(lf.attributes) and cr.partitions.equals(lf.partitions)
    huge = tmp_path / "huge.txt"
    huge.write_text("y" * 3_000_000 + "\n")
    with pytest.raises(CelebaFormatError) as caught:
        read_attribute_file(huge)
    assert len(str(caught.value)) < 600
    assert "more characters)" in str(caught.value)


# ---- crashes 4: an empty split named, with its reason -------------------------------------------


def test_an_empty_split_is_named_with_its_reason_before_the_run_and_in_the_encoder(tmp_path):
    root = _write_root(tmp_path / "celeba", ["000001.jpg", "000002.jpg", "000003.jpg"])
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n")
    config = validate_config({"dataset": {"celeba_root": str(root), "split_mode": "file"}})
    with pytest.raises(ConfigError) as caught:
        preflight(config, "run.yaml")
    assert str(caught.value).startswith(
        f"run.yaml: dataset.split_mode is file, but {root / 'list_eval_partition.txt'} has no "
        "rows with code 1 (valid); every split needs images"
    )
    within = validate_config({"dataset": {"celeba_root": str(root), "split_mode": "auto"}})
    assert preflight(within) is within  # only split_mode: file is checked; auto may re-split

    from llm2loss_pipeline.core.encoder.evaluate import retrieval_accuracy

    with pytest.raises(ValueError) as caught:
        retrieval_accuracy(torch.zeros(0, 4).numpy(), [], lambda texts: torch.zeros(0, 4).numpy())
    message = str(caught.value)
    assert "the 'valid' split has none to evaluate" in message
    assert "list_eval_partition.txt needs rows with code 1" in message


def test_a_label_map_with_an_enormous_cell_is_one_short_error(tmp_path):
    from llm2loss_pipeline.core.blackbox.labels import LabelMapError, read_label_map

    over_limit = tmp_path / "over.csv"
    over_limit.write_text("x" * 1_000_000 + ",1\n")  # over csv's field limit: was a bare csv.Error
    with pytest.raises(LabelMapError, match=r"over.csv line 1: not a CSV row \(field larger"):
        read_label_map(over_limit)
    long_cell = tmp_path / "long.csv"
    long_cell.write_text("0,0\r" + "x" * 100_000 + ",1\r")  # CR-only line ends, too
    with pytest.raises(LabelMapError) as caught:
        read_label_map(long_cell)
    assert str(caught.value).startswith(f"{long_cell} line 2: identity 'xxx")
    assert len(str(caught.value)) < 400


def test_an_entry_point_that_does_not_fit_the_label_map_file_fails_before_the_run(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{identity},{identity - 1}\n" for identity in range(1, 9)))
    raw = yaml.safe_load(_entry_point_config(tmp_path, "seeded").read_text())
    raw["black_box"]["label_map_path"] = str(labels)
    config = load_config(_yaml(tmp_path, yaml.safe_dump(raw)))
    with pytest.raises(ConfigError) as caught:
        preflight(config, "run.yaml")
    assert "the model has 5 outputs but the label map needs 8" in str(caught.value)
    labels.write_text("".join(f"{identity},{identity - 1}\n" for identity in range(1, 6)))
    assert preflight(config) is config
