"""The pipeline's configuration: one YAML file, validated, that maps onto the Dagster resources.

Each top-level section is one pydantic model owned by the part of the method it configures
(`world` by core/world, `black_box` by core/blackbox, ...). `llm2loss run --config FILE` validates
the file here first so that a typo fails before anything runs, with the offending key spelled out;
the Dagster resources are generated from the same models (defs/resources.py), so the launchpad
shows the same keys with the same defaults.

Paths (`home` and every `*_path`, `*_dir` or `*_root` key) are made absolute when the file is
read: `~` expanded, and a relative path taken from the configuration file's folder (from the
working directory for a mapping validated without a file), so that a run means the same files
whichever directory its processes start in. `check_paths` then proves that the paths a run will
read exist and are files or folders as expected; it is separate from validation because a
template such as configs/celeba.yaml must validate on a machine without the data.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm2loss_pipeline.core.attributes import check_split
from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.choices import ON_BAD_IMAGE, one_of
from llm2loss_pipeline.core.device import DeviceSpec
from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.heads.config import HeadsConfig
from llm2loss_pipeline.core.report.grounded import ESTIMATORS
from llm2loss_pipeline.core.task import TaskConfig
from llm2loss_pipeline.core.world.config import WorldConfig
from llm2loss_pipeline.core.world.traits import RULES_BY_NAME

DEFAULT_PLANTED_FAILURES = {"Gray_Hair": 0.9, "Goatee": 0.9}
"""Identity-level attributes: the default encoder represents them well (zero-shot AUROC about
0.9), unlike small accessories such as Eyeglasses; see bench/RESULTS.md."""


DATASET_SOURCES = ("generated", "celeba", "table")
SPLIT_MODES = ("auto", "file", "within_identity")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """Which images the pipeline diagnoses, and how they are cut into shards."""

    source: str = Field(
        "generated",
        description="generated (the offline face world), celeba, or table (your own manifest)",
    )
    celeba_root: str | None = Field(
        None, description="a CelebA root folder (img_align_celeba/ and the three list files)"
    )
    # dataset.source table (core/table_source.py): one row per image in a Parquet or CSV file.
    table_path: str | None = Field(
        None, description="table: a .parquet or .csv manifest, one row per image"
    )
    image_root: str | None = Field(
        None, description="table: the folder the path column is relative to (default: the table's)"
    )
    id_column: str = Field("sample_id", min_length=1, description="table: the unique sample id")
    path_column: str = Field("path", min_length=1, description="table: the image path")
    split_column: str = Field("split", min_length=1, description="table: train, valid or test")
    label_column: str = Field(
        "label", min_length=1, description="table: the label of task.kind label (may be absent)"
    )
    group_column: str | None = Field(
        None,
        description="table: the cluster of each sample (e.g. a person); statistics resample "
        "groups, as they resample identities; unset: every sample is its own group",
    )
    attribute_columns: list[str] | None = Field(
        None,
        description="table: the attribute columns (unset: every column not named above); "
        "bool, 0/1 or -1/1, or text (one-hot: <column>_<value>)",
    )
    probes_path: str | None = Field(
        None,
        description="a YAML file of positive and negative phrasings per attribute "
        "(core/probes.py); attributes without any are phrased from their name",
    )
    shard_size: int = Field(1024, ge=16, le=1_000_000, description="samples per shard partition")
    on_bad_image: str = Field("fail", description="fail (list every bad image) or skip (record)")
    split_mode: str = Field(
        "auto",
        description=(
            "file (the partition file's splits), within_identity (re-split each identity's images "
            "by resplit_fractions), or auto (within_identity when the file's splits are "
            "identity-disjoint, as CelebA's are)"
        ),
    )
    resplit_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test shares for within_identity splits"
    )

    @field_validator("source", "on_bad_image", "split_mode")
    @classmethod
    def _choice(cls, value: str, info) -> str:
        allowed = {
            "source": DATASET_SOURCES,
            "on_bad_image": ON_BAD_IMAGE,
            "split_mode": SPLIT_MODES,
        }[info.field_name]
        return one_of(info.field_name, value, allowed)

    @field_validator("resplit_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(share <= 0 for share in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"resplit_fractions must be positive and sum to 1, got {value}")
        return value


class ReportConfig(_Strict):
    """How the attribute disparity report is measured and judged."""

    eval_split: str = Field("test", description="split on which disparities are measured")
    pairs: list[str] = Field(
        default_factory=list,
        description="attribute pairs as 'A:B' (empty: the n_pairs most frequent pairs); the names "
        "are checked against the dataset's attributes when the report runs",
    )
    n_pairs: int = Field(10, ge=0, le=200)
    min_group_size: int = Field(20, ge=1, description="smaller groups are marked small_group")
    group_by: list[str] = Field(
        default_factory=list,
        description="attributes whose cells are the groups the worst group is chosen from, as a "
        "group-robustness benchmark declares its spurious attribute (e.g. [Male]); empty: every "
        "attribute's; checked against the dataset's attributes when the report runs",
    )
    alpha: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Benjamini-Hochberg false discovery rate of the attribute claims",
    )
    head_spearman_floor: float = Field(
        0.2, ge=-1, le=1, description="warn when held-out head Spearman is below this"
    )
    trust_floor: float = Field(
        0.8,
        ge=0,
        le=1,
        description="warn when the share of claims that the labelled attributes confirm "
        "(headline claim_precision_measured) is below this",
    )
    estimator: str = Field(
        "grounded",
        description="grounded (the heads answer each probe on the evaluation images, scored by "
        "the probe's dual text direction; no labels or losses are read) or direct (the paper: "
        "the heads score the probe texts' own embeddings); see core/report/grounded.py",
    )
    dual_ridge: float = Field(
        0.1, ge=0.0, le=100.0, description="grounded: regularisation of the dual probe directions"
    )

    @field_validator("estimator")
    @classmethod
    def _estimator(cls, value: str) -> str:
        return one_of("estimator", value, ESTIMATORS)

    @field_validator("eval_split")
    @classmethod
    def _split(cls, value: str) -> str:
        return check_split("eval_split", value)

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        # Only the form here: the attribute names are the data's, known when the report reads it
        # (core/report/intersectional.validate_pairs names the pair and the dataset's attributes).
        for pair in value:
            names = pair.split(":")
            if len(names) != 2 or not all(names) or names[0] == names[1]:
                raise ValueError(
                    f"pair {pair!r} must be 'Attribute_A:Attribute_B', two different attributes"
                )
        return value


class DevicesConfig(_Strict):
    """One device per model-running asset, so a GPU can be given only where it pays."""

    black_box: DeviceSpec = DeviceSpec(batch_size=128)
    # bf16 where the hardware has it: the image tower trains 1.5-2x as fast at the same AUROC
    encoder: DeviceSpec = DeviceSpec(batch_size=128, precision="auto")
    losses: DeviceSpec = DeviceSpec(batch_size=256)
    embeddings: DeviceSpec = DeviceSpec(batch_size=256)
    heads: DeviceSpec = DeviceSpec(device="cpu", batch_size=4096)


class PipelineConfig(_Strict):
    home: str | None = Field(
        None, description="artifact root (default: $LLM2LOSS_HOME or ./.llm2loss)"
    )
    dataset: DatasetConfig = DatasetConfig()
    # The embedded default plants two failures, so that the report has something real to find
    # (configs/default.yaml spells the same values out).
    world: WorldConfig = WorldConfig(hard_attributes=DEFAULT_PLANTED_FAILURES)
    # What the black box learns (core/task.py): identity classification unless told otherwise.
    task: TaskConfig = TaskConfig()
    black_box: BlackBoxConfig = BlackBoxConfig()
    encoder: EncoderConfig = EncoderConfig()
    heads: HeadsConfig = HeadsConfig()
    report: ReportConfig = ReportConfig()
    # Failure discovery (core/discovery): candidate descriptions, matching, influence evidence.
    discovery: DiscoveryConfig = DiscoveryConfig()
    devices: DevicesConfig = DevicesConfig()


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message names the file and the key."""


def load_config(
    path: str | os.PathLike[str] | None, notices: list[str] | None = None
) -> PipelineConfig:
    """Read and validate a YAML configuration file (None gives the embedded default).

    Relative paths in the file are taken from the file's folder. Lines worth telling the user
    (an empty file, a source inferred from a path key) are appended to `notices` when given."""
    if path is None:
        return PipelineConfig()
    source = Path(path)
    raw = parse_yaml(_read_text(source), str(source))
    if raw is None:
        # An empty file is most often a mistake (a truncated copy, a wrong path); running the
        # default silently would hide it, refusing would break `touch my.yaml` workflows.
        _note(notices, f"{source} is empty: running the embedded default configuration")
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return validate_config(
        raw,
        source=str(source),
        base_dir=source.expanduser().resolve().parent,
        notices=notices,
    )


def _note(notices: list[str] | None, line: str) -> None:
    if notices is not None:
        notices.append(line)


def _read_text(source: Path) -> str:
    """The file's text, or a ConfigError naming the file (a folder, unreadable, not UTF-8)."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} is a folder, not a YAML configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{source} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "save the configuration as UTF-8"
        ) from None


class _DuplicateKey(Exception):
    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so `epochs: 2` above `epochs: 20` would run with 20 unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by explicit keys, by design
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise _DuplicateKey(key, seen[key], line)
            if isinstance(key, Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<config>") -> Any:
    """`text` parsed as safe YAML (no Python objects), refusing duplicate keys; None if empty."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{source} line {dup.second}: key {clip(repr(dup.key))} is given twice "
            f"(lines {dup.first} and {dup.second}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(clip(f"{source}{where}: not valid YAML ({exc})", 600)) from None
    finally:
        loader.dispose()


def validate_config(
    raw: dict[str, Any],
    source: str = "<config>",
    base_dir: str | os.PathLike[str] | None = None,
    notices: list[str] | None = None,
) -> PipelineConfig:
    """Validate a raw mapping; relative paths are taken from `base_dir` (default: the working
    directory).

    Types are strict: YAML already types its scalars, so `epochs: true` or `epochs: "10"` is a
    mistake to report, not a value to coerce (pydantic's lax mode would read 1 and 10)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    resolved = infer_sources(resolve_paths(raw, base), source, notices)
    # JSON mode because YAML's data model is JSON's: lists may fill tuples, ints may fill floats.
    text = json.dumps(resolved, default=str)
    try:
        return PipelineConfig.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


# ---- sources inferred from the path key given -------------------------------------------------

SOURCE_KEYS: dict[str, dict[str, str]] = {
    "dataset": {"celeba_root": "celeba", "table_path": "table"},
    "black_box": {
        "entry_point": "entry_point",
        "torchscript_path": "torchscript",
        "loss_table_path": "loss_table",
    },
}
"""Per section, the keys that only one `source` reads, and that source."""


def infer_sources(
    raw: dict[str, Any], source: str = "<config>", notices: list[str] | None = None
) -> dict[str, Any]:
    """`raw` with each section's missing `source` taken from the one source key it sets.

    A key that its section's source does not read would otherwise be ignored silently (a
    `celeba_root` with no `source` ran the generated world), so an explicit source that
    contradicts a set key, or two keys of different sources, is a ConfigError naming both."""
    out = dict(raw)
    for section, keys in SOURCE_KEYS.items():
        body = out.get(section)
        if not isinstance(body, Mapping):
            continue
        given = [key for key in keys if body.get(key) not in (None, "")]
        chosen = body.get("source")
        if chosen is None:
            if len({keys[key] for key in given}) > 1:
                first, second = given[:2]
                raise ConfigError(
                    f"{source}: {section}.{first} and {section}.{second} are both set and "
                    f"{section}.source is not; set {section}.source to {keys[first]} or "
                    f"{keys[second]}, and remove the other key"
                )
            if given:
                out[section] = {**body, "source": keys[given[0]]}
                _note(
                    notices,
                    f"{section}.source: {keys[given[0]]} (inferred from {section}.{given[0]})",
                )
            continue
        for key in given:
            if isinstance(chosen, str) and keys[key] != chosen:
                raise ConfigError(
                    f"{source}: {section}.{key} is set but {section}.source is {chosen!r}, "
                    f"which does not read it; set {section}.source: {keys[key]} or remove "
                    f"{section}.{key}"
                )
    return out


# ---- devices -----------------------------------------------------------------------------------


def device_problems(config: PipelineConfig) -> list[str]:
    """'devices.X.device: ...' for each CUDA device asked for that this machine does not have.

    Checked before a run (check-config, `llm2loss run`) because a missing GPU otherwise shows
    only when the first model step starts, after the data preparation and training before it."""
    asked = {
        name: spec.device
        for name, spec in config.devices
        if spec.device.startswith("cuda")  # "auto" falls back to the CPU by design
    }
    if not asked:
        return []
    import torch  # lazy: only when a GPU is named; torch costs check-config 2 s

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems = []
    for name, device in asked.items():
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device(s)" if count else "no CUDA device"
            problems.append(
                f"  devices.{name}.device: {device}, but torch sees {seen} on this machine; "
                "use cpu or auto"
            )
    return problems


# ---- paths ------------------------------------------------------------------------------------

MAY_NOT_EXIST = frozenset({"home", "cache_dir"})
"""Folders that the pipeline or a library creates when missing; checked only if they exist."""


def is_path_key(name: str) -> bool:
    return name == "home" or name.endswith(("_path", "_dir", "_root"))


def path_keys(model: type[BaseModel] | None = None) -> list[tuple[str, ...]]:
    """Every path-valued key of the configuration, as (section, key) or (key,) tuples."""
    model = model or PipelineConfig
    keys: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += [(name, *sub) for sub in path_keys(annotation)]
        elif is_path_key(name):
            keys.append((name,))
    return keys


def resolve_path(value: str | os.PathLike[str], base: Path) -> str:
    """`value` with `~` expanded, made absolute from `base`, normalised (symlinks followed)."""
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def resolve_paths(raw: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a raw configuration mapping with every path key resolved from `base`.

    Values that are not non-empty strings are left for validation to report.
    """
    out: dict[str, Any] = dict(raw)
    for key in path_keys():
        holder: Any = out
        for part in key[:-1]:
            section = holder.get(part) if isinstance(holder, dict) else None
            if not isinstance(section, Mapping):
                holder = None
                break
            holder[part] = holder = dict(section)
        if isinstance(holder, dict):
            value = holder.get(key[-1])
            if isinstance(value, str) and value.strip():
                holder[key[-1]] = resolve_path(value, base)
    return out


def _in_use(key: tuple[str, ...], config: PipelineConfig) -> bool:
    """Whether a run with `config` reads the path at `key` (unused paths are not checked)."""
    if key == ("dataset", "celeba_root"):
        return config.dataset.source == "celeba"
    if key in (("dataset", "table_path"), ("dataset", "image_root")):
        return config.dataset.source == "table"
    if key == ("black_box", "torchscript_path"):
        return config.black_box.source == "torchscript"
    if key == ("black_box", "loss_table_path"):
        return config.black_box.source == "loss_table"
    if key[:1] == ("black_box",) and key[-1] == "checkpoint_path":
        return config.black_box.source == "checkpoint"
    if key in (("encoder", "checkpoint_path"), ("encoder", "cache_dir")):
        return config.encoder.mode == "pretrained"
    if key == ("encoder", "text_model_dir"):
        return config.encoder.mode == "caption_tuned"
    return True


def _paths_in_use(config: PipelineConfig) -> Iterator[tuple[str, Path]]:
    for key in path_keys():
        value: Any = config
        for part in key:
            value = getattr(value, part, None)
        if value and _in_use(key, config):
            yield ".".join(key), Path(value)


def path_problems(config: PipelineConfig) -> list[str]:
    """'key: path ...' for every path a run would read that is missing or of the wrong type."""
    problems = []
    for key, path in _paths_in_use(config):
        name = key.rsplit(".", 1)[-1]
        wants_dir = not name.endswith("_path")
        if not path.exists():
            if name not in MAY_NOT_EXIST:
                kind = "folder" if wants_dir else "file"
                problems.append(f"  {key}: {path} does not exist (expected a {kind})")
        elif wants_dir and not path.is_dir():
            problems.append(f"  {key}: {path} is not a folder")
        elif not wants_dir and not path.is_file():
            problems.append(f"  {key}: {path} is not a file")
    return problems


def check_paths(config: PipelineConfig, source: str = "<config>") -> PipelineConfig:
    """`config` itself if every path it will read exists with the right type; else one
    ConfigError that names each offending key and its resolved path."""
    problems = path_problems(config)
    if problems:
        raise ConfigError("\n".join([f"{source}: paths that cannot be used", *problems]))
    return config


MAX_QUOTED = 200
"""Characters of a value quoted in one error line: a 30 MB value must not flood a terminal."""


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<top level>"
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"].endswith("_type") and not isinstance(error.get("input"), dict):
            # Strict types: say what was given, e.g. `epochs: true` or `epochs: "10"`.
            message = f"{error['msg']}, got {error['input']!r} ({_kind(error['input'])})"
        else:
            message = error["msg"]
        lines.append(clip(f"  {key}: {message}{_suggestion(error)}"))
    return "\n".join(lines)


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _suggestion(error: Mapping[str, Any]) -> str:
    """' (did you mean `n_seeds`?)' when a misspelt key or name is close to a valid one."""
    given, choices = _names_and_choices(error)
    for name in given:
        close = difflib.get_close_matches(name, [c for c in choices if c != name], n=1)
        if close:
            return f" (did you mean `{close[0]}`?)"
    return ""


def _names_and_choices(error: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The names a user gave in a failing value, and the names that would have been valid."""
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        return loc[-1:], list(model.model_fields) if model else []
    given = _strings_in(error.get("input"))
    if error["type"] == "literal_error":
        return given, re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
    if error["type"] != "value_error":
        return [], []
    quoted = [name for name in re.findall(r"'([^']*)'", error["msg"]) if name not in given]
    # The generated world's attribute names (a table dataset's are known only from its data).
    attributes = list(RULES_BY_NAME) if loc[:1] == ["world"] else []
    return given, quoted + attributes


def _strings_in(value: Any) -> list[str]:
    """Strings in a failing value: itself, its ':' parts ('A:B' pairs), a mapping's keys."""
    if isinstance(value, Mapping):
        return [name for key in value for name in _strings_in(key)]
    if isinstance(value, list | tuple):
        return [name for item in value for name in _strings_in(item)]
    if isinstance(value, str):
        return [value, *value.split(":")] if ":" in value else [value]
    return []


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        info = model.model_fields.get(part)
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
