"""SidecarConnection: the brain of one client session. Events in, commands out, no I/O.

A facade in the manner of h11's Connection: ``handle(event)`` looks up which handler the current
phase gives that kind of event (an event a phase does not accept is a bug, and raises) and
returns the handler's commands. ``client_read`` and ``server_read`` are the runtime's entries for
the reads themselves: the same as ``handle`` with a ClientData or ServerData, but while relaying
without the event object or the route lookup, and with None for "relay the read as it came" in
place of its one Send command (the hot path). The handlers share one typed ``SessionContext``:

- ``ClientStartup`` (relay/startup.py): startup packets, client TLS, the client's password;
- ``Login`` (relay/login.py): the upstream login, first and again, and the sslmode=allow retry;
- ``Relaying`` (relay/relaying.py): the hot path, one method per direction, and pgsidecar's
  own queries;
- ``Reconnect`` (relay/reconnect.py): the drop decision (docs/session-rules.md), backoff,
  deadline, replay, resend and the local answers for a client whose transaction was lost;
- ``Parking`` (relay/parking.py): upstream.park_after, an idle session's upstream closed until
  its next request, which reopens it through the reconnect path.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.commands import TimerName
from pgsidecar.relay.context import SessionContext, SessionPolicy
from pgsidecar.relay.hosts import HostWalk
from pgsidecar.relay.login import Login
from pgsidecar.relay.parking import Parking
from pgsidecar.relay.phases import Phase
from pgsidecar.relay.reconnect import Reconnect
from pgsidecar.relay.relaying import Relaying
from pgsidecar.relay.startup import ClientStartup
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError

__all__ = ["SessionPolicy", "SidecarConnection", "UnexpectedEvent"]

# A route: the connection and the event in, the commands out. One table for every session (a
# table of bound methods per session cost about 2 kB of each idle client's memory).
Handler = Callable[["SidecarConnection", Any], list[cmd.Command]]

_RELAYING = Phase.RELAYING
# Backoff jitter and host order, never secrets: one generator for all sessions (one each was
# 2.5 kB of every idle client); tests pass their own, seeded.
_RNG = random.Random()


class UnexpectedEvent(RuntimeError):
    """An internal bug: the runtime fed an event the session's phase does not accept."""


class SidecarConnection:
    """One client session. ``handle(event)`` returns the commands to carry out, in order."""

    def __init__(self, policy: SessionPolicy, *, secret: bytes, rng: random.Random | None = None) -> None:
        rng = rng or _RNG
        walk = HostWalk(policy.host_count, policy.target_session_attrs, policy.load_balance, rng)
        self.ctx = ctx = SessionContext(policy, secret, rng, password=policy.upstream_password, walk=walk)
        self.relay = Relaying(ctx)
        self.reconnect = Reconnect(ctx, self.relay)
        self.login = Login(ctx, self.relay, self.reconnect)
        self.startup = ClientStartup(ctx, self.login)
        self.parking = Parking(ctx, self.relay, self.reconnect)
        self.relay.reconnect = self.reconnect
        self.reconnect.login = self.login
        self.reconnect.parking = self.parking
        self.login.startup = self.startup

    def release(self) -> None:
        """The runtime feeds this session no more events: undo the wiring above (the only edges
        from one handler back to another), so nothing in the session points back at itself and
        reference counting frees it the moment the runtime lets go, instead of the next full
        garbage collection (a session that lived a while sits in the oldest generation, which
        Python collects rarely: its memory stayed with the process). Idempotent."""
        for part, name in (
            (self.relay, "reconnect"),
            (self.reconnect, "login"),
            (self.reconnect, "parking"),
            (self.login, "startup"),
        ):
            part.__dict__.pop(name, None)

    @property
    def phase(self) -> Phase:
        return self.ctx.phase

    def handle(self, event: ev.Event) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.now = event.now  # the clock, for records closed by any event
        if isinstance(event, ev.ClientData):
            ctx.last_client_at = event.now
        route = _ROUTES[ctx.phase].get(type(event))
        if route is None:
            raise UnexpectedEvent(f"{type(event).__name__} in phase {ctx.phase.value}")
        try:
            return route(self, event)
        except ProtocolError as exc:
            return self._protocol_error(exc, event)

    def client_read(self, now: float, data: bytes) -> list[cmd.Command] | None:
        """``handle(ClientData(now, data))``; None: send the read to the server as it came."""
        ctx = self.ctx
        if ctx.phase is not _RELAYING:
            return self.handle(ev.ClientData(now, data))
        ctx.now = ctx.last_client_at = now
        try:
            return self.relay.client_read(data)
        except ProtocolError as exc:
            return self._protocol_error(exc, ev.ClientData(now, data))

    def server_read(self, now: float, data: bytes) -> list[cmd.Command] | None:
        """``handle(ServerData(now, data))``; None: send the read to the client as it came."""
        ctx = self.ctx
        if ctx.phase is not _RELAYING:
            return self.handle(ev.ServerData(now, data))
        ctx.now = now
        try:
            return self.relay.server_read(data)
        except ProtocolError as exc:
            return self._protocol_error(exc, ev.ServerData(now, data))

    def _protocol_error(self, exc: ProtocolError, event: ev.Event) -> list[cmd.Command]:
        """A peer broke the protocol: a client's error ends its session, a server's is a drop."""
        if isinstance(exc, ClientProtocolError):
            return self.ctx.fatal_to_client(exc.sqlstate, str(exc), log=f"client protocol error: {exc}")
        return self.reconnect.upstream_broken(event, str(exc))

    def drain(self) -> list[cmd.Command]:
        """Shutdown, as a method for callers without a clock (the Drain event is the same)."""
        return self.handle(ev.Drain(self.ctx.now))

    def _timer(self, event: ev.Timer) -> list[cmd.Command]:
        if event.name == TimerName.STARTUP:
            if self.ctx.phase in (Phase.STARTUP, Phase.AUTHENTICATING):
                return self.startup.timeout()
            return []
        if event.name == TimerName.PARK:
            return self.parking.timer()
        return self.reconnect.timer(event)

    def _drain(self, event: ev.Drain) -> list[cmd.Command]:
        phase = self.ctx.phase
        if phase is Phase.STARTUP:
            self.ctx.goto(Phase.CLOSED)
            return [cmd.CloseClient(), cmd.CloseServer()]
        if phase is Phase.RELAYING:
            return self.relay.drain()
        if phase is Phase.DRAINING:
            return []
        # Logging in, reconnecting or parked: nothing is in flight that a wait could finish.
        return self.relay.drain_close()

    def _cancel(self, event: ev.CancelRequested) -> list[cmd.Command]:
        pid, secret = self.ctx.backend_key
        return [cmd.SendCancel(pid, secret, self.ctx.walk.host, self.ctx.facts.get("address"))] if pid else []


_EVENT_TYPES: tuple[type, ...] = (
    ev.ClientConnected,
    ev.ClientTLSStarted,
    ev.ClientData,
    ev.ClientClosed,
    ev.ServerConnected,
    ev.ServerConnectFailed,
    ev.ServerData,
    ev.ServerClosed,
    ev.Timer,
    ev.Drain,
    ev.CancelRequested,
)


def _route_table() -> dict[Phase, dict[type, Handler]]:
    """Which events each phase accepts, and who handles them."""
    always: dict[type, Handler] = {
        ev.Timer: lambda c, e: c._timer(e),
        ev.ClientClosed: lambda c, e: c.reconnect.client_closed(e),
        ev.Drain: lambda c, e: c._drain(e),
        ev.CancelRequested: lambda c, e: c._cancel(e),
    }
    upstream: dict[type, Handler] = {
        ev.ServerConnected: lambda c, e: c.login.server_connected(e),
        ev.ServerConnectFailed: lambda c, e: c.reconnect.server_connect_failed(e),
        ev.ServerClosed: lambda c, e: c.reconnect.server_closed(e),
    }
    relaying: dict[type, Handler] = {
        **always,
        ev.ClientData: lambda c, e: c.relay.client_data(e.data),
        ev.ServerData: lambda c, e: c.relay.server_data(e.data),
        ev.ServerClosed: lambda c, e: c.reconnect.server_closed(e),
    }
    nothing: Handler = lambda c, e: []  # noqa: E731 - a route, like the lambdas around it
    return {
        Phase.STARTUP: {
            **always,
            ev.ClientConnected: lambda c, e: c.startup.connected(e),
            ev.ClientTLSStarted: lambda c, e: c.startup.tls_started(e),
            ev.ClientData: lambda c, e: c.startup.data(e.data),
            ev.ServerClosed: nothing,
        },
        Phase.AUTHENTICATING: {
            **always,
            **upstream,
            ev.ClientData: lambda c, e: c.startup.password(e.data),
            ev.ServerData: lambda c, e: c.login.server_data(e.data),
        },
        Phase.RELAYING: relaying,
        Phase.DRAINING: relaying,
        Phase.RECONNECTING: {
            **always,
            **upstream,
            ev.ClientData: lambda c, e: c.reconnect.client_waiting(e.data),
            ev.ServerData: lambda c, e: c.login.server_data(e.data),
        },
        Phase.REPLAYING: {
            **always,
            **upstream,
            ev.ClientData: lambda c, e: c.reconnect.client_waiting(e.data),
            ev.ServerData: lambda c, e: c.relay.server_data(e.data),
        },
        # No upstream: the next request unparks; what the closed socket still says is no drop.
        Phase.PARKED: {
            **always,
            ev.ClientData: lambda c, e: c.parking.client_data(e.data),
            ev.ServerData: nothing,
            ev.ServerClosed: nothing,
        },
        # Closed: the runtime may still deliver what was already under way; nothing is done.
        Phase.CLOSED: dict.fromkeys(_EVENT_TYPES, nothing),
    }


_ROUTES = _route_table()
