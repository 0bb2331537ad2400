"""Shared pieces of the reliability tests, and a script that runs one step in its own process.

In-process helpers: `fast_config` (configs/tiny.yaml with fewer epochs), `run_steps` (the steps
of core/steps, one torch thread), `reference_home` (one tiny home built once per test process and
shared read-only by test_faults, test_bad_inputs, test_determinism and test_safety), `clone_home`
(a new home that reuses the reference's tables and images), `digests` (sha256 of every artifact
that must be reproducible).

As a script, it runs steps in a fresh interpreter so that a test can SIGKILL it:

    python tests/fault_helpers.py CONFIG.yaml STEP [STEP ...]

STEP is prepare, black_box, losses:SHARD, encoder, embeddings:SHARD, heads, report or all.
Fault injection is switched on by environment variables and lives only in this process (the
library files are never changed):

    LLM2LOSS_FAULT_AT       a file or folder name: pause in os.replace(src, dst) when dst has
                            this name, i.e. after the temporary copy is complete but before it
                            is renamed into place
    LLM2LOSS_FAULT_HALF=1   instead, pause after writing only the first half of the temporary
                            Parquet file whose final name is LLM2LOSS_FAULT_AT
    LLM2LOSS_FAULT_MARKER   the file created when the pause begins (the test waits for it)
    LLM2LOSS_FAULT_PARTIES  with N > 0, do not pause forever: wait until N processes reached the
                            point (a barrier through MARKER.<pid> files), then go on; two
                            processes thus write the same file at the same moment
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SCRIPT = Path(__file__).resolve()
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = ("prepare", "black_box", "losses", "encoder", "embeddings", "heads", "report")


# ---- configuration -------------------------------------------------------------------------


def fast_settings(home: str | os.PathLike[str], **sections: dict[str, Any]) -> dict[str, Any]:
    """configs/tiny.yaml with fewer epochs, as a raw mapping (only the keys that differ from the
    defaults, so that a file written from it stays valid while other keys are added)."""
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["home"] = str(home)
    updates: dict[str, dict[str, Any]] = {
        "black_box": {"epochs": 2},
        "encoder": {"epochs": 1},
        "heads": {"n_seeds": 2, "epochs": 4, "min_steps": 40},
    }
    for section, values in sections.items():
        updates.setdefault(section, {}).update(values)
    for section, values in updates.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def fast_config(home: str | os.PathLike[str], **sections: dict[str, Any]) -> Any:
    """The validated `fast_settings`; `sections` update single keys, e.g.
    `black_box={"seed": 1}`."""
    from llm2loss_pipeline.core.config import validate_config

    return validate_config(fast_settings(home, **sections), source="fast_config")


def write_config(
    path: str | os.PathLike[str], home: str | os.PathLike[str], **sections: dict[str, Any]
) -> tuple[Any, Path]:
    """`fast_config` and a YAML file of it that `llm2loss run --config` or this script reads."""
    import yaml

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(fast_settings(home, **sections), sort_keys=True))
    return fast_config(home, **sections), target


# ---- running steps in this process ---------------------------------------------------------


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread, restored afterwards: the same thread count as the subprocesses (float
    reductions may be ordered differently with another count; bench/RESULTS.md, Reliability) and far
    faster on the shared 2-core machine, where spinning OpenMP threads wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_steps(config: Any, steps: Sequence[str]) -> dict[str, Any]:
    """Run steps of core/steps in order; `losses`/`embeddings` alone mean every shard."""
    from llm2loss_pipeline.core.layout import Layout
    from llm2loss_pipeline.core.steps import black_box, data, diagnosis, encoder, report
    from llm2loss_pipeline.core.steps.tables import read_manifest

    layout = Layout.at(config.home)
    devices = config.devices
    results: dict[str, Any] = {}
    expanded = [step for item in steps for step in (STEPS if item == "all" else [item])]
    with one_thread():
        for item in expanded:
            step, _, shard = item.partition(":")
            shards = [shard] if shard else None
            if step in ("losses", "embeddings") and shards is None:
                shards = read_manifest(layout)["shard"].unique(maintain_order=True).to_list()
            if step == "prepare":
                results[item] = data.prepare_dataset(layout, config.dataset, config.world)
                data.summarize_attributes(layout, config.dataset, config.world)
            elif step == "black_box":
                results[item] = black_box.fit_black_box(
                    layout,
                    config.black_box,
                    devices.black_box,
                    on_bad_image=config.dataset.on_bad_image,
                )
            elif step == "losses":
                for key in shards or []:
                    results[f"losses:{key}"] = black_box.shard_losses(
                        layout, key, config.black_box, config.dataset, devices.losses
                    )
            elif step == "encoder":
                results[item] = encoder.fit_encoder(
                    layout,
                    config.encoder,
                    devices.encoder,
                    on_bad_image=config.dataset.on_bad_image,
                )
            elif step == "embeddings":
                for key in shards or []:
                    results[f"embeddings:{key}"] = encoder.shard_embeddings(
                        layout, key, config.dataset, devices.embeddings
                    )
            elif step == "heads":
                results[item] = diagnosis.fit_heads(layout, config.heads, devices.heads)
            elif step == "report":
                results[item] = report.make_report(layout, config.report)
            else:
                raise ValueError(f"unknown step {item!r}; choose from {STEPS} or all")
    return results


_REFERENCE: dict[str, Any] = {}


def reference_home() -> tuple[Any, Any]:
    """(config, layout) of one tiny home with every artifact, built once per test process.

    Tests must not write into it: `clone_home` gives a writable home that shares its images.
    """
    from llm2loss_pipeline.core.layout import Layout

    if "layout" not in _REFERENCE:
        root = Path(tempfile.mkdtemp(prefix="llm2loss-reliability-"))
        atexit.register(shutil.rmtree, root, True)
        config = fast_config(root / "reference")
        run_steps(config, ["all"])
        _REFERENCE.update(config=config, layout=Layout.at(config.home), root=root)
    return _REFERENCE["config"], _REFERENCE["layout"]


def alternative_black_box() -> Path:
    """A complete black-box checkpoint folder trained with seed 1 (an 'older' model), once."""
    if "alt_black_box" not in _REFERENCE:
        _, layout = reference_home()
        home = _REFERENCE["root"] / "seed1"
        alt = clone_home(layout, home)
        run_steps(fast_config(alt.home, black_box={"seed": 1}), ["black_box"])
        _REFERENCE["alt_black_box"] = alt.black_box.parent
    return _REFERENCE["alt_black_box"]


def clone_home(source: Any, home: str | os.PathLike[str], models: Sequence[str] = ()) -> Any:
    """A new home with the source's manifest and attributes (images stay where they are) and
    copies of the named model folders (`black_box`, `encoder`, `heads`) and shard tables."""
    from llm2loss_pipeline.core.layout import Layout

    target = Layout.at(home)
    target.tables.mkdir(parents=True, exist_ok=True)
    for path in (source.manifest, source.attributes):
        shutil.copy2(path, target.tables / path.name)
    for name in models:
        if name in ("per_sample_losses", "image_embeddings"):
            shutil.copytree(source.shard_dir(name), target.shard_dir(name))
        else:
            shutil.copytree(source.models / name, target.models / name)
            if name == "heads":
                shutil.copytree(source.models / "heads_metrics", target.models / "heads_metrics")
    return target


def digests(layout: Any) -> dict[str, str]:
    """sha256 of every artifact whose bytes a seed fixes (sidecars hold timings and paths, so
    only their recorded weight hashes count)."""
    from llm2loss_pipeline.core.storage import sha256_file

    files = [layout.black_box, layout.encoder_dir / "open_clip_model.safetensors"]
    files += sorted(layout.heads_dir.glob("*.safetensors"))
    files += [layout.attributes]
    for table in ("per_sample_losses", "image_embeddings"):
        files += sorted(layout.shard_dir(table).glob("*.parquet"))
    files += sorted(layout.reports.glob("*.parquet"))
    return {
        str(path.relative_to(layout.home)): sha256_file(path) for path in files if path.exists()
    }


def leftovers(folder: Path) -> list[str]:
    """Names of temporary files and folders (hidden, ending .tmp/.old, or *.tmp-* and folders
    moved aside by storage.replace_dir) under folder."""
    from llm2loss_pipeline.core.storage import ASIDE

    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob(".*")
        if path.name.endswith((".tmp", ".old")) or ".tmp-" in path.name or ASIDE in path.name
    )


# ---- running steps in a subprocess and killing them ---------------------------------------


def start(
    config_path: Path,
    steps: Sequence[str],
    *,
    fault_at: str | None = None,
    marker: Path | None = None,
    half: bool = False,
    parties: int = 0,
) -> subprocess.Popen[str]:
    env = {**os.environ, **ONE_THREAD_ENV}
    for key in ("LLM2LOSS_FAULT_AT", "LLM2LOSS_FAULT_MARKER", "LLM2LOSS_FAULT_HALF"):
        env.pop(key, None)
    if fault_at is not None:
        assert marker is not None
        env.update(LLM2LOSS_FAULT_AT=fault_at, LLM2LOSS_FAULT_MARKER=str(marker))
        env["LLM2LOSS_FAULT_PARTIES"] = str(parties)
        if half:
            env["LLM2LOSS_FAULT_HALF"] = "1"
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(config_path), *steps],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> str:
    """Wait for a step process; its output, or an AssertionError with it when it failed."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"step process failed ({process.returncode}):\n{output}"
    return output


def kill_at_marker(process: subprocess.Popen[str], marker: Path, timeout: float = 300) -> None:
    """SIGKILL the process once it has created `marker` (it is then paused at the fault)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(
                f"the step ended ({process.returncode}) before reaching the fault:\n{output}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the step did not reach the fault within {timeout}s")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


# ---- the script side ------------------------------------------------------------------------


def _reach(marker: Path, parties: int) -> None:
    if parties <= 0:
        marker.write_text(str(os.getpid()))
        while True:  # paused until the test kills this process
            time.sleep(60)
    Path(f"{marker}.{os.getpid()}").write_text("")
    deadline = time.monotonic() + 120
    while len(list(marker.parent.glob(f"{marker.name}.*"))) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only some of {parties} processes reached {marker}")
        time.sleep(0.01)


def _install_fault() -> None:
    target = os.environ.get("LLM2LOSS_FAULT_AT")
    if not target:
        return
    marker = Path(os.environ["LLM2LOSS_FAULT_MARKER"])
    parties = int(os.environ.get("LLM2LOSS_FAULT_PARTIES", "0"))
    if os.environ.get("LLM2LOSS_FAULT_HALF") == "1":
        import polars as pl

        write_parquet = pl.DataFrame.write_parquet

        def half_written(self: Any, file: Any, *args: Any, **kwargs: Any) -> Any:
            result = write_parquet(self, file, *args, **kwargs)
            path = Path(file)
            if path.name.startswith(f".{target}."):  # the temporary file of the target
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                _reach(marker, 0)
            return result

        pl.DataFrame.write_parquet = half_written  # type: ignore[method-assign]
        return
    replace = os.replace

    def paused_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == target:
            _reach(marker, parties)
        replace(src, dst, *args, **kwargs)

    os.replace = paused_replace  # type: ignore[assignment]


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    from llm2loss_pipeline.core.config import load_config

    torch.set_num_threads(1)
    _install_fault()
    config = load_config(argv[0])
    results = run_steps(config, argv[1:])
    for name, result in results.items():
        print(f"{name}: {getattr(result, 'sha256', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
