"""Bad input from clients (issue 3, point 10): raw sockets against a private sidecar with small limits.

Each case must end in an ErrorResponse (08P01 or the code PostgreSQL itself uses) or a closed
socket, leave exactly one line about it in the sidecar's JSON log, and not disturb a healthy
psycopg2 session that runs a query loop through the same sidecar the whole time. Where the
wording can be compared, it is compared with what PostgreSQL says for the same bytes.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import pytest

from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.fixtures.sidecar import SidecarProcess, start_sidecar, upstream_dsn_for

pytestmark = pytest.mark.server

MAX_MESSAGE = 1 << 20  # PGSIDECAR_LISTEN_MAX_MESSAGE_SIZE=1MB
STARTUP_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def limited(pg) -> Iterator[SidecarProcess]:
    """A private sidecar with a 1 MB message limit and a 1 s startup timeout."""
    proc = start_sidecar(
        upstream_dsn_for(pg), env={"PGSIDECAR_LISTEN_MAX_MESSAGE_SIZE": "1MB", "PGSIDECAR_LISTEN_STARTUP_TIMEOUT": "1s"}
    )
    yield proc
    proc.stop()


# ---------------------------------------------------------------- helpers


class HealthyLoop:
    """A psycopg2 session running queries in a thread; any error it sees fails the test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.errors: list[BaseException] = []
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.errors.append(exc)
            return
        try:
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute("SELECT count(*) FROM generate_series(1, 1000)")
                    assert cur.fetchone() == (1000,)
                    conn.commit()
                    self.queries += 1
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
        finally:
            conn.close()

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.queries == 0 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)

    def check(self) -> None:
        before = self.queries
        deadline = time.monotonic() + 5
        while self.queries < before + 3 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)  # it is still making progress after the bad client is gone
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, f"the healthy session saw: {self.errors!r}"
        assert self.queries >= before + 3, "the healthy session stalled"


@contextmanager
def healthy(pg, sidecar: SidecarProcess) -> Iterator[HealthyLoop]:
    loop = HealthyLoop(sidecar.dsn(password=pg.users["app"], application_name="healthy-loop"))
    loop.start()
    yield loop
    loop.check()


def connect_raw(sidecar: SidecarProcess) -> tuple[socket.socket, str]:
    """A raw client socket and the peer text the sidecar logs for it."""
    sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
    host, port = sock.getsockname()[:2]
    return sock, f"{host}:{port}"


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or ``timeout`` passes (False)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def read_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 0
    while i + 5 <= len(data):
        (length,) = struct.unpack_from("!I", data, i + 1)
        out.append((data[i : i + 1], data[i + 5 : i + 1 + length]))
        i += 1 + length
    assert i == len(data), f"trailing bytes: {data[i:]!r}"
    return out


def read_until_ready(sock: socket.socket, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"closed early after {bytes(data)!r}"
        data += chunk
        if len(data) >= 6 and data[-6:-1] == b"Z\x00\x00\x00\x05":
            return read_messages(bytes(data))
    raise AssertionError(f"no ReadyForQuery in {bytes(data)[:200]!r}")


def login_raw(pg, sidecar: SidecarProcess, application_name: str = "bad-input") -> tuple[socket.socket, str]:
    """A raw session through the sidecar, logged in and ready for queries."""
    sock, peer = connect_raw(sidecar)
    sock.sendall(fe.StartupMessage({"user": "app", "database": "app", "application_name": application_name}).encode())
    sock.settimeout(10)
    data = sock.recv(65536)
    assert data == be.AuthenticationCleartextPassword().encode()
    sock.sendall(fe.PasswordMessage(pg.users["app"].encode()).encode())
    kinds = [kind for kind, _ in read_until_ready(sock)]
    assert kinds[0] == b"R" and kinds[-1] == b"Z" and b"K" in kinds
    return sock, peer


def only_error(data: bytes) -> be.ErrorResponse:
    messages = read_messages(data)
    assert [kind for kind, _ in messages] == [b"E"], messages
    return be.ErrorResponse.decode(messages[0][1])


def log_lines(sidecar: SidecarProcess, needle: str) -> list[dict]:
    """Lines at info and above that mention ``needle`` (debug traces every connect and close)."""
    out = []
    for line in sidecar.logs().splitlines():
        if needle in line:
            record = json.loads(line)
            if record.get("level") != "debug":
                out.append(record)
    return out


def one_log_line(sidecar: SidecarProcess, needle: str, *, timeout: float = 5.0) -> dict:
    """Exactly one line of the sidecar log mentions ``needle`` (a client's address)."""
    deadline = time.monotonic() + timeout
    while not log_lines(sidecar, needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a second line, if any, would be written right after the first
    lines = log_lines(sidecar, needle)
    assert len(lines) == 1, lines
    return lines[0]


def postgres_answer(pg, packet: bytes) -> tuple[bytes, bool]:
    """What PostgreSQL itself answers to the same first bytes (for comparing wording)."""
    with socket.create_connection(("127.0.0.1", pg.port), timeout=10) as sock:
        sock.sendall(packet)
        return read_until_closed(sock)


# ---------------------------------------------------------------- after login


def test_length_below_four_after_login(pg, limited):
    with healthy(pg, limited):
        sock, peer = login_raw(pg, limited)
        with sock:
            sock.sendall(b"Q\x00\x00\x00\x02")
            data, closed = read_until_closed(sock)
        err = only_error(data)
        assert closed
        assert (err.severity, err.code) == ("FATAL", "08P01")
        assert "invalid message length 2" in err.message
        line = one_log_line(limited, peer)
        assert "client protocol error" in line["message"]


def test_length_above_the_limit_after_login(pg, limited):
    with healthy(pg, limited):
        sock, peer = login_raw(pg, limited)
        with sock:
            # Only the header: the sidecar must refuse from the length, not wait for 2 MB.
            sock.sendall(b"Q" + struct.pack("!I", 2 * MAX_MESSAGE) + b"SELECT ")
            data, closed = read_until_closed(sock)
        err = only_error(data)
        assert closed
        assert (err.severity, err.code) == ("FATAL", "08P01")
        assert f"exceeds the limit of {MAX_MESSAGE} bytes" in err.message
        one_log_line(limited, peer)


def test_message_just_under_the_limit_is_relayed(pg, limited):
    sock, _peer = login_raw(pg, limited)
    with sock:
        sql = "SELECT length('" + "x" * (MAX_MESSAGE - 100) + "')"
        sock.sendall(fe.Query(sql).encode())
        messages = read_until_ready(sock, timeout=20)
        rows = [be.DataRow.decode(p).values for k, p in messages if k == b"D"]
        assert rows == [(str(MAX_MESSAGE - 100).encode(),)]


def test_malformed_parse_after_login(pg, limited):
    """A Parse whose statement name has no NUL: the sidecar reads Parse, so it must say 08P01."""
    with healthy(pg, limited):
        sock, peer = login_raw(pg, limited)
        with sock:
            sock.sendall(b"P" + struct.pack("!I", 4 + 5) + b"stmt1")
            data, closed = read_until_closed(sock)
        err = only_error(data)
        assert closed
        assert (err.severity, err.code) == ("FATAL", "08P01")
        assert "Parse" in err.message
        one_log_line(limited, peer)


def test_unknown_message_type_after_login(pg, limited):
    """PostgreSQL answers an unknown message type with FATAL 08P01 and closes; the client must
    hear about it (an ErrorResponse 08P01 or a closed socket), not be silently reconnected."""
    with healthy(pg, limited):
        sock, _peer = login_raw(pg, limited)
        with sock:
            sock.sendall(b"y" + struct.pack("!I", 4))
            data, closed = read_until_closed(sock, timeout=5)
        errors = [be.ErrorResponse.decode(p) for k, p in read_messages(data) if k == b"E"]
        assert closed or any(e.code == "08P01" for e in errors), (data, closed)
        if errors:
            assert errors[0].code == "08P01"
            assert "invalid frontend message type 121" in errors[0].message


# ---------------------------------------------------------------- startup


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x00\x00\x00\x03garbage", b"\xff" * 16]
)
def test_garbage_instead_of_a_startup_packet(pg, limited, garbage):
    with healthy(pg, limited):
        sock, peer = connect_raw(limited)
        with sock:
            sock.sendall(garbage)
            data, closed = read_until_closed(sock)
        assert closed
        err = only_error(data)
        # PostgreSQL logs the same words (COMMERROR, postmaster.c) and closes without a reply.
        assert (err.severity, err.code, err.message) == ("FATAL", "08P01", "invalid length of startup packet")
        assert postgres_answer(pg, garbage) == (b"", True)
        one_log_line(limited, peer)


def test_startup_packet_over_10000_bytes(pg, limited):
    packet = fe.StartupMessage({"user": "app", "database": "app", "options": "x" * 12_000}).encode()
    with healthy(pg, limited):
        sock, peer = connect_raw(limited)
        with sock:
            sock.sendall(packet)
            data, closed = read_until_closed(sock)
        assert closed
        err = only_error(data)
        assert (err.severity, err.code, err.message) == ("FATAL", "08P01", "invalid length of startup packet")
        assert postgres_answer(pg, packet) == (b"", True)
        one_log_line(limited, peer)


@pytest.mark.parametrize("version", [(2, 0), (4, 0)])
def test_unknown_protocol_version(pg, limited, version):
    packet = fe.StartupMessage({"user": "app", "database": "app"}, version[0] << 16 | version[1]).encode()
    with healthy(pg, limited):
        sock, peer = connect_raw(limited)
        with sock:
            sock.sendall(packet)
            data, closed = read_until_closed(sock)
        assert closed
        err = only_error(data)
        assert (err.severity, err.code) == ("FATAL", "0A000")
        assert err.message == f"unsupported frontend protocol {version[0]}.{version[1]}: server supports 3.0 to 3.0"
        theirs, _ = postgres_answer(pg, packet)
        if version[0] < 3:
            # PostgreSQL answers a 2.0 client in the 2.0 format: "E", then "FATAL:  text\n" and NUL.
            assert theirs == b"EFATAL:  " + err.message.encode() + b"\n\x00"
        else:
            server_err = only_error(theirs)
            assert (server_err.severity, server_err.code, server_err.message) == (err.severity, err.code, err.message)
        one_log_line(limited, peer)


@pytest.mark.parametrize("sent", [b"", b"\x00\x00\x00\x50\x00\x03"])
def test_client_that_never_finishes_its_startup_packet(pg, limited, sent):
    with healthy(pg, limited):
        sock, peer = connect_raw(limited)
        with sock:
            started = time.monotonic()
            sock.sendall(sent)
            data, closed = read_until_closed(sock, timeout=STARTUP_TIMEOUT_S + 5)
            waited = time.monotonic() - started
        assert closed and data == b""
        assert STARTUP_TIMEOUT_S - 0.2 <= waited <= STARTUP_TIMEOUT_S + 3
        assert "did not finish startup" in one_log_line(limited, peer)["message"]


def test_client_that_never_sends_its_password(pg, limited):
    """config/pgsidecar.yaml: "a client that has not finished startup and auth by then is stuck"."""
    with healthy(pg, limited):
        sock, peer = connect_raw(limited)
        with sock:
            started = time.monotonic()
            sock.sendall(fe.StartupMessage({"user": "app", "database": "app"}).encode())
            data, closed = read_until_closed(sock, timeout=STARTUP_TIMEOUT_S + 5)
            waited = time.monotonic() - started
        assert data.startswith(be.AuthenticationCleartextPassword().encode())
        assert closed and waited <= STARTUP_TIMEOUT_S + 3
        one_log_line(limited, peer)


# ---------------------------------------------------------------- a client that stops reading


def test_client_that_stops_reading_a_large_result(pg, limited):
    name = "bad-input-stalled"
    with healthy(pg, limited):
        sock, _peer = login_raw(pg, limited, application_name=name)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            rss_before = limited.rss_kib()
            # About 1 GB of rows if it were all produced; the client reads none of it.
            sock.sendall(fe.Query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)").encode())
            peak = rss_before
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                peak = max(peak, limited.rss_kib())
                time.sleep(0.1)
            # Buffers are bounded by relay.high_water (256 kB) per side, not by the result.
            assert peak - rss_before < 32 * 1024, f"RSS grew by {peak - rss_before} KiB"
            assert pg.backend_pids(application_name=name), "the backend should still be there, blocked on send"
        finally:
            sock.close()
        # Closing the client releases the upstream backend.
        deadline = time.monotonic() + 15
        while pg.backend_pids(application_name=name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pg.backend_pids(application_name=name) == []
