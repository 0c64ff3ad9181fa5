"""What the client is told when the upstream is lost.

``decide_drop`` applies the session rules (docs/session-rules.md) to a ``DropSnapshot`` taken at
the moment of the drop. ``LocalAbortResponder`` plays the server for a client that still believes
it is inside the transaction that was lost, until it ends it; ``GroupAbort`` answers the rest of a
request group the drop cut off. The book kept about each drop is ``relay/dropbook.py``;
classification lives in ``pgsidecar.drops``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgsidecar.session.pending import TxStatus
from pgsidecar.session.state import is_transaction_end
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError
from pgsidecar.wire.frames import PQ_LARGE_MESSAGE_LIMIT, MessageBuffer, frontend_limits

LOST_IN_TRANSACTION = "connection to the server was lost; the transaction was rolled back"
LOST_IN_FLIGHT = "connection to the server was lost while the request was in flight; whether it was executed is unknown"
IN_FAILED_TRANSACTION = "current transaction is aborted, commands ignored until end of transaction block"
_ROLLBACK_ONLY = re.compile(rb"(?i)^\s*(?:rollback|abort)\b")


def error_bytes(severity: str, code: str, message: str, *, hint: str | None = None) -> bytes:
    return be.ErrorResponse.make(severity, code, message, hint=hint).encode()


def ready_bytes(status: bytes) -> bytes:
    return be.ReadyForQuery(status).encode()


NOT_SENT_WHOLE = "connection to the server was lost before this request reached it whole; it was not executed"
KEPT_HINT = (
    "pgsidecar kept the connection: the transaction was rolled back, and after ROLLBACK "
    "the next transaction runs on a new server connection"
)

K = fe.Kind
_Q, _F, _S, _X = K.QUERY, K.FUNCTION_CALL, K.SYNC, K.TERMINATE
_COPY_TYPES = frozenset((K.COPY_DATA, K.COPY_DONE, K.COPY_FAIL))
_EXTENDED_TYPES = frozenset((K.PARSE, K.BIND, K.EXECUTE, K.DESCRIBE, K.CLOSE, K.FLUSH))


@dataclass(frozen=True, slots=True)
class ServerReason:
    """What the server said before it ended the session (its last FATAL or 57P* WARNING)."""

    code: str
    message: str
    severity: str
    raw: bytes = b""  # the server's own ErrorResponse, as received (a FATAL only)

    def fatal(self) -> bytes:
        """The server's own FATAL as it sent it, or one in its words (it only warned, PG 14+)."""
        return self.raw or error_bytes("FATAL", self.code, self.message)


@dataclass(frozen=True, slots=True)
class ClientStream:
    """Where the two byte streams stand at the drop."""

    client_mid: bool = False  # the client is inside a message
    partial_type: int | None = None  # its type
    partial_remaining: int | None = None  # bytes of it still to come (None: header incomplete)
    partial_kept: bytes | None = None  # its bytes so far, when within reconnect.max_buffered
    group_sent: bool = False  # whole messages of the current group (since the last sync point) were sent
    server_split: bool = False  # the client already holds part of a server message
    server_messages: int = 0  # server messages seen so far


@dataclass(frozen=True, slots=True)
class DropSnapshot:
    """Everything the session rules look at, taken from the session at the moment of the drop."""

    owed: int  # sync points the client still waits for
    status: TxStatus  # the transaction status of the last ReadyForQuery
    lost: tuple[str, ...]  # session state that cannot be rebuilt on a new connection
    on_transaction_loss: str
    inflight_commit: bool  # a request that may commit is among those owed
    proven_unexecuted: bool  # 57P05 read before any reply: the server never read the request
    inflight: bytes | None  # every client byte since the last idle point (None: too many kept)
    reason: ServerReason | None
    stream: ClientStream = ClientStream()


@dataclass(slots=True)
class DropDecision:
    state: str  # idle | in_transaction | request_in_flight
    to_client: bytes = b""
    fatal: bytes | None = None
    fatal_code: str = sqlstate.CONNECTION_FAILURE  # the SQLSTATE of that FATAL, for the record
    close_silently: bool = False  # the client holds part of a server message: close, never write
    responder: LocalAbortResponder | GroupAbort | None = None
    resend: tuple[bytes, int] | None = None  # (client bytes, sync points) proven never run
    rewind: bytes | None = None  # the start of a client message, to send again whole
    impact: str = "transparent"
    client_protocol_violation: bool = False  # the server ended the session over what the client sent


# PostgreSQL's own words when it ends a session over the client's bytes (postgres.c, pqformat.c).
# PgBouncer also uses 08P01 for its own FATALs (client_idle_timeout, "server conn crashed?"):
# those are drops of the pooler's making, not the client's.
_CLIENT_VIOLATION = re.compile(
    r"(?i)invalid frontend message|protocol synchronization was lost|invalid message|unexpected message"
    r"|insufficient data left in message|invalid string in message|incorrect binary data format"
)


def blames_client(reason: ServerReason) -> bool:
    """The server ended the session over something the client sent: not a drop to hide."""
    return reason.code == sqlstate.PROTOCOL_VIOLATION and _CLIENT_VIOLATION.search(reason.message) is not None


def drop_state(owed: int, status: TxStatus, group_sent: bool = False) -> str:
    if status is not TxStatus.IDLE:
        return "in_transaction"
    return "request_in_flight" if owed or group_sent else "idle"


def decide_drop(snap: DropSnapshot) -> DropDecision:
    """The session rules (docs/session-rules.md): the client sees nothing, an honest error, or a
    FATAL; a client message the drop cut in two is sent again whole or answered and discarded."""
    decision = DropDecision(state=drop_state(snap.owed, snap.status, snap.stream.group_sent))
    reason = snap.reason
    if snap.stream.server_split:
        # Anything we wrote now would be read as the rest of that message.
        decision.close_silently = True
        decision.impact = "client closed: the drop split a server message the client had partly received"
        return decision
    if reason is not None and blames_client(reason):
        # The server ended the session over the client's bytes: not a drop to hide.
        decision.client_protocol_violation = True
        decision.fatal, decision.fatal_code = reason.fatal(), reason.code
        decision.impact = f"fatal {reason.code} from the server (client protocol violation) passed on"
        return decision
    if snap.lost:
        decision.fatal = error_bytes(
            "FATAL",
            sqlstate.CONNECTION_FAILURE,
            "connection to the server was lost and the session held "
            + ", ".join(snap.lost)
            + ", which cannot be restored on a new connection",
        )
        return decision
    if decision.state == "idle":
        if not snap.stream.client_mid:
            return decision
        if snap.stream.partial_kept is not None:
            decision.rewind = snap.stream.partial_kept
            decision.impact = (
                "transparent (a request cut by the drop was sent again whole: it had not reached the server)"
            )
            return decision
        return _abort_partial(
            decision,
            snap,
            error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, NOT_SENT_WHOLE),
            f"error {sqlstate.CONNECTION_FAILURE} sent to client (a request the drop cut was not executed)",
        )
    if snap.on_transaction_loss == "close":
        decision.fatal, decision.fatal_code = _close_fatal(decision.state, reason)
        return decision
    if decision.state == "request_in_flight":
        if snap.proven_unexecuted and snap.inflight is not None:
            decision.resend = (snap.inflight, snap.owed)
            decision.impact = "transparent (request resent: the server ended the session before reading it)"
            return decision
        decision.to_client = _per_sync(snap.owed, _in_flight_error(reason), b"I")
        decision.impact = f"error {sqlstate.TRANSACTION_RESOLUTION_UNKNOWN} sent to client"
        return _abort_rest_of_group(decision, snap, reason)
    if snap.owed and snap.inflight_commit:
        decision.to_client = _per_sync(snap.owed, _in_flight_error(reason), b"I")
        decision.impact = f"error {sqlstate.TRANSACTION_RESOLUTION_UNKNOWN} sent to client (COMMIT in flight)"
        return _abort_rest_of_group(decision, snap, reason)
    lost_error = _lost_transaction_error(reason)
    if snap.owed:
        decision.to_client = _per_sync(snap.owed, lost_error, b"E")
        decision.responder = LocalAbortResponder(owe_error=False)
    else:
        decision.responder = LocalAbortResponder(owe_error=True, first_error=lost_error)
    code = reason.code if reason is not None else sqlstate.CONNECTION_FAILURE
    decision.impact = f"error {code} sent to client (transaction rolled back)"
    _take_cut_message(decision, snap, decision.responder)
    return decision


def _abort_rest_of_group(decision: DropDecision, snap: DropSnapshot, reason: ServerReason | None) -> DropDecision:
    """After the owed replies: the group in progress (if any) gets its own error, as the server
    would give it; 08007 when part of it reached the old server, else it was never executed."""
    if not snap.stream.client_mid and not snap.stream.group_sent:
        return decision
    if snap.stream.group_sent:
        error = _in_flight_error(reason)
    else:
        error = error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, NOT_SENT_WHOLE)
    return _abort_partial(decision, snap, error, decision.impact)


def _abort_partial(decision: DropDecision, snap: DropSnapshot, error: bytes, impact: str) -> DropDecision:
    responder = GroupAbort(error, group_open=snap.stream.group_sent)
    if snap.stream.group_sent:
        decision.to_client += responder.error_now()  # a client waiting after Flush hears it at once
    _take_cut_message(decision, snap, responder)
    if not responder.done:
        decision.responder = responder
    decision.impact = impact
    return decision


def _take_cut_message(decision: DropDecision, snap: DropSnapshot, responder: LocalAbortResponder | GroupAbort) -> None:
    """The responder takes over the client message the drop cut: from its first byte when its
    start was kept (rewound), else answered by its type with the rest of it discarded."""
    stream = snap.stream
    if not stream.client_mid:
        return
    if stream.partial_kept is not None:
        decision.rewind = stream.partial_kept
        return
    assert stream.partial_type is not None and stream.partial_remaining is not None
    decision.to_client += responder.begin_partial(stream.partial_type, stream.partial_remaining)


def _close_fatal(state: str, reason: ServerReason | None) -> tuple[bytes, str]:
    """on_transaction_loss: close: the server's own FATAL when it said why, as PgBouncer passes
    it; else ours. Returns the FATAL and its SQLSTATE."""
    if reason is not None:
        return reason.fatal(), reason.code
    if state == "request_in_flight":
        code, message = sqlstate.TRANSACTION_RESOLUTION_UNKNOWN, LOST_IN_FLIGHT
    else:
        code, message = sqlstate.CONNECTION_FAILURE, LOST_IN_TRANSACTION
    return error_bytes("FATAL", code, message), code


def _lost_transaction_error(reason: ServerReason | None) -> bytes:
    """The server's own SQLSTATE and words (57P01, 25P03, ...) when it said why, else 08006."""
    if reason is None:
        return error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, LOST_IN_TRANSACTION)
    return error_bytes("ERROR", reason.code, reason.message, hint=KEPT_HINT)


def _in_flight_error(reason: ServerReason | None) -> bytes:
    message = LOST_IN_FLIGHT
    if reason is not None:
        message += f"; the server said: {reason.message} ({reason.code})"
    return error_bytes("ERROR", sqlstate.TRANSACTION_RESOLUTION_UNKNOWN, message)


def _per_sync(owed: int, first: bytes, status: bytes) -> bytes:
    """One error and one ReadyForQuery per sync point the client still waits for."""
    out = bytearray()
    for i in range(owed):
        if i == 0 or status == b"I":
            out += first
        else:
            out += error_bytes("ERROR", sqlstate.IN_FAILED_SQL_TRANSACTION, IN_FAILED_TRANSACTION)
        out += ready_bytes(status)
    return bytes(out)


#: What the responders accept of a client: PostgreSQL's own per-type length limits.
_CLIENT_LIMITS = frontend_limits(PQ_LARGE_MESSAGE_LIMIT)


class GroupAbort:
    """Answers the rest of a request group the drop cut off, the way PostgreSQL answers a group
    whose message failed (55.2.3): one ErrorResponse, everything up to Sync discarded, then
    ReadyForQuery. A simple Query or FunctionCall is its own group. Bodies are skipped by their
    length, never read, so nothing inside them is ever taken for a message."""

    def __init__(self, error: bytes, *, group_open: bool) -> None:
        self._error = error
        self._error_sent = False
        self._group_open = group_open  # inside an extended-protocol group: discard until Sync
        self._buf = MessageBuffer(PQ_LARGE_MESSAGE_LIMIT, client=True, limits=_CLIENT_LIMITS)
        self._ending = False  # the group ends once the current message's body is discarded
        self.done = False

    def error_now(self) -> bytes:
        if self._error_sent:
            return b""
        self._error_sent = True
        return self._error

    def begin_partial(self, t: int, remaining: int) -> bytes:
        """The drop cut a message of type ``t``: answer it by its type; its rest is discarded."""
        reply = bytearray()
        self._ending = self._message(t, reply)
        self._buf.discard(remaining)
        self.done = self._ending and not self._buf.skipping
        return bytes(reply)

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Returns (reply to the client, bytes after the group ended, whether it ended)."""
        messages = self._buf
        messages.feed(data)
        reply = bytearray()
        while not self.done and not self._ending and (head := messages.header()) is not None:
            if head[0] == _X:
                # The client is leaving: its Terminate goes back to the session, which ends as usual.
                self.done = True
                return bytes(reply), messages.rest(), True
            self._ending = self._message(head[0], reply)
            messages.skip_message()
        self.done = self.done or (self._ending and not messages.skipping)
        return bytes(reply), (messages.rest() if self.done else b""), self.done

    def _message(self, t: int, reply: bytearray) -> bool:
        """Answer one message by its type; True when it ends the group."""
        if t in _COPY_TYPES:
            # Outside a group only the cut CopyData itself is here: its COPY was answered already.
            return not self._group_open
        if t == _S:
            reply += self.error_now() + ready_bytes(b"I")
            return True
        if t in (_Q, _F):
            if self._group_open:
                return False  # after an extended-protocol error the server discards all until Sync
            reply += self.error_now() + ready_bytes(b"I")
            return True
        if t in _EXTENDED_TYPES:
            self._group_open = True
            reply += self.error_now()
            return False
        if t == _X:
            return True
        raise ClientProtocolError(f"invalid frontend message type {t}")


_TEXT_TYPES = frozenset((K.QUERY, K.PARSE))
_PARSE = K.PARSE
_MAX_TEXT = 64 * 1024  # a ROLLBACK is short: longer statement texts are not read whole


class LocalAbortResponder:
    """Answers a client that is still inside a transaction the drop rolled back.

    Until the client ends the block, every request gets an error and ``Z`` = ``E``, as the server
    would answer in a failed transaction (PostgreSQL docs 55.2.2); its ROLLBACK (or COMMIT, which
    the server answers with ROLLBACK in a failed block) is answered here with ``Z`` = ``I``.
    A COMMIT that arrives before the client was told of the loss gets the 08006 error instead:
    answering it ROLLBACK, an ordinary tag, would let the app believe its writes were committed.
    """

    def __init__(self, *, owe_error: bool, first_error: bytes | None = None) -> None:
        self.owe_error = owe_error
        # The first error tells why the transaction was lost (the server's own SQLSTATE if it said).
        self._first_error = first_error or error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, LOST_IN_TRANSACTION)
        self._buf = MessageBuffer(PQ_LARGE_MESSAGE_LIMIT, client=True, limits=_CLIENT_LIMITS)
        self._batch_end = False
        self._batch_commit = False
        self._batch_failed = False
        self._batch_reply = bytearray()
        # Once the block has ended: what goes back to the session ahead of the bytes after it.
        self._handback: bytes | None = None

    def _error(self) -> bytes:
        if self.owe_error:
            self.owe_error = False
            return self._first_error
        return error_bytes("ERROR", sqlstate.IN_FAILED_SQL_TRANSACTION, IN_FAILED_TRANSACTION)

    def begin_partial(self, t: int, remaining: int) -> bytes:
        """The drop cut a message of type ``t``: answer it from its type alone; its rest is skipped."""
        self._buf.discard(remaining)
        if t == _X:
            return b""  # a cut Terminate: the client is leaving
        reply = bytearray()
        self._message(t, b"\x00\x00" if t == _PARSE else b"", reply)
        return bytes(reply)

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """Returns (reply to the client, bytes after the block ended, whether it ended)."""
        messages = self._buf
        messages.feed(data)
        reply = bytearray()
        while self._handback is None and (head := messages.header()) is not None:
            t, size = head
            if t in _TEXT_TYPES and size + 4 <= _MAX_TEXT:
                # A statement text, read whole to see whether it ends the block.
                whole = messages.next()
                if whole is None:
                    break
                payload = whole[1]
            else:
                # Anything else is answered from its type alone; its body is skipped, not held.
                messages.skip_message()
                payload = b"\x00\x00" if t == _PARSE else b""
            if t == _X:
                self._handback = fe.Terminate().encode()
            elif self._message(t, payload, reply):
                self._handback = b""
        if self._handback is None or messages.skipping:
            return bytes(reply), b"", False  # open, or the rest of the message that ended it is still to come
        return bytes(reply), self._handback + messages.rest(), True

    def _message(self, t: int, payload: bytes, reply: bytearray) -> bool:
        if t == K.QUERY:
            if is_transaction_end(payload):
                if self.owe_error and not _ROLLBACK_ONLY.match(payload):
                    reply += self._error() + ready_bytes(b"I")
                    return True
                reply += be.CommandComplete("ROLLBACK").encode() + ready_bytes(b"I")
                return True
            reply += self._error() + ready_bytes(b"E")
            return False
        if t == K.PARSE:
            name_end = fe.parse_statement_name(payload)
            if name_end < 0:
                raise ClientProtocolError("invalid Parse message: statement name is not NUL-terminated")
            query = payload[name_end + 1 :]
            text = query.split(b"\x00", 1)[0]
            self._batch_end = self._batch_end or is_transaction_end(text)
            self._batch_commit = self._batch_commit or (is_transaction_end(text) and not _ROLLBACK_ONLY.match(text))
            self._batch_reply += be.ParseComplete().encode()
        elif t == K.BIND:
            self._batch_reply += be.BindComplete().encode()
        elif t == K.DESCRIBE:
            self._batch_reply += be.NoData().encode()
        elif t == K.EXECUTE:
            self._batch_reply += be.CommandComplete("ROLLBACK").encode()
        elif t == K.SYNC:
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
