"""What the client is told when the upstream is lost, and the book kept about each drop.

``decide_drop`` applies DESIGN's session-rules table to the session's books at the moment of
the drop. ``LocalAbortResponder`` plays the server for a client that still believes it is inside
the transaction that was lost, until it ends it. The book kept about each drop is
``relay/dropbook.py``; classification itself lives in ``pgsidecar.drops``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgsidecar.session.pending import TxStatus
from pgsidecar.session.state import is_transaction_end
from pgsidecar.wire import backend as be
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError

LOST_IN_TRANSACTION = "connection to the server was lost; the transaction was rolled back"
LOST_IN_FLIGHT = (
    "connection to the server was lost while the request was in flight; "
    "whether it was executed is unknown"
)
IN_FAILED_TRANSACTION = "current transaction is aborted, commands ignored until end of transaction block"
_ROLLBACK_ONLY = re.compile(rb"(?i)^\s*(?:rollback|abort)\b")


def error_bytes(severity: str, code: str, message: str, *, hint: str | None = None) -> bytes:
    return be.ErrorResponse.make(severity, code, message, hint=hint).encode()


def ready_bytes(status: bytes) -> bytes:
    return be.ReadyForQuery(status).encode()


@dataclass(slots=True)
class DropDecision:
    state: str  # idle | in_transaction | request_in_flight
    to_client: bytes = b""
    fatal: bytes | None = None
    local_abort: LocalAbortResponder | None = None
    resend: tuple[bytes, int] | None = None  # (client bytes, sync points) proven never run
    impact: str = "transparent"


def drop_state(owed: int, status: TxStatus) -> str:
    if status is not TxStatus.IDLE:
        return "in_transaction"
    return "request_in_flight" if owed else "idle"


def decide_drop(conn, event) -> DropDecision:
    """DESIGN "Session rules": the client sees nothing, an honest error, or a FATAL."""
    owed = conn.pending.client_owed
    status = conn.pending.status
    decision = DropDecision(state=drop_state(owed, status))
    lost = conn.book.state.non_replayable()
    if conn.internal.active_purpose == "snapshot":
        lost.append("session state changed just before the drop and could not be read")
    if lost:
        decision.fatal = error_bytes(
            "FATAL", sqlstate.CONNECTION_FAILURE,
            "connection to the server was lost and the session held " + ", ".join(lost)
            + ", which cannot be restored on a new connection",
        )
        return decision
    if decision.state == "idle":
        return decision
    if conn.policy.on_transaction_loss == "close":
        code = sqlstate.TRANSACTION_RESOLUTION_UNKNOWN if decision.state == "request_in_flight" else sqlstate.CONNECTION_FAILURE
        decision.fatal = error_bytes("FATAL", code, LOST_IN_FLIGHT if code != sqlstate.CONNECTION_FAILURE else LOST_IN_TRANSACTION)
        return decision
    if decision.state == "request_in_flight":
        if _proven_unexecuted(conn):
            decision.resend = (b"".join(conn.inflight), owed)
            decision.impact = "transparent (request resent: the server ended the session before reading it)"
            return decision
        decision.to_client = _per_sync(owed, sqlstate.TRANSACTION_RESOLUTION_UNKNOWN, LOST_IN_FLIGHT, b"I")
        decision.impact = f"error {sqlstate.TRANSACTION_RESOLUTION_UNKNOWN} sent to client"
        return decision
    if owed and conn.inflight_commit:
        decision.to_client = _per_sync(owed, sqlstate.TRANSACTION_RESOLUTION_UNKNOWN, LOST_IN_FLIGHT, b"I")
        decision.impact = f"error {sqlstate.TRANSACTION_RESOLUTION_UNKNOWN} sent to client (COMMIT in flight)"
        return decision
    if owed:
        decision.to_client = _per_sync(owed, sqlstate.CONNECTION_FAILURE, LOST_IN_TRANSACTION, b"E")
        decision.local_abort = LocalAbortResponder(owe_error=False)
    else:
        decision.local_abort = LocalAbortResponder(owe_error=True)
    decision.impact = f"error {sqlstate.CONNECTION_FAILURE} sent to client (transaction rolled back)"
    return decision


def _proven_unexecuted(conn) -> bool:
    """57P05 read before any reply to the request: the server never read it (postgres.c)."""
    fatal = conn.last_fatal
    if fatal is None or fatal.code != sqlstate.IDLE_SESSION_TIMEOUT or conn.inflight is None:
        return False
    return conn.server_scan.messages - conn.messages_at_request <= 1


def _per_sync(owed: int, code: str, message: str, status: bytes) -> bytes:
    """One error and one ReadyForQuery per sync point the client still waits for."""
    out = bytearray()
    for i in range(owed):
        if i == 0 or status == b"I":
            out += error_bytes("ERROR", code, message)
        else:
            out += error_bytes("ERROR", sqlstate.IN_FAILED_SQL_TRANSACTION, IN_FAILED_TRANSACTION)
        out += ready_bytes(status)
    return bytes(out)


_TEXT_TYPES = frozenset(b"QP")
_PARSE = ord("P")
_MAX_TEXT = 1 << 20  # a ROLLBACK is short: longer statement texts are not read whole


class LocalAbortResponder:
    """Answers a client that is still inside a transaction the drop rolled back.

    Until the client ends the block, every request gets an error and ``Z`` = ``E``, as the server
    would answer in a failed transaction (PostgreSQL docs 55.2.2); its ROLLBACK (or COMMIT, which
    the server answers with ROLLBACK in a failed block) is answered here with ``Z`` = ``I``.
    A COMMIT that arrives before the client was told of the loss gets the 08006 error instead:
    answering it ROLLBACK, an ordinary tag, would let the app believe its writes were committed.
    """

    def __init__(self, *, owe_error: bool) -> None:
        self.owe_error = owe_error
        self._buf = bytearray()
        self._batch_end = False
        self._batch_commit = False
        self._batch_failed = False
        self._batch_reply = bytearray()
        self._skip = 0  # bytes still to come of a message answered without reading its body

    def _error(self) -> bytes:
        if self.owe_error:
            self.owe_error = False
            return error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, LOST_IN_TRANSACTION)
        return error_bytes("ERROR", sqlstate.IN_FAILED_SQL_TRANSACTION, IN_FAILED_TRANSACTION)

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Returns (reply to the client, bytes after the block ended, whether it ended)."""
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buf += data
        reply = bytearray()
        while len(self._buf) >= 5:
            t = self._buf[0]
            ln = int.from_bytes(self._buf[1:5], "big")
            if ln < 4:
                raise ClientProtocolError(f"invalid message length {ln}")
            if len(self._buf) < ln + 1:
                if t in _TEXT_TYPES and ln <= _MAX_TEXT:
                    break  # a statement text, read whole to see whether it ends the block
                # Anything else is answered from its type alone; its body is skipped, not held.
                self._skip = ln + 1 - len(self._buf)
                self._buf.clear()
                ended = self._message(t, b"\x00\x00" if t == _PARSE else b"", reply)
                return bytes(reply), b"", ended
            payload = bytes(self._buf[5 : ln + 1])
            del self._buf[: ln + 1]
            ended = self._message(t, payload, reply)
            if ended:
                rest = bytes(self._buf)
                self._buf.clear()
                return bytes(reply), rest, True
        return bytes(reply), b"", False

    def _message(self, t: int, payload: bytes, reply: bytearray) -> bool:
        kind = bytes([t])
        if kind == b"X":
            self._buf[:0] = b"X\x00\x00\x00\x04"
            return True
        if kind == b"Q":
            if is_transaction_end(payload):
                if self.owe_error and not _ROLLBACK_ONLY.match(payload):
                    reply += self._error() + ready_bytes(b"I")
                    return True
                reply += be.CommandComplete("ROLLBACK").encode() + ready_bytes(b"I")
                return True
            reply += self._error() + ready_bytes(b"E")
            return False
        if kind == b"P":
            name_end = payload.find(b"\x00")
            if name_end < 0:
                raise ClientProtocolError("invalid Parse message: statement name is not NUL-terminated")
            query = payload[name_end + 1 :]
            text = query.split(b"\x00", 1)[0]
            self._batch_end = self._batch_end or is_transaction_end(text)
            self._batch_commit = self._batch_commit or (is_transaction_end(text) and not _ROLLBACK_ONLY.match(text))
            self._batch_reply += be.ParseComplete().encode()
        elif kind == b"B":
            self._batch_reply += be.BindComplete().encode()
        elif kind == b"D":
            self._batch_reply += be.NoData().encode()
        elif kind == b"E":
            self._batch_reply += be.CommandComplete("ROLLBACK").encode()
        elif kind == b"S":
            return self._sync(reply)
        return False

    def _sync(self, reply: bytearray) -> bool:
        if self._batch_end and self.owe_error and self._batch_commit:
            self._batch_reply.clear()
            reply += self._error() + ready_bytes(b"I")
            return True
        if self._batch_end:
            reply += self._batch_reply + ready_bytes(b"I")
            self._batch_reply.clear()
            return True
        self._batch_reply.clear()
        reply += self._error() + ready_bytes(b"E")
        return False
