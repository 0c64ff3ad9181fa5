"""FrameScanner, StartupReader and MessageBuffer (pgsidecar.wire.frames): framing under every split.

The relay forwards bytes untouched and only walks headers, so the scanner must find the same
messages however the stream is cut into reads, copy out only the wanted payloads, and never
buffer the body of a message it does not want (memory must not grow with a result's size).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgsidecar.relay.recovery import GroupAbort, LocalAbortResponder
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from pgsidecar.wire.frames import MAX_STARTUP_PACKET, FrameScanner, MessageBuffer, StartupReader, frontend_limits
from pgsidecar.wire.payload import typed_message

MAX = 1 << 16

#: A realistic server stream: row description, rows, a big row, a tag, ReadyForQuery.
STREAM_MESSAGES: list[tuple[bytes, bytes]] = [
    (b"T", b"\x00\x01col\x00" + bytes(18)),
    (b"D", b"\x00\x01\x00\x00\x00\x03abc"),
    (b"D", b"\x00\x01\x00\x00\x03\xe8" + b"x" * 1000),
    (b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00"),
    (b"C", b"SELECT 3\x00"),
    (b"1", b""),  # a zero-length body (ParseComplete)
    (b"Z", b"I"),
]
WANTED = b"ZCN"


def encode(messages: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(typed_message(t, body) for t, body in messages)


def boundaries(messages: list[tuple[bytes, bytes]]) -> set[int]:
    out, pos = {0}, 0
    for _t, body in messages:
        pos += 5 + len(body)
        out.add(pos)
    return out


def expected(messages: list[tuple[bytes, bytes]], wanted: bytes) -> list[tuple[int, bytes]]:
    return [(t[0], body) for t, body in messages if t[0] in wanted]


def scan_in_pieces(
    data: bytes,
    cuts: list[int],
    wanted: bytes = WANTED,
    *,
    client: bool = False,
    max_len: int = MAX,
    bounds: set[int] | None = None,
) -> tuple[list, FrameScanner]:
    """Feed ``data`` cut at ``cuts``; check ``at_boundary`` after every piece when bounds are given."""
    scanner = FrameScanner(wanted, max_len, client=client)
    got: list[tuple[int, bytes]] = []
    start = 0
    for end in sorted(set(cuts) | {len(data)}):
        if end <= start:
            continue
        got += scanner.feed(data[start:end])
        if bounds is not None:
            assert scanner.at_boundary == (end in bounds), f"at_boundary wrong after byte {end}"
        start = end
    return got, scanner


def test_all_at_once() -> None:
    data = encode(STREAM_MESSAGES)
    scanner = FrameScanner(WANTED, MAX, client=False)
    assert scanner.feed(data) == expected(STREAM_MESSAGES, WANTED)
    assert scanner.messages == len(STREAM_MESSAGES)
    assert scanner.at_boundary


def test_one_byte_at_a_time_with_boundaries() -> None:
    data = encode(STREAM_MESSAGES)
    got, scanner = scan_in_pieces(data, list(range(1, len(data))), bounds=boundaries(STREAM_MESSAGES))
    assert got == expected(STREAM_MESSAGES, WANTED)
    assert scanner.messages == len(STREAM_MESSAGES)


@pytest.mark.parametrize("cut", range(1, 60))
def test_every_single_split_point_near_the_start(cut: int) -> None:
    data = encode(STREAM_MESSAGES)
    got, scanner = scan_in_pieces(data, [cut], bounds=boundaries(STREAM_MESSAGES))
    assert got == expected(STREAM_MESSAGES, WANTED)
    assert scanner.messages == len(STREAM_MESSAGES)


def test_every_single_split_point_of_the_whole_stream() -> None:
    data = encode(STREAM_MESSAGES)
    bounds = boundaries(STREAM_MESSAGES)
    for cut in range(1, len(data)):
        got, scanner = scan_in_pieces(data, [cut], bounds=bounds)
        assert got == expected(STREAM_MESSAGES, WANTED), cut
        assert scanner.messages == len(STREAM_MESSAGES), cut


_message = st.tuples(st.sampled_from([b"Z", b"C", b"D", b"E", b"N", b"T", b"1", b"d"]), st.binary(max_size=300))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_message, max_size=12), data=st.data())
def test_random_splits_give_the_same_frames(messages: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    stream = encode(messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    wanted = data.draw(st.sampled_from([b"", b"Z", b"ZECN", b"DZCNET1d"]))
    got, scanner = scan_in_pieces(stream, cuts, wanted, bounds=boundaries(messages))
    assert got == expected(messages, wanted)
    assert scanner.messages == len(messages)
    assert scanner.at_boundary


def test_messages_counts_every_message_not_only_wanted_ones() -> None:
    scanner = FrameScanner(b"Z", MAX, client=False)
    assert scanner.feed(typed_message(b"D", b"abc") * 5) == []
    assert scanner.messages == 5
    assert scanner.feed(typed_message(b"Z", b"T")) == [(ord("Z"), b"T")]
    assert scanner.messages == 6


def test_partial_message_is_not_counted_until_complete() -> None:
    scanner = FrameScanner(b"", MAX, client=False)
    msg = typed_message(b"D", b"abcdef")
    scanner.feed(msg[:7])
    assert scanner.messages == 0 and not scanner.at_boundary
    scanner.feed(msg[7:])
    assert scanner.messages == 1 and scanner.at_boundary


def test_payload_is_a_copy_not_a_view_of_the_read_buffer() -> None:
    """The runtime reuses its buffer; a wanted payload must survive the next read."""
    buf = bytearray(typed_message(b"Z", b"I"))
    frames = FrameScanner(b"Z", MAX, client=False).feed(memoryview(buf))
    buf[5] = ord("E")
    assert frames == [(ord("Z"), b"I")]
    assert isinstance(frames[0][1], bytes)


def test_unwanted_large_message_is_skipped_without_buffering() -> None:
    body = b"x" * 50_000
    msg = typed_message(b"D", body) + typed_message(b"Z", b"I")
    scanner = FrameScanner(b"Z", MAX, client=False)
    assert scanner.feed(msg[:1000]) == []
    assert scanner._body is None  # nothing of the row is kept
    assert scanner._skip == 5 + len(body) - 1000
    for pos in range(1000, 5 + len(body), 4096):
        assert scanner.feed(msg[pos : min(pos + 4096, 5 + len(body))]) == []
        assert scanner._body is None
    assert scanner.messages == 1 and scanner.at_boundary
    assert scanner.feed(msg[5 + len(body) :]) == [(ord("Z"), b"I")]


def test_wanted_large_message_is_collected_across_reads() -> None:
    body = bytes(range(256)) * 100
    msg = typed_message(b"E", body)
    scanner = FrameScanner(b"E", MAX, client=False)
    got = []
    for pos in range(0, len(msg), 999):
        got += scanner.feed(msg[pos : pos + 999])
        if pos + 999 < len(msg):
            assert isinstance(scanner._body, bytearray)
    assert got == [(ord("E"), body)]
    assert scanner._body is None


@pytest.mark.parametrize("client, error", [(True, ClientProtocolError), (False, ServerProtocolError)])
@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_blames_the_sender(client: bool, error: type, length: int) -> None:
    bad = b"Q" + struct.pack("!I", length)
    with pytest.raises(error, match=f"invalid message length {length}") as info:
        FrameScanner(b"Q", MAX, client=client).feed(bad)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("client, error", [(True, ClientProtocolError), (False, ServerProtocolError)])
def test_length_above_the_limit_blames_the_sender(client: bool, error: type) -> None:
    with pytest.raises(error, match="exceeds the limit of 1000 bytes"):
        FrameScanner(b"", 1000, client=client).feed(b"D" + struct.pack("!I", 1001))
    # Exactly the limit is fine.
    scanner = FrameScanner(b"", 1000, client=client)
    scanner.feed(b"D" + struct.pack("!I", 1000))
    assert not scanner.at_boundary


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_bad_length_in_a_header_split_across_reads(cut: int) -> None:
    good = typed_message(b"D", b"abc")
    bad = b"D" + struct.pack("!I", 2)
    scanner = FrameScanner(b"", MAX, client=True)
    scanner.feed(good + bad[:cut])
    assert scanner.messages == 1
    with pytest.raises(ClientProtocolError, match="invalid message length 2"):
        scanner.feed(bad[cut:])


def test_huge_length_in_a_split_header_is_refused_before_any_body() -> None:
    scanner = FrameScanner(b"D", 1 << 20, client=False)
    scanner.feed(b"D\x7f")
    with pytest.raises(ServerProtocolError, match="exceeds the limit"):
        scanner.feed(b"\xff\xff\xff" + b"x" * 10)


def test_messages_before_a_bad_header_are_counted_and_returned_only_if_no_error() -> None:
    scanner = FrameScanner(b"Z", MAX, client=False)
    with pytest.raises(ServerProtocolError):
        scanner.feed(typed_message(b"Z", b"I") * 2 + b"Z\x00\x00\x00\x01")
    assert scanner.messages == 2


def test_non_printable_type_is_named_in_hex() -> None:
    with pytest.raises(ClientProtocolError, match="0x00"):
        FrameScanner(b"", MAX, client=True).feed(b"\x00\x00\x00\x00\x00")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=10),
    wanted=st.binary(max_size=8),
    client=st.booleans(),
)
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int], wanted: bytes, client: bool) -> None:
    scanner = FrameScanner(wanted, 200, client=client)
    start = 0
    try:
        for end in sorted({c for c in cuts if c <= len(data)} | {len(data)}):
            for t, payload in scanner.feed(data[start:end]):
                assert t in wanted and len(payload) <= 196
            start = end
    except ProtocolError as exc:
        assert isinstance(exc, ClientProtocolError if client else ServerProtocolError)
        assert exc.sqlstate == "08P01"


# ---------------------------------------------------------------- StartupReader


def startup_packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


def test_startup_reader_one_packet_in_pieces() -> None:
    packet = startup_packet(struct.pack("!I", 3 << 16) + b"user\x00app\x00\x00")
    reader = StartupReader()
    for i in range(len(packet) - 1):
        reader.feed(packet[i : i + 1])
        assert reader.next_packet() is None
    reader.feed(packet[-1:])
    assert reader.next_packet() == packet[4:]
    assert reader.next_packet() is None
    assert reader.rest() == b""


def test_startup_reader_pipelined_packets_and_rest() -> None:
    ssl_request = startup_packet(struct.pack("!I", 80877103))
    startup = startup_packet(struct.pack("!I", 3 << 16) + b"user\x00u\x00\x00")
    reader = StartupReader()
    reader.feed(ssl_request + startup + b"Qtail")
    assert reader.next_packet() == ssl_request[4:]
    assert reader.next_packet() == startup[4:]
    assert reader.rest() == b"Qtail"
    assert reader.rest() == b""


def test_startup_packet_of_exactly_the_limit_is_accepted() -> None:
    packet = startup_packet(b"\x00\x03\x00\x00" + b"a" * (MAX_STARTUP_PACKET - 8))
    assert len(packet) == MAX_STARTUP_PACKET == 10000
    reader = StartupReader()
    reader.feed(packet)
    assert reader.next_packet() == packet[4:]


def test_startup_packet_over_the_limit_is_refused_from_its_length_word() -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", MAX_STARTUP_PACKET + 1))
    with pytest.raises(ClientProtocolError, match="invalid length of startup packet") as info:
        reader.next_packet()
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("length", [0, 4, 7, 0x80000000, 0xFFFFFFFF])
def test_startup_length_out_of_range(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", length) + b"\x00" * 8)
    with pytest.raises(ClientProtocolError, match="invalid length of startup packet"):
        reader.next_packet()


def test_startup_reader_buffer_is_bounded() -> None:
    """A client that streams bytes without a valid packet cannot make the buffer grow."""
    reader = StartupReader()
    reader.feed(b"\x00\x00")  # a length word still incomplete: need more
    with pytest.raises(ClientProtocolError, match="invalid length of startup packet"):
        for _ in range(100):
            reader.feed(b"\x00" * 1000)
    assert len(reader._buf) <= MAX_STARTUP_PACKET + 8 + 1000


def test_garbage_instead_of_a_startup_packet() -> None:
    reader = StartupReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ClientProtocolError, match="invalid length of startup packet"):
        reader.next_packet()


@settings(max_examples=400)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_startup_reader_arbitrary_bytes_raise_only_client_protocol_errors(data: bytes, cuts: list[int]) -> None:
    reader = StartupReader()
    start = 0
    try:
        for end in sorted({c for c in cuts if c <= len(data)} | {len(data)}):
            reader.feed(data[start:end])
            start = end
            while (packet := reader.next_packet()) is not None:
                assert 4 <= len(packet) <= MAX_STARTUP_PACKET - 4
    except ProtocolError as exc:
        assert isinstance(exc, ClientProtocolError)


def test_a_wanted_message_spanning_reads_comes_out_as_bytes() -> None:
    """A CommandComplete cut across reads: its tag is hashed and compared like any other (a
    bytearray here once broke the relay in psycopg 3's pipeline mode)."""
    scanner = FrameScanner(b"C", MAX, client=False)
    msg = typed_message(b"C", b"CREATE TABLE\x00")
    assert scanner.feed(msg[:7]) == []
    ((t, payload),) = scanner.feed(msg[7:])
    assert t == ord("C")
    assert type(payload) is bytes and payload == b"CREATE TABLE\x00"


# ---------------------------------------------------------------- MessageBuffer


def test_message_buffer_header_waits_for_all_five_bytes_and_does_not_consume() -> None:
    msg = typed_message(b"Q", b"SELECT 1\x00")
    buf = MessageBuffer(MAX, client=True)
    for i in range(4):
        buf.feed(msg[i : i + 1])
        assert buf.header() is None
    buf.feed(msg[4:5])
    assert buf.header() == (ord("Q"), 9)
    assert buf.header() == (ord("Q"), 9)  # a look, not a read
    assert buf.next() is None  # the body has not arrived
    buf.feed(msg[5:])
    assert buf.next() == (ord("Q"), b"SELECT 1\x00")
    assert buf.header() is None and len(buf) == 0


def test_message_buffer_body_across_feeds_then_the_next_message() -> None:
    first, second = typed_message(b"P", b"x" * 1000), typed_message(b"S")
    buf = MessageBuffer(MAX, client=True)
    stream = first + second
    for pos in range(0, len(stream), 97):
        buf.feed(stream[pos : pos + 97])
    assert buf.next() == (ord("P"), b"x" * 1000)
    assert buf.next() == (ord("S"), b"")
    assert buf.next() is None and not buf.pending()


def test_message_buffer_skip_drops_a_body_that_has_not_arrived_without_buffering_it() -> None:
    body = b"\x00" * (100 << 20)
    msg = typed_message(b"d", body)
    buf = MessageBuffer(1 << 30, client=True)
    buf.feed(msg[:1000])
    assert buf.header() == (ord("d"), len(body))
    buf.skip_message()
    assert buf.skipping and len(buf) == 0
    view = memoryview(msg)
    for pos in range(1000, len(msg), 1 << 20):
        buf.feed(view[pos : pos + (1 << 20)])
        assert len(buf) == 0
    assert not buf.skipping
    buf.feed(typed_message(b"S"))
    assert buf.next() == (ord("S"), b"")


def test_message_buffer_skip_of_a_whole_message_keeps_what_follows() -> None:
    buf = MessageBuffer(MAX, client=True)
    buf.feed(typed_message(b"B", b"abc") + typed_message(b"E", b"\x00\x00\x00\x00\x00") + b"S\x00")
    buf.skip_message()
    assert not buf.skipping
    assert buf.next() == (ord("E"), b"\x00\x00\x00\x00\x00")
    assert buf.rest() == b"S\x00"


def test_message_buffer_skip_ending_exactly_at_a_feed_boundary() -> None:
    msg = typed_message(b"B", b"12345")
    buf = MessageBuffer(MAX, client=True)
    buf.feed(msg[:5])
    buf.skip_message()
    buf.feed(msg[5:])
    assert not buf.skipping and not buf.pending()
    buf.feed(b"Q")
    assert buf.rest() == b"Q"


def test_message_buffer_skip_needs_a_header() -> None:
    buf = MessageBuffer(MAX, client=True)
    buf.feed(b"Q\x00\x00")
    with pytest.raises(ValueError):
        buf.skip_message()


def test_message_buffer_discard_takes_buffered_bytes_then_bytes_to_come() -> None:
    buf = MessageBuffer(MAX, client=True)
    buf.discard(10)  # a message the stream is inside of: its remaining bytes
    assert buf.skipping
    buf.feed(b"0123456")
    buf.feed(b"789S")
    assert not buf.skipping and buf.rest() == b"S"
    buf.feed(b"abcdef")
    buf.discard(4)
    assert buf.rest() == b"ef"


def test_message_buffer_clear_forgets_a_skip_in_progress() -> None:
    buf = MessageBuffer(MAX, client=True)
    buf.discard(100)
    buf.clear()
    buf.feed(typed_message(b"S"))
    assert buf.next() == (ord("S"), b"")


def test_message_buffer_per_type_limits_with_the_scanners_words() -> None:
    limits = frontend_limits(1 << 20)
    buf = MessageBuffer(1 << 20, client=True, limits=limits)
    buf.feed(b"Q" + struct.pack("!I", 1 << 20))  # a large type: up to max_len
    assert buf.header() == (ord("Q"), (1 << 20) - 4)
    small = MessageBuffer(1 << 20, client=True, limits=limits)
    small.feed(b"S" + struct.pack("!I", 10001))
    scanner = FrameScanner(b"", 1 << 20, client=True, limits=limits)
    with pytest.raises(ClientProtocolError) as expected:
        scanner.feed(b"S" + struct.pack("!I", 10001))
    with pytest.raises(ClientProtocolError) as got:
        small.header()
    assert str(got.value) == str(expected.value)
    assert "exceeds the limit of 10000 bytes" in str(got.value)


@pytest.mark.parametrize("client, error", [(True, ClientProtocolError), (False, ServerProtocolError)])
@pytest.mark.parametrize("length", [0, 3, 1001])
def test_message_buffer_bad_length_blames_the_sender_in_the_scanners_words(
    client: bool, error: type, length: int
) -> None:
    bad = b"\x01" + struct.pack("!I", length)
    buf = MessageBuffer(1000, client=client)
    buf.feed(bad[:2])
    assert buf.header() is None  # nothing to judge until the length word is whole
    buf.feed(bad[2:])
    with pytest.raises(ProtocolError) as expected:
        FrameScanner(b"", 1000, client=client).feed(bad)
    for call in (buf.header, buf.next, buf.skip_message):
        with pytest.raises(error) as got:
            call()
        assert str(got.value) == str(expected.value)
        assert got.value.sqlstate == "08P01"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.tuples(st.sampled_from([b"Q", b"B", b"d", b"S"]), st.binary(max_size=300)), max_size=8),
    skip=st.lists(st.booleans(), min_size=8, max_size=8),
    data=st.data(),
)
def test_message_buffer_any_split_gives_the_same_messages_and_skips(
    messages: list[tuple[bytes, bytes]], skip: list[bool], data: st.DataObject
) -> None:
    stream = encode(messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    buf = MessageBuffer(MAX, client=True)
    got: list[tuple[int, bytes] | int] = []
    start = 0
    for end in [*cuts, len(stream)]:
        buf.feed(stream[start:end])
        start = end
        while (head := buf.header()) is not None:
            if skip[len(got)]:
                buf.skip_message()
                got.append(head[0])
                continue
            message = buf.next()
            if message is None:
                break
            got.append(message)
        assert len(buf) <= 5 + 300  # at most the message being read whole
    expected = [t[0] if s else (t[0], body) for (t, body), s in zip(messages, skip, strict=False)]
    assert got == expected
    assert not buf.skipping and not buf.pending()


# ------------------------------------------- the drop responders read their client through it


def responder_stream() -> st.SearchStrategy[bytes]:
    texts = st.sampled_from(["ROLLBACK", "COMMIT", "SELECT 1", "abort;", "INSERT INTO t VALUES (1)"])
    one = st.one_of(
        texts.map(lambda sql: fe.Query(sql).encode()),
        texts.map(lambda sql: fe.Parse("", sql).encode()),
        st.binary(max_size=200).map(lambda body: typed_message(b"B", body)),
        st.binary(max_size=200).map(lambda body: typed_message(b"d", body)),
        st.sampled_from([fe.Sync().encode(), fe.Flush().encode(), fe.Execute("").encode(), fe.Terminate().encode()]),
        st.just(typed_message(b"Q", b"SELECT '" + b"q" * 70000 + b"'\x00")),  # too long to read whole
    )
    return st.lists(one, min_size=1, max_size=10).map(b"".join)


def run_responder(responder: LocalAbortResponder | GroupAbort, reads: list[bytes]) -> tuple[bytes, bytes, bool]:
    replies, rest, done = b"", b"", False
    for read in reads:
        if done:
            rest += read
            continue
        reply, after, done = responder.feed(read)
        replies += reply
        rest += after
        if not done:
            assert after == b""
            # What a responder holds: a statement text up to 64 kB, else less than a header.
            held = len(responder._buf)
            assert held < (65536 if isinstance(responder, LocalAbortResponder) else 5)
    return replies, rest, done


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(stream=responder_stream(), kind=st.integers(0, 3), cut=st.integers(0, 40), data=st.data())
def test_responders_give_the_same_replies_for_any_split(
    stream: bytes, kind: int, cut: int, data: st.DataObject
) -> None:
    """One read or many, the client hears the same and the session gets the same bytes back."""

    def make() -> LocalAbortResponder | GroupAbort:
        if kind < 2:
            return LocalAbortResponder(owe_error=kind == 0)
        return GroupAbort(b"E\x00\x00\x00\x04", group_open=kind == 2)

    def run(reads: list[bytes]) -> tuple[bytes, bytes, bool] | str:
        responder = make()
        first = responder.begin_partial(ord("B"), cut)  # a Bind the drop cut, ``cut`` bytes to come
        done = isinstance(responder, GroupAbort) and responder.done
        try:
            replies, rest, ended = run_responder(responder, reads) if not done else (b"", b"".join(reads), True)
        except ClientProtocolError as exc:
            return str(exc)
        return first + replies, rest, ended

    whole = b"\x00" * cut + stream
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(whole)), max_size=12))))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert run(pieces) == run([whole])
