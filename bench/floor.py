"""The floor: the thinnest uvloop relay there is, as the reference the proxies are measured against.

`python -m bench.floor --listen 127.0.0.1:PORT [--unix-socket-dir DIR] --upstream HOST:PORT`

Clients speak plaintext to it over TCP (or a unix socket, DIR/.s.PGSQL.PORT); it answers their
SSLRequest (and GSSENCRequest) with 'N', then opens the upstream: a raw socket, PostgreSQL's own
SSLRequest, 'S', and only then TLS over that socket (`create_connection(sock=..., ssl=...)`, as
``sslmode=require``: encrypted, certificate not checked). The client's StartupMessage and every
byte after it pass through unchanged, and so does all the server sends but one edit to its first
message: SCRAM-SHA-256-PLUS is struck from AuthenticationSASL (libpq will not be offered channel
binding over a plaintext connection). The password exchange is the client's own with the server.
No parsing past that, no buffering beyond the transports', pause and resume on the write buffers.
Nothing else, so what pgsidecar costs above this is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import struct
from typing import cast

import uvloop

SSL_REQUEST = struct.pack("!II", 8, 80877103)
_NEGOTIATION_CODES = (80877103, 80877104)  # SSLRequest, GSSENCRequest: both answered 'N'


def upstream_context() -> ssl.SSLContext:
    """TLS as libpq's sslmode=require: encrypted, the server's certificate not verified."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Pipe(asyncio.Protocol):
    """One direction's sink: what arrives here is written to `peer`; back-pressure both ways."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def without_plus(message: bytes) -> bytes:
    """AuthenticationSASL without SCRAM-SHA-256-PLUS; any other message unchanged. libpq refuses a
    PLUS offer over its plaintext hop to the relay, and the server, which offered PLUS because its
    own hop is TLS, accepts the client's "n" (no binding) flag on plain SCRAM-SHA-256."""
    if message[:1] != b"R" or len(message) < 9 or struct.unpack_from("!I", message, 5)[0] != 10:
        return message
    names = [n for n in message[9:].split(b"\0") if n and n != b"SCRAM-SHA-256-PLUS"]
    body = struct.pack("!I", 10) + b"".join(n + b"\0" for n in names) + b"\0"
    return b"R" + struct.pack("!I", len(body) + 4) + body


class ServerSide(_Pipe):
    """The TLS connection to PostgreSQL: its first message goes through without_plus(), every
    byte after it unread."""

    def __init__(self) -> None:
        super().__init__()
        self.first: bytearray | None = bytearray()  # None once the first message went through

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            super().data_received(data)
            return
        self.first += data
        if len(self.first) < 5:
            return
        end = 1 + struct.unpack_from("!I", self.first, 1)[0]
        if len(self.first) < end:
            return
        head, rest = bytes(self.first[:end]), bytes(self.first[end:])
        self.first = None
        super().data_received(without_plus(head) + rest)


class ClientSide(_Pipe):
    """The application's connection: negotiation, then the StartupMessage opens the upstream."""

    def __init__(self, upstream: tuple[str, int], ctx: ssl.SSLContext) -> None:
        super().__init__()
        self.upstream, self.ctx = upstream, ctx
        self.pending = bytearray()  # from the StartupMessage on, until the upstream is up
        self.connecting: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            super().data_received(data)
            return
        self.pending += data
        if self.connecting is not None:
            return
        while len(self.pending) >= 8:
            length, code = struct.unpack_from("!II", self.pending)
            if length == 8 and code in _NEGOTIATION_CODES:
                del self.pending[:8]
                assert self.transport is not None
                self.transport.write(b"N")
                continue
            if len(self.pending) >= length:
                self.connecting = asyncio.get_running_loop().create_task(self._open())
            return

    async def _open(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.upstream)
            await loop.sock_sendall(sock, SSL_REQUEST)
            answer = await loop.sock_recv(sock, 1)
            if answer != b"S":
                raise ConnectionError(f"upstream answered SSLRequest with {answer!r}")
            _, server = await loop.create_connection(
                ServerSide, sock=sock, ssl=self.ctx, server_hostname=self.upstream[0]
            )
        except (OSError, ssl.SSLError, ConnectionError):
            sock.close()
            self.transport.close()
            return
        if self.transport.is_closing():
            assert server.transport is not None
            server.transport.close()
            return
        server.peer, self.peer = self, server
        assert server.transport is not None
        server.transport.write(bytes(self.pending))
        self.pending.clear()


async def serve(host: str, port: int, unix_dir: str | None, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    ctx = upstream_context()
    servers = [await loop.create_server(lambda: ClientSide(upstream, ctx), host, port, backlog=4096)]
    if unix_dir:
        path = os.path.join(unix_dir, f".s.PGSQL.{port}")
        if os.path.exists(path):  # noqa: ASYNC240 - one stat of a local path, at start
            os.unlink(path)
        servers.append(await loop.create_unix_server(lambda: ClientSide(upstream, ctx), path, backlog=4096))
        os.chmod(path, 0o777)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--unix-socket-dir", metavar="DIR", help="also listen on DIR/.s.PGSQL.<port>")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT", help="PostgreSQL with TLS")
    args = parser.parse_args(argv)
    host, port = _host_port(args.listen)
    uvloop.run(serve(host, port, args.unix_socket_dir, _host_port(args.upstream)))


if __name__ == "__main__":
    main()
