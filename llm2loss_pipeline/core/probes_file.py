"""Reading `dataset.probes_path`: the YAML file of phrasings per attribute (core/probes.py).

Apart from core/probes.py because it reads YAML with the configuration's reader (a key given
twice is refused), and core.config imports the report, which reads the phrasings: the data step
and the preflight read the file, the report only the attribute set written from it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from llm2loss_pipeline.core.config import ConfigError, parse_yaml
from llm2loss_pipeline.core.probes import ProbesFileError, parse_probes


def read_probes(
    path: str | os.PathLike[str] | None, attributes: Sequence[str]
) -> dict[str, tuple[list[str], list[str]]]:
    """The file's phrasings ('slot:text' lists) by attribute, checked against `attributes`;
    {} without a file."""
    if path is None:
        return {}
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ProbesFileError(f"{source}: no such probes file (dataset.probes_path)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbesFileError(f"{source}: cannot be read as UTF-8 text ({exc})") from None
    try:
        raw = parse_yaml(text, str(source))
    except ConfigError as exc:
        raise ProbesFileError(str(exc)) from None
    return parse_probes(raw, str(source), attributes)
