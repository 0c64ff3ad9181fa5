"""Transcripts of parking (upstream.park_after, relay/parking.py): an idle session's upstream is
closed by pgsidecar and reopened by its next request, through the reconnect path but never as a
drop. Every transcript here also checks that no RecordDrop was ever given."""

from __future__ import annotations

from pgsidecar.config.load import load_config
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.phases import Phase
from pgsidecar.runtime.listener import policy_from_config
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import (
    ANY,
    BACKEND_PID,
    BACKEND_SECRET,
    FACTS_QUERY,
    FACTS_REPLY,
    PARAMS,
    PASSWORD,
    SECRET,
    Playbook,
    client_hello,
    error,
    first_query,
    hello,
    login,
    messages,
    reconnect,
    select_reply,
    to_client,
    to_server,
    z,
)

PARK_S = 300.0
TERMINATE = fe.Terminate().encode()
NEW_PID, NEW_SECRET = 5555, b"\x99\x88\x77\x66"  # the key reconnect() logs in with
PARKED_OUT = [cmd.SendToServer(TERMINATE), cmd.CloseServer()]


class ParkingPlaybook(Playbook):
    """A Playbook that keeps every command, so a test can say no drop was ever recorded."""

    def __init__(self, **policy: object) -> None:
        super().__init__(**{"park_after_s": PARK_S, **policy})
        self.seen: list[object] = []

    def handle(self, event: ev.Event) -> list[object]:
        out = super().handle(event)
        self.seen += out
        return out

    def idle(self, seconds: float) -> None:
        """Time passes with no bytes either way (the next event's tick adds 0.5 s)."""
        self.now += seconds - 0.5

    def assert_no_drop(self) -> None:
        assert not [c for c in self.seen if isinstance(c, cmd.RecordDrop)], self.seen


def park_login(pb: ParkingPlaybook) -> None:
    """playbook.login, with the one PARK timer armed as relaying starts."""
    assert pb.client_connected() == [cmd.SetTimer("startup", 10.0)]
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode()) == [cmd.CancelTimer("startup"), cmd.OpenServer()]
    assert pb.server_connected() == [cmd.SendToServer(fe.StartupMessage(dict(PARAMS)).encode())]
    assert pb.server(be.AuthenticationCleartextPassword().encode()) == [
        cmd.SendToClient(be.AuthenticationCleartextPassword().encode()),
        cmd.SetTimer("startup", 10.0),
    ]
    password = fe.PasswordMessage(PASSWORD.encode()).encode()
    assert pb.client(password) == [cmd.CancelTimer("startup"), cmd.SendToServer(password)]
    assert pb.server(hello()) == [
        cmd.RegisterCancelKey(BACKEND_PID, SECRET),
        cmd.SendToClient(client_hello()),
        cmd.SendToServer(FACTS_QUERY),
        cmd.SetTimer("park", PARK_S),
    ]
    assert pb.server(FACTS_REPLY) == []
    assert pb.conn.phase is Phase.RELAYING


def parked(**policy: object) -> ParkingPlaybook:
    """A session that ran one query, then sat idle until it was parked."""
    pb = ParkingPlaybook(**policy)
    park_login(pb)
    first_query(pb)
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT
    assert pb.conn.phase is Phase.PARKED
    return pb


def snapshot_row(
    *, settings: bytes = b"[]", sql_prepared: bytes = b"[]", listen: bytes = b"[]", temp: int = 0
) -> bytes:
    """The reply to the session-state snapshot (session/state.py snapshot_sql, one row)."""
    row = be.DataRow(
        (settings, b"[]", b"app", b"none", b"[]", sql_prepared, listen, str(temp).encode(), b"0", b"0")
    ).encode()
    return be.RowDescription(tuple("abcdefghij")).encode() + row + be.CommandComplete("SELECT 1").encode() + z()


def run_and_snapshot(pb: ParkingPlaybook, sql: str, tag: str, row: bytes) -> None:
    """The client runs a statement that changes session state; the brain reads the state after."""
    q = fe.Query(sql).encode()
    assert pb.client(q) == [cmd.SendToServer(q)]
    out = pb.server(be.CommandComplete(tag).encode() + z())
    assert b"pg_settings" in to_server(out)  # the snapshot query, at the idle point
    assert pb.server(row) == []


# ---------------------------------------------------------------- when a session is parked


def test_an_idle_session_is_parked_and_the_client_sees_nothing() -> None:
    pb = parked()
    assert pb.parking == [cmd.NoteParking(parked=True)]
    assert [log.level for log in pb.logs] == [cmd.LogLevel.DEBUG]
    assert "parked after 300.0 s idle" in pb.logs[0].message
    assert to_client(pb.seen[-2:]) == b""
    pb.assert_no_drop()


def test_no_timer_without_park_after() -> None:
    """The default (off): the login's commands are exactly those of every other transcript."""
    pb = Playbook()
    login(pb)
    first_query(pb)


def test_a_busy_session_looks_again_when_it_could_be_idle_enough() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    pb.idle(200)
    first_query(pb)  # activity 200 s in: the server's reply is the last byte
    pb.idle(100)
    assert pb.timer("park") == [cmd.SetTimer("park", 200.0)]  # 100 s idle, 200 s to go
    pb.idle(200)
    assert pb.timer("park") == PARKED_OUT
    pb.assert_no_drop()


def test_client_bytes_count_as_activity_too() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    pb.idle(250)
    q = fe.Query("SELECT 1").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]  # a long query: the server says nothing for a while
    pb.idle(100)
    assert pb.timer("park") == [cmd.SetTimer("park", 200.0)]  # the client's bytes were activity
    pb.idle(200)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]  # idle that long, but a reply is owed


def test_not_parked_inside_a_transaction() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.idle(PARK_S + 60)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]
    assert pb.conn.phase is Phase.RELAYING
    # The transaction ends; the next look after a whole idle period parks.
    pb.client(fe.Query("COMMIT").encode())
    pb.server(be.CommandComplete("COMMIT").encode() + z())
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT


def test_not_parked_in_a_failed_transaction() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.client(fe.Query("SELECT 1/0").encode())
    pb.server(error("ERROR", "22012", "division by zero") + z(b"E"))
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]


def test_not_parked_with_a_request_owed() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    q = fe.Query("SELECT pg_sleep(3600)").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]
    pb.idle(PARK_S * 2)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]
    assert pb.conn.phase is Phase.RELAYING


def test_not_parked_inside_an_open_extended_group() -> None:
    """Parse and Bind sent, no Sync yet (a client between Flush and Sync): not between requests."""
    pb = ParkingPlaybook()
    park_login(pb)
    group = fe.Parse("", "SELECT 1", ()).encode()
    assert pb.client(group) == [cmd.SendToServer(group)]
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]


def test_not_parked_with_temporary_tables() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    run_and_snapshot(pb, "CREATE TEMP TABLE scratch (id int)", "CREATE TABLE", snapshot_row(temp=1))
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]
    assert pb.conn.phase is Phase.RELAYING
    pb.assert_no_drop()


def test_not_parked_while_listening() -> None:
    """Notifications sent while no server connection listens would be lost."""
    pb = ParkingPlaybook()
    park_login(pb)
    run_and_snapshot(pb, "LISTEN jobs", "LISTEN", snapshot_row(listen=b'["jobs"]'))
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]
    # UNLISTEN: nothing is lost any more, so the next idle period parks.
    run_and_snapshot(pb, "UNLISTEN jobs", "UNLISTEN", snapshot_row())
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT


def test_not_parked_when_a_prepare_could_not_be_replayed_alone() -> None:
    """plan_replay refuses a SQL PREPARE sent with other statements: parking would lose it."""
    pb = ParkingPlaybook()
    park_login(pb)
    row = snapshot_row(sql_prepared=b"[\"SELECT 1; PREPARE q AS SELECT 'a;b'\"]")
    run_and_snapshot(pb, "SELECT 1; PREPARE q AS SELECT 'a;b'", "PREPARE", row)
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]


def test_the_timer_survives_a_drop_and_parks_after_it() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    first_query(pb)
    assert pb.server_closed() == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    pb.idle(PARK_S)
    assert pb.timer("park") == [cmd.SetTimer("park", PARK_S)]  # reconnecting: look again later
    reconnect(pb)  # the drop's reconnect, recorded as drops are
    assert pb.conn.phase is Phase.RELAYING
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT


def test_a_draining_session_arms_nothing() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    assert pb.handle(ev.Drain(pb.now)) == []
    assert pb.conn.phase is Phase.DRAINING
    pb.idle(PARK_S)
    assert pb.timer("park") == []


# ---------------------------------------------------------------- unparking


def test_the_next_request_unparks_replays_then_runs() -> None:
    pb = parked()
    q = fe.Query("SELECT 5").encode()
    # Held, with its reconnect.deadline from now; a fresh connect as a reconnect opens one.
    assert pb.client(q) == [cmd.SetTimer("deadline", 30.0), cmd.OpenServer(reconnect=True)]
    assert pb.conn.phase is Phase.RECONNECTING
    out = reconnect(pb)  # startup, the kept password, login, the facts query
    assert out == [
        cmd.CancelTimer("deadline"),
        cmd.SetTimer("park", PARK_S),
        cmd.SendToServer(q),
    ]
    assert pb.conn.phase is Phase.RELAYING
    assert pb.parking == [cmd.NoteParking(parked=True), cmd.NoteParking(parked=False, unpark_s=2.0)]
    assert "unparked in 2000.0 ms" in pb.logs[-1].message
    assert pb.server(select_reply(b"5")) == [cmd.SendToClient(select_reply(b"5"))]
    assert pb.conn.ctx.backend_key == (NEW_PID, NEW_SECRET)
    assert pb.conn.ctx.first_backend_pid == BACKEND_PID  # the client's key is the one it was given
    pb.assert_no_drop()


def test_unpark_replays_settings_and_prepared_statements_before_the_request() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    settings = b'[["statement_timeout", "5s"]]'
    run_and_snapshot(pb, "SET statement_timeout = '5s'", "SET", snapshot_row(settings=settings))
    prepare = b'["PREPARE q AS SELECT 1"]'
    run_and_snapshot(pb, "PREPARE q AS SELECT 1", "PREPARE", snapshot_row(settings=settings, sql_prepared=prepare))
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT
    execute = fe.Query("EXECUTE q").encode()
    assert pb.client(execute) == [cmd.SetTimer("deadline", 30.0), cmd.OpenServer(reconnect=True)]
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    out = pb.server(hello(pid=NEW_PID, secret=NEW_SECRET))
    (kind, payload), (kind2, _) = messages(to_server(out))
    assert (kind, kind2) == (b"Q", b"Q")
    replay = fe.Query.decode(payload).sql
    assert "set_config($pgsc$statement_timeout$pgsc$, $pgsc$5s$pgsc$, false)" in replay
    assert "PREPARE q AS SELECT 1" in replay
    assert execute not in to_server(out)  # the request waits for the replay
    replay_reply = (
        be.RowDescription(("set_config",)).encode()
        + be.DataRow((b"5s",)).encode()
        + be.CommandComplete("SELECT 1").encode()
        + be.CommandComplete("PREPARE").encode()
        + z()
    )
    assert pb.server(replay_reply) == []
    out = pb.server(FACTS_REPLY)
    assert out[-1] == cmd.SendToServer(execute)
    assert to_client(out) == b""
    pb.assert_no_drop()


def test_a_request_split_across_reads_is_held_whole() -> None:
    pb = parked()
    q = fe.Query("SELECT 'a long statement'").encode()
    assert pb.client(q[:7]) == [cmd.SetTimer("deadline", 30.0), cmd.OpenServer(reconnect=True)]
    assert pb.client(q[7:]) == []  # held with the first part; the connect is under way
    out = reconnect(pb)
    assert to_server(out) == q


def test_a_failed_unpark_backs_off_then_the_request_gets_08006_and_the_client_stays() -> None:
    pb = parked(reconnect_deadline_s=5.0)
    q = fe.Query("INSERT INTO t VALUES (1)").encode()
    assert pb.client(q) == [cmd.SetTimer("deadline", 5.0), cmd.OpenServer(reconnect=True)]
    out = pb.handle(ev.ServerConnectFailed(pb.now + 1, "refused", "connection refused", "ECONNREFUSED"))
    assert out == [cmd.CloseServer(), cmd.SetTimer("backoff", ANY)]
    assert pb.timer("backoff") == [cmd.OpenServer(reconnect=True)]
    pb.handle(ev.ServerConnectFailed(pb.now + 1, "refused", "connection refused", "ECONNREFUSED"))
    out = pb.timer("deadline")
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("ERROR", "08006")
    assert err.message == "pgsidecar: could not reconnect within 5 s: refused: connection refused"
    assert to_client(out).endswith(z(b"I")) and cmd.CloseClient() not in out
    assert pb.conn.phase is Phase.RECONNECTING
    # The next request waits again and tries at once; when the server is back it runs there.
    q2 = fe.Query("INSERT INTO t VALUES (2)").encode()
    assert pb.client(q2) == [
        cmd.SetTimer("deadline", 5.0),
        cmd.CancelTimer("backoff"),
        cmd.OpenServer(reconnect=True),
    ]
    out = reconnect(pb)
    assert to_server(out) == q2 and cmd.CancelTimer("deadline") in out
    assert pb.parking[-1] == cmd.NoteParking(parked=False, unpark_s=ANY)
    assert pb.conn.phase is Phase.RELAYING
    pb.assert_no_drop()


def test_a_deadline_before_any_connect_error_says_the_connect_was_under_way() -> None:
    pb = parked(reconnect_deadline_s=5.0)
    pb.client(fe.Query("SELECT 1").encode())
    out = pb.timer("deadline")
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert err.code == "08006" and "still being opened" in err.message
    pb.assert_no_drop()


def test_a_login_refused_on_unpark_backs_off_as_a_reconnect() -> None:
    pb = parked()
    pb.client(fe.Query("SELECT 1").encode())
    pb.server_connected()
    out = pb.server(error("FATAL", "53300", "sorry, too many clients already"))
    assert out == [cmd.CloseServer(), cmd.SetTimer("backoff", ANY)]
    assert to_client(out) == b"" and pb.conn.phase is Phase.RECONNECTING
    pb.assert_no_drop()


def test_a_server_lost_during_the_unpark_replay_is_retried_not_recorded() -> None:
    pb = parked()
    q = fe.Query("SELECT 1").encode()
    pb.client(q)
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    pb.server(hello(pid=NEW_PID, secret=NEW_SECRET))
    assert pb.conn.phase is Phase.REPLAYING
    out = pb.server_closed("reset")
    assert out == [cmd.CloseServer(), cmd.SetTimer("backoff", ANY)]
    assert pb.timer("backoff") == [cmd.OpenServer(reconnect=True)]
    assert to_server(reconnect(pb)) == q
    pb.assert_no_drop()


# ---------------------------------------------------------------- everything else while parked


def test_client_close_while_parked() -> None:
    pb = parked()
    assert pb.handle(ev.ClientClosed(pb.now + 1)) == [cmd.CloseServer()]
    assert pb.conn.phase is Phase.CLOSED
    pb.assert_no_drop()


def test_a_terminate_while_parked_closes_without_unparking() -> None:
    pb = parked()
    assert pb.client(TERMINATE) == [cmd.CloseClient(), cmd.CloseServer()]
    assert pb.conn.phase is Phase.CLOSED
    assert pb.handle(ev.ClientClosed(pb.now + 1)) == []


def test_drain_while_parked_closes_at_once() -> None:
    pb = parked()
    out = pb.handle(ev.Drain(pb.now + 1))
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "57P01")
    assert out[1:] == [cmd.CloseClient(), cmd.CloseServer()]
    assert pb.conn.phase is Phase.CLOSED
    pb.assert_no_drop()


def test_what_the_parked_socket_still_says_is_no_drop() -> None:
    pb = parked()
    assert pb.server(b"") == []
    assert pb.server_closed("eof") == []
    assert pb.conn.phase is Phase.PARKED
    for name in ("deadline", "backoff", "startup"):
        assert pb.timer(name) == []  # a timer from an earlier phase does nothing
    pb.assert_no_drop()


def test_a_cancel_while_parked_has_nothing_to_cancel() -> None:
    pb = parked()
    assert pb.handle(ev.CancelRequested(pb.now + 1)) == []


def test_a_cancel_after_unparking_reaches_the_new_backend() -> None:
    pb = ParkingPlaybook()
    park_login(pb)
    assert pb.handle(ev.CancelRequested(pb.now + 1)) == [cmd.SendCancel(BACKEND_PID, BACKEND_SECRET, 0, "10.0.0.5")]
    first_query(pb)
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT
    q = fe.Query("SELECT pg_sleep(60)").encode()
    pb.client(q)
    assert pb.server_connected(address="10.0.0.9") == [cmd.SendToServer(fe.StartupMessage(dict(PARAMS)).encode())]
    pb.server(be.AuthenticationCleartextPassword().encode())
    pb.server(hello(pid=NEW_PID, secret=NEW_SECRET))
    assert pb.server(FACTS_REPLY)[-1] == cmd.SendToServer(q)
    assert pb.handle(ev.CancelRequested(pb.now + 1)) == [cmd.SendCancel(NEW_PID, NEW_SECRET, 0, "10.0.0.9")]


def test_a_session_parks_again_after_an_unpark() -> None:
    pb = parked()
    first_query_after = fe.Query("SELECT 1").encode()
    pb.client(first_query_after)
    reconnect(pb)
    pb.server(select_reply())
    pb.idle(PARK_S)
    assert pb.timer("park") == PARKED_OUT
    assert [note.parked for note in pb.parking] == [True, False, True]
    pb.assert_no_drop()


# ---------------------------------------------------------------- the setting


def test_park_after_reaches_the_session_policy() -> None:
    def policy(**env: str) -> object:
        return policy_from_config(load_config(path=None, env={"PGHOST": "db", **env}, overrides={})).park_after_s

    assert policy() is None  # off by default
    assert policy(PGSIDECAR_UPSTREAM_PARK_AFTER="5m") == 300.0
    assert policy(PGSIDECAR_UPSTREAM_PARK_AFTER="off") is None
    assert policy(PGSIDECAR_UPSTREAM_PARK_AFTER="0") is None
