"""Header-only framing of the PostgreSQL v3 byte stream.

PostgreSQL docs 55.7 "Message Formats": every message after startup is one type byte and an
Int32 length that counts itself but not the type byte. The relay forwards bytes untouched, so it
only walks headers; the payload of a message is copied out only for the few types the caller
asks for (``wanted``). A message larger than one read is skipped across reads, never buffered,
so memory per session does not grow with the size of a result.
"""

from __future__ import annotations

import functools
from struct import Struct

from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError

_HEADER = Struct("!BI")
_INT32 = Struct("!I")

#: PostgreSQL rejects startup packets over 10000 bytes (``MAX_STARTUP_PACKET_LENGTH``, postmaster.c).
MAX_STARTUP_PACKET = 10000

#: postgres.c SocketBackend checks the length word (which counts itself) of every frontend message
#: against a limit chosen by its type: PQ_SMALL_MESSAGE_LIMIT for these, PQ_LARGE_MESSAGE_LIMIT
#: (MaxAllocSize - 1) for Query, FunctionCall, Bind, Parse and CopyData. A violation ends the
#: backend ("invalid message length"), so pgsidecar applies the same limits before relaying.
SMALL_FRONTEND_TYPES = b"CDEHScfX"
PQ_SMALL_MESSAGE_LIMIT = 10000
PQ_LARGE_MESSAGE_LIMIT = 0x3FFFFFFF - 1

#: Bodies of wanted messages that span reads are collected up to this many bytes (the brain
#: reads statement texts, error fields and tags from the start); the rest streams uncopied.
PREFIX_BYTES = 64 * 1024

_PARSE = ord("P")


Limits = tuple[int, ...]  # one length limit per type byte (256)


@functools.lru_cache(maxsize=64)
def _byte_set(types: bytes) -> frozenset[int]:
    """One shared set per list of type bytes: every scanner holds the same few (memory per idle
    session)."""
    return frozenset(types)


@functools.lru_cache(maxsize=16)
def frontend_limits(max_len: int) -> Limits:
    """Per-type length limits for a client stream: PostgreSQL's, capped by ``max_len``. Shared,
    not copied per session (a table of 256 ints is 4 kB)."""
    limits = [min(max_len, PQ_LARGE_MESSAGE_LIMIT)] * 256
    for t in SMALL_FRONTEND_TYPES:
        limits[t] = min(max_len, PQ_SMALL_MESSAGE_LIMIT)
    return tuple(limits)


@functools.lru_cache(maxsize=16)
def uniform_limits(max_len: int) -> Limits:
    """The same limit for every type byte, shared."""
    return (max_len,) * 256


# FrameScanner's per-type tables, shared by every scanner with the same configuration: per
# session they cost 13 kB (two scanners, two tables of 256 ints each), the idle client's budget.
_TABLES: dict[tuple[frozenset[int], frozenset[int], frozenset[int] | None, Limits], tuple[Limits, Limits]] = {}


def bad_length_text(t: int, ln: int, limit: int) -> str:
    """The words for a length word that is too small or over the type's limit (both framers)."""
    kind = chr(t) if 32 < t < 127 else f"0x{t:02x}"
    if ln < 4:
        return f"invalid message length {ln} for message type {kind!r}"
    return f"invalid message length: message type {kind!r} of {ln} bytes exceeds the limit of {limit} bytes"


class Prefix(bytes):
    """The first bytes of a message body that spanned reads and was too long to collect whole."""

    __slots__ = ()


class FrameScanner:
    """Walks one direction of a session by headers; returns only the frames the caller wants.

    ``feed(chunk)`` returns a list of ``(type_byte, payload)`` for the wanted types whose bytes are
    complete, in stream order. Every other message is skipped by its length. ``messages`` counts
    all complete messages seen, so the caller can tell "nothing arrived" from "something did";
    ``last_mark`` is that count just after the last message of a type in ``marks`` (the client's
    sync points), so messages sent since then are ``messages - last_mark``.

    A wanted message that lies whole in one read is returned whole (its copy is bounded by the
    read). One that spans reads is collected up to ``prefix`` bytes and returned as ``Prefix``,
    except a named Parse (``whole_named_parse``), which is kept whole for replay.

    ``at_boundary`` is a plain attribute, set as each ``feed`` returns or raises: the relay reads
    it several times per read, and a property would cost a call each time.
    """

    __slots__ = (
        "_body",
        "_bounds",
        "_cap",
        "_client",
        "_head",
        "_kinds",
        "_named_parse",
        "_size",
        "_skip",
        "_type",
        "allowed",
        "at_boundary",
        "last_mark",
        "limits",
        "marks",
        "max_len",
        "messages",
        "prefix",
        "wanted",
    )

    def __init__(
        self,
        wanted: bytes,
        max_len: int,
        *,
        client: bool,
        allowed: bytes | None = None,
        limits: Limits | None = None,
        prefix: int | None = PREFIX_BYTES,
        marks: bytes = b"",
        whole_named_parse: bool = False,
    ) -> None:
        self.wanted = _byte_set(wanted)
        # Types outside ``allowed`` are refused (a frontend message type PostgreSQL would reject).
        self.allowed = _byte_set(allowed) if allowed is not None else None
        self.max_len = max_len
        self.limits = limits if limits is not None else uniform_limits(max_len)
        self.prefix = prefix if prefix is not None else max_len
        self.marks = _byte_set(marks)
        self.messages = 0
        self.last_mark = 0
        self._skip = 0  # bytes of the current message body still to come
        self._type = 0
        self._size = 0  # the current message's whole size: type byte + length word + body
        self._body: bytearray | None = None  # body being collected (wanted types only)
        self._cap = 0  # how much of it to collect
        self._head = b""  # a header split across reads
        self._client = client
        self._named_parse = whole_named_parse
        self.at_boundary = True
        # Per type byte, for feed's loop: what a whole message asks for (0 skip it, 1 hand it
        # over, 2 hand it over and mark) and the largest length word, -1 for a type refused
        # outright, so one comparison checks both (``_refusal`` then says which it was).
        key = (self.wanted, self.marks, self.allowed, self.limits)
        tables = _TABLES.get(key)
        if tables is None:
            wanted_marks = self.marks & self.wanted
            kinds = tuple(2 if t in wanted_marks else 1 if t in self.wanted else 0 for t in range(256))
            bounds = tuple(-1 if self._refused(t) else self.limits[t] for t in range(256))
            tables = _TABLES.setdefault(key, (kinds, bounds))
        self._kinds, self._bounds = tables

    def _error(self, text: str) -> ProtocolError:
        cls = ClientProtocolError if self._client else ServerProtocolError
        return cls(text)

    def _refused(self, t: int) -> bool:
        """A type this stream may not carry (a frontend message type PostgreSQL would reject)."""
        return self.allowed is not None and t not in self.allowed and t not in self.wanted

    @property
    def partial_type(self) -> int | None:
        """The type byte of the message the stream stopped inside (None at a boundary)."""
        if self._skip:
            return self._type
        return self._head[0] if self._head else None

    @property
    def partial_seen(self) -> int:
        """How many bytes of that message (header included) have been fed so far."""
        if self._skip:
            return self._size - self._skip
        return len(self._head)

    @property
    def partial_remaining(self) -> int | None:
        """Bytes of that message still to come; None while its header is incomplete."""
        if self._skip:
            return self._skip
        return None if self._head else 0

    @property
    def partial_size(self) -> int | None:
        """The whole size of that message; None while its header is incomplete."""
        return self._size if self._skip else None

    def rewind(self) -> None:
        """Forget the message the stream stopped inside, as if its bytes had never been fed."""
        self._skip = 0
        self._head = b""
        self._body = None
        self.at_boundary = True

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        try:
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
            kinds = self._kinds
            bounds = self._bounds
            unpack = _HEADER.unpack_from
            count = 0
            while i + 5 <= n:
                t, ln = unpack(data, i)
                if ln < 4 or ln > bounds[t]:
                    self.messages += count
                    raise self._error(self._refusal(t, ln))
                end = i + 1 + ln
                if end <= n:
                    kind = kinds[t]
                    if kind:
                        body = data[i + 5 : end]  # bytes when data is; a view's slice is copied
                        out.append((t, body if type(body) is bytes else bytes(body)))
                        if kind == 2:
                            self.last_mark = self.messages + count + 1
                    count += 1
                    i = end
                else:
                    self.messages += count
                    count = 0
                    self._partial(t, 1 + ln, end - n, data[i + 5 : n])
                    i = n
            self.messages += count
            if i < n:
                self._head = bytes(data[i:n])
            return out
        finally:
            self.at_boundary = not self._skip and not self._head

    def _refusal(self, t: int, ln: int) -> str:
        """Why a header failed its one check: the length if that is wrong, else the type."""
        if ln < 4 or ln > self.limits[t]:
            return self._bad_length(t, ln)
        return f"invalid frontend message type {t}"

    def _bad_length(self, t: int, ln: int) -> str:
        return bad_length_text(t, ln, self.limits[t])

    def _partial(self, t: int, size: int, remaining: int, head_of_body: bytes | memoryview) -> None:
        if self._refused(t):
            raise self._error(f"invalid frontend message type {t}")
        self._type = t
        self._size = size
        self._skip = remaining
        if t in self.wanted:
            self._cap = self.prefix
            self._body = bytearray()
            self._collect(head_of_body)
        else:
            self._body = None

    def _collect(self, chunk: bytes | memoryview) -> None:
        body = self._body
        assert body is not None
        if not body and chunk and self._named_parse and self._type == _PARSE and chunk[0] != 0:
            self._cap = self.max_len  # a named statement: kept whole, for replay
        room = self._cap - len(body)
        if room > 0 and chunk:
            body += chunk[:room] if len(chunk) > room else chunk

    def _start(self, t: int, ln: int, data: bytes | memoryview, i: int, out: list[tuple[int, bytes]]) -> int:
        """Begin a message whose header was split across reads; returns the new offset."""
        if ln < 4 or ln > self.limits[t]:
            raise self._error(self._bad_length(t, ln))
        if self._refused(t):
            raise self._error(f"invalid frontend message type {t}")
        body_len = ln - 4
        n = len(data)
        if n - i >= body_len:
            if t in self.wanted:
                out.append((t, bytes(data[i : i + body_len])))
                if t in self.marks:
                    self.last_mark = self.messages + 1
            self.messages += 1
            return i + body_len
        self._partial(t, 1 + ln, body_len - (n - i), data[i:n])
        return n

    def _continue_body(self, data: bytes | memoryview, out: list[tuple[int, bytes]]) -> int:
        take = min(self._skip, len(data))
        if self._body is not None:
            self._collect(data[:take])
        self._skip -= take
        if self._skip == 0:
            body = self._body
            if body is not None:
                self._body = None
                if len(body) < self._size - 5:
                    out.append((self._type, Prefix(body)))
                elif len(body) <= self.prefix:
                    out.append((self._type, bytes(body)))  # small: bytes, as callers hash and compare them
                else:
                    # Only a named Parse is collected past the prefix: handed over without another
                    # copy (it may be large), and read as bytes by every caller.
                    out.append((self._type, body))  # type: ignore[arg-type]  # a bytearray, read as bytes
                if self._type in self.marks:
                    self.last_mark = self.messages + 1
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
    hot one (FrameScanner serves the relay). A caller may look at a header first and drop the
    message instead of reading it: a skipped body is discarded as it arrives, never buffered."""

    __slots__ = ("_buf", "_client", "_skip", "limits", "max_len")

    def __init__(self, max_len: int, *, client: bool, limits: Limits | None = None) -> None:
        self._buf = bytearray()
        self.max_len = max_len
        # Per type byte; ``frontend_limits`` gives a client stream PostgreSQL's.
        self.limits = limits if limits is not None else uniform_limits(max_len)
        self._client = client
        self._skip = 0  # bytes of a dropped message still to come; fed bytes pay this first

    def __len__(self) -> int:
        """Bytes buffered: memory held, never more than was fed and not yet taken or dropped."""
        return len(self._buf)

    @property
    def skipping(self) -> bool:
        """The rest of a dropped message has not all arrived yet."""
        return self._skip > 0

    def feed(self, data: bytes | memoryview) -> None:
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        self._buf += data

    def header(self) -> tuple[int, int] | None:
        """The next message's type byte and body length, not consumed; None for need-more."""
        if len(self._buf) < 5:
            return None
        t = self._buf[0]
        (ln,) = _INT32.unpack_from(self._buf, 1)
        if ln < 4 or ln > self.limits[t]:
            cls = ClientProtocolError if self._client else ServerProtocolError
            raise cls(self._bad_length(t, ln))
        return t, ln - 4

    def _bad_length(self, t: int, ln: int) -> str:
        # FrameScanner's words: a client hears the same whichever path read its bytes.
        return bad_length_text(t, ln, self.limits[t])

    def next(self) -> tuple[int, bytes] | None:
        """The next whole message as (type byte, payload), or None for need-more."""
        head = self.header()
        if head is None or len(self._buf) < 5 + head[1]:
            return None
        end = 5 + head[1]
        payload = bytes(self._buf[5:end])
        del self._buf[:end]
        return head[0], payload

    def skip_message(self) -> None:
        """Drop the next message (its header must be here), its body too, however much is to come."""
        head = self.header()
        if head is None:
            raise ValueError("no whole message header to skip")
        self.discard(5 + head[1])

    def discard(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream: those buffered, then as many as are fed next."""
        here = min(n, len(self._buf))
        del self._buf[:here]
        self._skip += n - here

    def pending(self) -> bool:
        """Some bytes are buffered (not necessarily a whole message)."""
        return bool(self._buf)

    def rest(self) -> bytes:
        """Bytes after the messages taken so far; the buffer is left empty."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def clear(self) -> None:
        self._buf.clear()
        self._skip = 0
