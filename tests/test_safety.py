"""Safety: no pickle-style loading or code evaluation, SQL only from files with bound values, and
paths from the configuration resolved and checked before anything is written.

The source checks parse the package with `ast` (so `model.eval()` is not `eval(`), and each
checker is first shown to catch a planted offence, so that a clean result means something.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from llm2loss_pipeline.core.blackbox.labels import LabelMapError
from llm2loss_pipeline.core.blackbox.loss_table import LossTableError
from llm2loss_pipeline.core.blackbox.user_model import UserModelError
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.steps.black_box import fit_black_box
from llm2loss_pipeline.core.steps.data import prepare_dataset
from llm2loss_pipeline.core.steps.encoder import fit_encoder
from tests import fault_helpers as fh

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = fh.REPO
PACKAGE = REPO / "llm2loss_pipeline"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "bench").glob("*.py"))
SOURCES += sorted((REPO / "scripts").glob("*.py"))

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
USER_MODEL_LOADERS = {"torch.jit.load"}
"""TorchScript archives, loaded only where a user names one in the configuration
(black_box.torchscript_path), and only in core/blackbox/user_model.py. torch.export.load is not
among them: it unpickles with weights_only=False, so it counts as an unsafe torch load."""
USER_MODEL_FILE = PACKAGE / "core" / "blackbox" / "user_model.py"


def dotted(node: ast.AST) -> str:
    """'torch.load' for the expression torch.load, '' for anything that is not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """Every pickle import, unsafe deserialisation, eval/exec and shell call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        short = name.rsplit(".", 1)[-1]
        if isinstance(node.func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(f"{where}: calls {name}()")
        torch_load = (
            short == "load" and name.startswith("torch.") and name not in USER_MODEL_LOADERS
        )
        if torch_load and not is_true(keyword(node, "weights_only")):
            found.append(f"{where}: {name}() without weights_only=True")
        if name in USER_MODEL_LOADERS and Path(filename) != USER_MODEL_FILE:
            found.append(f"{where}: {name}() outside the user-model loader")
        if name == "torch.save" or short in ("read_pickle", "to_pickle"):
            found.append(f"{where}: {name}() pickles")
        if short in ("load", "load_all", "unsafe_load", "full_load") and name.startswith("yaml."):
            found.append(f"{where}: {name}() (use yaml.safe_load)")
        if name in ("os.system", "os.popen"):
            found.append(f"{where}: {name}()")
        for kw in node.keywords:
            if kw.arg == "weights_only" and not is_true(kw.value):
                found.append(f"{where}: weights_only is not True")
            if kw.arg in ("allow_pickle", "shell") and is_true(kw.value):
                found.append(f"{where}: {kw.arg}=True")
    return found


PLANTED_UNSAFE = [
    "import pickle",
    "from joblib import load",
    "import dill as d",
    "from torch.serialization import load\nimport cloudpickle",
    "torch.load(path)",
    "torch.load(path, weights_only=False)",
    "torch.save(model, path)",
    "eval(text)",
    "exec(code, {})",
    "np.load(path, allow_pickle=True)",
    "yaml.load(stream, Loader=yaml.Loader)",
    "subprocess.run(cmd, shell=True)",
    "os.system('rm -rf x')",
    "frame.to_pickle('x.pkl')",
    "torch.jit.load(path)",  # outside the user-model loader
    "torch.export.load(path)",  # unpickles weights with weights_only=False
]
SAFE = """
model.eval()
torch.load(path, weights_only=True)
yaml.safe_load(text)
np.load(path)
subprocess.run(["ls"], check=True)
safetensors.torch.load_file(path)
"""


@pytest.mark.parametrize("snippet", PLANTED_UNSAFE)
def test_the_source_check_catches_each_planted_offence(snippet):
    assert unsafe_calls(snippet), snippet


def test_the_source_check_accepts_safe_calls():
    assert unsafe_calls(SAFE) == []


def test_package_never_pickles_or_evaluates_code():
    assert len(SOURCES) > 50  # the scan covers the package, not an empty glob
    problems = [
        problem
        for path in SOURCES
        for problem in unsafe_calls(path.read_text(encoding="utf-8"), str(path))
    ]
    assert problems == []


# ---- SQL --------------------------------------------------------------------------------------

SQL_METHODS = {"execute", "executemany", "sql", "query", "from_query"}
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ATTACH|COPY|PRAGMA|ALTER)\b")


def sql_problems(source: str, filename: str = "<snippet>") -> tuple[list[str], int]:
    """(problems, number of SQL calls checked). The SQL text of every `.execute`/`.sql`/... call
    must be a string constant or `load_sql(...)`; no SQL-looking text may be built with an
    f-string, `%`, `.format()` or `+`."""
    problems, checked = [], 0
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SQL_METHODS
        ):
            text = node.args[0] if node.args else keyword(node, "query")
            if text is None:
                continue
            checked += 1
            constant = isinstance(text, ast.Constant) and isinstance(text.value, str)
            loaded = isinstance(text, ast.Call) and dotted(text.func).endswith("load_sql")
            if not (constant or loaded):
                problems.append(f"{where}: .{node.func.attr}() gets SQL that is not from a file")
        pieces: list[str] = []
        if isinstance(node, ast.JoinedStr):
            pieces = [v.value for v in node.values if isinstance(v, ast.Constant)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            pieces = [
                side.value
                for side in (node.left, node.right)
                if isinstance(side, ast.Constant) and isinstance(side.value, str)
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant)
        ):
            pieces = [str(node.func.value.value)]
        if any(SQL_WORDS.search(piece) for piece in pieces):
            problems.append(f"{where}: SQL text built by string formatting")
    return problems, checked


@pytest.mark.parametrize(
    "snippet",
    [
        "con.execute(f'SELECT * FROM t WHERE split = {split}')",
        "con.sql('SELECT * FROM t WHERE split = ' + split)",
        "con.execute('SELECT %s' % value)",
        "con.sql('SELECT {}'.format(value))",
        "query = f'DROP TABLE {name}'",
        "con.execute(text)",
    ],
)
def test_the_sql_check_catches_each_planted_offence(snippet):
    assert sql_problems(snippet)[0], snippet


def test_the_sql_check_accepts_files_and_constants():
    problems, checked = sql_problems(
        "con.sql(load_sql(name), params=bound)\ncon.execute('CHECKPOINT')\n"
        "con.execute('SELECT count(*) FROM read_parquet(?)', [path])"
    )
    assert problems == [] and checked == 3


def test_package_sql_comes_only_from_assets_sql_with_bound_values():
    problems, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        found, count = sql_problems(path.read_text(encoding="utf-8"), str(path))
        problems += found
        checked += count
    assert checked >= 3  # connect's SET, relation's load_sql, publish's CHECKPOINT at least
    assert problems == []


def test_query_files_are_not_templates():
    """Values reach the queries only as `$name` parameters: no Python placeholders in the SQL."""
    files = sorted((REPO / "assets_sql").glob("*.sql"))
    assert len(files) >= 5
    for path in files:
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8"))
        assert not re.search(r"\{[A-Za-z_]\w*\}|%\(?[A-Za-z_]*\)?s\b", text), path


# ---- paths from the configuration -------------------------------------------------------------


def test_missing_celeba_root_is_named_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = fh.fast_config(tmp_path / "home", dataset={"source": "celeba", "celeba_root": "nope"})
    layout = Layout.at(config.home)
    with pytest.raises(FileNotFoundError) as caught:
        prepare_dataset(layout, config.dataset, config.world)
    assert f"dataset.celeba_root {tmp_path / 'nope'} is not a directory" in str(caught.value)
    (tmp_path / "a-file").write_text("not a folder")
    config = fh.fast_config(layout.home, dataset={"source": "celeba", "celeba_root": "a-file"})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'a-file'} is not a directory"):
        prepare_dataset(layout, config.dataset, config.world)
    assert not layout.manifest.exists()


@pytest.mark.parametrize(
    ("black_box", "error", "needle"),
    [
        (
            {"source": "loss_table", "loss_table_path": "none.parquet"},
            LossTableError,
            "loss table {cwd}/none.parquet does not exist (black_box.loss_table_path)",
        ),
        (
            {"label_map_path": "none.json"},
            LabelMapError,
            "label map {cwd}/none.json does not exist (black_box.label_map_path)",
        ),
        (
            {"source": "torchscript", "torchscript_path": "none.pt"},
            UserModelError,
            "TorchScript file {cwd}/none.pt does not exist (black_box.torchscript_path)",
        ),
    ],
    ids=["loss_table_path", "label_map_path", "torchscript_path"],
)
@pytest.mark.slow
def test_missing_black_box_paths_are_named_before_anything_is_written(
    tmp_path, monkeypatch, black_box, error, needle
):
    _, reference = fh.reference_home()
    layout = fh.clone_home(reference, tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    config = fh.fast_config(layout.home, black_box=black_box)
    with pytest.raises(error, match=re.escape(needle.format(cwd=tmp_path.resolve()))):
        fit_black_box(layout, config.black_box, config.devices.black_box)
    assert not layout.models.exists()


@pytest.mark.parametrize(
    ("encoder", "needle"),
    [
        (
            {"mode": "pretrained", "model_name": "ViT-B-32", "checkpoint_path": "none.pt"},
            "encoder.checkpoint_path {cwd}/none.pt is not a file",
        ),
        ({"text_model_dir": "no-model"}, "is not a Hugging Face model folder"),
    ],
    ids=["checkpoint_path", "text_model_dir"],
)
@pytest.mark.slow
def test_missing_encoder_paths_are_named_before_anything_is_written(
    tmp_path, monkeypatch, encoder, needle
):
    _, reference = fh.reference_home()
    layout = fh.clone_home(reference, tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    config = fh.fast_config(layout.home, encoder=encoder)
    with pytest.raises(
        FileNotFoundError, match=re.escape(needle.format(cwd=tmp_path.resolve()))
    ) as caught:
        fit_encoder(layout, config.encoder, config.devices.encoder)
    if "text_model_dir" in encoder:  # resolved against the working directory
        assert str(tmp_path / "no-model") in str(caught.value)
    assert not layout.models.exists()
