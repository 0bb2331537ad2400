"""Saving and loading an encoder as a folder that plain open_clip loads.

The folder follows open_clip's `local-dir:` schema (open_clip >= 2.31, see its factory.py):

    open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors    the full state dict (both towers), safetensors only
    config.json, tokenizer*.json,  caption_tuned only: the sentence model's Hugging Face config and
    vocab.txt, ...                 tokenizer files, so the folder is its own text-tower source
    encoder.json                   our sidecar: mode, config, embed_dim, sha256 of the weights,
                                   sha256 of every file ("files"), tokenizer reference,
                                   the loading snippet, metrics

Plain open_clip loads it with (the snippet is also written into encoder.json):

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/encoder")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/encoder")

For caption_tuned encoders `open_clip_config.json` names the folder itself as the Hugging Face
text model (open_clip needs an absolute path there); after moving the folder, plain open_clip
needs `text_cfg=` pointing at the new place, which `load_encoder` does for you.

The folder is written under a temporary name beside `out_dir` and renamed into place, so a killed
save leaves no half checkpoint; `encoder.json` (with the sha256 of every file) is written last
inside it, and `load_encoder` refuses a folder whose files are missing or do not match it. The
encoder's identity (`Encoder.sha256`, `encoder.json`'s "sha256") is the weights' hash alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.encoder.factory import Encoder, quiet_transformers
from llm2loss_pipeline.core.storage import StorageError, existing_dir, replace_dir, sha256_file

WEIGHTS_FILE = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
SIDECAR = "encoder.json"
FORMAT_VERSION = 1

# Hugging Face files a text tower needs to be rebuilt from config (weights come from our file)
_HF_TEXT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def loading_snippet(out_dir: Path) -> str:
    return (
        "import open_clip\n"
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_dir}")\n'
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out_dir}")\n'
        "model.eval()"
    )


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, contiguous and unshared (safetensors refuses aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in encoder.model.state_dict().items():
        key = tensor.data_ptr()
        value = tensor.detach().cpu().contiguous()
        tensors[name] = value.clone() if key in seen and tensor.numel() else value
        seen.setdefault(key, name)
    return tensors


def save_encoder(encoder: Encoder, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write `encoder` to `out_dir` atomically; return the sidecar (also in `out_dir/encoder.json`)
    and set `encoder.sha256`."""
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    import open_clip

    final = Path(out_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        model_cfg = copy.deepcopy(encoder.model_cfg)
        tokenizer_ref: dict[str, Any]
        if encoder.config.mode == "caption_tuned":
            source = encoder.text_model_dir
            if source is None:
                raise StorageError("a caption_tuned encoder without its text model folder")
            for name in _HF_TEXT_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, staging / name)
            model_cfg["text_cfg"]["hf_model_name"] = str(final)
            model_cfg["text_cfg"]["hf_tokenizer_name"] = str(final)
            tokenizer_ref = {
                "kind": "HFTokenizer",
                "source": "this folder",
                "context_length": int(encoder.tokenizer.context_length),
            }
        else:
            tokenizer_ref = {
                "kind": type(encoder.tokenizer).__name__,
                "open_clip_name": encoder.config.model_name,
                "context_length": int(getattr(encoder.tokenizer, "context_length", 0) or 0),
            }
        weights = staging / WEIGHTS_FILE
        save_file(_state_dict(encoder), str(weights), metadata={"format": "pt"})
        _fsync(weights)
        digest = sha256_file(weights)
        _write_json(
            staging / OPEN_CLIP_CONFIG,
            {"model_cfg": model_cfg, "preprocess_cfg": dict(encoder.preprocess_cfg)},
        )
        # every file, not just the weights: a damaged tokenizer gives confidently wrong answers
        files = {
            path.name: digest if path.name == WEIGHTS_FILE else sha256_file(path)
            for path in sorted(staging.iterdir())
            if path.is_file()
        }
        sidecar = {
            "format_version": FORMAT_VERSION,
            "mode": encoder.config.mode,
            "config": encoder.config.model_dump(mode="json"),
            "embed_dim": encoder.embed_dim,
            "weights_file": WEIGHTS_FILE,
            "sha256": digest,
            "files": files,
            "tokenizer": tokenizer_ref,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            "load_with_open_clip": loading_snippet(final),
            "load_with_llm2loss": (
                "from llm2loss_pipeline.core.encoder import load_encoder\n"
                f'encoder = load_encoder("{final}")'
            ),
            "metrics": encoder.metrics,
        }
        _write_json(staging / SIDECAR, sidecar)  # last: its presence marks a complete folder
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    encoder.sha256 = digest
    return sidecar


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_encoder_sidecar(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    folder = existing_dir(Path(out_dir).expanduser().resolve())
    if not folder.is_dir():
        raise StorageError(f"{folder}: no encoder folder there")
    sidecar_path = folder / SIDECAR
    if not sidecar_path.is_file():
        raise StorageError(f"{sidecar_path} is missing: the encoder folder {folder} is incomplete")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{sidecar_path} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    for key in ("mode", "config", "sha256", "weights_file"):
        if key not in sidecar:
            raise StorageError(f"{sidecar_path}: key {key!r} is missing")
    return sidecar


def _verify_files(folder: Path, sidecar: dict[str, Any], weights_sha256: str) -> None:
    """Check every file the sidecar lists; files it does not list are ignored. A sidecar written
    before the "files" map existed has none, and only its weights are checked (by the caller)."""
    files = sidecar.get("files")
    if files is None:
        warnings.warn(
            f"the encoder folder {folder} predates per-file hashes: only its weights are "
            "verified, not its tokenizer; rematerialize the encoder (llm2loss run) to protect them",
            stacklevel=3,
        )
        return
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise StorageError(f"{folder / SIDECAR}: 'files' is not a map of file name to sha256")
    for name, expected in sorted(files.items()):
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"{folder / SIDECAR}: file {name!r} is outside the encoder folder")
        path = folder / relative
        if not path.is_file():
            raise StorageError(
                f"{path} is missing: the encoder folder {folder} is incomplete or was modified"
            )
        # the weights were hashed already; they are large
        actual = weights_sha256 if name == sidecar["weights_file"] else sha256_file(path)
        if actual != expected:
            raise StorageError(
                f"{path}: sha256 {actual[:12]} does not match {SIDECAR} "
                f"({expected[:12]}); the encoder folder is incomplete or was modified"
            )


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise StorageError(
            f"{path}{where}: not valid JSON ({exc}); the encoder folder is damaged"
        ) from exc


def load_encoder(out_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Encoder:
    """Load a folder written by `save_encoder`, after checking the sha256 of its files.

    Raises StorageError when the folder is missing, incomplete or any listed file was modified.
    The model is built by open_clip from the folder (`local-dir:` schema), as a user would.
    """
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    folder = existing_dir(Path(out_dir).expanduser().resolve())
    sidecar = read_encoder_sidecar(folder)
    weights = folder / sidecar["weights_file"]
    if not weights.is_file():
        raise StorageError(f"{weights} is missing: the encoder folder {folder} is incomplete")
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise StorageError(
            f"{folder / OPEN_CLIP_CONFIG} is missing: the encoder folder is incomplete"
        )
    actual = sha256_file(weights)
    if actual != sidecar["sha256"]:
        raise StorageError(
            f"{weights}: sha256 {actual[:12]} does not match {SIDECAR} "
            f"({str(sidecar['sha256'])[:12]}); the encoder is incomplete or was modified"
        )
    _verify_files(folder, sidecar, actual)
    try:
        config = EncoderConfig.model_validate(sidecar["config"])
    except ValueError as exc:
        raise StorageError(f"{folder / SIDECAR}: invalid encoder config ({exc})") from exc
    open_clip_config = _read_json_file(folder / OPEN_CLIP_CONFIG)
    if not isinstance(open_clip_config, dict) or not isinstance(
        open_clip_config.get("model_cfg"), dict
    ):
        raise StorageError(f"{folder / OPEN_CLIP_CONFIG}: no 'model_cfg' object in it")
    model_cfg = open_clip_config["model_cfg"]
    if config.mode == "caption_tuned":
        # parse here so that a broken file is named (old sidecars list no hashes to catch it)
        for name in _HF_TEXT_FILES:
            if name.endswith(".json") and (folder / name).is_file():
                _read_json_file(folder / name)
    torch_device = torch.device(device)
    overrides: dict[str, Any] = {}
    if config.mode == "caption_tuned":
        # the folder is its own text-model source, wherever it has been moved to
        text_cfg = {**model_cfg["text_cfg"], "hf_model_name": str(folder)}
        text_cfg.update(hf_tokenizer_name=str(folder), hf_model_pretrained=False)
        overrides["text_cfg"] = text_cfg
    with quiet_transformers():
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                f"local-dir:{folder}", device=torch_device, **overrides
            )
            if config.mode == "caption_tuned":
                tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        except (OSError, ValueError, KeyError) as exc:
            # a bare parse error from open_clip / transformers names no file
            raise StorageError(
                f"{folder}: could not build the encoder from the folder's files "
                f"({type(exc).__name__}: {exc}); the encoder folder may be damaged"
            ) from exc
        if config.mode != "caption_tuned":
            tokenizer = open_clip.get_tokenizer(config.model_name, cache_dir=config.cache_dir)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.mode == "caption_tuned":
        model_cfg = {**model_cfg, "text_cfg": overrides["text_cfg"]}
    encoder = Encoder(
        model,
        preprocess,
        tokenizer,
        config,
        model_cfg,
        dict(get_model_preprocess_cfg(model)),
        torch_device,
        sha256=actual,
        text_model_dir=folder if config.mode == "caption_tuned" else None,
    )
    encoder.metrics = dict(sidecar.get("metrics") or {})
    return encoder
