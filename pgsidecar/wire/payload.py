"""Reading and writing message payloads: the cursor that raises ProtocolError, and framing.

PostgreSQL docs 55.7 "Message Formats": Int16/Int32 in network order, NUL-terminated strings, and
for typed messages one type byte plus an Int32 length that counts itself.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Self

from pgsidecar.wire.errors import ProtocolError

__all__ = ["NoPayload", "PayloadReader", "cstring", "typed_message", "untyped_message"]


_INT16 = struct.Struct("!h")
_UINT16 = struct.Struct("!H")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")


class PayloadReader:
    """A cursor over one message payload; every malformation raises ``error``.

    Decoders use it so that arbitrary bytes can only ever raise a ProtocolError subclass,
    never struct.error, IndexError or UnicodeDecodeError.
    """

    __slots__ = ("_buf", "_error", "_pos", "_what")

    def __init__(self, payload: bytes | bytearray | memoryview, error: type[ProtocolError], what: str) -> None:
        self._buf = bytes(payload)
        self._pos = 0
        self._error = error
        self._what = what

    def fail(self, reason: str, *, sqlstate: str | None = None) -> ProtocolError:
        """Build (not raise) the error, naming the message being decoded."""
        return self._error(f"invalid {self._what} message: {reason}", sqlstate=sqlstate)

    @property
    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise self.fail(f"needs {n} more bytes, has {self.remaining}")
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def byte1(self) -> bytes:
        return self._take(1)

    def int16(self) -> int:
        return int(_INT16.unpack(self._take(2))[0])

    def uint16(self) -> int:
        return int(_UINT16.unpack(self._take(2))[0])

    def int32(self) -> int:
        return int(_INT32.unpack(self._take(4))[0])

    def uint32(self) -> int:
        return int(_UINT32.unpack(self._take(4))[0])

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def rest(self) -> bytes:
        return self._take(self.remaining)

    def cstring_bytes(self) -> bytes:
        """A NUL-terminated string, without its NUL (55.7: String(s))."""
        end = self._buf.find(b"\0", self._pos)
        if end < 0:
            raise self.fail("string is not NUL-terminated")
        chunk = self._buf[self._pos : end]
        self._pos = end + 1
        return chunk

    def cstring(self) -> str:
        # surrogateescape: text in an unknown client_encoding still round-trips byte for byte.
        return self.cstring_bytes().decode("utf-8", "surrogateescape")

    def end(self) -> None:
        """PostgreSQL rejects trailing bytes after a message's last field (pq_getmsgend)."""
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected trailing bytes")


def cstring(value: str | bytes) -> bytes:
    """Encode a protocol String: the text and one NUL. A NUL inside is a bug of the caller."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if b"\0" in raw:
        raise ValueError(f"protocol strings cannot contain NUL: {value!r}")
    return raw + b"\0"


def show(text: str | None) -> str | None:
    """Client-supplied text for logs and records: bytes that were not UTF-8 (carried as
    surrogate escapes, see Cursor.cstring) are shown as \\xNN instead of failing to encode."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def typed_message(type_byte: bytes, body: bytes = b"") -> bytes:
    """Byte1 type, Int32 length including itself but not the type, then the body (55.7)."""
    return type_byte + _INT32.pack(len(body) + 4) + body


def untyped_message(body: bytes) -> bytes:
    """Startup-phase packets have no type byte: Int32 length including itself, then the body."""
    return _INT32.pack(len(body) + 4) + body


class NoPayload:
    """Messages that are a type byte and a length, nothing more."""

    __slots__ = ()
    TYPE: ClassVar[bytes]
    ERROR: ClassVar[type[ProtocolError]] = ProtocolError  # whose fault a malformed one is

    def encode(self) -> bytes:
        return typed_message(self.TYPE)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        PayloadReader(payload, cls.ERROR, cls.__name__).end()
        return cls()
