"""Header-only framing of the PostgreSQL v3 byte stream.

PostgreSQL docs 55.7 "Message Formats": every message after startup is one type byte and an
Int32 length that counts itself but not the type byte. The relay forwards bytes untouched, so it
only walks headers; the payload of a message is copied out only for the few types the caller
asks for (``wanted``). A message larger than one read is skipped across reads, never buffered,
so memory per session does not grow with the size of a result.
"""

from __future__ import annotations

from struct import Struct

from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError

_HEADER = Struct("!BI")
_INT32 = Struct("!I")

#: PostgreSQL rejects startup packets over 10000 bytes (``MAX_STARTUP_PACKET_LENGTH``, postmaster.c).
MAX_STARTUP_PACKET = 10000


class FrameScanner:
    """Walks one direction of a session by headers; returns only the frames the caller wants.

    ``feed(chunk)`` returns a list of ``(type_byte, payload)`` for the wanted types whose bytes are
    complete, in stream order. Every other message is skipped by its length. ``messages`` counts
    all complete messages seen, so the caller can tell "nothing arrived" from "something did".
    """

    __slots__ = ("wanted", "allowed", "max_len", "messages", "_skip", "_type", "_body", "_head", "_client")

    def __init__(self, wanted: bytes, max_len: int, *, client: bool, allowed: bytes | None = None) -> None:
        self.wanted = frozenset(wanted)
        # Types outside ``allowed`` are refused (a frontend message type PostgreSQL would reject).
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.max_len = max_len
        self.messages = 0
        self._skip = 0  # bytes of the current message body still to come
        self._type = 0
        self._body: bytearray | None = None  # body being collected (wanted types only)
        self._head = b""  # a header split across reads
        self._client = client

    def _error(self, text: str) -> ProtocolError:
        cls = ClientProtocolError if self._client else ServerProtocolError
        return cls(text)

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return self._skip == 0 and not self._head

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        n = len(data)
        i = 0
        if self._skip:
            i = self._continue_body(data, out)
            if i >= n:
                return out
        if self._head:
            need = 5 - len(self._head)
            if n - i < need:
                self._head += bytes(data[i:])
                return out
            head = self._head + bytes(data[i : i + need])
            self._head = b""
            t, ln = _HEADER.unpack(head)
            i = self._start(t, ln, data, i + need, out)
        wanted = self.wanted
        allowed = self.allowed
        max_len = self.max_len
        unpack = _HEADER.unpack_from
        count = 0
        while i + 5 <= n:
            t, ln = unpack(data, i)
            if ln < 4 or ln > max_len:
                self.messages += count
                raise self._error(self._bad_length(t, ln))
            end = i + 1 + ln
            if end <= n:
                if t in wanted:
                    out.append((t, bytes(data[i + 5 : end])))
                elif allowed is not None and t not in allowed:
                    self.messages += count
                    raise self._error(f"invalid frontend message type {t}")
                count += 1
                i = end
            else:
                self.messages += count
                count = 0
                self._partial(t, end - n, data[i + 5 : n])
                i = n
        self.messages += count
        if i < n:
            self._head = bytes(data[i:n])
        return out

    def _bad_length(self, t: int, ln: int) -> str:
        kind = chr(t) if 32 < t < 127 else f"0x{t:02x}"
        if ln < 4:
            return f"invalid message length {ln} for message type {kind!r}"
        return f"message type {kind!r} of {ln} bytes exceeds the limit of {self.max_len} bytes"

    def _partial(self, t: int, remaining: int, head_of_body: bytes | memoryview) -> None:
        if self.allowed is not None and t not in self.allowed and t not in self.wanted:
            raise self._error(f"invalid frontend message type {t}")
        self._type = t
        self._skip = remaining
        self._body = bytearray(head_of_body) if t in self.wanted else None

    def _start(self, t: int, ln: int, data: bytes | memoryview, i: int, out: list) -> int:
        """Begin a message whose header was split across reads; returns the new offset."""
        if ln < 4 or ln > self.max_len:
            raise self._error(self._bad_length(t, ln))
        if self.allowed is not None and t not in self.allowed and t not in self.wanted:
            raise self._error(f"invalid frontend message type {t}")
        body_len = ln - 4
        n = len(data)
        if n - i >= body_len:
            if t in self.wanted:
                out.append((t, bytes(data[i : i + body_len])))
            self.messages += 1
            return i + body_len
        self._partial(t, body_len - (n - i), data[i:n])
        return n

    def _continue_body(self, data: bytes | memoryview, out: list) -> int:
        take = min(self._skip, len(data))
        if self._body is not None:
            if len(self._body) + take > self.max_len:
                raise self._error("message exceeds the size limit")
            self._body += data[:take]
        self._skip -= take
        if self._skip == 0:
            if self._body is not None:
                out.append((self._type, bytes(self._body)))
                self._body = None
            self.messages += 1
        return take


class StartupReader:
    """Collects the length-prefixed startup packets (no type byte) before the session proper.

    PostgreSQL docs 55.2.1 "Start-up": StartupMessage, SSLRequest, GSSENCRequest and
    CancelRequest all begin with an Int32 length and an Int32 code.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) > MAX_STARTUP_PACKET + 8:
            raise ClientProtocolError("invalid length of startup packet")

    def next_packet(self) -> bytes | None:
        """The payload (after the length word) of the next whole packet, or None for need-more."""
        if len(self._buf) < 4:
            return None
        (ln,) = _INT32.unpack_from(self._buf, 0)
        if ln < 8 or ln > MAX_STARTUP_PACKET:
            raise ClientProtocolError("invalid length of startup packet")
        if len(self._buf) < ln:
            return None
        payload = bytes(self._buf[4:ln])
        del self._buf[:ln]
        return payload

    def rest(self) -> bytes:
        """Bytes after the packets taken so far (a client that pipelines its first messages)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


class MessageBuffer:
    """Whole typed messages, buffered: for login, pgsidecar's own queries and other paths off the
    hot one, where every message is read in full (FrameScanner serves the relay)."""

    __slots__ = ("_buf", "max_len", "_client")

    def __init__(self, max_len: int, *, client: bool) -> None:
        self._buf = bytearray()
        self.max_len = max_len
        self._client = client

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def next(self) -> tuple[int, bytes] | None:
        """The next whole message as (type byte, payload), or None for need-more."""
        if len(self._buf) < 5:
            return None
        t = self._buf[0]
        (ln,) = _INT32.unpack_from(self._buf, 1)
        if ln < 4 or ln > self.max_len:
            cls = ClientProtocolError if self._client else ServerProtocolError
            raise cls(f"invalid message length {ln}")
        if len(self._buf) < ln + 1:
            return None
        payload = bytes(self._buf[5 : ln + 1])
        del self._buf[: ln + 1]
        return t, payload

    def rest(self) -> bytes:
        """Bytes after the messages taken so far; the buffer is left empty."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def clear(self) -> None:
        self._buf.clear()
