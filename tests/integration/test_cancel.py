"""Cancel through the sidecar: the key a client gets names its real backend, and a CancelRequest
reaches that backend only with the right secret.

Drivers hide BackendKeyData, so these tests speak the protocol over a plain socket with
`RawClient`, built on pgsidecar's own wire encoders (the other client tests import it too).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
import psycopg2
import pytest

from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate

pytestmark = pytest.mark.server

_HEADER = struct.Struct("!cI")


@dataclass
class RawClient:
    """A minimal protocol 3.0 client over one plain TCP socket (docs 55.2 "Message Flow")."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    key: be.BackendKeyData | None = None

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
        return cls(socket.create_connection((host, port), timeout=timeout))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no message from the server in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk

    def read_message(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        """The next (type byte, payload) from the server (55.7: Byte1 type, Int32 length)."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 5:
            self._fill(deadline)
        kind, length = _HEADER.unpack_from(self.buf)
        while len(self.buf) < 1 + length:
            self._fill(deadline)
        payload = bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return kind, payload

    def read_until_ready(self, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery."""
        deadline = time.monotonic() + timeout
        out: list[tuple[bytes, bytes]] = []
        while True:
            kind, payload = self.read_message(max(0.001, deadline - time.monotonic()))
            out.append((kind, payload))
            if kind == be.ReadyForQuery.TYPE:
                return out

    def startup(self, user: str, dbname: str = "app", *, protocol: int = fe.PROTOCOL_3_0, **params: str) -> None:
        self.send(fe.StartupMessage({"user": user, "database": dbname, **params}, protocol).encode())

    def login(self, user: str, password: str, dbname: str = "app", **params: str) -> list[tuple[bytes, bytes]]:
        """Startup, answer the sidecar's cleartext password request, read up to ReadyForQuery."""
        self.startup(user, dbname, **params)
        return self.finish_login(password)

    def finish_login(self, password: str) -> list[tuple[bytes, bytes]]:
        messages: list[tuple[bytes, bytes]] = []
        while True:
            kind, payload = self.read_message()
            messages.append((kind, payload))
            if kind == be.ErrorResponse.TYPE:
                raise AssertionError(f"login failed: {be.ErrorResponse.decode(payload).as_dict()}")
            if kind == b"R" and isinstance(be.decode_authentication(payload), be.AuthenticationCleartextPassword):
                self.send(fe.PasswordMessage(password.encode()).encode())
            elif kind == be.BackendKeyData.TYPE:
                self.key = be.BackendKeyData.decode(payload)
            elif kind == be.ReadyForQuery.TYPE:
                return messages

    def query(self, sql: str, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
        self.send(fe.Query(sql).encode())
        return self.read_until_ready(timeout)

    def scalar(self, sql: str) -> str:
        """The first column of the first row, as text; fails on an ErrorResponse."""
        for kind, payload in self.query(sql):
            if kind == be.ErrorResponse.TYPE:
                raise AssertionError(be.ErrorResponse.decode(payload).as_dict())
            if kind == be.DataRow.TYPE:
                (length,) = struct.unpack_from("!i", payload, 2)
                return payload[6 : 6 + length].decode()
        raise AssertionError(f"no row from {sql!r}")

    def has_data(self, wait_s: float = 0.0) -> bool:
        if self.buf:
            return True
        readable, _, _ = select.select([self.sock], [], [], wait_s)
        return bool(readable)

    def close_abruptly(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0), like a killed process or a reset path."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        try:
            self.send(fe.Terminate().encode())
        except OSError:
            pass
        self.sock.close()


def send_cancel(port: int, pid: int, secret: bytes) -> bytes:
    """55.2.8: a new connection carrying only CancelRequest; the server answers nothing and
    closes. Returns whatever arrived before the close (expected: nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(fe.CancelRequest(pid, secret).encode())
        received = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk


def wait_active(pg, pid: int, needle: str, timeout: float = 10.0) -> None:
    """Wait until backend `pid` is running a statement containing `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = pg.sql("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,))
        if rows and rows[0][0] == "active" and needle in rows[0][1]:
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never ran {needle!r}")


def expect_canceled(client: RawClient, timeout: float = 5.0) -> float:
    """Read the reply to a cancelled query: ERROR 57014 then ReadyForQuery; returns seconds taken."""
    start = time.monotonic()
    messages = client.read_until_ready(timeout)
    errors = [be.ErrorResponse.decode(p) for k, p in messages if k == be.ErrorResponse.TYPE]
    assert [e.code for e in errors] == [sqlstate.QUERY_CANCELED], [e.as_dict() for e in errors]
    assert messages[-1] == (be.ReadyForQuery.TYPE, b"I")
    return time.monotonic() - start


@pytest.fixture
def raw(pg, sidecar):
    """A logged-in RawClient through the shared sidecar, with its own application_name."""
    client = RawClient.connect(sidecar.port)
    app = f"cancel-{uuid.uuid4().hex[:8]}"
    client.login("app", pg.users["app"], application_name=app)
    yield client
    client.close()


def test_backend_key_pid_is_the_real_backend_pid(pg, sidecar, raw):
    assert raw.key is not None
    assert int(raw.scalar("SELECT pg_backend_pid()")) == raw.key.pid
    app = raw.scalar("SELECT current_setting('application_name')")
    assert pg.backend_pids(application_name=app) == [raw.key.pid]


def test_cancel_with_the_right_key_cancels_the_running_query(pg, sidecar, raw):
    assert raw.key is not None
    raw.send(fe.Query("SELECT pg_sleep(30)").encode())
    wait_active(pg, raw.key.pid, "pg_sleep(30)")
    assert send_cancel(sidecar.port, raw.key.pid, raw.key.secret) == b""
    assert expect_canceled(raw) < 5.0
    assert raw.scalar("SELECT 40 + 2") == "42", "the session stays usable after a cancel"


def test_cancel_with_a_wrong_secret_or_pid_does_nothing(pg, sidecar, raw):
    assert raw.key is not None
    pid, secret = raw.key.pid, raw.key.secret
    raw.send(fe.Query("SELECT pg_sleep(30)").encode())
    wait_active(pg, pid, "pg_sleep(30)")
    wrong_secret = bytes(b ^ 0xFF for b in secret)
    assert send_cancel(sidecar.port, pid, wrong_secret) == b""
    assert send_cancel(sidecar.port, pid + 1, secret) == b""
    assert not raw.has_data(wait_s=1.5), "a cancel with a wrong key must not reach the backend"
    wait_active(pg, pid, "pg_sleep(30)", timeout=1.0)
    assert send_cancel(sidecar.port, pid, secret) == b""
    expect_canceled(raw)


def test_the_sidecar_secret_is_not_the_servers(pg, sidecar, raw):
    """The client's key is the sidecar's own: sent straight to the server it cancels nothing,
    so a key leaked from the app is useless without the sidecar (docs/architecture.md, Cancel)."""
    assert raw.key is not None
    raw.send(fe.Query("SELECT pg_sleep(30)").encode())
    wait_active(pg, raw.key.pid, "pg_sleep(30)")
    # The server takes a plain CancelRequest on its TCP port, like libpq's PQcancel sends it.
    send_cancel(pg.port, raw.key.pid, raw.key.secret)
    assert not raw.has_data(wait_s=1.0)
    send_cancel(sidecar.port, raw.key.pid, raw.key.secret)
    expect_canceled(raw)


def test_psycopg3_cancel_safe_over_tls_to_the_sidecar(pg, sidecar):
    """libpq 17's PQcancelBlocking sends the CancelRequest over TLS when the session used TLS;
    older libpq sends it in plaintext. Either way the sidecar must route it."""
    conn = psycopg.connect(sidecar.dsn(password=pg.users["app"], sslmode="require"), autocommit=True)
    try:
        pid = conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)

        def cancel_when_running() -> None:
            wait_active(pg, pid, "pg_sleep(30)")
            conn.cancel_safe(timeout=10)

        thread = threading.Thread(target=cancel_when_running)
        thread.start()
        start = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        thread.join(10)
        assert time.monotonic() - start < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()


def test_cancel_reaches_the_backend_serving_the_session_now(pg, sidecar, raw):
    """After a transparent reconnect the client keeps its first key; a cancel with it must reach
    the new backend, with that backend's real key (docs/architecture.md, Cancel)."""
    assert raw.key is not None
    first_pid = raw.key.pid
    assert pg.terminate(first_pid)
    deadline = time.monotonic() + 15
    new_pid = first_pid
    while new_pid == first_pid and time.monotonic() < deadline:
        try:
            new_pid = int(raw.scalar("SELECT pg_backend_pid()"))
        except AssertionError:
            time.sleep(0.1)
    assert new_pid != first_pid, "the session did not move to a new backend"
    raw.send(fe.Query("SELECT pg_sleep(30)").encode())
    wait_active(pg, new_pid, "pg_sleep(30)")
    send_cancel(sidecar.port, first_pid, raw.key.secret)
    assert expect_canceled(raw) < 5.0


def test_psycopg2_backend_pid_matches_through_the_sidecar(pg, sidecar):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"]))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] == conn.info.backend_pid
    finally:
        conn.close()
