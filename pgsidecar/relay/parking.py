"""Parking: a session idle past ``upstream.park_after`` gives its server connection back.

Between transactions, with nothing owed and only state pgsidecar can rebuild (no temporary
tables, session advisory locks, WITH HOLD cursors or LISTEN channels), an idle session's
upstream is closed cleanly (Terminate, then close) and the client keeps its socket and sees
nothing. Its next request reopens the upstream the way a reconnect does (a fresh DNS lookup, the
host walk and role check in the login, then the replay) and then runs. Parking is not a drop:
no drop record, no drop book; a failed unpark is handled like a reconnect (the request waits
``reconnect.deadline`` from its arrival, then ERROR 08006, with backoff, and the client stays).

One timer per session, not one per transaction: it fires every ``park_after`` at most, and the
clocks the relay already keeps (``last_client_at``, ``last_server_at``) say how long the session
has really been idle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgsidecar.relay import commands as cmd
from pgsidecar.relay.commands import LogLevel, TimerName
from pgsidecar.relay.phases import Phase
from pgsidecar.session.pending import TxStatus
from pgsidecar.session.replay import plan_replay
from pgsidecar.wire import frontend as fe

if TYPE_CHECKING:
    from pgsidecar.relay.context import SessionContext
    from pgsidecar.relay.reconnect import Reconnect
    from pgsidecar.relay.relaying import Relaying

_TERMINATE = fe.Terminate().encode()
# requests_timed_out names the last reconnect error; before the first one, this is why.
_STILL_OPENING = "the upstream connection was still being opened (the session was parked)"


class Parking:
    """Parks an idle session and unparks it on the next request; owns the PARK timer."""

    def __init__(self, ctx: SessionContext, relay: Relaying, reconnect: Reconnect) -> None:
        self.ctx = ctx
        self.relay = relay
        self.reconnect = reconnect
        after = ctx.policy.park_after_s
        self.after_s = after if after is not None and after > 0 else 0.0
        self.unparking = False  # the reconnect under way is an unpark
        self.unpark_started = 0.0  # the client's first byte after parking

    # ------------------------------------------------------------------ the timer
    def timer(self) -> list[cmd.Command]:
        """PARK fired: park if the session has been idle ``park_after`` and may be parked; else
        look again when it could be (the rest of the period, or a whole one if it is busy)."""
        ctx = self.ctx
        after = self.after_s
        if not after:
            return []
        if ctx.phase in (Phase.RECONNECTING, Phase.REPLAYING):
            return [cmd.SetTimer(TimerName.PARK, after)]  # a drop's reconnect: relaying resumes
        if ctx.phase is not Phase.RELAYING:
            return []  # draining, parked or closed: no timer any more
        idle_s = ctx.now - max(ctx.last_client_at, ctx.last_server_at)
        if idle_s < after:
            return [cmd.SetTimer(TimerName.PARK, after - idle_s)]
        if not self.may_park():
            return [cmd.SetTimer(TimerName.PARK, after)]
        return self.park(idle_s)

    def may_park(self) -> bool:
        """Between transactions, nothing owed or held, both streams between messages, and a
        session that the replay can rebuild exactly (and no LISTEN: notifications would be lost)."""
        ctx = self.ctx
        relay = self.relay
        if (
            ctx.pending.front is not None
            or ctx.pending.status is not TxStatus.IDLE
            or ctx.held
            or ctx.responder is not None
            or ctx.book.dirty
            or ctx.client_terminated
            or ctx.role_lost is not None
            or ctx.book.state.listen
            or relay.server_tail
            or not relay.server_scan.at_boundary
            or not relay.at_request_boundary()
        ):
            return False
        return not isinstance(plan_replay(ctx.book.state, ctx.book.parses), str)

    def park(self, idle_s: float) -> list[cmd.Command]:
        """Close the upstream the way a client leaves (Terminate, then close); the client stays."""
        ctx = self.ctx
        ctx.goto(Phase.PARKED)
        ctx.backend_key = (0, b"")  # no backend serves the session: a cancel now has nothing to cancel
        return [
            cmd.SendToServer(_TERMINATE),
            cmd.CloseServer(),
            cmd.NoteParking(parked=True),
            cmd.Log(LogLevel.DEBUG, f"session {ctx.peer}: parked after {idle_s:.1f} s idle; upstream closed"),
        ]

    # ------------------------------------------------------------------ the next request
    def client_data(self, data: bytes) -> list[cmd.Command]:
        """A parked session's client spoke: a goodbye closes it here, anything else unparks."""
        ctx = self.ctx
        if data == _TERMINATE:
            ctx.goto(Phase.CLOSED)  # no server to tell: the client's Terminate ends the session
            return [cmd.CloseClient(), cmd.CloseServer()]
        return self.unpark(data)

    def unpark(self, data: bytes) -> list[cmd.Command]:
        """Reopen the upstream as a reconnect does, without a drop's book: the request is held
        (its reconnect.deadline runs from now), then the login, the replay, and the request."""
        ctx = self.ctx
        ctx.goto(Phase.RECONNECTING)
        self.unparking = True
        self.unpark_started = ctx.now
        # The retry bookkeeping the reconnect reads (backoff exponent, the last error for an
        # ERROR 08006), started afresh; the tracker stays inactive, so nothing is recorded.
        drops = ctx.drops
        drops.started, drops.attempts, drops.errors, drops.last_error = ctx.now, 1, [], _STILL_OPENING
        self.reconnect.login.reset()
        ctx.walk.restart()  # the host list from its first host, as after a drop
        return [*self.reconnect.client_waiting(data), ctx.open_server(reconnect=True)]

    def replayed(self) -> list[cmd.Command]:
        """The replay after a reconnect is done: if it was an unpark, count it and re-arm PARK."""
        if not self.unparking:
            return []
        ctx = self.ctx
        self.unparking = False
        unpark_s = max(0.0, ctx.now - self.unpark_started)
        reconnect = self.reconnect
        out: list[cmd.Command] = []
        if reconnect.deadline_armed:
            reconnect.deadline_armed = False
            out.append(cmd.CancelTimer(TimerName.DEADLINE))
        drops = ctx.drops
        drops.started, drops.attempts, drops.errors = None, 0, []
        return [
            *out,
            cmd.SetTimer(TimerName.PARK, self.after_s),
            cmd.NoteParking(parked=False, unpark_s=round(unpark_s, 6)),
            cmd.Log(LogLevel.DEBUG, f"session {ctx.peer}: unparked in {unpark_s * 1000:.1f} ms"),
        ]
