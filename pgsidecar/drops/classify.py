"""Why did the upstream connection end? A pure function of the evidence the runtime collected.

The runtime records facts (what the socket said, timings, what the reconnect found) and calls
`classify`; it never decides. Facts: docs/drops.md; server texts from PostgreSQL's
`src/backend/tcop/postgres.c` (ProcessInterrupts) and `postmaster.c`; pooler texts from
PgBouncer's `janitor.c`, `objects.c`, `server.c` (checked against PgBouncer 1.18 and master).

Ordered rules, first match wins. The SQLSTATE and message are those of the last ErrorResponse or
NoticeResponse read before the end, at any severity: PostgreSQL 14+ sends 57P01 (immediate
shutdown) and 57P02 as WARNING followed by EOF, never a FATAL.

 1. 57P05, or "idle-session timeout"                    -> idle_session_timeout
 2. 25P03, or "idle-in-transaction timeout"             -> idle_in_transaction_timeout
 3. 25P04, or "due to transaction timeout"              -> transaction_timeout
    (1-3: the server said why this very session ended; nothing found later can override that.)
 4. a PgBouncer text (`server conn crashed?`, `client_idle_timeout`, `query_wait_timeout`,
    `query_timeout`, `idle transaction timeout`, `client_login_timeout`, `server login has been
    failing`, `pgbouncer cannot connect to server`, `max_client_conn`, `server shutting down`,
    ...) with SQLSTATE 08P01 or none (PgBouncer's habit)  -> upstream_pooler, hint names the
    pooler setting. PgBouncer hides the server's own words, so no server cause is guessed.
 5. the reconnect reached another server: the system identifier changed, or the server's address
    changed, or it is now a standby (in recovery, and was not) or on a new timeline (promoted),
    each unless the postmaster start time is unchanged (then it is the same server). The old
    server's last words tell the two apart: 57P01 "administrator command" (a fast shutdown;
    a smart one waits for the session to leave and sends nothing), or a first reconnect error
    57P03 "shutting down"  -> switchover; it vanished (crash, immediate shutdown, EOF, reset,
    timeout)             -> failover. Kind role_lost (pgsidecar itself left a writer that
    answered 25006 or went into recovery, relay/hosts.py)  -> failover.
 6. 57P02, "crash of another server process", or 57P01 "unexpected postmaster exit"
                                                         -> server_crash
 7. certificate changed on reconnect, and the drop itself was server-side (FATAL, EOF, TLS error,
    other): -> certificate_rotated, and the cause rules 8-12 would have given (restart,
    terminate) goes to `secondary`. Rotation needs a reload or restart, so a new certificate
    right after a server-side close means the rotation took effect. After a network-level end
    (reset, timeout, unreachable) the network cause stays primary and certificate_rotated is
    secondary.
 8. 57P01 "immediate shutdown"                          -> server_restart
 9. crash recovery seen while reconnecting (57P03 "the database system is in recovery mode",
    postmaster.c CAC_RECOVERY: only after a crash)       -> server_crash. A server found in
    recovery (a standby) is not crash evidence: rule 5 or the rules below decide.
10. 57P01 (administrator command: pg_terminate_backend or a fast/smart shutdown) with restart
    signs: postmaster start time changed, the first reconnect error was 57P03 starting up /
    shutting down or ECONNREFUSED, or the reconnect failed -> server_restart. A reconnect the
    client abandoned (it left first) neither failed nor succeeded: it is no restart sign.
11. 57P01 otherwise (server unchanged, reconnect at once, abandoned, or no reconnect evidence)
                                                         -> admin_terminate
12. any end with the postmaster start time changed, or first reconnect error 57P03 starting up /
    shutting down or ECONNREFUSED                        -> server_restart
13. kind tls_error                                       -> tls_error
14. kind timeout or reset after the flow was silent >= 60 s (silence = idle_s when keepalives are
    off, else min(idle_s, keepalive idle)), when the reconnect (if any) did not fail: a
    middlebox forgot the flow                            -> path_idle_timeout
15. kind reset                                           -> network_reset
16. kind timeout or unreachable                          -> network_timeout
17. anything else (bare EOF, EOF with close_notify, another FATAL) -> unknown

Secondary findings from the reconnect, whatever the primary cause: 53300 / "too many clients" /
"remaining connection slots" in the reconnect errors -> too_many_connections; the same server
read-only now (default_transaction_read_only turned on, not a standby) -> server_read_only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from pgsidecar.drops.causes import DropCause, hint_for
from pgsidecar.wire import sqlstate

KINDS = frozenset({"fatal", "eof", "reset", "timeout", "unreachable", "tls_error", "other", "role_lost"})
STATES = frozenset({"idle", "in_transaction", "request_in_flight"})
PATH_IDLE_MIN_S = 60.0
_NETWORK_KINDS = frozenset({"reset", "timeout", "unreachable"})


@dataclass(frozen=True, slots=True)
class Observed:
    """What the socket said when the upstream ended."""

    kind: str  # one of KINDS
    sqlstate: str | None = None
    severity: str | None = None
    message: str | None = None
    tls_close_notify: bool | None = None
    errno_name: str | None = None
    tls_alert: str | None = None
    tcp_info: Mapping[str, int | float] | None = None


@dataclass(frozen=True, slots=True)
class ReconnectOutcome:
    """What reconnecting taught: errors in order, and how the new connection differs.

    The flags compare the new connection's server facts with the old one's (None: not known);
    "_now" flags mean "now, and not before". `abandoned`: the client left while pgsidecar was
    still reconnecting, so the reconnect neither succeeded nor failed (`succeeded` is False).
    """

    attempts: int
    duration_s: float
    succeeded: bool
    errors: tuple[str, ...] = ()
    postmaster_start_changed: bool | None = None
    in_recovery_seen: bool | None = None  # 57P03 "in recovery mode" while reconnecting: a crash
    certificate_changed: bool | None = None
    address_changed: bool | None = None
    read_only_now: bool | None = None
    in_recovery_now: bool | None = None  # the server reached is a standby, and was not
    timeline_changed: bool | None = None
    system_identifier_changed: bool | None = None
    abandoned: bool | None = None
    replayed: str = ""  # what was replayed on the new connection (session/replay.py's summary)

    @property
    def failed(self) -> bool:
        """The reconnect gave up (deadline, or a refusal such as 28P01); one the client
        abandoned by leaving first did not fail."""
        return not self.succeeded and not self.abandoned


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything `classify` may look at."""

    observed: Observed
    state: str  # one of STATES
    idle_s: float
    age_s: float
    keepalive_idle_s: float | None = None
    user_timeout_s: float | None = None
    reconnect: ReconnectOutcome | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict: primary cause, the facts that decided it, reconnect-phase findings, a hint."""

    cause: DropCause
    evidence: tuple[str, ...]
    hint: str
    secondary: tuple[DropCause, ...] = ()


@dataclass(frozen=True, slots=True)
class PoolerText:
    """One PgBouncer disconnect reason as the client receives it, and the remedy."""

    needle: str
    hint: str


# PgBouncer sends these as ErrorResponse FATAL, SQLSTATE 08P01 unless noted (proto.c
# send_pooler_error). Longer needles first: "idle transaction timeout" before "transaction timeout".
POOLER_TEXTS: tuple[PoolerText, ...] = (
    PoolerText(
        "server conn crashed?",
        "PgBouncer's server connection died under this session (PgBouncer hides the server's"
        ' reason): read PgBouncer\'s log for "closing because" and the server log at that time',
    ),
    PoolerText(
        "client_idle_timeout",
        "PgBouncer's client_idle_timeout closed the idle session: raise it above the app's"
        " longest idle or set client_idle_timeout = 0 in pgbouncer.ini",
    ),
    PoolerText(
        "query_wait_timeout",
        "no PgBouncer server connection was free within query_wait_timeout: raise"
        " default_pool_size / max_db_connections or query_wait_timeout in pgbouncer.ini",
    ),
    PoolerText(
        "query_timeout",
        "PgBouncer's query_timeout ended a long query: raise it in pgbouncer.ini or use"
        " statement_timeout, which does not close the connection",
    ),
    PoolerText(
        "query timeout",
        "PgBouncer's query_timeout ended a long query: raise it in pgbouncer.ini or use"
        " statement_timeout, which does not close the connection",
    ),
    PoolerText(
        "idle transaction timeout",
        "PgBouncer's idle_transaction_timeout closed a transaction left open: commit sooner or"
        " raise idle_transaction_timeout in pgbouncer.ini",
    ),
    PoolerText(
        "transaction timeout",
        "PgBouncer's transaction_timeout ended a long transaction: shorten it or raise"
        " transaction_timeout in pgbouncer.ini",
    ),
    PoolerText(
        "client_login_timeout",
        "login through PgBouncer took longer than client_login_timeout (server down or slow):"
        " check PgBouncer's server connections or raise client_login_timeout",
    ),
    PoolerText(
        "server login has been failing",
        "PgBouncer cannot log in to the server (server_login_retry): check that the server is"
        " up and PgBouncer's credentials and pg_hba.conf entry",
    ),
    PoolerText(
        "pgbouncer cannot connect to server",
        "PgBouncer cannot connect to the server: check that the server is up and PgBouncer's"
        " credentials and pg_hba.conf entry",
    ),
    PoolerText(
        "max_client_conn",
        "PgBouncer refused more clients: raise max_client_conn in pgbouncer.ini",
    ),
    PoolerText(
        "client connections exceeded",
        "PgBouncer refused more clients: raise max_db_client_connections /"
        " max_user_client_connections in pgbouncer.ini",
    ),
    PoolerText(
        "server shutting down",
        "PgBouncer was shut down: restart it with SO_REUSEPORT or online restart (-R) and drain clients first",
    ),
    PoolerText(
        "pooler is shutting down",
        "PgBouncer was shut down: restart it with SO_REUSEPORT or online restart (-R) and drain clients first",
    ),
    PoolerText(
        "admin forced disconnect",
        "someone ran KILL on PgBouncer's admin console: check who administers PgBouncer",
    ),
    PoolerText(
        "database configuration changed",
        "a PgBouncer reload changed this [databases] entry: expect one drop per change",
    ),
    PoolerText(
        "database removed",
        "a PgBouncer reload removed this database from [databases]: restore the entry",
    ),
    PoolerText(
        "suspend_timeout",
        "PgBouncer's SUSPEND (online restart) outlasted suspend_timeout: raise it",
    ),
)


def classify(ev: Evidence) -> Classification:
    """Apply the rules of the module docstring, in order; the first that matches decides."""
    if ev.reconnect is not None and ev.reconnect.attempts == 0 and not ev.reconnect.succeeded:
        ev = replace(ev, reconnect=None)  # no reconnect was tried: it is no evidence of a restart
    cause, evidence, facts = _primary(ev, consider_certificate=True)
    secondary = _secondary(ev, cause)
    if cause is DropCause.CERTIFICATE_ROTATED:
        beneath, _, _ = _primary(ev, consider_certificate=False)
        if beneath is not DropCause.UNKNOWN:
            secondary = (beneath, *secondary)
    return Classification(cause, evidence, _hint(cause, secondary, facts), secondary)


Verdict = tuple[DropCause, tuple[str, ...], dict[str, object]]
Found = tuple[DropCause, tuple[str, ...]] | None  # a rule's verdict, or no match


def _primary(ev: Evidence, *, consider_certificate: bool) -> Verdict:
    obs = ev.observed
    said = _said(obs)
    facts: dict[str, object] = {
        "idle_s": ev.idle_s,
        "keepalive_idle_s": ev.keepalive_idle_s,
        "tls_alert": obs.tls_alert,
        "message": obs.message,
        "sqlstate": obs.sqlstate,
        "errno_name": obs.errno_name,
    }
    r = ev.reconnect
    if r is not None:
        facts["in_recovery_now"] = r.in_recovery_now
        facts["too_many"] = next((e for e in r.errors if _is_too_many(e)), None)
    verdict = _server_timeouts(obs, said) or _pooler(obs, said, facts) or _role_change(ev, said)
    if verdict is None:
        verdict = _crash_said(obs, said)
    if verdict is None and consider_certificate:
        verdict = _certificate(ev, said)
    if verdict is None:
        verdict = _shutdown_or_terminate(ev, said) or _reconnect_signs(ev, said)
    if verdict is None:
        verdict = _network(ev, said)
    cause, evidence = verdict or (DropCause.UNKNOWN, (*said, *_eof_facts(obs)))
    return cause, evidence, facts


def _said(obs: Observed) -> tuple[str, ...]:
    out = [f"kind={obs.kind}"]
    if obs.sqlstate:
        out.append(f"sqlstate={obs.sqlstate}")
    if obs.severity:
        out.append(f"severity={obs.severity}")
    if obs.errno_name:
        out.append(f"errno={obs.errno_name}")
    if obs.tls_alert:
        out.append(f"tls_alert={obs.tls_alert}")
    return tuple(out)


def _eof_facts(obs: Observed) -> tuple[str, ...]:
    if obs.kind != "eof" or obs.tls_close_notify is None:
        return ()
    return ("tls_close_notify" if obs.tls_close_notify else "no_tls_close_notify",)


def _msg(obs: Observed) -> str:
    return (obs.message or "").lower()


_TIMEOUT_RULES: tuple[tuple[str, str, DropCause], ...] = (
    (sqlstate.IDLE_SESSION_TIMEOUT, "idle-session timeout", DropCause.IDLE_SESSION_TIMEOUT),
    (
        sqlstate.IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        "idle-in-transaction timeout",
        DropCause.IDLE_IN_TRANSACTION_TIMEOUT,
    ),
    (sqlstate.TRANSACTION_TIMEOUT, "due to transaction timeout", DropCause.TRANSACTION_TIMEOUT),
)


def _server_timeouts(obs: Observed, said: tuple[str, ...]) -> Found:
    """Rules 1-3: the server named its own timeout (postgres.c ProcessInterrupts)."""
    for code, text, cause in _TIMEOUT_RULES:
        if obs.sqlstate == code:
            return cause, said
        if obs.sqlstate is None and text in _msg(obs):
            return cause, (*said, f"message~{text}")
    return None


def pooler_text(message: str | None, code: str | None) -> PoolerText | None:
    """The PgBouncer reason in an ErrorResponse, if it is one (SQLSTATE `code` 08P01 or absent)."""
    if not message or code not in (None, sqlstate.PROTOCOL_VIOLATION):
        return None
    low = message.lower()
    for entry in POOLER_TEXTS:
        if entry.needle in low:
            return entry
    return None


def _pooler(obs: Observed, said: tuple[str, ...], facts: dict[str, object]) -> Found:
    """Rule 4."""
    entry = pooler_text(obs.message, obs.sqlstate)
    if entry is None:
        return None
    facts["pooler_hint"] = entry.hint
    return DropCause.UPSTREAM_POOLER, (*said, f"pooler_text={entry.needle}")


# Facts that say the reconnect reached another server; each is void when the postmaster start
# time is unchanged (the same process answered, whatever its address or role says now).
_OTHER_SERVER = ("system_identifier_changed", "address_changed", "in_recovery_now", "timeline_changed")


def _role_change(ev: Evidence, said: tuple[str, ...]) -> Found:
    """Rule 5: another server serves this upstream now; how the old one left tells switchover
    (a clean shutdown) from failover (it vanished)."""
    r = ev.reconnect
    if ev.observed.kind == "role_lost":
        # pgsidecar left a writer that is one no more (25006, or in recovery): the writer moved.
        return DropCause.FAILOVER, (*said, "role_lost", *(n for n in _OTHER_SERVER if r and getattr(r, n) is True))
    if r is None or r.postmaster_start_changed is False:
        return None
    found = [name for name in _OTHER_SERVER if getattr(r, name) is True]
    if not found:
        return None
    if r.postmaster_start_changed:
        found.insert(0, "postmaster_start_changed")
    obs, first = ev.observed, _first_error(r)
    vanished = any(text in _msg(obs) for text in ("immediate shutdown", "unexpected postmaster exit"))
    if vanished:
        # An immediate stop still answers "shutting down" for a moment: what the session was
        # told first decides, not the reconnect's first refusal.
        return DropCause.FAILOVER, (*said, *found)
    if _is_57p01(obs):
        return DropCause.SWITCHOVER, (*said, *found)
    if first.startswith(sqlstate.CANNOT_CONNECT_NOW) and "shutting down" in first.lower():
        return DropCause.SWITCHOVER, (*said, "reconnect_first_error=57P03", *found)
    return DropCause.FAILOVER, (*said, *found)


def _crash_said(obs: Observed, said: tuple[str, ...]) -> Found:
    """Rule 6: postmaster.c sends 57P02 to every backend when another one crashes."""
    msg = _msg(obs)
    if obs.sqlstate == sqlstate.CRASH_SHUTDOWN:
        return DropCause.SERVER_CRASH, said
    if "crash of another server process" in msg:
        return DropCause.SERVER_CRASH, (*said, "message~crash of another server process")
    if "unexpected postmaster exit" in msg:
        return DropCause.SERVER_CRASH, (*said, "message~unexpected postmaster exit")
    return None


def _certificate(ev: Evidence, said: tuple[str, ...]) -> Found:
    """Rule 7."""
    r = ev.reconnect
    if r is None or r.certificate_changed is not True or ev.observed.kind in _NETWORK_KINDS:
        return None
    return DropCause.CERTIFICATE_ROTATED, (*said, "certificate_changed")


def _is_57p01(obs: Observed) -> bool:
    return obs.sqlstate == sqlstate.ADMIN_SHUTDOWN or (
        obs.sqlstate is None and "terminating connection due to administrator command" in _msg(obs)
    )


def _shutdown_or_terminate(ev: Evidence, said: tuple[str, ...]) -> Found:
    """Rules 8-11: 57P01 means pg_terminate_backend or a shutdown; the reconnect tells which."""
    obs = ev.observed
    if "immediate shutdown" in _msg(obs):
        return DropCause.SERVER_RESTART, (*said, "message~immediate shutdown")
    recovery = _recovery_seen(ev.reconnect)
    if recovery:
        return DropCause.SERVER_CRASH, (*said, *recovery)
    if not _is_57p01(obs):
        return None
    restart = _restart_signs(ev.reconnect)
    r = ev.reconnect
    if not restart and r is not None and r.failed:
        restart = ("reconnect_failed",)
    if restart:
        return DropCause.SERVER_RESTART, (*said, *restart)
    if r is None:
        return DropCause.ADMIN_TERMINATE, (*said, "no_reconnect")
    facts = ["postmaster_unchanged"] if r.postmaster_start_changed is False else []
    if r.abandoned:
        facts.append("reconnect_abandoned")
    facts.append(f"reconnect_attempts={r.attempts}")
    return DropCause.ADMIN_TERMINATE, (*said, *facts)


def _reconnect_signs(ev: Evidence, said: tuple[str, ...]) -> Found:
    """Rule 12."""
    restart = _restart_signs(ev.reconnect)
    return (DropCause.SERVER_RESTART, (*said, *restart)) if restart else None


def _first_error(r: ReconnectOutcome | None) -> str:
    return r.errors[0] if r is not None and r.errors else ""


def _restart_signs(r: ReconnectOutcome | None) -> tuple[str, ...]:
    """postmaster.c canAcceptConnections: 'starting up' / 'shutting down' mean a (re)start."""
    if r is None:
        return ()
    if r.postmaster_start_changed is True:
        return ("postmaster_start_changed",)
    first = _first_error(r)
    low = first.lower()
    if first.startswith(sqlstate.CANNOT_CONNECT_NOW) and "recovery mode" not in low:
        return (f"reconnect_first_error={sqlstate.CANNOT_CONNECT_NOW}",)
    if "econnrefused" in low or "connection refused" in low:
        return ("reconnect_first_error=ECONNREFUSED",)
    return ()


def _recovery_seen(r: ReconnectOutcome | None) -> tuple[str, ...]:
    """After a crash the postmaster answers 57P03 'the database system is in recovery mode'
    (CAC_RECOVERY); a standby is in recovery too, but says 'not yet accepting connections'
    until it is consistent and then accepts them: in_recovery_now is no crash evidence."""
    if r is None:
        return ()
    if r.in_recovery_seen is True:
        return ("in_recovery_seen",)
    for err in r.errors:
        if err.startswith(sqlstate.CANNOT_CONNECT_NOW) and "recovery mode" in err.lower():
            return ("in_recovery_seen",)
    return ()


def flow_silence_s(ev: Evidence) -> float:
    """How long a middlebox saw no packet: keepalive probes refresh its state, data does too."""
    if ev.keepalive_idle_s is None or ev.keepalive_idle_s <= 0:
        return ev.idle_s
    return min(ev.idle_s, ev.keepalive_idle_s)


def _network(ev: Evidence, said: tuple[str, ...]) -> Found:
    """Rules 13-16."""
    kind = ev.observed.kind
    if kind == "tls_error":
        return DropCause.TLS_ERROR, said
    if kind not in _NETWORK_KINDS:
        return None
    tcp = _tcp_facts(ev.observed.tcp_info)
    silence = flow_silence_s(ev)
    r = ev.reconnect
    path_ok = r is None or not r.failed
    if kind in ("timeout", "reset") and silence >= PATH_IDLE_MIN_S and path_ok:
        keep = "off" if ev.keepalive_idle_s is None else f"{ev.keepalive_idle_s:g}"
        facts = (f"idle_s={ev.idle_s:.1f}", f"keepalive_idle_s={keep}", *tcp)
        return DropCause.PATH_IDLE_TIMEOUT, (*said, *facts)
    if kind == "reset":
        return DropCause.NETWORK_RESET, (*said, *tcp)
    if r is not None and r.failed:
        tcp = (*tcp, "reconnect_failed")
    return DropCause.NETWORK_TIMEOUT, (*said, *tcp)


def _tcp_facts(info: Mapping[str, int | float] | None) -> tuple[str, ...]:
    if not info:
        return ()
    keys = ("probes", "retransmits", "backoff")
    present = [k for k in keys if isinstance(info.get(k), int | float) and info[k]]
    return tuple(f"{k}={info[k]:g}" for k in present)


def _is_too_many(err: str) -> bool:
    low = err.lower()
    return (
        err.startswith(sqlstate.TOO_MANY_CONNECTIONS)
        or "too many clients" in low
        or "too many connections" in low
        or "remaining connection slots" in low
    )


def _secondary(ev: Evidence, primary: DropCause) -> tuple[DropCause, ...]:
    r = ev.reconnect
    out: list[DropCause] = []
    if r is not None and any(_is_too_many(e) for e in r.errors):
        out.append(DropCause.TOO_MANY_CONNECTIONS)
    moved = primary in (DropCause.FAILOVER, DropCause.SWITCHOVER)  # another server: all differs
    if r is not None and r.certificate_changed is True and primary is not DropCause.CERTIFICATE_ROTATED and not moved:
        out.append(DropCause.CERTIFICATE_ROTATED)
    if r is not None and r.read_only_now is True and not moved:
        out.append(DropCause.SERVER_READ_ONLY)
    return tuple(out)


def _hint(cause: DropCause, secondary: tuple[DropCause, ...], facts: Mapping[str, object]) -> str:
    hint = hint_for(cause, facts)
    extra = [hint_for(c, facts) for c in secondary if c is not cause]
    return "; also ".join([hint, *extra]) if extra else hint
