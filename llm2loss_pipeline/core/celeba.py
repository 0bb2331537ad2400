"""Reading a CelebA root (real or generated) into polars tables, with errors that point at lines.

A CelebA root holds `img_align_celeba/` and three whitespace-separated text files:
`list_attr_celeba.txt` (a count line, a header of the 40 attribute names, then one row of 1/-1
per image), `identity_CelebA.txt` (image, identity) and `list_eval_partition.txt` (image, 0/1/2).
Parsing is vectorised with numpy over the file's bytes, so the 202,599 rows of the real data
set read in about a second; validation reports the first offending line of each kind, numbered
from 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES, SPLIT_NAMES

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
PARTITION_FILE = "list_eval_partition.txt"
SHOWN = 5  # how many offending ids an error message names
QUOTED = 200  # characters of an offending line quoted: a 30 MB line must not flood a terminal


class CelebaFormatError(ValueError):
    """A CelebA root is missing a file, or one of its files is malformed (file and line named)."""


@dataclass(frozen=True)
class CelebaTables:
    """The three CelebA tables, each sorted by sample_id, and the root they were read from."""

    root: Path
    attributes: pl.DataFrame
    identities: pl.DataFrame
    partitions: pl.DataFrame

    @property
    def n_samples(self) -> int:
        return self.attributes.height

    @property
    def image_dir(self) -> Path:
        return self.root / IMAGE_DIR


def _quoted(text: str) -> str:
    """repr(text), cut to QUOTED characters with the length left out said."""
    if len(text) <= QUOTED:
        return repr(text)
    return f"{text[:QUOTED]!r}... ({len(text) - QUOTED} more characters)"


def _fail(path: Path, line: int | None, message: str) -> CelebaFormatError:
    where = f"{path.name} line {line}" if line is not None else path.name
    return CelebaFormatError(f"{where}: {message} (in {path.parent})")


@dataclass(frozen=True)
class _Tokens:
    """The whitespace-separated tokens of a text file, found by byte offsets with numpy.

    Splitting 200k lines in Python costs seconds; locating token edges in the byte array and
    each token's line with one searchsorted costs tens of milliseconds.
    """

    path: Path
    data: bytes
    starts: np.ndarray
    ends: np.ndarray
    line: np.ndarray  # 0-based line of each token
    n_lines: int  # up to the last line that holds a token: trailing blank lines do not count

    def strings(self, tokens: np.ndarray, name: str = "") -> pl.Series:
        """The tokens as a polars String Series, built from the bytes without Python strings."""
        starts = self.starts[tokens]
        lengths = self.ends[tokens] - starts
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        chars = np.frombuffer(self.data, dtype=np.uint8)[gather]
        array = pa.LargeStringArray.from_buffers(
            lengths.size, pa.py_buffer(offsets), pa.py_buffer(chars)
        )
        return pl.Series(name, array, dtype=pl.String)

    def line_text(self, line: int) -> str:
        start = 0
        for _ in range(line):
            start = self.data.index(b"\n", start) + 1
        end = self.data.find(b"\n", start)
        return self.data[start : end if end >= 0 else None].decode("utf-8").strip()

    def per_line(self) -> np.ndarray:
        return np.bincount(self.line, minlength=self.n_lines)

    def rows(self, first_line: int, expected: int) -> np.ndarray:
        """Token indices of lines `first_line`.. (0-based), shaped (rows, expected)."""
        counts = self.per_line()[first_line:]
        bad = np.flatnonzero(counts != expected)
        if bad.size:
            index = int(bad[0])
            raise _fail(
                self.path,
                first_line + index + 1,
                f"expected {expected} values (the image name and {expected - 1} more), "
                f"found {int(counts[index])}",
            )
        first = int(np.searchsorted(self.line, first_line))
        return np.arange(first, first + counts.size * expected).reshape(counts.size, expected)


def _tokenize(path: Path) -> _Tokens:
    if not path.is_file():
        raise CelebaFormatError(
            f"{path.name} is missing: expected the file {path} in the CelebA root {path.parent}"
        )
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = b"   " + data[3:]  # a UTF-8 byte order mark, blanked to keep offsets
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(path, line, f"not UTF-8 text ({exc.reason})") from None
    buf = np.frombuffer(data, dtype=np.uint8)
    # A lone CR ends a line too (classic Mac files): turned into LF in place, so offsets hold and
    # such a file is read line by line instead of as one enormous line.
    lone_cr = (buf == 13) & (np.append(buf[1:], np.uint8(0)) != 10)
    if lone_cr.any():
        buf = buf.copy()
        buf[lone_cr] = 10
        data = buf.tobytes()
    blank = (buf == 32) | ((buf >= 9) & (buf <= 13))  # space, \t \n \v \f \r
    edges = np.diff((~blank).astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    line = np.searchsorted(np.flatnonzero(buf == 10), starts)
    n_lines = int(line[-1]) + 1 if line.size else 0
    return _Tokens(path, data, starts, ends, line, n_lines)


def _check_names(path: Path, ids: pl.Series, first_line: int) -> None:
    """Refuse a sample id that is a path: ids are file names inside img_align_celeba/, and an id
    such as `../world.json` or `/etc/passwd` would read a file outside it."""
    bad = (
        ids.str.contains("/", literal=True)
        | ids.str.contains("\\", literal=True)
        | ids.str.contains("\x00", literal=True)
        | ids.is_in([".", ".."])
    )
    if bad.any():
        index = int(bad.arg_true()[0])
        raise _fail(
            path,
            first_line + index,
            f"sample id {_quoted(ids[index])} is a path, not a file name in {IMAGE_DIR}/ "
            "(no /, \\, '.' or '..' allowed)",
        )


def _check_unique(path: Path, ids: pl.Series, first_line: int) -> None:
    duplicated = ids.is_duplicated()
    if duplicated.any():
        positions = duplicated.arg_true()
        name = ids[int(positions[0])]
        lines = [first_line + int(i) for i in positions if ids[int(i)] == name][:2]
        raise _fail(
            path, lines[-1], f"sample id {name} is listed twice (lines {lines[0]} and {lines[-1]})"
        )


def _signs(tokens: _Tokens, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is "1", is "-1") for each token index, without making strings."""
    buf = np.frombuffer(tokens.data, dtype=np.uint8)
    starts = tokens.starts[indices]
    length = tokens.ends[indices] - starts
    first = buf[starts]
    second = buf[np.minimum(starts + 1, buf.size - 1)]
    positive = (length == 1) & (first == ord("1"))
    negative = (length == 2) & (first == ord("-")) & (second == ord("1"))
    return positive, negative


def read_attribute_file(path: Path) -> pl.DataFrame:
    tokens = _tokenize(path)
    if tokens.n_lines == 0:
        raise _fail(path, 1, "file is empty; expected the number of images on line 1")
    count_line = tokens.line_text(0)
    try:
        count = int(count_line)
    except ValueError:
        raise _fail(
            path, 1, f"expected the number of images, found {_quoted(count_line)}"
        ) from None
    if tokens.n_lines < 2:
        raise _fail(path, 2, "missing the header line of the 40 attribute names")
    header = tokens.line_text(1).split()
    if tuple(header) != CELEBA_ATTRIBUTES:
        for position, (want, got) in enumerate(zip(CELEBA_ATTRIBUTES, header, strict=False)):
            if want != got:
                raise _fail(
                    path, 2, f"header position {position + 1} is {_quoted(got)}, expected {want!r}"
                )
        raise _fail(path, 2, f"header has {len(header)} names, expected the 40 CelebA attributes")
    n_rows = tokens.n_lines - 2
    if count != n_rows:
        raise _fail(path, 1, f"the count line says {count} images but the file has {n_rows} rows")
    rows = tokens.rows(first_line=2, expected=41)
    ids = tokens.strings(rows[:, 0], "sample_id")
    _check_names(path, ids, first_line=3)
    _check_unique(path, ids, first_line=3)
    positive, negative = _signs(tokens, rows[:, 1:])
    invalid = ~(positive | negative)
    if invalid.any():
        row, column = np.unravel_index(int(np.argmax(invalid)), invalid.shape)
        value = tokens.strings(np.array([rows[row, column + 1]]))[0]
        raise _fail(
            path,
            3 + int(row),
            f"column {CELEBA_ATTRIBUTES[column]} has value {_quoted(value)}; expected 1 or -1",
        )
    columns = {"sample_id": ids}
    for k, name in enumerate(CELEBA_ATTRIBUTES):
        columns[name] = pl.Series(name, positive[:, k], dtype=pl.Boolean)
    return pl.DataFrame(columns).sort("sample_id")


def _read_pairs(path: Path, value_name: str) -> pl.DataFrame:
    tokens = _tokenize(path)
    if tokens.n_lines == 0:
        raise _fail(path, 1, "file is empty")
    rows = tokens.rows(first_line=0, expected=2)
    ids = tokens.strings(rows[:, 0], "sample_id")
    _check_names(path, ids, first_line=1)
    _check_unique(path, ids, first_line=1)
    texts = tokens.strings(rows[:, 1], value_name)
    values = texts.cast(pl.Int64, strict=False)
    invalid = values.is_null()
    if invalid.any():
        index = int(invalid.arg_true()[0])
        raise _fail(path, 1 + index, f"{value_name} {_quoted(texts[index])} is not an integer")
    return pl.DataFrame({"sample_id": ids, value_name: values})


def read_identity_file(path: Path) -> pl.DataFrame:
    return _read_pairs(path, "identity").sort("sample_id")


def read_partition_file(path: Path) -> pl.DataFrame:
    table = _read_pairs(path, "code")
    invalid = ~table["code"].is_in([0, 1, 2])
    if invalid.any():
        index = int(invalid.arg_true()[0])
        raise _fail(
            path,
            1 + index,
            f"partition code {table['code'][index]} is not 0 (train), 1 (valid) or 2 (test)",
        )
    split = pl.Series("split", SPLIT_NAMES, dtype=pl.String)
    return (
        table.with_columns(split=split.gather(table["code"]))
        .select("sample_id", "split")
        .sort("sample_id")
    )


def _check_same_ids(root: Path, tables: dict[str, pl.DataFrame]) -> None:
    names = list(tables)
    reference = tables[names[0]]["sample_id"]
    for other in names[1:]:
        ids = tables[other]["sample_id"]
        if ids.len() == reference.len() and (ids == reference).all():
            continue
        for has, lacks in ((names[0], other), (other, names[0])):
            missing = tables[has]["sample_id"].filter(
                ~tables[has]["sample_id"].is_in(tables[lacks]["sample_id"].implode())
            )
            if missing.len():
                shown = ", ".join(missing.head(SHOWN).to_list())
                more = f" and {missing.len() - SHOWN} more" if missing.len() > SHOWN else ""
                raise CelebaFormatError(
                    f"{lacks} lacks {missing.len()} sample ids that {has} lists: {shown}{more} "
                    f"(in {root})"
                )


def read_celeba(root: Path, check_images: bool = False) -> CelebaTables:
    """Read and validate a CelebA root; with check_images, also decode every listed image."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise CelebaFormatError(f"the CelebA root {root} is not a directory")
    attributes = read_attribute_file(root / ATTR_FILE)
    identities = read_identity_file(root / IDENTITY_FILE)
    partitions = read_partition_file(root / PARTITION_FILE)
    _check_same_ids(
        root, {ATTR_FILE: attributes, IDENTITY_FILE: identities, PARTITION_FILE: partitions}
    )
    tables = CelebaTables(
        root=root, attributes=attributes, identities=identities, partitions=partitions
    )
    if check_images:
        check_image_files(tables)
    return tables


def check_image_files(tables: CelebaTables, workers: int = 4) -> None:
    """Raise naming every listed image that is missing, empty or not decodable."""
    # lazy: core.images imports torch (+940 modules, 3 s), which reading CelebA's lists never needs
    from llm2loss_pipeline.core.images import scan_images

    folder = tables.image_dir
    if not folder.is_dir():
        raise CelebaFormatError(f"{IMAGE_DIR}/ is missing: expected the folder {folder}")
    ids = tables.attributes["sample_id"].to_list()
    present = {entry.name for entry in folder.iterdir()}
    missing = [sample_id for sample_id in ids if sample_id not in present]
    if missing:
        shown = ", ".join(missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise CelebaFormatError(
            f"{IMAGE_DIR}/ lacks {len(missing)} images listed in {ATTR_FILE}: {shown}{more} "
            f"(in {tables.root})"
        )
    bad = scan_images([folder / sample_id for sample_id in ids], workers=workers)
    if bad:
        shown = "; ".join(f"{Path(path).name}: {reason}" for path, reason in bad[:SHOWN])
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise CelebaFormatError(
            f"{IMAGE_DIR}/ has {len(bad)} unreadable images: {shown}{more} (in {tables.root})"
        )


def shard_keys(n_samples: int, shard_size: int) -> list[str]:
    """The shard names covering `n_samples` rows in blocks of `shard_size`: shard-00000, ..."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return [f"shard-{k:05d}" for k in range(-(-n_samples // shard_size))]


def build_manifest(tables: CelebaTables, shard_size: int) -> pl.DataFrame:
    """One row per image: sample_id, 0-based index, absolute path, split, identity, shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    image_dir = str(tables.image_dir.absolute())
    frame = (
        tables.attributes.select("sample_id")
        .join(tables.partitions, on="sample_id", how="left")
        .join(tables.identities, on="sample_id", how="left")
        .sort("sample_id")
    )
    index = pl.int_range(0, pl.len(), dtype=pl.Int64)
    return frame.select(
        pl.col("sample_id"),
        index.alias("index"),
        (pl.lit(image_dir + os.sep) + pl.col("sample_id")).alias("path"),
        pl.col("split"),
        pl.col("identity").cast(pl.Int64),
        pl.format("shard-{}", (index // shard_size).cast(pl.String).str.zfill(5)).alias("shard"),
    )
