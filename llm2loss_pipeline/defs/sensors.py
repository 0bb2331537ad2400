"""Sensors: a new model version in a registry folder, and the declarative automation that follows.

The model registry sensor watches one folder of checkpoints (`$LLM2LOSS_MODEL_REGISTRY`). A file
whose bytes were never seen before is a new version of the black box: the sensor requests a run of
`black_box_model` alone, pointed at that file. Everything downstream follows through the eager
automation conditions (defs/automation.py) evaluated by `llm2loss_automation`: the losses of every
shard, then the heads and the report. The embeddings do not depend on the black box, so they stay.

A version is its content (sha256), not its name or mtime: copying the same file under a new name,
or touching it, requests nothing; size and mtime are only a cheap pre-check that spares re-hashing
unchanged multi-GB files on every tick. The version is the run key too, so Dagster itself never
launches the same version twice from this sensor, even if its cursor is reset.

No file dropped here may run code: the sensor itself only hashes files, and the runs it requests
load `.pt` files with `torch.jit.load` only (TorchScript's own unpickler, which builds no Python
objects) and `.safetensors` without pickle. torch.export programs (`.pt2`) are refused and
reported, never requested: loading one unpickles parts of the file (core/blackbox/user_model.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from llm2loss_pipeline.core.blackbox.config import BlackBoxConfig
from llm2loss_pipeline.core.blackbox.user_model import refused_exported_program
from llm2loss_pipeline.core.storage import sha256_file
from llm2loss_pipeline.defs.models.assets import black_box_model

REGISTRY_ENV = "LLM2LOSS_MODEL_REGISTRY"
MODEL_REGISTRY_SENSOR = "model_registry_sensor"
AUTOMATION_SENSOR = "llm2loss_automation"

MODEL_VERSION_TAG = "llm2loss/model_version"
MODEL_SHA256_TAG = "llm2loss/model_sha256"
MODEL_FILE_TAG = "llm2loss/model_file"
TRIGGER_TAG = "llm2loss/trigger"

TORCHSCRIPT_SUFFIXES = (".pt",)
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (*TORCHSCRIPT_SUFFIXES, SAFETENSORS_SUFFIX)
REFUSED_SUFFIXES = (".pt2",)
"""torch.export programs: listed so that the sensor can say why it ignores them."""
CURSOR_FORMAT = 1
MAX_REMEMBERED_VERSIONS = 1000


def black_box_run_config(path: Path, black_box: BlackBoxConfig) -> dict[str, Any]:
    """The run config that points the `black_box` resource at one checkpoint file.

    It carries every black-box setting, not only the changed ones: run config replaces a
    resource's configured values as a whole, so a partial one would silently reset the label map,
    image size or task loss to their class defaults.
    """
    suffix = path.suffix.lower()
    if suffix in TORCHSCRIPT_SUFFIXES:
        pointer = {"source": "torchscript", "torchscript_path": str(path)}
    elif suffix in REFUSED_SUFFIXES:
        raise ValueError(refused_exported_program(path))
    else:
        raise ValueError(
            f"{path}: no black_box source loads a {suffix or 'suffix-less'} file; "
            f"the registry takes {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    settings = BlackBoxConfig.model_validate({**black_box.model_dump(), **pointer})
    values = {k: v for k, v in settings.model_dump(mode="json").items() if v is not None}
    return {"resources": {"black_box": {"config": values}}}


@dataclass
class _FileState:
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class RegistryCursor:
    """What the sensor has seen: per file its size, mtime and content hash; versions handled."""

    files: dict[str, _FileState] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: str | None) -> RegistryCursor:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            if data.get("format") != CURSOR_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CURSOR_FORMAT}")
            files = {
                name: _FileState(int(s["size"]), int(s["mtime_ns"]), str(s["sha256"]))
                for name, s in data["files"].items()
            }
            return cls(files, [str(sha) for sha in data["versions"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{MODEL_REGISTRY_SENSOR}: unreadable cursor ({exc}); reset it in the UI "
                "(Sensors > model_registry_sensor > Set cursor value: empty)"
            ) from exc

    def dump(self) -> str:
        return json.dumps(
            {
                "format": CURSOR_FORMAT,
                "files": {
                    name: {"size": s.size, "mtime_ns": s.mtime_ns, "sha256": s.sha256}
                    for name, s in sorted(self.files.items())
                },
                "versions": self.versions[-MAX_REMEMBERED_VERSIONS:],
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class ModelVersion:
    path: Path
    sha256: str
    mtime_ns: int

    @property
    def short(self) -> str:
        return self.sha256[:12]


def registry_from_env() -> Path | None:
    value = os.environ.get(REGISTRY_ENV, "").strip()
    return Path(value).expanduser() if value else None


def registry_files(directory: Path) -> list[Path]:
    """Checkpoint files under `directory`, in a fixed order.

    Hidden names are skipped: atomic writers (core/storage.py, rsync, most copy tools) write to a
    hidden temporary name and rename, so a half-written file is never taken for a version.
    """
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        wanted = (*CHECKPOINT_SUFFIXES, *REFUSED_SUFFIXES)
        if path.suffix.lower() in wanted and path.is_file():
            found.append(path)
    return found


def scan_registry(
    directory: Path, cursor: RegistryCursor, *, settle_seconds: float, now: float | None = None
) -> tuple[list[ModelVersion], list[Path], list[Path]]:
    """Update `cursor` from the folder; return (new versions, unsupported files, settling files).

    A file modified less than `settle_seconds` ago may still be being copied: it is left for a
    later tick and not recorded, so it is hashed once it is complete.
    """
    now = time.time() if now is None else now
    seen_versions = set(cursor.versions)
    new: list[ModelVersion] = []
    unsupported: list[Path] = []
    settling: list[Path] = []
    present: set[str] = set()
    for path in registry_files(directory):
        suffix = path.suffix.lower()
        # no black_box source loads a bare weights file: reported, never requested
        if suffix in REFUSED_SUFFIXES or suffix == SAFETENSORS_SUFFIX:
            unsupported.append(path)
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed between the listing and now
            continue
        key = str(path.resolve())
        present.add(key)
        known = cursor.files.get(key)
        if known and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            continue
        if now - stat.st_mtime_ns / 1e9 < settle_seconds:
            settling.append(path)
            continue
        digest = sha256_file(path)
        cursor.files[key] = _FileState(stat.st_size, stat.st_mtime_ns, digest)
        if digest not in seen_versions:
            seen_versions.add(digest)
            # Absolute: the run may start in another working directory than this sensor.
            new.append(ModelVersion(path.absolute(), digest, stat.st_mtime_ns))
    cursor.files = {key: state for key, state in cursor.files.items() if key in present}
    return new, unsupported, settling


def model_version_run_request(version: ModelVersion, black_box: BlackBoxConfig) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=version.sha256,
        asset_selection=[black_box_model.key],
        run_config=black_box_run_config(version.path, black_box),
        tags={
            MODEL_VERSION_TAG: version.short,
            MODEL_SHA256_TAG: version.sha256,
            MODEL_FILE_TAG: version.path.name,
            TRIGGER_TAG: MODEL_REGISTRY_SENSOR,
        },
    )


def build_model_registry_sensor(
    directory: str | os.PathLike[str] | None = None,
    *,
    black_box: BlackBoxConfig | None = None,
    name: str = MODEL_REGISTRY_SENSOR,
    minimum_interval_seconds: int = 30,
    settle_seconds: float = 10.0,
) -> dg.SensorDefinition:
    """The registry sensor for `directory`, or for $LLM2LOSS_MODEL_REGISTRY read at each tick.

    `black_box` holds the deployment's other black-box settings (label map, image size, task
    loss), which every requested run keeps.

    It starts running by default only when a registry is named (argument or environment at load
    time); otherwise it is stopped, and a tick started by hand skips with a message saying what to
    set.
    """
    fixed = Path(directory).expanduser() if directory is not None else None
    settings = black_box or BlackBoxConfig()
    named = fixed is not None or registry_from_env() is not None

    @dg.sensor(
        name=name,
        target=[black_box_model],
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if named else dg.DefaultSensorStatus.STOPPED
        ),
        description=(
            f"Watches the model registry folder (${REGISTRY_ENV}) for new TorchScript (.pt) "
            "or safetensors checkpoints; each new content hash materializes black_box_model from "
            "that file, and the eager automation recomputes losses, heads and report. "
            "torch.export (.pt2) files are refused: loading one can run code from it."
        ),
    )
    def model_registry(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        registry = fixed or registry_from_env()
        if registry is None:
            return dg.SkipReason(
                f"no model registry: set {REGISTRY_ENV} to a folder of checkpoints "
                f"({', '.join(CHECKPOINT_SUFFIXES)}) in the code location's environment"
            )
        if not registry.is_dir():
            return dg.SkipReason(f"model registry {registry} is not a folder (${REGISTRY_ENV})")
        cursor = RegistryCursor.parse(context.cursor)
        new, unsupported, settling = scan_registry(registry, cursor, settle_seconds=settle_seconds)
        notes = _notes(unsupported, settling)
        if not new:
            context.update_cursor(cursor.dump())
            if not cursor.files and not settling:
                return dg.SkipReason(
                    f"no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) in {registry}{notes}"
                )
            return dg.SkipReason(f"no new model version in {registry}{notes}")
        # Several new versions in one tick: only the newest is worth computing; the others are
        # remembered as seen so that they are not requested later either.
        new.sort(key=lambda version: (version.mtime_ns, version.path.name))
        *superseded, newest = new
        for version in superseded:
            context.log.info(
                f"{version.path.name} ({version.short}) superseded by {newest.path.name} "
                f"({newest.short}) in the same tick: not requested"
            )
        cursor.versions.extend(version.sha256 for version in new)
        context.log.info(f"new model version {newest.short}: {newest.path}{notes}")
        return dg.SensorResult(
            run_requests=[model_version_run_request(newest, settings)], cursor=cursor.dump()
        )

    return model_registry


def _notes(unsupported: Iterable[Path], settling: Iterable[Path]) -> str:
    notes = []
    settling = list(settling)
    exported = [path for path in unsupported if path.suffix.lower() in REFUSED_SUFFIXES]
    weights = [path for path in unsupported if path.suffix.lower() == SAFETENSORS_SUFFIX]
    if exported:
        notes.append(
            f"; refused {len(exported)} torch.export file(s) ({exported[0].name}, ...): loading "
            "one can run code from it; save the model with torch.jit.save (.pt) instead"
        )
    if weights:
        notes.append(
            f"; ignored {len(weights)} .safetensors file(s) ({weights[0].name}, ...): "
            "black_box has no 'checkpoint' source in this version"
        )
    if settling:
        notes.append(f"; waiting for {len(settling)} file(s) still being written")
    return "".join(notes)


def build_automation_sensor(
    *, minimum_interval_seconds: int = 30
) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the eager conditions of defs/automation.py; running by default.

    Without it Dagster adds `default_automation_condition_sensor`, which starts *stopped*, so a
    retrained model would not propagate until someone switched it on in the UI.
    """
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=minimum_interval_seconds,
        description=(
            "Declarative automation: after a new black box, the losses of every shard, then heads "
            "and report; after a new encoder, the embeddings, heads and report."
        ),
    )


def build_sensors(black_box: BlackBoxConfig | None = None) -> list[dg.SensorDefinition]:
    return [build_model_registry_sensor(black_box=black_box), build_automation_sensor()]
