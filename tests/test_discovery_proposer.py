"""The language-model proposer against a local OpenAI-compatible server, and candidate making."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest

from llm2loss_pipeline.core.attributes import CELEBA_ATTRIBUTES
from llm2loss_pipeline.core.config import ConfigError, validate_config
from llm2loss_pipeline.core.discovery.candidates import (
    VocabularyError,
    generate_candidates,
    read_vocabulary,
    single_candidates,
)
from llm2loss_pipeline.core.discovery.config import ProposerConfig
from llm2loss_pipeline.core.discovery.proposer import ProposerError, parse_descriptions, propose


class _Handler(BaseHTTPRequestHandler):
    reply: bytes = b""
    status: int = 200
    delay: float = 0.0
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        time.sleep(type(self).delay)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(type(self).reply)  # fails when the client gave up (timeout test)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"seen": [], "delay": 0.0, "status": 200})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _completion(content: str) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


def test_proposals_come_back_from_the_chat_completions_endpoint(server, monkeypatch) -> None:
    url, handler = server
    handler.reply = _completion('["face of an old man with a beard", "  a person in a hat "]')
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    config = ProposerConfig(
        enabled=True, base_url=url, model_name="tiny-llm", api_key_env="TEST_LLM_KEY"
    )
    texts = propose(config, known_worse=["face of a person with gray hair"])
    assert texts == ["face of an old man with a beard", "a person in a hat"]
    request = handler.seen[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "tiny-llm"
    assert request["auth"] == "Bearer sk-test"
    assert "gray hair" in request["body"]["messages"][-1]["content"]


def test_a_reply_with_one_description_per_line_is_accepted() -> None:
    content = "1. face of a bald man\n- a person wearing sunglasses\n\n* an old woman"
    assert parse_descriptions(content, "here") == [
        "face of a bald man",
        "a person wearing sunglasses",
        "an old woman",
    ]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"not json at all", "not JSON"),
        (b'{"id": "x", "choices": []}', "no choices"),
        (_completion('{"descriptions": 3}'), "not a list"),
        (_completion("[1, 2]"), "not a string"),
        (_completion("   "), "no description"),
    ],
)
def test_a_malformed_reply_is_a_clear_error(server, reply, message) -> None:
    url, handler = server
    handler.reply = reply
    with pytest.raises(ProposerError, match=message) as info:
        propose(ProposerConfig(enabled=True, base_url=url))
    assert f"{url}/chat/completions" in str(info.value)


def test_an_http_error_names_the_status(server) -> None:
    url, handler = server
    handler.status, handler.reply = 401, b'{"error": "bad key"}'
    with pytest.raises(ProposerError, match=r"HTTP 401.*bad key"):
        propose(ProposerConfig(enabled=True, base_url=url))


def test_a_slow_server_times_out_with_the_setting_named(server) -> None:
    url, handler = server
    # The server would answer after 2 s with a valid reply, so only the timeout can make this an
    # error; how long the error takes to arrive is measured in bench/proposer_timeout.py, not
    # bounded here (a wall-clock bound flakes on a loaded machine).
    handler.delay, handler.reply = 2.0, _completion('["x"]')
    with pytest.raises(ProposerError, match=r"no reply within 0.3 s .*timeout_s"):
        propose(ProposerConfig(enabled=True, base_url=url, timeout_s=0.3))


def test_an_unreachable_endpoint_is_a_clear_error() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ProposerError, match="cannot connect"):
        propose(ProposerConfig(enabled=True, base_url=f"http://127.0.0.1:{port}/v1"))


def test_proposer_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"discovery\.proposer\.base_url"):
        validate_config({"discovery": {"proposer": {"base_url": "ftp://x"}}})
    with pytest.raises(ConfigError, match=r"discovery\.proposer\.timeout_s"):
        validate_config({"discovery": {"proposer": {"timeout_s": 0}}})
    assert validate_config({}).discovery.proposer.enabled is False  # offline by default


def test_candidates_compose_singles_and_keep_user_texts_first() -> None:
    singles = single_candidates(CELEBA_ATTRIBUTES)
    assert all("without" not in c.text and " not " not in c.text for c in singles)
    assert "face of a person with gray hair" in [c.text for c in singles]
    assert "face of an old person" in [c.text for c in singles]  # an antonym, not a negation

    def score(texts):  # gray hair is "worst"
        return np.array([1.0 if "gray hair" in t else 0.0 for t in texts])

    candidates = generate_candidates(
        score,
        max_arity=3,
        beam=4,
        vocabulary=["My Own  Text"],
        proposals=["from a model"],
        attributes=CELEBA_ATTRIBUTES,
    )
    assert [c.text for c in candidates[:2]] == ["My Own Text", "from a model"]
    assert candidates[1].source == "proposer"
    pairs = [c for c in candidates if c.source == "pair"]
    # the beam of 4: gray hair (the only single scored worse), then the first three of the rest
    beam = [("Gray_Hair", True)]
    beam += [c.values[0] for c in singles if c.values[0] != ("Gray_Hair", True)][:3]
    assert all(len(c.values) == 2 and set(c.values) & set(beam) for c in pairs)
    gray_pairs = {frozenset(c.values) for c in pairs if ("Gray_Hair", True) in c.values}
    others = {c.values[0] for c in singles if c.values[0][0] != "Gray_Hair"}
    assert gray_pairs == {frozenset({("Gray_Hair", True), value}) for value in others}
    assert any(c.source == "triple" for c in candidates)
    texts = [c.text.lower() for c in candidates]
    assert len(texts) == len(set(texts))
    assert len(generate_candidates(score, max_arity=1, limit=5, attributes=CELEBA_ATTRIBUTES)) == 5


def test_vocabulary_files(tmp_path) -> None:
    good = tmp_path / "vocab.txt"
    good.write_text("# my groups\nface of a bald man\n\n  a person in a red hat  \n")
    assert read_vocabulary(good) == ["face of a bald man", "a person in a red hat"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(VocabularyError, match=f"{empty}: the vocabulary file has no description"):
        read_vocabulary(empty)
    with pytest.raises(VocabularyError, match="no such vocabulary file"):
        read_vocabulary(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(VocabularyError, match="not UTF-8"):
        read_vocabulary(binary)
