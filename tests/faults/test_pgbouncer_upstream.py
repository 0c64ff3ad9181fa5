"""A real PgBouncer between pgsidecar and PostgreSQL: the pooler's own last words, recorded as such.

Facts checked against the installed PgBouncer (1.18) before building on them, each by a raw
protocol client (`RawSession`) in the test itself, so a newer PgBouncer that says something else
fails here instead of being guessed at:

- `client_idle_timeout` fires only for clients without a linked server connection: in session
  mode an idle client keeps its server link and is never timed out (janitor.c skips linked
  clients), so that test uses `pool_mode = transaction`. PgBouncer then sends FATAL 08P01
  "client_idle_timeout" and closes.
- `pg_terminate_backend` on the server connection of an idle session-mode client: PgBouncer
  forwards the server's FATAL 57P01, then sends its own FATAL 08P01 "server conn crashed?" and
  closes the client.
- the same in transaction mode: the idle client is not linked, so PgBouncer says nothing to it;
  its next query simply gets a new server connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from pgsidecar.drops.classify import Evidence, Observed, classify
from tests.fixtures.faults import CLASSIC_KW, request, wait_until
from tests.fixtures.pgbouncer import ErrorSeen, PgBouncerProcess, RawSession
from tests.fixtures.postgres import PgCluster

pytestmark = [pytest.mark.server, pytest.mark.faults]

IDLE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def bouncer_pg(pg_factory: Any) -> Iterator[PgCluster]:
    """One private cluster for this module: the tests only terminate their own backends."""
    cluster = pg_factory()
    yield cluster
    cluster.destroy()


def _app(sidecar: Any, cluster: PgCluster, name: str) -> psycopg2.extensions.connection:
    kw = {**CLASSIC_KW, "application_name": name}
    return psycopg2.connect(sidecar.dsn(password=cluster.users["app"], **kw))


def _server_pid(conn: psycopg2.extensions.connection) -> int:
    return int(request(conn, "SELECT pg_backend_pid()")[0][0])


def _probe(bouncer: PgBouncerProcess, cluster: PgCluster, fault: Any, timeout: float) -> tuple[bool, list[ErrorSeen]]:
    """What PgBouncer says to an idle raw client when `fault(server_pid)` happens."""
    probe = RawSession.open(bouncer.port, "app", cluster.users["app"], application_name="rawprobe")
    try:
        pid = int(probe.query("SELECT pg_backend_pid()")[0][0])
        fault(pid)
        closed = probe.read_until_closed(timeout)
        return closed, list(probe.seen)
    finally:
        probe.close()


def test_client_idle_timeout_is_upstream_pooler(bouncer_pg, pgbouncer_factory, sidecar_factory):
    bouncer = pgbouncer_factory(bouncer_pg, pool_mode="transaction", settings={"client_idle_timeout": IDLE_TIMEOUT_S})
    closed, seen = _probe(bouncer, bouncer_pg, lambda pid: None, timeout=IDLE_TIMEOUT_S + 3)
    said = [(e.severity, e.sqlstate, e.message) for e in seen]
    assert closed and said == [("FATAL", "08P01", "client_idle_timeout")], said

    sidecar = sidecar_factory(bouncer.upstream_dsn())
    conn = _app(sidecar, bouncer_pg, "pooled_idle")
    _server_pid(conn)
    last_request = time.monotonic()
    drops = sidecar.wait_drops(1, timeout=IDLE_TIMEOUT_S + 5)
    detected = time.monotonic() - last_request
    assert drops, f"no drop record; sidecar log tail:\n{sidecar.logs()[-3000:]}"
    # The app's next request works: the sidecar reconnected through PgBouncer meanwhile.
    assert _server_pid(conn) > 0
    drop = drops[0]
    assert drop["observed"]["sqlstate"] == "08P01", drop["observed"]
    assert drop["observed"]["message"] == "client_idle_timeout", drop["observed"]
    assert drop["cause"] == "upstream_pooler", drop
    assert "pooler_text=client_idle_timeout" in drop["evidence"]
    assert "client_idle_timeout" in drop["hint"] and "pgbouncer.ini" in drop["hint"], drop["hint"]
    assert drop["state"] == "idle" and drop["impact"] == "transparent", drop
    assert drop["reconnect"]["succeeded"] is True
    # PgBouncer's janitor fires a little after the timeout; idle_s is the silence it measured.
    assert IDLE_TIMEOUT_S - 0.2 <= drop["idle_s"] <= detected + 0.5, (drop["idle_s"], detected)
    assert "closing because: client_idle_timeout" in bouncer.logs()
    # Every later record (the sidecar's new connection idles out too) is the same pooler event.
    for later in sidecar.drops():
        assert later["cause"] == "upstream_pooler" and later["observed"]["message"] == "client_idle_timeout"
    conn.close()


def _bouncer_rig(cluster: PgCluster, pgbouncer_factory: Any, sidecar_factory: Any, mode: str):
    bouncer = pgbouncer_factory(cluster, pool_mode=mode)
    sidecar = sidecar_factory(bouncer.upstream_dsn())
    return bouncer, sidecar


def test_server_conn_terminated_under_idle_session(bouncer_pg, pgbouncer_factory, sidecar_factory):
    """Session mode: record exactly PgBouncer's words and classify them, nothing more."""
    bouncer, sidecar = _bouncer_rig(bouncer_pg, pgbouncer_factory, sidecar_factory, "session")
    closed, seen = _probe(bouncer, bouncer_pg, bouncer_pg.terminate, timeout=5)
    said = [(e.sqlstate, e.message) for e in seen if e.kind == "E"]
    assert closed, "PgBouncer kept the idle session-mode client after its server died"
    assert said == [
        ("57P01", "terminating connection due to administrator command"),
        ("08P01", "server conn crashed?"),
    ], said

    conn = _app(sidecar, bouncer_pg, "pooled_session")
    old = _server_pid(conn)
    assert bouncer_pg.terminate(old)
    drops = sidecar.wait_drops(1, timeout=10)
    assert drops, f"no drop record; sidecar log tail:\n{sidecar.logs()[-3000:]}"
    new = _server_pid(conn)  # transparent: the next request runs on a new server connection
    assert new != old
    time.sleep(0.3)
    drops = sidecar.drops()
    assert len(drops) == 1, drops
    drop = drops[0]
    obs = drop["observed"]
    # The record holds PgBouncer's last words (the FATAL right before the close), and the cause
    # is what the classifier's rules make of exactly those words (classify.py: "the last
    # ErrorResponse read before the end"; rule 4). The 57P01 PgBouncer forwarded first is not kept.
    assert (obs["sqlstate"], obs["message"]) == said[-1], (obs, said)
    expected = classify(
        Evidence(
            observed=Observed(
                kind=obs["kind"], sqlstate=obs["sqlstate"], severity=obs["severity"], message=obs["message"]
            ),
            state="idle",
            idle_s=drop["idle_s"],
            age_s=drop["age_s"],
            keepalive_idle_s=10.0,
        )
    )
    assert drop["cause"] == expected.cause.value == "upstream_pooler", (drop, expected)
    assert "pooler_text=server conn crashed?" in drop["evidence"]
    assert "closing because" in drop["hint"], drop["hint"]  # PgBouncer's log has its reason
    assert drop["state"] == "idle" and drop["impact"] == "transparent", drop
    assert "server conn crashed?" in bouncer.logs()
    conn.close()


def test_server_conn_terminated_transaction_mode_says_nothing(bouncer_pg, pgbouncer_factory, sidecar_factory):
    """Transaction mode: PgBouncer tells an idle client nothing, so the sidecar has no drop to
    record (its own connection never ended) and must not invent one."""
    bouncer, sidecar = _bouncer_rig(bouncer_pg, pgbouncer_factory, sidecar_factory, "transaction")
    closed, seen = _probe(bouncer, bouncer_pg, bouncer_pg.terminate, timeout=1.5)
    assert not closed and seen == [], seen

    conn = _app(sidecar, bouncer_pg, "pooled_txn")
    old = _server_pid(conn)
    assert bouncer_pg.terminate(old)
    wait_until(lambda: old not in bouncer_pg.backend_pids(), 5, "the terminated backend to exit")
    time.sleep(1.0)
    assert sidecar.drops() == [], sidecar.drops()
    assert _server_pid(conn) != old  # PgBouncer gave the next transaction a new server connection
    assert sidecar.drops() == []
    conn.close()
