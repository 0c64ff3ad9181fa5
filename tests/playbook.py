"""The Playbook: one harness for every socket-free transcript of the brain (mitmproxy's habit).

``Playbook`` drives one SidecarConnection with a clock; each method feeds one event and returns
the commands, with ``Log``, ``NoteUpstream`` and ``NoteParking`` commands taken out (kept in
``pb.logs``, ``pb.notes`` and ``pb.parking``) so a transcript pins what the session does, not
what it says about it. ``ANY`` stands for a value a test does not pin. The helpers build what a real PostgreSQL sends; ``login`` and ``reconnect`` walk a
session through the exact commands of a login and of a reconnect.
"""

from __future__ import annotations

import random

from pgsidecar.auth.md5 import md5_password
from pgsidecar.drops.record import DropFacts
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.connection import SessionPolicy, SidecarConnection
from pgsidecar.relay.phases import Phase
from pgsidecar.session.state import FACTS_SQL
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.frames import FrameScanner


class _Any:
    """Equal to anything: a placeholder for a value a transcript does not pin."""

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()

SECRET = b"\x0b\xad\xca\xfe"  # pgsidecar's own key for this client
BACKEND_PID, BACKEND_SECRET = 4242, b"\x11\x22\x33\x44"  # the real upstream backend's key
PASSWORD = "s3cret"
PARAMS = {"user": "app", "database": "appdb", "application_name": "tx"}
SERVER_PARAMS = {"server_version": "15.5", "client_encoding": "UTF8", "TimeZone": "UTC"}

LOST_IN_TRANSACTION = "connection to the server was lost; the transaction was rolled back"
LOST_IN_FLIGHT = "connection to the server was lost while the request was in flight; whether it was executed is unknown"


# ---------------------------------------------------------------- the playbook


class Playbook:
    """One SidecarConnection and a clock; each method feeds one event and returns the commands."""

    def __init__(self, **policy: object) -> None:
        self.conn = SidecarConnection(SessionPolicy(**policy), secret=SECRET, rng=random.Random(7))
        self.now = 1000.0
        self.logs: list[cmd.Log] = []
        self.notes: list[cmd.NoteUpstream] = []  # the server each login reached, and its role
        self.parking: list[cmd.NoteParking] = []  # each park and unpark, for the metrics

    def _tick(self) -> float:
        self.now += 0.5
        return self.now

    def handle(self, event: ev.Event) -> list[object]:
        out = self.conn.handle(event)
        self.logs += [c for c in out if isinstance(c, cmd.Log)]
        self.notes += [c for c in out if isinstance(c, cmd.NoteUpstream)]
        self.parking += [c for c in out if isinstance(c, cmd.NoteParking)]
        return [c for c in out if not isinstance(c, cmd.Log | cmd.NoteUpstream | cmd.NoteParking)]

    def client_connected(self, *, trusted: bool = True) -> list[object]:
        return self.handle(ev.ClientConnected(self._tick(), 1.7e9, "127.0.0.1:50000", trusted))

    def client(self, data: bytes) -> list[object]:
        return self.handle(ev.ClientData(self._tick(), data))

    def server(self, data: bytes) -> list[object]:
        return self.handle(ev.ServerData(self._tick(), data))

    def server_connected(self, address: str = "10.0.0.5", host: str = "db") -> list[object]:
        facts: ev.ConnectionFacts = {"address": address, "host": host}
        return self.handle(ev.ServerConnected(self._tick(), 1.7e9, address, False, None, facts=facts))

    def server_closed(self, kind: str = "eof") -> list[object]:
        return self.handle(ev.ServerClosed(self._tick(), 1.7e9, kind))

    def timer(self, name: str) -> list[object]:
        return self.handle(ev.Timer(self._tick(), 1.7e9, name))


def to_client(commands: list[object]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, cmd.SendToClient))


def to_server(commands: list[object]) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, cmd.SendToServer))


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    scanner = FrameScanner(bytes(range(256)), 1 << 20, client=False)
    out = [(bytes([t]), payload) for t, payload in scanner.feed(data)]
    assert scanner.at_boundary
    return out


def error(severity: str, code: str, message: str) -> bytes:
    return be.ErrorResponse.make(severity, code, message).encode()


def z(status: bytes = b"I") -> bytes:
    return be.ReadyForQuery(status).encode()


def hello(pid: int = BACKEND_PID, secret: bytes = BACKEND_SECRET, params: dict | None = None) -> bytes:
    """What the server sends after the password: AuthenticationOk, ParameterStatus*, key, Z."""
    out = bytearray(be.AuthenticationOk().encode())
    for name, value in (params or SERVER_PARAMS).items():
        out += be.ParameterStatus(name, value).encode()
    return bytes(out + be.BackendKeyData(pid, secret).encode() + z())


def select_reply(value: bytes = b"1", tag: str = "SELECT 1", status: bytes = b"I") -> bytes:
    return (
        be.RowDescription(("x",)).encode()
        + be.DataRow((value,)).encode()
        + be.CommandComplete(tag).encode()
        + z(status)
    )


FACTS_QUERY = fe.Query(FACTS_SQL.decode()).encode()
FACTS_REPLY = (
    be.RowDescription(("a", "b", "c", "d")).encode()
    + be.DataRow((b"1700000000.5", b"f", b"off", b"10.0.0.5")).encode()
    + be.CommandComplete("SELECT 1").encode()
    + z()
)


def login(pb: Playbook, *, method: str = "cleartext", answer_facts: bool = True) -> None:
    """Drive a session from connect to relaying, checking each step's exact commands. Right after
    the client's hello the brain reads the server's facts, unseen by the client."""
    assert pb.client_connected() == [cmd.SetTimer("startup", 10.0)]
    assert pb.client(fe.StartupMessage(dict(PARAMS)).encode()) == [cmd.CancelTimer("startup"), cmd.OpenServer()]
    assert pb.conn.phase is Phase.AUTHENTICATING
    assert pb.server_connected() == [cmd.SendToServer(fe.StartupMessage(dict(PARAMS)).encode())]
    ask = {"cleartext": be.AuthenticationCleartextPassword(), "md5": be.AuthenticationMD5Password(b"salt")}[method]
    assert pb.server(ask.encode()) == [
        cmd.SendToClient(be.AuthenticationCleartextPassword().encode()),
        cmd.SetTimer("startup", 10.0),
    ]
    answer = pb.client(fe.PasswordMessage(PASSWORD.encode()).encode())
    expected = (
        fe.PasswordMessage(PASSWORD.encode())
        if method == "cleartext"
        else fe.PasswordMessage(md5_password("app", PASSWORD, b"salt"))
    )
    assert answer == [cmd.CancelTimer("startup"), cmd.SendToServer(expected.encode())]
    assert pb.server(hello()) == [
        cmd.RegisterCancelKey(BACKEND_PID, SECRET),
        cmd.SendToClient(client_hello()),
        cmd.SendToServer(FACTS_QUERY),
    ]
    assert pb.conn.phase is Phase.RELAYING
    if answer_facts:
        assert pb.server(FACTS_REPLY) == []


def client_hello() -> bytes:
    """What the client gets: AuthOk, the server's parameters, the real pid with our secret, Z."""
    out = bytearray(be.AuthenticationOk().encode())
    for name, value in SERVER_PARAMS.items():
        out += be.ParameterStatus(name, value).encode()
    return bytes(out + be.BackendKeyData(BACKEND_PID, SECRET).encode() + z())


def first_query(pb: Playbook) -> None:
    """One request and its reply, relayed untouched."""
    q = fe.Query("SELECT 1").encode()
    assert pb.client(q) == [cmd.SendToServer(q)]
    reply = select_reply()
    assert pb.server(reply) == [cmd.SendToClient(reply)]


def reconnect(pb: Playbook, *, params: dict | None = None) -> list[object]:
    """A new upstream after a drop: startup, the remembered password, login, replay (facts only)."""
    assert pb.server_connected() == [cmd.SendToServer(fe.StartupMessage(dict(PARAMS)).encode())]
    assert pb.server(be.AuthenticationCleartextPassword().encode()) == [
        cmd.SendToServer(fe.PasswordMessage(PASSWORD.encode()).encode())
    ]
    assert pb.server(hello(pid=5555, secret=b"\x99\x88\x77\x66", params=params)) == [cmd.SendToServer(FACTS_QUERY)]
    assert pb.conn.phase is Phase.REPLAYING
    return pb.server(FACTS_REPLY)


def drop_record(commands: list[object]) -> DropFacts:
    records = [c.drop for c in commands if isinstance(c, cmd.RecordDrop)]
    assert len(records) == 1, commands
    return records[0]
