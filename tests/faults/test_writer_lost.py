"""A writer lost in place (issue 12 item 3), on real servers: the server a read-write session
uses turns read-only without dropping it; the 25006 reaches the app as it is, and the next
statement runs on the writer pgsidecar finds in the host list.

Two independent primaries stand for the two hosts of a managed cluster; the first is made
read-only with ALTER SYSTEM and a reload, the way an operator (or a demotion in progress) turns a
writer into a reader while its sessions stay.
"""

from __future__ import annotations

import urllib.request

import psycopg2
import pytest

pytestmark = pytest.mark.server


def test_a_25006_reaches_the_app_then_the_next_write_runs_on_the_writer(pg_factory, sidecar_factory):
    a, b = pg_factory(), pg_factory()
    for cluster in (a, b):
        cluster.sql("CREATE TABLE IF NOT EXISTS t (seq int PRIMARY KEY, at text)")
        cluster.sql("GRANT ALL ON t TO app")
    dsn = (
        f"host=localhost,localhost port={a.port},{b.port} sslmode=verify-full sslrootcert={a.pki.ca_cert}"
        " target_session_attrs=read-write"
    )
    sc = sidecar_factory(dsn, metrics=True)
    conn = psycopg2.connect(sc.dsn(password=a.users["app"]))
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("INSERT INTO t VALUES (1, current_setting('port'))")
    cur.execute("SET application_name = 'writer-lost'")  # session state, to be replayed
    a.sql("ALTER SYSTEM SET default_transaction_read_only = on")
    a.reload()
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        cur.execute("INSERT INTO t VALUES (2, current_setting('port'))")  # that statement did fail
    assert not conn.closed
    cur.execute("INSERT INTO t VALUES (3, current_setting('port'))")  # the next one runs on the writer
    cur.execute("SELECT current_setting('port')::int, current_setting('application_name')")
    assert cur.fetchone() == (b.port, "writer-lost")
    assert a.sql("SELECT seq FROM t ORDER BY seq") == [(1,)]
    assert b.sql("SELECT seq FROM t ORDER BY seq") == [(3,)]  # 2 ran nowhere, 3 once
    [drop] = sc.wait_drops(1)
    assert drop["observed"]["kind"] == "role_lost" and "25006" in drop["observed"]["message"]
    assert drop["cause"] == "failover" and drop["impact"] == "transparent", drop
    assert drop["upstream"]["port"] == a.port and drop["upstream_after"]["port"] == b.port
    with urllib.request.urlopen(f"http://127.0.0.1:{sc.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'pgsidecar_upstream_role{address="127.0.0.1",host="localhost",role="primary"} 1.0' in text
    assert 'pgsidecar_role_mismatches_total{role="read-only"} 1.0' in text  # a found read-only on the way
    conn.close()
