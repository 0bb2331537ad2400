"""An optional language model that proposes descriptions, over an OpenAI-compatible HTTP API.

One request: `POST {base_url}/chat/completions` with `{"model", "messages", "temperature"}` and,
when the environment variable named by `api_key_env` is set, `Authorization: Bearer <key>`. The
reply's `choices[0].message.content` must hold the descriptions, either as a JSON array of strings
or one per line (bullets and numbering are stripped). The standard library's urllib is enough for
one POST, so the proposer adds no dependency; it is off by default and nothing else needs it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from llm2loss_pipeline.core.discovery.config import ProposerConfig

MAX_REPLY_BYTES = 1 << 20
MAX_DESCRIPTION_CHARS = 200
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")

SYSTEM_PROMPT = (
    "You help audit an image model. Propose short visual descriptions of groups of face images "
    "on which the model might do worse. Each description is a noun phrase such as "
    "'face of an old man with a beard'. Answer with a JSON array of strings and nothing else."
)


class ProposerError(RuntimeError):
    """The language-model endpoint failed or answered something unusable; says which and where."""


def build_messages(
    n: int, known_worse: Sequence[str] = (), known_better: Sequence[str] = ()
) -> list[dict[str, str]]:
    lines = [f"Propose {n} different descriptions."]
    if known_worse:
        lines.append("The model already seems worse on: " + "; ".join(known_worse[:10]) + ".")
    if known_better:
        lines.append("It seems better on: " + "; ".join(known_better[:10]) + ".")
    lines.append("Combine or refine these, and suggest new groups too.")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": " ".join(lines)},
    ]


def parse_descriptions(content: str, where: str) -> list[str]:
    """Descriptions from the reply text: a JSON array of strings, else one per line."""
    text = content.strip()
    if text.startswith("```"):  # models often fence JSON despite being asked not to
        text = text.strip("`")
        text = text.split("\n", 1)[1] if "\n" in text else ""
    items: list[Any]
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        items = [_BULLET.sub("", line).strip().strip('"') for line in text.splitlines()]
    else:
        if not isinstance(parsed, list):
            raise ProposerError(
                f"{where}: the reply's content is JSON but not a list: {text[:200]}"
            )
        items = parsed
    result = []
    for item in items:
        if not isinstance(item, str):
            raise ProposerError(f"{where}: the reply lists a {type(item).__name__}, not a string")
        item = " ".join(item.split())
        if item:
            result.append(item[:MAX_DESCRIPTION_CHARS])
    if not result:
        raise ProposerError(f"{where}: the reply holds no description: {content[:200]!r}")
    return result


def propose(
    config: ProposerConfig,
    known_worse: Sequence[str] = (),
    known_better: Sequence[str] = (),
) -> list[str]:
    """Descriptions proposed by the configured endpoint; ProposerError with a clear cause."""
    url = f"{config.base_url}/chat/completions"
    body = {
        "model": config.model_name,
        "messages": build_messages(config.n_proposals, known_worse, known_better),
        "temperature": config.temperature,
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(config.api_key_env, "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            raw = response.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace") if exc.fp is not None else ""
        raise ProposerError(f"{url}: HTTP {exc.code} {exc.reason}: {detail}".rstrip(": ")) from None
    except TimeoutError:
        raise ProposerError(
            f"{url}: no reply within {config.timeout_s:g} s (discovery.proposer.timeout_s)"
        ) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError | socket.timeout):
            raise ProposerError(
                f"{url}: no reply within {config.timeout_s:g} s (discovery.proposer.timeout_s)"
            ) from None
        raise ProposerError(f"{url}: cannot connect ({exc.reason})") from None
    if len(raw) > MAX_REPLY_BYTES:
        raise ProposerError(f"{url}: the reply is larger than {MAX_REPLY_BYTES} bytes")
    try:
        reply = json.loads(raw.decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProposerError(f"{url}: the reply is not JSON ({exc}): {raw[:200]!r}") from None
    except (KeyError, IndexError, TypeError):
        raise ProposerError(
            f"{url}: the reply has no choices[0].message.content: {raw[:200]!r}"
        ) from None
    if not isinstance(content, str):
        raise ProposerError(f"{url}: choices[0].message.content is not a string")
    return parse_descriptions(content, url)[: config.n_proposals]
