"""Where artifacts live, and how they are written so that a killed run leaves no half file.

Every write goes to a temporary name in the destination folder, is flushed to disk, then renamed
over the final name (`os.replace` is atomic on POSIX). Readers therefore see either the old file or
the new one, never a prefix. Checkpoints are a pair (`X.safetensors`, `X.json`); the sidecar is
written last and records the sha256 of the tensors, so a pair whose sidecar is missing or disagrees
is rejected as incomplete rather than loaded.

A writer killed before its rename leaves its temporary file behind. Temporary names are hidden
(`.NAME.PID@HOST@RANDOM.tmp`), so no reader (exact shard names, `*.parquet` globs, sensors) ever
takes one for output, and the next atomic write to the same target sweeps those of dead writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HOME = ".llm2loss"
STALE_TEMP_AFTER_S = 3600.0
"""A temporary file this old (no write for an hour) is swept even when its writer cannot be
proven dead: it may come from another host sharing the folder, whose process ids mean nothing
here. Large writes keep touching their file, so a live writer's file never gets this old."""


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
    sweep_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(
        dir=final.parent, prefix=f".{final.name}.{os.getpid()}@{_host()}@", suffix=".tmp"
    )
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


def _host() -> str:
    # '@' separates the fields of a temporary name, '/' cannot be in a file name
    return socket.gethostname().replace("@", "_").replace("/", "_") or "localhost"


def sweep_stale_temps(
    final: str | os.PathLike[str], older_than_s: float = STALE_TEMP_AFTER_S
) -> list[Path]:
    """Remove the temporary files that killed writers of `final` left; return what was removed.

    A temporary file of a process that still runs on this host is kept whatever its age: it may
    be a concurrent writer of the same target about to rename it into place (two runs
    materializing one shard at once). Others go when their writer is dead on this host, or
    when untouched for `older_than_s` (writers on other hosts, names without a process id).
    """
    target = Path(final)
    prefix, host, now = f".{target.name}.", _host(), time.time()
    removed: list[Path] = []
    try:
        candidates = [
            entry
            for entry in target.parent.iterdir()
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp")
        ]
    except OSError:
        return removed
    for entry in candidates:
        fields = entry.name[len(prefix) : -len(".tmp")].split("@")
        pid = int(fields[0]) if len(fields) == 3 and fields[0].isdigit() else None
        local = pid is not None and fields[1] == host
        try:
            if not entry.is_file() or entry.is_symlink():
                continue
            if local and pid is not None and _alive(pid):
                continue
            if not local and now - entry.stat().st_mtime <= older_than_s:
                continue
            entry.unlink()
        except OSError:  # another sweeper got there first, or it was renamed into place
            continue
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    # a killed child that its parent has not reaped yet still answers kill(pid, 0)
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    return True


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


ASIDE = ".aside-"


def replace_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move the finished folder `staging` to `final`, replacing any folder there.

    One rename cannot swap two folders, so an old `final` is first renamed aside
    (`.NAME.aside-PID@HOST-RANDOM`) and removed once the new one is in. If the second rename
    fails, the old folder is put back; if the process is killed between the two renames, the
    next `replace_dir` of `final` puts it back before it starts, and readers find it meanwhile
    (`existing_dir`). Before, that window left no folder at all and the old one where a sweep
    of temporary folders would later delete it.
    """
    staging, final = Path(staging), Path(final)
    _restore_aside(final)
    if not final.exists():
        os.replace(staging, final)
        _fsync_dir(final.parent)
        return
    for leftover in _asides(final, live=False):  # a removal that a kill cut short
        shutil.rmtree(leftover, ignore_errors=True)
    aside = final.parent / f".{final.name}{ASIDE}{os.getpid()}@{_host()}-{secrets.token_hex(4)}"
    os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(aside, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def existing_dir(final: str | os.PathLike[str]) -> Path:
    """`final`, or while a killed `replace_dir` left it missing, the old folder it moved aside."""
    final = Path(final)
    if final.exists():
        return final
    asides = _asides(final, live=True)
    return asides[-1] if asides else final


def _asides(final: Path, *, live: bool) -> list[Path]:
    """Folders moved aside for `final`, oldest first; without `live`, only those whose mover is
    no longer running on this host (a live one may be mid-swap)."""
    found = []
    for entry in final.parent.glob(f".{final.name}{ASIDE}*"):
        owner = entry.name[len(f".{final.name}{ASIDE}") :].rsplit("-", 1)[0].split("@")
        mover_alive = owner[0].isdigit() and owner[-1] == _host() and _alive(int(owner[0]))
        if entry.is_dir() and (live or not mover_alive):
            with contextlib.suppress(OSError):
                found.append((entry.stat().st_mtime, entry))
    return [entry for _, entry in sorted(found)]


def _restore_aside(final: Path) -> None:
    if final.exists():
        return
    asides = _asides(final, live=False)
    if asides:
        with contextlib.suppress(OSError):  # another writer restored it first
            os.replace(asides[-1], final)


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
    # lazy: safetensors.torch imports torch (+1,090 modules, 1.6 s); `compare` imports storage
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
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise StorageError(f"{side} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(meta, dict):
        raise StorageError(f"{side}: a sidecar is a JSON object, this holds {type(meta).__name__}")
    return meta


def load_checkpoint(
    weights_path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint`, verifying its sha256 against the sidecar."""
    # lazy: safetensors.torch imports torch (+1,090 modules, 1.6 s); `compare` imports storage
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
    try:
        tensors = load_tensors(blob)
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise StorageError(f"{weights}: not a readable safetensors file ({exc})") from exc
    if device != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    return tensors, meta


# ---- content-hashed files (per-shard tables) ------------------------------------------------
#
# A Parquet file can lose a bit on disk and still decode: a scan of single-bit flips in a loss
# shard found a third of them read without error, one as a loss of 4e154. So every shard gets a
# JSON sidecar (`shard-00000.json` beside `shard-00000.parquet`, as checkpoints have) holding the
# sha256 of its bytes, written after the shard; readers check it before trusting a value. Each
# shard has its own sidecar so that parallel shard writers (a backfill) never share a file.

_VERIFIED: dict[str, tuple[int, int, int, str]] = {}
_WARNED_UNHASHED: set[str] = set()


def write_parquet_hashed(
    df: Any, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    """`write_parquet_atomic`, then a sidecar with the file's sha256 and row count (plus `meta`).

    The sidecar goes last, so a kill between the two renames leaves either the old pair or a new
    file whose hash its (old) sidecar does not match: an error that says to rematerialize, never
    an unchecked read.
    """
    final = write_parquet_atomic(df, path)
    sidecar = {**(meta or {}), "file": final.name, "rows": df.height, "sha256": sha256_file(final)}
    write_json_atomic(sidecar_path(final), sidecar)
    return final, sidecar


def read_hash_sidecar(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of a hashed file, or None when it has none (written before hashes existed)."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    meta = read_sidecar(path)
    if not isinstance(meta.get("sha256"), str):
        raise StorageError(f"{side}: no sha256 recorded for {Path(path).name}")
    return meta


def verify_hashed(path: str | os.PathLike[str], fix: str = "rematerialize it") -> dict | None:
    """Check `path` against the sha256 in its sidecar; return the sidecar (None if it has none).

    A file without a sidecar is read as before, with one warning per folder. A file that was
    already verified and has not changed since (same size, mtime and inode) is not hashed again.
    """
    target = Path(path)
    meta = read_hash_sidecar(target)
    if meta is None:
        folder = str(target.parent)
        if folder not in _WARNED_UNHASHED:
            _WARNED_UNHASHED.add(folder)
            log.warning(
                "%s has no content hash (%s is missing: written by an older version); it is read "
                "unchecked. Rematerialize it to have it checked.",
                target,
                sidecar_path(target).name,
            )
        return None
    stat = target.stat()
    key = (stat.st_size, stat.st_mtime_ns, stat.st_ino, meta["sha256"])
    if _VERIFIED.get(str(target)) == key:
        return meta
    actual = sha256_file(target)
    if actual != meta["sha256"]:
        raise StorageError(
            f"{target}: sha256 {actual[:12]} does not match its sidecar "
            f"{sidecar_path(target).name} ({meta['sha256'][:12]}): the file changed on disk "
            f"after it was written (bit rot, or an edit); nothing was read from it. {fix}"
        )
    _VERIFIED[str(target)] = key
    return meta


# ---- one owner per home ----------------------------------------------------------------------
#
# Two runs with different configs on one home mix their artifacts: run A's losses were computed
# with run B's black box and A printed B's headline. So a run owns its home for its duration
# through an exclusive `flock` on `HOME/.llm2loss.lock`. The kernel drops a flock when its holder
# dies, SIGKILL included, so a stale lock cannot outlive its process: the next run takes it over.
# The file also records who holds it, for the message the second run prints.

LOCK_NAME = ".llm2loss.lock"
_HELD: dict[str, int] = {}  # home -> nesting depth, for re-entry from the holding process


class HomeInUseError(StorageError):
    """Another live process owns the home (it holds the lock file)."""


@contextlib.contextmanager
def home_lock(home: str | os.PathLike[str], description: str) -> Iterator[Path]:
    """Own `home` for the block: an error naming the holder's pid and config if another has it.

    `description` says which config and command this run is (shown to a second run). Re-entry
    from the process that already holds the lock is allowed.
    """

    root = Path(home).resolve()
    path = root / LOCK_NAME
    if str(root) in _HELD:
        _HELD[str(root)] += 1
        try:
            yield path
        finally:
            _HELD[str(root)] -= 1
        return
    ensure_writable_dir(root)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HomeInUseError(_in_use_message(root, _read_holder(fd))) from None
        previous = _read_holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            log.info("%s: took over the lock of pid %s, which has ended", path, previous["pid"])
        _write_holder(fd, description)
        _HELD[str(root)] = 1
        try:
            yield path
        finally:
            del _HELD[str(root)]
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def _read_holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
        if isinstance(holder, dict):
            return holder
    return {}


def _write_holder(fd: int, description: str) -> None:
    holder = {
        "pid": os.getpid(),
        "host": _host(),
        "config": description,
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _in_use_message(home: Path, holder: Mapping[str, Any]) -> str:
    pid = holder.get("pid", "unknown")
    host = holder.get("host")
    where = f" on {host}" if host and host != _host() else ""
    return (
        f"home {home} is in use by pid {pid}{where} ({holder.get('config', 'config unknown')}), "
        f"running since {holder.get('since', 'an unknown time')}. Two runs on one home would mix "
        "their artifacts: wait for that run to end, or give this one its own home "
        "(--home DIR or LLM2LOSS_HOME=DIR)"
    )
