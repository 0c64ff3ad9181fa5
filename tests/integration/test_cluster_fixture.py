"""The PostgreSQL fixture does what the other tests rely on: TLS verify-full, every auth method,
trust over the unix socket, and private clusters that restart, crash and go away cleanly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import stat
import struct
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg2
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.fixtures import postgres as pgfix
from tests.fixtures.certs import certificate_fingerprint, make_pki, make_server_cert
from tests.fixtures.postgres import PgCluster
from tests.fixtures.tools import free_port, pg_bindir, pid_alive, require_tool, unavailable

pytestmark = pytest.mark.server


def _one(conn: psycopg2.extensions.connection, query: str) -> object:
    with conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


def _auth_method(pg: PgCluster, backend_pid: int) -> str:
    """The method the server logged for this backend: log_connections writes
    'connection authenticated: identity="..." method=...' (PG 14+)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in Path(pg.log_path).read_text(errors="replace").splitlines():
            if f"[{backend_pid}]" in line and "connection authenticated:" in line:
                return line.split(" method=", 1)[1].split()[0]
        time.sleep(0.05)
    raise AssertionError(f"no 'connection authenticated' line for backend {backend_pid}")


def _server_cert_sha256(host: str, port: int, cafile: str) -> str:
    """Fingerprint of the certificate the server presents, after an SSLRequest (docs: "Message
    Flow", SSL Session Encryption: Int32 8, Int32 80877103, answered by one byte 'S')."""
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=cafile)
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_verify_full_against_the_test_ca(pg: PgCluster) -> None:
    conn = pg.connect(user="app")
    try:
        assert _one(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        assert conn.info.ssl_in_use
        assert conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
    finally:
        conn.close()


def test_verify_full_rejects_a_foreign_ca(pg: PgCluster, tmp_path: Path) -> None:
    other = make_pki(tmp_path, ca_name="some other CA")
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
        pg.connect(user="app", sslrootcert=other.ca_cert)


def test_server_certificate_names_every_loopback(pg: PgCluster) -> None:
    hosts = ["localhost", "127.0.0.1"] + (["::1"] if pg.ipv6 else [])
    for host in hosts:
        conn = pg.connect(user="app", host=host)
        try:
            assert _one(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            conn.close()


def test_plaintext_is_allowed_for_sslmode_disable(pg: PgCluster) -> None:
    conn = pg.connect(user="app", sslmode="disable", host="127.0.0.1")
    try:
        assert _one(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
        assert _auth_method(pg, conn.get_backend_pid()) == "scram-sha-256"
    finally:
        conn.close()


# -- authentication methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "stored_prefix", "method"),
    [
        ("app", "SCRAM-SHA-256$", "scram-sha-256"),
        ("app_md5", "md5", "md5"),
        ("app_plain", "SCRAM-SHA-256$", "password"),
    ],
)
def test_each_role_uses_its_auth_method(pg: PgCluster, user: str, stored_prefix: str, method: str) -> None:
    stored = pg.sql("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (user,))[0][0]
    assert stored.startswith(stored_prefix)
    conn = pg.connect(user=user)
    try:
        assert _one(conn, "SELECT current_user") == user
        assert _one(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        assert _auth_method(pg, conn.get_backend_pid()) == method
    finally:
        conn.close()


def test_md5_role_password_is_stored_as_md5(pg: PgCluster) -> None:
    rows = pg.sql("SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = 'app_md5'")
    assert rows == [(True,)]


@pytest.mark.parametrize("user", ["app", "app_md5", "app_plain"])
def test_wrong_password_is_28P01(pg: PgCluster, user: str) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg.connect(user=user, password="wrong")

    async def attempt() -> None:
        ctx = ssl.create_default_context(cafile=pg.pki.ca_cert)
        await asyncpg.connect(
            host="localhost",
            port=pg.port,
            user=user,
            password="wrong",
            database="app",
            ssl=ctx,
            timeout=10,
        )

    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        asyncio.run(attempt())
    assert info.value.sqlstate == "28P01"


def test_trust_over_unix_socket_only_for_trustdb(pg: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    conn = psycopg2.connect(pg.dsn(user="app", dbname="trustdb", host=pg.socket_dir, password=None))
    try:  # no password was given, so this session got in by trust
        assert _one(conn, "SELECT current_database()") == "trustdb"
        assert _one(conn, "SELECT inet_server_addr() IS NULL") is True  # a unix socket
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(pg.dsn(user="app", dbname="app", host=pg.socket_dir, password=None))


def test_roles_and_databases(pg: PgCluster) -> None:
    assert set(pg.users) == {"postgres", "app", "app_md5", "app_plain"}
    assert pg.sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'") == [("app",)]
    assert pg.sql("SELECT rolcreatedb FROM pg_roles WHERE rolname = 'app'") == [(True,)]
    assert pg.sql("SELECT count(*) FROM pg_database WHERE datname = 'trustdb'") == [(1,)]


def test_env_drives_psql_over_tls(pg: PgCluster) -> None:
    psql = require_tool("psql")
    out = subprocess.run(
        [psql, "-X", "-tAc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
        env=pg.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == "t"


def test_server_runs_unprivileged(pg: PgCluster) -> None:
    uid = os.stat(f"/proc/{pg.pid}").st_uid
    assert uid != 0
    assert stat.S_IMODE(os.stat(pg.datadir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Path(pg.datadir, "server.key")).st_mode) == 0o600


# -- private clusters --------------------------------------------------------------------------


def test_factory_cluster_restarts_and_is_destroyed(pg_factory: pgfix.ClusterFactory) -> None:
    cluster = pg_factory(idle_session_timeout="7s")
    assert cluster.sql("SHOW idle_session_timeout") == [("7s",)]
    first_pid, first_start = cluster.pid, cluster.postmaster_start_time()
    cluster.restart()
    assert cluster.postmaster_start_time() > first_start
    assert cluster.pid != first_pid and pid_alive(cluster.pid) and not pid_alive(first_pid)
    cluster.restart(mode="immediate")
    assert cluster.sql("SELECT 1") == [(1,)]

    datadir, pid = cluster.datadir, cluster.pid
    cluster.destroy()
    assert not pid_alive(pid)
    assert not Path(datadir).exists()
    assert cluster not in pgfix._LIVE


def test_terminate_kill9_and_sql_reconnects(pg_factory: pgfix.ClusterFactory) -> None:
    cluster = pg_factory()
    try:
        victim = cluster.connect(user="app", application_name="victim")
        assert cluster.backend_pids("victim") == [victim.get_backend_pid()]
        assert cluster.terminate(victim.get_backend_pid()) is True
        with pytest.raises(psycopg2.OperationalError):
            _one(victim, "SELECT 1")
        victim.close()

        cluster.sql("SELECT 1")  # cache a connection the crash below will break
        crashed = cluster.connect(user="app", application_name="crash")
        cluster.kill9(crashed.get_backend_pid())
        assert cluster.sql("SELECT 1") == [(1,)]  # reconnects through crash recovery
        with pytest.raises(psycopg2.OperationalError):
            _one(crashed, "SELECT 1")
        crashed.close()
        with pytest.raises(ValueError):
            cluster.kill9(os.getpid())
    finally:
        cluster.destroy()


def test_set_conf_and_reload(pg_factory: pgfix.ClusterFactory) -> None:
    cluster = pg_factory()
    try:
        cluster.set_conf(statement_timeout="1234ms", log_min_messages="notice")
        conn = cluster.connect()
        assert _one(conn, "SHOW statement_timeout") == "1234ms"
        conn.close()
        cluster.set_conf(statement_timeout=None)
        assert cluster.sql("SHOW statement_timeout") == [("0",)]
        cluster.stop()
        with pytest.raises(psycopg2.OperationalError):
            cluster.connect(connect_timeout=2)
        cluster.start()
        assert cluster.sql("SELECT 1") == [(1,)]
    finally:
        cluster.destroy()


def test_server_certificate_rotation(pg_factory: pgfix.ClusterFactory, tmp_path: Path) -> None:
    cluster = pg_factory()
    try:
        before = _server_cert_sha256("localhost", cluster.port, cluster.pki.ca_cert)
        assert before == certificate_fingerprint(cluster.pki.server_cert)
        cert, key = make_server_cert(cluster.pki, tmp_path, ["localhost", "127.0.0.1"])
        cluster.install_server_cert(cert, key)
        after = _server_cert_sha256("localhost", cluster.port, cluster.pki.ca_cert)
        assert after == certificate_fingerprint(cert) != before
    finally:
        cluster.destroy()


# -- certificates and tools --------------------------------------------------------------------


def test_make_pki(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(Path(pki.ca_cert).read_bytes())
    server = x509.load_pem_x509_certificate(Path(pki.server_cert).read_bytes())
    client = x509.load_pem_x509_certificate(Path(pki.client_cert).read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "app"
    for key in (pki.ca_key, pki.server_key, pki.client_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_missing_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("pgsidecar-no-such-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="skipping a server test in CI"):
        unavailable("nothing here")


def test_pg_bindir_and_free_port() -> None:
    assert Path(pg_bindir(), "initdb").exists()
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
