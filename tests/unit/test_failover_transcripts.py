"""Multi-host and target_session_attrs in the brain, as socket-free transcripts (issue 12).

libpq's rules (fe-connect.c CONNECTION_CHECK_TARGET): the role comes from in_hot_standby and
default_transaction_read_only when the login reports both, else from a query; a server of the
wrong role is left for the next address, then the next host; prefer-standby takes any server on a
second pass. After that the sidecar's own rules: a writer lost in place is left at the next idle
point, and the session walks the list again.
"""

from __future__ import annotations

import random

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.hosts import READ_ONLY_QUERY, RECOVERY_QUERY, Attrs, Role, mismatch
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import (
    BACKEND_PID,
    BACKEND_SECRET,
    FACTS_QUERY,
    FACTS_REPLY,
    PARAMS,
    PASSWORD,
    SERVER_PARAMS,
    Playbook,
    drop_record,
    error,
    first_query,
    hello,
    messages,
    to_client,
    to_server,
    z,
)

PRIMARY = {**SERVER_PARAMS, "in_hot_standby": "off", "default_transaction_read_only": "off"}
STANDBY = {**SERVER_PARAMS, "in_hot_standby": "on", "default_transaction_read_only": "off"}
READ_ONLY = {**SERVER_PARAMS, "in_hot_standby": "off", "default_transaction_read_only": "on"}


def start(pb: Playbook) -> None:
    pb.client_connected()
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode())[-1] == cmd.OpenServer()


def log_in(pb: Playbook, params: dict[str, str], *, address: str = "10.0.0.5") -> list[object]:
    """One upstream login up to the server's ReadyForQuery (the client's password is known)."""
    pb.server_connected(address)
    out = pb.server(be.AuthenticationCleartextPassword().encode())
    if out and isinstance(out[0], cmd.SendToClient):  # the first login: the client answers for us
        pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    return pb.server(hello(params=params))


def test_role_words_are_libpqs() -> None:
    primary, standby, ro = Role.from_params(PRIMARY), Role.from_params(STANDBY), Role.from_params(READ_ONLY)
    assert (primary.name, standby.name, ro.name) == ("primary", "standby", "read-only")
    assert mismatch(Attrs.READ_WRITE, ro, second_pass=False) == "session is read-only"
    assert mismatch(Attrs.READ_WRITE, standby, second_pass=False) == "session is read-only"
    assert mismatch(Attrs.READ_ONLY, primary, second_pass=False) == "session is not read-only"
    assert mismatch(Attrs.PRIMARY, standby, second_pass=False) == "server is in hot standby mode"
    assert mismatch(Attrs.PRIMARY, ro, second_pass=False) is None  # read-only but not a standby
    assert mismatch(Attrs.STANDBY, primary, second_pass=False) == "server is not in hot standby mode"
    assert mismatch(Attrs.PREFER_STANDBY, primary, second_pass=True) is None
    assert Role.from_params({"in_hot_standby": "off"}).read_only is None  # libpq asks then


def test_read_write_skips_a_standby_host_and_logs_in_on_the_next() -> None:
    pb = Playbook(host_count=2, target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    out = log_in(pb, STANDBY, address="10.0.0.1")
    assert out == [cmd.CloseServer(), cmd.OpenServer(host=0, avoid=frozenset({"10.0.0.1"}))]
    assert pb.notes[-1] == cmd.NoteUpstream("db", "10.0.0.1", "standby", fits=False)
    assert to_client(out) == b"" and pb.conn.phase is Phase.AUTHENTICATING
    # The runtime found no other address for host 0: host 1 next, at once.
    out = pb.handle(ev.ServerConnectFailed(pb.now + 0.1, "skipped", "every address was tried"))
    assert out == [cmd.CloseServer(), cmd.OpenServer(host=1)]
    out = log_in(pb, PRIMARY, address="10.0.0.2")
    assert pb.notes[-1] == cmd.NoteUpstream("db", "10.0.0.2", "primary", fits=True)
    assert pb.conn.phase is Phase.RELAYING and to_server(out) == FACTS_QUERY


def test_a_dead_first_host_is_passed_over_at_once() -> None:
    pb = Playbook(host_count=2, target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    out = pb.handle(ev.ServerConnectFailed(pb.now, "refused", "connection refused", "ECONNREFUSED"))
    assert out == [cmd.CloseServer(), cmd.OpenServer(host=1)]  # no backoff between hosts
    log_in(pb, PRIMARY, address="10.0.0.2")
    assert pb.conn.phase is Phase.RELAYING


def test_a_whole_pass_of_wrong_roles_backs_off_and_starts_again_from_the_first_host() -> None:
    pb = Playbook(host_count=2, target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    log_in(pb, STANDBY, address="10.0.0.1")
    pb.handle(ev.ServerConnectFailed(pb.now, "skipped", "every address was tried"))
    log_in(pb, READ_ONLY, address="10.0.0.2")
    out = pb.handle(ev.ServerConnectFailed(pb.now, "skipped", "every address was tried"))
    assert out[0] == cmd.CloseServer() and isinstance(out[1], cmd.SetTimer) and out[1].name == "backoff"
    assert pb.timer("backoff") == [cmd.OpenServer(host=0)]  # a new pass forgets what it avoided


def test_the_first_login_gives_up_at_the_deadline_with_libpqs_words() -> None:
    pb = Playbook(host_count=1, target_session_attrs=Attrs.READ_WRITE, reconnect_deadline_s=5.0)
    start(pb)
    log_in(pb, STANDBY)
    out = pb.handle(ev.ServerConnectFailed(pb.now + 10, "skipped", "every address was tried"))
    err = be.ErrorResponse.decode(messages(to_client(out))[-1][1])
    assert err.severity == "FATAL" and "session is read-only" in err.message
    assert cmd.CloseClient() in out


def test_prefer_standby_takes_a_primary_on_its_second_pass() -> None:
    pb = Playbook(host_count=1, target_session_attrs=Attrs.PREFER_STANDBY)
    start(pb)
    assert log_in(pb, PRIMARY)[-1] == cmd.OpenServer(avoid=frozenset({"10.0.0.5"}))
    assert pb.handle(ev.ServerConnectFailed(pb.now, "skipped", "x")) == [cmd.CloseServer(), cmd.OpenServer()]
    log_in(pb, PRIMARY)
    assert pb.conn.phase is Phase.RELAYING and pb.notes[-1].fits


def test_without_the_parameters_the_role_is_asked_as_libpq_asks() -> None:
    pb = Playbook(target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    assert log_in(pb, SERVER_PARAMS) == [cmd.SendToServer(READ_ONLY_QUERY)]
    reply = be.RowDescription(("transaction_read_only",)).encode() + be.DataRow((b"on",)).encode()
    out = pb.server(reply + be.CommandComplete("SHOW").encode() + z())
    assert out[0] == cmd.CloseServer() and out[-1] == cmd.OpenServer(avoid=frozenset({"10.0.0.5"}))
    pb2 = Playbook(target_session_attrs=Attrs.STANDBY)
    start(pb2)
    assert log_in(pb2, SERVER_PARAMS) == [cmd.SendToServer(RECOVERY_QUERY)]
    reply = be.RowDescription(("pg_is_in_recovery",)).encode() + be.DataRow((b"t",)).encode()
    out = pb2.server(reply + be.CommandComplete("SELECT 1").encode() + z())
    assert pb2.conn.phase is Phase.RELAYING and to_server(out) == FACTS_QUERY


def relaying_on_a_writer(**policy: object) -> Playbook:
    pb = Playbook(target_session_attrs=Attrs.READ_WRITE, **policy)
    start(pb)
    log_in(pb, PRIMARY)
    assert pb.server(FACTS_REPLY) == []
    first_query(pb)
    return pb


def test_a_25006_from_the_writer_reaches_the_app_then_the_session_finds_the_writer() -> None:
    pb = relaying_on_a_writer()
    insert = fe.Query("INSERT INTO t VALUES (1)").encode()
    assert pb.client(insert) == [cmd.SendToServer(insert)]
    failed = error("ERROR", "25006", "cannot execute INSERT in a read-only transaction") + z()
    out = pb.server(failed)
    assert to_client(out) == failed  # that statement did fail, and the app is told as it is
    assert cmd.CloseServer() in out and out[-1] == cmd.OpenServer(reconnect=True)
    assert pb.conn.phase is Phase.RECONNECTING
    out = log_in(pb, PRIMARY, address="10.0.0.9")
    assert pb.conn.phase is Phase.REPLAYING
    record = drop_record(pb.server(FACTS_REPLY))
    assert record.observed.kind == "role_lost" and record.state == "idle"
    assert record.impact == "transparent" and record.reconnect is not None and record.reconnect.succeeded
    again = fe.Query("INSERT INTO t VALUES (2)").encode()
    assert pb.client(again) == [cmd.SendToServer(again)]


def test_a_25006_inside_a_transaction_waits_for_its_end() -> None:
    pb = relaying_on_a_writer()
    pb.client(fe.Query("BEGIN").encode())
    pb.server(be.CommandComplete("BEGIN").encode() + z(b"T"))
    pb.client(fe.Query("INSERT INTO t VALUES (1)").encode())
    out = pb.server(error("ERROR", "25006", "cannot execute INSERT in a read-only transaction") + z(b"E"))
    assert cmd.CloseServer() not in out
    pb.client(fe.Query("ROLLBACK").encode())
    out = pb.server(be.CommandComplete("ROLLBACK").encode() + z())
    assert cmd.CloseServer() in out and pb.conn.phase is Phase.RECONNECTING


def test_a_25006_after_the_apps_own_read_only_setting_is_no_sign() -> None:
    pb = relaying_on_a_writer()
    pb.client(fe.Query("SET default_transaction_read_only = on").encode())
    pb.server(
        be.CommandComplete("SET").encode() + be.ParameterStatus("default_transaction_read_only", "on").encode() + z()
    )
    row = be.DataRow(
        (b'[["default_transaction_read_only", "on"]]', b"[]", b"app", b"none", b"[]", b"[]", b"[]", b"0", b"0", b"0")
    ).encode()  # the state snapshot pgsidecar reads after a SET
    pb.server(be.RowDescription(tuple("abcdefghij")).encode() + row + be.CommandComplete("SELECT 1").encode() + z())
    pb.client(fe.Query("INSERT INTO t VALUES (1)").encode())
    out = pb.server(error("ERROR", "25006", "cannot execute INSERT in a read-only transaction") + z())
    assert cmd.CloseServer() not in out and pb.conn.phase is Phase.RELAYING


def test_any_never_leaves_a_server_over_its_role() -> None:
    pb = Playbook()
    start(pb)
    log_in(pb, STANDBY)
    assert pb.conn.phase is Phase.RELAYING
    pb.server(FACTS_REPLY)
    first_query(pb)
    pb.client(fe.Query("INSERT INTO t VALUES (1)").encode())
    out = pb.server(error("ERROR", "25006", "cannot execute INSERT in a read-only transaction") + z())
    assert cmd.CloseServer() not in out


def test_a_cancel_goes_to_the_host_and_address_serving_the_session() -> None:
    pb = Playbook(host_count=2, target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    log_in(pb, STANDBY, address="10.0.0.1")
    pb.handle(ev.ServerConnectFailed(pb.now, "skipped", "x"))
    log_in(pb, PRIMARY, address="10.0.0.2")
    out = pb.handle(ev.CancelRequested(pb.now))
    assert out == [cmd.SendCancel(BACKEND_PID, BACKEND_SECRET, host=1, address="10.0.0.2")]


def test_load_balance_random_shuffles_the_hosts_once_per_pass_and_the_addresses_in_the_runtime() -> None:
    """libpq 16 load_balance_hosts=random: a random host order per pass (every host once), and
    the runtime shuffles each host's addresses (OpenServer.shuffle)."""
    from pgsidecar.relay.hosts import HostWalk

    orders = set()
    for seed in range(20):
        walk = HostWalk(3, Attrs.ANY, True, random.Random(seed))
        order = [walk.host]
        while walk.next_host():
            order.append(walk.host)
        assert sorted(order) == [0, 1, 2]  # each host once in a pass
        orders.add(tuple(order))
    assert len(orders) > 1  # not always the same order
    pb = Playbook(host_count=3, load_balance=True)
    pb.client_connected()
    first = pb.client(fe.StartupMessage(dict(PARAMS)).encode())[-1]
    assert isinstance(first, cmd.OpenServer) and first.shuffle is True
    out = pb.handle(ev.ServerConnectFailed(pb.now, "refused", "connection refused", "ECONNREFUSED"))
    opened = out[-1]
    assert isinstance(opened, cmd.OpenServer) and opened.shuffle is True and opened.host != first.host
    unbalanced = HostWalk(3, Attrs.ANY, False, random.Random(1))
    assert [unbalanced.host, unbalanced.next_host() and unbalanced.host] == [0, 1]


def test_a_host_that_cannot_take_connections_now_is_passed_over() -> None:
    """57P03 (starting up, shutting down, a standby not yet accepting) from one host of a list:
    the next host at once, at the first login as on a reconnect."""
    pb = Playbook(host_count=2, target_session_attrs=Attrs.READ_WRITE)
    start(pb)
    pb.server_connected("10.0.0.1")
    pb.server(be.AuthenticationCleartextPassword().encode())
    pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    out = pb.server(error("FATAL", "57P03", "the database system is shutting down"))
    assert out == [cmd.CloseServer(), cmd.OpenServer(host=1)] and to_client(out) == b""
    log_in(pb, PRIMARY, address="10.0.0.2")
    assert pb.conn.phase is Phase.RELAYING


def test_sslmode_allow_retries_over_tls_on_the_same_host() -> None:
    pb = Playbook(host_count=2, allow_tls_retry=True, open_tls=False)
    pb.client_connected()
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode())[-1] == cmd.OpenServer(use_tls=False)
    pb.handle(ev.ServerConnectFailed(pb.now, "refused", "connection refused", "ECONNREFUSED"))
    pb.server_connected("10.0.0.2")
    out = pb.server(error("FATAL", "28000", 'no pg_hba.conf entry for host "10.0.0.9", SSL off'))
    assert out == [cmd.CloseServer(), cmd.OpenServer(use_tls=True, host=1)]
