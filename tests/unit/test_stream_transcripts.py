"""Socket-free transcripts of the stream rules across a drop (issue 10, docs/session-rules.md).

A drop may fall inside a client message or inside a server message. pgsidecar never lets the
rest of a cut client message reach a server as if it were new messages, never writes its own
bytes after part of a server message, applies PostgreSQL's per-type message limits itself, and
tells the app what the server said.
"""

from __future__ import annotations

import struct

import pytest

from pgsidecar.relay import commands as cmd
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.frames import PREFIX_BYTES, FrameScanner, Prefix
from tests.playbook import (
    FACTS_REPLY,
    LOST_IN_FLIGHT,
    PARAMS,
    PASSWORD,
    Playbook,
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

SMUGGLED = fe.Query("CREATE TABLE smuggled()").encode()
COPY_DONE = b"c\x00\x00\x00\x04"
NOT_SENT_WHOLE = "connection to the server was lost before this request reached it whole; it was not executed"
KEPT_HINT = (
    "pgsidecar kept the connection: the transaction was rolled back, and after ROLLBACK "
    "the next transaction runs on a new server connection"
)


def carrier(total_body: int) -> tuple[bytes, bytes]:
    """A Query whose content, after its first bytes, is itself a whole Query (the attack of issue
    10): returns (the first bytes, the rest), the rest being SMUGGLED plus padding messages."""
    head = b"Q" + struct.pack("!I", 4 + total_body) + b"SELECT '"
    rest_len = 1 + 4 + total_body - len(head)
    pad = rest_len - len(SMUGGLED)
    assert pad == 0 or pad >= 6
    rest = SMUGGLED + (b"Q" + struct.pack("!I", pad - 1) + b"x" * (pad - 6) + b"\x00" if pad else b"")
    assert len(rest) == rest_len
    return head, rest


def types(data: bytes) -> list[bytes]:
    return [t for t, _ in messages(data)]


# ---------------------------------------------------------------- a drop inside a client message


def test_cut_query_is_sent_again_whole_never_as_new_messages() -> None:
    """Defect 1: the rest of a cut message must not run as SQL on the new backend."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    head, rest = carrier(50 - 4)
    assert pb.client(head) == [cmd.SendToServer(head)]
    out = pb.server_closed()
    assert to_client(out) == b""  # idle, nothing of the request ran: hidden
    assert pb.client(rest) == []  # held until the new upstream is ready
    out = reconnect(pb)
    record = drop_record(out)
    assert record.state == "idle" and record.impact.startswith("transparent (a request cut")
    # The new server gets the message whole, from its first byte: one Query, not two.
    sent = to_server(out)
    assert sent == head + rest
    assert types(sent) == [b"Q"]
    # The relay is in step: the reply and the next request go through as usual.
    reply = error("ERROR", "42601", "syntax error") + z()
    assert pb.server(reply) == [cmd.SendToClient(reply)]
    q = fe.Query("SELECT 2").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]


def test_cut_query_too_long_to_keep_is_answered_and_its_rest_discarded() -> None:
    pb = Playbook(max_buffered_bytes=1024)
    login(pb)
    head, rest = carrier(4000)
    head, rest = head + rest[: 2000 - len(head)], rest[2000 - len(head) :]
    assert pb.client(head) == [cmd.SendToServer(head)]
    out = pb.server_closed()
    assert to_client(out) == error("ERROR", "08006", NOT_SENT_WHOLE) + z()
    assert pb.client(rest[:700]) == [] and pb.client(rest[700:]) == []  # discarded, never held
    out = reconnect(pb)
    assert to_server(out) == b"" and to_client(out) == b""
    q = fe.Query("SELECT 3").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]


def test_header_cut_in_the_middle_is_kept_and_sent_whole() -> None:
    pb = Playbook()
    login(pb)
    q = fe.Query("SELECT 4").encode()
    assert pb.client(q[:3]) == [cmd.SendToServer(q[:3])]
    pb.server_closed()
    pb.client(q[3:])
    assert to_server(reconnect(pb)) == q


def test_cut_query_inside_a_transaction_goes_to_the_local_responder() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    head, rest = carrier(200)
    pb.client(head)
    out = pb.server_closed()
    assert to_client(out) == b""
    # The responder reads the whole message from its first byte: an error, the block failed.
    out = pb.client(rest)
    assert to_client(out) == error(
        "ERROR", "08006", "connection to the server was lost; the transaction was rolled back"
    ) + z(b"E")
    assert to_server(out) == b""
    assert to_client(pb.client(fe.Query("ROLLBACK").encode())) == be.CommandComplete("ROLLBACK").encode() + z()
    assert to_server(reconnect(pb)) == b""


def test_cut_copy_data_is_discarded_and_the_copy_answered_08007() -> None:
    pb = Playbook(max_buffered_bytes=16)
    login(pb)
    copy = fe.Query("COPY t FROM STDIN").encode()
    pb.client(copy)
    pb.server(b"G" + struct.pack("!IbH", 7, 0, 0))  # CopyInResponse, no columns
    body = b"x" * 40 + SMUGGLED
    message = b"d" + struct.pack("!I", 4 + len(body)) + body
    pb.client(message[:30])
    out = pb.server_closed()
    assert messages(to_client(out))[0][0] == b"E" and to_client(out).endswith(z())
    assert b"08007" in to_client(out)
    assert pb.client(message[30:] + COPY_DONE) == [cmd.SetTimer("deadline", 30.0)]  # CopyDone waits
    out = reconnect(pb)
    assert SMUGGLED not in to_server(out)
    # A whole CopyDone that follows reaches the new server, which ignores it outside COPY.
    assert to_server(out) == COPY_DONE


def test_extended_group_half_sent_gets_08007_at_once_and_is_discarded_until_sync() -> None:
    """Parse and Bind reached the old server, Execute is cut: the group gets one error now (a
    client may wait after Flush), the rest up to Sync is discarded, then ReadyForQuery."""
    pb = Playbook(max_buffered_bytes=8)
    login(pb)
    parse = fe.Parse("", "SELECT $1").encode()
    bind = b"B" + struct.pack("!I", 4 + 100) + b"\x00" * 100
    pb.client(parse + bind[:50])
    out = pb.server_closed()
    assert types(to_client(out)) == [b"E"] and b"08007" in to_client(out)
    out = pb.client(bind[50:] + fe.Execute("").encode() + fe.Flush().encode() + SMUGGLED + fe.Sync().encode())
    assert to_client(out) == z()
    assert to_server(reconnect(pb)) == b""
    q = fe.Query("SELECT 5").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]


def test_group_sent_without_sync_is_not_an_idle_drop() -> None:
    """Parse + Bind + Execute sent, no Sync yet: the new server must not get the Sync alone."""
    pb = Playbook()
    login(pb)
    bind = b"B" + struct.pack("!I", 4 + 8) + b"\x00" * 8  # unnamed portal and statement, no parameters
    group = fe.Parse("", "INSERT INTO t VALUES (1)").encode() + bind + fe.Execute("").encode()
    pb.client(group)
    out = pb.server_closed()
    assert types(to_client(out)) == [b"E"]
    out = pb.client(fe.Sync().encode())
    assert to_client(out) == z()
    out = reconnect(pb)
    assert to_server(out) == b""
    assert drop_record(out).state == "request_in_flight"


def test_resend_after_57p05_keeps_the_client_scanner_in_step() -> None:
    """57P05 before the request was read: the whole request is sent again, including the start
    of a message the client had not finished; its rest follows as usual."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    big = fe.Query("SELECT '" + "y" * 3000 + "'").encode()
    pb.client(big[:1000])
    pb.server(error("FATAL", "57P05", "terminating connection due to idle-session timeout"))
    pb.server_closed()
    out = reconnect(pb)
    assert to_server(out) == big[:1000]
    assert pb.client(big[1000:]) == [cmd.SendToServer(big[1000:])]
    assert pb.conn.ctx.pending.client_owed == 1


def test_snapshot_is_never_injected_inside_a_client_message() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("SET work_mem = '8MB'").encode())
    big = fe.Query("SELECT '" + "y" * 100 + "'").encode()
    pb.client(big[:20])  # the client already sends its next request (pipelining)
    out = pb.server(be.CommandComplete("SET").encode() + z())
    assert to_server(out) == b""  # no snapshot query in the middle of the client's message
    assert pb.client(big[20:]) == [cmd.SendToServer(big[20:])]
    out = pb.server(select_reply())
    assert messages(to_server(out))[0][0] == b"Q"  # the snapshot, now at a boundary


# ---------------------------------------------------------------- a drop inside a server message


def test_drop_inside_a_server_message_the_client_partly_got_closes_without_writing() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("SELECT big").encode())
    row = be.DataRow((b"z" * 100_000,)).encode()
    out = pb.server(be.RowDescription(("x",)).encode() + row[:70_000])
    assert to_client(out).endswith(row[:70_000])
    out = pb.server_closed("reset")
    assert to_client(out) == b""
    assert cmd.CloseClient() in out and cmd.OpenServer(reconnect=True) not in out
    assert pb.conn.phase is Phase.CLOSED
    assert "split a server message" in drop_record(out).impact


def test_small_error_split_across_reads_is_held_back_and_withheld() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    fatal = error("FATAL", "57P01", "terminating connection due to administrator command")
    assert pb.server(fatal[:10]) == []
    assert pb.server(fatal[10:]) == []
    out = pb.server_closed()
    assert to_client(out) == b"" and cmd.OpenServer(reconnect=True) in out


def test_cut_server_header_is_held_so_a_drop_after_it_can_still_answer() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("SELECT 1").encode())
    reply = select_reply()
    out = pb.server(reply[:3])
    assert to_client(out) == b""
    out = pb.server_closed("reset")
    assert to_client(out) == error("ERROR", "08007", LOST_IN_FLIGHT) + z()


def test_large_notice_streams_and_only_its_start_is_read() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    notice = be.NoticeResponse.make("NOTICE", "00000", "n" * 1_000_000).encode()
    sent = b""
    for i in range(0, len(notice), 65536):
        sent += to_client(pb.server(notice[i : i + 65536]))
    assert sent == notice


# ---------------------------------------------------------------- limits and violations


@pytest.mark.parametrize(
    ("t", "length", "refused"),
    [
        (b"H", 10000, False),
        (b"H", 10001, True),
        (b"S", 20000, True),
        (b"X", 10001, True),
        (b"c", 10001, True),
        (b"E", 10001, True),
        (b"Q", 2_000_000, False),
        (b"d", 2_000_000, False),
    ],
)
def test_postgresqls_per_type_limits(t: bytes, length: int, refused: bool) -> None:
    pb = Playbook()
    login(pb)
    out = pb.client(t + struct.pack("!I", length))
    if refused:
        assert messages(to_client(out))[0][0] == b"E" and b"08P01" in to_client(out)
        assert cmd.CloseClient() in out and cmd.CloseServer() in out
        assert not any(isinstance(c, cmd.SendToServer) for c in out)
    else:
        assert out == [cmd.SendToServer(t + struct.pack("!I", length))]


def test_password_message_after_login_is_refused_not_relayed() -> None:
    pb = Playbook()
    login(pb)
    out = pb.client(fe.PasswordMessage(b"x").encode())
    assert b"08P01" in to_client(out) and cmd.CloseClient() in out
    assert to_server(out) == b""


def test_servers_protocol_violation_fatal_ends_the_session_with_its_words() -> None:
    pb = Playbook()
    login(pb)
    first_query(pb)
    fatal = error("FATAL", "08P01", "invalid frontend message type 112")
    assert pb.server(fatal) == []
    out = pb.server_closed()
    assert to_client(out) == fatal
    assert cmd.CloseClient() in out and cmd.OpenServer(reconnect=True) not in out
    assert "protocol violation" in drop_record(out).impact


def test_a_poolers_08p01_is_a_drop_like_any_other() -> None:
    """PgBouncer ends sessions with FATAL 08P01 of its own ("client_idle_timeout"): hidden."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    assert pb.server(error("FATAL", "08P01", "client_idle_timeout")) == []
    out = pb.server_closed()
    assert to_client(out) == b"" and cmd.OpenServer(reconnect=True) in out


# ---------------------------------------------------------------- the server's words


def test_terminate_inside_a_transaction_gives_the_servers_sqlstate_and_a_hint() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.server(error("FATAL", "57P01", "terminating connection due to administrator command"))
    pb.server_closed()
    out = pb.client(fe.Query("SELECT 1").encode())
    (_t, payload), (_zt, status) = messages(to_client(out))
    err = be.ErrorResponse.decode(payload)
    assert (err.severity, err.code) == ("ERROR", "57P01")
    assert err.message == "terminating connection due to administrator command"
    assert dict(err.fields)["H"] == KEPT_HINT and status == b"E"


def test_idle_in_transaction_timeout_gives_25p03() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.server(error("FATAL", "25P03", "terminating connection due to idle-in-transaction timeout"))
    pb.server_closed()
    out = pb.client(fe.Query("SELECT 1").encode())
    assert be.ErrorResponse.decode(messages(to_client(out))[0][1]).code == "25P03"


def test_in_flight_error_names_the_servers_reason() -> None:
    pb = Playbook()
    login(pb)
    pb.client(fe.Query("SELECT pg_sleep(5)").encode())
    pb.server(error("FATAL", "57P01", "terminating connection due to administrator command"))
    out = pb.server_closed()
    err = be.ErrorResponse.decode(messages(to_client(out))[0][1])
    assert err.code == "08007" and "administrator command" in err.message and "57P01" in err.message


def test_close_policy_passes_the_servers_own_fatal() -> None:
    pb = Playbook(on_transaction_loss="close")
    login(pb)
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    fatal = error("FATAL", "57P01", "terminating connection due to administrator command")
    pb.server(fatal)
    out = pb.server_closed()
    assert to_client(out) == fatal and cmd.CloseClient() in out


# ---------------------------------------------------------------- bounded reading


def test_a_long_message_spanning_reads_is_read_only_to_its_prefix() -> None:
    scanner = FrameScanner(b"Q", 1 << 30, client=True)
    body = b"SELECT '" + b"q" * 5_000_000 + b"'\x00"
    msg = b"Q" + struct.pack("!I", 4 + len(body)) + body
    got = []
    for i in range(0, len(msg), 65536):
        got += scanner.feed(msg[i : i + 65536])
    ((_t, payload),) = got
    assert isinstance(payload, Prefix) and len(payload) == PREFIX_BYTES and body.startswith(payload)


def test_a_named_parse_spanning_reads_is_kept_whole_once() -> None:
    scanner = FrameScanner(b"P", 1 << 30, client=True, whole_named_parse=True)
    msg = fe.Parse("big", "SELECT '" + "p" * 300_000 + "'").encode()
    got = []
    for i in range(0, len(msg), 65536):
        got += scanner.feed(msg[i : i + 65536])
    ((_t, payload),) = got
    assert not isinstance(payload, Prefix) and bytes(payload) == msg[5:]


def test_long_statement_counts_as_state_changing() -> None:
    pb = Playbook()
    login(pb)
    msg = fe.Query("SELECT '" + "q" * 200_000 + "'").encode()
    for i in range(0, len(msg), 65536):
        pb.client(msg[i : i + 65536])
    assert pb.conn.ctx.book.dirty and pb.conn.ctx.inflight_commit


@pytest.mark.parametrize("in_transaction", [True, False])
def test_a_second_drop_while_the_rest_of_a_cut_message_is_discarded(in_transaction: bool) -> None:
    """Found by the fuzzer: cut a CopyData (too long to keep), drop; reconnect; the new server
    drops too (an idle timeout) while the client still sends the cut message's rest. That rest
    must still be discarded, never relayed to the third server."""
    pb = Playbook(max_buffered_bytes=16)
    login(pb)
    if in_transaction:
        pb.client(fe.Query("BEGIN").encode())
        pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.client(fe.Query("COPY t FROM STDIN").encode())
    pb.server(b"G" + struct.pack("!IbH", 7, 0, 0))
    body = b"x" * 40 + SMUGGLED
    message = b"d" + struct.pack("!I", 4 + len(body)) + body
    pb.client(message[:30])
    pb.server_closed()
    reconnect(pb)
    assert pb.client(message[30:40]) == []
    pb.server(error("FATAL", "57P05", "terminating connection due to idle-session timeout"))
    pb.server_closed()
    assert pb.client(message[40:]) == []
    out = reconnect(pb)
    assert SMUGGLED not in to_server(out)
    q = fe.Query("ROLLBACK").encode() if in_transaction else fe.Query("SELECT 1").encode()
    out = pb.client(q)
    if in_transaction:
        assert to_client(out) == be.CommandComplete("ROLLBACK").encode() + z()
    else:
        assert out == [cmd.SendToServer(q)]


@pytest.mark.parametrize("cut", [0, 7, 30])
def test_bytes_pipelined_after_the_password_are_relayed_from_their_first_byte(cut: int) -> None:
    """Found by the fuzzer: a message sent right after the password, cut across reads, whose
    rest arrived once relaying had begun was read from its middle, and its content ran. Now
    what follows the password is held and relayed whole, in order, once relaying starts."""
    pb = Playbook()
    pb.client_connected()
    pb.client(fe.StartupMessage(dict(PARAMS)).encode())
    pb.server_connected()
    pb.server(be.AuthenticationCleartextPassword().encode())
    inner = b"S" + b"x" * 13 + SMUGGLED  # a Close whose body holds a Query
    carried = b"C" + struct.pack("!I", 4 + len(inner)) + inner
    first = carried[:cut] if cut else carried
    out = pb.client(fe.PasswordMessage(PASSWORD.encode()).encode() + first)
    assert to_server(out) == fe.PasswordMessage(PASSWORD.encode()).encode()
    if cut:
        assert pb.client(carried[cut:]) == []
    out = pb.server(hello())
    out += pb.server(FACTS_REPLY)
    assert to_server(out).endswith(carried) and pb.conn.phase is Phase.RELAYING
    assert pb.conn.relay.client_scan.at_boundary  # read as one Close, not as the Query inside it


def test_a_password_sent_before_it_was_asked_for_is_used_when_the_server_asks() -> None:
    """PostgreSQL accepts a cleartext password pipelined after the StartupMessage; so does pgsidecar."""
    pb = Playbook()
    pb.client_connected()
    password = fe.PasswordMessage(PASSWORD.encode()).encode()
    q = fe.Query("SELECT 1").encode()
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode() + password + q) == [
        cmd.CancelTimer("startup"),
        cmd.OpenServer(),
    ]
    pb.server_connected()
    out = pb.server(be.AuthenticationCleartextPassword().encode())
    assert to_server(out) == password
    out = pb.server(hello()) + pb.server(FACTS_REPLY)
    assert to_server(out).endswith(q)
