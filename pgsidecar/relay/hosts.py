"""Which upstream host to try next, and whether the server reached has the role the session needs.

libpq's multi-host rules (fe-connect.c, PostgreSQL docs 34.1.1.3 and ``target_session_attrs``):
hosts are tried in order (shuffled once per pass under ``load_balance_hosts=random``), and for each
host every address it resolves to; an address that connects but has the wrong role is left for the
next one. ``prefer-standby`` makes a second pass that takes any server when the first found no
standby. When a whole pass fails, the session backs off and starts the next pass (libpq would
give up; a sidecar keeps its idle clients instead: docs/session-rules.md).

The role is read the way libpq reads it: from the ParameterStatus values ``in_hot_standby`` and
``default_transaction_read_only`` (PostgreSQL 14+ reports both at login), else by asking
(``SHOW transaction_read_only`` or ``SELECT pg_catalog.pg_is_in_recovery()``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from pgsidecar.wire import frontend as fe


class Attrs(enum.StrEnum):
    """libpq's target_session_attrs values (the config layer spells them the same)."""

    ANY = "any"
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"
    PRIMARY = "primary"
    STANDBY = "standby"
    PREFER_STANDBY = "prefer-standby"


#: The attrs that need a writer: a 25006 or a server gone into recovery sends them elsewhere.
NEEDS_WRITER = frozenset({Attrs.READ_WRITE, Attrs.PRIMARY})

READ_ONLY_QUERY = fe.Query("SHOW transaction_read_only").encode()
RECOVERY_QUERY = fe.Query("SELECT pg_catalog.pg_is_in_recovery()").encode()


@dataclass(frozen=True, slots=True)
class Role:
    """What a server said of itself; None where it did not say."""

    in_hot_standby: bool | None = None
    read_only: bool | None = None  # default_transaction_read_only, or in_hot_standby

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Role:
        standby = _on(params.get("in_hot_standby"))
        read_only = _on(params.get("default_transaction_read_only"))
        known = standby is not None and read_only is not None  # libpq asks unless both are known
        return cls(standby, (read_only or standby) if known else None)

    @property
    def name(self) -> str:
        """For logs, metrics and records: primary, standby, read-only or unknown."""
        if self.in_hot_standby:
            return "standby"
        if self.in_hot_standby is False:
            return "read-only" if self.read_only else "primary"
        if self.read_only is None:
            return "unknown"
        return "read-only" if self.read_only else "read-write"


def _on(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("on", "true", "t", "yes", "1")


def probe_for(attrs: Attrs, role: Role, *, second_pass: bool) -> bytes | None:
    """The query libpq sends when the login did not say enough, or None."""
    if attrs is Attrs.ANY or (attrs is Attrs.PREFER_STANDBY and second_pass):
        return None
    if attrs in (Attrs.READ_WRITE, Attrs.READ_ONLY):
        return READ_ONLY_QUERY if role.read_only is None else None
    return RECOVERY_QUERY if role.in_hot_standby is None else None


def mismatch(attrs: Attrs, role: Role, *, second_pass: bool) -> str | None:
    """libpq's words when the server does not fit, or None when it does."""
    if attrs is Attrs.ANY or (attrs is Attrs.PREFER_STANDBY and second_pass):
        return None
    if attrs is Attrs.READ_WRITE:
        return "session is read-only" if role.read_only else None
    if attrs is Attrs.READ_ONLY:
        return None if role.read_only else "session is not read-only"
    if attrs is Attrs.PRIMARY:
        return "server is in hot standby mode" if role.in_hot_standby else None
    return None if role.in_hot_standby else "server is not in hot standby mode"  # standby, prefer-standby


def probed(role: Role, query: bytes, value: bytes | None) -> Role:
    """Fold the answer to a probe query into the role."""
    answer = _on(value.decode("ascii", "replace")) if value is not None else None
    if query == READ_ONLY_QUERY:
        return Role(role.in_hot_standby, answer)
    return Role(answer, True if answer else role.read_only)


@dataclass(slots=True)
class HostWalk:
    """One session's walk over the upstream's hosts: where the next connect goes."""

    count: int = 1
    attrs: Attrs = Attrs.ANY
    shuffle: bool = False
    rng: random.Random = field(default_factory=random.Random)
    order: list[int] = field(default_factory=list)
    position: int = 0
    avoid: set[str] = field(default_factory=set)  # addresses of the current host with the wrong role
    second_pass: bool = False  # prefer-standby found no standby: take any
    mismatches: int = 0  # servers of the wrong role seen, for the record and the metric
    last_mismatch: str = ""

    def __post_init__(self) -> None:
        self.restart()

    @property
    def host(self) -> int:
        return self.order[self.position]

    def restart(self) -> None:
        """A new pass over every host, from the first (in a new random order under random)."""
        self.order = list(range(self.count))
        if self.shuffle:
            self.rng.shuffle(self.order)
        self.position = 0
        self.avoid = set()
        self.second_pass = False

    def wrong_role(self, address: str, why: str) -> None:
        self.avoid.add(address)
        self.mismatches += 1
        self.last_mismatch = why

    def next_host(self) -> bool:
        """The current host has nothing more to offer: move on. False when the pass is over
        (prefer-standby then starts its second pass, which takes any server)."""
        self.avoid = set()
        if self.position + 1 < len(self.order):
            self.position += 1
            return True
        if self.attrs is Attrs.PREFER_STANDBY and not self.second_pass:
            self.position = 0
            self.second_pass = True
            return True
        return False
