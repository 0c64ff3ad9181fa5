"""The phases of one client session and the transitions allowed between them (h11 `_state.py`)."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STARTUP = "startup"  # reading SSLRequest / GSSENCRequest / StartupMessage / CancelRequest
    AUTHENTICATING = "authenticating"  # first upstream login; the client waits for AuthenticationOk
    RELAYING = "relaying"  # bytes flow both ways; the brain keeps its books
    RECONNECTING = "reconnecting"  # upstream lost between transactions: new connection + login
    REPLAYING = "replaying"  # new connection is up; session state being rebuilt
    DRAINING = "draining"  # shutting down: relaying until the next idle point, then close
    PARKED = "parked"  # idle past upstream.park_after: upstream closed by us until the next request
    CLOSED = "closed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTUP: frozenset({Phase.AUTHENTICATING, Phase.CLOSED}),
    Phase.AUTHENTICATING: frozenset({Phase.RELAYING, Phase.CLOSED}),
    Phase.RELAYING: frozenset({Phase.RECONNECTING, Phase.DRAINING, Phase.PARKED, Phase.CLOSED}),
    Phase.RECONNECTING: frozenset({Phase.REPLAYING, Phase.DRAINING, Phase.CLOSED}),
    Phase.REPLAYING: frozenset({Phase.RELAYING, Phase.RECONNECTING, Phase.DRAINING, Phase.CLOSED}),
    Phase.DRAINING: frozenset({Phase.CLOSED}),
    # The next request unparks through the reconnect path; a close or a drain ends it at once.
    Phase.PARKED: frozenset({Phase.RECONNECTING, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """An internal bug: the brain tried a transition its table does not allow."""


def check_transition(old: Phase, new: Phase) -> None:
    if new is not old and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value}")
