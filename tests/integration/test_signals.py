"""Signals: SIGHUP reloads config and certificates without dropping sessions; SIGTERM drains
(open transactions finish within shutdown.grace, idle clients get FATAL 57P01, exit 0); a second
signal exits at once. Every test also checks that no log holds the test password."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.fixtures.certs import certificate_fingerprint, make_pki, make_server_cert
from tests.fixtures.sidecar import upstream_dsn_for
from tests.integration.test_cancel import RawClient

pytestmark = pytest.mark.server

SHUTDOWN_TEXT = "terminating connection due to administrator command"


def _connect(sc, pg, **extra):
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"], connect_timeout=10, **extra))
    conn.autocommit = True
    return conn


def _one(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()


def _no_secret_in_logs(sc, pg) -> None:
    text = sc.logs() + (Path(sc.drop_log).read_text() if Path(sc.drop_log).exists() else "")
    for user, password in pg.users.items():
        assert password not in text, f"the password of {user} is in the sidecar's log"


def _wait_log(sc, needle: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in sc.logs():
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the sidecar log:\n{sc.logs()[-2000:]}")
        time.sleep(0.05)


def _local_cert_fingerprint(port: int) -> str:
    """SHA-256 of the certificate the sidecar presents to a new client (SSLRequest, then TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(fe.SSLRequest().encode())
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _until_error(conn, timeout: float = 5.0) -> psycopg2.Error:
    """Send trivial requests until one fails; returns the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _one(conn, "SELECT 1")
        except psycopg2.Error as exc:
            return exc
        time.sleep(0.1)
    raise AssertionError("the session kept working")


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_rotates_the_local_certificate_and_keeps_sessions(pg, sidecar_factory, tmp_path):
    pki = make_pki(tmp_path / "listen-pki")
    cert, key = tmp_path / "listen.crt", tmp_path / "listen.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    sc = sidecar_factory(
        upstream_dsn_for(pg), env={"PGSIDECAR_LISTEN_TLS_CERT": str(cert), "PGSIDECAR_LISTEN_TLS_KEY": str(key)}
    )
    old_fp = certificate_fingerprint(pki.server_cert)
    assert _local_cert_fingerprint(sc.port) == old_fp
    session = _connect(sc, pg, sslmode="verify-full", sslrootcert=pki.ca_cert, host="localhost")
    pid = _one(session, "SELECT pg_backend_pid()")[0]

    new_cert, new_key = make_server_cert(pki, tmp_path / "rotated")
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    sc.proc.send_signal(signal.SIGHUP)
    _wait_log(sc, "configuration and certificates reloaded")

    assert _local_cert_fingerprint(sc.port) == certificate_fingerprint(new_cert)
    assert _one(session, "SELECT pg_backend_pid()")[0] == pid, "the open session kept its connection"
    fresh = _connect(sc, pg, sslmode="verify-full", sslrootcert=pki.ca_cert, host="localhost")
    assert _one(fresh, "SELECT 1") == (1,)
    fresh.close()
    session.close()
    assert sc.alive()
    _no_secret_in_logs(sc, pg)


def test_sighup_reloads_the_upstream_ca(pg_factory, sidecar_factory, tmp_path):
    cluster = pg_factory()
    root = tmp_path / "upstream-root.crt"
    shutil.copy(cluster.pki.ca_cert, root)
    sc = sidecar_factory(f"host=localhost port={cluster.port} sslmode=verify-full sslrootcert={root}")
    old = _connect(sc, cluster)
    pid = _one(old, "SELECT pg_backend_pid()")[0]

    # The server moves to a certificate from a new CA; the sidecar does not trust it yet.
    new_pki = make_pki(tmp_path / "new-pki")
    admin = cluster.connect()  # opened under the old CA; the fixture's own reload would verify anew
    cluster.install_server_cert(new_pki.server_cert, new_pki.server_key, reload=False)
    _one(admin, "SELECT pg_reload_conf()")
    admin.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg2.connect(cluster.dsn(user="postgres", sslrootcert=new_pki.ca_cert)).close()
            break
        except psycopg2.OperationalError:
            assert time.monotonic() < deadline, "the server did not take the new certificate"
            time.sleep(0.1)
    with pytest.raises(psycopg2.OperationalError):
        _connect(sc, cluster)

    shutil.copy(new_pki.ca_cert, root)
    sc.proc.send_signal(signal.SIGHUP)
    _wait_log(sc, "configuration and certificates reloaded")
    fresh = _connect(sc, cluster)
    assert _one(fresh, "SELECT 1") == (1,)
    assert _one(old, "SELECT pg_backend_pid()")[0] == pid, "the open session was untouched"
    fresh.close()
    old.close()
    _no_secret_in_logs(sc, cluster)


def test_sighup_with_an_invalid_config_keeps_the_running_one(pg, sidecar_factory):
    sc = sidecar_factory(upstream_dsn_for(pg), config_yaml="reconnect:\n  deadline: 30s\n")
    session = _connect(sc, pg)
    config_file = Path(sc.dir, "pgsidecar.yaml")

    config_file.write_text("reconnect:\n  deadline: banana\n")
    sc.proc.send_signal(signal.SIGHUP)
    _wait_log(sc, "reload failed")
    assert "reconnect.deadline" in sc.logs()

    config_file.write_text("listen:\n  tls_cert: /nonexistent/cert.pem\n  tls_key: /nonexistent/key.pem\n")
    sc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while sc.logs().count("reload failed") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sc.logs().count("reload failed") == 2
    assert "/nonexistent/cert.pem" in sc.logs()

    assert sc.alive()
    assert _one(session, "SELECT 1") == (1,)
    fresh = _connect(sc, pg, sslmode="require")
    assert _one(fresh, "SELECT 1") == (1,)
    fresh.close()
    session.close()
    _no_secret_in_logs(sc, pg)


# -- SIGTERM ---------------------------------------------------------------------------------


def _raw(sc, pg) -> RawClient:
    client = RawClient.connect(sc.port)
    client.login("app", pg.users["app"])
    return client


def _simple(client: RawClient, sql: str) -> list[tuple[bytes, bytes]]:
    client.send(fe.Query(sql).encode())
    return client.read_until_ready()


def _expect_shutdown(client: RawClient, timeout: float = 3.0) -> None:
    """FATAL 57P01, exactly what PostgreSQL sends on shutdown, then the connection closes."""
    kind, payload = client.read_message(timeout)
    assert kind == be.ErrorResponse.TYPE, (kind, payload)
    err = be.ErrorResponse.decode(payload)
    assert (err.severity, err.code, err.message) == ("FATAL", "57P01", SHUTDOWN_TEXT)
    with pytest.raises(EOFError):
        client.read_message(timeout)


def test_sigterm_lets_an_open_transaction_commit_then_sends_57P01(pg, sidecar_factory):
    owner = pg.connect(user="app")
    _one(owner, "CREATE TABLE IF NOT EXISTS signals_drain_t (tag text, n int); SELECT 1")
    owner.close()
    tag = uuid.uuid4().hex
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_SHUTDOWN_GRACE": "20s"})
    tx, idle = _raw(sc, pg), _raw(sc, pg)
    _simple(idle, "SELECT 1")
    assert _simple(tx, "BEGIN")[-1] == (b"Z", b"T")
    _simple(tx, f"INSERT INTO signals_drain_t VALUES ('{tag}', 1)")

    sc.proc.send_signal(signal.SIGTERM)
    _expect_shutdown(idle)  # idle clients are told at once
    with pytest.raises(psycopg2.OperationalError):
        _connect(sc, pg)  # no new clients while draining

    assert _simple(tx, f"INSERT INTO signals_drain_t VALUES ('{tag}', 2)")[-1] == (b"Z", b"T")
    reply = _simple(tx, "COMMIT")
    assert reply[0] == (b"C", b"COMMIT\x00") and reply[-1] == (b"Z", b"I")
    _expect_shutdown(tx)
    assert pg.sql("SELECT count(*) FROM signals_drain_t WHERE tag = %s", (tag,))[0][0] == 2
    assert sc.proc.wait(10) == 0
    logs = sc.logs()
    assert "draining" in logs and "drain: all sessions ended" in logs
    _no_secret_in_logs(sc, pg)


def test_sigterm_with_idle_clients_exits_at_once(pg, sidecar_factory):
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_SHUTDOWN_GRACE": "30s"})
    raw = [_raw(sc, pg) for _ in range(2)]
    for client in raw:
        _simple(client, "SELECT 1")
    conn = _connect(sc, pg)  # a real driver too: its next request fails
    _one(conn, "SELECT 1")
    started = time.monotonic()
    sc.proc.send_signal(signal.SIGTERM)
    for client in raw:
        _expect_shutdown(client)
    assert sc.proc.wait(10) == 0
    assert time.monotonic() - started < 3, "nothing to wait for: no open transaction"
    _until_error(conn)
    _no_secret_in_logs(sc, pg)


def test_second_signal_exits_at_once(pg, sidecar_factory):
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_SHUTDOWN_GRACE": "60s"})
    tx = _connect(sc, pg)
    tx.autocommit = False
    _one(tx, "SELECT 1")  # a transaction stays open, so the drain would wait up to 60 s
    sc.proc.send_signal(signal.SIGTERM)
    _wait_log(sc, "draining")
    time.sleep(0.3)
    assert sc.alive(), "the drain waits for the open transaction"
    started = time.monotonic()
    sc.proc.send_signal(signal.SIGINT)
    assert sc.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    assert "second signal" in sc.logs()
    with pytest.raises(psycopg2.Error):
        _one(tx, "SELECT 1")
    _no_secret_in_logs(sc, pg)
