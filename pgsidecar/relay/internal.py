"""Replies to requests pgsidecar injected itself (snapshot, facts, replay): read, never relayed.

Injection happens only at an idle point or on a fresh connection, with client bytes held back,
so every byte the server sends meanwhile belongs to these requests, except asynchronous
messages (NotificationResponse, NoticeResponse, ParameterStatus; PostgreSQL docs 55.2.7), which
still reach the client.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pgsidecar.session.state import ServerFacts, SessionState, parse_facts, parse_snapshot
from pgsidecar.wire import backend as be
from pgsidecar.wire.errors import ServerProtocolError
from pgsidecar.wire.frames import MessageBuffer
from pgsidecar.wire.payload import typed_message

_ASYNC_TO_CLIENT = frozenset((be.NotificationResponse.TYPE[0], be.NoticeResponse.TYPE[0]))


@dataclass(slots=True)
class InternalOutcome:
    purpose: str
    status: int  # the ReadyForQuery status byte
    rows: list[tuple[bytes | None, ...]] = field(default_factory=list)
    error: be.ErrorResponse | None = None


class InternalReplies:
    """Whole-message reader for the replies of injected requests (not the hot path)."""

    def __init__(self, max_len: int = 1073741823) -> None:
        self._messages = MessageBuffer(max_len, client=False)
        self._purposes: deque[str] = deque()
        self._rows: list[tuple[bytes | None, ...]] = []
        self._error: be.ErrorResponse | None = None
        self.forward = bytearray()
        self.new_params: dict[str, str] = {}

    @property
    def active_purpose(self) -> str | None:
        return self._purposes[0] if self._purposes else None

    def begin(self, *, new_params: dict[str, str] | None) -> None:
        if new_params is not None:
            self.new_params = new_params

    def expect(self, purposes: tuple[str, ...]) -> None:
        self._purposes.extend(purposes)

    def reset(self) -> None:
        self._messages.clear()
        self._purposes.clear()
        self._rows = []
        self._error = None
        self.forward.clear()

    def feed(self, data: bytes) -> list[InternalOutcome]:
        self._messages.feed(data)
        outcomes: list[InternalOutcome] = []
        while self._purposes and (message := self._messages.next()) is not None:
            t, payload = message
            outcome = self._message(t, payload, typed_message(bytes([t]), payload))
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _message(self, t: int, payload: bytes, raw: bytes) -> InternalOutcome | None:
        kind = bytes([t])
        if kind == be.DataRow.TYPE:
            self._rows.append(be.DataRow.decode(payload).values)
        elif kind == be.ErrorResponse.TYPE:
            self._error = be.ErrorResponse.decode(payload)
        elif kind == be.ParameterStatus.TYPE:
            msg = be.ParameterStatus.decode(payload)
            self.new_params[msg.name] = msg.value
        elif t in _ASYNC_TO_CLIENT:
            self.forward += raw
        elif kind == be.ReadyForQuery.TYPE:
            if len(payload) != 1:  # 55.7 ReadyForQuery: exactly one status byte
                raise ServerProtocolError(f"invalid ReadyForQuery message of {len(payload)} bytes")
            outcome = InternalOutcome(self._purposes.popleft(), payload[0], self._rows, self._error)
            self._rows, self._error = [], None
            return outcome
        return None

    def take_forward(self) -> bytes:
        out = bytes(self.forward)
        self.forward.clear()
        return out

    def take_rest(self) -> bytes:
        """Bytes after the last injected reply (replies to client requests sent since)."""
        return self._messages.rest()

    @staticmethod
    def snapshot_state(outcome: InternalOutcome, login_user: str) -> SessionState:
        if outcome.error is not None or not outcome.rows:
            reason = f"{outcome.error.code} {outcome.error.message}" if outcome.error else "no row"
            return SessionState(unknown=reason)
        return parse_snapshot(list(outcome.rows[0]), login_user)

    @staticmethod
    def facts(outcome: InternalOutcome) -> ServerFacts | None:
        if outcome.error is not None or not outcome.rows:
            return None
        return parse_facts(list(outcome.rows[0]))
