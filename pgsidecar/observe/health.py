"""Health state for /startupz, /livez and /readyz: plain facts in, (status, text) out.

The runtime tells it what happened (listening, upstream connect outcomes, loop heartbeats); the
HTTP responder asks it what to answer. Status codes are what Kubernetes probes expect: 200 means
yes, 503 means not now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# The Cloud SQL Auth Proxy spells them /startup, /liveness, /readiness; both names answer.
ENDPOINTS = {
    "/startupz": "startup",
    "/startup": "startup",
    "/livez": "live",
    "/liveness": "live",
    "/readyz": "ready",
    "/readiness": "ready",
}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str


class Health:
    """What the sidecar knows about itself and its upstream, judged on request."""

    def __init__(
        self,
        *,
        stale_after_s: float = 30.0,
        lag_limit_s: float = 5.0,
        draining: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.lag_limit_s = lag_limit_s
        self.draining = draining
        self.clock = clock
        self.listening = False
        self.probed = False  # the first upstream connect was done or attempted
        self.last_ok: float | None = None
        self.last_fail: float | None = None
        self.last_error: str | None = None
        self.last_tick = clock()
        self.worst_lag_s = 0.0

    # ------------------------------------------------------------------ facts in
    def upstream_result(self, ok: bool, error: str | None = None) -> None:
        """An upstream connect (probe or session) succeeded or failed at TCP/TLS level."""
        now = self.clock()
        self.probed = True
        if ok:
            self.last_ok = now
        else:
            self.last_fail = now
            self.last_error = error

    def tick(self, lag_s: float) -> None:
        """The loop heartbeat ran, `lag_s` later than it was scheduled."""
        self.last_tick = self.clock()
        self.worst_lag_s = lag_s

    # ------------------------------------------------------------------ answers out
    def answer(self, path: str) -> Answer | None:
        kind = ENDPOINTS.get(path)
        if kind is None:
            return None
        return {"startup": self.startup, "live": self.live, "ready": self.ready}[kind]()

    def startup(self) -> Answer:
        if not self.listening:
            return Answer(503, "not listening yet\n")
        if not self.probed:
            return Answer(503, "first upstream connect not attempted yet\n")
        return Answer(200, "ok\n")

    def live(self) -> Answer:
        """The answer comes from the event loop itself, so a blocked loop cannot answer at all;
        a loop that answers but whose heartbeat is late is overloaded or stuck in callbacks."""
        since = self.clock() - self.last_tick
        if since > self.lag_limit_s or self.worst_lag_s > self.lag_limit_s:
            return Answer(503, f"event loop lagging: last heartbeat {since:.1f}s ago, lag {self.worst_lag_s:.1f}s\n")
        return Answer(200, "ok\n")

    def ready(self) -> Answer:
        if self.draining():
            return Answer(503, "draining: shutting down\n")
        if not self.listening or not self.probed:
            return Answer(503, "starting\n")
        now = self.clock()
        if self.last_ok is None or (self.last_fail is not None and self.last_fail >= self.last_ok):
            return Answer(503, f"upstream unreachable: {self.last_error or 'no successful connect yet'}\n")
        if now - self.last_ok > self.stale_after_s:
            return Answer(503, f"no successful upstream connect in the last {self.stale_after_s:g}s\n")
        return Answer(200, "ok\n")
