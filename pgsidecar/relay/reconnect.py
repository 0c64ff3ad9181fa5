"""After the upstream is lost: the drop decision, backoff, deadline, replay, resend, local answers.

``upstream_lost`` takes a ``DropSnapshot`` of the session, applies the session rules
(relay/recovery.py ``decide_drop``, docs/session-rules.md) and carries the decision out; the rest
reconnects with jittered backoff until ``reconnect.deadline``, replays the session on the new
connection and closes the drop's book with one record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.commands import LogLevel, TimerName
from pgsidecar.relay.context import SessionContext
from pgsidecar.relay.phases import Phase
from pgsidecar.relay.recovery import DropSnapshot, GroupAbort, ServerReason, decide_drop, error_bytes, ready_bytes
from pgsidecar.session.pending import Owner, TxStatus
from pgsidecar.session.replay import plan_replay
from pgsidecar.session.state import FACTS_SQL
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.ending import SocketEnd
from pgsidecar.wire.errors import ProtocolError
from pgsidecar.wire.frames import FrameScanner

if TYPE_CHECKING:
    from pgsidecar.relay.login import Login, LoginResult
    from pgsidecar.relay.parking import Parking
    from pgsidecar.relay.relaying import Relaying


class Reconnect:
    """Owns the backoff; the drop's book is the context's (DropTracker)."""

    def __init__(self, ctx: SessionContext, relay: Relaying) -> None:
        self.ctx = ctx
        self.relay = relay
        self.login: Login  # wired by the facade
        self.parking: Parking  # wired by the facade: an unpark is a reconnect without a drop
        self.backoff_pending = False
        self.deadline_armed = False  # a waiting request's reconnect.deadline is running

    # ------------------------------------------------------------------ the upstream ends
    def server_closed(self, event: ev.ServerClosed) -> list[cmd.Command]:
        ctx = self.ctx
        if ctx.client_terminated:
            ctx.goto(Phase.CLOSED)  # the client said Terminate: the server's close is the answer
            return [cmd.CloseClient()]
        if ctx.phase in (Phase.RECONNECTING, Phase.AUTHENTICATING, Phase.REPLAYING):
            return self.connect_failed(
                event.now, str(event.kind) + (f" ({event.errno_name})" if event.errno_name else "")
            )
        if ctx.phase is Phase.DRAINING:
            return self.relay.drain_close()  # shutting down: no reconnect
        return self.upstream_lost(event)

    def upstream_broken(self, event: ev.Event, text: str) -> list[cmd.Command]:
        """The server sent bytes that break the protocol: treat it as a drop (or give up)."""
        ctx = self.ctx
        closed = ev.ServerClosed(now=ctx.now, wall=getattr(event, "wall", 0.0), kind=SocketEnd.OTHER, detail=text)
        out: list[cmd.Command] = [cmd.Log(LogLevel.WARNING, f"server protocol error: {text}"), cmd.CloseServer()]
        if ctx.phase in (Phase.RELAYING, Phase.REPLAYING):
            return out + self.upstream_lost(closed)
        return out + self.give_up(f"server protocol error: {text}")

    def upstream_lost(self, event: ev.ServerClosed) -> list[cmd.Command]:
        """The upstream ended without the client asking: hide it, or say so honestly."""
        ctx = self.ctx
        decision = decide_drop(self._snapshot())
        ctx.drops.lost(ctx, event, decision)
        out: list[cmd.Command] = [cmd.CloseServer()]
        if decision.close_silently:
            ctx.goto(Phase.CLOSED)
            return (
                out
                + self.finish_drop(impact=decision.impact, succeeded=None)
                + [cmd.CloseClient(), cmd.Log(LogLevel.WARNING, f"session {ctx.peer} closed: {decision.impact}")]
            )
        if decision.fatal is not None:
            ctx.goto(Phase.CLOSED)
            impact = (
                decision.impact
                if decision.client_protocol_violation
                else (f"fatal {decision.fatal_code} client closed")
            )
            out += [
                *self.finish_drop(impact=impact, succeeded=None),
                cmd.SendToClient.mine(decision.fatal),
                cmd.CloseClient(),
            ]
            if decision.client_protocol_violation:
                out.append(
                    cmd.Log(
                        LogLevel.INFO,
                        f"session {ctx.peer} closed: the server ended it over a client protocol violation",
                    )
                )
            return out
        if decision.to_client:
            out.append(cmd.SendToClient.mine(decision.to_client))
        if decision.responder is not None:
            ctx.responder = decision.responder
        # Otherwise a responder still answering the client for an earlier drop keeps doing so:
        # it may be discarding the rest of a message that drop cut, and nothing of it was relayed
        # since (found by the fuzzer: a second drop used to hand that rest to the next server).
        self.relay.after_drop(resend=decision.resend is not None)
        ctx.pending.clear()
        ctx.pending.status = TxStatus.IDLE
        ctx.internal.reset()
        self.login.reset()
        ctx.goto(Phase.RECONNECTING)
        ctx.walk.restart()  # the same host list again, from its first host
        if decision.rewind is not None:
            if ctx.responder is not None:
                out += self.answer_locally(decision.rewind)
            else:
                ctx.held.insert(0, decision.rewind)
                ctx.held_bytes += len(decision.rewind)
        # An idle session waits as long as its client stays; a request waits reconnect.deadline.
        out += self._arm_deadline()
        return [*out, self.ctx.open_server(reconnect=True)]

    def leave_server(self, why: str) -> list[cmd.Command]:
        """At an idle point: the server no longer has the role the session needs (a 25006, or it
        went into recovery). Close it, as a drop the client never sees, and find the right one."""
        ctx = self.ctx
        wall = ctx.connected_wall + (ctx.now - ctx.connected_at)  # ServerData carries no wall clock
        event = ev.ServerClosed(now=ctx.now, wall=wall, kind=SocketEnd.ROLE_LOST, detail=why)
        ctx.role_lost = None
        log = cmd.Log(LogLevel.WARNING, f"session {ctx.peer}: {why}; reconnecting to find a writer")
        return [log, *self.upstream_lost(event)]

    def _arm_deadline(self) -> list[cmd.Command]:
        """Start reconnect.deadline for the requests waiting now, once (counted from the first)."""
        if self.deadline_armed or not self.ctx.held:
            return []
        self.deadline_armed = True
        return [cmd.SetTimer(TimerName.DEADLINE, self.ctx.policy.reconnect_deadline_s)]

    def _snapshot(self) -> DropSnapshot:
        """What the session rules look at, taken now."""
        ctx = self.ctx
        lost = ctx.book.state.non_replayable()
        if ctx.internal.active_purpose == "snapshot":
            lost.append("session state changed just before the drop and could not be read")
        stream = self.relay.stream()
        return DropSnapshot(
            owed=ctx.pending.client_owed,
            status=ctx.pending.status,
            lost=tuple(lost),
            on_transaction_loss=ctx.policy.on_transaction_loss,
            inflight_commit=ctx.inflight_commit,
            proven_unexecuted=self._proven_unexecuted(stream.server_messages),
            inflight=b"".join(ctx.inflight) if ctx.inflight is not None else None,
            reason=self._server_reason(),
            stream=stream,
        )

    def _server_reason(self) -> ServerReason | None:
        """What the server said before it closed: its FATAL, or a 57P* WARNING (PG 14+)."""
        ctx = self.ctx
        if ctx.last_fatal is not None and ctx.last_fatal.code:
            f = ctx.last_fatal
            return ServerReason(f.code, f.message or "", f.severity or "FATAL", ctx.last_fatal_raw)
        if ctx.last_notice is not None and ctx.last_notice.code:
            n = ctx.last_notice
            return ServerReason(n.code, n.message or "", n.severity or "WARNING")
        return None

    def _proven_unexecuted(self, server_messages: int) -> bool:
        """57P05 read before any reply to the request: the server never read it (postgres.c)."""
        ctx = self.ctx
        fatal = ctx.last_fatal
        if fatal is None or fatal.code != sqlstate.IDLE_SESSION_TIMEOUT or ctx.inflight is None:
            return False
        return server_messages - ctx.messages_at_request <= 1

    # ------------------------------------------------------------------ connecting again
    def server_connect_failed(self, event: ev.ServerConnectFailed) -> list[cmd.Command]:
        """One host failed (every address it has): the next host now, as libpq does; when the
        whole list failed, back off and start again."""
        skipped = event.kind == "skipped"
        text = self.ctx.walk.last_mismatch if skipped else f"{event.kind}: {event.message}"
        return self.host_failed(event.now, text, None, noted=skipped)

    def host_failed(self, now: float, text: str, code: str | None, *, noted: bool = False) -> list[cmd.Command]:
        """This host is no use now: the next one at once, or after a backoff a new pass."""
        ctx = self.ctx
        if not noted:
            self.note_error(now, text, code)
        if ctx.walk.next_host():
            self.login.reset()
            ctx.drops.attempt()
            return [cmd.CloseServer(), ctx.open_server(reconnect=ctx.phase is not Phase.AUTHENTICATING)]
        ctx.walk.restart()
        return self.connect_failed(now, text, noted=True)

    def note_error(self, now: float, text: str, code: str | None = None) -> None:
        """A failed connect or login, in the drop's book (or the first login's retries)."""
        ctx = self.ctx
        if ctx.phase is Phase.AUTHENTICATING and not ctx.drops.active:
            ctx.drops.first_connect_error(text, now)
        else:
            ctx.drops.reconnect_error(text, code)

    def connect_failed(self, now: float, text: str, *, noted: bool = False) -> list[cmd.Command]:
        ctx = self.ctx
        self.login.reset()
        if ctx.phase is Phase.REPLAYING:
            ctx.pending.clear()
            ctx.internal.reset()
            ctx.goto(Phase.RECONNECTING)
        if not noted:
            self.note_error(now, text)
        return [cmd.CloseServer(), *self.schedule_retry(now)]

    def schedule_retry(self, now: float) -> list[cmd.Command]:
        ctx = self.ctx
        started = ctx.drops.started_at(now)
        if ctx.phase is Phase.AUTHENTICATING and now - started >= ctx.policy.reconnect_deadline_s:
            # A first login has no session to keep: its client gets libpq's answer. An
            # established session never gives up while its client stays (requests time out).
            return self.give_up(
                f"could not reconnect within {ctx.policy.reconnect_deadline_s:g} s: {ctx.drops.last_error}"
            )
        attempt = ctx.drops.attempts
        cap = min(ctx.policy.backoff_max_s, ctx.policy.backoff_initial_s * (2 ** max(0, attempt - 1)))
        delay = ctx.rng.uniform(0, cap)  # full jitter: many sessions do not stampede
        self.backoff_pending = True
        return [cmd.SetTimer(TimerName.BACKOFF, delay)]

    def client_waiting(self, data: bytes) -> list[cmd.Command]:
        """Client bytes while the upstream is away: answered locally, or held for it."""
        if self.ctx.responder is not None:
            return self.answer_locally(data)
        out = self.ctx.hold(data)
        return out + self._arm_deadline() + self._retry_now()

    def _retry_now(self) -> list[cmd.Command]:
        """A client request arrived while waiting out a backoff: try at once (one per request),
        so the wait after the server is back is not the rest of a jittered sleep."""
        if not self.backoff_pending or self.ctx.phase is not Phase.RECONNECTING:
            return []
        self.backoff_pending = False
        self.ctx.drops.attempt()
        return [cmd.CancelTimer(TimerName.BACKOFF), self.ctx.open_server(reconnect=True)]

    def timer(self, event: ev.Timer) -> list[cmd.Command]:
        ctx = self.ctx
        if event.name == TimerName.BACKOFF and ctx.phase in (Phase.RECONNECTING, Phase.AUTHENTICATING):
            self.backoff_pending = False
            ctx.drops.attempt()
            return [ctx.open_server(reconnect=ctx.phase is Phase.RECONNECTING)]
        if event.name == TimerName.DEADLINE:
            self.deadline_armed = False
            if ctx.phase is Phase.RECONNECTING:
                return self.requests_timed_out()
        return []  # a timer that fired after its phase ended (or during the replay, nearly done)

    def requests_timed_out(self) -> list[cmd.Command]:
        """The requests waiting for a server got none within reconnect.deadline: each gets an
        ERROR 08006 naming the last reconnect error, as the server answers a failed request; the
        client stays connected, and the reconnect goes on for its next request."""
        ctx = self.ctx
        reason = f"pgsidecar: could not reconnect within {ctx.policy.reconnect_deadline_s:g} s: {ctx.drops.last_error}"
        error = error_bytes("ERROR", sqlstate.CONNECTION_FAILURE, reason)
        held, ctx.held, ctx.held_bytes = b"".join(ctx.held), [], 0
        out: list[cmd.Command] = []
        if ctx.paused:
            ctx.paused = False
            out.append(cmd.ResumeClient())
        answered = 0
        while held:
            abort = GroupAbort(error, group_open=False)
            reply, held, done = abort.feed(held)
            if reply:
                answered += 1
                out.append(cmd.SendToClient.mine(reply))
            if not done:
                ctx.responder = abort  # the rest of this group is still to come: discard it
                break
        ctx.drops.impact = (
            f"error {sqlstate.CONNECTION_FAILURE} to waiting requests after {ctx.policy.reconnect_deadline_s:g} s"
        )
        out.append(cmd.Log(LogLevel.WARNING, f"session {ctx.peer}: {answered} waiting request(s) answered: {reason}"))
        return out

    # ------------------------------------------------------------------ replay
    def start_replay(self, result: LoginResult) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.goto(Phase.REPLAYING)
        self.relay.new_upstream()
        plan = plan_replay(ctx.book.state, ctx.book.parses)
        if isinstance(plan, str):
            return self.give_up(plan)
        ctx.internal.begin(new_params=dict(result.params))
        ctx.internal.expect(plan.purposes)
        ctx.internal.expect(("facts",))
        ctx.pending.expect(Owner.INTERNAL, len(plan.purposes) + 1)
        ctx.drops.replayed(plan.summary)
        return [cmd.SendToServer(plan.data + fe.Query(FACTS_SQL.decode()).encode())]

    def replay_done(self) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.goto(Phase.RELAYING)
        out = self.relay.parameters_changed()
        out += self.parking.replayed()  # an unpark has no drop book: finish_drop records nothing
        out += self.finish_drop(impact=ctx.drops.impact or "transparent", succeeded=True)
        resend = ctx.drops.resend
        ctx.drops.resend = None
        if resend:
            ctx.pending.expect(Owner.CLIENT, resend[1])
            ctx.inflight, ctx.inflight_bytes = [resend[0]], len(resend[0])
            out.append(cmd.SendToServer(resend[0]))
        return out

    # ------------------------------------------------------------------ endings
    def give_up(self, reason: str) -> list[cmd.Command]:
        ctx = self.ctx
        was = ctx.phase
        ctx.goto(Phase.CLOSED)
        out: list[cmd.Command] = [cmd.CloseServer()]
        if ctx.drops.active:
            out += self.finish_drop(impact=f"fatal {sqlstate.CONNECTION_FAILURE} client closed", succeeded=False)
        code = (
            sqlstate.CONNECTION_FAILURE
            if was is not Phase.AUTHENTICATING
            else sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
        )
        # Requests held for the lost upstream get an ordinary error first: many drivers (libpq
        # via psycopg2) show the text of an ERROR but not of a FATAL that closes the socket.
        answers = self._held_sync_points() * (error_bytes("ERROR", code, f"pgsidecar: {reason}") + ready_bytes(b"I"))
        return [
            *out,
            cmd.SendToClient.mine(answers + error_bytes("FATAL", code, f"pgsidecar: {reason}")),
            cmd.CloseClient(),
            cmd.Log(LogLevel.WARNING, f"session {ctx.peer} closed: {reason}"),
        ]

    def _held_sync_points(self) -> int:
        scan = FrameScanner(fe.SYNC_POINTS, self.ctx.policy.max_message_bytes, client=True)
        try:
            return sum(1 for chunk in self.ctx.held for _ in scan.feed(chunk))
        except ProtocolError:
            return 0

    def finish_drop(self, *, impact: str, succeeded: bool | None, abandoned: bool = False) -> list[cmd.Command]:
        ctx = self.ctx
        record = ctx.drops.finish(ctx, impact=impact, succeeded=succeeded, now=ctx.now or None, abandoned=abandoned)
        self.deadline_armed = False
        return [cmd.RecordDrop(record), cmd.CancelTimer(TimerName.DEADLINE)] if record is not None else []

    def client_closed(self, event: ev.ClientClosed) -> list[cmd.Command]:
        ctx = self.ctx
        out: list[cmd.Command] = []
        if ctx.drops.active:
            out += self.finish_drop(impact="client left during reconnect", succeeded=False, abandoned=True)
        ctx.goto(Phase.CLOSED)
        return [*out, cmd.CloseServer(abort=len(ctx.pending) > 0)]

    def answer_locally(self, data: bytes) -> list[cmd.Command]:
        """The client is inside a transaction (or request group) the drop cut off: answer it here
        until it ends that; what follows goes the usual way."""
        ctx = self.ctx
        assert ctx.responder is not None
        reply, rest, done = ctx.responder.feed(data)
        out: list[cmd.Command] = [cmd.SendToClient.mine(reply)] if reply else []
        if done:
            ctx.responder = None
            if rest:
                if ctx.phase in (Phase.RELAYING, Phase.DRAINING):
                    out += self.relay.client_data(rest)
                else:
                    out += self.client_waiting(rest)
        return out
