"""Red team, round two: replay the cases of issue 23 against the tiny config, classify each.

Every case runs the real command (`llm2loss ...` in a subprocess, with a timeout) or, where the
CLI would need a whole pipeline run to reach the code in question, a short Python child that
calls the library. Each outcome is one of:

- `correct`: exit 0 and the result is the user's (checked per case), or a refusal that the case
  names as right;
- `clear error`: a non-zero exit with a message that names what to fix (checked per case);
- `unclear error`: a non-zero exit whose message misses what the case expects;
- `silent wrong result`: exit 0 with an answer that is not the user's;
- `traceback`: a raw Python traceback or a Rust panic reached the user;
- `hang`: the command did not end within its timeout (it is then killed).

    .venv/bin/python bench/redteam.py                      # every case (about 20 min on 2 cores)
    .venv/bin/python bench/redteam.py --only lock,bitrot   # cases whose name contains a word
    .venv/bin/python bench/redteam.py --json out.json

The tiny home that most cases copy is built once per invocation (`llm2loss run --config
configs/tiny.yaml`). Prints one line per case and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PYTHON = sys.executable
CLASSES = (
    "correct",
    "clear error",
    "unclear error",
    "silent wrong result",
    "traceback",
    "hang",
)
BASE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO),
    "COLUMNS": "200",
}
BASE_ENV.pop("LLM2LOSS_HOME", None)
BASE_ENV.pop("DAGSTER_HOME", None)
BASE_ENV.pop("LLM2LOSS_CONFIG", None)


@dataclass
class Run:
    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err


@dataclass
class Outcome:
    name: str
    item: str
    result: str
    detail: str
    seconds: float


def run(
    args: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Run:
    """Run a command in its own process group; kill the whole group on timeout."""
    started = time.monotonic()
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env={**BASE_ENV, **(env or {})},
        cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
        return Run(process.returncode, out, err, time.monotonic() - started, False)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return Run(None, out, err, time.monotonic() - started, True)


def llm2loss(*args: str, timeout: float = 120, **kwargs) -> Run:
    return run([PYTHON, "-m", "llm2loss_pipeline.cli", *args], timeout, **kwargs)


def child(code: str, timeout: float = 120, **kwargs) -> Run:
    """A Python child calling the library. An exception it raises is what a caller of the
    library sees: printed as one line (exit 2) and judged on its message, not as a traceback."""
    body = textwrap.indent(textwrap.dedent(code), "    ")
    wrapped = (
        "import sys\ntry:\n" + body + "\nexcept Exception as exc:\n"
        "    print(f'error: {type(exc).__name__}: {exc}', file=sys.stderr)\n    sys.exit(2)\n"
    )
    return run([PYTHON, "-c", wrapped], timeout, **kwargs)


def is_traceback(result: Run) -> bool:
    return "Traceback (most recent call last)" in result.text or "panicked at" in result.text


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:240]


def classify(
    result: Run,
    *,
    error: str | None = None,
    ok: Callable[[Run], bool] | None = None,
    max_error_chars: int = 20000,
) -> tuple[str, str]:
    """(class, detail): `error` is a regex a clear error must match; `ok` judges an exit 0."""
    if result.timed_out:
        return "hang", f"no end after {result.seconds:.0f} s (killed)"
    if is_traceback(result):
        return "traceback", last_line(result.err or result.out)
    if result.rc != 0:
        message = last_line(result.err or result.out)
        if len(result.err) > max_error_chars:
            return "unclear error", f"exit {result.rc}, {len(result.err)} chars of stderr"
        found = re.search(error, result.text, re.S) if error is not None else None
        if error is None or found:
            if found:  # show the line that says it, not the last line of the output
                start = result.text.rfind("\n", 0, found.start()) + 1
                message = result.text[start:].strip().splitlines()[0][:240]
            return "clear error", f"exit {result.rc}: {message}"
        return "unclear error", f"exit {result.rc}: {message}"
    if ok is not None and ok(result):
        return "correct", last_line(result.out) or "exit 0"
    return "silent wrong result", f"exit 0: {last_line(result.out)}"


# ---- fixtures ---------------------------------------------------------------------------------


class World:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.base = work / "base"
        self._built = False

    def ensure_base(self) -> Path:
        """One complete tiny home (all stages), built once."""
        if not self._built and (self.base / "reports" / "headline.json").exists():
            self._built = True  # a complete base from an earlier invocation with this --work
        if not self._built:
            result = llm2loss(
                "run", "--config", str(TINY), "--home", str(self.base), "--quiet", timeout=1800
            )
            if result.rc != 0:
                raise SystemExit(f"could not build the base home:\n{result.err[-3000:]}")
            self._built = True
        return self.base

    def clone(self, name: str) -> Path:
        """A copy of the base home (tables, models, reports, Dagster instance)."""
        target = self.work / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.ensure_base(), target, symlinks=True)
        return target

    def world_root(self) -> Path:
        return next((self.ensure_base() / "world").iterdir())

    def config(self, name: str, text: str) -> Path:
        path = self.work / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def tiny_with(self, name: str, extra: str) -> Path:
        """configs/tiny.yaml with `extra` YAML merged over it (section by section)."""
        import yaml

        raw = yaml.safe_load(TINY.read_text())
        for section, values in (yaml.safe_load(textwrap.dedent(extra)) or {}).items():
            if isinstance(values, dict):
                raw[section] = {**raw.get(section, {}), **values}
            else:
                raw[section] = values
        return self.config(name, yaml.safe_dump(raw, sort_keys=False))


CASES: list[tuple[str, str, Callable[[World], tuple[str, str]]]] = []


def case(name: str, item: str):
    def register(function: Callable[[World], tuple[str, str]]):
        CASES.append((name, item, function))
        return function

    return register


# ---- silent wrong results ---------------------------------------------------------------------


def _source_case(
    world: World, name: str, section: str, key: str, value: str, source: str, **kwargs
):
    """configs/tiny.yaml plus one path key and no `source:`: inferred, or refused naming both."""
    path = world.tiny_with(f"{name}.yaml", f"{section}: {{{key}: {value}}}")
    result = llm2loss("check-config", str(path), **kwargs)
    return classify(
        result,
        error=rf"(source.*{key}|{key}.*source)",
        ok=lambda r: re.search(rf"^\s*source: {source}\s*$", r.out, re.M) is not None,
    )


SEEDED_MODEL = """
    import torch

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 20)).eval()
"""


@case("path-key-celeba-root", "silent 1")
def _(world: World):
    root = world.world_root()
    return _source_case(world, "celeba-root", "dataset", "celeba_root", str(root), "celeba")


@case("path-key-torchscript", "silent 1")
def _(world: World):
    model = world.work / "models" / "f.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    env = _entry_point_module(world, "mymodels", SEEDED_MODEL)
    child(
        f"""
        import torch, mymodels
        torch.jit.save(torch.jit.script(mymodels.build()), {str(model)!r})
    """,
        env=env,
    )
    return _source_case(world, "ts", "black_box", "torchscript_path", str(model), "torchscript")


@case("path-key-entry-point", "silent 1")
def _(world: World):
    env = _entry_point_module(world, "mymodels", SEEDED_MODEL)
    return _source_case(
        world, "ep", "black_box", "entry_point", "'mymodels:build'", "entry_point", env=env
    )


@case("path-key-loss-table", "silent 1")
def _(world: World):
    table = world.work / "losses-all.parquet"
    child(f"""
        import polars as pl
        from pathlib import Path
        base = Path({str(world.ensure_base())!r})
        shards = sorted(base.glob("tables/per_sample_losses/shard-*.parquet"))
        frame = pl.concat([pl.read_parquet(p) for p in shards]).select("sample_id", "loss")
        frame.write_parquet({str(table)!r})
    """)
    return _source_case(world, "lt", "black_box", "loss_table_path", str(table), "loss_table")


@case("home-two-configs", "silent 2")
def _(world: World):
    home = world.work / "shared-home"
    shutil.rmtree(home, ignore_errors=True)
    first = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "llm2loss_pipeline.cli",
            "run",
            "--config",
            str(TINY),
            "--home",
            str(home),
            "--stage",
            "prepare",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=BASE_ENV,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        lock = home / ".llm2loss.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            lock.exists() and str(first.pid) in lock.read_text(errors="replace")
        ):
            time.sleep(0.5)
        other = world.tiny_with("tiny-epochs2.yaml", "black_box: {epochs: 2}")
        second = llm2loss(
            "run",
            "--config",
            str(other),
            "--home",
            str(home),
            "--stage",
            "prepare",
            "--quiet",
            timeout=600,
        )
        return classify(second, error=rf"in use by pid {first.pid}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@case("bitrot-loss-shard", "silent 3")
def _(world: World):
    home = world.clone("bitrot")
    shard = home / "tables" / "per_sample_losses" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    result = llm2loss(
        "run",
        "--config",
        str(TINY),
        "--home",
        str(home),
        "--stage",
        "diagnose",
        "--quiet",
        timeout=900,
    )
    return classify(result, error=r"shard-00001\.parquet.*(sha256|not readable|decode)")


@case("bitrot-scan-200-flips", "silent 3")
def _(world: World):
    """200 random single-bit flips of one loss shard, each read back by the heads' reader."""
    home = world.clone("bitrot-scan")
    result = child(
        f"""
        import random, shutil
        from llm2loss_pipeline.core.layout import Layout
        from llm2loss_pipeline.core.steps.tables import read_manifest, read_shards
        layout = Layout.at({str(home)!r})
        manifest = read_manifest(layout)
        shard = layout.shard_table("per_sample_losses", "shard-00001")
        pristine = shard.read_bytes()
        rng, silent, caught = random.Random(0), 0, 0
        for _ in range(200):
            data = bytearray(pristine)
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            shard.write_bytes(bytes(data))
            try:
                read_shards(layout, "per_sample_losses", manifest)
                silent += 1
            except Exception as exc:
                caught += "shard-00001.parquet" in str(exc)
        shard.write_bytes(pristine)
        print(f"{{caught}} of 200 flips refused naming the file, {{silent}} read silently")
    """,
        timeout=600,
    )
    return classify(result, ok=lambda r: "200 of 200 flips refused" in r.out)


@case("stale-shards-after-shard-size", "silent 4")
def _(world: World):
    home = world.clone("stale")
    result = child(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from llm2loss_pipeline.core.config import load_config
        from llm2loss_pipeline.core.layout import Layout
        from llm2loss_pipeline.core.steps.data import prepare_dataset
        config = load_config({str(TINY)!r})
        layout = Layout.at({str(home)!r})
        dataset = config.dataset.model_copy(update={{"shard_size": 200}})
        result = prepare_dataset(layout, dataset, config.world)
        names = sorted(p.stem for p in (layout.tables / "per_sample_losses").glob("*.parquet"))
        stale = [n for n in names if n not in result.shard_keys]
        print("SHARDS", result.shard_keys, "FILES", names, "STALE", stale)
        sys.exit(0 if not stale else 1)
    """,
        timeout=300,
    )
    return classify(result, ok=lambda r: "removed stale shard" in r.out and "STALE []" in r.out)


@case("stale-shard-of-another-world", "silent 4")
def _(world: World):
    home = world.clone("stale-world")
    result = child(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from llm2loss_pipeline.core.config import load_config
        from llm2loss_pipeline.core.layout import Layout
        from llm2loss_pipeline.core.steps.data import prepare_dataset
        from llm2loss_pipeline.core.steps.tables import read_shards
        config = load_config({str(TINY)!r})
        layout = Layout.at({str(home)!r})
        other = config.world.model_copy(update={{"seed": 8}})  # same ids, other faces
        result = prepare_dataset(layout, config.dataset, other)
        try:
            read_shards(layout, "per_sample_losses", result.manifest)
        except Exception as exc:
            print("REFUSED", type(exc).__name__, str(exc)[:300])
            sys.exit(0)
        print("READ the old world's losses under the new world's ids")
    """,
        timeout=300,
    )
    return classify(result, ok=lambda r: "removed stale shard" in r.out and "REFUSED" in r.out)


@case("thread-count-determinism", "silent 5")
def _(world: World):
    digests = []
    for threads in ("1", "2"):
        home = world.clone(f"threads-{threads}")
        result = llm2loss(
            "run",
            "--config",
            str(TINY),
            "--home",
            str(home),
            "--stage",
            "prepare",
            "--quiet",
            timeout=1200,
            env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )
        if result.rc != 0 or result.timed_out:
            return classify(result)
        sidecar = json.loads((home / "models" / "encoder" / "encoder.json").read_text())
        digests.append(sidecar.get("sha256"))
    same = digests[0] == digests[1]
    return (
        ("correct", f"encoder sha256 equal with 1 and 2 threads ({digests[0][:12]})")
        if same
        else ("silent wrong result", f"encoder sha256 {digests[0][:12]} vs {digests[1][:12]}")
    )


@case("thread-count-diagnose", "silent 5")
def _(world: World):
    """The heads and the report with 2 threads against the base home's (built with 1): the
    issue's p-value crossed 0.05 with the core count, so the headline must not move."""
    home = world.clone("threads-diagnose")
    threads = {name: "2" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    args = ["run", "--config", str(TINY), "--home", str(home), "--stage", "diagnose", "--quiet"]
    result = llm2loss(*args, timeout=1800, env=threads)
    if result.rc != 0 or result.timed_out:
        return classify(result)
    one = json.loads((world.ensure_base() / "reports" / "headline.json").read_text())
    two = json.loads((home / "reports" / "headline.json").read_text())
    differ = sorted(key for key in one.keys() | two.keys() if one.get(key) != two.get(key))
    if differ:
        shown = ", ".join(f"{key} {one.get(key)} vs {two.get(key)}" for key in differ[:3])
        return "silent wrong result", f"headline differs with 2 threads: {shown}"
    rho, p = one.get("spearman_abs_overall"), one.get("spearman_abs_overall_p")
    return "correct", f"headline identical with 1 and 2 threads (Spearman {rho:.3f}, p {p:.2g})"


@case("sample-id-path", "silent 6")
def _(world: World):
    root = world.work / "celeba-escape"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(world.world_root(), root)
    (root / "world.json").write_text("{}")
    for name in ("list_eval_partition.txt", "identity_CelebA.txt"):
        path = root / name
        path.write_text(
            path.read_text() + ("../world.json 0\n" if "eval" in name else "../world.json 1\n")
        )
    attrs = root / "list_attr_celeba.txt"
    lines = attrs.read_text().splitlines()
    lines[0] = str(int(lines[0]) + 1)
    lines.append("../world.json " + " ".join(["-1"] * 40))
    attrs.write_text("\n".join(lines) + "\n")
    result = child(f"""
        from pathlib import Path
        from llm2loss_pipeline.core.celeba import read_celeba
        tables = read_celeba(Path({str(root)!r}))
        print("ACCEPTED", tables)
    """)
    return classify(result, error=r"\.\./world\.json.*line|line.*\.\./world\.json")


def _config_error_case(world: World, name: str, text: str, error: str):
    path = world.config(name, text)
    return classify(llm2loss("check-config", str(path)), error=error)


@case("bool-epochs", "silent 7")
def _(world: World):
    return _config_error_case(world, "bool.yaml", "black_box:\n  epochs: true\n", r"epochs")


@case("string-epochs", "silent 7")
def _(world: World):
    return _config_error_case(world, "str.yaml", "black_box:\n  epochs: '10'\n", r"epochs")


@case("duplicate-key", "silent 7")
def _(world: World):
    text = "black_box:\n  epochs: 3\n  epochs: 5\n"
    return _config_error_case(
        world,
        "dup.yaml",
        text,
        r"epochs.*lines? \d+.*\d+",
    )


@case("empty-config", "silent 8")
def _(world: World):
    path = world.config("empty.yaml", "")
    result = llm2loss("check-config", str(path))
    return classify(result, ok=lambda r: re.search(r"empty", r.text, re.I) is not None)


# ---- crashes and hangs ------------------------------------------------------------------------


@case("gpu-slot-after-sigkill", "crash 1")
def _(world: World):
    home = world.clone("gpu-slot")
    env = {"DAGSTER_HOME": str(home / "dagster")}
    child(
        """
        import dagster as dg
        dg.DagsterInstance.get().event_log_storage.set_concurrency_slots("gpu", 1)
    """,
        env=env,
    )
    args = [
        PYTHON,
        "-m",
        "llm2loss_pipeline.cli",
        "run",
        "--config",
        str(TINY),
        "--home",
        str(home),
        "--stage",
        "signals",
        "--shard",
        "shard-00000",
    ]
    victim = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**BASE_ENV, **env},
        cwd=REPO,
        start_new_session=True,
    )
    assert victim.stdout is not None
    deadline = time.monotonic() + 300
    for line in victim.stdout:
        if "started" in line and ("per_sample_losses" in line or "image_embeddings" in line):
            break
        if time.monotonic() > deadline:
            break
    time.sleep(2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    result = llm2loss(
        "run",
        "--config",
        str(TINY),
        "--home",
        str(home),
        "--stage",
        "signals",
        "--shard",
        "shard-00000",
        timeout=600,
        env={**env, "LLM2LOSS_SLOT_WAIT_S": "120"},
    )
    return classify(result, ok=lambda r: "1 run(s)" in r.out)


@case("gpu-slot-wait-ctrl-c", "crash 1")
def _(world: World):
    home = world.clone("gpu-wait")
    env = {"DAGSTER_HOME": str(home / "dagster")}
    sleeper = subprocess.Popen(["sleep", "900"])  # a live process that "holds" the slot
    try:
        child(
            f"""
            import uuid
            import dagster as dg
            from dagster._core.storage.dagster_run import DagsterRun
            instance = dg.DagsterInstance.get()
            instance.event_log_storage.set_concurrency_slots("gpu", 1)
            run_id = str(uuid.uuid4())
            instance.add_run(DagsterRun(job_name="elsewhere", run_id=run_id,
                status=dg.DagsterRunStatus.STARTED,
                tags={{"llm2loss/pid": "{sleeper.pid}", "llm2loss/host": "other-host"}}))
            instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "step", 0)
        """,
            env=env,
        )
        args = [
            PYTHON,
            "-m",
            "llm2loss_pipeline.cli",
            "run",
            "--config",
            str(TINY),
            "--home",
            str(home),
            "--stage",
            "signals",
            "--shard",
            "shard-00000",
        ]
        waiter = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**BASE_ENV, **env},
            cwd=REPO,
            start_new_session=True,
        )
        assert waiter.stdout is not None
        started, seen = time.monotonic(), []
        for line in waiter.stdout:
            seen.append(line)
            if "waiting for a slot" in line or time.monotonic() - started > 300:
                break
        waiter.send_signal(signal.SIGINT)
        try:
            rest, _ = waiter.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(waiter.pid, signal.SIGKILL)
            return "hang", "Ctrl-C did not end the wait for a slot within 30 s"
        output = "".join(seen) + rest
        result = Run(waiter.returncode, output, "", time.monotonic() - started, False)
        said = any("waiting for a slot" in line for line in seen)
        verdict = classify(result, error=r"interrupt")
        if verdict[0] == "clear error" and not said:
            return "unclear error", "stopped, but never said what it waited for"
        return verdict
    finally:
        sleeper.kill()


@case("gpu-slot-wait-timeout", "crash 1")
def _(world: World):
    home = world.clone("gpu-timeout")
    env = {"DAGSTER_HOME": str(home / "dagster"), "LLM2LOSS_SLOT_WAIT_S": "5"}
    sleeper = subprocess.Popen(["sleep", "900"])  # a live process that "holds" the slot
    try:
        child(
            f"""
            import uuid
            import dagster as dg
            from dagster._core.storage.dagster_run import DagsterRun
            instance = dg.DagsterInstance.get()
            instance.event_log_storage.set_concurrency_slots("gpu", 1)
            run_id = str(uuid.uuid4())
            instance.add_run(DagsterRun(job_name="elsewhere", run_id=run_id,
                status=dg.DagsterRunStatus.STARTED,
                tags={{"llm2loss/pid": "{sleeper.pid}", "llm2loss/host": "other-host"}}))
            instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "step", 0)
        """,
            env=env,
        )
        result = llm2loss(
            "run",
            "--config",
            str(TINY),
            "--home",
            str(home),
            "--stage",
            "signals",
            "--shard",
            "shard-00000",
            timeout=300,
            env=env,
        )
        return classify(result, error=r"gave up after waiting 5 s for a slot: pool 'gpu'")
    finally:
        sleeper.kill()


@case("loss-table-documented-columns", "crash 2")
def _(world: World):
    home = world.work / "loss-table-home"
    shutil.rmtree(home, ignore_errors=True)
    table = world.work / "losses-min.parquet"
    child(f"""
        import polars as pl
        from pathlib import Path
        base = Path({str(world.ensure_base())!r})
        shards = sorted(base.glob("tables/per_sample_losses/shard-*.parquet"))
        frame = pl.concat([pl.read_parquet(p) for p in shards]).select("sample_id", "loss")
        frame.write_parquet({str(table)!r})
    """)
    config = world.tiny_with(
        "loss-table.yaml", f"black_box: {{source: loss_table, loss_table_path: {table}}}"
    )
    result = llm2loss("run", "--config", str(config), "--home", str(home), "--quiet", timeout=1500)
    return classify(result, ok=lambda r: (home / "reports" / "report.html").exists())


@case("decompression-bomb-skip", "crash 3")
def _(world: World):
    result = child(f"""
        import io, numpy as np
        from pathlib import Path
        from PIL import Image
        from llm2loss_pipeline.core.images import (
            ImageDecodeError, ImageFolderDataset, load_image_tensor)
        work = Path({str(world.work)!r})
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="JPEG")
        data = bytearray(buffer.getvalue())
        at = data.find(b"\\xff\\xc0")
        data[at + 5:at + 9] = (20000).to_bytes(2, "big") * 2
        bomb = work / "bomb.jpg"; bomb.write_bytes(bytes(data))
        good = next(Path({str(world.world_root())!r}).glob("img_align_celeba/*.jpg"))
        ds = ImageFolderDataset([("good", good), ("bomb", bomb)], transform=lambda t: t,
                                on_bad_image="skip")
        assert ds[1][1] is None and ds[0][1] is not None, "skip did not skip the bomb"
        try:
            load_image_tensor(bomb)
        except ImageDecodeError as exc:
            assert str(bomb) in str(exc), exc
            print("REFUSED", exc)
    """)
    return classify(result, ok=lambda r: "REFUSED" in r.out and "over the limit" in r.out)


@case("config-is-a-folder", "crash 4")
def _(world: World):
    folder = world.work / "a-folder"
    folder.mkdir(exist_ok=True)
    return classify(llm2loss("check-config", str(folder)), error=str(folder))


@case("config-not-utf8", "crash 4")
def _(world: World):
    path = world.work / "configs" / "latin1.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("black_box:\n  epochs: 3 # caf\xe9\n".encode("latin-1"))
    return classify(llm2loss("check-config", str(path)), error=r"latin1\.yaml.*(UTF-8|utf-8)")


@case("generate-world-non-empty", "crash 4")
def _(world: World):
    folder = world.work / "not-a-world"
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine\n")
    result = llm2loss("generate-world", str(folder), "--n-identities", "3", timeout=300)
    return classify(result, error=str(folder))


def _entry_point_module(world: World, name: str, body: str) -> dict[str, str]:
    folder = world.work / "usermods"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return {"PYTHONPATH": f"{folder}{os.pathsep}{REPO}"}


@case("entry-point-sys-exit", "crash 4 / 5")
def _(world: World):
    env = _entry_point_module(world, "exits", "import sys\ndef build():\n    sys.exit(3)\n")
    home = world.clone("exit3")
    config = world.tiny_with(
        "exit3.yaml", "black_box: {source: entry_point, entry_point: 'exits:build'}"
    )
    result = llm2loss(
        "run",
        "--config",
        str(config),
        "--home",
        str(home),
        "--stage",
        "prepare",
        timeout=900,
        env=env,
    )
    verdict = classify(result, error=r"exits:build")
    if verdict[0] == "clear error" and "semantic_encoder: done" in result.text:
        return "unclear error", "refused only after the encoder had trained: " + verdict[1]
    return verdict


@case("entry-point-unseeded", "crash 5")
def _(world: World):
    env = _entry_point_module(
        world,
        "unseeded",
        """
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 20))
    """,
    )
    home = world.clone("unseeded")
    config = world.tiny_with(
        "unseeded.yaml", "black_box: {source: entry_point, entry_point: 'unseeded:build'}"
    )
    result = llm2loss(
        "run",
        "--config",
        str(config),
        "--home",
        str(home),
        "--stage",
        "prepare",
        "--stage",
        "signals",
        "--shard",
        "shard-00000",
        timeout=900,
        env=env,
    )
    return classify(result, error=r"not deterministic|deterministic")


@case("polars-panic-shard", "crash 4")
def _(world: World):
    home = world.clone("panic")
    shard = home / "tables" / "image_embeddings" / "shard-00000.parquet"
    (shard.with_suffix(".json")).unlink(missing_ok=True)  # an old, unhashed shard
    data = bytearray(shard.read_bytes())
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for offset in range(footer + 8, min(footer + 64, len(data) - 8)):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = llm2loss(
        "run",
        "--config",
        str(TINY),
        "--home",
        str(home),
        "--stage",
        "diagnose",
        "--quiet",
        timeout=900,
    )
    return classify(result, error=r"shard-00000\.parquet")


@case("empty-split", "crash 4")
def _(world: World):
    home = world.clone("empty-split")
    config = world.tiny_with("empty-split.yaml", "dataset: {split_mode: file}\nencoder: {}\n")
    partition = next((home / "world").iterdir()) / "list_eval_partition.txt"
    del partition  # the generated world is rewritten from its config; use a CelebA copy instead
    root = world.work / "celeba-no-valid"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(world.world_root(), root)
    path = root / "list_eval_partition.txt"
    path.write_text(
        "".join(
            line.rsplit(" ", 1)[0]
            + (" 0\n" if line.rstrip().endswith(" 1") else " " + line.rsplit(" ", 1)[1] + "\n")
            for line in path.read_text().splitlines()
        )
    )
    config = world.tiny_with(
        "empty-split.yaml", f"dataset: {{source: celeba, celeba_root: {root}, split_mode: file}}"
    )
    result = llm2loss(
        "run",
        "--config",
        str(config),
        "--home",
        str(home),
        "--stage",
        "prepare",
        "--quiet",
        timeout=900,
    )
    return classify(result, error=r"valid")


@case("cuda-without-gpu", "crash 5")
def _(world: World):
    probe = child("import torch; print(torch.cuda.is_available())")
    if "True" in probe.out:
        return "correct", "n/a: this machine has a GPU"
    path = world.tiny_with("cuda.yaml", "devices: {losses: {device: cuda}}")
    return classify(llm2loss("check-config", str(path)), error=r"cuda")


@case("dagster-materialize-entry-point", "crash 5 (Dagster)")
def _(world: World):
    """The same broken entry point, launched by Dagster itself (as the UI or the daemon would):
    `dagster asset materialize` of the prepare assets, no `llm2loss run` preflight around it."""
    env = _entry_point_module(world, "exits", "import sys\ndef build():\n    sys.exit(3)\n")
    home = world.work / "dagster-exit3"
    instance = world.work / "dagster-exit3-instance"
    for folder in (home, instance):
        shutil.rmtree(folder, ignore_errors=True)
    instance.mkdir()
    (instance / "dagster.yaml").write_text("")
    config = world.tiny_with(
        "dagster-exit3.yaml",
        f"home: {home}\nblack_box: {{source: entry_point, entry_point: 'exits:build'}}",
    )
    env.update(LLM2LOSS_CONFIG=str(config), DAGSTER_HOME=str(instance))
    dagster = Path(PYTHON).with_name("dagster")
    select = "dataset_manifest,celeba_attributes,black_box_model,semantic_encoder"
    args = [str(dagster), "asset", "materialize", "-m", "llm2loss_pipeline.definitions"]
    result = run([*args, "--select", select], 900, env=env)
    verdict = classify(result, error=r"exits:build.*sys\.exit\(3\)")
    if verdict[0] == "clear error" and (home / "world").exists():
        return "unclear error", "refused only after the world was drawn: " + verdict[1]
    return verdict


@case("dagster-launchpad-cuda", "crash 5 (Dagster)")
def _(world: World):
    """A launchpad edit (run config) asks for a GPU this machine does not have; the run holds
    only the encoder, whose step must refuse before it trains."""
    home = world.work / "launchpad-cuda"
    shutil.rmtree(home, ignore_errors=True)
    code = f"""
        import os

        import dagster as dg
        from llm2loss_pipeline.core.config import load_config
        from llm2loss_pipeline.defs.build import build_definitions

        config = load_config({str(TINY)!r}).model_copy(update={{"home": {str(home)!r}}})
        result = build_definitions(config).resolve_job_def("prepare").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
            asset_selection=[dg.AssetKey("semantic_encoder")],
            run_config={{"resources": {{"losses_device": {{"config": {{"device": "cuda:15"}}}}}}}},
        )
        for event in result.all_events:
            if event.event_type_value == "STEP_FAILURE":
                print(event.step_key + ": " + event.step_failure_data.error.message.strip())
        print("encoder written:", os.path.exists({str(home / "models" / "encoder")!r}))
        sys.exit(0 if result.success else 2)
    """
    result = child(code, timeout=600)
    verdict = classify(result, error=r"semantic_encoder: .*devices\.losses\.device: cuda:15")
    if "encoder written: True" in result.text:
        return "unclear error", "refused only after the encoder had trained: " + verdict[1]
    return verdict


@case("entry-point-output-count", "crash 5 / item 2")
def _(world: World):
    """A user model with 5 outputs and no label map: the default map needs one output per train
    identity (20 in the tiny world). Known only once the manifest existed, before."""
    env = _entry_point_module(
        world,
        "five",
        """
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    """,
    )
    home = world.work / "five-outputs"
    shutil.rmtree(home, ignore_errors=True)
    config = world.tiny_with(
        "five.yaml", "black_box: {source: entry_point, entry_point: 'five:build'}"
    )
    args = ["run", "--config", str(config), "--home", str(home), "--stage", "prepare"]
    result = llm2loss(*args, timeout=900, env=env)
    verdict = classify(result, error=r"5 outputs.*20 identities of the train split")
    if verdict[0] == "clear error" and home.exists():
        return "unclear error", "refused only after the run had started: " + verdict[1]
    return verdict


@case("env-limit-typo", "crash 5 / item 3")
def _(world: World):
    """`$LLM2LOSS_CPU_THREADS=two`: read only by the encoder step, it failed after the world was
    drawn; the preflight now reads every `$LLM2LOSS_...` limit first."""
    home = world.work / "env-typo"
    shutil.rmtree(home, ignore_errors=True)
    args = ["run", "--config", str(TINY), "--home", str(home), "--stage", "prepare"]
    result = llm2loss(*args, timeout=900, env={"LLM2LOSS_CPU_THREADS": "two"})
    verdict = classify(result, error=r"\$LLM2LOSS_CPU_THREADS='two' must be a whole number")
    if verdict[0] == "clear error" and home.exists():
        return "unclear error", "refused only after the run had started: " + verdict[1]
    return verdict


@case("flood-long-line", "crash 6")
def _(world: World):
    path = world.work / "configs" / "long-line.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("black_box: {epochs: [" + "1, " * 10_000_000 + "}\n")
    result = llm2loss("check-config", str(path), timeout=300)
    return classify(result, error=r"long-line\.yaml", max_error_chars=2000)


@case("flood-cr-only", "crash 6")
def _(world: World):
    path = world.work / "configs" / "cr-only.yaml"
    path.write_text("\r".join(["black_box:", "  epochs: 3", "  nonsense: [1, 2"] * 20_000))
    result = llm2loss("check-config", str(path), timeout=300)
    return classify(result, error=r"cr-only\.yaml", max_error_chars=2000)


# ---- security ---------------------------------------------------------------------------------


def _malicious(world: World, suffix: str) -> tuple[Path, Path]:
    marker = world.work / f"pwned{suffix}"
    marker.unlink(missing_ok=True)
    path = world.work / "models" / f"evil{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    child(f"""
        import pathlib, torch
        class Evil:
            def __reduce__(self):
                return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))
        torch.save({{"model": Evil()}}, {str(path)!r})
    """)
    return path, marker


@case("malicious-pt2", "security")
def _(world: World):
    path, marker = _malicious(world, ".pt2")
    home = world.clone("evil-pt2")
    config = world.tiny_with(
        "evil-pt2.yaml", f"black_box: {{source: torchscript, torchscript_path: {path}}}"
    )
    result = llm2loss(
        "run",
        "--config",
        str(config),
        "--home",
        str(home),
        "--stage",
        "prepare",
        "--quiet",
        timeout=900,
    )
    if marker.exists():
        return "silent wrong result", "the model file ran its code (marker file created)"
    return classify(result, error=r"evil\.pt2")


@case("malicious-pt", "security")
def _(world: World):
    path, marker = _malicious(world, ".pt")
    home = world.clone("evil-pt")
    config = world.tiny_with(
        "evil-pt.yaml", f"black_box: {{source: torchscript, torchscript_path: {path}}}"
    )
    result = llm2loss(
        "run",
        "--config",
        str(config),
        "--home",
        str(home),
        "--stage",
        "prepare",
        "--quiet",
        timeout=900,
    )
    if marker.exists():
        return "silent wrong result", "the model file ran its code (marker file created)"
    return classify(result, error=r"evil\.pt")


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    parser.add_argument("--only", help="comma-separated words; run the cases whose name has one")
    parser.add_argument("--json", help="write the outcomes to this file")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="llm2loss-redteam-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    world = World(work)
    words = [w for w in (args.only or "").split(",") if w]
    chosen = [c for c in CASES if not words or any(w in c[0] for w in words)]
    outcomes: list[Outcome] = []
    started = time.monotonic()
    for name, item, function in chosen:
        t0 = time.monotonic()
        try:
            result, detail = function(world)
        except SystemExit:
            raise
        except Exception as exc:  # the harness itself failed: count it, do not hide it
            result, detail = "unclear error", f"harness: {type(exc).__name__}: {exc}"[:240]
        outcome = Outcome(name, item, result, detail, round(time.monotonic() - t0, 1))
        outcomes.append(outcome)
        print(
            f"{name:<32} {item:<12} {result:<20} {outcome.seconds:>6.1f}s  {detail[:150]}",
            flush=True,
        )
    counts = Counter(o.result for o in outcomes)
    print(f"\n{len(outcomes)} cases in {time.monotonic() - started:.0f} s (work folder {work})")
    for cls in CLASSES:
        print(f"  {cls:<20} {counts.get(cls, 0)}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    bad = counts.get("silent wrong result", 0) + counts.get("traceback", 0) + counts.get("hang", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
