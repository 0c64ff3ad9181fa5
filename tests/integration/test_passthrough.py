"""The sidecar as a plain pass-through: real clients, real server, TLS on both sides."""

from __future__ import annotations

import subprocess

import psycopg2
import pytest

from tests.fixtures.tools import require_tool

pytestmark = pytest.mark.server


def test_psycopg2_query_commit_and_backend_pid(pg, sidecar):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"]))
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS passthrough_t (id int primary key, v text)")
            cur.execute("INSERT INTO passthrough_t VALUES (%s, %s) ON CONFLICT DO NOTHING", (1, "one"))
            conn.commit()
            cur.execute("SELECT v FROM passthrough_t WHERE id = 1")
            assert cur.fetchall() == [("one",)]
            cur.execute("SELECT pg_backend_pid(), current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            pid, user, ssl_on = cur.fetchone()
        assert user == "app"
        assert ssl_on is True, "the upstream connection must be TLS"
        # The client's BackendKeyData carries the real pid of its first backend.
        assert conn.info.backend_pid == pid
    finally:
        conn.close()


@pytest.mark.parametrize("user", ["app", "app_md5", "app_plain"])
def test_each_upstream_auth_method(pg, sidecar, user):
    conn = psycopg2.connect(sidecar.dsn(user=user, password=pg.users[user]))
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (user,)
    conn.close()


def test_wrong_password_is_the_servers_own_28P01(pg, sidecar):
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(sidecar.dsn(password="wrong"))
    assert 'password authentication failed for user "app"' in str(info.value)


def test_unknown_database_is_3D000(pg, sidecar):
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(sidecar.dsn(password=pg.users["app"], dbname="nosuchdb"))
    assert 'database "nosuchdb" does not exist' in str(info.value)


def test_client_tls_to_the_sidecar(pg, sidecar):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"], sslmode="require"))
    assert conn.info.ssl_in_use
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    conn.close()


def test_psql_over_unix_socket(pg, sidecar):
    psql = require_tool("psql")
    env = pg.env()
    env.update(PGHOST=sidecar.unix_dir, PGPORT=str(sidecar.port), PGSSLMODE="disable")
    env.pop("PGSSLROOTCERT", None)
    out = subprocess.run(
        [psql, "-XAtc", "SELECT current_user || ':' || 42"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "app:42"
