"""Client (frontend) messages pgsidecar reads or writes, one frozen dataclass each.

Formats are from the PostgreSQL docs, section 55.7 "Message Formats". ``encode()`` returns the
whole message (type byte and length included); ``decode(payload)`` takes what follows the 5-byte
header, or for startup-phase packets what follows the 4-byte length. Malformed payloads raise
ClientProtocolError, since only a client sends these to pgsidecar.

Cancel keys are ``bytes``: protocol 3.0 uses 4 bytes, protocol 3.2 (PostgreSQL 18) allows up to
256, and pgsidecar only ever copies them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from pgsidecar.wire.errors import ClientProtocolError
from pgsidecar.wire.payload import NoPayload, PayloadReader, cstring, typed_message, untyped_message

__all__ = [
    "BY_TYPE",
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_CANCEL_KEY_LENGTH",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "Close",
    "Describe",
    "Execute",
    "Flush",
    "GSSENCRequest",
    "Parse",
    "PasswordMessage",
    "Query",
    "SASLInitialResponse",
    "SASLResponse",
    "SSLRequest",
    "StartupMessage",
    "Sync",
    "Terminate",
    "decode_startup_packet",
]

# 55.7: protocol version numbers are major << 16 | minor.
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = 3 << 16 | 2
# 55.7 CancelRequest, SSLRequest, GSSENCRequest: 1234 in the high 16 bits, 5678/5679/5680 low.
CANCEL_REQUEST_CODE = 1234 << 16 | 5678
SSL_REQUEST_CODE = 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 1234 << 16 | 5680
# 55.7 BackendKeyData: in protocol 3.2 the secret key is at most 256 bytes.
MAX_CANCEL_KEY_LENGTH = 256

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")


class Kind(enum.IntEnum):
    """The type byte of each frontend message after startup (55.7), as the relay compares it."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse: only during authentication
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


#: The messages that each earn one ReadyForQuery and end a request group (55.2.2, 55.2.3).
SYNC_POINTS = bytes((Kind.QUERY, Kind.SYNC, Kind.FUNCTION_CALL))


def parse_statement_name(payload: bytes | bytearray) -> int:
    """Where the statement name of a Parse body ends (its NUL); the query text starts one after.
    Only the name is looked at, so a long statement is not copied. -1: no NUL in what was read."""
    return payload.find(b"\0")


def _reader(payload: bytes | memoryview, what: str) -> PayloadReader:
    return PayloadReader(payload, ClientProtocolError, what)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a session: protocol version and key/value parameters (55.7)."""

    params: dict[str, str] = field(default_factory=dict)
    protocol: int = PROTOCOL_3_0

    def encode(self) -> bytes:
        body = bytearray(_UINT32.pack(self.protocol))
        for name, value in self.params.items():
            body += cstring(name) + cstring(value)
        body += b"\0"
        return untyped_message(bytes(body))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "startup packet")
        protocol = r.uint32()
        if protocol >> 16 != 3:
            # postmaster answers "unsupported frontend protocol" with feature_not_supported.
            raise ClientProtocolError(
                f"unsupported frontend protocol {protocol >> 16}.{protocol & 0xFFFF}: server supports 3.0 to 3.0",
                sqlstate="0A000",
            )
        params: dict[str, str] = {}
        while True:
            name = r.cstring()
            if not name:
                break
            params[name] = r.cstring()
        r.end()
        return cls(params, protocol)

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF


def _code_only(payload: bytes | memoryview, code: int, what: str) -> None:
    r = _reader(payload, what)
    if r.uint32() != code:
        raise r.fail("wrong request code")
    r.end()


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Asks the server to start TLS before the startup packet; answered by one byte S or N."""

    CODE: ClassVar[int] = SSL_REQUEST_CODE

    def encode(self) -> bytes:
        return untyped_message(_UINT32.pack(self.CODE))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        _code_only(payload, cls.CODE, "SSLRequest")
        return cls()


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Asks for GSSAPI encryption; pgsidecar always answers N (docs/architecture.md, Auth)."""

    CODE: ClassVar[int] = GSSENC_REQUEST_CODE

    def encode(self) -> bytes:
        return untyped_message(_UINT32.pack(self.CODE))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        _code_only(payload, cls.CODE, "GSSENCRequest")
        return cls()


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the query of backend ``pid`` if ``secret`` matches its BackendKeyData key."""

    pid: int
    secret: bytes

    CODE: ClassVar[int] = CANCEL_REQUEST_CODE

    def encode(self) -> bytes:
        return untyped_message(_UINT32.pack(self.CODE) + _INT32.pack(self.pid) + self.secret)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "CancelRequest")
        if r.uint32() != cls.CODE:
            raise r.fail("wrong request code")
        pid = r.int32()
        secret = r.rest()
        if not 4 <= len(secret) <= MAX_CANCEL_KEY_LENGTH:
            raise r.fail(f"secret key of {len(secret)} bytes")
        return cls(pid, secret)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup_packet(payload: bytes | memoryview) -> StartupPacket:
    """Decode the first packet a client sends, dispatching on its first Int32 (55.7)."""
    head = bytes(payload[:4])
    if len(head) < 4:
        raise ClientProtocolError("invalid startup packet: shorter than its request code")
    code = _UINT32.unpack(head)[0]
    if code == SSL_REQUEST_CODE:
        return SSLRequest.decode(payload)
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest.decode(payload)
    if code == CANCEL_REQUEST_CODE:
        return CancelRequest.decode(payload)
    if code >> 16 == 1234:
        raise ClientProtocolError(f"unknown startup request code 1234.{code & 0xFFFF}")
    return StartupMessage.decode(payload)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A cleartext or md5 password. Type 'p' is shared with the SASL messages: the
    authentication request that came before decides which class to decode with."""

    password: bytes

    TYPE: ClassVar[bytes] = b"p"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, cstring(self.password))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "PasswordMessage")
        password = r.cstring_bytes()
        r.end()
        return cls(password)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """The chosen SASL mechanism and its first message. A length of -1 on the wire (no
    initial response) decodes as empty data; encode always writes the data's length."""

    mechanism: str
    data: bytes

    TYPE: ClassVar[bytes] = b"p"

    def encode(self) -> bytes:
        body = cstring(self.mechanism) + _INT32.pack(len(self.data)) + self.data
        return typed_message(self.TYPE, body)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "SASLInitialResponse")
        mechanism = r.cstring()
        length = r.int32()
        data = b"" if length == -1 else r.raw(length)
        r.end()
        return cls(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """A later SASL message from the client: the whole payload is mechanism data."""

    data: bytes

    TYPE: ClassVar[bytes] = b"p"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, self.data)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class Query:
    """A simple-protocol query string (may hold several statements)."""

    sql: str

    TYPE: ClassVar[bytes] = b"Q"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, cstring(self.sql))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "Query")
        sql = r.cstring()
        r.end()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse:
    """Extended protocol: prepare ``query`` as statement ``name`` ("" is the unnamed one)."""

    name: str
    query: str
    param_types: tuple[int, ...] = ()

    TYPE: ClassVar[bytes] = b"P"

    def encode(self) -> bytes:
        body = bytearray(cstring(self.name) + cstring(self.query))
        body += struct.pack(f"!H{len(self.param_types)}I", len(self.param_types), *self.param_types)
        return typed_message(self.TYPE, bytes(body))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "Parse")
        name = r.cstring()
        query = r.cstring()
        count = r.uint16()
        types = tuple(r.uint32() for _ in range(count))
        r.end()
        return cls(name, query, types)


def _decode_kind_name(payload: bytes | memoryview, what: str) -> tuple[bytes, str]:
    r = _reader(payload, what)
    kind = r.byte1()
    if kind not in (b"S", b"P"):
        raise r.fail(f"kind {kind!r} is neither S (statement) nor P (portal)")
    name = r.cstring()
    r.end()
    return kind, name


@dataclass(frozen=True, slots=True)
class Close:
    """Close a prepared statement (kind b"S") or a portal (kind b"P")."""

    kind: bytes
    name: str

    TYPE: ClassVar[bytes] = b"C"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, self.kind + cstring(self.name))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_decode_kind_name(payload, "Close"))


@dataclass(frozen=True, slots=True)
class Describe:
    """Describe a prepared statement (kind b"S") or a portal (kind b"P")."""

    kind: bytes
    name: str

    TYPE: ClassVar[bytes] = b"D"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, self.kind + cstring(self.name))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(*_decode_kind_name(payload, "Describe"))


@dataclass(frozen=True, slots=True)
class Execute:
    """Run a bound portal; ``max_rows`` 0 means no limit."""

    portal: str
    max_rows: int = 0

    TYPE: ClassVar[bytes] = b"E"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, cstring(self.portal) + _INT32.pack(self.max_rows))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "Execute")
        portal = r.cstring()
        max_rows = r.int32()
        r.end()
        return cls(portal, max_rows)


class _ClientNoPayload(NoPayload):
    __slots__ = ()
    ERROR: ClassVar[type[ClientProtocolError]] = ClientProtocolError


@dataclass(frozen=True, slots=True)
class Sync(_ClientNoPayload):
    """Ends an extended-protocol batch; the server answers with ReadyForQuery."""

    TYPE: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_ClientNoPayload):
    """Asks the server to send what it has buffered, without ending the batch."""

    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_ClientNoPayload):
    """The client is closing the session on purpose: not a drop."""

    TYPE: ClassVar[bytes] = b"X"


#: Typed client messages by type byte, for the types that mean one thing only ('p' is left out:
#: it is PasswordMessage, SASLInitialResponse or SASLResponse depending on the auth exchange).
BY_TYPE: dict[bytes, type] = {cls.TYPE: cls for cls in (Query, Parse, Close, Describe, Execute, Sync, Flush, Terminate)}
