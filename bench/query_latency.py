"""Latency of text comparisons: 1,000 prompt pairs through `Diagnoser`, cold and warm.

    python bench/query_latency.py [--pairs 1000] [--threads 1]
    python bench/query_latency.py --home DIR [--repeats 3] [--pairs 1000]   # round two

With --home (a materialized home, e.g. after `make run`): side by side, the cold `llm2loss
compare A B --json` as a user runs it (a fresh process: wall and CPU seconds, median of
--repeats), with a text new to the home's text-embedding index (embedded by the default
loader: the numpy text tower for a caption_tuned encoder; and by the full torch encoder,
LLM2LOSS_TEXT_TOWER=torch, as round two did) and with known texts (nothing is embedded), next to
`python -c "import torch"` alone, and the warm per-pair
time of `compare_many` on one loaded Diagnoser (what `compare --pairs` and `ask` use), with the
home's default estimator (grounded where the home has images). Targets: cold <= 2 s, warm <= 1 ms
per pair.

Uses the pipeline's real encoder when `llm2loss_pipeline.core.encoder` can build it offline (the
caption_tuned build: frozen all-MiniLM-L6-v2 text tower; the image tower stays untrained, which
does not matter for latency), otherwise a hashing stand-in, and says which. The 20 heads are
trained briefly on random image embeddings of the encoder's dimension.

Printed side by side: the cold batch (every distinct text encoded once, in one `compare_many`
call), the warm batch (`compare_many` again, texts cached), and warm single calls (`compare(a, b)`
one pair at a time), and the warm batch grounded on 720 pool images. Target: warm <= 5 ms per
pair on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.heads import HeadsConfig, fit_gap, train_ensemble
from llm2loss_pipeline.core.query import TEXT_TOWER_ENV
from llm2loss_pipeline.diagnoser import Diagnoser


def prompt_texts() -> list[str]:
    try:
        from llm2loss_pipeline.core.prompts import attribute_prompt_pairs

        pairs = [pair for name in CELEBA_ATTRIBUTES for pair in attribute_prompt_pairs(name)]
        return list(dict.fromkeys(text for pair in pairs for text in pair))
    except ImportError:
        names = [name.replace("_", " ").lower() for name in CELEBA_ATTRIBUTES]
        return [f"face of a person {w} {n}" for n in names for w in ("with", "without")]


class HashingEncoder:
    """A stand-in text encoder: a random unit vector per word, summed and normalised."""

    def __init__(self, dim: int = 384) -> None:
        self.embed_dim = dim

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.embed_dim)

    def encode_texts(self, texts):
        rows = np.stack([sum(self._word(w) for w in t.split()) for t in texts])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def build_text_encoder():
    try:
        from llm2loss_pipeline.core.encoder import EncoderConfig, build_encoder

        encoder = build_encoder(EncoderConfig(mode="caption_tuned"), device="cpu")
        return encoder, f"real encoder: {encoder!r}"
    except Exception as exc:  # the bench still measures the head side without it
        return HashingEncoder(), f"hashing stand-in (real encoder unavailable: {exc})"


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one fresh process that must succeed."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def median_of(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))


def home_latency(home: str, n_pairs: int, repeats: int) -> None:
    """Round two: what a user waits for, cold and warm, on a materialized home."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [str(Path(sys.executable).with_name("llm2loss")), "compare"]
    if not Path(cli[0]).exists():
        cli = [sys.executable, "-m", "llm2loss_pipeline.cli", "compare"]
    known = ["face of an old male", "face of a young female"]
    timed_process([*cli, *known, "--home", home, "--json"], env)  # into the index, if new
    load_before = os.getloadavg()[0]
    full_env = {**env, TEXT_TOWER_ENV: "torch"}  # round two's path: torch, open_clip, encoder
    torch_runs, full_runs, new_runs, known_runs = [], [], [], []
    for repeat in range(repeats):
        torch_runs.append(timed_process([sys.executable, "-c", "import torch"], env))
        fresh = [f"face of a person number {time.time_ns()} {repeat}", known[1]]
        full_runs.append(timed_process([*cli, *fresh, "--home", home, "--json"], full_env))
        fresh = [f"face of a person number {time.time_ns()} {repeat}", known[1]]
        new_runs.append(timed_process([*cli, *fresh, "--home", home, "--json"], env))
        known_runs.append(timed_process([*cli, *known, "--home", home, "--json"], env))

    t0 = time.perf_counter()
    diagnoser = Diagnoser.load(home)
    load_s = time.perf_counter() - t0
    texts = prompt_texts()
    pairs = [(texts[i % len(texts)], texts[(7 * i + 3) % len(texts)]) for i in range(n_pairs)]
    first = diagnoser.compare_many(pairs)  # encodes new texts, reads the grounding pool
    t0 = time.perf_counter()
    warm = diagnoser.compare_many(pairs)
    warm_s = time.perf_counter() - t0
    assert [c.diffs for c in first] == [c.diffs for c in warm]
    t0 = time.perf_counter()
    for pair in pairs[:200]:
        diagnoser.compare_many([pair])  # one line of `ask` at a time
    ask_s = (time.perf_counter() - t0) / min(200, len(pairs))

    print(f"home {home}; estimator {warm[0].estimator}; {len(diagnoser.members)} members")
    print(f"cold, median of {repeats} fresh processes   wall s   CPU s")
    for name, runs in (
        ("python -c 'import torch' alone", torch_runs),
        ("compare, a new text, full encoder", full_runs),
        ("compare, a new text (default loader)", new_runs),
        ("compare, texts in the index", known_runs),
    ):
        wall, cpu = median_of(runs)
        print(f"  {name:<38} {wall:7.2f} {cpu:7.2f}")
    print(f"load average before the cold runs: {load_before:.1f}")
    source = "query snapshot" if type(diagnoser.ensemble).__name__ == "LazyEnsemble" else "heads"
    print(f"warm, one Diagnoser (loaded in {load_s:.2f} s from the {source})  ms per pair")
    print(f"  compare_many, {len(pairs)} pairs in one batch     {1000 * warm_s / len(pairs):8.3f}")
    print(f"  compare_many, one pair per call (ask)     {1000 * ask_s:8.3f}")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--home", help="measure cold CLI and warm batch latency on this home")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cold arm")
    args = parser.parse_args()
    if args.home:
        home_latency(args.home, args.pairs, args.repeats)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    encoder, description = build_text_encoder()
    print(f"{description}; built in {time.perf_counter() - t0:.1f} s", flush=True)
    dim = encoder.embed_dim
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4000, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    losses = np.exp(2.0 * images[:, 0] * np.sqrt(dim)) * rng.lognormal(0, 0.5, len(images))
    config = HeadsConfig(epochs=1, min_steps=0)
    texts = prompt_texts()
    gap = fit_gap(images, encoder.encode_texts(texts[:200]), "center")
    ensemble = train_ensemble(gap.image(images), losses, config)
    if hasattr(encoder, "clear_text_cache"):
        encoder.clear_text_cache()  # the cold arm below pays for encoding every text
    diagnoser = Diagnoser(encoder.encode_texts, ensemble, gap)
    pairs = [(texts[i % len(texts)], texts[(7 * i + 3) % len(texts)]) for i in range(args.pairs)]
    distinct = len({t for pair in pairs for t in pair})
    print(f"{len(ensemble)} heads, dim {dim}, {len(pairs)} pairs over {distinct} distinct texts")

    t0 = time.perf_counter()
    cold = diagnoser.compare_many(pairs)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = diagnoser.compare_many(pairs)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [diagnoser.compare(a, b) for a, b in pairs]
    single_s = time.perf_counter() - t0
    assert [c.diffs for c in cold] == [w.diffs for w in warm] == [s.diffs for s in single]
    diagnoser.use_pool(images[:720])  # the default world's evaluation split is 720 images
    diagnoser.compare_many(pairs, grounded=True)  # warms the encoder's text cache
    t0 = time.perf_counter()
    diagnoser.compare_many(pairs, grounded=True)
    grounded_s = time.perf_counter() - t0

    per = 1000.0 / len(pairs)
    print(f"cold compare_many (encode {distinct} texts once): {cold_s * per:7.3f} ms per pair")
    print(f"warm compare_many (cached)                : {warm_s * per:7.3f} ms per pair")
    print(f"warm compare(a, b), one call per pair     : {single_s * per:7.3f} ms per pair")
    print(f"warm compare_many(grounded=True), 720 imgs: {grounded_s * per:7.3f} ms per pair")
    print(f"cold / warm ratio: {cold_s / warm_s:.1f} x; target warm <= 5 ms per pair")


if __name__ == "__main__":
    main()
