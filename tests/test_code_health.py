"""Code-health refactors that change how much work is done, not what comes out."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import polars as pl
import pytest
from pydantic import BaseModel

import llm2loss_pipeline
from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.steps import diagnosis


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        return np.ones((len(texts), 4), dtype=np.float32) / 2.0


def _frame(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {name: rng.random(n) < 0.5 for name in CELEBA_ATTRIBUTES}
    return pl.DataFrame(
        {
            "sample_id": [f"{i:06d}.jpg" for i in range(n)],
            "loss": rng.random(n),
            "embedding": rng.normal(size=(n, 4)).astype(np.float32),
            **columns,
        }
    )


def test_gap_effect_uses_the_text_corpus_embedded_once(monkeypatch):
    """fit_heads embeds the caption corpus once; the gap-effect measurement reuses it (it used to
    encode the same 2,000+ texts a second time)."""
    seen = {}

    def fake_measure(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(diagnosis, "measure_gap_effect", fake_measure)
    train, held_out = _frame(50, 0), _frame(40, 1)
    encoder = CountingEncoder()
    config = HeadsConfig(n_seeds=1, epochs=1)
    corpus_texts = diagnosis.text_corpus(train, config.base_seed, CELEBA_ATTRIBUTES)
    corpus = np.full((len(corpus_texts), 4), 0.5, dtype=np.float32)
    rows = diagnosis.gap_effect_rows(
        train, held_out, corpus, config, encoder, "cpu", CELEBA_ATTRIBUTES
    )
    assert rows == []
    assert seen["text_corpus_embeddings"] is corpus
    assert all(call != corpus_texts for call in encoder.calls)
    assert len(seen["prompts"]) == len(CELEBA_ATTRIBUTES)


def test_one_markdown_renderer_for_metadata_and_report():
    """Dagster metadata tables and the report's tables format numbers the same way (they used to
    be two renderers: 4 significant digits here, 3 decimals there)."""
    from llm2loss_pipeline.core.markdown import markdown_table
    from llm2loss_pipeline.core.report.build import _markdown
    from llm2loss_pipeline.defs.metadata import markdown_table as metadata_table

    rows = [{"group": "a|b", "spearman": 0.123456, "p": 2.5e-5, "n": 12, "ok": True, "x": None}]
    rows.append({"group": "c", "spearman": float("nan"), "p": 0.5, "n": 3, "ok": False, "x": 1.0})
    expected = (
        "| group | spearman | p | n | ok | x |\n|---|---|---|---|---|---|\n"
        "| a\\|b | 0.123 | 2.50e-05 | 12 | yes |  |\n| c | – | 0.500 | 3 |  | 1.000 |"
    )
    assert metadata_table is markdown_table
    assert markdown_table(rows) == expected
    assert _markdown(pl.DataFrame(rows), list(rows[0])) == expected
    assert markdown_table([]) == "_(empty)_"


def test_member_names_and_groups_have_one_home():
    from llm2loss_pipeline.core import members
    from llm2loss_pipeline.core.heads import compare
    from llm2loss_pipeline.core.heads import config as heads_config
    from llm2loss_pipeline.core.heads.ensemble import MemberInfo
    from llm2loss_pipeline.core.report import build, plots

    assert heads_config.KINDS is members.KINDS and heads_config.ARCHS is members.ARCHS
    assert build.KINDS is members.KINDS and plots.KINDS is members.KINDS
    assert compare.OVERALL is members.OVERALL is build.OVERALL
    assert not hasattr(compare, "member_groups") or compare.member_groups is members.member_groups
    grid = [
        MemberInfo(0, "regressor", "linear", 0),
        MemberInfo(1, "ranker", "mlp", 0),
        MemberInfo(2, "regressor", "mlp", 0),
    ]
    # the answers list kinds, then everyone; the report adds kind x arch groups after the kinds
    assert compare.kind_groups(grid) == {"regressor": [0, 2], "ranker": [1], "overall": [0, 1, 2]}
    names = [group.name for group in members.member_groups(grid)]
    assert names == ["overall", "regressor", "ranker", "regressor/linear", "regressor/mlp",
                     "ranker/mlp"]  # fmt: skip


def test_layout_names_every_artifact_where_it_always_was(tmp_path):
    """The paths the steps used to build by hand, now named once by Layout (same places, so
    existing homes keep working)."""
    from llm2loss_pipeline.core import layout as layout_module
    from llm2loss_pipeline.core.heads.checkpoint import INDEX
    from llm2loss_pipeline.core.report import measured
    from llm2loss_pipeline.core.steps import black_box, encoder

    layout = layout_module.Layout.at(tmp_path)
    home = layout.home
    expected = {
        "black_box_reference": "models/black_box/reference.json",
        "black_box_curve": "models/black_box/training_curve.png",
        "loss_table_copy": "models/black_box/loss_table.parquet",
        "heads_index": f"models/heads/{INDEX}",
        "member_metrics": "models/heads_metrics/member_metrics.parquet",
        "kind_metrics": "models/heads_metrics/kind_metrics.json",
        "gap_effect": "models/heads_metrics/gap_effect.json",
        "attribute_table": "reports/attribute_disparity.parquet",
        "headline": "reports/headline.json",
        "report_html": "reports/report.html",
        "hypotheses": "reports/failure_hypotheses.parquet",
        "evidence": "reports/failure_evidence.parquet",
        "discovery_dir": "reports/discovery",
        "discovery_html": "reports/discovery.html",
    }
    assert {name: getattr(layout, name) for name in expected} == {
        name: home / relative for name, relative in expected.items()
    }
    # one definition of each table name, that the steps and the report share
    assert black_box.LOSSES_TABLE is measured.LOSSES_TABLE is layout_module.LOSSES_TABLE
    assert encoder.EMBEDDINGS_TABLE is measured.EMBEDDINGS_TABLE is layout_module.EMBEDDINGS_TABLE


MAX_FUNCTION_LINES = 80


def test_no_long_function_without_a_reason():
    """Every function of the package fits in a reader's head (80 lines), or says on the line
    above it, as '# long: ...', why it does not."""
    import ast
    from pathlib import Path

    import llm2loss_pipeline

    root = Path(llm2loss_pipeline.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if length > MAX_FUNCTION_LINES and not lines[first - 2].lstrip().startswith("# long:"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length})")
    assert not offenders, "functions over 80 lines without a '# long:' reason: " + ", ".join(
        offenders
    )


PACKAGE = Path(llm2loss_pipeline.__file__).parent

LITERAL_ALLOWED = {"core/world/traits.py"}
"""`Level` and `Region` type the generated world's fixed rule table; no file, flag or launchpad
field sets them, so there is no choice to check."""

MEMBERSHIP_ALLOWED = {
    "CELEBA_ATTRIBUTES": "40 names: the message gives an example, the 'did you mean' the close one",
    "PLOT_FORMATS": "a plot path's extension, not a named setting",
    "SLOTS": "parses the phrase table in code, not user input",
    "REFUSED_SUFFIXES": "dispatches on a registry file's suffix",
}


def _names_choices(node: ast.expr) -> str | None:
    """The choices a membership test checks against: a literal tuple/list/set of strings, or an
    UPPER_CASE constant (its name); None for anything else."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        strings = all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
        return ast.unparse(node) if node.elts and strings else None
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name if name.lstrip("_").isupper() else None


def _hand_written_choices(tree: ast.AST) -> list[tuple[int, str]]:
    """`if x not in CHOICES: raise ValueError(...)` (or `in`), the check `one_of` replaces."""
    found = []
    for node in ast.walk(tree):
        raises = isinstance(node, ast.If) and any(
            isinstance(s, ast.Raise)
            and getattr(getattr(s.exc, "func", None), "id", "") == "ValueError"
            for s in node.body
        )
        if not raises:
            continue
        for test in ast.walk(node.test):
            if isinstance(test, ast.Compare) and any(
                isinstance(op, ast.In | ast.NotIn) for op in test.ops
            ):
                choices = [_names_choices(c) for c in test.comparators]
                found += [(node.lineno, c) for c in choices if c and c not in MEMBERSHIP_ALLOWED]
    return found


def test_every_choice_is_declared_with_one_of():
    """A named choice is a plain str checked by `core.choices.one_of` (the Dagster resources then
    show str fields, and every error names the key and the allowed values); never a `Literal`
    nor a hand-written `if value not in (...): raise ValueError(...)`."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        if relative not in LITERAL_ALLOWED:
            offenders += [
                f"{relative}:{node.lineno} Literal"
                for node in ast.walk(tree)
                if (isinstance(node, ast.Name) and node.id == "Literal")
                or (isinstance(node, ast.Attribute) and node.attr == "Literal")
            ]
        offenders += [f"{relative}:{line} in {what}" for line, what in _hand_written_choices(tree)]
    assert not offenders, "choices not declared with one_of: " + ", ".join(offenders)


def test_the_scan_finds_the_ways_a_choice_used_to_be_declared():
    source = (
        "def f(mode, kind):\n"
        "    if mode not in ('a', 'b'):\n"
        "        raise ValueError(mode)\n"
        "    if not (kind in KINDS or kind.startswith('x')):\n"
        "        raise ValueError(kind)\n"
        "    if kind not in CELEBA_ATTRIBUTES:\n"
        "        raise ValueError(kind)\n"
    )
    assert _hand_written_choices(ast.parse(source)) == [(2, "('a', 'b')"), (4, "KINDS")]


def _section_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    models = [model]
    for info in model.model_fields.values():
        for kind in (info.annotation, *get_args(info.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                models += _section_models(kind)
    return models


def test_config_choices_are_plain_strings_that_name_key_and_values():
    from llm2loss_pipeline.core.config import ConfigError, PipelineConfig, validate_config

    for model in _section_models(PipelineConfig):
        for name, info in model.model_fields.items():
            assert get_origin(info.annotation) is not Literal, f"{model.__name__}.{name}"
    cases = [
        (
            {"black_box": {"source": "torchscipt"}},
            "black_box.source: Value error, source must be one of ['builtin', 'entry_point', "
            "'torchscript', 'loss_table'], got 'torchscipt' (did you mean `torchscript`?)",
        ),
        (
            {"black_box": {"nonfinite": "skip"}},
            "nonfinite must be one of ['error', 'drop'], got 'skip'",
        ),
        (
            {"dataset": {"split_mode": "within_identiy"}},
            "split_mode must be one of ['auto', 'file', 'within_identity'], got 'within_identiy' "
            "(did you mean `within_identity`?)",
        ),
        (
            {"heads": {"train_split": "vaild"}},
            "heads.train_split: Value error, train_split must be one of ['train', 'valid', "
            "'test'], got 'vaild' (did you mean `valid`?)",
        ),
        (
            {"devices": {"heads": {"precision": "fp8"}}},
            "precision must be one of ['fp32', 'bf16', 'fp16', 'auto'], got 'fp8'",
        ),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as caught:
            validate_config(raw)
        assert message in str(caught.value)


def test_one_of_names_a_family_it_cannot_list():
    from llm2loss_pipeline.core.choices import one_of
    from llm2loss_pipeline.core.device import DEVICES, is_cuda_index

    family = ("cuda:N", is_cuda_index)
    assert one_of("device", "cuda:3", DEVICES, family=family) == "cuda:3"
    assert one_of("device", "auto", DEVICES, family=family) == "auto"
    for bad in ("cuda:N", "cuda:", "tpu"):
        with pytest.raises(ValueError, match=r"device must be one of \['cpu', 'cuda', 'auto', "):
            one_of("device", bad, DEVICES, family=family)


def test_the_black_box_losses_are_the_ones_the_config_offers():
    from llm2loss_pipeline.core.blackbox.config import TASK_LOSS_NAMES
    from llm2loss_pipeline.core.blackbox.losses import TASK_LOSSES

    assert tuple(TASK_LOSSES) == TASK_LOSS_NAMES


def _local_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


def _unexplained_imports(source: str) -> list[int]:
    """Lines of function-local imports without a '# lazy:' reason: on the import's line, or in
    the comment block just above it or above the block of imports it belongs to (imports
    separated by nothing but blank lines, as isort groups them)."""
    lines = source.splitlines()
    imports = _local_imports(ast.parse(source))
    ends = {node.end_lineno: node.lineno for node in imports}
    unexplained = []
    for node in imports:
        if "# lazy:" in lines[node.lineno - 1]:
            continue
        above = node.lineno - 1
        while above in ends or (above >= 1 and not lines[above - 1].strip()):
            above = ends[above] - 1 if above in ends else above - 1  # one block, one reason
        comments = []
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            comments.append(lines[above - 1].strip())
            above -= 1
        if not any(comment.startswith("# lazy:") for comment in comments):
            unexplained.append(node.lineno)
    return unexplained


def test_every_function_local_import_says_why_it_is_lazy():
    """Imports sit at the top of their module, where a reader sees its dependencies and cycles,
    except those that keep a measured cost off `llm2loss --help`, `llm2loss compare` or the
    Dagster definitions load; each of those says so in a '# lazy:' comment (bench/RESULTS.md,
    "Imports (issue 20, item 6)")."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        offenders += [f"{relative}:{line}" for line in _unexplained_imports(path.read_text())]
    assert not offenders, "function-local imports without a '# lazy:' reason: " + ", ".join(
        offenders
    )


def test_the_lazy_rule_reads_runs_and_comment_blocks():
    source = (
        "import os\n"
        "def f():\n"
        "    # lazy: torch costs 2 s\n"
        "    import torch\n"
        "    from a import (\n"
        "        b,\n"
        "    )\n"
        "\n"
        "    from b import c\n"
        "    x = 1\n"
        "    import json\n"
        "    # why, on two lines:\n"
        "    # lazy: scipy costs 1 s\n"
        "    # (measured)\n"
        "    import scipy\n"
        "    import yaml  # lazy: 25 ms of --help\n"
        "    def g():\n"
        "        import re\n"
    )
    assert _unexplained_imports(source) == [11, 18]
