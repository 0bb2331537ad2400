"""Saving and loading the head ensemble: one safetensors file per member, and an index written last.

Folder layout (`heads_dir`):

    member-00-regressor-linear-s0.safetensors   one member in torch state-dict naming (ensemble.py)
    member-00-regressor-linear-s0.json          its sidecar: kind, arch, seed, target scaling and
                                                its statistics, standardisation, embedding dim,
                                                encoder sha256, metrics, config, weights' sha256
    ...
    gap.safetensors / gap.json                  the modality-gap means and mode
    ensemble.json                               the index: every file and its sha256; written last

The whole folder is first written under a temporary name beside `heads_dir` and then renamed into
place (`storage.replace_dir`), so a killed save leaves the previous complete ensemble (and a stray
temporary folder that a later save removes once it is an hour old). A folder without
`ensemble.json`, or whose files (weights and sidecars alike) disagree with it, is rejected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm2loss_pipeline.core.heads.config import ARCHS, KINDS, HeadsConfig
from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble, MemberInfo
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.heads.scaling import TargetScaler
from llm2loss_pipeline.core.storage import (
    StorageError,
    existing_dir,
    load_checkpoint,
    replace_dir,
    save_checkpoint,
    sha256_file,
    sidecar_path,
    write_json_atomic,
)

INDEX = "ensemble.json"
GAP_FILE = "gap.safetensors"
FORMAT = "llm2loss-heads/1"
STALE_AFTER_S = 3600.0
PER_MEMBER_TRAINING = ("best_epoch", "holdout_spearman")
REMEDY = "rematerialize diagnosis_heads: llm2loss run"


class HeadMismatchError(ValueError):
    """The saved heads were trained on a different encoder than the one in use."""


def _short(sha: str) -> str:
    return str(sha)[:12]


def save_ensemble(
    ensemble: HeadEnsemble,
    gap: ModalityGap,
    out_dir: str | os.PathLike[str],
    *,
    embedding_dim: int,
    encoder_sha256: str,
    extra_meta: dict[str, Any] | None = None,
    metrics: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Write the ensemble and gap to `out_dir` atomically; return the member sidecars in order.

    `metrics` (optional) is one dict per member, e.g. `evaluate_members(...)`, stored in that
    member's sidecar; `extra_meta` goes into every sidecar and the index (splits, data hashes, ...).
    """
    if embedding_dim != ensemble.embedding_dim or gap.dim != embedding_dim:
        raise ValueError(
            f"embedding_dim {embedding_dim} disagrees with the ensemble ({ensemble.embedding_dim}) "
            f"or the modality gap ({gap.dim})"
        )
    if metrics is not None and len(metrics) != len(ensemble):
        raise ValueError(f"{len(metrics)} metric records for {len(ensemble)} members")
    extra = dict(extra_meta or {})
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        common = {
            "format": FORMAT,
            "embedding_dim": int(embedding_dim),
            "encoder_sha256": str(encoder_sha256),
            "target_scaling": ensemble.scaler.to_dict(),
            "config": ensemble.config.model_dump(),
            "extra": extra,
        }
        sidecars: list[dict[str, Any]] = []
        for member in ensemble.members:
            meta = _member_sidecar(ensemble, member, common, metrics)
            path = staging / f"{member.name}.safetensors"
            sidecars.append(save_checkpoint(path, ensemble.member_tensors(member.index), meta))
        gap_side = save_checkpoint(staging / GAP_FILE, gap.tensors(), {**common, **gap.meta()})
        index = {
            **common,
            "n_members": len(ensemble),
            "training": {
                key: value
                for key, value in ensemble.training.items()
                if key not in PER_MEMBER_TRAINING
            },
            # The sidecars' own hashes too: what a sidecar says (kind, arch, standardisation) shapes
            # every answer, and the weights' hash does not cover it.
            "members": [
                {
                    **m.to_dict(),
                    "file": side["weights_file"],
                    "sha256": side["sha256"],
                    "sidecar_sha256": sha256_file(sidecar_path(staging / side["weights_file"])),
                }
                for m, side in zip(ensemble.members, sidecars, strict=True)
            ],
            "gap": {"file": GAP_FILE, "sha256": gap_side["sha256"], **gap.meta()},
        }
        write_json_atomic(staging / INDEX, index)
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sidecars


def _member_sidecar(
    ensemble: HeadEnsemble,
    member: MemberInfo,
    common: dict[str, Any],
    metrics: Sequence[dict[str, Any]] | None,
) -> dict[str, Any]:
    """What one member's sidecar says besides its weights."""
    return {
        **common,
        **member.to_dict(),
        "hidden": ensemble.config.hidden if member.arch == "mlp" else None,
        "standardization": {
            "mean": float(ensemble.out_mean[member.index]),
            "std": float(ensemble.out_std[member.index]),
        },
        "metrics": dict(metrics[member.index]) if metrics is not None else {},
        "training": {
            key: ensemble.training[key][member.index]
            for key in PER_MEMBER_TRAINING
            if key in ensemble.training
        },
    }


def _remove_stale_staging(final: Path) -> None:
    """Temporary folders left by a killed save; young ones may belong to a save in progress."""
    now = time.time()
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(stale, ignore_errors=True)


def read_index(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(out_dir)
    index_path = folder / INDEX
    if not folder.is_dir():
        raise StorageError(f"{folder}: no diagnosis heads saved here")
    if not index_path.exists():
        raise StorageError(
            f"{index_path} is missing: the heads in {folder} are incomplete (a save did not finish)"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise StorageError(f"{index_path} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StorageError(f"{index_path}: not a head-ensemble index of format {FORMAT}")
    return index


def check_compatible(
    index: dict[str, Any], folder: Path, *, expected_dim: int, expected_encoder_sha256: str
) -> None:
    dim, sha = index.get("embedding_dim"), str(index.get("encoder_sha256"))
    if dim != expected_dim or sha != expected_encoder_sha256:
        raise HeadMismatchError(
            f"the heads in {folder} were trained on encoder {_short(sha)} (dim {dim}) but the "
            f"encoder in use is {_short(expected_encoder_sha256)} (dim {expected_dim}); {REMEDY}"
        )


def load_ensemble(
    out_dir: str | os.PathLike[str], *, expected_dim: int, expected_encoder_sha256: str
) -> tuple[HeadEnsemble, ModalityGap, dict[str, Any]]:
    """Load a saved ensemble: HeadMismatchError for another encoder, StorageError if broken."""
    folder = existing_dir(out_dir)
    index = read_index(folder)
    check_compatible(
        index, folder, expected_dim=expected_dim, expected_encoder_sha256=expected_encoder_sha256
    )
    try:
        config = HeadsConfig.model_validate(index["config"])
        scaler = TargetScaler.from_dict(index["target_scaling"])
        entries = index["members"]
        gap_entry = index["gap"]
    except (KeyError, ValueError) as exc:
        raise StorageError(f"{folder / INDEX}: malformed index ({exc})") from exc

    if not isinstance(entries, list) or not isinstance(gap_entry, dict):
        raise StorageError(f"{folder / INDEX}: malformed index ('members' or 'gap' of wrong type)")
    members: list[MemberInfo] = []
    tensors: list[dict[str, torch.Tensor]] = []
    means, stds = [], []
    training: dict[str, Any] = dict(index.get("training") or {})
    per_member: dict[str, list[Any]] = {}
    for position, entry in enumerate(entries):
        path = _listed_file(folder, entry, f"members[{position}]")
        weights, meta = load_checkpoint(path)
        _check_listed(folder, path, meta, entry)
        member, mean, std = _member_from_sidecar(path, meta, position, index)
        members.append(member)
        tensors.append(weights)
        means.append(mean)
        stds.append(std)
        record = meta.get("training") or {}
        if not isinstance(record, dict) or (position and record.keys() != per_member.keys()):
            raise StorageError(
                f"{sidecar_path(path)}: 'training' holds {sorted(record)}, the first member's "
                f"{sorted(per_member)}"
            )
        for key, value in record.items():
            per_member.setdefault(key, []).append(value)
    if len(members) != index.get("n_members"):
        raise StorageError(
            f"{folder / INDEX}: lists {len(members)} of {index.get('n_members')} members"
        )
    training.update(per_member)

    ensemble = HeadEnsemble(
        members,
        _stacked(folder, members, tensors),
        np.array(means),
        np.array(stds),
        scaler,
        config,
        expected_dim,
        training=training,
    )

    gap_path = _listed_file(folder, {"file": GAP_FILE, **gap_entry}, "gap")
    gap_tensors, gap_meta = load_checkpoint(gap_path)
    if gap_meta.get("sha256") != gap_entry.get("sha256"):
        raise StorageError(f"{gap_path}: sha256 differs from {folder / INDEX}; the folder is mixed")
    try:
        gap = ModalityGap(
            image_mean=gap_tensors["image_mean"].numpy(),
            text_mean=gap_tensors["text_mean"].numpy(),
            mode=str(gap_meta["mode"]),
        )
    except (KeyError, ValueError) as exc:
        raise StorageError(f"{gap_path}: malformed modality gap ({exc})") from exc
    if gap.dim != expected_dim:
        raise StorageError(f"{gap_path}: dimension {gap.dim}, expected {expected_dim}")
    return ensemble, gap, index


def _check_listed(folder: Path, path: Path, meta: dict[str, Any], entry: dict[str, Any]) -> None:
    """A member's weights and sidecar are the ones the index lists (same sha256)."""
    if meta.get("sha256") != entry.get("sha256"):
        raise StorageError(f"{path}: sha256 differs from {folder / INDEX}; the folder is mixed")
    if not _sidecar_matches(path, entry):
        raise StorageError(
            f"{sidecar_path(path)}: sha256 differs from {folder / INDEX}; the sidecar was "
            "modified or the folder is mixed"
        )


def _stacked(
    folder: Path, members: list[MemberInfo], tensors: list[dict[str, torch.Tensor]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The members' tensors stacked per architecture, as the ensemble holds them."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    for arch in ARCHS:
        of_arch = [t for m, t in zip(members, tensors, strict=True) if m.arch == arch]
        if of_arch:
            try:
                params[arch] = HeadEnsemble.stack_member_tensors(arch, of_arch)
            except (KeyError, IndexError, RuntimeError) as exc:
                raise StorageError(
                    f"{folder}: {arch} member tensors are malformed ({exc})"
                ) from exc
    return params


def _listed_file(folder: Path, entry: Any, where: str) -> Path:
    """The file an index entry names, which must be a plain name inside `folder`."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise StorageError(
            f"{folder / INDEX}: {where} names file {name!r}; entries must be file names in {folder}"
        )
    return folder / name


def _sidecar_matches(weights: Path, entry: dict[str, Any]) -> bool:
    # Indexes written before sidecars were hashed have no such field; their sidecars are still
    # checked field by field below.
    expected = entry.get("sidecar_sha256")
    return expected is None or sha256_file(sidecar_path(weights)) == expected


def _member_from_sidecar(
    weights: Path, meta: dict[str, Any], position: int, index: dict[str, Any]
) -> tuple[MemberInfo, float, float]:
    """The member a sidecar describes and its standardisation (mean, std), each field checked:
    a sidecar that named an unknown architecture used to load and answer with uninitialised
    memory, and a zero std with inf."""
    side = sidecar_path(weights)

    def bad(what: str) -> StorageError:
        return StorageError(f"{side}: {what}; {REMEDY}")

    kind, arch, seed = meta.get("kind"), meta.get("arch"), meta.get("seed")
    if kind not in KINDS:
        raise bad(f"kind {kind!r} is not one of {list(KINDS)}")
    if arch not in ARCHS:
        raise bad(f"arch {arch!r} is not one of {list(ARCHS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise bad(f"seed {seed!r} is not a non-negative integer")
    for key in ("index", "embedding_dim", "encoder_sha256"):
        expected = position if key == "index" else index.get(key)
        if meta.get(key) != expected:
            raise bad(f"{key} {meta.get(key)!r} disagrees with {INDEX} ({expected!r})")
    stats = meta.get("standardization")
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"standardization {stats!r} is malformed") from exc
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0.0):
        raise bad(f"standardization mean {mean} / std {std} must be finite with std > 0")
    return MemberInfo(position, kind, arch, seed), mean, std
