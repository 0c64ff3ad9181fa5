"""classify(): a table of evidence -> cause, one row (at least) per rule of the module docstring."""

from __future__ import annotations

import pytest

from pgsidecar.drops.causes import DropCause, hint_for
from pgsidecar.drops.classify import (
    POOLER_TEXTS,
    Evidence,
    Observed,
    ReconnectOutcome,
    classify,
    pooler_text,
)

C = DropCause
ADMIN = "terminating connection due to administrator command"


def fatal(sqlstate: str, message: str, severity: str = "FATAL") -> Observed:
    return Observed("fatal", sqlstate=sqlstate, severity=severity, message=message)


def warn_eof(sqlstate: str, message: str) -> Observed:
    """PostgreSQL 14+: WARNING, then EOF, no FATAL."""
    return Observed("eof", sqlstate=sqlstate, severity="WARNING", message=message, tls_close_notify=False)


def ok(attempts: int = 1, **flags: object) -> ReconnectOutcome:
    errors = tuple(flags.pop("errors", ()))  # type: ignore[arg-type]
    return ReconnectOutcome(attempts, 0.01 * attempts, True, errors, **flags)  # type: ignore[arg-type]


def failed(*errors: str) -> ReconnectOutcome:
    return ReconnectOutcome(len(errors) or 1, 30.0, False, tuple(errors))


def abandoned(*errors: str, **flags: object) -> ReconnectOutcome:
    """The client left while pgsidecar was still reconnecting."""
    return ReconnectOutcome(len(errors) + 1, 1.5, False, tuple(errors), abandoned=True, **flags)  # type: ignore[arg-type]


def ev(
    obs: Observed,
    reconnect: ReconnectOutcome | None = None,
    *,
    idle: float = 5.0,
    state: str = "idle",
    keepalive: float | None = 10.0,
) -> Evidence:
    return Evidence(obs, state, idle, 3600.0, keepalive, 24.5 if keepalive else None, reconnect)


EOF_BARE = Observed("eof", tls_close_notify=False)
RESET = Observed("reset", errno_name="ECONNRESET")
TIMEOUT = Observed("timeout", errno_name="ETIMEDOUT", tcp_info={"probes": 3, "retransmits": 0})
STARTING = "57P03 the database system is starting up"
SHUTTING_DOWN = "57P03 the database system is shutting down"
RECOVERY = "57P03 the database system is in recovery mode"
NOT_YET = "57P03 the database system is not yet accepting connections"
IMMEDIATE = "terminating connection due to immediate shutdown command"
CRASH = "terminating connection because of crash of another server process"
# What the new connection found when another server took over the upstream's address.
STANDBY_NOW = {
    "postmaster_start_changed": True,
    "in_recovery_now": True,
    "read_only_now": True,
    "system_identifier_changed": False,
}
PROMOTED_NOW = {
    "postmaster_start_changed": True,
    "in_recovery_now": False,
    "timeline_changed": True,
    "system_identifier_changed": False,
}

TABLE: list[tuple[str, Evidence, DropCause]] = [
    # 1-3: the server named its own timeout
    (
        "57P05",
        ev(fatal("57P05", "terminating connection due to idle-session timeout")),
        C.IDLE_SESSION_TIMEOUT,
    ),
    (
        "57P05 text only",
        ev(Observed("fatal", message="terminating connection due to idle-session timeout")),
        C.IDLE_SESSION_TIMEOUT,
    ),
    (
        "25P03",
        ev(
            fatal("25P03", "terminating connection due to idle-in-transaction timeout"),
            state="in_transaction",
        ),
        C.IDLE_IN_TRANSACTION_TIMEOUT,
    ),
    (
        "25P04",
        ev(
            fatal("25P04", "terminating connection due to transaction timeout"),
            state="in_transaction",
        ),
        C.TRANSACTION_TIMEOUT,
    ),
    (
        "57P05 beats a failover seen later",
        ev(fatal("57P05", "x"), ok(address_changed=True)),
        C.IDLE_SESSION_TIMEOUT,
    ),
    # 4: PgBouncer
    (
        "pgbouncer server conn crashed",
        ev(fatal("08P01", "server conn crashed?")),
        C.UPSTREAM_POOLER,
    ),
    ("pgbouncer client_idle_timeout", ev(fatal("08P01", "client_idle_timeout")), C.UPSTREAM_POOLER),
    (
        "pgbouncer query_wait_timeout",
        ev(fatal("08P01", "query_wait_timeout"), state="request_in_flight"),
        C.UPSTREAM_POOLER,
    ),
    (
        "pgbouncer idle transaction timeout",
        ev(fatal("08P01", "idle transaction timeout"), state="in_transaction"),
        C.UPSTREAM_POOLER,
    ),
    (
        "pgbouncer login failing",
        ev(fatal("08P01", "server login has been failing, try again later (server_login_retry)")),
        C.UPSTREAM_POOLER,
    ),
    (
        "pgbouncer cannot connect (old)",
        ev(fatal("08P01", "pgbouncer cannot connect to server")),
        C.UPSTREAM_POOLER,
    ),
    # 5: another server now: switchover (clean shutdown first) or failover (it vanished)
    ("address changed", ev(EOF_BARE, ok(address_changed=True)), C.FAILOVER),
    (
        "failover beats certificate change",
        ev(EOF_BARE, ok(address_changed=True, certificate_changed=True)),
        C.FAILOVER,
    ),
    (
        "fast shutdown, then a standby at the same address",
        ev(fatal("57P01", ADMIN), ok(4, errors=["ECONNREFUSED", NOT_YET], **STANDBY_NOW)),
        C.SWITCHOVER,
    ),
    (
        "fast shutdown, then a promoted standby",
        ev(fatal("57P01", ADMIN), ok(3, errors=["ECONNREFUSED"] * 2, **PROMOTED_NOW)),
        C.SWITCHOVER,
    ),
    (
        "57P01 text only, then another cluster",
        ev(Observed("fatal", message=ADMIN), ok(postmaster_start_changed=True, system_identifier_changed=True)),
        C.SWITCHOVER,
    ),
    (
        "57P01, then a standby, start time unknown",
        ev(fatal("57P01", ADMIN), ok(in_recovery_now=True)),
        C.SWITCHOVER,
    ),
    (
        "eof, first error shutting down, then a promoted standby",
        ev(EOF_BARE, ok(3, errors=[SHUTTING_DOWN, "ECONNREFUSED"], **PROMOTED_NOW)),
        C.SWITCHOVER,
    ),
    (
        "immediate shutdown, then a promoted standby",
        ev(warn_eof("57P01", IMMEDIATE), ok(5, errors=["ECONNREFUSED"] * 4, **PROMOTED_NOW)),
        C.FAILOVER,
    ),
    (
        # Seen in CI: an immediate stop still says "shutting down" to the first reconnect.
        "immediate shutdown, first error shutting down, then a promoted standby",
        ev(warn_eof("57P01", IMMEDIATE), ok(3, errors=[SHUTTING_DOWN, "ECONNREFUSED"], **PROMOTED_NOW)),
        C.FAILOVER,
    ),
    (
        "crash, then a standby (not the crash of this server)",
        ev(warn_eof("57P02", CRASH), ok(2, errors=["ECONNREFUSED"], **STANDBY_NOW)),
        C.FAILOVER,
    ),
    (
        "postmaster died, then a promoted standby",
        ev(fatal("57P01", "terminating connection due to unexpected postmaster exit"), ok(2, **PROMOTED_NOW)),
        C.FAILOVER,
    ),
    (
        "path timeout, then a standby",
        ev(TIMEOUT, ok(3, errors=["ETIMEDOUT"], **STANDBY_NOW), idle=25.0),
        C.FAILOVER,
    ),
    (
        "same postmaster at another address is the same server",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, address_changed=True)),
        C.ADMIN_TERMINATE,
    ),
    (
        "same postmaster on a new timeline is the same server",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, timeline_changed=True)),
        C.ADMIN_TERMINATE,
    ),
    (
        "same postmaster in recovery now: no crash without crash evidence",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, in_recovery_now=True)),
        C.ADMIN_TERMINATE,
    ),
    (
        "read-only now, same server: not a failover",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, read_only_now=True)),
        C.ADMIN_TERMINATE,
    ),
    (
        "restart, read-only now, same timeline: a restart",
        ev(
            fatal("57P01", ADMIN),
            ok(
                3,
                errors=["ECONNREFUSED"],
                postmaster_start_changed=True,
                read_only_now=True,
                in_recovery_now=False,
                timeline_changed=False,
            ),
        ),
        C.SERVER_RESTART,
    ),
    # 6: crash said
    (
        "57P02 warning then eof",
        ev(warn_eof("57P02", "terminating connection because of crash of another server process")),
        C.SERVER_CRASH,
    ),
    (
        "crash text, no sqlstate",
        ev(Observed("eof", message="terminating connection because of crash of another server process")),
        C.SERVER_CRASH,
    ),
    (
        "postmaster died",
        ev(fatal("57P01", "terminating connection due to unexpected postmaster exit")),
        C.SERVER_CRASH,
    ),
    # 7: certificate rotated
    (
        "new certificate after terminate",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, certificate_changed=True)),
        C.CERTIFICATE_ROTATED,
    ),
    (
        "new certificate after restart",
        ev(
            fatal("57P01", ADMIN),
            ok(3, errors=[STARTING], postmaster_start_changed=True, certificate_changed=True),
        ),
        C.CERTIFICATE_ROTATED,
    ),
    (
        "new certificate after bare eof",
        ev(EOF_BARE, ok(certificate_changed=True)),
        C.CERTIFICATE_ROTATED,
    ),
    # 8: immediate shutdown
    (
        "immediate shutdown warning",
        ev(warn_eof("57P01", "terminating connection due to immediate shutdown command")),
        C.SERVER_RESTART,
    ),
    # 9: recovery seen
    (
        "bare eof then recovery mode",
        ev(EOF_BARE, ok(4, errors=[RECOVERY, RECOVERY, "ECONNREFUSED"])),
        C.SERVER_CRASH,
    ),
    ("reset then in_recovery flag", ev(RESET, ok(in_recovery_seen=True)), C.SERVER_CRASH),
    (
        "kill -9: 57P03 recovery mode while the postmaster stays",
        ev(
            EOF_BARE,
            ok(
                3,
                errors=["eof", RECOVERY],
                postmaster_start_changed=False,
                in_recovery_now=False,
                timeline_changed=False,
            ),
        ),
        C.SERVER_CRASH,
    ),
    (
        "a standby's not-yet-consistent refusal is a (re)start, not a crash",
        ev(RESET, ok(3, errors=[NOT_YET, NOT_YET]), idle=2.0),
        C.SERVER_RESTART,
    ),
    # 10: 57P01 with restart signs
    (
        "57P01 + postmaster changed",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=True)),
        C.SERVER_RESTART,
    ),
    (
        "57P01 + 57P03 starting up first",
        ev(fatal("57P01", ADMIN), ok(3, errors=[STARTING, STARTING])),
        C.SERVER_RESTART,
    ),
    (
        "57P01 + refused first",
        ev(fatal("57P01", ADMIN), ok(5, errors=["ECONNREFUSED"] * 4)),
        C.SERVER_RESTART,
    ),
    (
        "57P01 + reconnect never succeeded",
        ev(fatal("57P01", ADMIN), failed("ETIMEDOUT")),
        C.SERVER_RESTART,
    ),
    (
        "57P01 + abandoned after refused first: the refusal decides",
        ev(fatal("57P01", ADMIN), abandoned("ECONNREFUSED")),
        C.SERVER_RESTART,
    ),
    # 11: 57P01 otherwise
    (
        "57P01, server unchanged, at once",
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False)),
        C.ADMIN_TERMINATE,
    ),
    ("57P01, no reconnect evidence", ev(fatal("57P01", ADMIN)), C.ADMIN_TERMINATE),
    ("57P01 text only", ev(Observed("fatal", message=ADMIN), ok()), C.ADMIN_TERMINATE),
    ("57P01, client left during the reconnect", ev(fatal("57P01", ADMIN), abandoned()), C.ADMIN_TERMINATE),
    (
        "57P01, client left while the role was refused",
        ev(fatal("57P01", ADMIN), abandoned('53300 too many connections for role "app"')),
        C.ADMIN_TERMINATE,
    ),
    # 12: restart signs after a plain end
    (
        "bare eof + postmaster changed",
        ev(EOF_BARE, ok(2, errors=["ECONNREFUSED"], postmaster_start_changed=True)),
        C.SERVER_RESTART,
    ),
    ("bare eof + 57P03 first", ev(EOF_BARE, ok(2, errors=[STARTING])), C.SERVER_RESTART),
    (
        "reset + refused first",
        ev(RESET, ok(2, errors=["ECONNREFUSED connection refused"])),
        C.SERVER_RESTART,
    ),
    # 13: TLS
    ("tls alert", ev(Observed("tls_error", tls_alert="bad_record_mac")), C.TLS_ERROR),
    # 14: path idle timeout
    (
        "timeout after 350 s idle, keepalives off",
        ev(TIMEOUT, ok(), idle=352.0, keepalive=None, state="request_in_flight"),
        C.PATH_IDLE_TIMEOUT,
    ),
    (
        "timeout with keepalive 600 s",
        ev(TIMEOUT, ok(), idle=640.0, keepalive=600.0),
        C.PATH_IDLE_TIMEOUT,
    ),
    (
        "reset after long silence (NAT RST)",
        ev(RESET, ok(), idle=400.0, keepalive=None, state="request_in_flight"),
        C.PATH_IDLE_TIMEOUT,
    ),
    # 15: reset
    ("reset, short keepalive", ev(RESET, ok(), idle=400.0, keepalive=10.0), C.NETWORK_RESET),
    ("reset, short idle", ev(RESET, ok(), idle=2.0, keepalive=None), C.NETWORK_RESET),
    # 16: timeout / unreachable
    (
        "keepalive expiry with short keepalive, long idle",
        ev(TIMEOUT, ok(), idle=300.0, keepalive=10.0),
        C.NETWORK_TIMEOUT,
    ),
    ("keepalive expiry, short idle", ev(TIMEOUT, ok(), idle=25.0), C.NETWORK_TIMEOUT),
    (
        "long silence but the path stays dead",
        ev(TIMEOUT, failed("ETIMEDOUT"), idle=400.0, keepalive=None),
        C.NETWORK_TIMEOUT,
    ),
    (
        "long silence, client left during the reconnect: no proof the path is dead",
        ev(TIMEOUT, abandoned(), idle=400.0, keepalive=None),
        C.PATH_IDLE_TIMEOUT,
    ),
    ("unreachable", ev(Observed("unreachable", errno_name="EHOSTUNREACH")), C.NETWORK_TIMEOUT),
    # 17: unknown
    ("bare eof, server unchanged", ev(EOF_BARE, ok(postmaster_start_changed=False)), C.UNKNOWN),
    ("eof with close_notify", ev(Observed("eof", tls_close_notify=True), ok()), C.UNKNOWN),
    (
        "other FATAL",
        ev(fatal("57P04", "terminating connection because database was dropped"), ok()),
        C.UNKNOWN,
    ),
    (
        "08P01 from postgres itself is not a pooler",
        ev(fatal("08P01", "invalid frontend message type 0")),
        C.UNKNOWN,
    ),
    ("other kind", ev(Observed("other", errno_name="EBADF")), C.UNKNOWN),
]


@pytest.mark.parametrize(("name", "evidence", "cause"), TABLE, ids=[row[0] for row in TABLE])
def test_table(name: str, evidence: Evidence, cause: DropCause) -> None:
    got = classify(evidence)
    assert got.cause is cause, (name, got)
    assert got.hint
    assert all(isinstance(e, str) and e for e in got.evidence)


def test_every_cause_but_the_secondary_only_ones_has_a_row() -> None:
    covered = {row[2] for row in TABLE}
    # What a reconnect finds, never why the connection ended: tested below.
    assert set(DropCause) - covered == {C.TOO_MANY_CONNECTIONS, C.SERVER_READ_ONLY}


def test_abandoned_reconnect_is_no_restart_sign_nor_failure() -> None:
    """Issue 10 item 7: a client that leaves mid-reconnect after pg_terminate_backend."""
    got = classify(ev(fatal("57P01", ADMIN), abandoned('53300 too many connections for role "app"')))
    assert got.cause is C.ADMIN_TERMINATE
    assert "reconnect_abandoned" in got.evidence and "reconnect_failed" not in got.evidence
    assert got.secondary == (C.TOO_MANY_CONNECTIONS,)
    assert "CONNECTION LIMIT" in got.hint and "max_connections" not in got.hint
    got = classify(ev(TIMEOUT, abandoned(), idle=25.0))
    assert got.cause is C.NETWORK_TIMEOUT and "reconnect_failed" not in got.evidence
    assert not ReconnectOutcome(1, 1.0, False, abandoned=True).failed
    assert ReconnectOutcome(1, 1.0, False).failed and not ReconnectOutcome(1, 1.0, True).failed


def test_switchover_and_failover_name_their_facts() -> None:
    got = classify(ev(fatal("57P01", ADMIN), ok(3, **STANDBY_NOW)))
    assert got.cause is C.SWITCHOVER
    assert "postmaster_start_changed" in got.evidence and "in_recovery_now" in got.evidence
    assert "standby" in got.hint and "25006" in got.hint and "was shut down" in got.hint
    assert got.secondary == ()  # read-only and a new certificate are part of the move
    got = classify(ev(warn_eof("57P01", IMMEDIATE), ok(3, certificate_changed=True, **PROMOTED_NOW)))
    assert got.cause is C.FAILOVER and got.secondary == ()
    assert "timeline_changed" in got.evidence and "in_recovery_now" not in got.evidence
    assert "standby" not in got.hint and "without a clean shutdown" in got.hint
    got = classify(ev(EOF_BARE, ok(2, errors=[SHUTTING_DOWN], **PROMOTED_NOW)))
    assert got.cause is C.SWITCHOVER and "reconnect_first_error=57P03" in got.evidence


def test_read_only_now_on_the_same_server_is_a_secondary_finding() -> None:
    got = classify(ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, read_only_now=True)))
    assert got.cause is C.ADMIN_TERMINATE and got.secondary == (C.SERVER_READ_ONLY,)
    assert "default_transaction_read_only" in got.hint and "25006" in got.hint
    got = classify(
        ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=False, in_recovery_now=True, read_only_now=True))
    )
    assert got.cause is C.ADMIN_TERMINATE and got.secondary == (C.SERVER_READ_ONLY,)
    assert "standby" in got.hint and C.SERVER_CRASH not in got.secondary


def test_every_cause_has_phrase_and_hint() -> None:
    for cause in DropCause:
        assert cause.phrase and cause.hint
        assert "\n" not in cause.hint and not cause.hint.endswith(".")  # callers add the stop


def test_too_many_connections_is_secondary_and_primary_kept() -> None:
    r = ok(4, errors=["53300 sorry, too many clients already"] * 3, postmaster_start_changed=False)
    got = classify(ev(fatal("57P01", ADMIN), r))
    assert got.cause is C.ADMIN_TERMINATE
    assert got.secondary == (C.TOO_MANY_CONNECTIONS,)
    assert "max_connections" in got.hint


def test_remaining_slots_text_counts_as_too_many() -> None:
    r = failed("FATAL remaining connection slots are reserved for roles with the SUPERUSER attribute")
    got = classify(ev(EOF_BARE, r))
    assert C.TOO_MANY_CONNECTIONS in got.secondary


def test_certificate_rotation_keeps_the_drop_cause_as_secondary() -> None:
    r = ok(3, errors=[STARTING], postmaster_start_changed=True, certificate_changed=True)
    got = classify(ev(fatal("57P01", ADMIN), r))
    assert got.cause is C.CERTIFICATE_ROTATED
    assert got.secondary == (C.SERVER_RESTART,)
    assert "certificate_changed" in got.evidence


def test_certificate_change_after_network_end_is_secondary() -> None:
    got = classify(ev(RESET, ok(certificate_changed=True), idle=2.0))
    assert got.cause is C.NETWORK_RESET
    assert got.secondary == (C.CERTIFICATE_ROTATED,)


def test_evidence_names_the_deciding_facts() -> None:
    got = classify(ev(fatal("57P01", ADMIN), ok(postmaster_start_changed=True)))
    assert "sqlstate=57P01" in got.evidence and "postmaster_start_changed" in got.evidence
    got = classify(ev(fatal("57P01", ADMIN), ok(2, errors=[STARTING])))
    assert "reconnect_first_error=57P03" in got.evidence
    got = classify(ev(TIMEOUT, ok(), idle=352.0, keepalive=None))
    assert "keepalive_idle_s=off" in got.evidence and "probes=3" in got.evidence
    got = classify(ev(fatal("08P01", "client_idle_timeout")))
    assert "pooler_text=client_idle_timeout" in got.evidence


def test_path_idle_hint_is_templated_with_the_facts() -> None:
    got = classify(ev(TIMEOUT, ok(), idle=352.0, keepalive=None))
    assert "352 s" in got.hint and "keepalives are off" in got.hint
    assert "upstream.keepalive.idle" in got.hint
    got = classify(ev(TIMEOUT, ok(), idle=640.0, keepalive=600.0))
    assert "600 s now" in got.hint


def test_pooler_hint_names_the_pooler_setting() -> None:
    assert "client_idle_timeout" in classify(ev(fatal("08P01", "client_idle_timeout"))).hint
    assert "default_pool_size" in classify(ev(fatal("08P01", "query_wait_timeout"))).hint
    hint = classify(ev(fatal("08P01", "idle transaction timeout"))).hint
    assert "idle_transaction_timeout" in hint


def test_pooler_texts_match_longest_first() -> None:
    entry = pooler_text("idle transaction timeout", "08P01")
    assert entry is not None and entry.needle == "idle transaction timeout"
    assert pooler_text("client_idle_timeout", "57P01") is None  # not PgBouncer's SQLSTATE
    needles = [p.needle for p in POOLER_TEXTS]
    assert len(needles) == len(set(needles))


def test_server_crash_hint_names_oom_killer() -> None:
    hint = classify(ev(warn_eof("57P02", "terminating connection because of crash"))).hint
    assert "terminated by signal 9" in hint and "dmesg" in hint


def test_unknown_hint_quotes_the_server() -> None:
    got = classify(ev(fatal("57P04", "terminating connection because database was dropped")))
    assert "database was dropped" in got.hint and "57P04" in got.hint


def test_hint_for_falls_back_without_facts() -> None:
    for cause in DropCause:
        assert hint_for(cause, {}) == cause.hint


def test_classify_is_pure_and_deterministic() -> None:
    e = ev(TIMEOUT, ok(), idle=352.0, keepalive=None)
    assert classify(e) == classify(e)
