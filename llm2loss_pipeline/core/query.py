"""The query engine behind `llm2loss_pipeline.Diagnoser`: text questions to the trained heads.

`llm2loss_pipeline/diagnoser.py` is its public face (a re-export, as `stats.py` is for
`core/stats.py`); the report and discovery steps import this module, never the public face, so
that the layers point one way (pyproject.toml, [tool.importlinter]).

A text is embedded by the encoder's text tower, moved across the modality gap (`gap.text`) and fed
to every head; outputs are standardised per member (core/heads/ensemble.py), so every number here
is in "standard deviations of that member's predicted loss over the training images". Higher means
the black box is expected to do worse on inputs like the text. The spread over members is the
uncertainty (paper, Figure 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from llm2loss_pipeline.core.attribute_set import attribute_set_path, phrasings_of
from llm2loss_pipeline.core.device import resolve_device
from llm2loss_pipeline.core.encoder.text_index import (  # noqa: F401  (TEXT_INDEX_DIR: re-exported)
    TEXT_INDEX_DIR,
    TextIndex,
    text_index,
)
from llm2loss_pipeline.core.heads.compare import (
    OVERALL,
    Comparison,
    Spread,
    compare_members,
    kind_groups,
    rank_texts,
)
from llm2loss_pipeline.core.heads.gap import ModalityGap
from llm2loss_pipeline.core.heads.probe_reading import PROBE_SHARE, ProbeReading, probe_readings
from llm2loss_pipeline.core.heads.within_class import (
    MIN_CLASS_IMAGES,
    ClassScope,
    shared_class,
    side_words,
)
from llm2loss_pipeline.core.layout import Layout
from llm2loss_pipeline.core.members import MemberInfo
from llm2loss_pipeline.core.prompts import shows_nothing
from llm2loss_pipeline.core.report.calibration import Calibration
from llm2loss_pipeline.core.report.grounded import grounded_diffs, pool_weights, probe_basis
from llm2loss_pipeline.core.storage import StorageError, existing_dir, sha256_bytes

if TYPE_CHECKING:  # torch: imported only when a text must be scored by the heads themselves
    from llm2loss_pipeline.core.heads.ensemble import HeadEnsemble

EncodeTexts = Callable[[Sequence[str]], np.ndarray]
EncoderLoader = Callable[[Path, str], Any]
RUN_COMMAND = "llm2loss run"
CACHE_LIMIT = 100_000
POOL_SEED = 0  # fixed: a grounded comparison gives the same numbers every time
# written by the report (core/report/build.py); plain names here keep this module off the report's
# heavy imports (matplotlib) at query time
CALIBRATION_FILE = "calibration.json"
ATTRIBUTE_TABLE = "attribute_disparity.parquet"
PROBES_FILE = "probes.safetensors"
ENCODER_SIDECAR = "encoder.json"  # core/encoder/checkpoint.py writes it last, with the sha256
HEADS_INDEX = "ensemble.json"  # core/heads/checkpoint.INDEX, named here to keep torch out
SNAPSHOT_DIR = ("cache", "query")  # under the home: <key>.safetensors (QuerySnapshot)
SNAPSHOT_FORMAT = "llm2loss-query-snapshot/2"  # 2: the pool's target classes
TEXT_TOWER_ENV = "LLM2LOSS_TEXT_TOWER"  # "torch": embed new texts with the full encoder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StorageError(f"{path}: not readable JSON ({exc}); rebuild the report") from exc
    if not isinstance(data, dict):
        raise StorageError(f"{path}: expected a JSON object; rebuild the report")
    return data


@dataclass(frozen=True)
class DiscoveryReport:
    """What `Diagnoser.discover` found: ranked hypotheses (polars) and their evidence samples."""

    table: Any
    """the top hypotheses, ranked (columns of core/discovery/hypotheses.HYPOTHESIS_COLUMNS)"""
    evidence: Any
    """proponent and counter-example sample ids of the kept hypotheses among them"""
    n_candidates: int
    n_kept: int
    shared: tuple[Any, ...] = ()
    """labelled values most failure modes' images show (core/discovery/shared.SharedTrait)"""

    @property
    def kept(self) -> Any:
        return self.table.filter(self.table["kept"])

    def to_dicts(self) -> list[dict[str, Any]]:
        return self.table.to_dicts()


class NotMaterializedError(StorageError):
    """The encoder or the heads have not been materialized under this home yet."""


def _load_heads(heads_dir: Path, identity: tuple[str, int], build: Callable[..., Any]) -> Any:
    """`build(ensemble, gap, index record)` of the heads, checked against the encoder's
    (sha256, dim): HeadMismatchError for another encoder, StorageError if damaged."""
    # lazy: torch, +930 modules and 2.0 s that a question answered from the snapshot never needs
    from llm2loss_pipeline.core.heads.checkpoint import load_ensemble

    return build(
        *load_ensemble(heads_dir, expected_dim=identity[1], expected_encoder_sha256=identity[0])
    )


def default_encoder_loader(encoder_dir: Path, device: str) -> Any:
    """What embeds a text the index does not know: for a caption_tuned encoder its text tower
    in numpy (`core/encoder/numpy_text.py`: 0.3 s, no torch; equal to the torch tower's
    embeddings within 1e-6), else the pipeline's encoder (`core.encoder.load_encoder`: torch,
    open_clip and transformers, about 8 s of CPU here). LLM2LOSS_TEXT_TOWER=torch asks for the
    full encoder whatever the mode. Only the text tower is used here, so the numpy one runs on
    the CPU whatever `device` says."""
    if os.environ.get(TEXT_TOWER_ENV, "auto") != "torch":
        # lazy: ftfy and tokenizers, 50 ms that a question about known texts never needs
        from llm2loss_pipeline.core.encoder.numpy_text import (
            TowerUnavailable,
            load_numpy_text_tower,
        )

        try:
            return load_numpy_text_tower(encoder_dir)
        except TowerUnavailable:  # another mode or text tower: the full encoder embeds it
            pass
    # lazy: torch, +930 modules and 2.8 s of `llm2loss compare`'s cold start on known texts
    from llm2loss_pipeline.core.encoder import load_encoder

    return load_encoder(encoder_dir, device)


def _encoder_identity(encoder_dir: Path) -> tuple[str, int] | None:
    """(weights sha256, embed_dim) from the encoder's sidecar, or None where it has none (then
    the encoder is loaded at once, as before)."""
    try:
        sidecar = json.loads((encoder_dir / ENCODER_SIDECAR).read_text(encoding="utf-8"))
        sha256, dim = sidecar["sha256"], sidecar["embed_dim"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(sha256, str) or len(sha256) != 64 or not isinstance(dim, int):
        return None
    return sha256, dim


class LazyTextEncoder:
    """`encode_texts` of the home's encoder, loaded on the first text the index does not know."""

    def __init__(self, load: Callable[[], Any], sha256: str, index: TextIndex) -> None:
        self._load, self.sha256, self.index = load, sha256, index
        self.encoder: Any = None

    def __repr__(self) -> str:
        state = repr(self.encoder) if self.encoder is not None else "not loaded yet"
        return f"encoder {self.sha256[:12]} ({state})"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        known = self.index.lookup(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            if self.encoder is None:
                self.encoder = self._load()
                if str(self.encoder.sha256) != self.sha256:
                    raise StorageError(
                        f"the encoder's weights ({str(self.encoder.sha256)[:12]}) changed since "
                        f"its {ENCODER_SIDECAR} ({self.sha256[:12]}) was read; ask again"
                    )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                new = np.asarray(self.encoder.encode_texts(missing), dtype=np.float32)
            for warning in caught:  # passed on, and such a batch is not remembered: a later
                warnings.warn_explicit(  # question about the same text gets the note again
                    warning.message, warning.category, warning.filename, warning.lineno
                )
            if new.shape != (len(missing), self.index.dim):
                raise ValueError(
                    f"the text encoder returned shape {new.shape} for {len(missing)} texts; "
                    f"the heads expect [n, {self.index.dim}]"
                )
            known.update(zip(missing, new, strict=True))
            if not caught:
                self.index.add(missing, new)
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, self.index.dim))


class LazyEnsemble:
    """The head ensemble as a grounded question needs it: its members and input dimension, from
    the query snapshot. The ensemble itself (torch: seconds to import) loads on first use of
    anything else (scoring texts directly, discovery)."""

    def __init__(
        self, members: Sequence[MemberInfo], embedding_dim: int, load: Callable[[], Any]
    ) -> None:
        self.members = tuple(members)
        self.embedding_dim = int(embedding_dim)
        self._load, self._real = load, None

    def __len__(self) -> int:
        return len(self.members)

    def real(self) -> HeadEnsemble:
        if self._real is None:
            self._real = self._load()
        return self._real

    def standardized(self, emb: Any) -> np.ndarray:
        return self.real().standardized(emb)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not delegated: copy and pickle probe these before __init__
            raise AttributeError(name)
        return getattr(self.real(), name)


def snapshot_key(layout: Layout, heads_dir: Path, encoder_sha256: str) -> str:
    """What a query snapshot depends on: the encoder, the heads' index, and every file of the
    heads and every table the grounding pool is read from (name, size, modification time)."""

    digest = hashlib.sha256(f"{SNAPSHOT_FORMAT}\0{encoder_sha256}\n".encode())
    # the heads' index lists the sha256 of every member file: new heads, a new key, whatever
    # their files' times say
    digest.update((heads_dir / HEADS_INDEX).read_bytes())
    for folder in (heads_dir, layout.tables):
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        for path in files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_snapshot(path: Path, diagnoser: Diagnoser) -> None:
    """Save what a grounded question reads (members, modality gap, index record, grounding
    pool) so that the next process answers without torch; the older snapshots go."""

    features, scores, weights = diagnoser.grounding_pool()
    meta = {k: v for k, v in diagnoser.meta.items() if k not in ("home", "encoder")}
    header = {
        "format": SNAPSHOT_FORMAT,
        "members": json.dumps([m.to_dict() for m in diagnoser.ensemble.members]),
        "embedding_dim": str(diagnoser.ensemble.embedding_dim),
        "gap_mode": diagnoser.gap.mode,
        "meta": json.dumps(meta),
    }
    arrays = {
        "gap_image_mean": diagnoser.gap.image_mean,
        "gap_text_mean": diagnoser.gap.text_mean,
        "pool_features": features,
        "pool_scores": scores,
        "pool_weights": weights,
    }
    if diagnoser.pool_classes is not None:
        arrays["pool_classes"] = diagnoser.pool_classes
    if diagnoser.class_counts is not None:
        header["class_count_names"] = json.dumps(list(diagnoser.class_counts[0]))
        arrays["pool_class_counts"] = diagnoser.class_counts[1]
    data = save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=header)
    try:  # a read-only home still answers; the next process only stays slower
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_bytes(data)
        os.replace(staging, path)
        for old in path.parent.glob("*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def read_snapshot(path: Path) -> tuple[list[MemberInfo], int, ModalityGap, dict, tuple] | None:
    """(members, embedding_dim, gap, index record, (pool, (pool classes, class counts))) of a
    snapshot, or None where there is none or it cannot be read (then the heads load as before,
    and write a new one)."""

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
            if header.get("format") != SNAPSHOT_FORMAT:
                return None
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        members = [MemberInfo(**m) for m in json.loads(header["members"])]
        gap = ModalityGap(arrays["gap_image_mean"], arrays["gap_text_mean"], header["gap_mode"])
        pool = (arrays["pool_features"], arrays["pool_scores"], arrays["pool_weights"])
        meta = json.loads(header["meta"])
        counts = None
        if "pool_class_counts" in arrays:
            names = tuple(json.loads(header["class_count_names"]))
            counts = (names, arrays["pool_class_counts"])
        classes = (arrays.get("pool_classes"), counts)
        return members, int(header["embedding_dim"]), gap, meta, (pool, classes)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def _class_counts(frame: pl.DataFrame, classes: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """(attributes, counts [attributes, 2, 2]): per boolean attribute column of `frame`, per
    class of the target (0, 1), its images labelled without and with it."""
    names = tuple(name for name, dtype in frame.schema.items() if dtype == pl.Boolean)
    counts = np.zeros((len(names), 2, 2), dtype=np.int64)
    for k, name in enumerate(names):
        labels = frame[name].cast(pl.Int8).fill_null(-1).to_numpy()  # -1: not labelled
        for value in (0, 1):
            in_class = labels[classes == value]
            counts[k, value] = (int((in_class == 0).sum()), int((in_class == 1).sum()))
    return names, counts


def _report_answers(table: Path) -> dict[str, tuple[Any, Any]] | None:
    """attribute -> (est_p_worse, probe_resolves) from the report's attribute table; None when
    the table predates those columns. An unreadable table names itself."""
    columns = ["attribute", "est_p_worse", "probe_resolves"]
    try:
        if not set(columns) <= set(pl.read_parquet_schema(table)):
            return None
        frame = pl.read_parquet(table, columns=columns)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StorageError(f"{table}: unreadable ({exc}); rebuild the report") from exc
    return {row[0]: row[1:] for row in frame.iter_rows()}


def check_texts(texts: Iterable[Any], labels: Sequence[str] | None = None) -> list[str]:
    """Texts as a list, with a ValueError naming the first empty or non-string one."""
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got a single string")
    result = list(texts)
    for position, text in enumerate(result):
        label = labels[position] if labels is not None else f"text {position + 1}"
        if not isinstance(text, str):
            raise ValueError(f"{label} is a {type(text).__name__}, not a string")
        if shows_nothing(text):
            raise ValueError(
                f"{label} is empty: give a description such as 'a person wearing glasses'"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # undecodable bytes from argv arrive as surrogates
            raise ValueError(
                f"{label} is not valid UTF-8 text (an undecodable byte at character {exc.start})"
            ) from exc
    return result


class Diagnoser:
    """Text queries against one encoder and one head ensemble.

    `encode_texts` maps texts to L2-normalised text embeddings [n, d]; `ensemble` and `gap` are the
    trained heads and the modality-gap map (`load_ensemble`); `meta` is their index record.
    """

    def __init__(
        self,
        encode_texts: EncodeTexts,
        ensemble: HeadEnsemble,
        gap: ModalityGap,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if gap.dim != ensemble.embedding_dim:
            raise ValueError(
                f"modality gap has dimension {gap.dim} but the heads take {ensemble.embedding_dim}"
            )
        self.encode_texts = encode_texts
        self.ensemble = ensemble
        self.gap = gap
        self.meta = dict(meta or {})
        self._scores: dict[str, np.ndarray] = {}
        self._pool: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.pool_classes: np.ndarray | None = None
        """per pool image, its label of an attribute task's target (1, 0; -1 unknown), else None"""
        self.class_counts: tuple[tuple[str, ...], np.ndarray] | None = None
        """(attributes, [attributes, 2, 2] counts): per attribute, per class of the target (0, 1),
        the pool images labelled without and with it (`_class_counts`), else None"""
        self._class_words: tuple[str, tuple[frozenset[str], frozenset[str]]] | tuple[()] | None = (
            None
        )
        self._calibration: dict[str, Calibration | None] = {}
        self._probes: tuple[np.ndarray, np.ndarray] | tuple[()] | None = None
        self._snapshot: Path | None = None  # where to save the query snapshot (Diagnoser.load)
        self._basis: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
        self._probe_answers: tuple[list[str], np.ndarray, np.ndarray] | tuple[()] | None = None

    def __repr__(self) -> str:
        return f"Diagnoser({len(self.ensemble)} members, dim {self.ensemble.embedding_dim})"

    @classmethod
    def load(
        cls,
        home: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        *,
        encoder_loader: EncoderLoader | None = None,
    ) -> Diagnoser:
        """The encoder and heads of the latest materialization under `home` (or LLM2LOSS_HOME).

        Raises NotMaterializedError when either is missing, HeadMismatchError when the heads were
        trained on another encoder than the one saved now, StorageError when files are damaged.
        """
        if str(device) != "cpu":  # resolving imports torch; "cpu" is already a torch device
            device = resolve_device(str(device))  # "auto", torch.device objects, a clear error
        device = str(device)
        layout = Layout.at(home)
        # existing_dir: a run killed while it swapped in a new folder leaves the old one aside.
        encoder_dir, heads_dir = existing_dir(layout.encoder_dir), existing_dir(layout.heads_dir)
        missing = []
        if not encoder_dir.is_dir() or not any(encoder_dir.iterdir()):
            missing.append(f"the encoder ({layout.encoder_dir})")
        if not (heads_dir / HEADS_INDEX).is_file():
            missing.append(f"the diagnosis heads ({layout.heads_dir / HEADS_INDEX})")
        if missing:
            raise NotMaterializedError(
                f"nothing to query under {layout.home}: {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not materialized yet; "
                f"run `{RUN_COMMAND}` (with --home {layout.home} or LLM2LOSS_HOME set) first"
            )
        loader = encoder_loader or default_encoder_loader
        identity = _encoder_identity(encoder_dir)
        if identity is None:  # no sidecar to read the identity from: load the encoder now
            encoder = loader(encoder_dir, device)
            identity = (str(encoder.sha256), int(encoder.embed_dim))
            return cls._with_heads(encoder.encode_texts, repr(encoder), heads_dir, layout, identity)
        # the encoder (open_clip, seconds) waits for the first text never seen before
        index = text_index(layout.home, *identity)
        lazy = LazyTextEncoder(lambda: loader(encoder_dir, device), identity[0], index)
        snapshot = layout.home.joinpath(
            *SNAPSHOT_DIR, f"{snapshot_key(layout, heads_dir, identity[0])}.safetensors"
        )
        found = read_snapshot(snapshot)
        if found is None:
            diagnoser = cls._with_heads(lazy, repr(lazy), heads_dir, layout, identity)
            diagnoser._snapshot = snapshot  # written once the grounding pool has been read
            return diagnoser
        members, dim, gap, meta, pool = found
        ensemble = LazyEnsemble(
            members, dim, lambda: _load_heads(heads_dir, identity, lambda e, g, m: e)
        )
        meta = {**meta, "home": str(layout.home), "encoder": repr(lazy)}
        diagnoser = cls(lazy, ensemble, gap, meta)  # type: ignore[arg-type]
        diagnoser._pool, (diagnoser.pool_classes, diagnoser.class_counts) = pool
        return diagnoser

    @classmethod
    def _with_heads(
        cls, encode_texts: EncodeTexts, encoder: str, heads_dir: Path, layout: Layout, identity
    ) -> Diagnoser:
        def build(ensemble, gap, meta):
            return cls(
                encode_texts, ensemble, gap, {**meta, "home": str(layout.home), "encoder": encoder}
            )

        return _load_heads(heads_dir, identity, build)

    @property
    def members(self) -> list[MemberInfo]:
        return list(self.ensemble.members)

    # scores

    def score_texts(self, texts: Sequence[str], labels: Sequence[str] | None = None) -> np.ndarray:
        """Standardised member scores [M, T]; new texts are encoded in one batch, then cached."""
        texts = check_texts(texts, labels)
        missing = list(dict.fromkeys(t for t in texts if t not in self._scores))
        if missing:
            embeddings = np.asarray(self.encode_texts(missing), dtype=np.float32)
            if embeddings.shape != (len(missing), self.ensemble.embedding_dim):
                raise ValueError(
                    f"the text encoder returned shape {embeddings.shape} for {len(missing)} texts; "
                    f"the heads expect [n, {self.ensemble.embedding_dim}]"
                )
            scores = self.ensemble.standardized(self.gap.text(embeddings))
            if len(self._scores) + len(missing) > CACHE_LIMIT:
                self._scores.clear()
            for column, text in enumerate(missing):
                self._scores[text] = scores[:, column]
        if not texts:
            return np.zeros((len(self.ensemble), 0))
        return np.stack([self._scores[t] for t in texts], axis=1)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Texts in the heads' input space [n, d] (encoded, then mapped across the modality gap)."""
        texts = check_texts(texts)
        return self.gap.text(np.asarray(self.encode_texts(texts), dtype=np.float32))

    def image_features(self, embeddings: np.ndarray) -> np.ndarray:
        """Image embeddings [n, d] in the heads' input space."""
        return self.gap.image(embeddings)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """Standardised member scores [M, n] of points already in the heads' input space."""
        return self.ensemble.standardized(features)

    def estimate(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Per text: the ensemble mean and spread (std, quartiles, range), per kind and overall."""
        texts = check_texts(texts)
        scores = self.score_texts(texts)
        groups = kind_groups(self.ensemble.members)
        rows = []
        for t, text in enumerate(texts):
            per_group = {name: Spread.of(scores[idx, t]).to_dict() for name, idx in groups.items()}
            rows.append({"text": text, **per_group[OVERALL], "groups": per_group})
        return rows

    # comparisons

    def compare(self, text_a: str, text_b: str, *, grounded: bool | None = None) -> Comparison:
        """Distribution over members of h(a) - h(b); positive: the model does worse on a.

        grounded (default: whenever this diagnoser has images, i.e. was loaded from a home):
        answer on the evaluation images instead of the texts' own embeddings: per member, the
        covariance of its predicted loss with the images' score along "a rather than b", each
        member on its own bootstrap resample of the evaluation identities
        (core/report/grounded.py). The texts' difference is asked in the report's probe basis,
        and P(A worse) is calibrated with the report's text-side error
        (core/report/calibration.py) when the report has been built; where one probe holds most
        of the question, P(A worse) is the report's own answer for that attribute
        (core/heads/probe_reading.py; `Comparison.asked_as_probe`). Two texts that both name one
        class of an attribute task's target ("a blond man" vs "a blond woman", for a Blond_Hair
        classifier) are asked among that class's images only (core/heads/within_class.py;
        `Comparison.scope`).
        """
        return self.compare_many([(text_a, text_b)], grounded=grounded)[0]

    def compare_many(
        self, pairs: Sequence[tuple[str, str]], *, grounded: bool | None = None
    ) -> list[Comparison]:
        """Many comparisons, with every distinct text encoded once, in one batch."""
        pairs = list(pairs)
        for position, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2:  # ("ab", "cd") is not two pairs
                raise ValueError(
                    f"pair {position + 1} is {pair!r}: each pair is two texts, (text_a, text_b)"
                )
        labels = [f"text {'AB'[k]} of pair {p + 1}" for p in range(len(pairs)) for k in range(2)]
        if len(pairs) == 1:
            labels = ["text A", "text B"]
        flat = [text for pair in pairs for text in pair]
        members = self.ensemble.members
        if self._grounded(grounded):
            features = self.text_features(check_texts(flat, labels))
            directions = features[0::2] - features[1::2]
            scopes = [self._scope(pair) for pair in pairs]
            diffs, explained = self._grounded_diffs(directions, scopes)
            calibration = self.calibration("grounded")
            readings = self._probe_readings(directions)
            scopes = self._with_probe_sides(scopes, readings)
            return [
                compare_members(
                    diffs[:, p],
                    members,
                    a,
                    b,
                    "grounded",
                    calibration,
                    explained[p],
                    readings[p],
                    scopes[p],
                )
                for p, (a, b) in enumerate(pairs)
            ]
        scores = self.score_texts(flat, labels=labels)
        calibration = self.calibration("direct")
        return [
            compare_members(
                scores[:, 2 * p] - scores[:, 2 * p + 1], members, a, b, "direct", calibration
            )
            for p, (a, b) in enumerate(pairs)
        ]

    def _grounded(self, grounded: bool | None) -> bool:
        if grounded is None:  # grounded wherever there are images to ground on
            home = self.meta.get("home")
            return self._pool is not None or (
                home is not None and Layout.at(home).manifest.exists()
            )
        return grounded

    def _grounded_diffs(
        self, directions: np.ndarray, scopes: Sequence[ClassScope | None] | None = None
    ) -> tuple[np.ndarray, list[float | None]]:
        """[members, q] grounded estimates of text directions [q, d], and per direction the
        share the report's probes span (None without the report's probes). A direction with a
        scope (`_scope`) is grounded on the images of its class only."""

        explained: list[float | None] = [None] * len(directions)
        probes = self.probes()
        if probes is not None and self._basis is None:  # its solve is done once per session
            self._basis = probe_basis(*probes)
        # Two texts with one embedding (the same text) differ by nothing; grounding would fail
        # on their zero direction, which scores every pool image alike.
        apart = np.linalg.norm(directions, axis=1) > 0.0
        if probes is not None and apart.any():
            mapped, share = self._basis(directions[apart])  # type: ignore[misc]
            directions = directions.astype(np.float64)
            directions[apart] = mapped
            for position, value in zip(np.flatnonzero(apart), share, strict=True):
                explained[int(position)] = float(value)
            apart &= np.linalg.norm(directions, axis=1) > 0.0
        diffs = np.zeros((len(self.ensemble), len(directions)))
        if apart.any():
            pool, scores, weights = self.grounding_pool()
            # each direction once: over all images, or within its class (one batch per class)
            values = [None if scope is None else scope.value for scope in scopes or ()]
            values += [None] * (len(directions) - len(values))
            for value in (None, True, False):
                columns = apart & np.array([v is value for v in values])
                if not columns.any():
                    continue
                within = weights if value is None else weights * (self.pool_classes == int(value))
                diffs[:, columns] = grounded_diffs(scores, pool, directions[columns], within)
        return diffs, explained

    def _scope(self, texts: Sequence[str]) -> ClassScope | None:
        """The class of an attribute task's target that all `texts` name, where they are to be
        asked among its images only (core/heads/within_class.py); None for other tasks, texts
        that name no one class, or a class too few pool images have for every member to draw."""
        found = self.class_words()
        if found is None:
            return None
        target, words = found
        side = shared_class(texts, words)
        if side is None:
            return None
        _, _, weights = self.grounding_pool()  # reads the pool's classes too
        if self.pool_classes is None:
            return None
        mask = self.pool_classes == int(side)
        if mask.sum() < MIN_CLASS_IMAGES or not (weights[:, mask].sum(axis=1) > 0).all():
            return None
        return ClassScope(target, side, int(mask.sum()))

    def class_words(self) -> tuple[str, tuple[frozenset[str], frozenset[str]]] | None:
        """(an attribute task's target, the words that name each of its sides), read once from
        the home's attribute set; None for another task or without a home."""
        if self._class_words is None:
            found: tuple[str, tuple[frozenset[str], frozenset[str]]] | tuple[()] = ()
            home = self.meta.get("home")
            if home is not None and attribute_set_path(Layout.at(home)).is_file():
                with phrasings_of(Layout.at(home)) as attribute_set:
                    if attribute_set.target is not None:
                        target = attribute_set.target
                        found = (target, side_words(target, attribute_set.attributes))
            self._class_words = found
        return self._class_words or None  # type: ignore[return-value]

    def _probe_readings(self, directions: np.ndarray) -> list[ProbeReading | None]:
        """Per text direction [q, d], the report probe holding most of it and the report's
        answer for that probe (all None before a report; core/heads/probe_reading.py)."""
        probes, answers = self.probes(), self.probe_answers()
        if probes is None or answers is None:
            return [None] * len(directions)
        coefficients = np.asarray(directions, dtype=np.float64) @ probes[1].T  # c = duals @ t
        return probe_readings(coefficients, *answers)

    def probe_answers(self) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """The report's attributes in its probes' order, with its calibrated P(worse with each)
        and whether it tests each probe; None before a grounded report, or for a report from
        before those columns (its questions are answered as free text, as they were)."""
        if self._probe_answers is None:  # an unreadable table raises now and on every ask
            calibration = self._report_file(CALIBRATION_FILE)
            table = self._report_file(ATTRIBUTE_TABLE)
            attributes = _read_json(calibration).get("attributes") if calibration else None
            rows = _report_answers(table) if attributes and table is not None else None
            found: tuple[list[str], np.ndarray, np.ndarray] | tuple[()] = ()
            if rows is not None and set(rows) == set(attributes):  # one report run wrote both
                p_worse = np.array([rows[a][0] for a in attributes], dtype=np.float64)
                resolves = np.array([bool(rows[a][1]) for a in attributes])
                found = (list(attributes), p_worse, resolves)
            self._probe_answers = found
        return self._probe_answers or None  # type: ignore[return-value]

    def _report_file(self, name: str) -> Path | None:
        if "home" not in self.meta:
            return None
        path = Layout.at(self.meta["home"]).reports / name
        return path if path.is_file() else None

    def calibration(self, estimator: str) -> Calibration | None:
        """The report's calibration of `estimator` (None before a report, or for another
        estimator than the report's): its scale and text-side error."""
        if estimator not in self._calibration:
            path = self._report_file(CALIBRATION_FILE)
            found = None
            if path is not None:
                data = _read_json(path)
                if data.get("estimator") == estimator:
                    found = Calibration.from_json(data)
            self._calibration[estimator] = found
        return self._calibration[estimator]

    def probes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The report's probe directions and their duals, checked against calibration.json."""
        if self._probes is None:
            calibration, weights = self._report_file(CALIBRATION_FILE), None
            if calibration is not None:
                weights = self._report_file(PROBES_FILE)
            if weights is None:
                self._probes = ()
                return None
            data = weights.read_bytes()
            expected = _read_json(calibration).get("probes_sha256")  # type: ignore[arg-type]
            if expected != sha256_bytes(data):
                raise StorageError(
                    f"{weights}: its sha256 does not match {calibration}; rebuild the report"
                )

            arrays = load_arrays(data)
            if arrays["directions"].shape[1] != self.ensemble.embedding_dim:
                raise StorageError(f"{weights}: probes of another dimension than the heads'")
            self._probes = (arrays["directions"], arrays["duals"])
        return self._probes or None  # type: ignore[return-value]

    def use_pool(
        self,
        embeddings: np.ndarray,
        groups: np.ndarray | None = None,
        classes: np.ndarray | None = None,
    ) -> None:
        """Ground comparisons on these image embeddings [n, d] instead of the home's images;
        `groups` (an identity per image) makes the bootstrap resample whole identities, and
        `classes` (an attribute task's target label per image: 1, 0, or -1 unknown) lets texts
        that name one class be asked among its images (for a diagnoser loaded from the home of
        an attribute task, whose attribute set says which words name the target)."""

        features = self.image_features(embeddings)
        if len(features) < 2:
            raise ValueError(f"a grounding pool needs at least 2 images, got {len(features)}")
        scores = self.score_features(features)
        weights = pool_weights(len(scores), len(features), POOL_SEED, groups)
        if classes is not None and len(classes) != len(features):
            raise ValueError(f"{len(classes)} classes for {len(features)} pool images")
        self._pool = (features, scores, weights)
        self.pool_classes = None if classes is None else np.asarray(classes, dtype=np.int8)
        self.class_counts = None  # another pool's; the home's pool sets its own after this

    def grounding_pool(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image features [n, d], member scores [M, n], bootstrap weights [M, n]) of the
        heads' evaluation split, read once from the home this diagnoser was loaded from."""
        if self._pool is None:
            # lazy: the steps import torch (+950 modules, 2.6 s); a snapshot brings its own pool
            from llm2loss_pipeline.core.steps.diagnosis import training_frame
            from llm2loss_pipeline.core.steps.tables import read_manifest, split_rows

            if "home" not in self.meta:
                raise ValueError(
                    "grounded comparisons need images: load with Diagnoser.load(home) or call "
                    "use_pool(embeddings) first"
                )
            layout = Layout.at(self.meta["home"])
            split = str(self.meta.get("extra", {}).get("eval_split", "test"))
            frame = split_rows(training_frame(layout), split, "eval_split")
            identity = read_manifest(layout).select("sample_id", "identity")
            frame = frame.join(identity, on="sample_id", how="left", maintain_order="left")
            groups = np.array(
                [
                    f"i{i}" if i is not None else f"s{s}"
                    for i, s in zip(frame["identity"], frame["sample_id"], strict=True)
                ]
            )
            classes = self._target_classes(frame)
            self.use_pool(
                np.asarray(frame["embedding"].to_list(), dtype=np.float32), groups, classes
            )
            self.class_counts = None if classes is None else _class_counts(frame, classes)
            if self._snapshot is not None:
                write_snapshot(self._snapshot, self)
        return self._pool  # type: ignore[return-value]

    def _target_classes(self, frame: pl.DataFrame) -> np.ndarray | None:
        """The attribute task's target label of each sample of the pool's frame (1, 0; -1 where
        unlabelled): `training_frame` already joined the attribute table."""
        found = self.class_words()
        if found is None or found[0] not in frame.columns:
            return None
        return frame[found[0]].cast(pl.Int8).fill_null(-1).to_numpy()

    def _with_probe_sides(
        self, scopes: Sequence[ClassScope | None], readings: Sequence[ProbeReading | None]
    ) -> list[ClassScope | None]:
        """Each scope with what its class holds of the attribute whose probe holds its question
        (`ClassScope.probe_sides`); unchanged where no probe holds it."""
        out = list(scopes)
        for q, (scope, reading) in enumerate(zip(scopes, readings, strict=True)):
            if scope is not None and reading is not None and reading.share >= PROBE_SHARE:
                sides = self.class_sides(scope, reading.attribute)
                out[q] = dataclasses.replace(scope, probe_sides=sides)
        return out

    def class_sides(self, scope: ClassScope, attribute: str) -> tuple[int, int] | None:
        """Among the pool images of the scope's class, how many are labelled with `attribute`
        and how many without; None where the labels are not known."""
        if self.class_counts is None or attribute not in self.class_counts[0]:
            return None
        counts = self.class_counts[1][self.class_counts[0].index(attribute), int(scope.value)]
        return int(counts[1]), int(counts[0])

    def rank(self, texts: Sequence[str], *, grounded: bool | None = None) -> list[dict[str, Any]]:
        """Texts ordered by estimated loss, worst first, with q1..q3 and min..max intervals.

        grounded (default as for `compare`): each text is asked as its contrast with the mean of
        the texts ranked with it, on the evaluation images; the scores then say how much worse
        than the average of these texts, in the units of `compare`, and each row carries
        `compare`'s calibrated P(worse) against that average and its verdict
        (core/heads/compare.py `rank_texts`).
        """
        texts = check_texts(texts)
        if not texts:
            raise ValueError("rank needs at least one text")
        if self._grounded(grounded) and len(texts) > 1:
            features = self.text_features(texts)
            contrasts = features - features.mean(axis=0)
            scopes = [self._scope(texts)] * len(texts)  # one class all name: ranked within it
            diffs, _ = self._grounded_diffs(contrasts, scopes)
            calibration = self.calibration("grounded")
            readings = self._probe_readings(contrasts)
            scopes = self._with_probe_sides(scopes, readings)
            members = self.ensemble.members
            return rank_texts(texts, diffs, members, "grounded", calibration, readings, scopes)
        return rank_texts(texts, self.score_texts(texts), self.ensemble.members, "direct")

    # discovery

    def discover(
        self,
        top: int | None = 10,
        vocab: str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        config: Any = None,
        home: str | os.PathLike[str] | None = None,
    ) -> DiscoveryReport:
        """Failure hypotheses in language (core/discovery): candidate descriptions scored by the
        heads and verified on the evaluation split's samples, best first.

        `vocab`: extra descriptions, as a list or a text file (one per line); `config`: a
        DiscoveryConfig (default: the defaults); `home`: where the losses and embeddings are
        (default: the home this diagnoser was loaded from). Nothing is written.
        """
        # lazy: these three: the discovery config and vocabulary reader add 30 ms to every
        # `compare`, and the discovery step imports torch (+965 modules, 2.4 s)
        from llm2loss_pipeline.core.discovery.candidates import read_vocabulary
        from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
        from llm2loss_pipeline.core.steps.discovery import compute_discovery

        if isinstance(self.ensemble, LazyEnsemble):  # discovery runs the heads themselves
            self.ensemble = self.ensemble.real()
        if top is not None and top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        if vocab is None:
            texts: list[str] = []
        elif isinstance(vocab, str | os.PathLike):
            texts = read_vocabulary(vocab)
        else:
            texts = check_texts(vocab, [f"vocabulary entry {i + 1}" for i in range(len(vocab))])
        layout = Layout.at(home if home is not None else self.meta.get("home"))
        if not layout.manifest.exists():
            raise NotMaterializedError(
                f"nothing to discover under {layout.home}: the dataset manifest "
                f"({layout.manifest}) is not materialized yet; run `{RUN_COMMAND}` first"
            )
        result = compute_discovery(layout, config or DiscoveryConfig(), self, vocabulary=texts)
        table = result.hypotheses if top is None else result.hypotheses.head(top)
        ranks = table["rank"].to_list()
        evidence = result.evidence.filter(result.evidence["rank"].is_in(ranks))
        return DiscoveryReport(
            table, evidence, result.counts["n_candidates"], result.counts["n_kept"], result.shared
        )
