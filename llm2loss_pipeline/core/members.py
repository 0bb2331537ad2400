"""The ensemble's member vocabulary: head kinds, architectures, and groups of members.

One place for these names, shared by the heads (`core.heads`) and the report (`core.report`).
It lives outside both packages because the heads' comparisons read the report's calibration
(heads -> report), so the report importing the heads' config would close a package cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

KINDS: tuple[str, ...] = ("regressor", "ranker")
ARCHS: tuple[str, ...] = ("linear", "mlp")
OVERALL = "overall"
"""The group of every member."""


@dataclass(frozen=True)
class MemberInfo:
    """One ensemble member (core/heads/ensemble.py trains and runs it). Defined here, without
    torch, so that a question answered from the query snapshot (core/query.py) needs no torch."""

    index: int
    kind: str
    arch: str
    seed: int

    @property
    def name(self) -> str:
        return f"member-{self.index:02d}-{self.kind}-{self.arch}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "arch": self.arch, "seed": self.seed}


class MemberInfoLike(Protocol):
    index: int
    kind: str
    arch: str
    seed: int


@dataclass(frozen=True)
class MemberGroup:
    """A named subset of ensemble members (positions into the scorer's member list)."""

    name: str
    kind: str | None
    arch: str | None
    positions: tuple[int, ...]


def member_groups(members: Sequence[MemberInfoLike], *, by_arch: bool = True) -> list[MemberGroup]:
    """The whole ensemble, then each head kind, then (`by_arch`) each kind x arch present."""
    if not members:
        raise ValueError("the scorer has no ensemble members")
    for member in members:
        if not isinstance(member.kind, str) or not isinstance(member.arch, str):
            raise ValueError(f"member {member!r} needs string `kind` and `arch`")
    groups = [MemberGroup(OVERALL, None, None, tuple(range(len(members))))]
    kinds = _ordered({m.kind for m in members}, KINDS)
    for kind in kinds:
        positions = tuple(i for i, m in enumerate(members) if m.kind == kind)
        groups.append(MemberGroup(kind, kind, None, positions))
    if not by_arch:
        return groups
    for kind in kinds:
        for arch in _ordered({m.arch for m in members if m.kind == kind}, ARCHS):
            positions = tuple(i for i, m in enumerate(members) if m.kind == kind and m.arch == arch)
            groups.append(MemberGroup(f"{kind}/{arch}", kind, arch, positions))
    return groups


def _ordered(values: set[str], preferred: Sequence[str]) -> list[str]:
    return [v for v in preferred if v in values] + sorted(values - set(preferred))
