"""SidecarConnection: the brain of one client session. Events in, commands out, no I/O.

The runtime feeds it what the sockets and timers say and carries out the commands it returns.
It follows docs/session-rules.md: a drop while idle is hidden (reconnect, replay), a drop inside a
transaction becomes an ordinary error (the server's SQLSTATE, or 08006), a drop with a request in
flight becomes 08007, nothing is ever sent to the server twice unless the server proved it never
ran it (57P05), and neither byte stream is ever resumed in the middle of a message.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pgsidecar.auth.scram import ScramServer, channel_binding_for
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.internal import InternalReplies
from pgsidecar.relay.login import UpstreamLogin
from pgsidecar.relay.phases import Phase, check_transition
from pgsidecar.relay.startup import StartupMixin
from pgsidecar.relay.dropbook import DropTracker
from pgsidecar.relay.recovery import (
    DropSnapshot, GroupAbort, LocalAbortResponder, ServerReason, decide_drop, error_bytes, ready_bytes,
)
from pgsidecar.session.pending import Owner, PendingReplies, TxStatus
from pgsidecar.session.replay import plan_replay
from pgsidecar.session.state import FACTS_SQL, SessionBook, snapshot_sql, tag_is_dirty
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from pgsidecar.wire.frames import PREFIX_BYTES, FrameScanner, Prefix, StartupReader, frontend_limits
from pgsidecar.wire.payload import show, typed_message

_Q, _P, _SYNC, _CLOSE, _TERMINATE, _FCALL = b"Q"[0], b"P"[0], b"S"[0], b"C"[0], b"X"[0], b"F"[0]
_Z, _E, _N, _CC, _PS = b"Z"[0], b"E"[0], b"N"[0], b"C"[0], b"S"[0]
_CLIENT_WANTED = b"QPSCXF"
_SERVER_WANTED = b"ZECSN"
# postgres.c SocketBackend: every message type a frontend may send after startup; anything else
# (a password message 'p' included) makes the server end the session, so pgsidecar refuses it.
_FRONTEND_TYPES = b"BCcdDEfFHPQSX"
_SYNC_POINTS = b"QSF"  # each earns one ReadyForQuery and ends a request group
# Server messages held back while incomplete, so the client never holds part of one we may
# withhold (the server's last words) or that a drop may cut; larger ones stream.
_HOLD_TYPES = frozenset(b"EN")
_GIVE_UP_STATES = {sqlstate.INVALID_PASSWORD, sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, sqlstate.INVALID_CATALOG_NAME}


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The parts of the configuration one session needs (relay/ does not import config/)."""

    client_tls: bool = True
    max_message_bytes: int = 1073741823
    startup_timeout_s: float = 10.0
    reconnect_deadline_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    on_transaction_loss: str = "error"
    max_buffered_bytes: int = 1 << 20
    max_inflight_copy_bytes: int = 1 << 20
    upstream_user: str | None = None  # auth.mode configured: the upstream credentials
    upstream_password: str | None = None
    upstream_dbname: str | None = None
    application_name: str | None = None
    check_after_idle_s: float | None = None
    client_auth: str = "trust"  # configured mode: "trust" (loopback only) or "scram" against client_password
    client_password: str | None = None
    allow_tls_retry: bool = False  # sslmode=allow: a plaintext login the server rejects is retried over TLS


class SidecarConnection(StartupMixin):
    """One client session. ``handle(event)`` returns the commands to carry out, in order."""

    def __init__(self, policy: SessionPolicy, *, secret: bytes, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.secret = secret
        self.rng = rng or random.Random()
        self.phase = Phase.STARTUP
        self.pending = PendingReplies()
        self.book = SessionBook()
        self.startup = StartupReader()
        self.client_scan = self._client_scanner()
        self.server_scan = FrameScanner(_SERVER_WANTED, policy.max_message_bytes, client=False)
        self.client_prefix: bytearray | None = None  # the start of the client message in progress, if kept
        self.server_tail = b""  # the start of an incomplete server message, held back
        self.internal = InternalReplies(policy.max_message_bytes)
        self.drops = DropTracker()
        self.local_abort: LocalAbortResponder | GroupAbort | None = None
        self.login: UpstreamLogin | None = None
        self.params: dict[str, str] = {}  # startup parameters sent upstream
        self.password: str | None = policy.upstream_password
        self.client_params: dict[str, str] = {}  # ParameterStatus values the client was told
        self.client_tls = False
        self.trusted_transport = False
        self.peer = ""
        self.first_backend_pid = 0
        self.backend_key: tuple[int, bytes] = (0, b"")
        self.facts: dict = {}
        self.server_facts = None
        self.connected_wall = 0.0
        self.connected_at = 0.0
        self.last_server_at = 0.0
        self.last_client_at = 0.0
        self.held: list[bytes] = []  # client bytes waiting for the upstream
        self.held_bytes = 0
        self.paused = False
        self.inflight: list[bytes] | None = []  # client bytes since the last idle point
        self.inflight_bytes = 0
        self.inflight_commit = False
        self.messages_at_request = 0
        self.last_fatal: be.ErrorResponse | None = None
        self.last_fatal_raw = b""
        self.last_notice: be.NoticeResponse | None = None
        self.client_terminated = False
        self.login_waiting = False
        self.backoff_pending = False
        self.now = 0.0
        self.client_scram: ScramServer | None = None
        self.tried_tls = False
        self.draining = False  # shutdown: close with 57P01 at the next idle point

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: object) -> list[object]:
        self.now = getattr(event, "now", self.now)  # the clock, for records closed by any event
        try:
            if isinstance(event, ev.ServerData):
                return self._server_data(event)
            if isinstance(event, ev.ClientData):
                return self._client_data(event)
            return self._other(event)
        except ClientProtocolError as exc:
            return self._fatal_to_client(exc.sqlstate, str(exc), log=f"client protocol error: {exc}")
        except ProtocolError as exc:
            return self._upstream_broken(event, str(exc))

    def _other(self, event: object) -> list[object]:
        if isinstance(event, ev.ClientConnected):
            self.peer, self.trusted_transport = event.peer, event.trusted_transport
            self.last_client_at = event.now
            return [cmd.SetTimer("startup", self.policy.startup_timeout_s)]
        if isinstance(event, ev.ClientTLSStarted):
            self.client_tls = True
            return []
        if isinstance(event, ev.ServerConnected):
            return self._server_connected(event)
        if isinstance(event, ev.ServerConnectFailed):
            return self._connect_failed(event, f"{event.kind}: {event.message}")
        if isinstance(event, ev.ServerClosed):
            return self._server_closed(event)
        if isinstance(event, ev.ClientClosed):
            return self._client_closed(event)
        if isinstance(event, ev.Timer):
            return self._timer(event)
        raise TypeError(f"unexpected event {event!r}")

    def _client_scanner(self) -> FrameScanner:
        limit = self.policy.max_message_bytes
        return FrameScanner(_CLIENT_WANTED, limit, client=True, allowed=_FRONTEND_TYPES,
                            limits=frontend_limits(limit), marks=_SYNC_POINTS, whole_named_parse=True)

    def _client_at_request_boundary(self) -> bool:
        """The client's stream sits between requests: no message half sent, no group open."""
        scan = self.client_scan
        return scan.at_boundary and scan.messages == scan.last_mark

    def _goto(self, phase: Phase) -> None:
        check_transition(self.phase, phase)
        self.phase = phase

    # ------------------------------------------------------------------ startup
    def _client_data(self, event: ev.ClientData) -> list[object]:
        self.last_client_at = event.now
        if self.phase is Phase.RELAYING:
            if self.local_abort is not None:
                return self._answer_locally(event.data)
            if self.pending.front is Owner.INTERNAL:
                return self._hold(event.data)
            if self._needs_check(event.now):
                return self._check_then_hold(event.data)
            return self._relay_client(event.data)
        if self.phase is Phase.STARTUP:
            return self._startup_data(event.data)
        if self.phase is Phase.AUTHENTICATING:
            return self._password_data(event.data)
        if self.phase in (Phase.RECONNECTING, Phase.REPLAYING):
            if self.local_abort is not None:
                return self._answer_locally(event.data)
            return self._hold(event.data) + self._retry_now()
        if self.phase is Phase.DRAINING:
            return self._relay_client(event.data)
        return []

    # ------------------------------------------------------------------ login (first and again)
    def _server_connected(self, event: ev.ServerConnected) -> list[object]:
        self.facts = dict(event.facts)
        self.connected_wall, self.connected_at = event.wall, event.now
        self.last_server_at = event.now
        binding = event.channel_binding
        if binding is None and event.cert_der is not None:
            binding = channel_binding_for(event.cert_der)
        self.login = UpstreamLogin(self.params, self.password, channel_binding=binding)
        self.login_waiting = False
        self.drops.connected(event)
        return [cmd.SendToServer(self.login.start())]

    def _login_data(self, data: bytes, now: float) -> list[object]:
        assert self.login is not None
        step = self.login.feed(data)
        out: list[object] = [cmd.SendToServer(step.send)] if step.send else []
        if step.needs_password:
            if self.phase is not Phase.AUTHENTICATING:
                return self._give_up("the server asked for a password that the client never gave")
            self.login_waiting = True
            self.client_scan = FrameScanner(b"p", 100_000, client=True)
            out.append(cmd.SendToClient(be.AuthenticationCleartextPassword().encode()))
            # listen.startup_timeout covers the client's part of authentication too.
            out.append(cmd.SetTimer("startup", self.policy.startup_timeout_s))
        elif step.error is not None:
            out += self._login_error(step.error, step.error_bytes, now)
        elif step.done is not None:
            out += self._logged_in(step.done, now)
        return out

    def _login_error(self, error: be.ErrorResponse, raw: bytes, now: float) -> list[object]:
        if self.policy.allow_tls_retry and not self.tried_tls and error.code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION:
            # libpq's sslmode=allow: plaintext first; if the server refuses it, try again with TLS.
            self.tried_tls = True
            self.login = None
            return [cmd.CloseServer(), cmd.OpenServer(use_tls=True, reconnect=self.phase is Phase.RECONNECTING)]
        if self.phase is Phase.AUTHENTICATING:
            # Issue: the server's own startup and auth errors reach the client unchanged.
            self._goto(Phase.CLOSED)
            return [cmd.SendToClient(raw), cmd.CloseServer(), cmd.CloseClient(),
                    cmd.Log("info", f"upstream refused login for {show(self.params.get('user', ''))}: {error.code} {error.message}")]
        self.drops.reconnect_error(f"{error.code} {error.message}", error.code)
        if error.code in _GIVE_UP_STATES:
            self._goto(Phase.CLOSED)
            return [cmd.CloseServer()] + self._finish_drop(impact=f"fatal {error.code}", succeeded=False) + [
                cmd.SendToClient(raw), cmd.CloseClient()]
        return [cmd.CloseServer()] + self._schedule_retry(now)

    def _logged_in(self, result, now: float) -> list[object]:
        self.backend_key = (result.backend_pid, result.backend_secret)
        if self.phase is Phase.AUTHENTICATING:
            self.first_backend_pid = result.backend_pid
            self.client_params = dict(result.params)
            self._goto(Phase.RELAYING)
            self.server_scan = FrameScanner(_SERVER_WANTED, self.policy.max_message_bytes, client=False)
            self.client_scan = self._client_scanner()
            hello = bytearray(be.AuthenticationOk().encode())
            for name, value in result.params.items():
                hello += be.ParameterStatus(name, value).encode()
            hello += be.BackendKeyData(result.backend_pid, self.secret).encode()
            for notice in result.notices:
                hello += notice
            hello += ready_bytes(b"I")
            # The server facts a later drop is judged against (postmaster start time, recovery,
            # read-only) are read now, while the client reads its hello; its first request waits
            # for them (held), so a drop right after connect still has them.
            self.internal.begin(new_params=None)
            self.internal.expect(("first_facts",))
            self.pending.expect(Owner.INTERNAL)
            out: list[object] = [cmd.SendToClient(bytes(hello)), cmd.SendToServer(fe.Query(FACTS_SQL.decode()).encode())]
            if result.leftover:
                out += self._internal_data(result.leftover, now)
            return out
        return self._start_replay(result, now)

    def _start_replay(self, result, now: float) -> list[object]:
        self._goto(Phase.REPLAYING)
        self.server_scan = FrameScanner(_SERVER_WANTED, self.policy.max_message_bytes, client=False)
        plan = plan_replay(self.book.state, self.book.parses)
        if isinstance(plan, str):
            return self._give_up(plan)
        self.internal.begin(new_params=dict(result.params))
        self.internal.expect(plan.purposes)
        self.internal.expect(("facts",))
        self.pending.expect(Owner.INTERNAL, len(plan.purposes) + 1)
        self.drops.replayed(plan.summary)
        return [cmd.SendToServer(plan.data + fe.Query(FACTS_SQL.decode()).encode())]

    # ------------------------------------------------------------------ relaying: client -> server
    def _relay_client(self, data: bytes) -> list[object]:
        scan = self.client_scan
        if not self.pending and scan.at_boundary and scan.messages == scan.last_mark:
            # A request boundary: what is sent from here on is the next request.
            self.inflight = []
            self.inflight_bytes = 0
            self.inflight_commit = False
            self.messages_at_request = self.server_scan.messages
        frames = scan.feed(data)
        if not scan.at_boundary:
            self._keep_partial(data)
        for t, payload in frames:
            if t == _SYNC or t == _FCALL:
                self.pending.expect(Owner.CLIENT)
            elif t == _Q:
                self.pending.expect(Owner.CLIENT)
                self._note_sql(payload)
            elif t == _P:
                self._note_parse(t, payload)
            elif t == _CLOSE:
                if payload[:1] == b"S" and payload[1:2] != b"\x00":
                    self.book.dirty = True
            elif t == _TERMINATE:
                self.client_terminated = True
        if self.inflight is not None:
            self.inflight.append(data)
            self.inflight_bytes += len(data)
            if self.inflight_bytes > self.policy.max_inflight_copy_bytes:
                self.inflight = None
        return [cmd.SendToServer(data)]

    def _keep_partial(self, data: bytes) -> None:
        """Keep the start of the client message this read ended inside (up to
        reconnect.max_buffered): if the upstream drops now, it can be sent again whole."""
        seen = self.client_scan.partial_seen
        limit = self.policy.max_buffered_bytes
        if seen <= len(data):  # it began in this read
            self.client_prefix = bytearray(data[len(data) - seen :]) if seen <= limit else None
        elif self.client_prefix is not None:
            if seen <= limit:
                self.client_prefix += data
            else:
                self.client_prefix = None

    def _note_sql(self, payload: bytes) -> None:
        if isinstance(payload, Prefix):
            # Only the start of a long statement was read: it counts as possibly changing session
            # state (a snapshot at the next idle point) and as possibly committing.
            self.book.dirty = True
            self.inflight_commit = True
            return
        if self.book.note_request(payload):
            self.inflight_commit = True

    def _note_parse(self, t: int, payload: bytes) -> None:
        name_end = payload.find(b"\x00")
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
            self.book.parses[payload[:name_end].decode("utf-8", "surrogateescape")] = payload
            self.book.dirty = True

    def _needs_check(self, now: float) -> bool:
        """upstream.check_after_idle: after a long idle, prove the path with one round trip first."""
        limit = self.policy.check_after_idle_s
        return (bool(limit) and not self.pending and now - self.last_server_at > limit
                and self._client_at_request_boundary())

    def _check_then_hold(self, data: bytes) -> list[object]:
        # An empty Sync earns one ReadyForQuery and runs nothing (55.2.3); if the path is dead the
        # drop is seen while the client's request is still held, so it is hidden like an idle one.
        self.internal.expect(("ping",))
        self.pending.expect(Owner.INTERNAL)
        return [cmd.SendToServer(fe.Sync().encode())] + self._hold(data)

    def _hold(self, data: bytes) -> list[object]:
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes > self.policy.max_buffered_bytes and not self.paused:
            self.paused = True
            return [cmd.PauseClient()]
        return []

    def _release_held(self) -> list[object]:
        held, self.held, self.held_bytes = self.held, [], 0
        out: list[object] = []
        if self.paused:
            self.paused = False
            out.append(cmd.ResumeClient())
        for chunk in held:
            if self.pending.front is Owner.INTERNAL or self.phase is not Phase.RELAYING:
                out += self._hold(chunk)
            elif self.local_abort is not None:
                out += self._answer_locally(chunk)
            else:
                out += self._relay_client(chunk)
        return out

    # ------------------------------------------------------------------ relaying: server -> client
    def _server_data(self, event: ev.ServerData) -> list[object]:
        before = self.last_server_at
        self.last_server_at = event.now
        out = self._server_data_phase(event)
        if self.last_fatal is not None or self.last_notice is not None:
            # The server's last words are not activity: idle_s counts up to them.
            self.last_server_at = before
        return out

    def _server_data_phase(self, event: ev.ServerData) -> list[object]:
        if self.pending.front is Owner.INTERNAL:
            return self._internal_data(event.data, event.now)
        if self.phase is Phase.RELAYING or self.phase is Phase.DRAINING:
            return self._server_data_relaying(event.data, event.now)
        if self.login is not None and self.phase in (Phase.AUTHENTICATING, Phase.RECONNECTING):
            return self._login_data(event.data, event.now)
        raise ProtocolError(f"unexpected data from the server in phase {self.phase.value}")

    def _server_data_relaying(self, data: bytes, now: float) -> list[object]:
        idle_point = False
        scan = self.server_scan
        frames = scan.feed(data)
        if self.server_tail:
            data = self.server_tail + data
            self.server_tail = b""
        for t, payload in frames:
            if t == _Z:
                if len(payload) != 1:  # 55.7 ReadyForQuery: exactly one status byte
                    raise ServerProtocolError(f"invalid ReadyForQuery message of {len(payload)} bytes")
                self.pending.ready(payload[0])
                idle_point = not self.pending
            elif t == _CC:
                if tag_is_dirty(payload):
                    self.book.dirty = True
            elif t == _E or t == _N:
                if self._note_server_error(t, payload):
                    # The server's last words are for pgsidecar, not the client: the session
                    # rules decide what the client is told (nothing, 08006, 08007 or a FATAL).
                    raw = typed_message(bytes([t]), payload)
                    if t == _E:
                        self.last_fatal_raw = raw
                    data = data.replace(raw, b"", 1)
            elif t == _PS and not isinstance(payload, Prefix):
                msg = be.ParameterStatus.decode(payload)
                self.client_params[msg.name] = msg.value
        if not scan.at_boundary:
            self._hold_server_tail_of(data)
            data = data[: len(data) - len(self.server_tail)]
        out: list[object] = [cmd.SendToClient(data)] if data else []
        if idle_point and self.pending.status is TxStatus.IDLE and scan.at_boundary and self._client_at_request_boundary():
            if self.draining:
                return out + self._drain_close()
            out += self._at_idle_point()
        return out

    def _hold_server_tail_of(self, data: bytes) -> None:
        """The read ended inside a server message: hold its start back while it may be one we
        withhold (E, N) or a bare header, up to PREFIX_BYTES; anything else streams on."""
        scan = self.server_scan
        seen, size = scan.partial_seen, scan.partial_size
        if seen <= len(data) and (size is None or (scan.partial_type in _HOLD_TYPES and size <= PREFIX_BYTES)):
            self.server_tail = data[len(data) - seen :]

    def _client_holds_part_of_server_message(self) -> bool:
        scan = self.server_scan
        return not scan.at_boundary and len(self.server_tail) < scan.partial_seen

    def _note_server_error(self, t: int, payload: bytes) -> bool:
        """Remember a FATAL, or a 57P* WARNING (PG 14+ warns, then closes); True to withhold it.
        Only a message read whole can be withheld; of a longer one only its start is read."""
        if isinstance(payload, Prefix):
            fields = be.error_fields_prefix(payload)
            if t == _E and fields.get("S") in ("FATAL", "PANIC"):
                self.last_fatal = be.ErrorResponse(tuple(fields.items()))
            return False
        if t == _E:
            err = be.ErrorResponse.decode(payload)
            if err.severity in ("FATAL", "PANIC"):
                self.last_fatal = err
                return True
            return False
        notice = be.NoticeResponse.decode(payload)
        if notice.code and notice.code.startswith("57P"):
            self.last_notice = notice
            return True
        return False

    def _at_idle_point(self) -> list[object]:
        """Nothing owed, no transaction, the client between requests: read the exact session
        state if it may have changed (never inside a client message or an open group)."""
        self.inflight = []
        self.inflight_bytes = 0
        if not self.book.dirty or self.client_terminated:
            return []
        self.book.dirty = False
        self.internal.begin(new_params=None)
        self.internal.expect(("snapshot",))
        self.pending.expect(Owner.INTERNAL)
        return [cmd.SendToServer(fe.Query(snapshot_sql(self.book.custom_names).decode()).encode())]

    # ------------------------------------------------------------------ internal replies
    def _internal_data(self, data: bytes, now: float) -> list[object]:
        out: list[object] = []
        for outcome in self.internal.feed(data):
            self.pending.ready(outcome.status)
            out += self._internal_outcome(outcome, now)
            if self.phase is Phase.CLOSED:
                return out
        if self.internal.forward:
            out.insert(0, cmd.SendToClient(self.internal.take_forward()))
        if self.pending.front is not Owner.INTERNAL:
            rest = self.internal.take_rest()
            if self.phase is Phase.REPLAYING:
                out += self._replay_done(now)
            if rest:
                out += self._server_data_relaying(rest, now)
            if self.phase is Phase.RELAYING and self.pending.front is not Owner.INTERNAL:
                out += self._release_held()
            if self.draining and self.phase is Phase.RELAYING and self.pending.idle:
                out += self._drain_close()  # our own query was the last thing owed
        return out

    def _internal_outcome(self, outcome, now: float) -> list[object]:
        purpose = outcome.purpose
        if purpose == "snapshot":
            state = self.internal.snapshot_state(outcome, self.params.get("user", ""))
            self.book.state = state
            if state.unknown is None:
                # Keep the Parse bytes of statements that still exist, so a session that
                # prepares and closes many statements does not grow without bound.
                parses = self.book.parses
                self.book.parses = {n: parses[n] for n in state.protocol_statements if n in parses}
            return []
        if purpose in ("facts", "first_facts"):
            facts = self.internal.facts(outcome)
            if purpose == "first_facts":
                self.server_facts = facts
            else:
                self.drops.new_facts(self.server_facts, facts)
                self.server_facts = facts
            return []
        if outcome.error is not None:
            return self._give_up(f"replaying the session failed: {outcome.error.code} {outcome.error.message}")
        return []

    def _replay_done(self, now: float) -> list[object]:
        self._goto(Phase.RELAYING)
        out: list[object] = []
        changed = bytearray()
        for name, value in self.internal.new_params.items():
            if self.client_params.get(name) != value:
                changed += be.ParameterStatus(name, value).encode()
                self.client_params[name] = value
        if changed:
            out.append(cmd.SendToClient(bytes(changed)))
        if self.book.state.listen:
            out.append(cmd.SendToClient(be.NoticeResponse.make(
                "NOTICE", "01000",
                "pgsidecar reconnected to the server; notifications sent while it was disconnected may have been missed",
            ).encode()))
        out += self._finish_drop(impact=self.drops.impact or "transparent", succeeded=True)
        resend = self.drops.resend
        self.drops.resend = None
        if resend:
            self.pending.expect(Owner.CLIENT, resend[1])
            self.inflight, self.inflight_bytes = [resend[0]], len(resend[0])
            # The client scanner keeps its state: the resent bytes are exactly what it has read.
            out.append(cmd.SendToServer(resend[0]))
        return out

    # ------------------------------------------------------------------ drops
    def _server_closed(self, event: ev.ServerClosed) -> list[object]:
        if self.phase is Phase.CLOSED:
            return []
        if self.client_terminated:
            self._goto(Phase.CLOSED)
            return [cmd.CloseClient()]
        if self.phase in (Phase.RECONNECTING, Phase.AUTHENTICATING, Phase.REPLAYING):
            return self._connect_failed(event, self._closed_text(event))
        if self.phase is Phase.STARTUP:
            return []
        return self._upstream_lost(event)

    def _closed_text(self, event) -> str:
        return f"{event.kind}" + (f" ({event.errno_name})" if getattr(event, "errno_name", None) else "")

    def _upstream_broken(self, event: object, text: str) -> list[object]:
        now = getattr(event, "now", self.last_server_at)
        closed = ev.ServerClosed(now=now, wall=getattr(event, "wall", 0.0), kind="other", detail=text)
        out: list[object] = [cmd.Log("warning", f"server protocol error: {text}"), cmd.CloseServer()]
        if self.phase in (Phase.RELAYING, Phase.REPLAYING):
            return out + self._upstream_lost(closed)
        return out + self._give_up(f"server protocol error: {text}")

    def _upstream_lost(self, event: ev.ServerClosed) -> list[object]:
        """The upstream ended without the client asking: hide it, or say so honestly."""
        decision = decide_drop(self._drop_snapshot())
        self.drops.lost(self, event, decision)
        out: list[object] = [cmd.CloseServer()]
        if decision.close_silently:
            self._goto(Phase.CLOSED)
            return out + self._finish_drop(impact=decision.impact, succeeded=None) + [
                cmd.CloseClient(), cmd.Log("warning", f"session {self.peer} closed: {decision.impact}")]
        if decision.fatal is not None:
            self._goto(Phase.CLOSED)
            impact = decision.impact if decision.client_protocol_violation else (
                f"fatal {decision.fatal_code} client closed")
            out += self._finish_drop(impact=impact, succeeded=None) + [cmd.SendToClient(decision.fatal), cmd.CloseClient()]
            if decision.client_protocol_violation:
                out.append(cmd.Log("info", f"session {self.peer} closed: the server ended it over a client protocol violation"))
            return out
        if decision.to_client:
            out.append(cmd.SendToClient(decision.to_client))
        self.local_abort = decision.responder
        if decision.resend is None:
            # Nothing of a cut client message reaches the new server unless it is sent whole:
            # the scanner starts again at the message's first byte (rewound) or past it (discarded).
            self.client_scan.rewind()
        self.client_prefix = None
        self.server_tail = b""
        self.pending.clear()
        self.pending.status = TxStatus.IDLE
        self.internal.reset()
        self._goto(Phase.RECONNECTING)
        self.login = None
        if decision.rewind is not None:
            if self.local_abort is not None:
                out += self._answer_locally(decision.rewind)
            else:
                self.held.insert(0, decision.rewind)
                self.held_bytes += len(decision.rewind)
        return out + [cmd.SetTimer("deadline", self.policy.reconnect_deadline_s), cmd.OpenServer(reconnect=True)]

    def _drop_snapshot(self) -> DropSnapshot:
        """What the session rules look at, taken now (the drop is being decided)."""
        lost = self.book.state.non_replayable()
        if self.internal.active_purpose == "snapshot":
            lost.append("session state changed just before the drop and could not be read")
        scan = self.client_scan
        mid = not scan.at_boundary
        return DropSnapshot(
            owed=self.pending.client_owed,
            status=self.pending.status,
            lost=tuple(lost),
            on_transaction_loss=self.policy.on_transaction_loss,
            inflight_commit=self.inflight_commit,
            proven_unexecuted=self._proven_unexecuted(),
            inflight=b"".join(self.inflight) if self.inflight is not None else None,
            reason=self._server_reason(),
            client_mid=mid,
            partial_type=scan.partial_type if mid else None,
            partial_remaining=scan.partial_remaining if mid else None,
            partial_kept=bytes(self.client_prefix) if mid and self.client_prefix is not None else None,
            group_sent=scan.messages > scan.last_mark,
            server_split=self._client_holds_part_of_server_message(),
        )

    def _server_reason(self) -> ServerReason | None:
        """What the server said before it closed: its FATAL, or a 57P* WARNING (PG 14+)."""
        if self.last_fatal is not None and self.last_fatal.code:
            f = self.last_fatal
            return ServerReason(f.code, f.message or "", f.severity or "FATAL", self.last_fatal_raw)
        if self.last_notice is not None and self.last_notice.code:
            n = self.last_notice
            return ServerReason(n.code, n.message or "", n.severity or "WARNING")
        return None

    def _proven_unexecuted(self) -> bool:
        """57P05 read before any reply to the request: the server never read it (postgres.c)."""
        fatal = self.last_fatal
        if fatal is None or fatal.code != sqlstate.IDLE_SESSION_TIMEOUT or self.inflight is None:
            return False
        return self.server_scan.messages - self.messages_at_request <= 1

    def _connect_failed(self, event, text: str) -> list[object]:
        self.login = None
        if self.phase is Phase.REPLAYING:
            self.pending.clear()
            self.internal.reset()
            self._goto(Phase.RECONNECTING)
        if self.phase is Phase.AUTHENTICATING and not self.drops.active:
            self.drops.first_connect_error(text, event.now)
        else:
            self.drops.reconnect_error(text, None)
        return [cmd.CloseServer()] + self._schedule_retry(event.now)

    def _schedule_retry(self, now: float) -> list[object]:
        started = self.drops.started_at(now)
        if now - started >= self.policy.reconnect_deadline_s:
            return self._give_up(f"could not reconnect within {self.policy.reconnect_deadline_s:g} s: {self.drops.last_error}")
        attempt = self.drops.attempts
        cap = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * (2 ** max(0, attempt - 1)))
        delay = self.rng.uniform(0, cap)  # full jitter: many sessions do not stampede
        self.backoff_pending = True
        return [cmd.SetTimer("backoff", delay)]

    def _retry_now(self) -> list[object]:
        """A client request arrived while waiting out a backoff: try at once (one per request),
        so the wait after the server is back is not the rest of a jittered sleep."""
        if not self.backoff_pending or self.phase is not Phase.RECONNECTING:
            return []
        self.backoff_pending = False
        self.drops.attempt()
        return [cmd.CancelTimer("backoff"), cmd.OpenServer(reconnect=True)]

    def _timer(self, event: ev.Timer) -> list[object]:
        if event.name == "startup" and self.phase in (Phase.STARTUP, Phase.AUTHENTICATING):
            self._goto(Phase.CLOSED)
            return [cmd.Log("info", f"client {self.peer} did not finish startup in time"),
                    cmd.CloseClient(), cmd.CloseServer()]
        if event.name == "backoff" and self.phase in (Phase.RECONNECTING, Phase.AUTHENTICATING):
            self.backoff_pending = False
            self.drops.attempt()
            return [cmd.OpenServer(reconnect=self.phase is Phase.RECONNECTING)]
        if event.name == "deadline" and self.phase in (Phase.RECONNECTING, Phase.REPLAYING):
            return self._give_up(f"could not reconnect within {self.policy.reconnect_deadline_s:g} s: {self.drops.last_error}")
        return []

    def _give_up(self, reason: str) -> list[object]:
        was = self.phase
        self._goto(Phase.CLOSED)
        out: list[object] = [cmd.CloseServer()]
        if self.drops.active:
            out += self._finish_drop(impact=f"fatal {sqlstate.CONNECTION_FAILURE} client closed", succeeded=False)
        code = sqlstate.CONNECTION_FAILURE if was is not Phase.AUTHENTICATING else sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        # Requests held for the lost upstream get an ordinary error first: many drivers (libpq
        # via psycopg2) show the text of an ERROR but not of a FATAL that closes the socket.
        answers = self._held_sync_points() * (error_bytes("ERROR", code, f"pgsidecar: {reason}") + ready_bytes(b"I"))
        return out + [cmd.SendToClient(answers + error_bytes("FATAL", code, f"pgsidecar: {reason}")),
                      cmd.CloseClient(), cmd.Log("warning", f"session {self.peer} closed: {reason}")]

    def _held_sync_points(self) -> int:
        scan = FrameScanner(b"QSF", self.policy.max_message_bytes, client=True)
        try:
            return sum(1 for chunk in self.held for t, _ in scan.feed(chunk))
        except ProtocolError:
            return 0

    def _finish_drop(self, *, impact: str, succeeded: bool | None, abandoned: bool = False) -> list[object]:
        record = self.drops.finish(self, impact=impact, succeeded=succeeded, now=self.now or None, abandoned=abandoned)
        return [cmd.RecordDrop(record), cmd.CancelTimer("deadline")] if record is not None else []

    def _client_closed(self, event: ev.ClientClosed) -> list[object]:
        if self.phase is Phase.CLOSED:
            return []
        out: list[object] = []
        if self.drops.active:
            out += self._finish_drop(impact="client left during reconnect", succeeded=False, abandoned=True)
        self.phase = Phase.CLOSED
        return out + [cmd.CloseServer(abort=len(self.pending) > 0)]

    def _answer_locally(self, data: bytes) -> list[object]:
        assert self.local_abort is not None
        reply, rest, done = self.local_abort.feed(data)
        out: list[object] = [cmd.SendToClient(reply)] if reply else []
        if done:
            self.local_abort = None
            if rest:
                out += self._client_data(ev.ClientData(now=self.last_client_at, data=rest))
        return out

    def _fatal_to_client(self, code: str, message: str, *, log: str | None = None) -> list[object]:
        self.phase = Phase.CLOSED
        out: list[object] = [cmd.SendToClient(error_bytes("FATAL", code, message)), cmd.CloseClient(), cmd.CloseServer()]
        if log:
            out.append(cmd.Log("info", f"{self.peer}: {log}"))
        return out

    # ------------------------------------------------------------------ draining
    def drain(self) -> list[object]:
        """Shutdown: idle sessions get 57P01 now; others when their transaction ends."""
        if self.phase in (Phase.CLOSED, Phase.STARTUP):
            self.phase = Phase.CLOSED
            return [cmd.CloseClient(), cmd.CloseServer()]
        if (self.pending.idle and self.phase is Phase.RELAYING) or self.phase is Phase.AUTHENTICATING:
            return self._drain_close()
        self.draining = True
        return []

    def _drain_close(self) -> list[object]:
        """What PostgreSQL sends on a shutdown (57P01 admin_shutdown), then close both sides."""
        self.phase = Phase.CLOSED
        return [cmd.SendToClient(error_bytes("FATAL", sqlstate.ADMIN_SHUTDOWN,
                                             "terminating connection due to administrator command")),
                cmd.CloseClient(), cmd.CloseServer()]
