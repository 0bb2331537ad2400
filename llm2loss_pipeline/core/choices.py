"""The one check behind every config key that takes one of a few named values."""

from __future__ import annotations

from collections.abc import Sequence


def one_of(field: str, value: str, allowed: Sequence[str]) -> str:
    """`value` when it is in `allowed`; otherwise a ValueError naming the key and the choices."""
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
    return value
