"""Session state (pgsidecar.session.state), replay planning (session.replay) and the local answers
for a client left inside a lost transaction (relay.recovery.LocalAbortResponder).

The dirty rules only decide *when* to read the exact state; missing a change means a drop later
silently loses it, so the cases here come from what PostgreSQL 15 reports (command tags checked
against a real server: ``CREATE TEMP TABLE t AS ...`` and ``SELECT ... INTO TEMP`` report
``SELECT n``, a temporary view ``CREATE VIEW``, an advisory lock ``SELECT 1``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from pgsidecar.relay.dropbook import DropTracker, snapshot
from pgsidecar.relay.recovery import LocalAbortResponder
from pgsidecar.session.replay import ReplayPlan, plan_replay
from pgsidecar.session.state import (
    FACTS_SQL,
    ServerFacts,
    SessionBook,
    SessionState,
    custom_setting_names,
    is_transaction_end,
    may_commit,
    parse_facts,
    parse_snapshot,
    snapshot_sql,
    tag_is_dirty,
    text_is_dirty,
)
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.frames import FrameScanner

# ---------------------------------------------------------------- dirty rules


@pytest.mark.parametrize(
    "tag",
    [
        b"SET",
        b"RESET",
        b"PREPARE",
        b"DEALLOCATE",
        b"DEALLOCATE ALL",
        b"LISTEN",
        b"UNLISTEN",
        b"DISCARD ALL",
        b"CREATE TABLE",
        b"DECLARE CURSOR",
        b"CLOSE CURSOR",
        b"LOAD",
    ],
)
def test_dirty_tags(tag: bytes) -> None:
    assert tag_is_dirty(tag + b"\x00")
    assert tag_is_dirty(tag)


@pytest.mark.parametrize(
    "tag",
    [
        b"SELECT 1",
        b"INSERT 0 1",
        b"UPDATE 3",
        b"BEGIN",
        b"COMMIT",
        b"ROLLBACK",
        b"CREATE INDEX",
        b"FETCH 5",
        b"COPY 10",
        b"SAVEPOINT",
        b"SE",
        b"",
    ],
)
def test_clean_tags(tag: bytes) -> None:
    assert not tag_is_dirty(tag + b"\x00")


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT set_config('search_path', 'x', false)",
        b"select pg_advisory_lock(1)",
        b"SELECT pg_try_advisory_lock(42)",
        b"SET SESSION AUTHORIZATION alice",
        b"set role r1",
        b"SET  session  statement_timeout = 5",
    ],
)
def test_dirty_text(sql: bytes) -> None:
    assert text_is_dirty(sql)


@pytest.mark.parametrize(
    "sql",
    [
        b"CREATE TEMP TABLE t AS SELECT 1",
        b"SELECT 1 INTO TEMP t2",
        b"create temporary view v as select 1",
        b"CREATE TEMP SEQUENCE s",
    ],
)
def test_temporary_objects_whose_tag_does_not_tell_are_dirty_by_text(sql: bytes) -> None:
    """PostgreSQL answers these with ``SELECT n`` / ``CREATE VIEW`` / ``CREATE SEQUENCE`` (clean
    tags), so only the text can say a temporary object now exists."""
    assert text_is_dirty(sql)


@pytest.mark.parametrize(
    "sql", [b"SELECT 1", b"INSERT INTO t VALUES (1)", b"UPDATE settings SET v = 1", b"SELECT attempt FROM runs"]
)
def test_clean_text(sql: bytes) -> None:
    assert not text_is_dirty(sql)


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        (b"SET app.tenant = 'x'", {"app.tenant"}),
        (b"set session MyApp.User_Id to 5", {"myapp.user_id"}),
        (b"SELECT set_config('app.x', 'y', false)", {"app.x"}),
        (b"SELECT set_config( 'a.b.c', 'y', false)", {"a.b.c"}),
        (b"RESET app.tenant", {"app.tenant"}),
        (b"SET app.a = 1; SET app.b = 2", {"app.a", "app.b"}),
        (b"SET search_path = public", set()),
        (b"SET LOCAL app.x = 1", set()),  # ends with the transaction: nothing to replay
        (b"SELECT 'app.x'", set()),
    ],
)
def test_custom_setting_names(sql: bytes, names: set[str]) -> None:
    assert custom_setting_names(sql) == names


@pytest.mark.parametrize(
    ("sql", "commits"),
    [
        (b"COMMIT", True),
        (b"commit;", True),
        (b"END", True),
        (b"PREPARE TRANSACTION 'gx'", True),
        (b"BEGIN; INSERT INTO t VALUES (1); COMMIT", True),
        (b"SELECT 1", False),
        (b"SELECT commit_ts FROM t", False),
        (b"ROLLBACK", False),
        (b"INSERT INTO t VALUES (1)", False),
    ],
)
def test_may_commit(sql: bytes, commits: bool) -> None:
    assert may_commit(sql) is commits


@pytest.mark.parametrize(
    ("sql", "ends"),
    [
        (b"ROLLBACK", True),
        (b"rollback;", True),
        (b"  ABORT WORK ", True),
        (b"COMMIT TRANSACTION\x00", True),
        (b"END", True),
        (b"rollback transaction;\x00", True),
        (b"ROLLBACK TO SAVEPOINT a", False),
        (b"BEGIN", False),
        (b"SELECT 1", False),
        (b"ROLLBACK; SELECT 1", False),
    ],
)
def test_is_transaction_end(sql: bytes, ends: bool) -> None:
    assert is_transaction_end(sql) is ends


def test_book_notes_custom_names_and_dirt() -> None:
    book = SessionBook()
    book.note_sql(b"SELECT 1")
    assert not book.dirty and book.custom_names == set()
    book.note_sql(b"SET app.tenant = 'acme'")
    assert book.dirty and book.custom_names == {"app.tenant"}
    assert b"$pgsc$app.tenant$pgsc$" in snapshot_sql(book.custom_names)


_WORDS = [
    b"SET",
    b"set",
    b"SeT",
    b"session",
    b"SESSION",
    b"role",
    b"Role",
    b"temp",
    b"TEMPORARY",
    b"pg_temp",
    b"set_config",
    b"advisory",
    b"app.tenant",
    b".",
    b"reset",
    b"UPDATE t",
    b"SELECT",
    b"x",
    b"=",
    b"'v'",
    b"(",
    b"'",
    b"_",
    b"\t",
    b"\n",
    b"  ",
    b" ",
    b";",
    b"\xe9",
    b"\x00",
]


@settings(max_examples=3000, deadline=None)
@given(hst.lists(hst.sampled_from(_WORDS) | hst.binary(max_size=4), max_size=12))
def test_the_word_prefilter_never_changes_what_the_regexes_say(parts: list[bytes]) -> None:
    """note_request skips the regexes when the words they need are absent (a speed-up): what it
    books must be exactly what the regexes alone say."""
    sql = b"".join(parts)
    book = SessionBook()
    book.note_request(sql)
    names = custom_setting_names(sql)
    assert book.dirty is (text_is_dirty(sql) or bool(names)), sql
    assert book.custom_names == names, sql


def test_snapshot_sql_without_custom_names_is_valid_text() -> None:
    sql = snapshot_sql(set()).decode()
    assert "ARRAY[NULL]::text[]" in sql
    assert sql.count("(") == sql.count(")")


# ---------------------------------------------------------------- parse_snapshot


def snapshot_row(**over: object) -> list[bytes | None]:
    values: list[object] = [
        json.dumps([["statement_timeout", "5s"], ["search_path", "app, public"], ["role", "x"]]),
        json.dumps([["app.tenant", "acme"]]),
        "app",
        "none",
        json.dumps(["s1", "s2"]),
        json.dumps(["PREPARE q AS SELECT 1"]),
        json.dumps(["jobs"]),
        "0",
        "0",
        "0",
    ]
    names = ["settings", "custom", "auth", "role", "protocol", "sql", "listen", "temp", "advisory", "hold"]
    for key, value in over.items():
        values[names.index(key)] = value
    return [None if v is None else str(v).encode() for v in values]


def test_parse_snapshot_reads_every_column() -> None:
    state = parse_snapshot(snapshot_row(), "app")
    assert state == SessionState(
        settings=(("app.tenant", "acme"), ("search_path", "app, public"), ("statement_timeout", "5s")),
        session_authorization=None,  # the login user: nothing to replay
        role=None,  # "none"
        protocol_statements=("s1", "s2"),
        sql_statements=("PREPARE q AS SELECT 1",),
        listen=("jobs",),
    )
    assert state.non_replayable() == []


def test_parse_snapshot_identity_and_non_replayable_counts() -> None:
    state = parse_snapshot(snapshot_row(auth="alice", role="r1", temp="2", advisory="1", hold="3"), "app")
    assert state.session_authorization == "alice" and state.role == "r1"
    assert state.non_replayable() == [
        "2 temporary table(s)",
        "1 session-level advisory lock(s)",
        "3 WITH HOLD cursor(s)",
    ]


def test_parse_snapshot_nulls_mean_empty() -> None:
    row = [None] * 10
    assert parse_snapshot(row, "app") == SessionState()


def test_unknown_state_is_not_replayable() -> None:
    assert SessionState(unknown="42501 permission denied").non_replayable() == [
        "session state that could not be read (42501 permission denied)"
    ]


def test_parse_facts() -> None:
    facts = parse_facts([b"1700000000.25", b"t", b"on", b"10.0.0.5"])
    assert facts.postmaster_start == 1700000000.25
    assert facts.in_recovery is True and facts.read_only is True and facts.server_addr == "10.0.0.5"
    assert parse_facts([None, b"f", b"off", None]).postmaster_start is None


def test_parse_facts_identity_columns() -> None:
    """The row as PostgreSQL 15 sends it to an ordinary role (text format)."""
    row = [b"1796159205.065955", b"f", b"off", b"127.0.0.1", b"47555", b"7714445028576536906", b"1"]
    assert parse_facts(row) == ServerFacts(
        1796159205.065955, False, False, "127.0.0.1", 47555, "7714445028576536906", 1
    )
    standby = parse_facts([b"1796159206.5", b"t", b"off", b"127.0.0.1", b"48883", b"77", b"1"])
    assert standby.in_recovery is True and standby.read_only is True  # recovery forces read-only
    unix = parse_facts([b"1.0", b"f", b"on", None, None, None, None])
    assert unix.read_only is True and unix.server_port is None and unix.timeline is None
    short = parse_facts([b"1.0"])  # an older or partial reply: unknown, not False
    assert short.in_recovery is None and short.read_only is None and short.system_identifier is None


def test_facts_sql_reads_read_only_as_the_server_sets_it() -> None:
    """A replayed SET default_transaction_read_only runs before this query on a reconnect."""
    sql = FACTS_SQL.decode()
    assert "reset_val" in sql and "current_setting" not in sql
    assert "pg_walfile_name" in sql and "pg_control_checkpoint" in sql and "pg_control_system" in sql
    assert "aurora_version" in sql  # where the WAL control functions raise, they are not called


def _compared(before: ServerFacts | None, after: ServerFacts | None) -> dict:
    book = DropTracker(active=True)
    book.new_facts(before, after)
    assert book.server_after == snapshot(after)
    return {k: v for k, v in dataclasses.asdict(book.reveal).items() if v is not None}


PRIMARY = ServerFacts(1000.0, False, False, "10.0.0.5", 5432, "77", 1)


def test_new_facts_of_a_switchover_to_a_standby() -> None:
    standby = ServerFacts(2000.0, True, True, "10.0.0.5", 5432, "77", 1)
    assert _compared(PRIMARY, standby) == {
        "postmaster_start_changed": True,
        "in_recovery_now": True,
        "read_only_now": True,
        "system_identifier_changed": False,
    }


def test_a_standby_timeline_is_not_compared() -> None:
    """A standby's timeline is its last restartpoint's (pg_control_checkpoint), which lags a
    promotion it followed; its restart must not read as a move to another server."""
    lagging = ServerFacts(1000.0, True, True, "10.0.0.5", 5432, "77", 1)
    restarted = ServerFacts(2000.0, True, True, "10.0.0.5", 5432, "77", 2)
    got = _compared(lagging, restarted)
    assert "timeline_changed" not in got and got["in_recovery_now"] is False
    promoted = ServerFacts(2000.0, False, False, "10.0.0.5", 5432, "77", 2)
    assert _compared(lagging, promoted)["timeline_changed"] is True


def test_new_facts_of_a_promoted_standby_elsewhere_and_of_another_cluster() -> None:
    promoted = ServerFacts(2000.0, False, False, "10.0.0.6", 5432, "77", 2)
    got = _compared(PRIMARY, promoted)
    assert got["timeline_changed"] is True and got["in_recovery_now"] is False
    assert got["address_changed"] is True and got["system_identifier_changed"] is False
    other = ServerFacts(2000.0, False, False, "10.0.0.5", 5432, "88", 1)
    assert _compared(PRIMARY, other)["system_identifier_changed"] is True


def test_new_facts_of_a_crash_recovery_change_nothing() -> None:
    same = ServerFacts(1000.0, False, False, "10.0.0.5", 5432, "77", 1)
    got = _compared(PRIMARY, same)
    assert not any(got.values()) and got["postmaster_start_changed"] is False
    assert "address_changed" not in got


def test_new_facts_with_unknowns() -> None:
    assert _compared(PRIMARY, None) == {}
    assert _compared(None, ServerFacts(2000.0, True, True)) == {"in_recovery_now": True}
    old_reply = ServerFacts(1000.0, False, False, "10.0.0.5")  # no port, identifier, timeline
    got = _compared(old_reply, PRIMARY)
    assert set(got) == {"postmaster_start_changed", "in_recovery_now", "read_only_now"}
    # A standby that stays a standby is not "in recovery now": that was already so before.
    standby = ServerFacts(1000.0, True, True, "10.0.0.5", 5432, "77", 1)
    assert _compared(standby, replace(standby, postmaster_start=2000.0))["in_recovery_now"] is False


def test_crash_recovery_refusal_is_told_from_a_standby_refusal() -> None:
    book = DropTracker(active=True)
    book.reconnect_error("57P03 the database system is not yet accepting connections", "57P03")
    assert book.reveal.in_recovery_seen is None
    book.reconnect_error("57P03 the database system is in recovery mode", "57P03")
    assert book.reveal.in_recovery_seen is True


# ---------------------------------------------------------------- plan_replay


def queries_of(data: bytes) -> list[tuple[bytes, bytes]]:
    scanner = FrameScanner(bytes(range(256)), 1 << 20, client=True)
    out = [(bytes([t]), payload) for t, payload in scanner.feed(data)]
    assert scanner.at_boundary
    return out


def test_empty_state_replays_nothing() -> None:
    plan = plan_replay(SessionState(), {})
    assert plan == ReplayPlan(b"", (), "0 setting(s), 0 prepared statement(s), 0 LISTEN channel(s)")


def test_replay_order() -> None:
    parse_s1 = fe.Parse("s1", "SELECT $1::int", (23,)).encode()
    state = SessionState(
        settings=(("app.tenant", "acme"), ("statement_timeout", "5s")),
        session_authorization="alice",
        role="r1",
        protocol_statements=("s1",),
        sql_statements=("PREPARE q AS SELECT 1;",),
        listen=("jobs", 'we"ird'),
    )
    plan = plan_replay(state, {"s1": parse_s1[5:], "unused": b"..."})
    assert isinstance(plan, ReplayPlan)
    assert plan.purposes == ("replay", "parse")
    messages = queries_of(plan.data)
    assert [m[0] for m in messages] == [b"Q", b"P", b"S"]
    sql = fe.Query.decode(messages[0][1]).sql
    order = [
        "'session_authorization'",
        "'role'",
        "'app.tenant'",
        "'statement_timeout'",
        "PREPARE q AS SELECT 1",
        'LISTEN "jobs"',
        'LISTEN "we""ird"',
    ]
    positions = [sql.replace("$pgsc$", "'").find(part) for part in order]
    assert -1 not in positions, sql
    assert positions == sorted(positions), sql
    assert "SELECT 1;;" not in sql and ", false)" in sql
    assert plan.data.endswith(parse_s1 + fe.Sync().encode())
    assert plan.summary == "4 setting(s), 2 prepared statement(s), 2 LISTEN channel(s)"


def test_replay_only_protocol_statements() -> None:
    parse = fe.Parse("s9", "SELECT 2").encode()
    plan = plan_replay(SessionState(protocol_statements=("s9",)), {"s9": parse[5:]})  # the body, as the relay keeps it
    assert isinstance(plan, ReplayPlan)
    assert plan.data == parse + fe.Sync().encode()
    assert plan.purposes == ("parse",)


def test_replay_literal_survives_quotes_and_the_dollar_tag() -> None:
    plan = plan_replay(SessionState(settings=(("app.x", "it's $pgsc$ here"),)), {})
    assert isinstance(plan, ReplayPlan)
    sql = fe.Query.decode(queries_of(plan.data)[0][1]).sql
    assert "'it''s $pgsc$ here'" in sql


@pytest.mark.parametrize(
    ("state", "fragment"),
    [
        (SessionState(temp_tables=1), "1 temporary table(s)"),
        (SessionState(advisory_locks=2), "2 session-level advisory lock(s)"),
        (SessionState(hold_cursors=1), "1 WITH HOLD cursor(s)"),
        (SessionState(unknown="no row"), "could not be read (no row)"),
    ],
)
def test_replay_refuses_what_cannot_be_rebuilt(state: SessionState, fragment: str) -> None:
    plan = plan_replay(state, {})
    assert isinstance(plan, str)
    assert plan.startswith("the session held ") and fragment in plan
    assert plan.endswith("which cannot be restored on a new connection")


def test_replay_refuses_a_protocol_statement_it_never_saw_parsed() -> None:
    plan = plan_replay(SessionState(protocol_statements=("ghost",)), {})
    assert plan == "prepared statement(s) ghost were created in a way pgsidecar cannot repeat"


def test_replay_never_reruns_statements_sent_together_with_prepare() -> None:
    # PostgreSQL 15: after the simple query "INSERT ...; PREPARE q AS SELECT 2" the row in
    # pg_prepared_statements has statement = that whole string (checked against a real server).
    state = SessionState(sql_statements=("INSERT INTO audit VALUES (1); PREPARE q AS SELECT 2",))
    plan = plan_replay(state, {})
    if isinstance(plan, str):
        return  # refusing is honest
    assert b"INSERT" not in plan.data


# ---------------------------------------------------------------- LocalAbortResponder

IN_FAILED = "current transaction is aborted, commands ignored until end of transaction block"
LOST = "connection to the server was lost; the transaction was rolled back"


def err(code: str, message: str) -> bytes:
    return be.ErrorResponse.make("ERROR", code, message).encode()


def z(status: bytes) -> bytes:
    return be.ReadyForQuery(status).encode()


def test_simple_protocol_owes_the_error_first_then_25p02_then_rollback() -> None:
    responder = LocalAbortResponder(owe_error=True)
    assert responder.feed(fe.Query("INSERT INTO t VALUES (1)").encode()) == (err("08006", LOST) + z(b"E"), b"", False)
    assert responder.feed(fe.Query("SELECT 1").encode()) == (err("25P02", IN_FAILED) + z(b"E"), b"", False)
    reply, rest, done = responder.feed(fe.Query("ROLLBACK").encode() + fe.Query("SELECT 2").encode())
    assert reply == be.CommandComplete("ROLLBACK").encode() + z(b"I")
    assert done and rest == fe.Query("SELECT 2").encode()


def test_simple_protocol_commit_in_a_failed_block_is_answered_rollback() -> None:
    responder = LocalAbortResponder(owe_error=False)
    assert responder.feed(fe.Query("COMMIT").encode()) == (be.CommandComplete("ROLLBACK").encode() + z(b"I"), b"", True)


def test_split_messages_wait_for_the_rest() -> None:
    responder = LocalAbortResponder(owe_error=False)
    msg = fe.Query("ROLLBACK").encode()
    assert responder.feed(msg[:3]) == (b"", b"", False)
    assert responder.feed(msg[3:]) == (be.CommandComplete("ROLLBACK").encode() + z(b"I"), b"", True)


def test_terminate_ends_the_block_and_is_kept_for_the_caller() -> None:
    responder = LocalAbortResponder(owe_error=True)
    reply, rest, done = responder.feed(fe.Terminate().encode())
    assert (reply, done) == (b"", True)
    assert rest == fe.Terminate().encode()


def extended(sql: str) -> bytes:
    return (
        fe.Parse("", sql).encode()
        + b"B"
        + (12).to_bytes(4, "big")
        + b"\x00\x00\x00\x00\x00\x00\x00\x00"
        + fe.Describe(b"P", "").encode()
        + fe.Execute("").encode()
        + fe.Sync().encode()
    )


def test_extended_protocol_batch_fails_until_a_rollback_batch() -> None:
    responder = LocalAbortResponder(owe_error=True)
    assert responder.feed(extended("INSERT INTO t VALUES (1)")) == (err("08006", LOST) + z(b"E"), b"", False)
    assert responder.feed(extended("SELECT 1")) == (err("25P02", IN_FAILED) + z(b"E"), b"", False)
    reply, rest, done = responder.feed(extended("ROLLBACK"))
    assert done and rest == b""
    assert reply == (
        be.ParseComplete().encode()
        + be.BindComplete().encode()
        + be.NoData().encode()
        + be.CommandComplete("ROLLBACK").encode()
        + z(b"I")
    )


def test_a_large_message_in_a_lost_transaction_is_skipped_not_held() -> None:
    """A 2 MB Bind after the drop is answered from its type; its body is never buffered."""
    responder = LocalAbortResponder(owe_error=True)
    body = b"\x00" * (2 << 20)
    bind = b"B" + (len(body) + 4).to_bytes(4, "big") + body
    chunks = [bind[i : i + 65536] for i in range(0, len(bind), 65536)]
    for chunk in chunks:
        reply, rest, done = responder.feed(chunk)
        assert (reply, rest, done) == (b"", b"", False)
        assert len(responder._buf) < 65536
    reply, rest, done = responder.feed(fe.Sync().encode())
    assert not done and rest == b""
    assert reply == err("08006", LOST) + z(b"E")


@pytest.mark.parametrize(
    "sql, commits, dirty",
    [
        (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", False, False),
        (b"COMMIT", True, False),
        (b"UPDATE t SET x = 1", False, False),
        (b"SET search_path = app", False, False),  # plain SET: the "SET" command tag marks it
        (b"SET app.tenant = 'acme'", False, True),
        (b"select pg_advisory_lock(1)", False, True),
        (b"CREATE TEMP TABLE t (x int)", False, True),
        (b"SELECT t.a FROM t", False, False),
    ],
)
def test_note_request_books_state_and_says_whether_it_may_commit(sql: bytes, commits: bool, dirty: bool) -> None:
    book = SessionBook()
    assert book.note_request(sql) is commits
    assert book.dirty is dirty
