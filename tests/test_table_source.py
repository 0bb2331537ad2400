"""dataset.source table (core/table_source.py), probes files (core/probes.py), the attribute set
(core/attribute_set.py), and that no module past the readers hard-codes CelebA's attributes."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import polars as pl
import pytest

import llm2loss_pipeline
from llm2loss_pipeline.core import prompts
from llm2loss_pipeline.core.attribute_set import (
    build_attribute_set,
    diagnosed_attributes,
    phrasings_of,
    read_attribute_set,
    with_home_phrasings,
    write_attribute_set,
)
from llm2loss_pipeline.core.config import ConfigError, validate_config
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.preflight import preflight
from llm2loss_pipeline.core.probes import ProbesFileError, built_phrasings, parse_probes
from llm2loss_pipeline.core.probes_file import read_probes
from llm2loss_pipeline.core.report.intersectional import validate_pairs
from llm2loss_pipeline.core.table_source import (
    TableFormatError,
    TableSpec,
    read_table_source,
    sanitise,
    table_manifest,
)
from llm2loss_pipeline.core.task import TaskConfig

CSV = """\
sample_id,path,split,label,person,Hat,Smile,Glasses,hair
a1,img/a1.png,train,cat,p1,1,-1,true,dark brown
a2,img/a2.png,train,dog,p1,-1,1,false,blond
a3,img/a3.png,test,cat,p2,1,1,TRUE,blond
a4,img/a4.png,valid,dog,p2,-1,-1,False,red/orange
"""


def _table(tmp_path: Path, text: str = CSV, name: str = "t.csv", **keys) -> TableSpec:
    path = tmp_path / name
    path.write_text(text)
    return TableSpec(path, tmp_path, **keys)


def test_a_csv_table_gives_the_celeba_readers_tables(tmp_path: Path) -> None:
    tables = read_table_source(_table(tmp_path, group_column="person"))
    assert tables.attributes.columns == [
        "sample_id",
        "Hat",
        "Smile",
        "Glasses",
        "hair_blond",
        "hair_dark_brown",
        "hair_red_orange",
    ]
    assert tables.attributes["Hat"].to_list() == [True, False, True, False]  # -1/1
    assert tables.attributes["Smile"].to_list() == [False, True, True, False]
    assert tables.attributes["Glasses"].to_list() == [True, False, True, False]  # true/false
    assert tables.attributes["hair_blond"].to_list() == [False, True, True, False]
    assert tables.origins["hair_red_orange"] == "hair=red/orange"
    manifest = table_manifest(tables, shard_size=3)
    assert manifest.columns == ["sample_id", "index", "path", "split", "identity", "shard", "label"]
    assert manifest["path"][0] == str(tmp_path / "img" / "a1.png")
    assert manifest["identity"].to_list() == [0, 0, 1, 1]  # the group column, numbered
    assert manifest["label"].to_list() == [0, 1, 0, 1]  # cat, dog in sorted order
    assert tables.label_values == ["cat", "dog"]
    assert manifest["shard"].to_list() == ["shard-00000"] * 3 + ["shard-00001"]


def test_one_hot_names_and_zero_one_columns(tmp_path: Path) -> None:
    assert sanitise("hair colour_dark  brown!") == "hair_colour_dark_brown"
    text = (
        "sample_id,path,split,Beard,Hair Colour\nb,x.png,test,0,Light Brown\na,y.png,train,1,gray\n"
    )
    tables = read_table_source(_table(tmp_path, text, attribute_columns=("Beard", "Hair Colour")))
    assert tables.attributes.columns == [
        "sample_id",
        "Beard",
        "Hair_Colour_Light_Brown",
        "Hair_Colour_gray",
    ]
    assert tables.attributes["sample_id"].to_list() == ["a", "b"]  # sorted by id
    assert tables.attributes["Beard"].to_list() == [True, False]
    # no group column: every sample is its own cluster; no label column: none in the manifest
    assert tables.manifest["identity"].to_list() == [0, 1]
    assert "label" not in tables.manifest.columns


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("a3,img/a3.png,test,cat,p2,1,1,TRUE", "a3,img/a3.png,test,cat,p2,1,0,TRUE"),
            r"t\.csv, row 3 \(line 4\), column 'Smile': value '0' is not a boolean.*holds -1",
        ),
        (
            ("a2,img/a2.png,train,dog,p1,-1,1", "a2,img/a2.png,train,dog,p1,,1"),
            r"t\.csv, row 2 \(line 3\), column 'Hat': the value is empty",
        ),
        (
            ("a4,img/a4.png,valid", "a4,img/a4.png,validation"),
            r"row 4 \(line 5\), column 'split': split 'validation' is not train, valid or test",
        ),
        (
            ("a4,img/a4.png", "a1,img/a4.png"),
            r"row 4 \(line 5\), column 'sample_id': sample id 'a1' is also on row 1",
        ),
        (
            ("a2,img/a2.png,train,dog,p1,-1,1,false", "a2,img/a2.png,train,dog,p1,-1,1,no"),
            r"row 2 \(line 3\), column 'Glasses': value 'no' is not a boolean, while row 1 holds",
        ),
        (
            ("a1,img/a1.png,train,cat,p1,1,-1,true", "a1,img/a1.png,train,cat,p1,1,yes,true"),
            r"row 1 \(line 2\), column 'Smile': value 'yes' is not a boolean, while row 2 holds",
        ),
        (
            ("a1,img/a1.png,train,cat,p1,1,-1,true", "a1,img/a1.png,train,cat,p1,2,-1,true"),
            r"row 1 \(line 2\), column 'Hat': value '2' is not a boolean: expected 0/1 or -1/1",
        ),
    ],
)
def test_each_bad_row_is_named_by_file_row_line_and_column(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    old, new = edit
    assert old in CSV
    with pytest.raises(TableFormatError, match=message):
        read_table_source(_table(tmp_path, CSV.replace(old, new), group_column="person"))


def test_a_quoted_newline_moves_the_line_number(tmp_path: Path) -> None:
    text = 'sample_id,path,split,note,Hat\na,"x\ny.png",train,n,1\nb,z.png,test,n,7\n'
    with pytest.raises(TableFormatError, match=r"row 2 \(line 4\), column 'Hat': value '7'"):
        read_table_source(_table(tmp_path, text))


def test_parquet_rows_and_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    frame = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c"],
            "path": ["a.png", "b.png", "c.png"],
            "split": ["train", "valid", "test"],
            "Hat": [1.0, None, 0.0],
        }
    )
    frame.write_parquet(path)
    with pytest.raises(
        TableFormatError, match=r"t\.parquet, row 2, column 'Hat': the value is empty"
    ):
        read_table_source(TableSpec(path, tmp_path))
    frame.with_columns(pl.col("Hat").fill_null(1.0)).write_parquet(path)
    assert read_table_source(TableSpec(path, tmp_path)).attributes["Hat"].to_list() == [
        True,
        True,
        False,
    ]


def test_table_level_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(TableFormatError, match=r"no column 'file' \(dataset.path_column\)"):
        read_table_source(_table(tmp_path, path_column="file"))
    with pytest.raises(TableFormatError, match=r"column 'loss'.*a name the pipeline's own tables"):
        read_table_source(_table(tmp_path, "sample_id,path,split,loss\na,x,train,1\n"))
    with pytest.raises(TableFormatError, match=r"'A_b', which 'A b' gives too"):
        read_table_source(_table(tmp_path, "sample_id,path,split,A b,A_b\na,x,train,1,0\n"))
    many = "".join(f"s{i},x,train,caption {i}\n" for i in range(65))
    with pytest.raises(TableFormatError, match=r"column 'note': has 65 distinct text values"):
        read_table_source(_table(tmp_path, "sample_id,path,split,note\n" + many))
    with pytest.raises(TableFormatError, match=r"expected a \.parquet or \.csv file"):
        read_table_source(_table(tmp_path, name="t.txt"))
    with pytest.raises(TableFormatError, match="no such table file"):
        read_table_source(TableSpec(tmp_path / "none.csv", tmp_path))


def test_the_config_infers_the_table_source_and_resolves_its_paths(tmp_path: Path) -> None:
    config = validate_config(
        {"dataset": {"table_path": "data/t.csv", "probes_path": "p.yaml"}}, base_dir=tmp_path
    )
    assert config.dataset.source == "table"
    assert config.dataset.table_path == str(tmp_path / "data" / "t.csv")
    assert config.dataset.probes_path == str(tmp_path / "p.yaml")
    spec = TableSpec.from_config(config.dataset)
    assert spec.image_root == tmp_path / "data"  # default: the table's folder


# ---- probes -----------------------------------------------------------------------------------

NAMES = ("Wearing_Scarf", "Smile", "hair_red", "Male")


def test_probes_file_validation_names_the_file_and_the_attribute(tmp_path: Path) -> None:
    cases = [
        (
            {"Wearing_Scarff": {"positive": ["a"], "negative": ["b"]}},
            r"p\.yaml: 'Wearing_Scarff' is not an attribute of the dataset \(did you mean",
        ),
        ({"Smile": {"positive": ["smiling"]}}, r"p\.yaml: Smile: missing negative"),
        (
            {"Smile": {"positive": [], "negative": ["x"]}},
            r"p\.yaml: Smile\.positive: expected a non-empty list",
        ),
        (
            {"Smile": {"positive": ["ok"], "negative": [""]}},
            r"p\.yaml: Smile\.negative item 1: expected a non-empty phrase",
        ),
        ({"Smile": {"positive": ["{}"], "negative": ["x"]}}, r"Smile\.positive item 1: .* brace"),
        (
            {"Smile": {"positive": ["a"], "negative": ["b"], "neutral": ["c"]}},
            r"Smile: unknown key 'neutral'",
        ),
        (["Smile"], r"p\.yaml: the top level must map attribute names"),
    ]
    for raw, message in cases:
        with pytest.raises(ProbesFileError, match=message):
            parse_probes(raw, "p.yaml", NAMES)
    path = tmp_path / "p.yaml"
    path.write_text("Smile:\n  positive: [a]\n  negative: [b]\nSmile:\n  positive: [c]\n")
    with pytest.raises(ProbesFileError, match=r"p\.yaml line 4: key 'Smile' is given twice"):
        read_probes(path, NAMES)
    with pytest.raises(ProbesFileError, match="no such probes file"):
        read_probes(tmp_path / "none.yaml", NAMES)


def test_probes_phrases_and_built_phrasings_reach_every_prompt() -> None:
    table = parse_probes(
        {"Smile": {"positive": ["who is smiling", "adj:smiling"], "negative": "who:not smiling"}},
        "p.yaml",
        NAMES,
    )
    assert table["Smile"] == (["clause:who is smiling", "adj:smiling"], ["who:not smiling"])
    assert built_phrasings("Wearing_Scarf") == (["wearing:scarf"], ["without:scarf"])
    assert built_phrasings("hair_red") == (["with:hair red"], ["without:hair red"])
    assert built_phrasings("Is_Tall") == (["who:tall"], ["who:not tall"])
    with prompts.phrased_by(table):
        assert prompts.attribute_prompt_pairs("Smile")[0] == (
            "face of a person who is smiling",
            "face of a person who is not smiling",
        )
        assert prompts.attribute_prompt_pairs("Wearing_Scarf")[0] == (
            "face of a person wearing scarf",
            "face of a person without scarf",
        )
        assert prompts.phrasing_source("Smile") == "file"
        assert prompts.phrasing_source("Wearing_Scarf") == "built"
        assert prompts.phrasing_source("Eyeglasses") == "curated"
        # CelebA's names keep their order and curated words beside a table's own attributes
        assert prompts.describe({"hair_red": True, "Male": True}) == ("face of a man with hair red")
        caption, stated = prompts.draw_caption({"Smile": True, "hair_red": False}, random.Random(1))
        assert set(stated) <= {"Smile", "hair_red"} and caption
    assert prompts.phrasing_source("Smile") == "built"  # the block's phrasings end with it


def test_the_attribute_set_leaves_the_target_out_and_flags_built_phrasings(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    attributes = pl.DataFrame({"sample_id": ["a"], **{name: [True] for name in NAMES}})
    probes = {"Smile": (["adj:smiling"], ["adj:unsmiling"])}
    task = TaskConfig(kind="attribute", target="hair_red")
    attribute_set = build_attribute_set(attributes, task, probes)
    assert attribute_set.attributes == NAMES
    assert attribute_set.diagnosed == ("Wearing_Scarf", "Smile", "Male")
    assert attribute_set.built == ["Wearing_Scarf"]
    assert attribute_set.phrasings["Male"]["source"] == "curated"
    write_attribute_set(layout, attribute_set)
    assert diagnosed_attributes(layout) == ("Wearing_Scarf", "Smile", "Male")
    assert read_attribute_set(layout).built == ["Wearing_Scarf"]
    with phrasings_of(layout) as read_back:
        assert read_back.diagnosed == attribute_set.diagnosed
        assert prompts.composed_prompt({"Smile": True}) == "face of a smiling person"
    assert prompts.composed_prompt({"Smile": True}) == "face of a person with smile"  # built
    with pytest.raises(ValueError, match=r"task.target 'Blond_Hair' is not an attribute"):
        build_attribute_set(attributes, TaskConfig(kind="attribute", target="Blond_Hair"))


def test_pairs_are_checked_against_the_datas_attributes() -> None:
    assert validate_pairs([["Smile", "Male"]], NAMES) == [("Smile", "Male")]
    with pytest.raises(
        ValueError, match=r"report.pairs: pair 0 names 'Smil'.*did you mean 'Smile'"
    ):
        validate_pairs([["Smil", "Male"]], NAMES)


# ---- nothing past the readers hard-codes CelebA's names ----------------------------------------

ALLOWED = {
    "core/attributes.py": "defines the 40 names",
    "core/celeba.py": "the CelebA reader",
    "core/world/config.py": "the generated world",
    "core/world/generate.py": "the generated world",
    "core/world/population.py": "the generated world",
    "core/world/traits.py": "the generated world",
    "core/prompts.py": "CelebA's curated probes",
    "core/preflight.py": "checks a CelebA-shaped source's task target before its data is read",
}


def test_no_module_past_the_readers_mentions_celeba_attributes() -> None:
    root = Path(llm2loss_pipeline.__file__).parent
    found = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"\bCELEBA_ATTRIBUTES\b", path.read_text())
    }
    assert found - set(ALLOWED) == set(), "the attribute set comes from the data (attribute_set)"
    assert "core/celeba.py" in found  # the scan sees what it looks for


def test_preflight_checks_the_table_and_the_probes_file_before_anything_runs(
    tmp_path: Path,
) -> None:
    (tmp_path / "t.csv").write_text(CSV)
    (tmp_path / "p.yaml").write_text("Smile:\n  positive: [smiling]\n  negative: [serious]\n")
    table = {"table_path": "t.csv", "group_column": "person"}

    def check(dataset: dict, task: dict | None = None) -> None:
        raw = {"dataset": dataset, "task": task or {"kind": "label"}}
        preflight(validate_config(raw, base_dir=tmp_path))

    check({**table, "probes_path": "p.yaml"})  # a good table and probes file pass
    with pytest.raises(ConfigError, match=r"identity needs dataset.group_column"):
        check({"table_path": "t.csv"}, {"kind": "identity"})
    with pytest.raises(ConfigError, match=r"task.target 'Blond_Hair' is not an attribute"):
        check(table, {"kind": "attribute", "target": "Blond_Hair"})
    with pytest.raises(ConfigError, match=r"dataset.table_path: .*t\.csv, row 3 \(line 4\)"):
        (tmp_path / "t.csv").write_text(CSV.replace("test,cat", "testing,cat"))
        check(table)
    # a CelebA-shaped source's probes file is checked against CelebA's names
    (tmp_path / "p.yaml").write_text("Smiles:\n  positive: [a]\n  negative: [b]\n")
    with pytest.raises(
        ConfigError, match=r"dataset.probes_path: .*'Smiles'.*did you mean 'Smiling'"
    ):
        check({"probes_path": "p.yaml"}, {"kind": "identity"})


def test_phrasings_hold_inside_their_block_and_thread_only() -> None:
    smiling = {"Smile": (["adj:smiling"], ["adj:unsmiling"])}
    grinning = {"Smile": (["adj:grinning"], ["adj:unsmiling"])}
    seen: list[str] = []
    with prompts.phrased_by(smiling):
        with prompts.phrased_by(grinning):  # an inner block replaces, then gives back
            assert prompts.composed_prompt({"Smile": True}) == "face of a grinning person"
        assert prompts.composed_prompt({"Smile": True}) == "face of a smiling person"
        # another thread (Dagster's, a test's) does not phrase by this block's file
        worker = threading.Thread(target=lambda: seen.append(prompts.phrasing_source("Smile")))
        worker.start()
        worker.join()
    assert seen == ["built"]
    assert prompts.phrasing_source("Smile") == "built"


def test_a_step_runs_under_its_homes_phrasings_and_leaves_none_behind(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    attributes = pl.DataFrame({"sample_id": ["a"], **{name: [True] for name in NAMES}})
    probes = {"Smile": (["adj:smiling"], ["adj:unsmiling"])}
    write_attribute_set(layout, build_attribute_set(attributes, TaskConfig(), probes))

    @with_home_phrasings
    def step(home: Layout, attribute: str) -> str:
        return prompts.composed_prompt({attribute: True})

    assert step(layout, "Smile") == "face of a smiling person"
    assert prompts.composed_prompt({"Smile": True}) == "face of a person with smile"
    assert step.__name__ == "step"
