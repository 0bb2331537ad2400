"""The one check behind every setting that takes one of a few named values.

Every named choice, a config key or a function's mode argument, is a plain `str` checked by
`one_of` against a tuple of the allowed names, not a `typing.Literal`: the Dagster resources
generated from the config models (defs/resources.py) then show plain str fields in the
launchpad, every error reads the same way ("<key> must be one of [...], got '<value>'"), and the
quoted names let `config.format_validation_error` add a "did you mean" suggestion.
tests/test_code_health.py fails on a choice declared any other way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def one_of(
    field: str,
    value: str,
    allowed: Sequence[str],
    *,
    family: tuple[str, Callable[[str], bool]] | None = None,
) -> str:
    """`value` when it is in `allowed`; otherwise a ValueError naming the key and the choices.

    `family` is a (name, test) pair for a set of values too large to list, shown by its name
    among the choices: device's ("cuda:N", is_cuda_index)."""
    if value in allowed or (family is not None and isinstance(value, str) and family[1](value)):
        return value
    shown = [*allowed, family[0]] if family is not None else list(allowed)
    raise ValueError(f"{field} must be one of {shown}, got {value!r}")


ON_BAD_IMAGE: tuple[str, ...] = ("fail", "skip")
"""dataset.on_bad_image, also checked by the image loader and the encoder's training: here, so
that neither imports the config (core.config imports the encoder's config, a cycle)."""
