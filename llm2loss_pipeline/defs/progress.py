"""Progress from long core steps into the Dagster event log, at a readable rate."""

from __future__ import annotations

import time
from collections.abc import Callable

import dagster as dg


def progress_logger(
    context: dg.AssetExecutionContext, what: str, every_seconds: float = 5.0
) -> Callable[..., None]:
    """A progress callback for any core step, logging at most every few seconds.

    Core steps report `(done, total)`, `(stage, done, total)` or `(done, total, message)`; the
    integers are the counts and any text names the stage or describes the state. The first and
    last calls always log, so a short step still shows that it started and ended.
    """
    last = [0.0]

    def report(*args: object) -> None:
        counts = [arg for arg in args if isinstance(arg, int) and not isinstance(arg, bool)]
        texts = [arg for arg in args if isinstance(arg, str)]
        done, total = [*counts, 0, 0][:2]
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < every_seconds:
            return
        last[0] = now
        share = f" ({100.0 * done / total:.0f}%)" if total else ""
        detail = f" - {'; '.join(texts)}" if texts else ""
        context.log.info(f"{what}: {done}/{total}{share}{detail}")

    return report
