"""A tiny asyncio PostgreSQL client: startup, auth (cleartext, md5, SCRAM), simple queries.

Enough to hold a thousand idle sessions open cheaply from the bench process, and to time one
query after a server restart; libpq per connection would cost a thread or a process each.
Protocol facts: PostgreSQL docs, "Frontend/Backend Protocol" > "Message Formats".
"""

from __future__ import annotations

import asyncio
import hashlib
import struct

from pgsidecar.auth.scram import ScramClient

PROTOCOL_3_0 = 196608


class PgError(Exception):
    """The server (or proxy) answered with ErrorResponse, or closed the connection."""


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class MiniClient:
    """One session: `await connect()`, `await query(sql)`, `close()`."""

    def __init__(
        self, port: int, user: str, password: str, dbname: str = "postgres", application_name: str = "bench-idle"
    ) -> None:
        self.port, self.user, self.password, self.dbname = port, user, password, dbname
        self.application_name = application_name
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _read(self) -> tuple[bytes, bytes]:
        assert self.reader is not None
        try:
            header = await self.reader.readexactly(5)
            body = await self.reader.readexactly(struct.unpack("!I", header[1:])[0] - 4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise PgError(f"connection closed: {exc!r}") from None
        if header[:1] == b"E":
            fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
            raise PgError(f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}")
        return header[:1], body

    async def connect(self) -> None:
        # Small socket buffers: the bench holds many sessions, not many bytes.
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=8192)
        params = b"".join(
            k + b"\0" + v.encode() + b"\0"
            for k, v in ((b"user", self.user), (b"database", self.dbname), (b"application_name", self.application_name))
        )
        body = struct.pack("!I", PROTOCOL_3_0) + params + b"\0"
        self.writer.write(struct.pack("!I", len(body) + 4) + body)
        await self._authenticate()
        while (await self._read())[0] != b"Z":
            pass

    async def _authenticate(self) -> None:
        assert self.writer is not None
        scram: ScramClient | None = None
        while True:
            kind, body = await self._read()
            if kind != b"R":
                raise PgError(f"unexpected message {kind!r} during authentication")
            code = struct.unpack("!I", body[:4])[0]
            if code == 0:  # AuthenticationOk
                return
            if code == 3:  # AuthenticationCleartextPassword
                self.writer.write(_message(b"p", self.password.encode() + b"\0"))
            elif code == 5:  # AuthenticationMD5Password: md5(md5(password + user) + salt)
                inner = hashlib.md5((self.password + self.user).encode()).hexdigest().encode()
                digest = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode()
                self.writer.write(_message(b"p", digest + b"\0"))
            elif code == 10:  # AuthenticationSASL: a list of mechanism names
                mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                scram = ScramClient(self.user, self.password, mechanisms=mechanisms)
                first = scram.initial_response()
                self.writer.write(
                    _message(b"p", scram.mechanism.encode() + b"\0" + struct.pack("!I", len(first)) + first)
                )
            elif code == 11 and scram is not None:  # AuthenticationSASLContinue
                self.writer.write(_message(b"p", scram.continue_(body[4:])))
            elif code == 12 and scram is not None:  # AuthenticationSASLFinal
                scram.finish(body[4:])
            else:
                raise PgError(f"unsupported authentication request {code}")

    async def query(self, sql: str) -> int:
        """Run one simple query; returns the number of DataRow messages."""
        assert self.writer is not None
        self.writer.write(_message(b"Q", sql.encode() + b"\0"))
        rows, error = 0, None
        while True:
            try:
                kind, _ = await self._read()
            except PgError as exc:
                if "connection closed" in str(exc):
                    raise
                error = exc  # ErrorResponse: ReadyForQuery still follows
                continue
            if kind == b"D":
                rows += 1
            elif kind == b"Z":
                if error is not None:
                    raise error
                return rows

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(_message(b"X", b""))
            except Exception:  # noqa: BLE001 - a goodbye to a connection that may be gone already
                pass
            self.writer.close()
            self.writer = None
