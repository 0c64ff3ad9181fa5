"""The book kept about one drop, from the moment the upstream is lost to the end of the reconnect.

``DropTracker`` collects the facts (timing, what the socket and the server said, what the new
connection revealed) that ``pgsidecar.drops`` classifies into one record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgsidecar.wire import sqlstate
from pgsidecar.wire.payload import show

if TYPE_CHECKING:
    from pgsidecar.relay.context import SessionContext
    from pgsidecar.relay.events import ServerClosed, ServerConnected
    from pgsidecar.relay.recovery import DropDecision
    from pgsidecar.session.state import ServerFacts

#: The facts of one drop as the brain hands them to the runtime (RecordDrop): JSON-shaped, the
#: keys drops/record.py documents; observe/recorder.py classifies and writes them.
DropInfo = dict[str, Any]


@dataclass(slots=True)
class DropTracker:
    """The facts of the drop in progress (or of the first connect's retries)."""

    active: bool = False
    started: float | None = None
    wall: float = 0.0
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    last_error: str = ""
    impact: str = "transparent"
    resend: tuple[bytes, int] | None = None
    info: DropInfo = field(default_factory=dict)
    replay_summary: str = ""
    previous_facts: dict[str, object] = field(default_factory=dict)
    reveal: dict[str, object] = field(default_factory=dict)

    def connected(self, event: ServerConnected) -> None:
        if self.active:
            new = dict(event.facts)
            old = self.previous_facts
            if old.get("address") and new.get("address") and old["address"] != new["address"]:
                self.reveal["address_changed"] = True
            if (
                old.get("cert_fingerprint")
                and event.cert_fingerprint
                and old["cert_fingerprint"] != event.cert_fingerprint
            ):
                self.reveal["certificate_changed"] = True

    def started_at(self, now: float) -> float:
        if self.started is None:
            self.started = now
        return self.started

    def first_connect_error(self, text: str, now: float) -> None:
        self.started_at(now)
        self.attempts += 1
        self.last_error = text

    def reconnect_error(self, text: str, code: str | None) -> None:
        self.errors.append(text)
        self.last_error = text
        if code == sqlstate.CANNOT_CONNECT_NOW and "recovery mode" in text:
            # postmaster.c CAC_RECOVERY: crash recovery; a standby says "not yet accepting".
            self.reveal["in_recovery_seen"] = True

    def attempt(self) -> None:
        self.attempts += 1

    def lost(self, conn: SessionContext, event: ServerClosed, decision: DropDecision) -> None:
        """Open the book on a drop: timing, state and what the socket said."""
        self.active = True
        self.started = event.now
        self.wall = event.wall
        self.attempts = 1
        self.errors = []
        self.last_error = ""
        self.impact = decision.impact
        self.resend = decision.resend
        self.reveal = {}
        self.previous_facts = dict(conn.facts)
        fatal = conn.last_fatal or conn.last_notice
        self.info = {
            "state": decision.state,
            "connected_at": conn.connected_wall,
            "age_s": round(event.now - conn.connected_at, 3),
            "idle_s": round(event.now - conn.last_server_at, 3),
            "client_idle_s": round(event.now - conn.last_client_at, 3),
            "upstream": dict(
                conn.facts, backend_pid=conn.backend_key[0], server_version=conn.client_params.get("server_version")
            ),
            # Startup parameters are relayed byte for byte; records show non-UTF-8 bytes escaped.
            "client": {
                "addr": conn.peer,
                "application_name": show(conn.params.get("application_name")),
                "user": show(conn.params.get("user")),
                "database": show(conn.params.get("database")),
            },
            "observed": {
                "kind": "fatal" if conn.last_fatal is not None else event.kind,
                "socket": event.kind,
                "sqlstate": fatal.code if fatal else None,
                "severity": fatal.severity if fatal else None,
                "message": fatal.message if fatal else None,
                "tls_close_notify": event.tls_close_notify,
                "errno_name": event.errno_name,
                "detail": event.detail,
                "tcp_info": event.tcp_info,
            },
            "server_facts_before": conn.server_facts,
        }
        conn.last_fatal = None
        conn.last_notice = None

    def new_facts(self, before: ServerFacts | None, after: ServerFacts | None) -> None:
        """Compare the new connection's ServerFacts with those of the one that ended; a flag is
        set only when both sides say, and "_now" means "now, and not before"."""
        self.info["server_facts_after"] = after
        if after is None:
            return
        if before is None:
            if after.in_recovery:  # nothing to compare with, but a standby now is worth saying
                self.reveal["in_recovery_now"] = True
            return
        if before.postmaster_start and after.postmaster_start:
            self.reveal["postmaster_start_changed"] = abs(before.postmaster_start - after.postmaster_start) > 0.001
        if after.in_recovery is not None:
            self.reveal["in_recovery_now"] = bool(after.in_recovery and not before.in_recovery)
        if after.read_only is not None and before.read_only is not None:
            self.reveal["read_only_now"] = after.read_only and not before.read_only
        if before.timeline is not None and after.timeline is not None and after.in_recovery is False:
            # Only a primary's timeline is exact; a standby's is its last restartpoint's, which
            # lags a promotion it has followed (then a standby restart would look like a move).
            self.reveal["timeline_changed"] = before.timeline != after.timeline
        if before.system_identifier and after.system_identifier:
            self.reveal["system_identifier_changed"] = before.system_identifier != after.system_identifier
        old_at, new_at = (before.server_addr, before.server_port), (after.server_addr, after.server_port)
        if all(old_at) and all(new_at) and old_at != new_at:
            self.reveal["address_changed"] = True  # as the server sees itself: NAT, VIP, DNS

    def replayed(self, summary: str) -> None:
        self.replay_summary = summary

    def finish(
        self,
        conn: SessionContext,
        *,
        impact: str,
        succeeded: bool | None,
        now: float | None = None,
        abandoned: bool = False,
    ) -> DropInfo | None:
        """Close the book; the record facts go to the runtime, which classifies and writes them."""
        if not self.active:
            return None
        self.active = False
        end = now if now is not None else conn.last_server_at
        info = dict(self.info)
        info["impact"] = impact if succeeded is not False or impact != "transparent" else "fatal"
        info["time"] = self.wall
        info["reconnect"] = {
            "attempts": self.attempts,
            "duration_s": round(max(0.0, end - (self.started or end)), 3),
            "succeeded": bool(succeeded),
            "errors": list(self.errors),
            "replayed": self.replay_summary,
            **self.reveal,
        }
        if abandoned:  # the client left first: neither success nor failure, no evidence of either
            info["reconnect"]["abandoned"] = True
        if succeeded is None:  # no reconnect was tried (non-replayable state, or "close")
            info["reconnect"]["attempts"] = 0
        self.started = None
        self.attempts = 0
        return info
