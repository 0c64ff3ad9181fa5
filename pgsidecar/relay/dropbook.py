"""The book kept about one drop, from the moment the upstream is lost to the end of the reconnect.

``DropTracker`` collects the facts (timing, what the socket and the server said, what the new
connection revealed) that ``pgsidecar.drops`` classifies into one record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pgsidecar.drops.classify import Observed, ReconnectOutcome
from pgsidecar.drops.record import ClientInfo, DropFacts, ServerSnapshot, UpstreamInfo, iso_utc
from pgsidecar.wire import sqlstate
from pgsidecar.wire.payload import show

if TYPE_CHECKING:
    from pgsidecar.relay.context import SessionContext
    from pgsidecar.relay.events import ServerClosed, ServerConnected
    from pgsidecar.relay.recovery import DropDecision
    from pgsidecar.session.state import ServerFacts


@dataclass(slots=True)
class Reveal:
    """What the new connection revealed about the drop: ReconnectOutcome's flags (None: not known;
    "_now": now, and not before)."""

    postmaster_start_changed: bool | None = None
    in_recovery_seen: bool | None = None
    certificate_changed: bool | None = None
    address_changed: bool | None = None
    read_only_now: bool | None = None
    in_recovery_now: bool | None = None
    timeline_changed: bool | None = None
    system_identifier_changed: bool | None = None


def upstream_info(conn: SessionContext, server_version: str | None) -> UpstreamInfo:
    """The upstream connection serving the session now, for the record."""
    facts = conn.facts
    not_after = facts.get("cert_not_after")
    return UpstreamInfo(
        host=facts.get("host"),
        address=facts.get("address"),
        port=facts.get("port"),
        backend_pid=conn.backend_key[0],
        server_version=server_version,
        tls_version=facts.get("tls_version"),
        tls_cipher=facts.get("tls_cipher"),
        cert_fingerprint_sha256=facts.get("cert_fingerprint"),
        cert_not_after=iso_utc(not_after) if not_after is not None else None,
    )


def snapshot(facts: ServerFacts | None) -> ServerSnapshot | None:
    """session/state.py's ServerFacts -> the record's ServerSnapshot."""
    if facts is None:
        return None
    return ServerSnapshot(
        postmaster_start=facts.postmaster_start,
        in_recovery=facts.in_recovery,
        read_only=facts.read_only,
        system_identifier=facts.system_identifier,
        timeline=facts.timeline,
        address=facts.server_addr,
        port=facts.server_port,
    )


@dataclass(slots=True)
class DropTracker:
    """The facts of the drop in progress (or of the first connect's retries)."""

    active: bool = False
    started: float | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    last_error: str = ""
    impact: str = "transparent"
    resend: tuple[bytes, int] | None = None
    opened: DropFacts | None = None  # what was known when the drop happened; reconnect=None
    server_after: ServerSnapshot | None = None
    replay_summary: str = ""
    previous_address: str | None = None
    previous_fingerprint: str | None = None
    reveal: Reveal = field(default_factory=Reveal)

    def connected(self, event: ServerConnected) -> None:
        if self.active:
            new = event.facts.get("address")
            if self.previous_address and new and self.previous_address != new:
                self.reveal.address_changed = True
            if (
                self.previous_fingerprint
                and event.cert_fingerprint
                and self.previous_fingerprint != event.cert_fingerprint
            ):
                self.reveal.certificate_changed = True

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
            self.reveal.in_recovery_seen = True

    def attempt(self) -> None:
        self.attempts += 1

    def lost(self, conn: SessionContext, event: ServerClosed, decision: DropDecision) -> None:
        """Open the book on a drop: timing, state and what the socket said."""
        self.active = True
        self.started = event.now
        self.attempts = 1
        self.errors = []
        self.last_error = ""
        self.impact = decision.impact
        self.resend = decision.resend
        self.reveal = Reveal()
        self.server_after = None
        self.replay_summary = ""
        facts = conn.facts
        self.previous_address = facts.get("address")
        self.previous_fingerprint = facts.get("cert_fingerprint")
        fatal = conn.last_fatal or conn.last_notice
        tcp_info = event.tcp_info
        self.opened = DropFacts(
            time=event.wall,
            state=decision.state,
            impact=decision.impact,
            connected_at=conn.connected_wall,
            age_s=round(event.now - conn.connected_at, 3),
            idle_s=round(event.now - conn.last_server_at, 3),
            client_idle_s=round(event.now - conn.last_client_at, 3),
            observed=Observed(
                kind="fatal" if conn.last_fatal is not None else event.kind,
                sqlstate=fatal.code if fatal else None,
                severity=fatal.severity if fatal else None,
                # pgsidecar's own reason when it left the server itself (the role was lost)
                message=fatal.message if fatal else (event.detail if event.kind == "role_lost" else None),
                tls_close_notify=event.tls_close_notify,
                errno_name=event.errno_name,
                tls_alert=event.detail if event.kind == "tls_error" else None,
                tcp_info=None
                if tcp_info is None
                else {k: v for k, v in tcp_info.items() if isinstance(v, int | float)},
            ),
            reconnect=None,
            # Startup parameters are relayed byte for byte; records show non-UTF-8 bytes escaped.
            client=ClientInfo(
                addr=conn.peer,
                application_name=show(conn.params.get("application_name")),
                user=show(conn.params.get("user")),
                database=show(conn.params.get("database")),
            ),
            upstream=upstream_info(conn, conn.client_params.get("server_version")),
            server_before=snapshot(conn.server_facts),
        )
        conn.last_fatal = None
        conn.last_notice = None

    def new_facts(self, before: ServerFacts | None, after: ServerFacts | None) -> None:
        """Compare the new connection's ServerFacts with those of the one that ended; a flag is
        set only when both sides say, and "_now" means "now, and not before"."""
        self.server_after = snapshot(after)
        if after is None:
            return
        reveal = self.reveal
        if before is None:
            if after.in_recovery:  # nothing to compare with, but a standby now is worth saying
                reveal.in_recovery_now = True
            return
        if before.postmaster_start and after.postmaster_start:
            reveal.postmaster_start_changed = abs(before.postmaster_start - after.postmaster_start) > 0.001
        if after.in_recovery is not None:
            reveal.in_recovery_now = bool(after.in_recovery and not before.in_recovery)
        if after.read_only is not None and before.read_only is not None:
            reveal.read_only_now = after.read_only and not before.read_only
        if before.timeline is not None and after.timeline is not None and after.in_recovery is False:
            # Only a primary's timeline is exact; a standby's is its last restartpoint's, which
            # lags a promotion it has followed (then a standby restart would look like a move).
            reveal.timeline_changed = before.timeline != after.timeline
        if before.system_identifier and after.system_identifier:
            reveal.system_identifier_changed = before.system_identifier != after.system_identifier
        old_at, new_at = (before.server_addr, before.server_port), (after.server_addr, after.server_port)
        if all(old_at) and all(new_at) and old_at != new_at:
            reveal.address_changed = True  # as the server sees itself: NAT, VIP, DNS

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
    ) -> DropFacts | None:
        """Close the book; the facts go to the runtime, which classifies and writes them."""
        if not self.active or self.opened is None:
            return None
        self.active = False
        end = now if now is not None else conn.last_server_at
        r = self.reveal
        outcome = ReconnectOutcome(
            # succeeded None: no reconnect was tried (non-replayable state, or "close")
            attempts=0 if succeeded is None else self.attempts,
            duration_s=round(max(0.0, end - (self.started or end)), 3),
            succeeded=bool(succeeded),
            errors=tuple(self.errors),
            # the client left first: neither success nor failure, no evidence of either
            abandoned=True if abandoned else None,
            replayed=self.replay_summary,
            postmaster_start_changed=r.postmaster_start_changed,
            in_recovery_seen=r.in_recovery_seen,
            certificate_changed=r.certificate_changed,
            address_changed=r.address_changed,
            read_only_now=r.read_only_now,
            in_recovery_now=r.in_recovery_now,
            timeline_changed=r.timeline_changed,
            system_identifier_changed=r.system_identifier_changed,
        )
        facts = replace(
            self.opened,
            impact=impact if succeeded is not False or impact != "transparent" else "fatal",
            reconnect=outcome,
            server_after=self.server_after,
            # replay_done closes the book on the new connection: its host and address
            upstream_after=upstream_info(conn, conn.client_params.get("server_version")) if succeeded else None,
        )
        self.started = None
        self.attempts = 0
        self.opened = None
        return facts
