"""The relaying phase, the hot path: bytes flow both ways untouched while the books are kept.

One method per direction. Each walks message headers only (wire/frames.py FrameScanner), reads
the few messages the books need (sync points, statement texts, tags, the server's last words)
and relays every chunk whole, in one command. Replies to pgsidecar's own queries (the session
snapshot, server facts, the replay) are read here too and never reach the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgsidecar.relay import commands as cmd
from pgsidecar.relay.context import SessionContext
from pgsidecar.relay.hosts import NEEDS_WRITER
from pgsidecar.relay.internal import InternalOutcome
from pgsidecar.relay.phases import Phase
from pgsidecar.relay.recovery import ClientStream, error_bytes, ready_bytes
from pgsidecar.session.pending import Owner, TxStatus
from pgsidecar.session.state import DIRTY_TAGS, FACTS_SQL, snapshot_sql
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError, ServerProtocolError
from pgsidecar.wire.frames import PREFIX_BYTES, FrameScanner, Prefix, frontend_limits
from pgsidecar.wire.payload import typed_message

if TYPE_CHECKING:
    from pgsidecar.relay.login import LoginResult
    from pgsidecar.relay.reconnect import Reconnect

# Module constants (plain ints) for the per-read loops; fe.Kind names them.
_Q, _P, _SYNC, _CLOSE, _TERMINATE, _FCALL = (
    int(k)
    for k in (fe.Kind.QUERY, fe.Kind.PARSE, fe.Kind.SYNC, fe.Kind.CLOSE, fe.Kind.TERMINATE, fe.Kind.FUNCTION_CALL)
)
_Z, _E, _N, _CC, _PS = (
    be.ReadyForQuery.TYPE[0],
    be.ErrorResponse.TYPE[0],
    be.NoticeResponse.TYPE[0],
    be.CommandComplete.TYPE[0],
    be.ParameterStatus.TYPE[0],
)
_CLIENT_WANTED = bytes((_Q, _P, _SYNC, _CLOSE, _TERMINATE, _FCALL))
_SERVER_WANTED = bytes((_Z, _E, _CC, _PS, _N))
# postgres.c SocketBackend: every message type a frontend may send after startup; anything else
# (a password message 'p' included) makes the server end the session, so pgsidecar refuses it.
_FRONTEND_TYPES = bytes(k for k in fe.Kind if k is not fe.Kind.PASSWORD)
# Server messages held back while incomplete, so the client never holds part of one we may
# withhold (the server's last words) or that a drop may cut; larger ones stream.
_HOLD_TYPES = frozenset((_E, _N))
# Enum members the per-read code compares with, as globals: Python 3.11 caches a global's
# lookup, but looks a class attribute up again at every use.
_CLIENT, _INTERNAL = Owner.CLIENT, Owner.INTERNAL
_IDLE = TxStatus.IDLE
_DRAINING = Phase.DRAINING
_LISTEN_LOST = "pgsidecar reconnected to the server; notifications sent while it was disconnected may have been missed"


class Relaying:
    """Both directions of an established session. Owns the two scanners and what they hold."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.reconnect: Reconnect  # wired by the facade
        self.client_scan = self._client_scanner()
        self.server_scan = self._server_scanner()
        self.client_prefix: bytearray | None = None  # the start of the client message in progress, if kept
        self.server_tail = b""  # the start of an incomplete server message, held back
        # The policy is fixed for the session; read once, not per read.
        limit = ctx.policy.check_after_idle_s
        self._idle_check_s = limit if limit is not None and limit > 0 else 0.0
        self._inflight_cap = ctx.policy.max_inflight_copy_bytes

    def _client_scanner(self) -> FrameScanner:
        limit = self.ctx.policy.max_message_bytes
        return FrameScanner(
            _CLIENT_WANTED,
            limit,
            client=True,
            allowed=_FRONTEND_TYPES,
            limits=frontend_limits(limit),
            marks=fe.SYNC_POINTS,
            whole_named_parse=True,
        )

    def _server_scanner(self) -> FrameScanner:
        return FrameScanner(_SERVER_WANTED, self.ctx.policy.max_message_bytes, client=False)

    # ------------------------------------------------------------------ the first login's end
    def start(self, result: LoginResult) -> list[cmd.Command]:
        """The first login finished: greet the client as the server did, with our cancel key."""
        ctx = self.ctx
        ctx.first_backend_pid = result.backend_pid
        ctx.client_params = dict(result.params)
        ctx.goto(Phase.RELAYING)
        self.client_scan = self._client_scanner()
        self.server_scan = self._server_scanner()
        hello = bytearray(be.AuthenticationOk().encode())
        for name, value in result.params.items():
            hello += be.ParameterStatus(name, value).encode()
        hello += be.BackendKeyData(result.backend_pid, ctx.secret).encode()
        for notice in result.notices:
            hello += notice
        hello += ready_bytes(b"I")
        # The server facts a later drop is judged against are read now, while the client reads
        # its hello; its first request waits for them (held), so a drop right after connect
        # still has them.
        ctx.internal.begin(new_params=None)
        ctx.internal.expect(("first_facts",))
        ctx.pending.expect(Owner.INTERNAL)
        out: list[cmd.Command] = [
            cmd.RegisterCancelKey(result.backend_pid, ctx.secret),
            cmd.SendToClient(bytes(hello)),
            cmd.SendToServer(fe.Query(FACTS_SQL.decode()).encode()),
        ]
        park_after = ctx.policy.park_after_s
        if park_after:  # upstream.park_after: one timer per session (relay/parking.py)
            out.append(cmd.SetTimer(cmd.TimerName.PARK, park_after))
        if result.leftover:
            out += self.internal_data(result.leftover)
        return out

    def new_upstream(self) -> None:
        """A new server connection: its stream starts at a boundary."""
        self.server_scan = self._server_scanner()
        self.server_tail = b""

    # ------------------------------------------------------------------ client -> server
    def client_data(self, data: bytes) -> list[cmd.Command]:
        out = self.client_read(data)
        return [cmd.SendToServer(data)] if out is None else out

    def client_read(self, data: bytes) -> list[cmd.Command] | None:
        """One client read: None when it goes to the server whole, as it came (the hot path,
        without a command object), else the commands to carry out."""
        ctx = self.ctx
        if ctx.responder is not None:
            return self.reconnect.answer_locally(data)
        front = ctx.pending.front
        if front is _INTERNAL:
            return ctx.hold(data)
        # upstream.check_after_idle: after a long idle, prove the path with one round trip first.
        limit = self._idle_check_s
        if limit and front is None and ctx.now - ctx.last_server_at > limit and self.at_request_boundary():
            return self._check_then_hold(data)
        self.relay_client(data)
        return None

    def relay_client(self, data: bytes) -> None:
        """Book one client read that goes to the server whole (the caller sends it): the replies
        it earns, its statement texts, the start of a message it cuts, the in-flight record."""
        ctx = self.ctx
        pending = ctx.pending
        scan = self.client_scan
        if pending.front is None and scan.at_boundary and scan.messages == scan.last_mark:
            # A request boundary: what is sent from here on is the next request.
            ctx.inflight = []
            ctx.inflight_bytes = 0
            ctx.inflight_commit = False
            ctx.messages_at_request = self.server_scan.messages
        frames = scan.feed(data)
        if not scan.at_boundary:
            self._keep_partial(data)
        for t, payload in frames:
            if t == _SYNC:
                pending.expect(_CLIENT)
            elif t == _Q:
                pending.expect(_CLIENT)
                self._note_sql(payload)
            elif t == _P:
                self._note_parse(payload)
            elif t == _FCALL:
                pending.expect(_CLIENT)
            elif t == _CLOSE:
                if payload[:1] == b"S" and payload[1:2] != b"\x00":
                    ctx.book.dirty = True
            elif t == _TERMINATE:
                ctx.client_terminated = True
        inflight = ctx.inflight
        if inflight is not None:
            inflight.append(data)
            ctx.inflight_bytes += len(data)
            if ctx.inflight_bytes > self._inflight_cap:
                ctx.inflight = None

    def _keep_partial(self, data: bytes) -> None:
        """Keep the start of the client message this read ended inside (up to
        reconnect.max_buffered): if the upstream drops now, it can be sent again whole."""
        seen = self.client_scan.partial_seen
        limit = self.ctx.policy.max_buffered_bytes
        if seen <= len(data):  # it began in this read
            self.client_prefix = bytearray(data[len(data) - seen :]) if seen <= limit else None
        elif self.client_prefix is not None:
            if seen <= limit:
                self.client_prefix += data
            else:
                self.client_prefix = None

    def _note_sql(self, payload: bytes) -> None:
        ctx = self.ctx
        if isinstance(payload, Prefix):
            # Only the start of a long statement was read: it counts as possibly changing session
            # state (a snapshot at the next idle point) and as possibly committing.
            ctx.book.dirty = True
            ctx.inflight_commit = True
            return
        if ctx.book.note_request(payload):
            ctx.inflight_commit = True

    def _note_parse(self, payload: bytes) -> None:
        name_end = fe.parse_statement_name(payload)
        if name_end < 0:
            if isinstance(payload, Prefix):
                raise ClientProtocolError("invalid Parse message: statement name is too long")
            raise ClientProtocolError("invalid Parse message: statement name is not NUL-terminated")
        if isinstance(payload, Prefix):
            self._note_sql(payload)
            return
        start = name_end + 1
        if len(payload) - start > PREFIX_BYTES:
            # A long statement is judged by its start, like one that spans reads: no copy of it.
            self._note_sql(Prefix(payload[start : start + PREFIX_BYTES]))
        else:
            self._note_sql(payload[start:])
        if name_end:
            # The Parse body, once, for replay (the scanner hands it over without copying).
            self.ctx.book.parses[payload[:name_end].decode("utf-8", "surrogateescape")] = payload
            self.ctx.book.dirty = True

    def at_request_boundary(self) -> bool:
        """The client's stream sits between requests: no message half sent, no group open."""
        scan = self.client_scan
        return scan.at_boundary and scan.messages == scan.last_mark

    def _check_then_hold(self, data: bytes) -> list[cmd.Command]:
        # An empty Sync earns one ReadyForQuery and runs nothing (55.2.3); if the path is dead the
        # drop is seen while the client's request is still held, so it is hidden like an idle one.
        self.ctx.internal.expect(("ping",))
        self.ctx.pending.expect(Owner.INTERNAL)
        return [cmd.SendToServer(fe.Sync().encode()), *self.ctx.hold(data)]

    def release_held(self) -> list[cmd.Command]:
        ctx = self.ctx
        held, ctx.held, ctx.held_bytes = ctx.held, [], 0
        out: list[cmd.Command] = []
        if ctx.paused:
            ctx.paused = False
            out.append(cmd.ResumeClient())
        for chunk in held:
            if ctx.pending.front is Owner.INTERNAL or ctx.phase not in (Phase.RELAYING, Phase.DRAINING):
                out += ctx.hold(chunk)
            elif ctx.responder is not None:
                out += self.reconnect.answer_locally(chunk)
            else:
                self.relay_client(chunk)
                out.append(cmd.SendToServer(chunk))
        return out

    def stream(self) -> ClientStream:
        """Where both byte streams stand, for the drop decision."""
        scan = self.client_scan
        mid = not scan.at_boundary
        server = self.server_scan
        return ClientStream(
            client_mid=mid,
            partial_type=scan.partial_type if mid else None,
            partial_remaining=scan.partial_remaining if mid else None,
            partial_kept=bytes(self.client_prefix) if mid and self.client_prefix is not None else None,
            group_sent=scan.messages > scan.last_mark,
            server_split=not server.at_boundary and len(self.server_tail) < server.partial_seen,
            server_messages=server.messages,
        )

    def after_drop(self, *, resend: bool) -> None:
        """Nothing of a cut client message reaches the new server unless it is sent whole: the
        scanner starts again at the message's first byte (kept) or past it (discarded). A resent
        request is exactly what the scanner has read, so it keeps its place."""
        if not resend:
            scan = self.client_scan
            scan.rewind()
            # What was sent of the current request is settled (answered, or the responder's to
            # discard): the next byte relayed starts a new request. Found by a property test: a
            # later 57P05 resent these stale bytes, the start of a cut message among them.
            scan.last_mark = scan.messages
            ctx = self.ctx
            ctx.inflight = []
            ctx.inflight_bytes = 0
            ctx.inflight_commit = False
        self.client_prefix = None
        self.server_tail = b""

    # ------------------------------------------------------------------ server -> client
    def server_data(self, data: bytes) -> list[cmd.Command]:
        out = self.server_read(data)
        return [cmd.SendToClient(data)] if out is None else out

    def server_read(self, data: bytes) -> list[cmd.Command] | None:
        """One server read: None when it goes to the client whole, as it came (the hot path,
        without a command object), else the commands to carry out."""
        ctx = self.ctx
        before = ctx.last_server_at
        ctx.last_server_at = ctx.now
        out = self.internal_data(data) if ctx.pending.front is _INTERNAL else self._relay_server(data)
        if ctx.last_fatal is not None or ctx.last_notice is not None:
            ctx.last_server_at = before  # the server's last words are not activity: idle_s counts to them
        return out

    def relay_server(self, data: bytes) -> list[cmd.Command]:
        out = self._relay_server(data)
        return [cmd.SendToClient(data)] if out is None else out

    def _relay_server(self, data: bytes) -> list[cmd.Command] | None:
        """Book one server read; None when all of it goes to the client unchanged and nothing
        else is to be done, else the commands (what of it goes to the client, first)."""
        ctx = self.ctx
        pending = ctx.pending
        idle_point = False
        scan = self.server_scan
        frames = scan.feed(data)
        sent = data  # what the client gets: the read, less what is held back or withheld
        if self.server_tail:
            sent = self.server_tail + data
            self.server_tail = b""
        for t, payload in frames:
            if t == _Z:
                if len(payload) != 1:  # 55.7 ReadyForQuery: exactly one status byte
                    raise ServerProtocolError(f"invalid ReadyForQuery message of {len(payload)} bytes")
                pending.ready(payload[0])
                idle_point = pending.front is None
            elif t == _CC:
                if payload.startswith(DIRTY_TAGS):  # session/state.py tag_is_dirty, without the call
                    ctx.book.dirty = True
            elif t in (_E, _N):
                if self._note_server_error(t, payload):
                    # The server's last words are for pgsidecar, not the client: the session
                    # rules decide what the client is told (nothing, an error, or a FATAL).
                    raw = typed_message(bytes([t]), payload)
                    if t == _E:
                        ctx.last_fatal_raw = raw
                    sent = sent.replace(raw, b"", 1)
            elif t == _PS and not isinstance(payload, Prefix):
                msg = be.ParameterStatus.decode(payload)
                ctx.client_params[msg.name] = msg.value
                if msg.name == "in_hot_standby" and msg.value == "on" and ctx.walk.attrs in NEEDS_WRITER:
                    ctx.role_lost = "the server reports in_hot_standby=on: it is a standby now"
        if not scan.at_boundary:
            self._hold_server_tail_of(sent)
            sent = sent[: len(sent) - len(self.server_tail)]
        more: list[cmd.Command] = []
        client = self.client_scan
        # An idle point: nothing owed, no transaction, both streams between messages and the
        # client between requests (at_request_boundary, inline).
        if (
            idle_point
            and pending.status is _IDLE
            and scan.at_boundary
            and client.at_boundary
            and client.messages == client.last_mark
        ):
            if ctx.phase is _DRAINING:
                more = self.drain_close()
            elif ctx.role_lost is not None and not ctx.client_terminated:
                more = self.reconnect.leave_server(ctx.role_lost)
            else:
                ctx.inflight = []
                ctx.inflight_bytes = 0
                if ctx.book.dirty and not ctx.client_terminated:
                    more = self._read_session_state()
        if sent is data and sent and not more:
            return None
        return [cmd.SendToClient(sent), *more] if sent else more

    def _hold_server_tail_of(self, data: bytes) -> None:
        """The read ended inside a server message: hold its start back while it may be one we
        withhold (E, N) or a bare header, up to PREFIX_BYTES; anything else streams on."""
        scan = self.server_scan
        seen, size = scan.partial_seen, scan.partial_size
        if seen <= len(data) and (size is None or (scan.partial_type in _HOLD_TYPES and size <= PREFIX_BYTES)):
            self.server_tail = data[len(data) - seen :]

    def _note_server_error(self, t: int, payload: bytes) -> bool:
        """Remember a FATAL, or a 57P* WARNING (PG 14+ warns, then closes); True to withhold it.
        Only a message read whole can be withheld; of a longer one only its start is read."""
        ctx = self.ctx
        if isinstance(payload, Prefix):
            if t == _E:
                err = be.ErrorResponse.decode_start(payload)
                if err.severity in ("FATAL", "PANIC"):
                    ctx.last_fatal = err
            return False
        if t == _E:
            err = be.ErrorResponse.decode(payload)
            if err.severity in ("FATAL", "PANIC"):
                ctx.last_fatal = err
                return True
            if (
                err.code == sqlstate.READ_ONLY_SQL_TRANSACTION
                and ctx.walk.attrs in NEEDS_WRITER
                # the session's own default_transaction_read_only (reported, so known) is no sign
                and ctx.client_params.get("default_transaction_read_only") != "on"
            ):
                # The writer is a writer no more (a failover, the old primary back as a reader):
                # this statement failed as it is; at the next idle point, find the writer.
                ctx.role_lost = f"{err.code} {err.message} from a server that was a writer"
            return False
        notice = be.NoticeResponse.decode(payload)
        if notice.code and notice.code.startswith("57P"):
            ctx.last_notice = notice
            return True
        return False

    def _read_session_state(self) -> list[cmd.Command]:
        """An idle point (nothing owed, no transaction, the client between requests; never inside
        a client message or an open group) after a statement that may have changed the session
        state: read it exactly, with one query of our own."""
        ctx = self.ctx
        ctx.book.dirty = False
        ctx.internal.begin(new_params=None)
        ctx.internal.expect(("snapshot",))
        ctx.pending.expect(Owner.INTERNAL)
        return [cmd.SendToServer(fe.Query(snapshot_sql(ctx.book.custom_names).decode()).encode())]

    # ------------------------------------------------------------------ pgsidecar's own queries
    def internal_data(self, data: bytes) -> list[cmd.Command]:
        ctx = self.ctx
        out: list[cmd.Command] = []
        for outcome in ctx.internal.feed(data):
            ctx.pending.ready(outcome.status)
            out += self._internal_outcome(outcome)
            if ctx.phase is Phase.CLOSED:
                return out
        if ctx.internal.forward:
            out.insert(0, cmd.SendToClient(ctx.internal.take_forward()))
        if ctx.pending.front is not Owner.INTERNAL:
            rest = ctx.internal.take_rest()
            if ctx.phase is Phase.REPLAYING:
                out += self.reconnect.replay_done()
            if rest:
                out += self.relay_server(rest)
            if ctx.phase in (Phase.RELAYING, Phase.DRAINING) and not self._internal_owed():
                out += self.release_held()
            if ctx.phase is Phase.DRAINING and ctx.pending.idle:
                out += self.drain_close()  # our own query was the last thing owed
        return out

    def _internal_owed(self) -> bool:
        """A reply to pgsidecar's own query comes next (read again: replies settle it)."""
        return self.ctx.pending.front is Owner.INTERNAL

    def _internal_outcome(self, outcome: InternalOutcome) -> list[cmd.Command]:
        ctx = self.ctx
        purpose = outcome.purpose
        if purpose == "snapshot":
            state = ctx.internal.snapshot_state(outcome, ctx.params.get("user", ""))
            ctx.book.state = state
            if state.unknown is None:
                # Keep the Parse bytes of statements that still exist, so a session that
                # prepares and closes many statements does not grow without bound.
                parses = ctx.book.parses
                ctx.book.parses = {n: parses[n] for n in state.protocol_statements if n in parses}
            return []
        if purpose in ("facts", "first_facts"):
            facts = ctx.internal.facts(outcome)
            if purpose == "facts":
                ctx.drops.new_facts(ctx.server_facts, facts)
            ctx.server_facts = facts
            return []
        if outcome.error is not None:
            return self.reconnect.give_up(f"replaying the session failed: {outcome.error.code} {outcome.error.message}")
        return []

    def parameters_changed(self) -> list[cmd.Command]:
        """After a replay: settings whose values differ on the new server, and what LISTEN lost."""
        ctx = self.ctx
        out: list[cmd.Command] = []
        changed = bytearray()
        for name, value in ctx.internal.new_params.items():
            if ctx.client_params.get(name) != value:
                changed += be.ParameterStatus(name, value).encode()
                ctx.client_params[name] = value
        if changed:
            out.append(cmd.SendToClient(bytes(changed)))
        if ctx.book.state.listen:
            out.append(cmd.SendToClient(be.NoticeResponse.make("NOTICE", "01000", _LISTEN_LOST).encode()))
        return out

    # ------------------------------------------------------------------ shutdown
    def drain(self) -> list[cmd.Command]:
        """Shutdown: an idle session is closed now, a busy one at its next idle point."""
        ctx = self.ctx
        if ctx.pending.idle and self.at_request_boundary():
            return self.drain_close()
        ctx.goto(Phase.DRAINING)
        return []

    def drain_close(self) -> list[cmd.Command]:
        """What PostgreSQL sends on a shutdown (57P01 admin_shutdown), then close both sides."""
        self.ctx.goto(Phase.CLOSED)
        return [
            cmd.SendToClient.mine(
                error_bytes("FATAL", sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
            ),
            cmd.CloseClient(),
            cmd.CloseServer(),
        ]
