"""Session state survives a drop: replayed on the new backend, or refused loudly.

docs/session-rules.md: settings (SET, set_config(..., false), SET ROLE), SQL and protocol-level
prepared statements and LISTEN channels are replayed before the client's next message; a
session holding a temporary table cannot be rebuilt, so the client gets FATAL 08006 naming it.
"""

from __future__ import annotations

import asyncio
import select
import time

import asyncpg
import psycopg
import psycopg2
import pytest

from tests.fixtures.faults import (
    report_reconnect,
    request,
    wait_until,
)

pytestmark = [pytest.mark.server, pytest.mark.faults]

SETUP = """
CREATE ROLE replay_role NOLOGIN;
GRANT replay_role TO app;
CREATE SCHEMA replay_s AUTHORIZATION app;
CREATE TABLE replay_s.where_am_i (v text);
INSERT INTO replay_s.where_am_i VALUES ('replay_s');
GRANT USAGE ON SCHEMA replay_s TO replay_role;
GRANT SELECT ON replay_s.where_am_i TO replay_role;
"""

STATE = (
    "SET search_path TO replay_s, public",
    "SET app.x = 'tenant-7'",
    "SET statement_timeout = '42s'",
    "SELECT set_config('work_mem', '7MB', false)",
    "SET ROLE replay_role",
    "PREPARE add_one (int) AS SELECT $1 + 1",
    "LISTEN replay_chan",
)


def _terminate_and_wait(rig, app_name: str | None = None, count: int = 1) -> dict:
    old = rig.backend_pid(app_name)
    assert rig.cluster.terminate(old)
    drops = rig.sidecar.wait_drops(count)
    assert len(drops) == count, drops
    drop = drops[-1]
    assert drop["upstream"]["backend_pid"] == old
    return drop


def test_settings_role_sql_prepare_and_listen_are_replayed(rig_factory):
    rig = rig_factory()
    rig.cluster.sql(SETUP)
    conn = rig.app()
    for statement in STATE:
        request(conn, statement)
    old = request(conn, "SELECT pg_backend_pid()")[0][0]
    drop = _terminate_and_wait(rig)
    assert drop["cause"] == "admin_terminate" and drop["impact"] == "transparent", drop

    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_backend_pid(), current_setting('search_path'), current_setting('app.x'),"
            " current_setting('statement_timeout'), current_setting('work_mem'),"
            " current_user, session_user"
        )
        pid, search_path, app_x, timeout, work_mem, user, session_user = cur.fetchone()
        cur.execute("SELECT v FROM where_am_i")  # resolved through the replayed search_path
        where = cur.fetchone()[0]
        cur.execute("EXECUTE add_one(41)")
        added = cur.fetchone()[0]
        cur.execute("SELECT pg_listening_channels()")
        channels = [r[0] for r in cur.fetchall()]
    conn.commit()
    assert pid != old
    assert search_path == "replay_s, public"
    assert app_x == "tenant-7"
    assert timeout == "42s"
    assert work_mem == "7MB"
    assert (user, session_user) == ("replay_role", "app")
    assert where == "replay_s"
    assert added == 42
    assert channels == ["replay_chan"]
    assert any("notifications sent while it was disconnected may have been missed" in n for n in conn.notices)

    # A notification sent after the reconnect reaches the app.
    rig.cluster.sql("NOTIFY replay_chan, 'after'")
    deadline = time.monotonic() + 10
    while not conn.notifies and time.monotonic() < deadline:
        select.select([conn], [], [], 0.5)
        conn.poll()
    assert [(n.channel, n.payload) for n in conn.notifies] == [("replay_chan", "after")]
    report_reconnect("terminate with replayed state (settings, role, PREPARE, LISTEN)", drop)


def test_protocol_prepared_statements_are_replayed_psycopg3(rig_factory):
    rig = rig_factory()
    dsn = rig.sidecar.dsn(password=rig.cluster.users["app"], application_name="pg3prep")
    with psycopg.connect(dsn, autocommit=True) as conn:
        query = "SELECT %s::int * 2"
        assert conn.execute(query, (21,), prepare=True).fetchone() == (42,)
        assert conn.execute(query, (22,), prepare=True).fetchone() == (44,)
        names = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements WHERE NOT from_sql").fetchall()]
        assert names, "psycopg 3 prepared the statement at the protocol level"
        conn.execute("SELECT 1")  # an idle point after the Parse, so the state was snapshotted
        drop = _terminate_and_wait(rig, "pg3prep")
        # psycopg 3 believes the statement exists: it sends Bind/Execute on its name only.
        assert conn.execute(query, (50,), prepare=True).fetchone() == (100,)
        after = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements WHERE NOT from_sql").fetchall()]
        assert set(names) <= set(after)
    assert drop["impact"] == "transparent", drop
    report_reconnect("terminate with protocol-level prepared statements (psycopg 3)", drop)


def test_protocol_prepared_statements_are_replayed_asyncpg(rig_factory):
    rig = rig_factory()

    async def scenario() -> dict:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=rig.sidecar.port,
            user="app",
            password=rig.cluster.users["app"],
            database="app",
            ssl=False,
            server_settings={"application_name": "asyncpgprep"},
        )
        try:
            stmt = await conn.prepare("SELECT $1::int + 100")
            assert await stmt.fetchval(1) == 101
            await conn.execute("SELECT 1")
            drop = await asyncio.to_thread(_terminate_and_wait, rig, "asyncpgprep")
            assert await stmt.fetchval(2) == 102  # the named statement exists on the new backend
            assert await conn.fetchval("SELECT $1::text || 'x'", "a") == "ax"
            return drop
        finally:
            await conn.close()

    drop = asyncio.run(scenario())
    assert drop["impact"] == "transparent", drop
    report_reconnect("terminate with protocol-level prepared statements (asyncpg)", drop)


def test_temp_table_is_not_replayable(rig_factory):
    """psycopg2 (libpq 17) shows a FATAL read while idle only as "server closed the connection
    unexpectedly", as it does against PostgreSQL itself; psycopg 3 shows the FATAL's text."""
    rig = rig_factory()
    classic = rig.app()
    request(classic, "CREATE TEMP TABLE scratch (x int)")
    request(classic, "SELECT 1")
    drop = _terminate_and_wait(rig)
    with pytest.raises(psycopg2.OperationalError):
        request(classic, "SELECT 1")
    assert classic.closed, "the client connection is closed"
    assert drop["impact"] == "fatal 08006 client closed", drop
    assert drop["cause"] == "admin_terminate", drop

    modern = psycopg.connect(
        rig.sidecar.dsn(password=rig.cluster.users["app"], application_name="pg3temp"), autocommit=True
    )
    modern.execute("CREATE TEMP TABLE scratch (x int)")
    modern.execute("SELECT 1")
    _terminate_and_wait(rig, "pg3temp", count=2)
    with pytest.raises(psycopg.OperationalError) as info:
        modern.execute("SELECT 1")
    assert info.value.diag.sqlstate == "08006" and info.value.diag.severity == "FATAL", str(info.value)
    assert "temporary table" in str(info.value), str(info.value)
    wait_until(lambda: modern.closed, 5, "psycopg 3 to mark the connection closed")
