"""The closed vocabulary of drop causes, each with a short phrase and a concrete remedy.

Records carry a cause from this enum, never free prose (docs/architecture.md, Style 6): the analyzer can
count them, and the hint can be templated with the facts of one drop (`hint_for`).
Facts about servers, poolers and middleboxes: docs/drops.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class DropCause(enum.Enum):
    """Why an upstream connection ended without the client asking."""

    SERVER_RESTART = "server_restart"
    SERVER_CRASH = "server_crash"
    ADMIN_TERMINATE = "admin_terminate"
    IDLE_SESSION_TIMEOUT = "idle_session_timeout"
    IDLE_IN_TRANSACTION_TIMEOUT = "idle_in_transaction_timeout"
    TRANSACTION_TIMEOUT = "transaction_timeout"
    PATH_IDLE_TIMEOUT = "path_idle_timeout"
    NETWORK_TIMEOUT = "network_timeout"
    NETWORK_RESET = "network_reset"
    FAILOVER = "failover"
    SWITCHOVER = "switchover"
    SERVER_READ_ONLY = "server_read_only"
    TLS_ERROR = "tls_error"
    CERTIFICATE_ROTATED = "certificate_rotated"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    UPSTREAM_POOLER = "upstream_pooler"
    UNKNOWN = "unknown"

    @property
    def phrase(self) -> str:
        """A few words for a human: what happened."""
        return _PHRASES[self]

    @property
    def hint(self) -> str:
        """One sentence: the remedy, with setting names and values, without facts of one drop."""
        return _HINTS[self]


_PHRASES: dict[DropCause, str] = {
    DropCause.SERVER_RESTART: "server restart",
    DropCause.SERVER_CRASH: "server crash (crash recovery)",
    DropCause.ADMIN_TERMINATE: "backend terminated by an administrator",
    DropCause.IDLE_SESSION_TIMEOUT: "server idle_session_timeout",
    DropCause.IDLE_IN_TRANSACTION_TIMEOUT: "server idle_in_transaction_session_timeout",
    DropCause.TRANSACTION_TIMEOUT: "server transaction_timeout",
    DropCause.PATH_IDLE_TIMEOUT: "idle flow forgotten by a load balancer or NAT",
    DropCause.NETWORK_TIMEOUT: "network path stopped answering",
    DropCause.NETWORK_RESET: "connection reset by the network or host",
    DropCause.FAILOVER: "failover to another server",
    DropCause.SWITCHOVER: "switchover to another server",
    DropCause.SERVER_READ_ONLY: "server read-only now",
    DropCause.TLS_ERROR: "TLS error",
    DropCause.CERTIFICATE_ROTATED: "server certificate rotated",
    DropCause.TOO_MANY_CONNECTIONS: "server out of connection slots",
    DropCause.UPSTREAM_POOLER: "closed by an upstream pooler",
    DropCause.UNKNOWN: "unexplained close",
}

_HINTS: dict[DropCause, str] = {
    DropCause.SERVER_RESTART: (
        "the server was restarted or shut down: schedule restarts, and keep reconnect.deadline"
        " longer than the restart takes"
    ),
    DropCause.SERVER_CRASH: (
        "a server process crashed and the server ran crash recovery: check the server log for"
        ' "terminated by signal 9" and dmesg for the OOM killer, then lower work_mem or'
        " max_connections or give the server more memory"
    ),
    DropCause.ADMIN_TERMINATE: (
        "someone or something ran pg_terminate_backend(): check the server log and cron jobs or"
        " tools that kill idle sessions"
    ),
    DropCause.IDLE_SESSION_TIMEOUT: (
        "the server's idle_session_timeout ended an idle session: pgsidecar reconnects these"
        " transparently; raise idle_session_timeout or set it to 0 for the sidecar's role"
        " (ALTER ROLE ... SET idle_session_timeout = 0) to avoid the reconnects"
    ),
    DropCause.IDLE_IN_TRANSACTION_TIMEOUT: (
        "the app left a transaction open longer than idle_in_transaction_session_timeout:"
        " commit or roll back sooner, or raise that setting"
    ),
    DropCause.TRANSACTION_TIMEOUT: (
        "a transaction ran longer than transaction_timeout: shorten the transaction or raise that setting"
    ),
    DropCause.PATH_IDLE_TIMEOUT: (
        "a load balancer or NAT between you and the server forgets idle flows: keep"
        " upstream.keepalive.idle below its idle timeout (AWS NLB/NAT 350 s, Azure LB 240 s)"
    ),
    DropCause.NETWORK_TIMEOUT: (
        "the path to the server stopped answering (keepalive probes or retransmits timed out):"
        " check the network, security groups and the server host"
    ),
    DropCause.NETWORK_RESET: (
        "the connection was reset by a NAT, load balancer or rebooted host: if it happens after"
        " a fixed idle time, keep upstream.keepalive.idle below the middlebox idle timeout"
    ),
    DropCause.FAILOVER: (
        "the server went away without a clean shutdown and another server took over: find why"
        " the old one failed (server log, host, network); if the app writes, make sure"
        " upstream.dsn names the primary's endpoint, not one server"
    ),
    DropCause.SWITCHOVER: (
        "the server was shut down and another server took over (a planned switchover): if the"
        " app writes, make sure upstream.dsn names the primary's endpoint, not one server"
    ),
    DropCause.SERVER_READ_ONLY: (
        "the server now makes new transactions read-only (default_transaction_read_only is on for"
        " the server, database or role): writes fail with 25006 until it is turned off; find who"
        " set it (ALTER SYSTEM / DATABASE / ROLE) or whether a storage-full guard did"
    ),
    DropCause.TLS_ERROR: (
        "the TLS session failed: check ssl_min_protocol_version, ciphers and the certificates on both sides"
    ),
    DropCause.CERTIFICATE_ROTATED: (
        "the server certificate was replaced: make sure sslrootcert trusts the new issuer"
        " before the old certificate expires"
    ),
    DropCause.TOO_MANY_CONNECTIONS: (
        "the server was out of connection slots (53300): raise max_connections or lower the"
        " number of clients per sidecar"
    ),
    DropCause.UPSTREAM_POOLER: ("an upstream pooler ended the connection: check the pooler's log and its timeouts"),
    DropCause.UNKNOWN: ("the server closed the connection without saying why: look at the server log around that time"),
}


def hint_for(cause: DropCause, facts: Mapping[str, object]) -> str:
    """The hint for one drop, completed with its facts where they change the advice.

    Known facts: idle_s, keepalive_idle_s, tls_alert, message, sqlstate, pooler_hint,
    errno_name, in_recovery_now, too_many (the reconnect error that said so). Unknown or missing
    facts leave the generic hint.
    """
    if cause in (DropCause.FAILOVER, DropCause.SWITCHOVER) and facts.get("in_recovery_now") is True:
        how = "went away" if cause is DropCause.FAILOVER else "was shut down"
        return (
            f"the server {how} and this address now serves a standby (in recovery, read-only):"
            " reads work, writes fail with 25006 until it is promoted; if the app writes, make"
            " sure upstream.dsn names the primary's endpoint"
        )
    if cause is DropCause.SERVER_READ_ONLY and facts.get("in_recovery_now") is True:
        return (
            "the server reached is a standby now (in recovery): writes fail with 25006; if the"
            " app writes, make sure upstream.dsn names the primary's endpoint"
        )
    if cause is DropCause.TOO_MANY_CONNECTIONS and isinstance(facts.get("too_many"), str):
        text = str(facts["too_many"])
        if "for role" in text or "for database" in text:
            what = "role" if "for role" in text else "database"
            return (
                f"the {what}'s connection limit was reached ({text}): raise it with ALTER"
                f" {what.upper()} ... CONNECTION LIMIT, or lower the number of clients"
            )
    if cause is DropCause.PATH_IDLE_TIMEOUT:
        return _path_idle_hint(facts)
    if cause is DropCause.UPSTREAM_POOLER and isinstance(facts.get("pooler_hint"), str):
        return str(facts["pooler_hint"])
    if cause is DropCause.TLS_ERROR and facts.get("tls_alert"):
        return (
            f"the TLS session failed with alert {facts['tls_alert']}: check"
            " ssl_min_protocol_version, ciphers and the certificates on both sides"
        )
    if cause is DropCause.UNKNOWN and facts.get("message"):
        code = f" {facts['sqlstate']}" if facts.get("sqlstate") else ""
        return f'the server said{code} "{facts["message"]}": look at the server log around that time'
    if cause is DropCause.NETWORK_TIMEOUT and facts.get("errno_name") in _UNREACHABLE:
        return (
            f"the server became unreachable ({facts['errno_name']}): check routes, security groups and the server host"
        )
    return _HINTS[cause]


_UNREACHABLE = frozenset({"EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN"})


def _path_idle_hint(facts: Mapping[str, object]) -> str:
    idle = _num(facts.get("idle_s"))
    keepalive = _num(facts.get("keepalive_idle_s"))
    base = _HINTS[DropCause.PATH_IDLE_TIMEOUT]
    if idle is None:
        return base
    now = "keepalives are off on this path" if keepalive is None else f"upstream.keepalive.idle is {keepalive:g} s now"
    return (
        f"a load balancer or NAT between you and the server forgot the flow after about"
        f" {idle:.0f} s idle ({now}): set upstream.keepalive.idle well below that"
        " (AWS NLB/NAT 350 s, Azure LB 240 s, GCP Cloud NAT 1200 s)"
    )


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
