"""/metrics after real faults, and the health endpoints through startup, an outage and a drain.

Each test has its own cluster and sidecar: these faults are destructive.
"""

from __future__ import annotations

import http.client
import signal
import time
import urllib.error
import urllib.request

import psycopg2
import pytest

from pgsidecar import __version__
from pgsidecar.observe.metrics import sample_value
from pgsidecar.runtime.http import PROBE_INTERVAL_S
from tests.fixtures.sidecar import upstream_dsn_for
from tests.fixtures.tools import free_port

pytestmark = [pytest.mark.server, pytest.mark.faults]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, body, content type); 503 is an answer, not an exception."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("Content-Type", "")


def wait_status(port: int, path: str, status: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        try:
            code, body, _ = http_get(port, path, timeout=2.0)
            last = (code, body)
            if code == status:
                return body
        except OSError as exc:  # not listening yet
            last = (0, str(exc))
        time.sleep(0.1)
    raise AssertionError(f"{path} did not answer {status} within {timeout}s; last: {last}")


def scrape(sidecar) -> str:
    code, body, ctype = http_get(sidecar.metrics_port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    return body


def metric(text: str, name: str, **labels: str) -> float | None:
    return sample_value(text, name, labels)


def _connect(sidecar, cluster, app: str):
    conn = psycopg2.connect(sidecar.dsn(password=cluster.users["app"], application_name=app, connect_timeout=10))
    conn.autocommit = True
    return conn


def _query(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else None


def test_metrics_after_admin_terminate(pg_factory, sidecar_factory):
    cluster = pg_factory()
    sc = sidecar_factory(upstream_dsn_for(cluster), metrics=True)
    wait_status(sc.metrics_port, "/readyz", 200, 15)
    before = scrape(sc)
    assert metric(before, "pgsidecar_build_info", version=__version__) == 1
    assert metric(before, "pgsidecar_client_connections") == 0
    assert metric(before, "process_resident_memory_bytes") > 0

    conn = _connect(sc, cluster, "metrics_terminate")
    old_pid = _query(conn, "SELECT pg_backend_pid()")[0][0]
    assert cluster.terminate(old_pid)
    assert len(sc.wait_drops(1, timeout=20)) == 1
    new_pid = _query(conn, "SELECT pg_backend_pid()")[0][0]
    assert new_pid != old_pid, "the app's next request ran on a new backend, without an error"

    text = scrape(sc)
    assert metric(text, "pgsidecar_upstream_drops_total", cause="admin_terminate") == 1
    assert metric(text, "pgsidecar_reconnects_total", result="success") == 1
    assert metric(text, "pgsidecar_transparent_recoveries_total") == 1
    assert metric(text, "pgsidecar_reconnect_duration_seconds_count") == 1
    assert 0 < metric(text, "pgsidecar_reconnect_duration_seconds_sum") < 20
    assert metric(text, "pgsidecar_client_connections") == 1
    # The fixture's readiness check was a client connection too.
    assert (
        metric(text, "pgsidecar_client_connections_total") == metric(before, "pgsidecar_client_connections_total") + 1
    )
    assert metric(text, "pgsidecar_upstream_connections", state="connected") == 1
    assert metric(text, "pgsidecar_bytes_total", direction="client_to_server") > 100
    assert metric(text, "pgsidecar_bytes_total", direction="server_to_client") > 100
    expiry = metric(text, "pgsidecar_upstream_certificate_expiry_timestamp_seconds")
    assert expiry is not None and time.time() < expiry < time.time() + 400 * 86400
    assert metric(text, "pgsidecar_client_errors_total", sqlstate="08006") is None, "a hidden drop sends no error"
    print(
        "\n/metrics after pg_terminate_backend of an idle session:\n"
        + "\n".join(line for line in text.splitlines() if line.startswith("pgsidecar_") and "_bucket" not in line)
    )
    conn.close()
    deadline = time.monotonic() + 5
    while metric(scrape(sc), "pgsidecar_client_connections") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(scrape(sc), "pgsidecar_client_connections") == 0


def test_client_errors_count_what_pgsidecar_sent(pg_factory, sidecar_factory):
    cluster = pg_factory()
    sc = sidecar_factory(upstream_dsn_for(cluster), metrics=True)
    conn = _connect(sc, cluster, "metrics_tx")
    conn.autocommit = False
    _query(conn, "SELECT 1")  # opens a transaction (psycopg2 sends BEGIN)
    pid = _query(conn, "SELECT pg_backend_pid()")[0][0]
    assert cluster.terminate(pid)
    with pytest.raises(psycopg2.Error) as info:
        for _ in range(50):  # the drop is seen at once, but give the sidecar a moment
            _query(conn, "SELECT 1")
            time.sleep(0.1)
    assert info.value.pgcode == "57P01", info.value  # the server's own reason, passed on by pgsidecar
    conn.rollback()
    assert len(sc.wait_drops(1, timeout=20)) == 1
    text = scrape(sc)
    assert metric(text, "pgsidecar_client_errors_total", sqlstate="57P01") == 1
    assert metric(text, "pgsidecar_transparent_recoveries_total") == 0
    assert metric(text, "pgsidecar_upstream_drops_total", cause="admin_terminate") == 1
    conn.close()


def test_startup_with_an_unreachable_upstream(sidecar_factory):
    # Nothing listens on this port: the first connect is attempted and fails.
    sc = sidecar_factory(f"host=127.0.0.1 port={free_port()} sslmode=disable", metrics=True)
    assert wait_status(sc.metrics_port, "/startupz", 200, 10) == "ok\n"
    code, body, _ = http_get(sc.metrics_port, "/readyz")
    assert code == 503 and "unreachable" in body, body
    assert http_get(sc.metrics_port, "/livez")[0] == 200
    assert http_get(sc.metrics_port, "/readiness")[0] == 503
    assert http_get(sc.metrics_port, "/nosuch")[0] == 404
    for method, status in (("HEAD", 200), ("POST", 405)):
        conn = http.client.HTTPConnection("127.0.0.1", sc.metrics_port, timeout=5)
        conn.request(method, "/livez")
        resp = conn.getresponse()
        assert resp.status == status and (resp.read() == b"") == (method == "HEAD")
        conn.close()


def test_health_through_outage_and_drain(pg_factory, sidecar_factory):
    cluster = pg_factory()
    sc = sidecar_factory(upstream_dsn_for(cluster), metrics=True, env={"PGSIDECAR_SHUTDOWN_GRACE": "30s"})
    port = sc.metrics_port
    wait_status(port, "/startupz", 200, 10)
    wait_status(port, "/readyz", 200, 10)
    for alias in ("/startup", "/liveness", "/readiness", "/livez"):
        assert http_get(port, alias)[0] == 200, alias

    cluster.stop("fast")
    body = wait_status(port, "/readyz", 503, PROBE_INTERVAL_S + 6)
    assert "unreachable" in body
    assert http_get(port, "/livez")[0] == 200, "an outage upstream is not a reason to restart the sidecar"
    assert http_get(port, "/startupz")[0] == 200
    cluster.start()
    wait_status(port, "/readyz", 200, PROBE_INTERVAL_S + 6)

    conn = _connect(sc, cluster, "drain_tx")
    conn.autocommit = False
    _query(conn, "SELECT 1")  # a transaction stays open: the drain waits for it
    sc.proc.send_signal(signal.SIGTERM)
    body = wait_status(port, "/readyz", 503, 5)
    assert "draining" in body
    assert http_get(port, "/livez")[0] == 200
    conn.commit()
    assert sc.proc.wait(15) == 0
    assert '"draining' in sc.logs() and "drain: all sessions ended" in sc.logs()
