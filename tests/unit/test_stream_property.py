"""A property of the brain across any number of drops, at any byte: what reaches a server is
always whole client messages (or pgsidecar's own queries), never a piece of one read as messages.

Hypothesis draws a pipeline of extended-protocol groups and simple queries (as psycopg 3's
pipeline mode sends them) whose Bind parameters carry a canary: the bytes of a whole Query
message. It cuts the client stream into random reads and puts drops (with or without the
server's FATAL, inside a transaction or not) between any two of them, answering every sync point
the server gets. Every server connection's stream must parse into frames each of which is a
client message the app sent, byte for byte, or one of pgsidecar's own.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgsidecar.relay import commands as cmd
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import FACTS_QUERY, FACTS_REPLY, Playbook, error, hello, login, z

CANARY = fe.Query("INSERT INTO canary VALUES (1)").encode()


def bind(value: bytes) -> bytes:
    """Bind: unnamed portal and statement, no format codes, one text parameter, no result codes."""
    body = b"\x00\x00" + struct.pack("!hhI", 0, 1, len(value)) + value + struct.pack("!h", 0)
    return b"B" + struct.pack("!I", 4 + len(body)) + body


def group(n: int, pad: int) -> list[bytes]:
    out = [fe.Parse("", "INSERT INTO t VALUES ($1)").encode()]
    for i in range(n):
        out += [
            bind(b"x" * pad + CANARY + bytes([48 + i % 10])),
            fe.Describe(b"P", "").encode(),
            fe.Execute("").encode(),
        ]
        if i % 2:
            out.append(fe.Flush().encode())
    return [*out, fe.Sync().encode()]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[bytes], list[int], dict[int, str], set[int]]:
    messages: list[bytes] = []
    if draw(st.booleans()):
        messages.append(fe.Query("BEGIN").encode())
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            messages += group(draw(st.integers(1, 3)), draw(st.integers(0, 300)))
        else:
            messages.append(fe.Query("SELECT '" + "q" * draw(st.integers(0, 400)) + "'").encode())
    stream = b"".join(messages)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(stream) - 1), max_size=12))))
    drops = draw(st.dictionaries(st.integers(0, len(cuts)), st.sampled_from(["eof", "57P01", "57P05"]), max_size=3))
    late = draw(st.sets(st.integers(0, len(cuts))))  # reads after which the server has not answered yet
    return messages, cuts, drops, late


class Server:
    """Answers what the brain sends one server connection: login, facts, every sync point."""

    def __init__(self) -> None:
        self.received = bytearray()

    def take(self, commands: list[object]) -> None:
        for c in commands:
            if isinstance(c, cmd.SendToServer):
                self.received += c.data

    def frames(self) -> list[bytes]:
        """Whole frames so far (a message still on its way is left out)."""
        out, i, data = [], 0, bytes(self.received)
        while i + 5 <= len(data):
            (ln,) = struct.unpack_from("!I", data, i + 1)
            if i + 1 + ln > len(data):
                break
            out.append(data[i : i + 1 + ln])
            i += 1 + ln
        return out


def replies_for(frames: list[bytes], answered: int, in_tx: list[bool]) -> tuple[bytes, int]:
    """ReadyForQuery for each sync point not yet answered (status follows BEGIN/ROLLBACK)."""
    out = bytearray()
    for f in frames[answered:]:
        if f == FACTS_QUERY:
            out += FACTS_REPLY
        elif f[:1] == b"Q":
            text = f[5:-1]
            if text == b"BEGIN":
                in_tx[0] = True
            elif text in (b"ROLLBACK", b"COMMIT"):
                in_tx[0] = False
            out += be.CommandComplete("SELECT 1").encode() + z(b"T" if in_tx[0] else b"I")
        elif f[:1] == b"S":
            out += z(b"T" if in_tx[0] else b"I")
    return bytes(out), len(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_servers_only_ever_get_whole_client_messages(
    case: tuple[list[bytes], list[int], dict[int, str], set[int]],
) -> None:
    messages, cuts, drops, late = case
    allowed = set(messages) | {FACTS_QUERY, fe.Query("ROLLBACK").encode()}
    stream = b"".join(messages)
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pb = Playbook(max_buffered_bytes=256)
    login(pb)
    servers = [Server()]
    answered, in_tx = 0, [False]
    for i, piece in enumerate(pieces):
        if i in drops and pb.conn.phase is Phase.RELAYING:
            kind = drops[i]
            if kind != "eof":
                message = "terminating connection due to " + (
                    "administrator command" if kind == "57P01" else "idle-session timeout"
                )
                pb.server(error("FATAL", kind, message))
            pb.server_closed()
            if pb.conn.phase is Phase.CLOSED:
                break
            servers.append(Server())
            answered, in_tx = 0, [False]
            pb.server_connected()
            pb.server(be.AuthenticationCleartextPassword().encode())
            out = pb.server(hello(pid=5555 + i))
            servers[-1].take(out)
            servers[-1].received.clear()  # the password exchange is not client traffic
            servers[-1].take([c for c in out if isinstance(c, cmd.SendToServer)])
        out = pb.client(piece)
        servers[-1].take(out)
        if pb.conn.phase is Phase.CLOSED:
            break
        if i in late:
            continue  # the server is still working: a drop now finds requests owed
        reply, answered = replies_for(servers[-1].frames(), answered, in_tx)
        if reply:
            servers[-1].take(pb.server(reply))
    for n, server in enumerate(servers):
        for frame in server.frames():
            assert frame != CANARY, f"server {n} got the canary inside a Bind as a message"
            assert frame in allowed, (n, frame[:60])
