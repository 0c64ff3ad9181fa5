"""Socket-free transcripts of the relay brain (pgsidecar.relay.connection.SidecarConnection).

mitmproxy's Playbook style (docs/architecture.md, Style): feed events, assert the exact commands. The server's
side is built with pgsidecar.wire.backend encoders; a real PostgreSQL would send the same bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgsidecar.auth.scram import ScramServer
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import (
    BACKEND_PID,
    FACTS_QUERY,
    FACTS_REPLY,
    LOST_IN_FLIGHT,
    LOST_IN_TRANSACTION,
    PARAMS,
    PASSWORD,
    SECRET,
    SERVER_PARAMS,
    Playbook,
    client_hello,
    drop_record,
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

# ---------------------------------------------------------------- startup


@pytest.mark.parametrize(("tls", "answer"), [(True, cmd.StartClientTLS()), (False, cmd.SendToClient(b"N"))])
def test_ssl_request(tls: bool, answer: object) -> None:
    pb = Playbook(client_tls=tls)
    pb.client_connected()
    assert pb.client(fe.SSLRequest().encode()) == [answer]
    assert pb.conn.phase is Phase.STARTUP


def test_ssl_then_startup_over_tls() -> None:
    pb = Playbook()
    pb.client_connected(trusted=False)
    assert pb.client(fe.SSLRequest().encode()) == [cmd.StartClientTLS()]
    assert pb.handle(ev.ClientTLSStarted(pb.now)) == []
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode()) == [cmd.CancelTimer("startup"), cmd.OpenServer()]


def test_ssl_request_with_pipelined_bytes_is_refused() -> None:
    """A client that sends data after SSLRequest before the answer could be fooled (CVE-2021-23222)."""
    pb = Playbook()
    pb.client_connected()
    out = pb.client(fe.SSLRequest().encode() + fe.StartupMessage(dict(PARAMS)).encode())
    assert [type(c) for c in out][:3] == [cmd.SendToClient, cmd.CloseClient, cmd.CloseServer]
    assert messages(to_client(out))[0][0] == b"E"
    assert b"C08P01\x00" in to_client(out)


def test_gssenc_request_is_answered_n() -> None:
    pb = Playbook()
    pb.client_connected()
    assert pb.client(fe.GSSENCRequest().encode()) == [cmd.SendToClient(b"N")]
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode()) == [cmd.CancelTimer("startup"), cmd.OpenServer()]


def test_cancel_request_is_forwarded_and_the_socket_closed() -> None:
    pb = Playbook()
    pb.client_connected()
    assert pb.client(fe.CancelRequest(1234, b"\x01\x02\x03\x04").encode()) == [
        cmd.ForwardCancel(1234, b"\x01\x02\x03\x04"),
        cmd.CloseClient(),
    ]
    assert pb.conn.phase is Phase.CLOSED


def test_startup_in_pieces() -> None:
    pb = Playbook()
    pb.client_connected()
    packet = fe.StartupMessage(dict(PARAMS)).encode()
    for i in range(len(packet) - 1):
        assert pb.client(packet[i : i + 1]) == []
    assert pb.client(packet[-1:]) == [cmd.CancelTimer("startup"), cmd.OpenServer()]


def test_startup_without_database_uses_the_user_name() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage({"user": "bob"}).encode())
    assert pb.server_connected() == [cmd.SendToServer(fe.StartupMessage({"user": "bob", "database": "bob"}).encode())]


def test_startup_timeout_closes_the_client() -> None:
    pb = Playbook(startup_timeout_s=2.5)
    assert pb.client_connected() == [cmd.SetTimer("startup", 2.5)]
    out = pb.timer("startup")
    assert out == [cmd.CloseClient(), cmd.CloseServer()]
    assert "did not finish startup" in pb.logs[-1].message
    assert pb.conn.phase is Phase.CLOSED


def test_startup_timeout_covers_the_password_exchange() -> None:
    """config/pgsidecar.yaml: "a client that has not finished startup and auth by then is stuck"."""
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    out = pb.server(be.AuthenticationCleartextPassword().encode())
    # While pgsidecar waits for the client's password, the startup timer runs again.
    assert cmd.SetTimer("startup", pb.conn.ctx.policy.startup_timeout_s) in out
    out = pb.timer("startup")
    assert cmd.CloseClient() in out and cmd.CloseServer() in out


def test_startup_timer_after_startup_is_ignored() -> None:
    pb = Playbook()
    login(pb)
    assert pb.timer("startup") == []
    assert pb.conn.phase is Phase.RELAYING


@pytest.mark.parametrize("version", [(2, 0), (4, 0)])
def test_unsupported_protocol_version(version: tuple[int, int]) -> None:
    pb = Playbook()
    pb.client_connected()
    out = pb.client(fe.StartupMessage({"user": "app"}, version[0] << 16 | version[1]).encode())
    assert out[:3] == [out[0], cmd.CloseClient(), cmd.CloseServer()]
    ((kind, payload),) = messages(to_client(out))
    err = be.ErrorResponse.decode(payload)
    assert (kind, err.severity, err.code) == (b"E", "FATAL", "0A000")
    assert f"unsupported frontend protocol {version[0]}.{version[1]}" in err.message


def test_newer_minor_version_gets_negotiate_protocol_version() -> None:
    pb = Playbook()
    pb.client_connected()
    out = pb.client(fe.StartupMessage({"user": "app", "_pq_.x": "1"}, 3 << 16 | 2).encode())
    assert out == [
        cmd.SendToClient(be.NegotiateProtocolVersion(fe.PROTOCOL_3_0, ("_pq_.x",)).encode()),
        cmd.CancelTimer("startup"),
        cmd.OpenServer(),
    ]


def test_cleartext_password_refused_off_loopback_without_tls() -> None:
    pb = Playbook()
    pb.client_connected(trusted=False)
    out = pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "28000")
    assert cmd.CloseClient() in out and cmd.OpenServer() not in out


@pytest.mark.parametrize(
    "garbage", [b"\x00\x00\x00\x02", b"GET / HTTP/1.1\r\n\r\n", b"\xff\xff\xff\xff\x00\x00\x00\x00"]
)
def test_bad_startup_length_is_08p01_and_close(garbage: bytes) -> None:
    pb = Playbook()
    pb.client_connected()
    out = pb.client(garbage)
    assert out[1:3] == [cmd.CloseClient(), cmd.CloseServer()]
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code, err.message) == ("FATAL", "08P01", "invalid length of startup packet")


# ---------------------------------------------------------------- login


@pytest.mark.parametrize("method", ["cleartext", "md5"])
def test_login_with_password_method(method: str) -> None:
    login(Playbook(), method=method)


def test_login_with_scram_against_a_real_scram_server() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    assert pb.server(be.AuthenticationSASL(("SCRAM-SHA-256",)).encode()) == [
        cmd.SendToClient(be.AuthenticationCleartextPassword().encode()),
        cmd.SetTimer("startup", 10.0),
    ]
    out = pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    ((kind, payload),) = messages(to_server(out))
    initial = fe.SASLInitialResponse.decode(payload)
    assert (kind, initial.mechanism) == (b"p", "SCRAM-SHA-256")
    assert initial.data.startswith(b"n,,n=")  # no TLS here: no channel binding
    server = ScramServer(PASSWORD, iterations=4096)
    server_first = server.handle_first(initial.data)
    out = pb.server(be.AuthenticationSASLContinue(server_first).encode())
    ((kind, payload),) = messages(to_server(out))
    server_final = server.handle_final(fe.SASLResponse.decode(payload).data)  # raises on a wrong proof
    assert server.done
    assert pb.server(be.AuthenticationSASLFinal(server_final).encode()) == []
    assert pb.server(hello()) == [
        cmd.RegisterCancelKey(BACKEND_PID, SECRET),
        cmd.SendToClient(client_hello()),
        cmd.SendToServer(FACTS_QUERY),
    ]


def test_scram_plus_is_chosen_when_the_upstream_has_tls_and_offers_it() -> None:
    """55.3.1: over TLS, with SCRAM-SHA-256-PLUS offered, bind to the server certificate."""
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    binding = bytes(range(32))
    pb.handle(ev.ServerConnected(pb.now, 1.7e9, "10.0.0.5", True, binding))
    pb.server(be.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())
    out = pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    ((kind, payload),) = messages(to_server(out))
    initial = fe.SASLInitialResponse.decode(payload)
    assert (kind, initial.mechanism) == (b"p", "SCRAM-SHA-256-PLUS")
    assert initial.data.startswith(b"p=tls-server-end-point,,n=")


def test_hello_split_across_reads() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    data = hello()
    for i in range(len(data) - 1):
        assert pb.server(data[i : i + 1]) == []
    assert pb.server(data[-1:]) == [
        cmd.RegisterCancelKey(BACKEND_PID, SECRET),
        cmd.SendToClient(client_hello()),
        cmd.SendToServer(FACTS_QUERY),
    ]


def test_login_error_on_first_connect_reaches_the_client_unchanged() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationMD5Password(b"salt").encode())
    pb.client(fe.PasswordMessage(b"wrong").encode())
    refusal = be.ErrorResponse(
        (
            ("S", "FATAL"),
            ("V", "FATAL"),
            ("C", "28P01"),
            ("M", 'password authentication failed for user "app"'),
            ("F", "auth.c"),
            ("L", "326"),
            ("R", "auth_failed"),
        )
    ).encode()
    out = pb.server(refusal)
    assert out[:3] == [cmd.SendToClient(refusal), cmd.CloseServer(), cmd.CloseClient()]
    assert len(out) == 3 and "28P01" in pb.logs[-1].message
    assert pb.conn.phase is Phase.CLOSED


def test_password_before_the_server_asks_is_kept_until_it_does() -> None:
    """As PostgreSQL reads a cleartext password the client sent before being asked."""
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    assert pb.client(fe.PasswordMessage(b"early").encode()) == []
    pb.server_connected()
    out = pb.server(be.AuthenticationCleartextPassword().encode())
    assert to_server(out) == fe.PasswordMessage(b"early").encode()
    assert cmd.CloseClient() not in out


# ---------------------------------------------------------------- relaying


def test_query_and_reply_bytes_untouched_one_send_per_chunk() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    batch = fe.Query("SELECT 2").encode() + fe.Query("SELECT 3").encode()
    assert pb.client(batch) == [cmd.SendToServer(batch)]
    reply = select_reply(b"2") + select_reply(b"3")
    assert pb.server(reply[:7]) == [cmd.SendToClient(reply[:7])]
    assert pb.server(reply[7:]) == [cmd.SendToClient(reply[7:])]
    assert pb.conn.ctx.pending.idle


def test_extended_protocol_relayed_and_sync_points_counted() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    batch = (
        fe.Parse("", "SELECT $1").encode()
        + fe.Describe(b"S", "").encode()
        + fe.Sync().encode()
        + fe.Execute("").encode()
        + fe.Sync().encode()
    )
    assert pb.client(batch) == [cmd.SendToServer(batch)]
    assert len(pb.conn.ctx.pending) == 2
    part1 = be.ParseComplete().encode() + be.NoData().encode() + z()
    assert pb.server(part1) == [cmd.SendToClient(part1)]
    assert pb.server(z()) == [cmd.SendToClient(z())]
    assert pb.conn.ctx.pending.idle


def test_server_notice_and_parameter_status_pass_through() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    q = fe.Query("SET TimeZone = 'Europe/Paris'").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]
    reply = be.ParameterStatus("TimeZone", "Europe/Paris").encode() + be.CommandComplete("SET").encode() + z()
    out = pb.server(reply)
    assert out[0] == cmd.SendToClient(reply)
    # SET marks the session dirty: the exact state is read before the next client message.
    assert isinstance(out[1], cmd.SendToServer) and b"pg_settings" in out[1].data
    assert pb.conn.ctx.client_params["TimeZone"] == "Europe/Paris"


def test_client_bytes_wait_while_an_internal_query_is_owed() -> None:
    pb = Playbook()
    login(pb, answer_facts=False)
    q2 = fe.Query("SELECT 2").encode()
    assert pb.client(q2) == []  # held: the facts reply comes first
    assert pb.server(FACTS_REPLY) == [cmd.SendToServer(q2)]


def test_client_bad_length_after_login_is_08p01_and_close() -> None:
    pb = Playbook()
    login(pb)
    out = pb.client(b"Q\x00\x00\x00\x02")
    assert out[1:3] == [cmd.CloseClient(), cmd.CloseServer()]
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "08P01")
    assert "invalid message length 2" in err.message
    assert pb.logs and "client protocol error" in pb.logs[-1].message
    assert pb.conn.phase is Phase.CLOSED


def test_client_message_over_the_limit_is_08p01_and_close() -> None:
    pb = Playbook(max_message_bytes=1 << 20)
    login(pb)
    out = pb.client(b"Q" + (2 << 20).to_bytes(4, "big") + b"SELECT")
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "08P01")
    assert "exceeds the limit" in err.message
    assert cmd.CloseClient() in out and not any(isinstance(c, cmd.SendToServer) for c in out)


def test_malformed_parse_is_a_client_protocol_error() -> None:
    """A Parse without its NUL-terminated name is the client's fault (08P01), not an internal bug."""
    pb = Playbook()
    login(pb)
    out = pb.client(b"P" + (4 + 3).to_bytes(4, "big") + b"abc")
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "08P01")
    assert cmd.CloseClient() in out


def test_server_bad_length_is_treated_as_a_broken_upstream() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    out = pb.server(b"Z\x00\x00\x00\x01")
    assert "server protocol error" in pb.logs[-1].message
    assert cmd.CloseServer() in out and cmd.OpenServer(reconnect=True) in out  # idle: reconnect, client unaware
    assert to_client(out) == b""


# ---------------------------------------------------------------- drops


def test_idle_drop_is_hidden() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    assert pb.server_closed() == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    assert pb.conn.phase is Phase.RECONNECTING
    out = reconnect(pb)
    assert out == [out[0], cmd.CancelTimer("deadline")]
    record = drop_record(out)
    assert record.state == "idle" and record.impact == "transparent"
    assert record.reconnect.succeeded is True
    assert record.upstream.backend_pid == BACKEND_PID
    # The session goes on with the new backend; the client's key still names the first pid.
    q = fe.Query("SELECT 5").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]
    assert pb.server(select_reply(b"5")) == [cmd.SendToClient(select_reply(b"5"))]
    assert pb.conn.ctx.first_backend_pid == BACKEND_PID and pb.conn.ctx.backend_key == (5555, b"\x99\x88\x77\x66")


def test_client_bytes_during_reconnect_are_held_then_sent() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    pb.server_closed()
    q = fe.Query("SELECT 7").encode()
    assert pb.client(q) == [cmd.SetTimer("deadline", 30.0)]  # a waiting request: its deadline starts
    out = reconnect(pb)
    assert out[-1] == cmd.SendToServer(q)
    assert to_client(out) == b""


def test_changed_parameter_reaches_the_client_after_reconnect() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    pb.server_closed()
    out = reconnect(pb, params=dict(SERVER_PARAMS, server_version="15.6"))
    assert out[0] == cmd.SendToClient(be.ParameterStatus("server_version", "15.6").encode())


def test_idle_drop_with_the_servers_fatal_is_hidden() -> None:
    """pg_terminate_backend on an idle session: FATAL 57P01, then EOF. The app must not know."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    out = pb.server(error("FATAL", "57P01", "terminating connection due to administrator command"))
    out += pb.server_closed()
    assert to_client(out) == b""
    assert out[-3:] == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    record = drop_record(reconnect(pb))
    assert record.observed.sqlstate == "57P01"


def test_drop_inside_a_transaction_with_a_request_in_flight() -> None:
    pb = Playbook()
    login(pb)
    begin = fe.Query("BEGIN").encode()
    pb.client(begin)
    reply = be.CommandComplete("BEGIN").encode() + z(b"T")
    assert pb.server(reply) == [cmd.SendToClient(reply)]
    insert = fe.Query("INSERT INTO t VALUES (1)").encode()
    assert pb.client(insert) == [cmd.SendToServer(insert)]
    out = pb.server_closed("reset")
    assert out == [
        cmd.CloseServer(),
        cmd.SendToClient(error("ERROR", "08006", LOST_IN_TRANSACTION) + z(b"E")),
        cmd.OpenServer(reconnect=True),
    ]
    # The client ends its block: answered here, nothing reaches any server.
    rollback = pb.client(fe.Query("ROLLBACK").encode())
    assert rollback == [cmd.SendToClient(be.CommandComplete("ROLLBACK").encode() + z(b"I"))]
    record = drop_record(reconnect(pb))
    assert record.state == "in_transaction" and record.impact.startswith("error 08006")
    q = fe.Query("SELECT 1").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]


def test_drop_idle_in_transaction_owes_the_error_to_the_next_request() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    assert pb.server_closed() == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    assert pb.client(fe.Query("SELECT 1").encode()) == [
        cmd.SendToClient(error("ERROR", "08006", LOST_IN_TRANSACTION) + z(b"E"))
    ]
    assert pb.client(fe.Query("ROLLBACK").encode()) == [
        cmd.SendToClient(be.CommandComplete("ROLLBACK").encode() + z(b"I"))
    ]


def test_drop_with_an_autocommit_request_in_flight_is_08007() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    update = fe.Query("UPDATE t SET v = v + 1").encode()
    assert pb.client(update) == [cmd.SendToServer(update)]
    out = pb.server_closed("reset")
    assert out == [
        cmd.CloseServer(),
        cmd.SendToClient(error("ERROR", "08007", LOST_IN_FLIGHT) + z(b"I")),
        cmd.OpenServer(reconnect=True),
    ]
    record = drop_record(reconnect(pb))
    assert record.state == "request_in_flight" and "08007" in record.impact


def test_drop_with_commit_in_flight_is_08007() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.client(fe.Query("COMMIT").encode())
    out = pb.server_closed()
    assert to_client(out) == error("ERROR", "08007", LOST_IN_FLIGHT) + z(b"I")
    q = fe.Query("SELECT 1").encode()
    assert pb.client(q) == [cmd.SetTimer("deadline", 30.0)]  # no local abort: held, with its deadline


def test_idle_session_timeout_with_a_request_sent_is_resent_after_replay() -> None:
    """57P05 is sent while the backend waits for a command, so a request that crossed it was
    never read (postgres.c): reconnect, replay, send the same bytes again; the client sees only
    the answer."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    request = fe.Query("INSERT INTO t VALUES (1)").encode()
    assert pb.client(request) == [cmd.SendToServer(request)]
    out = pb.server(error("FATAL", "57P05", "terminating connection due to idle-session timeout"))
    out += pb.server_closed()
    out += reconnect(pb)
    assert to_client(out) == b""
    assert out[-1] == cmd.SendToServer(request)
    reply = be.CommandComplete("INSERT 0 1").encode() + z()
    assert pb.server(reply) == [cmd.SendToClient(reply)]


def test_an_idle_session_never_gives_up_while_its_client_stays() -> None:
    """An outage longer than reconnect.deadline: no deadline runs while nothing waits, the backoff
    stays capped, and the client is never closed (issue 12: the app's next request used to find a
    closed connection)."""
    pb = Playbook(reconnect_deadline_s=5.0)
    login(pb)
    first_query(pb)
    assert pb.server_closed() == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    for i in range(40):  # 40 failed attempts, far past the 5 s deadline
        out = pb.handle(ev.ServerConnectFailed(pb.now + 10 * i, "refused", "connection refused", "ECONNREFUSED"))
        assert out[0] == cmd.CloseServer() and isinstance(out[1], cmd.SetTimer) and out[1].name == "backoff"
        assert out[1].delay_s <= 2.0  # reconnect.backoff_max
        assert cmd.CloseClient() not in out and to_client(out) == b""
        assert pb.timer("backoff") == [cmd.OpenServer(reconnect=True)]
    assert pb.conn.phase is Phase.RECONNECTING


def test_a_request_waits_the_deadline_from_its_arrival_then_gets_08006_and_the_session_stays() -> None:
    pb = Playbook(reconnect_deadline_s=5.0)
    login(pb)
    first_query(pb)
    pb.server_closed()
    pb.handle(ev.ServerConnectFailed(pb.now + 1, "refused", "connection refused", "ECONNREFUSED"))
    q = fe.Query("INSERT INTO t VALUES (1)").encode()
    assert pb.client(q) == [cmd.SetTimer("deadline", 5.0), cmd.CancelTimer("backoff"), cmd.OpenServer(reconnect=True)]
    pb.handle(ev.ServerConnectFailed(pb.now + 2, "refused", "connection refused", "ECONNREFUSED"))
    out = pb.timer("deadline")
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("ERROR", "08006")
    assert "could not reconnect within 5 s" in err.message and "connection refused" in err.message
    assert to_client(out).endswith(z(b"I")) and cmd.CloseClient() not in out
    assert pb.conn.phase is Phase.RECONNECTING
    # The next request starts its own deadline; when the server is back it runs there.
    q2 = fe.Query("INSERT INTO t VALUES (2)").encode()
    assert pb.client(q2)[0] == cmd.SetTimer("deadline", 5.0)
    out = reconnect(pb)
    assert to_server(out).endswith(q2) and q not in to_server(out)
    record = drop_record(out)
    assert record.reconnect is not None and record.reconnect.succeeded is True
    assert record.impact.startswith("error 08006 to waiting requests")


def test_a_waiting_extended_group_is_answered_once_at_its_sync() -> None:
    pb = Playbook(reconnect_deadline_s=5.0)
    login(pb)
    first_query(pb)
    pb.server_closed()
    bind = b"B" + (4 + 2 + 6).to_bytes(4, "big") + b"\x00\x00" + b"\x00\x00" * 3  # unnamed, no params
    group = fe.Parse("", "SELECT 1", ()).encode() + bind
    pb.client(group)
    out = pb.timer("deadline")
    assert [t for t, _ in messages(to_client(out))] == [b"E"]  # the group is open: no Z yet
    assert pb.client(fe.Execute("", 0).encode() + fe.Sync().encode()) == [cmd.SendToClient.mine(z(b"I"))]
    assert pb.conn.phase is Phase.RECONNECTING


def test_a_client_that_leaves_during_the_reconnect_abandons_it() -> None:
    """Neither a success nor a failure: the record says abandoned, so it is no restart sign."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    pb.server_closed()
    pb.handle(ev.ServerConnectFailed(pb.now + 1, "refused", "connection refused", "ECONNREFUSED"))
    out = pb.handle(ev.ClientClosed(pb.now + 2))
    record = drop_record(out)
    assert record.reconnect is not None and record.reconnect.abandoned is True
    assert record.reconnect.succeeded is False and record.impact == "client left during reconnect"
    assert pb.conn.phase is Phase.CLOSED


def test_non_replayable_state_then_drop_is_fatal_naming_it() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    create = fe.Query("CREATE TEMP TABLE scratch (id int)").encode()
    assert pb.client(create) == [cmd.SendToServer(create)]
    out = pb.server(be.CommandComplete("CREATE TABLE").encode() + z())
    snapshot = to_server(out)
    assert b"pg_my_temp_schema" in snapshot  # the exact state is read at the idle point
    row = be.DataRow((b"[]", b"[]", b"app", b"none", b"[]", b"[]", b"[]", b"1", b"0", b"0")).encode()
    assert (
        pb.server(be.RowDescription(tuple("abcdefghij")).encode() + row + be.CommandComplete("SELECT 1").encode() + z())
        == []
    )
    out = pb.server_closed()
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert (err.severity, err.code) == ("FATAL", "08006")
    assert "1 temporary table(s)" in err.message
    assert cmd.CloseClient() in out and cmd.OpenServer() not in out
    assert drop_record(out).reconnect.succeeded is False


def test_replay_of_settings_after_a_drop() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    pb.client(fe.Query("SET statement_timeout = '5s'").encode())
    out = pb.server(be.CommandComplete("SET").encode() + z())
    assert b"pg_settings" in to_server(out)
    row = be.DataRow(
        (b'[["statement_timeout", "5s"]]', b"[]", b"app", b"none", b"[]", b"[]", b"[]", b"0", b"0", b"0")
    ).encode()
    pb.server(be.RowDescription(tuple("abcdefghij")).encode() + row + be.CommandComplete("SELECT 1").encode() + z())
    pb.server_closed()
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    out = pb.server(hello(pid=6000))
    (kind, payload), (kind2, _) = messages(to_server(out))
    assert (kind, kind2) == (b"Q", b"Q")
    assert "set_config($pgsc$statement_timeout$pgsc$, $pgsc$5s$pgsc$, false)" in fe.Query.decode(payload).sql
    replay_reply = (
        be.RowDescription(("set_config",)).encode()
        + be.DataRow((b"5s",)).encode()
        + be.CommandComplete("SELECT 1").encode()
        + z()
    )
    assert pb.server(replay_reply) == []
    out = pb.server(FACTS_REPLY)
    assert "1 setting(s)" in drop_record(out).reconnect.replayed


def test_client_close_during_relaying_closes_the_server() -> None:
    pb = Playbook()
    login(pb)
    assert pb.handle(ev.ClientClosed(pb.now)) == [cmd.CloseServer()]
    assert pb.conn.phase is Phase.CLOSED


def test_terminate_then_server_close_closes_the_client_without_reconnect() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    x = fe.Terminate().encode()
    assert pb.client(x) == [cmd.SendToServer(x)]
    assert pb.server_closed() == [cmd.CloseClient()]


# ---------------------------------------------------------------- fuzz: client bytes never crash the brain

_client_message = st.one_of(
    st.tuples(st.sampled_from(list(b"QPBDESCXFHdcfp")), st.binary(max_size=40)).map(
        lambda m: bytes([m[0]]) + (len(m[1]) + 4).to_bytes(4, "big") + m[1]
    ),
    st.binary(max_size=12),
)


def _fuzz_client(pb: Playbook, chunks: list[bytes]) -> None:
    for chunk in chunks:
        out = pb.client(chunk)  # anything but a crash: handle() turns client faults into 08P01
        if pb.conn.phase is Phase.CLOSED:
            assert cmd.CloseClient() in out
            assert b"C08P01\x00" in to_client(out)
            return


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_client_message, max_size=8))
def test_arbitrary_client_bytes_while_relaying_never_crash(chunks: list[bytes]) -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    _fuzz_client(pb, chunks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_client_message, max_size=8))
def test_arbitrary_client_bytes_after_a_lost_transaction_never_crash(chunks: list[bytes]) -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.server_closed()
    assert pb.conn.ctx.responder is not None
    _fuzz_client(pb, chunks)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_at_startup_never_crash(data: bytes) -> None:
    pb = Playbook()
    pb.client_connected()
    out = pb.client(data)
    if pb.conn.phase is Phase.CLOSED and cmd.CloseClient() in out and to_client(out):
        assert messages(to_client(out))[-1][0] == b"E"


_server_message = st.one_of(
    st.tuples(st.sampled_from(list(b"ZECSNDTA12nsKRv")), st.binary(max_size=40)).map(
        lambda m: bytes([m[0]]) + (len(m[1]) + 4).to_bytes(4, "big") + m[1]
    ),
    st.binary(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_server_message, max_size=8), mode=st.sampled_from(["request", "transaction", "internal"]))
def test_arbitrary_server_bytes_never_crash(chunks: list[bytes], mode: str) -> None:
    pb = Playbook()
    login(pb, answer_facts=mode != "internal")  # internal: the facts query is owed
    if mode != "internal":
        first_query(pb)
        if mode == "transaction":
            pb.client(fe.Query("BEGIN").encode())
            pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
        pb.client(fe.Query("SELECT 1").encode())
    for chunk in chunks:
        pb.server(chunk)  # a broken upstream is a drop, never an exception
        if pb.conn.phase is not Phase.RELAYING:
            break


def test_password_split_across_reads() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    data = fe.PasswordMessage(PASSWORD.encode()).encode()
    assert pb.client(data[:3]) == []
    assert pb.client(data[3:]) == [cmd.CancelTimer("startup"), cmd.SendToServer(data)]


def test_a_query_instead_of_the_password_is_08p01() -> None:
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    out = pb.client(fe.Query("SELECT 1").encode())
    ((kind, payload),) = messages(to_client(out))
    assert (kind, be.ErrorResponse.decode(payload).code) == (b"E", "08P01")
    assert cmd.CloseClient() in out


def test_a_notice_during_login_reaches_the_client_well_formed() -> None:
    """A NOTICE the server sends before ReadyForQuery (e.g. from a login trigger) is passed on
    with its own length; a wrong length would desynchronise the client's framing."""
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    notice = be.NoticeResponse.make("NOTICE", "00000", "welcome").encode()
    data = hello()
    out = pb.server(data[:-6] + notice + data[-6:])
    kinds = [kind for kind, _ in messages(to_client(out))]
    assert kinds[-2:] == [b"N", b"Z"]
    assert notice in to_client(out)


def test_the_brain_says_how_to_open_the_upstream() -> None:
    """sslmode=prefer: TLS first, and a failed handshake retried in plaintext (libpq's rule),
    decided by the brain from its policy and carried out by the runtime."""
    pb = Playbook(open_tls=True, plaintext_retry=True)
    pb.client_connected()
    out = pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    assert out == [cmd.CancelTimer("startup"), cmd.OpenServer(use_tls=True, plaintext_retry=True)]
