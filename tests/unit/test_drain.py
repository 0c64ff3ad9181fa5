"""Drain on SIGTERM, as socket-free transcripts: idle sessions get FATAL 57P01 at once, busy ones at
their next idle point (ReadyForQuery 'I' with nothing owed), never in the middle of a transaction."""

from __future__ import annotations

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.connection import SessionPolicy, SidecarConnection
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import Playbook, login

FACTS = (
    be.RowDescription(("a", "b", "c", "d")).encode()
    + be.DataRow((b"1700000000.5", b"f", b"off", b"127.0.0.1")).encode()
    + be.CommandComplete("SELECT 1").encode()
    + be.ReadyForQuery(b"I").encode()
)


def _logged_in(*, answer_facts: bool = True) -> SidecarConnection:
    """A session past startup and login (the Playbook's), relaying, idle (the server facts read, or owed)."""
    pb = Playbook(client_tls=False)
    login(pb, answer_facts=answer_facts)
    assert pb.conn.phase is Phase.RELAYING
    return pb.conn


def _query(conn: SidecarConnection, sql: str, now: float = 1.0) -> list[object]:
    return conn.handle(ev.ClientData(now, fe.Query(sql).encode()))


def _reply(tag: str, status: bytes) -> bytes:
    return be.CommandComplete(tag).encode() + be.ReadyForQuery(status).encode()


def _fatal_codes(out: list[object]) -> list[str]:
    codes = []
    for c in out:
        if isinstance(c, cmd.SendToClient) and c.data[:1] == b"E":
            err = be.ErrorResponse.decode(c.data[5:])
            codes.append(f"{err.severity} {err.code}")
    return codes


def _closes(out: list[object]) -> bool:
    return any(isinstance(c, cmd.CloseClient) for c in out) and any(isinstance(c, cmd.CloseServer) for c in out)


def test_idle_session_gets_57P01_at_once():
    conn = _logged_in()
    out = conn.drain()
    assert _fatal_codes(out) == ["FATAL 57P01"]
    assert _closes(out)
    assert conn.phase is Phase.CLOSED


def test_open_transaction_finishes_then_57P01():
    conn = _logged_in()
    _query(conn, "BEGIN")
    conn.handle(ev.ServerData(1.1, _reply("BEGIN", b"T")))
    assert conn.drain() == [], "inside a transaction: nothing yet"
    out = _query(conn, "INSERT INTO t VALUES (1)", 1.2)
    assert out == [cmd.SendToServer(fe.Query("INSERT INTO t VALUES (1)").encode())]
    out = conn.handle(ev.ServerData(1.3, _reply("INSERT 0 1", b"T")))
    assert out == [cmd.SendToClient(_reply("INSERT 0 1", b"T"))], "still in the transaction"
    _query(conn, "COMMIT", 1.4)
    out = conn.handle(ev.ServerData(1.5, _reply("COMMIT", b"I")))
    # The COMMIT's own reply reaches the client first, then the shutdown error.
    assert out[0] == cmd.SendToClient(_reply("COMMIT", b"I"))
    assert _fatal_codes(out) == ["FATAL 57P01"]
    assert _closes(out)
    assert conn.phase is Phase.CLOSED


def test_request_in_flight_is_answered_before_57P01():
    conn = _logged_in()
    _query(conn, "SELECT pg_sleep(1)")
    assert conn.drain() == []
    out = conn.handle(ev.ServerData(1.1, be.CommandComplete("SELECT 1").encode()))
    assert _fatal_codes(out) == [] and not _closes(out), "no ReadyForQuery yet"
    out = conn.handle(ev.ServerData(1.2, be.ReadyForQuery(b"I").encode()))
    assert out[0] == cmd.SendToClient(be.ReadyForQuery(b"I").encode())
    assert _fatal_codes(out) == ["FATAL 57P01"] and _closes(out)


def test_failed_transaction_is_not_an_idle_point():
    conn = _logged_in()
    _query(conn, "BEGIN")
    conn.handle(ev.ServerData(1.1, _reply("BEGIN", b"T")))
    conn.drain()
    _query(conn, "SELECT 1/0", 1.2)
    err = be.ErrorResponse.make("ERROR", "22012", "division by zero").encode()
    out = conn.handle(ev.ServerData(1.3, err + be.ReadyForQuery(b"E").encode()))
    assert not _closes(out) and conn.phase is Phase.DRAINING  # still relaying, closes at the idle point
    _query(conn, "ROLLBACK", 1.4)
    out = conn.handle(ev.ServerData(1.5, _reply("ROLLBACK", b"I")))
    assert _fatal_codes(out) == ["FATAL 57P01"] and _closes(out)


def test_pipelined_requests_close_only_when_all_are_answered():
    conn = _logged_in()
    conn.handle(ev.ClientData(1.0, fe.Query("SELECT 1").encode() + fe.Query("SELECT 2").encode()))
    conn.drain()
    out = conn.handle(ev.ServerData(1.1, _reply("SELECT 1", b"I")))
    assert not _closes(out), "one ReadyForQuery still owed"
    out = conn.handle(ev.ServerData(1.2, _reply("SELECT 1", b"I")))
    assert _fatal_codes(out) == ["FATAL 57P01"] and _closes(out)


def test_session_still_in_startup_is_just_closed():
    conn = SidecarConnection(SessionPolicy(client_tls=False), secret=b"\x00\x00\x00\x01")
    conn.handle(ev.ClientConnected(0.0, 0.0, "127.0.0.1:5000", True))
    out = conn.drain()
    assert isinstance(out[0], cmd.CloseClient) and conn.phase is Phase.CLOSED


def test_session_still_logging_in_gets_57P01():
    conn = SidecarConnection(SessionPolicy(client_tls=False), secret=b"\x00\x00\x00\x01")
    conn.handle(ev.ClientConnected(0.0, 0.0, "127.0.0.1:5000", True))
    conn.handle(ev.ClientData(0.1, fe.StartupMessage({"user": "app", "database": "app"}).encode()))
    out = conn.drain()
    assert _fatal_codes(out) == ["FATAL 57P01"] and _closes(out)


def test_drain_while_pgsidecar_reads_session_facts_closes_when_they_arrive():
    conn = _logged_in(answer_facts=False)  # the facts query, sent after the hello, is owed
    assert conn.drain() == [], "a reply is still owed to pgsidecar itself"
    out = conn.handle(ev.ServerData(1.2, FACTS))
    assert not any(isinstance(c, cmd.SendToClient) and c.data[:1] == b"T" for c in out), "facts are swallowed"
    assert _fatal_codes(out) == ["FATAL 57P01"] and _closes(out)
