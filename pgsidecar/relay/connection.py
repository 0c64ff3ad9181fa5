"""SidecarConnection: the brain of one client session. Events in, commands out, no I/O.

A facade in the manner of h11's Connection: ``handle(event)`` looks up which handler the current
phase gives that kind of event (an event a phase does not accept is a bug, and raises) and
returns the handler's commands. The handlers share one typed ``SessionContext``:

- ``ClientStartup`` (relay/startup.py): startup packets, client TLS, the client's password;
- ``Login`` (relay/login.py): the upstream login, first and again, and the sslmode=allow retry;
- ``Relaying`` (relay/relaying.py): the hot path, one method per direction, and pgsidecar's
  own queries;
- ``Reconnect`` (relay/reconnect.py): the drop decision (docs/session-rules.md), backoff,
  deadline, replay, resend and the local answers for a client whose transaction was lost.
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
from pgsidecar.relay.phases import Phase
from pgsidecar.relay.reconnect import Reconnect
from pgsidecar.relay.relaying import Relaying
from pgsidecar.relay.startup import ClientStartup
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError

__all__ = ["SessionPolicy", "SidecarConnection", "UnexpectedEvent"]

Handler = Callable[[Any], list[cmd.Command]]


class UnexpectedEvent(RuntimeError):
    """An internal bug: the runtime fed an event the session's phase does not accept."""


class SidecarConnection:
    """One client session. ``handle(event)`` returns the commands to carry out, in order."""

    def __init__(self, policy: SessionPolicy, *, secret: bytes, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        walk = HostWalk(policy.host_count, policy.target_session_attrs, policy.load_balance, rng)
        self.ctx = ctx = SessionContext(policy, secret, rng, password=policy.upstream_password, walk=walk)
        self.relay = Relaying(ctx)
        self.reconnect = Reconnect(ctx, self.relay)
        self.login = Login(ctx, self.relay, self.reconnect)
        self.startup = ClientStartup(ctx, self.login)
        self.relay.reconnect = self.reconnect
        self.reconnect.login = self.login
        self.login.startup = self.startup
        self._routes = self._route_table()

    def _route_table(self) -> dict[Phase, dict[type, Handler]]:
        """Which events each phase accepts, and who handles them."""
        startup, login, relay, reconnect = self.startup, self.login, self.relay, self.reconnect
        always: dict[type, Handler] = {
            ev.Timer: self._timer,
            ev.ClientClosed: reconnect.client_closed,
            ev.Drain: self._drain,
            ev.CancelRequested: self._cancel,
        }
        upstream: dict[type, Handler] = {
            ev.ServerConnected: login.server_connected,
            ev.ServerConnectFailed: reconnect.server_connect_failed,
            ev.ServerClosed: reconnect.server_closed,
        }
        relaying: dict[type, Handler] = {
            **always,
            ev.ClientData: lambda e: relay.client_data(e.data),
            ev.ServerData: lambda e: relay.server_data(e.data),
            ev.ServerClosed: reconnect.server_closed,
        }
        return {
            Phase.STARTUP: {
                **always,
                ev.ClientConnected: startup.connected,
                ev.ClientTLSStarted: startup.tls_started,
                ev.ClientData: lambda e: startup.data(e.data),
                ev.ServerClosed: lambda e: [],
            },
            Phase.AUTHENTICATING: {
                **always,
                **upstream,
                ev.ClientData: lambda e: startup.password(e.data),
                ev.ServerData: lambda e: login.server_data(e.data),
            },
            Phase.RELAYING: relaying,
            Phase.DRAINING: relaying,
            Phase.RECONNECTING: {
                **always,
                **upstream,
                ev.ClientData: lambda e: reconnect.client_waiting(e.data),
                ev.ServerData: lambda e: login.server_data(e.data),
            },
            Phase.REPLAYING: {
                **always,
                **upstream,
                ev.ClientData: lambda e: reconnect.client_waiting(e.data),
                ev.ServerData: lambda e: relay.server_data(e.data),
            },
            # Closed: the runtime may still deliver what was already under way; nothing is done.
            Phase.CLOSED: {kind: lambda e: [] for kind in _EVENT_TYPES},
        }

    @property
    def phase(self) -> Phase:
        return self.ctx.phase

    def handle(self, event: ev.Event) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.now = event.now  # the clock, for records closed by any event
        if isinstance(event, ev.ClientData):
            ctx.last_client_at = event.now
        route = self._routes[ctx.phase].get(type(event))
        if route is None:
            raise UnexpectedEvent(f"{type(event).__name__} in phase {ctx.phase.value}")
        try:
            return route(event)
        except ClientProtocolError as exc:
            return ctx.fatal_to_client(exc.sqlstate, str(exc), log=f"client protocol error: {exc}")
        except ProtocolError as exc:
            return self.reconnect.upstream_broken(event, str(exc))

    def drain(self) -> list[cmd.Command]:
        """Shutdown, as a method for callers without a clock (the Drain event is the same)."""
        return self.handle(ev.Drain(self.ctx.now))

    def _timer(self, event: ev.Timer) -> list[cmd.Command]:
        if event.name == TimerName.STARTUP:
            if self.ctx.phase in (Phase.STARTUP, Phase.AUTHENTICATING):
                return self.startup.timeout()
            return []
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
        # Logging in or reconnecting: nothing is in flight that a wait could finish.
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
