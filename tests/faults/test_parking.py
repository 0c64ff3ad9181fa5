"""Parking (upstream.park_after) against a real server: idle sessions give their backends back.

docs/session-rules.md "Parking": a session idle past park_after, between transactions and with
only state pgsidecar can rebuild, has its upstream closed (Terminate, then close); the app keeps
its connection and notices nothing, and its next request reconnects, replays and runs. Parking is
not a drop, so the drop log stays empty, even past the server's idle_session_timeout.
The figures (unpark latency, server connections and sidecar RSS for N idle clients with and
without parking) are printed in a fixed form the lead can grep (PARKING ...).
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from pgsidecar.observe.metrics import sample_value
from tests.fixtures.faults import RunInThread, wait_active, wait_until
from tests.fixtures.postgres import PgCluster
from tests.fixtures.sidecar import SidecarProcess, upstream_dsn_for

pytestmark = [pytest.mark.server, pytest.mark.faults, pytest.mark.slow]

PARK_ENV = {"PGSIDECAR_UPSTREAM_PARK_AFTER": "1s"}
IDLE_CLIENTS = 1000  # for the connection count and RSS figures (about 20 s of logins each way)


def _open(sidecar: SidecarProcess, cluster: PgCluster, count: int, app: str) -> list[psycopg2.extensions.connection]:
    """`count` psycopg2 sessions through the sidecar, logged in a few at a time, autocommit (each
    statement is one request, so the first one after parking is exactly the unpark)."""
    dsn = sidecar.dsn(password=cluster.users["app"], application_name=app, connect_timeout="30")
    with ThreadPoolExecutor(8) as pool:
        conns = list(pool.map(lambda _: psycopg2.connect(dsn), range(count)))
    for conn in conns:
        conn.autocommit = True
    return conns


def _close(conns: list[psycopg2.extensions.connection]) -> None:
    for conn in conns:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def _one(conn: psycopg2.extensions.connection, sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    assert row is not None
    return row[0]


def _backends(cluster: PgCluster, app: str) -> int:
    return len(cluster.backend_pids(app))


def _metrics(sidecar: SidecarProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _metric(text: str, name: str) -> float | None:
    return sample_value(text, name)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_idle_sessions_are_parked_and_resume_with_their_exact_state(pg_factory, sidecar_factory) -> None:
    cluster = pg_factory()
    sidecar = sidecar_factory(upstream_dsn_for(cluster), env=PARK_ENV, metrics=True)
    app = "parkapp"
    conns = _open(sidecar, cluster, 100, app)
    try:
        for i, conn in enumerate(conns):
            with conn.cursor() as cur:
                # An odd number of kB: SHOW gives it back as written (1024kB would read 1MB).
                cur.execute(f"SET work_mem = '{1025 + 2 * i}kB'")
                cur.execute(f"PREPARE q AS SELECT $1::int + {i}")
        wait_until(lambda: _backends(cluster, app) == 0, 20, "every idle session parked (no backend left)")
        text = _metrics(sidecar)
        assert _metric(text, "pgsidecar_parked_sessions") == 100
        # Sessions that sat idle while the others logged in were parked before their SET too.
        parks, unparks = _metric(text, "pgsidecar_parks_total") or 0, _metric(text, "pgsidecar_unparks_total") or 0
        assert parks - unparks == 100
        unpark_sum = _metric(text, "pgsidecar_unpark_seconds_sum") or 0.0
        assert sample_value(text, "pgsidecar_upstream_connections", {"state": "connected"}) == 0

        latencies = []
        for i, conn in enumerate(conns):
            start = time.perf_counter()
            assert _one(conn, "EXECUTE q(1)") == 1 + i  # the unpark: connect, login, replay, then this
            latencies.append(time.perf_counter() - start)
            assert _one(conn, "SHOW work_mem") == f"{1025 + 2 * i}kB"
        text = _metrics(sidecar)
        assert _metric(text, "pgsidecar_unparks_total") == unparks + 100
        count = _metric(text, "pgsidecar_unpark_seconds_count")
        total = _metric(text, "pgsidecar_unpark_seconds_sum")
        assert count == unparks + 100 and total is not None
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        print(
            f"PARKING unpark sessions=100 first_request_p50_ms={p50 * 1000:.1f} p99_ms={p99 * 1000:.1f}"
            f" max_ms={max(latencies) * 1000:.1f} mean_ms={statistics.fmean(latencies) * 1000:.1f}"
            f" sidecar_unpark_mean_ms={(total - unpark_sum) / 100 * 1000:.1f}"
        )
        assert sidecar.drops() == [], "parking is not a drop"
        assert "parked after" in sidecar.logs()  # the debug line, one per park
    finally:
        _close(conns)


def test_parking_before_idle_session_timeout_records_no_drop(pg_factory, sidecar_factory) -> None:
    """park_after (1 s) below the server's idle_session_timeout (3 s): the server never times a
    session out, because pgsidecar gave the backend back first; the session works throughout."""
    cluster = pg_factory(idle_session_timeout="3s")
    sidecar = sidecar_factory(upstream_dsn_for(cluster), env=PARK_ENV)
    app = "parktimeout"
    (conn,) = _open(sidecar, cluster, 1, app)
    try:
        with conn.cursor() as cur:
            cur.execute("SET work_mem = '2047kB'")
            cur.execute("PREPARE q AS SELECT $1::int * 2")
        pids = set()
        for _ in range(2):
            time.sleep(4.0)  # past idle_session_timeout
            assert _backends(cluster, app) == 0, "the idle session was parked"
            assert sidecar.drops() == []
            assert _one(conn, "EXECUTE q(21)") == 42
            assert _one(conn, "SHOW work_mem") == "2047kB"
            pids.add(_one(conn, "SELECT pg_backend_pid()"))
        assert len(pids) == 2, "each unpark logged in to a new backend"
        time.sleep(0.5)
        assert sidecar.drops() == [], "no drop was ever recorded"
        # The harness's own superuser connection is timed out; the app's sessions never were.
        timed_out = [line for line in cluster.log_tail(2000).splitlines() if "57P05" in line and "/parktimeout" in line]
        assert timed_out == [], "the server never timed a session of the app out"
    finally:
        _close([conn])


def _parked(cluster: PgCluster, app: str) -> None:
    wait_until(lambda: _backends(cluster, app) == 0, 10, f"{app} parked (no backend left)")


def test_a_cancel_after_unparking_reaches_the_new_backend(pg_factory, sidecar_factory) -> None:
    """The client's cancel key names its first backend; after an unpark a new one serves it."""
    cluster = pg_factory()
    sidecar = sidecar_factory(upstream_dsn_for(cluster), env=PARK_ENV)
    app = "parkcancel"
    (conn,) = _open(sidecar, cluster, 1, app)
    try:
        first = _one(conn, "SELECT pg_backend_pid()")
        _parked(cluster, app)
        sleeper = RunInThread(lambda: _one(conn, "SELECT pg_sleep(30)"))
        assert wait_active(cluster, app, "pg_sleep") != first
        conn.cancel()  # PQcancel: a CancelRequest with the key from the first login, to the sidecar
        sleeper.join(10)
        assert isinstance(sleeper.error, psycopg2.errors.QueryCanceled), sleeper.error
        assert _one(conn, "SELECT 1") == 1
        assert sidecar.drops() == []
    finally:
        _close([conn])


def test_a_failed_unpark_answers_08006_after_the_deadline_and_the_session_stays(pg_factory, sidecar_factory) -> None:
    cluster = pg_factory()
    env = {**PARK_ENV, "PGSIDECAR_RECONNECT_DEADLINE": "2s"}
    sidecar = sidecar_factory(upstream_dsn_for(cluster), env=env)
    app = "parkdown"
    (conn,) = _open(sidecar, cluster, 1, app)
    try:
        _one(conn, "SELECT pg_catalog.set_config('work_mem', '3071kB', false)")
        _parked(cluster, app)
        cluster.stop()
        start = time.monotonic()
        with pytest.raises(psycopg2.OperationalError) as info:
            _one(conn, "SELECT 1")
        waited = time.monotonic() - start
        assert info.value.pgcode == "08006", info.value
        assert "could not reconnect within 2 s" in str(info.value)
        assert 1.5 < waited < 8, waited
        assert conn.closed == 0, "the client connection stays open"
        cluster.start()
        assert _one(conn, "SHOW work_mem") == "3071kB"  # the next request unparks, with the state
        assert sidecar.drops() == [], "a failed unpark is no drop"
    finally:
        _close([conn])


def test_server_connections_and_rss_for_idle_clients(pg_factory, sidecar_factory) -> None:
    n = IDLE_CLIENTS
    cluster = pg_factory(max_connections=n + 50)
    figures: dict[str, tuple[int, int]] = {}
    for label, extra in (("without", {}), ("with", PARK_ENV)):
        env = {"PGSIDECAR_LISTEN_MAX_CLIENTS": str(n + 10), **extra}
        sidecar = sidecar_factory(upstream_dsn_for(cluster), env=env)
        app = f"idle_{label}"
        conns = _open(sidecar, cluster, n, app)
        try:
            if extra:
                wait_until(lambda app=app: _backends(cluster, app) == 0, 30, "every idle client parked")
            # Upstream TLS buffers go back to the system 2 s after TLS connections end (malloc_trim).
            time.sleep(3.0)
            figures[label] = (_backends(cluster, app), sidecar.rss_kib())
            assert sidecar.drops() == []
        finally:
            _close(conns)
            sidecar.stop(timeout=20)
    (without_conns, without_rss), (with_conns, with_rss) = figures["without"], figures["with"]
    print(
        f"PARKING idle_clients={n} server_connections without={without_conns} with={with_conns}"
        f" sidecar_rss_mib without={without_rss / 1024:.1f} with={with_rss / 1024:.1f}"
    )
    assert without_conns == n and with_conns == 0
