"""Drops inside a transaction or with a statement in flight: honest errors, nothing run twice.

docs/session-rules.md: inside an explicit transaction the app gets one ERROR carrying the server's
own SQLSTATE and words when it said why (57P01 for pg_terminate_backend), 08006 when it said
nothing, and keeps a usable connection once it rolls back; with a COMMIT or an autocommit statement in flight it gets
08007 (transaction_resolution_unknown), and the row exists at most once; with
`reconnect.on_transaction_loss: close` it gets a FATAL and the connection is closed instead.
"""

from __future__ import annotations

import psycopg
import psycopg2
import pytest

from tests.fixtures.faults import (
    RunInThread,
    assert_no_raw_drop,
    report_reconnect,
    request,
    wait_active,
)

pytestmark = [pytest.mark.server, pytest.mark.faults]

SLOW_TRIGGERS = """
CREATE TABLE tx_t (id int PRIMARY KEY);
CREATE TABLE slow_t (id int PRIMARY KEY);
CREATE TABLE commit_t (id int PRIMARY KEY);
CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
CREATE TRIGGER slow_insert AFTER INSERT ON slow_t FOR EACH ROW EXECUTE FUNCTION sleepy();
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON commit_t
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleepy();
GRANT ALL ON tx_t, slow_t, commit_t TO app;
"""


def _rig(rig_factory, **kw):
    rig = rig_factory(**kw)
    rig.cluster.sql(SLOW_TRIGGERS)
    return rig


def _rows(rig, table: str) -> list[int]:
    """What the server itself holds, read directly (not through the sidecar)."""
    return [r[0] for r in rig.cluster.sql(f"SELECT id FROM {table} ORDER BY id")]


def test_drop_inside_explicit_transaction(rig_factory):
    rig = _rig(rig_factory)
    conn = rig.app()
    errors = []
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tx_t VALUES (1)")  # psycopg2 sent BEGIN first: inside a block
    old = rig.backend_pid()
    assert rig.cluster.terminate(old)
    drop = rig.one_drop()
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO tx_t VALUES (2)")
    except psycopg2.Error as exc:
        errors.append(exc)
    assert len(errors) == 1, "the app sees exactly one error"
    assert isinstance(errors[0], psycopg2.errors.AdminShutdown)  # the server's 57P01, as psycopg expects
    assert errors[0].pgcode == "57P01", (errors[0].pgcode, str(errors[0]))
    assert "terminating connection due to administrator command" in str(errors[0])
    assert "pgsidecar kept the connection: the transaction was rolled back" in errors[0].diag.message_hint
    assert_no_raw_drop(errors[0])
    assert not conn.closed
    conn.rollback()  # answered by the sidecar: the transaction is already gone
    assert _rows(rig, "tx_t") == [], "nothing of the lost transaction was committed"
    request(conn, "INSERT INTO tx_t VALUES (3)")
    assert request(conn, "SELECT pg_backend_pid()")[0][0] == rig.backend_pid() != old
    assert _rows(rig, "tx_t") == [3]
    assert drop["state"] == "in_transaction" and drop["cause"] == "admin_terminate", drop
    assert drop["impact"].startswith("error 57P01"), drop["impact"]
    assert len(rig.sidecar.drops()) == 1
    report_reconnect("terminate inside a transaction", drop)


def test_commit_after_a_drop_inside_a_transaction_fails(rig_factory):
    """The drop happens while the app sits in its transaction; its next message is COMMIT. That
    COMMIT must fail (with the server's 57P01): answering it with the failed-block ROLLBACK tag, as the server
    does once the client has been told, would report lost writes as committed (seen under write
    load before the fix in LocalAbortResponder)."""
    rig = _rig(rig_factory)
    conn = rig.app()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tx_t VALUES (1)")
    old = rig.backend_pid()
    assert rig.cluster.terminate(old)
    drop = rig.one_drop()
    with pytest.raises(psycopg2.OperationalError) as info:
        conn.commit()
    assert info.value.pgcode == "57P01", (info.value.pgcode, str(info.value))
    assert _rows(rig, "tx_t") == []
    request(conn, "INSERT INTO tx_t VALUES (2)")
    assert _rows(rig, "tx_t") == [2]
    assert drop["impact"].startswith("error 57P01"), drop["impact"]
    assert len(rig.sidecar.drops()) == 1


@pytest.mark.parametrize(
    ("statement", "needle", "table"),
    [
        ("SELECT pg_sleep(5)", "pg_sleep", None),
        ("INSERT INTO slow_t VALUES (7)", "INSERT INTO slow_t", "slow_t"),
    ],
    ids=["select", "insert"],
)
def test_drop_with_autocommit_statement_in_flight(rig_factory, statement, needle, table):
    rig = _rig(rig_factory)
    conn = rig.app()
    conn.autocommit = True
    old = rig.backend_pid()
    running = RunInThread(lambda: conn.cursor().execute(statement))
    assert wait_active(rig.cluster, rig.app_name, needle) == old
    assert rig.cluster.terminate(old)
    running.join(timeout=10)
    err = running.error
    assert isinstance(err, psycopg2.OperationalError), repr(err)
    assert err.pgcode == "08007", (err.pgcode, str(err))
    assert "whether it was executed is unknown" in str(err)
    assert not conn.closed
    drop = rig.one_drop()
    if table is not None:
        assert len(_rows(rig, table)) <= 1, "the row exists at most once"
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == rig.backend_pid() != old
    assert drop["state"] == "request_in_flight", drop
    assert drop["impact"].startswith("error 08007"), drop["impact"]
    report_reconnect(f"terminate with autocommit {needle} in flight", drop)


def test_drop_during_commit(rig_factory):
    """A deferred constraint trigger sleeps at COMMIT time, so the COMMIT is in flight."""
    rig = _rig(rig_factory)
    conn = rig.app()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO commit_t VALUES (42)")
    old = rig.backend_pid()
    committing = RunInThread(conn.commit)
    assert wait_active(rig.cluster, rig.app_name, "COMMIT") == old
    assert rig.cluster.terminate(old)
    committing.join(timeout=10)
    err = committing.error
    assert isinstance(err, psycopg2.OperationalError), repr(err)
    assert err.pgcode == "08007", (err.pgcode, str(err))
    assert_no_raw_drop(err)
    drop = rig.one_drop()
    assert _rows(rig, "commit_t") in ([], [42]), "the row exists at most once"
    conn.rollback()
    assert request(conn, "SELECT pg_backend_pid()")[0][0] == rig.backend_pid() != old
    assert drop["impact"].startswith("error 08007") and "COMMIT" in drop["impact"], drop["impact"]
    report_reconnect("terminate during COMMIT", drop)


def test_on_transaction_loss_close(rig_factory):
    """psycopg2 with libpq 17 reports a FATAL read before its next query only as "server closed
    the connection unexpectedly" (it does so against PostgreSQL itself too); psycopg 3 shows
    the FATAL, so it checks the text and SQLSTATE."""
    rig = _rig(rig_factory, env={"PGSIDECAR_RECONNECT_ON_TRANSACTION_LOSS": "close"})
    conn = rig.app()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO tx_t VALUES (1)")
    old = rig.backend_pid()
    assert rig.cluster.terminate(old)
    drop = rig.one_drop()
    with pytest.raises(psycopg2.OperationalError):
        with conn.cursor() as cur:
            cur.execute("INSERT INTO tx_t VALUES (2)")
    assert conn.closed, "on_transaction_loss: close ends the client connection"
    assert _rows(rig, "tx_t") == []
    assert drop["impact"] == "fatal 57P01 client closed", drop["impact"]
    assert drop["state"] == "in_transaction"
    assert drop["cause"] == "admin_terminate", drop  # no reconnect was tried: no restart evidence
    report_reconnect("terminate inside a transaction, on_transaction_loss=close", drop)

    modern = psycopg.connect(rig.sidecar.dsn(password=rig.cluster.users["app"], application_name="modern"))
    modern.execute("INSERT INTO tx_t VALUES (3)")
    assert rig.cluster.terminate(rig.backend_pid("modern"))
    assert len(rig.sidecar.wait_drops(2)) == 2
    with pytest.raises(psycopg.OperationalError) as info:
        modern.execute("INSERT INTO tx_t VALUES (4)")
    # The server's own FATAL, passed on as PgBouncer does.
    assert info.value.diag.sqlstate == "57P01" and info.value.diag.severity == "FATAL", str(info.value)
    assert "terminating connection due to administrator command" in str(info.value)
    assert modern.closed
    assert _rows(rig, "tx_t") == []
