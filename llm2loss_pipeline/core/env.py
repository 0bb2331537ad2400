"""Numbers a user sets through the environment (`$LLM2LOSS_...`), read by one parser.

Three limits are environment variables rather than configuration keys because they belong to the
machine, not to the diagnosis: the pixel cap of the image loader (core/images.py), the CPU thread
count of the encoder step (core/steps/encoder.py) and how long a step waits for a pool slot
(defs/runner.py). Each used to have its own parser with its own wording; one parser gives every
one of them the same rule (unset or blank means the default) and the same error, which names the
variable, its value, what it must be and the default. They are declared here, together, so that
the preflight can check all three before a run starts instead of in the step that reads one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


class EnvNumberError(ValueError):
    """An environment variable holds something that is not a number the setting can use."""


def env_number(name: str, default: float, *, unit: str, whole: bool = False) -> float:
    """`$name` as a number greater than 0 (a whole number when `whole`), or `default` when the
    variable is unset or blank. Anything else is one error naming the variable, e.g.
    `$LLM2LOSS_CPU_THREADS='0' must be a whole number of threads greater than 0; unset it for
    the default (2)`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "a whole number" if whole else "a number"
    shown = int(default) if float(default).is_integer() else default  # 3600, not 3600.0
    problem = (
        f"${name}={raw[:80]!r} must be {kind} of {unit} greater than 0; "
        f"unset it for the default ({shown})"
    )
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise EnvNumberError(problem) from None
    if not (value > 0 and math.isfinite(value)):
        raise EnvNumberError(problem)
    return value


@dataclass(frozen=True)
class EnvLimit:
    """One limit read from the environment: its variable, default, unit and kind of number."""

    name: str
    default: float
    unit: str
    whole: bool = False

    def read(self) -> float:
        return env_number(self.name, self.default, unit=self.unit, whole=self.whole)

    def read_int(self) -> int:
        return int(self.read())


MAX_IMAGE_PIXELS = EnvLimit("LLM2LOSS_MAX_IMAGE_PIXELS", 64 * 1024 * 1024, "pixels", whole=True)
# Two, not one: on a 2-core CPU without native bf16 (AVX2 only), the encoder trains in fp32, and
# with one thread `make run` took 340 s against the 300 s budget; with two, 258 s (bench/
# RESULTS.md, "Stop 30"). The count is still fixed, so the weights still do not depend on the
# machine's core count. The test suite runs two workers of one thread each (tests/conftest.py).
CPU_THREADS = EnvLimit("LLM2LOSS_CPU_THREADS", 2, "threads", whole=True)
SLOT_WAIT_S = EnvLimit("LLM2LOSS_SLOT_WAIT_S", 3600.0, "seconds")
LIMITS = (MAX_IMAGE_PIXELS, CPU_THREADS, SLOT_WAIT_S)


def env_problems() -> list[str]:
    """One line per limit whose variable is set to something unusable (for the preflight)."""
    problems = []
    for limit in LIMITS:
        try:
            limit.read()
        except EnvNumberError as exc:
            problems.append(f"  {exc}")
    return problems
