"""Real server faults while the classic psycopg2 app sits idle between requests.

docs/session-rules.md, first row: a drop while idle is invisible to the app; the next request
simply works, and the drop log holds exactly one record with the cause the classifier gives.
Each test has its own cluster and sidecar (`rig_factory`): these faults are destructive.
"""

from __future__ import annotations

import time

import psycopg
import psycopg2
import pytest

from tests.fixtures.faults import (
    RunInThread,
    SlotFiller,
    assert_no_raw_drop,
    report_reconnect,
    request,
)

pytestmark = [pytest.mark.server, pytest.mark.faults]


def _pid(conn) -> int:
    return request(conn, "SELECT pg_backend_pid()")[0][0]


def _works(rig, conn) -> int:
    """The app's next request after the fault: it must simply work. Returns the new backend pid."""
    try:
        pid = _pid(conn)
    except psycopg2.Error as exc:
        assert_no_raw_drop(exc)
        raise AssertionError(f"the app saw an error after an idle-time fault: {exc!r}") from exc
    assert pid == rig.backend_pid(), "the request ran on the sidecar's new backend"
    return pid


def test_terminate_while_idle(rig_factory):
    rig = rig_factory()
    conn = rig.app()
    old = _pid(conn)
    assert rig.cluster.terminate(old)
    drop = rig.one_drop()
    assert _works(rig, conn) != old
    assert drop["cause"] == "admin_terminate", drop
    assert drop["state"] == "idle" and drop["impact"] == "transparent"
    assert drop["observed"]["sqlstate"] == "57P01"
    assert drop["upstream"]["backend_pid"] == old
    assert drop["reconnect"]["succeeded"] is True
    report_reconnect("pg_terminate_backend", drop)


def test_idle_session_timeout(rig_factory):
    # 2 s rather than 1 s: the sidecar's new backend gets the same timeout, and the app's request
    # must reach it before it idles out in turn (else that would be a second, legitimate, drop).
    rig = rig_factory(settings={"idle_session_timeout": "2s"})
    conn = rig.app()
    old = _pid(conn)
    drops = rig.sidecar.wait_drops(1, timeout=15)
    assert drops, "idle_session_timeout did not end the idle session"
    assert _works(rig, conn) != old
    drops = rig.sidecar.drops()
    assert len(drops) == 1, drops
    drop = drops[0]
    assert drop["cause"] == "idle_session_timeout", drop
    assert drop["observed"]["sqlstate"] == "57P05"
    assert drop["idle_s"] >= 1.5, "idle_s counts up to the server's last words"
    report_reconnect("idle_session_timeout", drop)


def test_fast_restart_while_idle(rig_factory):
    rig = rig_factory()
    conn = rig.app()
    old = _pid(conn)
    rig.cluster.restart("fast")
    drop = rig.one_drop()
    assert _works(rig, conn) != old
    assert drop["cause"] == "server_restart", drop
    assert drop["observed"]["sqlstate"] == "57P01"
    assert drop["reconnect"]["postmaster_start_changed"] is True
    report_reconnect("restart -m fast", drop)


def test_immediate_restart_while_idle(rig_factory):
    """`pg_ctl restart -m immediate`: every backend gets SIGQUIT and sends WARNING 57P01
    "terminating connection due to immediate shutdown command" then EOF (postgres.c quickdie,
    PostgreSQL 14+), and the next start runs crash recovery. The classifier says server_restart:
    the server's own last words name an operator's shutdown, which outranks the recovery the
    reconnect then sees (classify.py rule 8 before rule 9); a crash would have said 57P02."""
    rig = rig_factory()
    conn = rig.app()
    old = _pid(conn)
    rig.cluster.restart("immediate")
    drop = rig.one_drop()
    assert _works(rig, conn) != old
    assert drop["observed"]["sqlstate"] == "57P01"
    assert "immediate shutdown" in drop["observed"]["message"]
    assert drop["cause"] == "server_restart", drop
    report_reconnect("restart -m immediate", drop)


def test_kill9_of_another_backend(rig_factory):
    rig = rig_factory()
    conn = rig.app()
    old = _pid(conn)
    victim = rig.cluster.connect(user="app")
    victim_pid = victim.info.backend_pid
    rig.cluster.kill9(victim_pid)
    drop = rig.one_drop()
    assert _works(rig, conn) != old
    assert drop["observed"]["sqlstate"] == "57P02", drop["observed"]
    assert drop["cause"] == "server_crash", drop
    report_reconnect("kill -9 of another backend", drop)
    victim.close()


def test_server_down_5s_while_the_query_waits(rig_factory):
    rig = rig_factory()
    conn = rig.app()
    old = _pid(conn)
    rig.cluster.stop("fast")
    stopped_at = time.monotonic()
    query = RunInThread(lambda: _pid(conn))  # sent during the outage: held by the sidecar
    time.sleep(5.0)
    assert query.finished_at is None, f"the query returned while the server was down: {query.error or query.result}"
    rig.cluster.start()
    query.join(timeout=30)
    if query.error is not None:
        assert_no_raw_drop(query.error)
        raise AssertionError(f"the query held during the outage failed: {query.error!r}")
    assert query.result != old
    waited = query.finished_at - stopped_at
    assert waited >= 5.0
    drop = rig.one_drop()
    assert drop["cause"] == "server_restart", drop
    assert drop["reconnect"]["succeeded"] is True and drop["reconnect"]["attempts"] > 1
    report_reconnect("server stopped 5 s", drop)
    print(f"RECONNECT fault=server-stopped-5s app_query_waited_s={waited:.3f}")


def test_server_down_past_the_deadline(rig_factory):
    """Both clients send a query during the outage. Each waiting request is answered, after
    reconnect.deadline counted from it, with an ordinary ERROR 08006 naming the reason, and the
    connection stays open (issue 12: it used to be closed, so the app's first request after the
    server came back failed with "server closed the connection unexpectedly"). When the server is
    back, the next requests of both run on the new connection."""
    rig = rig_factory(env={"PGSIDECAR_RECONNECT_DEADLINE": "3s"})
    classic = rig.app()
    first_pid = _pid(classic)
    modern = psycopg.connect(rig.sidecar.dsn(password=rig.cluster.users["app"]), autocommit=True)
    modern.execute("SELECT 1")
    rig.cluster.stop("fast")
    time.sleep(4.0)  # idle past the deadline: nothing is closed, nothing gives up
    started = time.monotonic()
    waiting = RunInThread(lambda: modern.execute("SELECT 2"))
    with pytest.raises(psycopg2.OperationalError) as info:
        _pid(classic)
    elapsed = time.monotonic() - started
    waiting.join(timeout=5)
    assert 2.5 <= elapsed <= 3.0 + 2.0, f"the error came after {elapsed:.1f} s (deadline 3 s, from the request)"
    assert info.value.pgcode == "08006" and "could not reconnect within 3 s" in str(info.value)
    assert not classic.closed  # an ERROR, not a FATAL: the connection stays
    err = waiting.error
    assert isinstance(err, psycopg.OperationalError), repr(err)
    assert err.diag.sqlstate == "08006", (err.diag.sqlstate, str(err))
    assert "could not reconnect within 3 s" in str(err) and "refused" in str(err).lower()
    assert waiting.finished_at - started <= 5.0 and not modern.closed
    rig.cluster.start()
    assert _pid(classic) != first_pid  # waits for the server, then runs on the new connection
    assert modern.execute("SELECT 3").fetchone() == (3,)
    drops = rig.sidecar.wait_drops(2)
    assert len(drops) == 2, drops
    for drop in drops:
        assert drop["reconnect"]["succeeded"] is True, drop
        assert drop["impact"].startswith("error 08006 to waiting requests"), drop
        assert drop["reconnect"]["duration_s"] >= 7.0, drop["reconnect"]
        assert drop["cause"] == "server_restart", drop
    report_reconnect("server down past deadline", drops[0])


def test_max_connections_reached_during_reconnect(rig_factory):
    rig = rig_factory(settings={"max_connections": 10})
    conn = rig.app()
    old = _pid(conn)
    rig.cluster.sql("SELECT 1")  # the helper's superuser session exists before the slots are gone
    filler = SlotFiller(rig.cluster)
    try:
        assert filler.fill() > 0
        filler.arm(3)
        assert rig.cluster.terminate(old)
        filler.fire()  # takes back the slot the terminated backend frees
        assert filler.settle_armed() >= 1
        time.sleep(1.0)  # the sidecar retries against a full server meanwhile
    finally:
        filler.release()
    drop = rig.one_drop()
    assert _works(rig, conn) != old
    errors = drop["reconnect"]["errors"]
    assert any(e.startswith("53300") for e in errors), errors
    assert drop["reconnect"]["succeeded"] is True and drop["reconnect"]["duration_s"] >= 0.9
    assert drop["cause"] == "admin_terminate", drop
    assert "too_many_connections" in drop["secondary"], drop
    report_reconnect("max_connections reached during reconnect", drop)


def test_idle_in_transaction_timeout(rig_factory):
    rig = rig_factory(settings={"idle_in_transaction_session_timeout": "1s"})
    conn = rig.app()
    old = _pid(conn)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # the app opened a transaction and sits in it
    drop = rig.one_drop()
    # The server's own reason, as psycopg's suite expects it: IdleInTransactionSessionTimeout.
    with pytest.raises(psycopg2.errors.IdleInTransactionSessionTimeout) as info:
        with conn.cursor() as cur:
            cur.execute("SELECT 2")
    assert info.value.pgcode == "25P03", (info.value.pgcode, str(info.value))
    assert "the transaction was rolled back" in info.value.diag.message_hint
    assert_no_raw_drop(info.value)
    conn.rollback()
    assert _works(rig, conn) != old
    assert drop["cause"] == "idle_in_transaction_timeout", drop
    assert drop["observed"]["sqlstate"] == "25P03"
    assert drop["state"] == "in_transaction"
    assert len(rig.sidecar.drops()) == 1
    report_reconnect("idle_in_transaction_session_timeout", drop)
