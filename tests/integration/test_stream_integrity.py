"""Issue 10: the client's byte stream stays intact across drops, per-type limits, odd startup bytes,
memory for messages read whole, and the server's own words reaching the app.

Every test runs a real pgsidecar process in front of the real PostgreSQL 15 fixture and injects
real faults (pg_terminate_backend, idle_in_transaction_session_timeout). Raw sockets
(tests/fixtures/rawpg.py) are used where a driver would not send the bytes needed: half a message,
a message over a per-type limit, a startup value that is not UTF-8.
"""

from __future__ import annotations

import http.client
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import psycopg2
import psycopg2.errors
import pytest

from pgsidecar.wire import frontend as fe
from tests.fixtures.rawpg import RawPg, errors, kinds, message, ready_status, rows, startup_packet, tags
from tests.fixtures.sidecar import SidecarProcess, upstream_dsn_for

pytestmark = pytest.mark.server

MIB = 1 << 20
KIB = 1 << 10


# ---------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def login(pg, sc: SidecarProcess, app: str, user: str = "app") -> RawPg:
    """A raw session through the sidecar, logged in with the cleartext password it asks for."""
    client = RawPg.tcp(sc.port)
    client.login(
        startup_packet({b"user": user.encode(), b"database": b"app", b"application_name": app.encode()}), pg.users[user]
    )
    return client


def direct(pg, params: dict[bytes, bytes] | None = None) -> RawPg:
    """A raw session straight to PostgreSQL: its unix socket, the fixture's trust database."""
    client = RawPg.unix(pg.socket_dir, pg.port)
    client.login(startup_packet(params or {b"user": b"app", b"database": pg.trust_dbname.encode()}))
    return client


def backend_pid(client: RawPg) -> int:
    """The pid of the backend serving this session now (pg_backend_pid() is the real one)."""
    return int(client.scalar("SELECT pg_backend_pid()"))


def backends(pg, app: str) -> list[int]:
    return pg.backend_pids(application_name=app)


def terminate(pg, pid: int) -> None:
    """pg_terminate_backend with a 5 s wait: returns once the backend has exited."""
    assert pg.sql("SELECT pg_terminate_backend(%s, 5000)", (pid,)) == [(True,)], f"backend {pid} did not exit"


def wait_reconnect(pg, app: str, old_pid: int, timeout: float = 10.0) -> None:
    """Give the sidecar's reconnect (it starts at once after a drop) time to show as a new backend
    for ``app``; bounded, and not an assertion: what the client then gets is what is checked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not [p for p in backends(pg, app) if p != old_pid]:
        time.sleep(0.05)


def table_exists(pg, name: str) -> bool:
    return pg.sql("SELECT to_regclass(%s) IS NOT NULL", (f"public.{name}",))[0][0]


def select_1(client: RawPg) -> list | Exception:
    """SELECT 1 on the same socket: its messages, or the exception (timeout, EOF) in their place.
    Its reply also proves the server has processed everything the client sent before it."""
    try:
        return client.query("SELECT 1")
    except (TimeoutError, EOFError, OSError) as exc:
        return exc


def assert_select_1(got: list | Exception) -> None:
    """Exactly SELECT 1's own answer, nothing left over from before."""
    assert not isinstance(got, Exception), f"SELECT 1 on the same socket failed: {got!r}"
    assert kinds(got, ignore=b"NS") == [b"T", b"D", b"C", b"Z"], got
    assert rows(got) == [(b"1",)]
    assert tags(got) == ["SELECT 1"]


def described(messages: list) -> list:
    """Messages with ErrorResponses decoded, for failure messages."""
    return [(k, errors([(k, p)])[0].as_dict()) if k == b"E" else (k, p[:80]) for k, p in messages]


def assert_no_traceback(sc: SidecarProcess) -> None:
    logs = sc.logs()
    assert "Traceback" not in logs, logs[-4000:]


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def metric(sc: SidecarProcess, name: str) -> float:
    """One unlabelled sample from the sidecar's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.metrics_port, timeout=5)  # no proxy, loopback only
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, (resp.status, body)
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{body}")


def scrape_or_none(sc: SidecarProcess, name: str) -> tuple[float] | None:
    """(value,) once the metrics listener answers, None before (it starts after the client port)."""
    try:
        return (metric(sc, name),)
    except OSError:
        return None


@pytest.fixture
def private(pg, sidecar_factory) -> SidecarProcess:
    """A sidecar of the test's own, so its drop log and log lines are the test's alone."""
    return sidecar_factory(upstream_dsn_for(pg))


@pytest.fixture
def drop_tables(pg) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        pg.sql(f"DROP TABLE IF EXISTS {name}")


# ---------------------------------------------------------------- 1: a drop in the middle of a client message


def split_query(outer_head: bytes, rest: bytes) -> tuple[bytes, bytes]:
    """A Query message whose first bytes are ``outer_head`` (after the 5-byte header) and whose
    remaining bytes are exactly ``rest``: returns (what to send first, what to send after)."""
    length = 4 + len(outer_head) + len(rest)
    return b"Q" + struct.pack("!I", length) + outer_head, rest


def test_drop_mid_query_does_not_smuggle_its_tail(pg, private, drop_tables):
    """Defect: a drop while the client is in the middle of sending one Query message. The old code
    kept its framing position but not the message: after reconnecting it sent only the tail of the
    message to the new backend, which read that tail as a whole message of its own. A tail that is
    itself a Query (here CREATE TABLE) was executed: request smuggling through a drop.

    Required: the tail is never executed; the client gets one ErrorResponse and ReadyForQuery for its
    Query (any SQLSTATE: with a prefix this small pgsidecar may resend the whole message, which the
    new backend rejects as malformed); the socket keeps working; no traceback."""
    table = unique("smuggled")
    drop_tables.append(table)
    app = unique("strm1")
    inner = fe.Query(f"CREATE TABLE {table}()").encode()
    first, rest = split_query(b"SELECT '", inner)
    assert len(first) == 13 and len(rest) == struct.unpack("!I", first[1:5])[0] - 12
    with login(pg, private, app) as client:
        old = backend_pid(client)
        client.send(first)
        time.sleep(0.3)  # the sidecar has passed the 13 bytes on; the backend waits for the rest
        terminate(pg, old)
        wait_reconnect(pg, app, old)
        time.sleep(0.5)
        client.send(rest)
        got = client.read_until_ready(timeout=20)
        after = select_1(client)
        assert not table_exists(pg, table), f"the tail of the Query was executed: {described(got)}"
        assert "CREATE TABLE" not in tags(got), described(got)
        assert kinds(got, ignore=b"NS") == [b"E", b"Z"], described(got)
        assert_select_1(after)
    assert not table_exists(pg, table)
    assert_no_traceback(private)


def test_drop_mid_big_query_over_the_reconnect_buffer(pg, sidecar_factory, drop_tables):
    """Defect: as above, with a prefix too big to keep (reconnect.max_buffered 64kB, 100 kB of a
    300 kB Query sent before the drop). The old code sent the remaining 200 kB to the new backend,
    which read them as two whole Queries: CREATE TABLE and a SELECT.

    Required: the table never exists; the client gets exactly one ErrorResponse (pgsidecar's own
    08006: the request never reached a server whole) and ReadyForQuery for its big Query; then
    SELECT 1 works on the same socket."""
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_RECONNECT_MAX_BUFFERED": "64kB"})
    table = unique("smuggled_big")
    drop_tables.append(table)
    app = unique("strm1b")
    total, sent_first = 300 * KIB, 100 * KIB
    smuggled = fe.Query(f"CREATE TABLE {table}()").encode()
    pad = (total - sent_first) - len(smuggled) - len(fe.Query("SELECT ''").encode())
    filler = fe.Query("SELECT '" + "p" * pad + "'").encode()
    rest = smuggled + filler
    first, rest = split_query(b"SELECT '" + b"x" * (sent_first - 13), rest)
    assert len(first) == sent_first and len(first) + len(rest) == total
    with login(pg, sc, app) as client:
        old = backend_pid(client)
        client.send(first)
        time.sleep(0.3)
        terminate(pg, old)
        wait_reconnect(pg, app, old)
        time.sleep(0.5)
        client.send(rest)
        got = client.read_until_ready(timeout=30)
        after = select_1(client)
        assert not table_exists(pg, table), f"bytes after the first 100 kB were executed: {described(got)}"
        assert kinds(got, ignore=b"NS") == [b"E", b"Z"], described(got)
        (err,) = errors(got)
        assert (err.severity, err.code) == ("ERROR", "08006"), err.as_dict()
        assert ready_status(got) == b"I"
        assert_select_1(after)
    assert not table_exists(pg, table)
    assert_no_traceback(sc)


def test_drop_mid_query_inside_a_transaction(pg, private, drop_tables):
    """Defect: the same smuggling attempt inside BEGIN. The old code answered the tail locally as
    if it were a Query of its own, and kept its framing position in the old message, so the next
    request (after ROLLBACK) was taken for the rest of that message and its reply for a stray one:
    the session stalled.

    Required: the table never exists; one ErrorResponse and ReadyForQuery 'E' (failed transaction);
    ROLLBACK gets CommandComplete ROLLBACK and 'I'; SELECT 1 works."""
    table = unique("smuggled_tx")
    drop_tables.append(table)
    app = unique("strm1c")
    first, rest = split_query(b"SELECT '", fe.Query(f"CREATE TABLE {table}()").encode())
    with login(pg, private, app) as client:
        old = backend_pid(client)
        begun = client.query("BEGIN")
        assert tags(begun) == ["BEGIN"] and ready_status(begun) == b"T"
        client.send(first)
        time.sleep(0.3)
        terminate(pg, old)
        wait_reconnect(pg, app, old)
        time.sleep(0.5)
        client.send(rest)
        got = client.read_until_ready(timeout=20)
        rolled = client.query("ROLLBACK")
        after = select_1(client)
        assert not table_exists(pg, table), f"the tail of the Query was executed: {described(got)}"
        assert kinds(got, ignore=b"NS") == [b"E", b"Z"], described(got)
        assert ready_status(got) == b"E"
        assert kinds(rolled, ignore=b"NS") == [b"C", b"Z"], described(rolled)
        assert tags(rolled) == ["ROLLBACK"] and ready_status(rolled) == b"I"
        assert_select_1(after)
    assert not table_exists(pg, table)
    assert_no_traceback(private)


def test_drop_mid_copy_data_does_not_smuggle_its_tail(pg, private, drop_tables):
    """Defect: a drop in the middle of one CopyData message of COPY FROM STDIN. The old code
    answered 08007 but then sent the rest of that CopyData to the new backend as if it were
    messages: a tail that is a whole Query (CREATE TABLE) was executed.

    Required: the table never exists; the client gets an ErrorResponse (08007 or 08006) and
    ReadyForQuery; the session works afterwards."""
    target = unique("copy_target")
    table = unique("smuggled_copy")
    drop_tables += [target, table]
    app = unique("strm1d")
    inner = fe.Query(f"CREATE TABLE {table}()").encode()
    head = b"row-before-the-drop "
    with login(pg, private, app) as client:
        created = client.query(f"CREATE TABLE {target} (t text)")
        assert tags(created) == ["CREATE TABLE"], created
        old = backend_pid(client)
        client.send(fe.Query(f"COPY {target} FROM STDIN").encode())
        kind, _ = client.read_message()
        assert kind == b"G", "expected CopyInResponse"
        client.send(b"d" + struct.pack("!I", 4 + len(head) + len(inner)) + head)
        time.sleep(0.3)
        terminate(pg, old)
        wait_reconnect(pg, app, old)
        time.sleep(0.5)
        client.send(inner + message(b"c", b""))  # the rest of the CopyData, then CopyDone
        got = client.read_until_ready(timeout=20)
        after = select_1(client)
        assert not table_exists(pg, table), f"the tail of the CopyData was executed: {described(got)}"
        assert kinds(got, ignore=b"NS") == [b"E", b"Z"], described(got)
        (err,) = errors(got)
        assert err.code in ("08007", "08006"), err.as_dict()
        assert_select_1(after)
    assert not table_exists(pg, table)
    assert pg.sql(f"SELECT count(*) FROM {target}") == [(0,)]
    assert_no_traceback(private)


# ---------------------------------------------------------------- 2: PostgreSQL's per-type message limits

# postgres.c SocketBackend: Flush ('H'), like Close/Describe/Execute/Sync, may be at most
# PQ_SMALL_MESSAGE_LIMIT = 10000 bytes, length word included; Query and Parse up to 1 GB.
SMALL_LIMIT = 10000


def flush_of(length: int) -> bytes:
    return b"H" + struct.pack("!I", length) + b"\0" * (length - 4)


def test_message_over_the_per_type_limit(pg, private):
    """Defect: a Flush of 20000 bytes (over PostgreSQL's 10000 for its type) was passed to the
    server, which closes the connection without a word; pgsidecar took that for a drop, wrote a drop
    record, reconnected and passed the rest of the bytes to the new backend as messages.

    Required: pgsidecar answers FATAL 08P01 itself and closes the socket; no drop record, no
    reconnect (no upstream backend left for the session). Not over-refused: a Flush of exactly
    10000 bytes gets the server's own answer, and a 2 MB Query (a large type) goes through."""
    # What PostgreSQL itself does with these bytes.
    with direct(pg) as raw:
        raw.send(flush_of(SMALL_LIMIT) + fe.Sync().encode())
        theirs = raw.read_until_ready()
        assert kinds(theirs) == [b"E", b"Z"], theirs
        (server_err,) = errors(theirs)
        assert (server_err.severity, server_err.code) == ("ERROR", "08P01"), server_err.as_dict()
    with direct(pg) as raw:
        raw.send(flush_of(2 * SMALL_LIMIT))
        said, closed = raw.read_until_closed(timeout=10)
        assert closed and said == [], "PostgreSQL closes without a reply on a Flush over its limit"

    app = unique("strm2")
    with login(pg, private, app) as client:
        client.send(flush_of(SMALL_LIMIT) + fe.Sync().encode())
        got = client.read_until_ready()
        assert kinds(got, ignore=b"NS") == [b"E", b"Z"], got
        (err,) = errors(got)
        assert (err.severity, err.code, err.message) == (server_err.severity, server_err.code, server_err.message)
        assert_select_1(select_1(client))
        big = "x" * (2 * MIB)
        assert client.scalar(f"SELECT length('{big}')", timeout=30) == str(len(big)).encode()
    assert private.drops() == []

    with login(pg, private, app) as client:
        client.send(flush_of(2 * SMALL_LIMIT)[:5])  # the header: the length alone says too long
        said, closed = client.read_until_closed(timeout=3)
        if not said and not closed:
            try:  # a sidecar that reads the body first gets it
                client.send(flush_of(2 * SMALL_LIMIT)[5:], timeout=10)
            except OSError:
                pass
            more, closed = client.read_until_closed(timeout=10)
            said += more
    assert closed, f"the sidecar kept the socket open after {said}"
    assert kinds(said) == [b"E"], said
    (err,) = errors(said)
    assert (err.severity, err.code) == ("FATAL", "08P01"), err.as_dict()
    wait_for(lambda: backends(pg, app) == [], 10, "the upstream backend for the session was not released")
    time.sleep(1.0)  # a reconnect, if one were started, would show by now
    assert backends(pg, app) == [], "the sidecar reconnected after refusing the client's message"
    assert private.drops() == [], "refusing a client's message is not an upstream drop"
    assert private.alive()
    assert_no_traceback(private)


# ---------------------------------------------------------------- 3: startup parameters that are not UTF-8


def test_startup_parameter_that_is_not_utf8(pg, sidecar_factory):
    """Defect: application_name sent as Latin-1 bytes (b"caf\\xe9..."). The old code could not
    rebuild the session after a drop: every reconnect failed on the non-UTF-8 text and was retried
    at once (dozens of upstream logins per second), with tracebacks in its log.

    Required: after pg_terminate_backend and 3 s idle, at most a few upstream logins, exactly one drop
    record, no traceback, SELECT 1 works, the new backend's application_name is what the server made
    of the same bytes on a direct login, and the client gauge returns to its value once the client
    leaves."""
    suffix = uuid.uuid4().hex[:10]
    name = b"caf\xe9 " + suffix.encode()
    with direct(pg, {b"user": b"app", b"database": pg.trust_dbname.encode(), b"application_name": name}) as raw:
        server_made = raw.scalar("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    assert server_made is not None and server_made.endswith(suffix.encode())
    app = server_made.decode()  # PostgreSQL 15 keeps ASCII only (pg_clean_ascii)

    sc = sidecar_factory(upstream_dsn_for(pg), metrics=True)
    clients_before = wait_for(
        lambda: scrape_or_none(sc, "pgsidecar_client_connections"), 10, "no /metrics from the sidecar"
    )[0]
    client = RawPg.tcp(sc.port)
    try:
        client.login(startup_packet({b"user": b"app", b"database": b"app", b"application_name": name}), pg.users["app"])
        first = backend_pid(client)
        assert backends(pg, app) == [first]
        log_offset = os.path.getsize(pg.log_path)
        terminate(pg, first)
        time.sleep(3.0)  # stay idle: the sidecar reconnects on its own
        with open(pg.log_path, "rb") as fh:
            fh.seek(log_offset)
            server_log = fh.read().decode(errors="replace")
        logins = [line for line in server_log.splitlines() if "connection authorized" in line and suffix in line]
        assert 1 <= len(logins) <= 3, f"{len(logins)} upstream logins in 3 s after one drop"
        assert len(sc.drops()) == 1, sc.drops()
        logs = sc.logs()
        assert "Traceback" not in logs and "UnicodeEncodeError" not in logs, logs[-4000:]
        assert_select_1(select_1(client))
        (now,) = backends(pg, app)
        assert now != first
        assert pg.sql("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (now,)) == [(app,)]
    finally:
        client.close()
    wait_for(
        lambda: metric(sc, "pgsidecar_client_connections") == clients_before,
        10,
        "pgsidecar_client_connections did not return to its value before the test",
    )
    assert len(sc.drops()) == 1


# ---------------------------------------------------------------- 4: memory for messages read whole

HUNDRED_MB = 100 * MIB
RSS_BOUND_KIB = 8 * KIB  # per case, over the warmed-up baseline
NAMED_EXTRA_KIB = 16 * KIB  # a kept named statement: its own size plus this


def _warm_up(pg, sc: SidecarProcess) -> None:
    """Every code path the cases use, with small messages, so imports and first-use allocations
    are in the baseline."""
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"]))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
                cur.execute("SELECT repeat('e', 1000)::int")
            cur.execute("DO $$ BEGIN RAISE NOTICE '%', repeat('n', 1000); END $$")
    finally:
        conn.close()
    with login(pg, sc, "strm4-warm") as client:
        client.send(fe.Parse("", "SELECT length('w')").encode() + bind_execute_sync(""))
        assert errors(client.read_until_ready()) == []
        client.send(fe.Parse("warm", "SELECT length('w')").encode() + fe.Sync().encode())
        assert errors(client.read_until_ready()) == []
        assert client.scalar("SELECT length('w')") == b"1"
    time.sleep(0.5)


def bind_execute_sync(statement: str) -> bytes:
    # Bind: portal "", statement, 0 parameter formats, 0 parameters, 0 result formats.
    bind = message(b"B", b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0))
    return bind + fe.Execute("").encode() + fe.Sync().encode()


def _case_error(pg, sc: SidecarProcess) -> None:
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"]))
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.InvalidTextRepresentation):
            cur.execute(f"SELECT repeat('e', {HUNDRED_MB})::int")
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def _case_notice(pg, sc: SidecarProcess) -> None:
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"]))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DO $$ BEGIN RAISE NOTICE '%', repeat('n', {HUNDRED_MB}); END $$")
            assert conn.notices and len(conn.notices[-1]) > HUNDRED_MB
            conn.notices.clear()
            cur.execute("SELECT 1")
    finally:
        conn.close()


def _big_text_sql() -> str:
    return "SELECT length('" + "q" * HUNDRED_MB + "')"


def _case_unnamed_parse(pg, sc: SidecarProcess) -> None:
    with login(pg, sc, "strm4-parse") as client:
        client.send(fe.Parse("", _big_text_sql()).encode() + bind_execute_sync(""), timeout=120)
        got = client.read_until_ready(timeout=120)
        assert errors(got) == [] and rows(got) == [(str(HUNDRED_MB).encode(),)], kinds(got)


def _case_query(pg, sc: SidecarProcess) -> None:
    with login(pg, sc, "strm4-query") as client:
        assert client.scalar(_big_text_sql(), timeout=120) == str(HUNDRED_MB).encode()


def _case_named_parse(pg, sc: SidecarProcess) -> None:
    with login(pg, sc, "strm4-named") as client:
        client.send(fe.Parse("big", _big_text_sql()).encode() + fe.Sync().encode(), timeout=120)
        got = client.read_until_ready(timeout=120)
        assert errors(got) == [], [e.as_dict() for e in errors(got)]
        client.send(bind_execute_sync("big"))
        got = client.read_until_ready(timeout=120)
        assert rows(got) == [(str(HUNDRED_MB).encode(),)], kinds(got)
        assert client.scalar("SELECT 1") == b"1"  # the sidecar's idle-point snapshot has run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "bound_kib"),
    [
        pytest.param(_case_error, RSS_BOUND_KIB, id="error-response-100mb"),
        pytest.param(_case_notice, RSS_BOUND_KIB, id="notice-response-100mb"),
        pytest.param(_case_unnamed_parse, RSS_BOUND_KIB, id="unnamed-parse-100mb"),
        pytest.param(_case_query, RSS_BOUND_KIB, id="simple-query-100mb"),
        pytest.param(_case_named_parse, HUNDRED_MB // KIB + NAMED_EXTRA_KIB, id="named-parse-100mb-kept"),
    ],
)
def test_memory_for_a_100mb_message(pg, sidecar_factory, case, bound_kib):
    """Defect: messages pgsidecar reads (ErrorResponse, NoticeResponse, Parse, Query) were collected
    whole and then copied several times: a 100 MB one raised the sidecar's peak RSS by 266-420 MB.

    Required: each raises the peak RSS (VmHWM, a fresh sidecar per case) by at most 8 MB over the
    warmed-up baseline; a named statement kept for replay by at most its own size plus 16 MB."""
    sc = sidecar_factory(upstream_dsn_for(pg))
    _warm_up(pg, sc)
    pid = sc.proc.pid
    baseline, rss_then = vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")
    case(pg, sc)
    growth = vm_kib(pid, "VmHWM") - baseline
    assert sc.alive()
    assert growth <= bound_kib, (
        f"peak RSS grew {growth} KiB over the baseline peak {baseline} KiB (RSS then {rss_then} KiB);"
        f" bound {bound_kib} KiB"
    )


# ---------------------------------------------------------------- 5: the server's words reach the app


def _wait_gone(pg, pid: int, timeout: float = 15.0) -> None:
    wait_for(lambda: pid not in pg.backend_pids(), timeout, f"backend {pid} did not exit")


def test_terminate_in_transaction_says_what_the_server_said(pg, private):
    """Defect: a backend terminated while the app was idle in a transaction reached the app as
    pgsidecar's generic 08006, and the server's reason (57P01, "terminating connection due to
    administrator command") was lost.

    Required: the next statement raises AdminShutdown (57P01) with the server's message and a hint
    that pgsidecar kept the connection and the transaction was rolled back; rollback works; the next
    transaction runs."""
    conn = psycopg2.connect(private.dsn(password=pg.users["app"], application_name=unique("strm5a")))
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")  # psycopg2 opened the transaction with BEGIN
        (pid,) = cur.fetchone()
        terminate(pg, pid)
        wait_for(lambda: private.drops(), 20, "no drop record")
        with pytest.raises(psycopg2.errors.AdminShutdown) as info:
            cur.execute("SELECT 2")
        diag = info.value.diag
        assert info.value.pgcode == "57P01"
        assert diag.message_primary == "terminating connection due to administrator command"
        hint = diag.message_hint or ""
        assert "pgsidecar" in hint and "rolled back" in hint, hint
        conn.rollback()
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)
        conn.commit()
    finally:
        conn.close()


def test_idle_in_transaction_timeout_says_what_the_server_said(pg, private):
    """Defect: the server ending a session for idle_in_transaction_session_timeout reached the app
    as pgsidecar's generic 08006 instead of the server's 25P03.

    Required: the next statement raises IdleInTransactionSessionTimeout (25P03); rollback works; the
    next transaction runs."""
    conn = psycopg2.connect(private.dsn(password=pg.users["app"], application_name=unique("strm5b")))
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SET idle_in_transaction_session_timeout = '1s'")
        conn.autocommit = False
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        _wait_gone(pg, pid)  # the server's timeout ends it after 1 s idle in the transaction
        wait_for(lambda: private.drops(), 20, "no drop record")
        with pytest.raises(psycopg2.errors.IdleInTransactionSessionTimeout) as info:
            cur.execute("SELECT 2")
        assert info.value.pgcode == "25P03"
        conn.rollback()
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)
        conn.commit()
    finally:
        conn.close()


def test_terminate_in_transaction_with_close_gives_the_servers_fatal(pg, sidecar_factory):
    """Defect: with reconnect.on_transaction_loss=close the app got pgsidecar's FATAL 08006 instead
    of the server's own FATAL 57P01.

    Required: the next statement fails with SQLSTATE 57P01 (psycopg 3, which shows FATAL texts)."""
    sc = sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_RECONNECT_ON_TRANSACTION_LOSS": "close"})
    conn = psycopg.connect(sc.dsn(password=pg.users["app"], application_name=unique("strm5c")), connect_timeout=10)
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")  # psycopg 3 opened a transaction
        (pid,) = cur.fetchone()
        terminate(pg, pid)
        wait_for(lambda: sc.drops(), 20, "no drop record")
        with pytest.raises(psycopg.Error) as info:
            cur.execute("SELECT 2")
        assert info.value.sqlstate == "57P01", (info.value.sqlstate, str(info.value))
        assert "administrator command" in str(info.value)
    finally:
        conn.close()


def test_request_in_flight_when_the_server_ends_the_session(pg, private):
    """Defect: a request in flight (outside a transaction) when the server ended the session got
    08007 without the server's reason.

    Required: 08007 whose message includes the server's reason ("administrator command"); the next
    request runs."""
    app = unique("strm5d")
    conn = psycopg2.connect(private.dsn(password=pg.users["app"], application_name=app))
    conn.autocommit = True
    terminated: list[int] = []

    def terminator() -> None:
        def sleeping() -> list:
            return pg.sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
                (app,),
            )

        found = wait_for(sleeping, 10, "the backend never ran pg_sleep")
        terminate(pg, found[0][0])
        terminated.append(found[0][0])

    thread = threading.Thread(target=terminator, daemon=True)
    try:
        cur = conn.cursor()
        thread.start()
        with pytest.raises(psycopg2.errors.TransactionResolutionUnknown) as info:
            cur.execute("SELECT pg_sleep(5)")
        thread.join(15)
        assert terminated, "the terminator thread did not terminate the backend"
        assert info.value.pgcode == "08007"
        assert "administrator command" in (info.value.diag.message_primary or ""), info.value.pgerror
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        thread.join(15)
        conn.close()
