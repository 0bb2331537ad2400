"""Where artifacts live, and how they are written so that a killed run leaves no half file.

Every write goes to a temporary name in the destination folder, is flushed to disk, then renamed
over the final name (`os.replace` is atomic on POSIX). Readers therefore see either the old file or
the new one, never a prefix. Checkpoints are a pair (`X.safetensors`, `X.json`); the sidecar is
written last and records the sha256 of the tensors, so a pair whose sidecar is missing or disagrees
is rejected as incomplete rather than loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEFAULT_HOME = ".llm2loss"


class StorageError(RuntimeError):
    """An artifact is missing, incomplete or does not match what the caller expects."""


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The artifact root: `home`, else `$LLM2LOSS_HOME`, else `./.llm2loss`, made absolute."""
    raw = home if home is not None else os.environ.get("LLM2LOSS_HOME", DEFAULT_HOME)
    return Path(raw).expanduser().resolve()


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` and prove it is writable, with an error that names it if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"{path} is not a writable directory ({exc.strerror or exc}); "
            "set LLM2LOSS_HOME to a folder you can write"
        ) from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`: on success it replaces `path`, on error it goes."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the final file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df: Any, path: str | os.PathLike[str]) -> Path:
    """Write a polars DataFrame as Parquet, atomically and byte-reproducibly."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=True)
    return Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(weights: str | os.PathLike[str]) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(
    weights_path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Save torch tensors as safetensors plus a JSON sidecar; return the sidecar (with `sha256`).

    The sidecar is written after the weights, so its presence with a matching hash marks a
    complete checkpoint.
    """
    from safetensors.torch import save as save_tensors

    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    blob = save_tensors(contiguous)
    write_bytes_atomic(weights_path, blob)
    sidecar = {**meta, "sha256": sha256_bytes(blob), "weights_file": Path(weights_path).name}
    write_json_atomic(sidecar_path(weights_path), sidecar)
    return sidecar


def read_sidecar(weights_path: str | os.PathLike[str]) -> dict[str, Any]:
    side = sidecar_path(weights_path)
    if not side.exists():
        raise StorageError(f"{side} is missing: the checkpoint {weights_path} is incomplete")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise StorageError(f"{side} line {exc.lineno}: not valid JSON ({exc.msg})") from exc


def load_checkpoint(
    weights_path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint`, verifying its sha256 against the sidecar."""
    from safetensors.torch import load as load_tensors

    weights = Path(weights_path)
    if not weights.exists():
        raise StorageError(f"{weights} does not exist")
    meta = read_sidecar(weights)
    blob = weights.read_bytes()
    actual = sha256_bytes(blob)
    if meta.get("sha256") != actual:
        raise StorageError(
            f"{weights}: sha256 {actual[:12]} does not match its sidecar "
            f"({str(meta.get('sha256'))[:12]}); the checkpoint is incomplete or was modified"
        )
    tensors = load_tensors(blob)
    if device != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return tensors, meta
