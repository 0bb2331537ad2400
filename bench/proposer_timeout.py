"""How long the language-model proposer takes to give up on a server that does not answer in time.

    python bench/proposer_timeout.py                  # timeout_s 0.3, server replying after 2 s
    python bench/proposer_timeout.py --timeout 1.0 --delay 3 --rounds 5

The test suite checks that the timeout turns a slow reply into an error that names the setting
(tests/test_discovery_proposer.py); how soon it does so is a timing and lives here, because a
wall-clock bound in a test flakes on a loaded machine. Prints each round's seconds to the error
and their median; the error should arrive about `timeout` after the request, well before `delay`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm2loss_pipeline.core.discovery.config import ProposerConfig
from llm2loss_pipeline.core.discovery.proposer import ProposerError, propose


def _slow_server(delay: float) -> ThreadingHTTPServer:
    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(b'{"choices": [{"message": {"content": "[\\"x\\"]"}}]}')

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=0.3, help="discovery.proposer.timeout_s")
    parser.add_argument("--delay", type=float, default=2.0, help="server reply delay, s")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = _slow_server(args.delay)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    times = []
    try:
        for round_ in range(args.rounds):
            started = time.monotonic()
            try:
                propose(ProposerConfig(enabled=True, base_url=url, timeout_s=args.timeout))
            except ProposerError:
                times.append(time.monotonic() - started)
            else:
                print(f"round {round_}: the proposer answered: the timeout did not apply")
                return 1
            print(f"round {round_}: error after {times[-1]:.3f} s")
    finally:
        server.shutdown()
        server.server_close()
    print(
        f"median {statistics.median(times):.3f} s to the error "
        f"(timeout {args.timeout} s, server delay {args.delay} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
