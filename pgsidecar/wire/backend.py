"""Server (backend) messages pgsidecar reads or writes, one frozen dataclass each.

Formats are from the PostgreSQL docs, section 55.7 "Message Formats"; error and notice fields
from 55.8 "Error and Notice Message Fields". ``encode()`` returns the whole message (type byte and
length included); ``decode(payload)`` takes what follows the 5-byte header. Malformed payloads
raise ServerProtocolError, since only a server sends these to pgsidecar.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

from pgsidecar.wire.errors import ServerProtocolError
from pgsidecar.wire.payload import NoPayload, PayloadReader, cstring, typed_message

__all__ = [
    "BY_TYPE",
    "Authentication",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BindComplete",
    "CloseComplete",
    "CommandComplete",
    "DataRow",
    "EmptyQueryResponse",
    "ErrorResponse",
    "NegotiateProtocolVersion",
    "NoData",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterStatus",
    "ParseComplete",
    "ReadyForQuery",
    "RowDescription",
    "decode_authentication",
    "error_fields",
    "split_fields",
]

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
# 55.7 BackendKeyData: 4 bytes in protocol 3.0, at most 256 in protocol 3.2.
_MAX_KEY = 256


def _reader(payload: bytes | memoryview, what: str) -> PayloadReader:
    return PayloadReader(payload, ServerProtocolError, what)


# --- Authentication requests: all type 'R', told apart by the Int32 that follows (55.7). ---


def _auth(code: int, body: bytes = b"") -> bytes:
    return typed_message(b"R", _INT32.pack(code) + body)


class _AuthBare:
    """Authentication requests that are the code and nothing more."""

    __slots__ = ()
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int]

    def encode(self) -> bytes:
        return _auth(self.CODE)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        _expect_auth(payload, cls.CODE, cls.__name__).end()
        return cls()


@dataclass(frozen=True, slots=True)
class AuthenticationOk(_AuthBare):
    """Authentication succeeded; ParameterStatus, BackendKeyData and ReadyForQuery follow."""

    CODE: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(_AuthBare):
    """The server wants the password in clear text (a PasswordMessage)."""

    CODE: ClassVar[int] = 3


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    """The server wants the md5 hash of the password with this 4-byte salt."""

    salt: bytes

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 5

    def encode(self) -> bytes:
        return _auth(self.CODE, self.salt)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _expect_auth(payload, cls.CODE, "AuthenticationMD5Password")
        salt = r.raw(4)
        r.end()
        return cls(salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """The server offers these SASL mechanisms, in its order of preference."""

    mechanisms: tuple[str, ...]

    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int] = 10

    def encode(self) -> bytes:
        return _auth(self.CODE, b"".join(cstring(m) for m in self.mechanisms) + b"\0")

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _expect_auth(payload, cls.CODE, "AuthenticationSASL")
        mechanisms: list[str] = []
        while name := r.cstring():
            mechanisms.append(name)
        r.end()
        return cls(tuple(mechanisms))


class _AuthData:
    """Authentication requests whose payload after the code is opaque SASL data."""

    __slots__ = ()
    TYPE: ClassVar[bytes] = b"R"
    CODE: ClassVar[int]
    data: bytes

    def encode(self) -> bytes:
        return _auth(self.CODE, self.data)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(_expect_auth(payload, cls.CODE, cls.__name__).rest())  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(_AuthData):
    """A SASL challenge (for SCRAM, the server-first-message)."""

    data: bytes
    CODE: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(_AuthData):
    """The SASL outcome (for SCRAM, the server-final-message with the server signature)."""

    data: bytes
    CODE: ClassVar[int] = 12


def _expect_auth(payload: bytes | memoryview, code: int, what: str) -> PayloadReader:
    r = _reader(payload, what)
    if r.int32() != code:
        raise r.fail(f"authentication code is not {code}")
    return r


Authentication = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

_AUTH_BY_CODE: dict[int, type[Authentication]] = {
    cls.CODE: cls
    for cls in (
        AuthenticationOk,
        AuthenticationCleartextPassword,
        AuthenticationMD5Password,
        AuthenticationSASL,
        AuthenticationSASLContinue,
        AuthenticationSASLFinal,
    )
}

# 55.7: the authentication methods pgsidecar cannot perform, by request code.
_UNSUPPORTED_AUTH = {
    2: "Kerberos V5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI (continue)",
    9: "SSPI",
}


def decode_authentication(payload: bytes | memoryview) -> Authentication:
    """Decode any 'R' message by its Int32 request code."""
    head = bytes(payload[:4])
    if len(head) < 4:
        raise ServerProtocolError("invalid authentication request: shorter than its code")
    code = _INT32.unpack(head)[0]
    cls = _AUTH_BY_CODE.get(code)
    if cls is not None:
        return cls.decode(payload)
    method = _UNSUPPORTED_AUTH.get(code)
    if method is not None:
        # sqlclient_unable_to_establish_sqlconnection: the server is fine, pgsidecar cannot comply.
        raise ServerProtocolError(
            f"server requested {method} authentication, which pgsidecar does not support",
            sqlstate="08001",
        )
    raise ServerProtocolError(f"server sent unknown authentication request code {code}")


# --- Session start ---


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """The current value of a server parameter the client is told about (55.2.7)."""

    name: str
    value: str

    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, cstring(self.name) + cstring(self.value))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "ParameterStatus")
        name = r.cstring()
        value = r.cstring()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """The backend's pid and cancel key. ``secret`` is bytes: 4 of them in protocol 3.0,
    up to 256 in protocol 3.2 (PostgreSQL 18)."""

    pid: int
    secret: bytes

    TYPE: ClassVar[bytes] = b"K"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, _INT32.pack(self.pid) + self.secret)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "BackendKeyData")
        pid = r.int32()
        secret = r.rest()
        if not 4 <= len(secret) <= _MAX_KEY:
            raise r.fail(f"secret key of {len(secret)} bytes")
        return cls(pid, secret)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """The server is idle; ``status`` is b"I" (no transaction), b"T" (in one), b"E" (failed one)."""

    status: bytes

    TYPE: ClassVar[bytes] = b"Z"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, self.status)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "ReadyForQuery")
        status = r.byte1()
        if status not in (b"I", b"T", b"E"):
            raise r.fail(f"transaction status {status!r}")
        r.end()
        return cls(status)


# --- Errors and notices (55.8) ---


def _encode_fields(fields: tuple[tuple[str, str], ...]) -> bytes:
    out = bytearray()
    for code, value in fields:
        if len(code) != 1 or code == "\0":
            raise ValueError(f"field codes are one non-NUL character, not {code!r}")
        out += code.encode("latin-1") + cstring(value)
    out += b"\0"
    return bytes(out)


class _Fields:
    """Codec and accessors shared by ErrorResponse and NoticeResponse (55.8 field codes)."""

    __slots__ = ()
    fields: tuple[tuple[str, str], ...]
    TYPE: ClassVar[bytes]

    if TYPE_CHECKING:  # each subclass is a dataclass of `fields`; its generated __init__ is this

        def __init__(self, fields: tuple[tuple[str, str], ...]) -> None: ...

    @classmethod
    def make(
        cls, severity: str, code: str, message: str, *, detail: str | None = None, hint: str | None = None
    ) -> Self:
        return cls(_make_fields(severity, code, message, detail, hint))

    def encode(self) -> bytes:
        return typed_message(self.TYPE, _encode_fields(self.fields))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        return cls(tuple(split_fields(payload)))

    @classmethod
    def decode_start(cls, payload: bytes | memoryview) -> Self:
        """The fields found whole in the start of a message too long to read whole."""
        return cls(tuple(split_fields(payload, partial=True)))

    def get(self, code: str) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return None

    @property
    def severity(self) -> str:
        """V is the non-localized severity (9.6+); S may be translated."""
        return self.get("V") or self.get("S") or ""

    @property
    def code(self) -> str:
        return self.get("C") or ""

    @property
    def message(self) -> str:
        return self.get("M") or ""

    @property
    def detail(self) -> str | None:
        return self.get("D")

    @property
    def hint(self) -> str | None:
        return self.get("H")

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


def _make_fields(
    severity: str, code: str, message: str, detail: str | None, hint: str | None
) -> tuple[tuple[str, str], ...]:
    fields = [("S", severity), ("V", severity), ("C", code), ("M", message)]
    if detail is not None:
        fields.append(("D", detail))
    if hint is not None:
        fields.append(("H", hint))
    return tuple(fields)


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """An ERROR, FATAL or PANIC, as (field code, value) pairs in wire order."""

    fields: tuple[tuple[str, str], ...]

    TYPE: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    """A WARNING, NOTICE, INFO, LOG or DEBUG message; same fields as ErrorResponse."""

    fields: tuple[tuple[str, str], ...]

    TYPE: ClassVar[bytes] = b"N"


def split_fields(payload: bytes | memoryview, *, partial: bool = False) -> list[tuple[str, str]]:
    """The one parser of ErrorResponse / NoticeResponse fields (55.8), in wire order, by one split
    instead of a cursor: the relay reads every FATAL it sees. ``partial``: the payload is only the
    start of a long message (the rest was not read); the fields found whole in it are returned,
    severity and SQLSTATE first as PostgreSQL sends them (elog.c)."""
    raw = bytes(payload)
    if partial:
        parts = raw.split(b"\0")[:-1]
        out = []
        for part in parts:
            if not part:
                break
            out.append((chr(part[0]), part[1:].decode("utf-8", "surrogateescape")))
        return out
    # Each field is a code byte and a String; a zero byte ends the list.
    if not raw.endswith(b"\0") or (len(raw) > 1 and not raw.endswith(b"\0\0")):
        raise ServerProtocolError("invalid error fields: not terminated by a zero byte")
    fields: list[tuple[str, str]] = []
    for part in raw[:-1].split(b"\0")[:-1] if len(raw) > 1 else []:
        if not part:
            raise ServerProtocolError("invalid error fields: empty field before the terminator")
        fields.append((chr(part[0]), part[1:].decode("utf-8", "surrogateescape")))
    return fields


def error_fields(payload: bytes | memoryview) -> dict[str, str]:
    """The fields as a dict (the last of a repeated code wins)."""
    return dict(split_fields(payload))


# --- Query cycle ---


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """A statement finished; ``tag`` is e.g. "SELECT 3", "SET", "COMMIT", "ROLLBACK"."""

    tag: str

    TYPE: ClassVar[bytes] = b"C"

    def encode(self) -> bytes:
        return typed_message(self.TYPE, cstring(self.tag))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "CommandComplete")
        tag = r.cstring()
        r.end()
        return cls(tag)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """The server speaks an older minor version, or ignored some ``_pq_.`` options.

    ``version`` is the Int32 as sent. The docs (55.7) call it the newest minor version, but the
    server sends the whole version number (major << 16 | minor, e.g. 196608 for 3.0), and libpq
    compares it as such; ``newest_minor`` is its low 16 bits.
    """

    version: int
    unrecognized: tuple[str, ...] = ()

    TYPE: ClassVar[bytes] = b"v"

    @property
    def newest_minor(self) -> int:
        return self.version & 0xFFFF

    def encode(self) -> bytes:
        body = bytearray(_UINT32.pack(self.version) + _INT32.pack(len(self.unrecognized)))
        for option in self.unrecognized:
            body += cstring(option)
        return typed_message(self.TYPE, bytes(body))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "NegotiateProtocolVersion")
        version = r.uint32()
        count = r.int32()
        if count < 0 or count > r.remaining:
            raise r.fail(f"option count {count}")
        options = tuple(r.cstring() for _ in range(count))
        r.end()
        return cls(version, options)


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    """A NOTIFY delivered on a channel the session LISTENs to."""

    pid: int
    channel: str
    payload: str

    TYPE: ClassVar[bytes] = b"A"

    def encode(self) -> bytes:
        body = _INT32.pack(self.pid) + cstring(self.channel) + cstring(self.payload)
        return typed_message(self.TYPE, body)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "NotificationResponse")
        pid = r.int32()
        channel = r.cstring()
        text = r.cstring()
        r.end()
        return cls(pid, channel, text)


class _ServerNoPayload(NoPayload):
    __slots__ = ()
    ERROR: ClassVar[type[ServerProtocolError]] = ServerProtocolError


@dataclass(frozen=True, slots=True)
class ParseComplete(_ServerNoPayload):
    """Parse succeeded."""

    TYPE: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_ServerNoPayload):
    """Bind succeeded."""

    TYPE: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_ServerNoPayload):
    """Close succeeded (also sent when the statement or portal did not exist)."""

    TYPE: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_ServerNoPayload):
    """The query string was empty; stands in for CommandComplete."""

    TYPE: ClassVar[bytes] = b"I"


@dataclass(frozen=True, slots=True)
class NoData(_ServerNoPayload):
    """Describe of a statement or portal that returns no rows."""

    TYPE: ClassVar[bytes] = b"n"


# 55.7 RowDescription: after each name come table OID (Int32), column number (Int16), type OID
# (Int32), type size (Int16), type modifier (Int32) and format code (Int16): 18 bytes.
_COLUMN_TAIL = 18
# What encode() writes for each column: no table, type text (OID 25), variable size, no
# modifier, text format. pgsidecar only describes rows it makes up itself, all text.
_TEXT_COLUMN_TAIL = struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)


@dataclass(frozen=True, slots=True)
class RowDescription:
    """Column names of the rows that follow; decode keeps the names and skips the rest."""

    fields: tuple[str, ...]

    TYPE: ClassVar[bytes] = b"T"

    def encode(self) -> bytes:
        body = bytearray(_INT16.pack(len(self.fields)))
        for name in self.fields:
            body += cstring(name) + _TEXT_COLUMN_TAIL
        return typed_message(self.TYPE, bytes(body))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "RowDescription")
        count = r.int16()
        if count < 0:
            raise r.fail(f"column count {count}")
        names: list[str] = []
        for _ in range(count):
            names.append(r.cstring())
            r.raw(_COLUMN_TAIL)
        r.end()
        return cls(tuple(names))


@dataclass(frozen=True, slots=True)
class DataRow:
    """One row: each value is its bytes in the column's format, or None for NULL."""

    values: tuple[bytes | None, ...]

    TYPE: ClassVar[bytes] = b"D"

    def encode(self) -> bytes:
        body = bytearray(_INT16.pack(len(self.values)))
        for value in self.values:
            if value is None:
                body += _INT32.pack(-1)
            else:
                body += _INT32.pack(len(value)) + value
        return typed_message(self.TYPE, bytes(body))

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> Self:
        r = _reader(payload, "DataRow")
        count = r.int16()
        if count < 0:
            raise r.fail(f"column count {count}")
        values: list[bytes | None] = []
        for _ in range(count):
            length = r.int32()
            if length < -1:
                raise r.fail(f"value length {length}")
            values.append(None if length == -1 else r.raw(length))
        r.end()
        return cls(tuple(values))


#: Typed server messages by type byte ('R' is left out: use decode_authentication).
BY_TYPE: dict[bytes, type] = {
    cls.TYPE: cls
    for cls in (
        ParameterStatus,
        BackendKeyData,
        ReadyForQuery,
        ErrorResponse,
        NoticeResponse,
        CommandComplete,
        NegotiateProtocolVersion,
        NotificationResponse,
        ParseComplete,
        BindComplete,
        CloseComplete,
        EmptyQueryResponse,
        NoData,
        RowDescription,
        DataRow,
    )
}
