"""upstream.check_after_idle: one empty Sync round trip before the first request after a long idle."""

from __future__ import annotations

import time

import psycopg2
import pytest

from tests.fixtures.sidecar import upstream_dsn_for

pytestmark = pytest.mark.server


def test_requests_after_idle_still_work_with_the_check_on(pg, sidecar_factory):
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_UPSTREAM_CHECK_AFTER_IDLE": "300ms"})
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"]))
    conn.autocommit = True
    with conn.cursor() as cur:
        for i in range(3):
            time.sleep(0.5)  # longer than the check interval: each request is preceded by a Sync
            cur.execute("SELECT %s::int", (i,))
            assert cur.fetchone() == (i,)


def test_a_drop_found_by_the_check_is_hidden(pg_factory, sidecar_factory):
    cluster = pg_factory()
    sc = sidecar_factory(upstream_dsn_for(cluster), env={"PGSIDECAR_UPSTREAM_CHECK_AFTER_IDLE": "300ms"})
    conn = psycopg2.connect(sc.dsn(password=cluster.users["app"]))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        assert cluster.terminate(pid)
        time.sleep(0.5)
        cur.execute("SELECT 42")
        assert cur.fetchone() == (42,)
    drops = sc.wait_drops(1)
    assert [d["cause"] for d in drops] == ["admin_terminate"]
    assert drops[0]["impact"] == "transparent"
