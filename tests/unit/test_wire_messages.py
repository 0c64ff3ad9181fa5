"""Round trips and fuzzing of the typed protocol messages (pgsidecar.wire.frontend / backend)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError
from pgsidecar.wire.frames import FrameScanner, StartupReader

ALL_TYPES = bytes(range(256))


def frames_of(data: bytes, *, client: bool) -> list[tuple[bytes, bytes]]:
    """Split encoded bytes with the real frame scanner, one byte at a time to cross reads."""
    scanner = FrameScanner(ALL_TYPES, 1 << 20, client=client)
    out: list[tuple[bytes, bytes]] = []
    for i in range(len(data)):
        out += [(bytes([t]), payload) for t, payload in scanner.feed(data[i : i + 1])]
    assert scanner.at_boundary
    return out


TYPED_FRONTEND = [
    fe.PasswordMessage(b"secret"),
    fe.PasswordMessage(b""),
    fe.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
    fe.SASLInitialResponse("SCRAM-SHA-256", b""),
    fe.SASLResponse(b"c=biws,r=abc,p=xyz"),
    fe.SASLResponse(b""),
    fe.Query("SELECT 1; SELECT 'é'"),
    fe.Query(""),
    fe.Parse("s1", "SELECT $1::int, $2", (23, 25)),
    fe.Parse("", "SELECT 1", ()),
    fe.Parse("big", "SELECT", (0xFFFFFFFF,)),
    fe.Close(b"S", "s1"),
    fe.Close(b"P", ""),
    fe.Describe(b"S", "s1"),
    fe.Describe(b"P", "portal"),
    fe.Execute("", 0),
    fe.Execute("p", 100),
    fe.Sync(),
    fe.Flush(),
    fe.Terminate(),
]


@pytest.mark.parametrize("message", TYPED_FRONTEND, ids=repr)
def test_frontend_round_trip_through_frames(message: object) -> None:
    data = message.encode()  # type: ignore[attr-defined]
    [(type_byte, payload)] = frames_of(data, client=True)
    assert type_byte == type(message).TYPE  # type: ignore[attr-defined]
    assert type(message).decode(payload) == message  # type: ignore[attr-defined]
    assert type(message).decode(memoryview(payload)) == message  # type: ignore[attr-defined]


def test_frontend_exact_bytes() -> None:
    assert fe.Query("SELECT 1").encode() == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert fe.Sync().encode() == b"S\x00\x00\x00\x04"
    assert fe.Terminate().encode() == b"X\x00\x00\x00\x04"
    assert fe.Execute("", 0).encode() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert fe.Close(b"S", "a").encode() == b"C\x00\x00\x00\x07Sa\x00"
    assert fe.Parse("", "x", (25,)).encode() == (b"P\x00\x00\x00\x0d\x00x\x00\x00\x01\x00\x00\x00\x19")
    assert fe.SASLInitialResponse("M", b"ab").encode() == (b"p\x00\x00\x00\x0cM\x00\x00\x00\x00\x02ab")


def test_sasl_initial_response_without_data() -> None:
    # 55.7: a length of -1 means "no initial response".
    payload = b"SCRAM-SHA-256\x00" + struct.pack("!i", -1)
    assert fe.SASLInitialResponse.decode(payload) == fe.SASLInitialResponse("SCRAM-SHA-256", b"")


STARTUP_PACKETS = [
    fe.StartupMessage({"user": "app", "database": "db", "application_name": "ü"}),
    fe.StartupMessage({"user": "u"}, protocol=fe.PROTOCOL_3_2),
    fe.StartupMessage({}),
    fe.SSLRequest(),
    fe.GSSENCRequest(),
    fe.CancelRequest(1234, b"\x01\x02\x03\x04"),
    fe.CancelRequest(-5, bytes(range(32))),  # protocol 3.2 keys are longer
]


@pytest.mark.parametrize("packet", STARTUP_PACKETS, ids=repr)
def test_startup_packets_round_trip_through_reader(packet: object) -> None:
    reader = StartupReader()
    reader.feed(packet.encode())  # type: ignore[attr-defined]
    payload = reader.next_packet()
    assert payload is not None and reader.next_packet() is None
    assert fe.decode_startup_packet(payload) == packet
    assert type(packet).decode(payload) == packet  # type: ignore[attr-defined]


def test_startup_exact_bytes() -> None:
    assert fe.SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert fe.GSSENCRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert fe.CancelRequest(7, b"abcd").encode() == (b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07abcd")
    assert fe.StartupMessage({"user": "u"}).encode() == (b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "shorter"),
        (b"\x04\xd2", "shorter"),
        (struct.pack("!I", 1234 << 16 | 9999), "unknown startup request code"),
        (struct.pack("!I", 2 << 16), "unsupported frontend protocol 2.0"),
        (struct.pack("!I", 3 << 16) + b"user\x00u\x00", "NUL"),  # no final terminator
        (struct.pack("!I", 3 << 16) + b"user\x00u\x00\x00x", "trailing"),
        (struct.pack("!I", fe.SSL_REQUEST_CODE) + b"x", "trailing"),
        (struct.pack("!II", fe.CANCEL_REQUEST_CODE, 1) + b"abc", "secret key of 3 bytes"),
    ],
)
def test_decode_startup_packet_rejects(payload: bytes, fragment: str) -> None:
    with pytest.raises(ClientProtocolError, match=fragment) as info:
        fe.decode_startup_packet(payload)
    assert info.value.sqlstate in ("08P01", "0A000")


def test_unsupported_protocol_is_feature_not_supported() -> None:
    with pytest.raises(ClientProtocolError) as info:
        fe.decode_startup_packet(struct.pack("!I", 4 << 16))
    assert info.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


TYPED_BACKEND = [
    be.ParameterStatus("server_version", "15.4"),
    be.ParameterStatus("application_name", ""),
    be.BackendKeyData(4242, b"\xde\xad\xbe\xef"),
    be.BackendKeyData(1, bytes(range(256))),
    be.ReadyForQuery(b"I"),
    be.ReadyForQuery(b"T"),
    be.ReadyForQuery(b"E"),
    be.ErrorResponse.make("FATAL", sqlstate.ADMIN_SHUTDOWN, "terminating connection due to administrator command"),
    be.ErrorResponse.make("ERROR", "08006", "lost", detail="d", hint="h"),
    be.ErrorResponse(()),
    be.NoticeResponse.make("WARNING", "01000", "careful"),
    be.CommandComplete("SELECT 3"),
    be.CommandComplete("SET"),
    be.NegotiateProtocolVersion(196608, ("_pq_.foo", "_pq_.bar")),
    be.NegotiateProtocolVersion(196608),
    be.NotificationResponse(99, "chan", "payload ✓"),
    be.ParseComplete(),
    be.BindComplete(),
    be.CloseComplete(),
    be.EmptyQueryResponse(),
    be.NoData(),
    be.RowDescription(("a", "b")),
    be.RowDescription(()),
    be.DataRow((b"1", None, b"")),
    be.DataRow(()),
    be.AuthenticationOk(),
    be.AuthenticationCleartextPassword(),
    be.AuthenticationMD5Password(b"\x01\x02\x03\x04"),
    be.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    be.AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096"),
    be.AuthenticationSASLFinal(b"v=c2ln"),
]


@pytest.mark.parametrize("message", TYPED_BACKEND, ids=repr)
def test_backend_round_trip_through_frames(message: object) -> None:
    data = message.encode()  # type: ignore[attr-defined]
    [(type_byte, payload)] = frames_of(data, client=False)
    cls = type(message)
    assert type_byte == cls.TYPE  # type: ignore[attr-defined]
    assert cls.decode(payload) == message  # type: ignore[attr-defined]
    if type_byte == b"R":
        assert be.decode_authentication(payload) == message
    else:
        assert be.BY_TYPE[type_byte] is cls


def test_backend_exact_bytes() -> None:
    assert be.ReadyForQuery(b"I").encode() == b"Z\x00\x00\x00\x05I"
    assert be.AuthenticationOk().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert be.AuthenticationMD5Password(b"salt").encode() == (b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt")
    assert be.AuthenticationSASL(("SCRAM-SHA-256",)).encode() == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert be.BackendKeyData(1, b"abcd").encode() == b"K\x00\x00\x00\x0c\x00\x00\x00\x01abcd"
    # RowDescription encodes text columns: table 0, attnum 0, type 25, size -1, typmod -1, text.
    assert be.RowDescription(("x",)).encode() == (
        b"T\x00\x00\x00\x1a\x00\x01x\x00" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    )


def test_row_description_decode_skips_column_details() -> None:
    column = struct.pack("!ihihih", 16384, 2, 23, 4, -1, 1)
    payload = struct.pack("!h", 2) + b"id\x00" + column + b"name\x00" + column
    assert be.RowDescription.decode(payload).fields == ("id", "name")


def test_error_response_accessors() -> None:
    error = be.ErrorResponse.make(
        "FATAL", "57P05", "terminating connection due to idle-session timeout", hint="reconnect"
    )
    assert (error.severity, error.code, error.detail, error.hint) == ("FATAL", "57P05", None, "reconnect")
    assert error.message.startswith("terminating")
    # A localized server: S is translated, V is not (55.8).
    localized = be.ErrorResponse((("S", "FATAL-ish"), ("V", "FATAL"), ("C", "57P01")))
    assert localized.severity == "FATAL"
    assert be.ErrorResponse((("S", "ERROR"),)).severity == "ERROR"
    assert be.NoticeResponse.make("NOTICE", "00000", "hi").message == "hi"


def test_error_fields_fast_path_matches_decode() -> None:
    error = be.ErrorResponse.make("FATAL", "57P01", "bye", detail="x", hint="y")
    payload = error.encode()[5:]
    assert be.error_fields(payload) == error.as_dict()
    assert be.error_fields(b"\x00") == {}
    for bad in (b"", b"SFATAL\x00", b"SFATAL", b"\x00\x00", b"SFATAL\x00\x00\x00"):
        with pytest.raises(ServerProtocolError):
            be.error_fields(bad)


@pytest.mark.parametrize(
    ("code", "method"),
    [(2, "Kerberos"), (6, "SCM"), (7, "GSSAPI"), (8, "GSSAPI"), (9, "SSPI")],
)
def test_unsupported_authentication_names_the_method(code: int, method: str) -> None:
    with pytest.raises(ServerProtocolError, match=method) as info:
        be.decode_authentication(struct.pack("!i", code))
    assert info.value.sqlstate == sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION


def test_unknown_authentication_code() -> None:
    with pytest.raises(ServerProtocolError, match="unknown authentication request code 77"):
        be.decode_authentication(struct.pack("!i", 77))
    with pytest.raises(ServerProtocolError):
        be.decode_authentication(b"\x00\x00")


@pytest.mark.parametrize(
    ("cls", "payload"),
    [
        (be.ReadyForQuery, b"X"),
        (be.ReadyForQuery, b"II"),
        (be.ReadyForQuery, b""),
        (be.BackendKeyData, b"\x00\x00\x00\x01abc"),
        (be.AuthenticationMD5Password, b"\x00\x00\x00\x05abc"),
        (be.AuthenticationOk, b"\x00\x00\x00\x03"),
        (be.DataRow, b"\x00\x01\x00\x00\x00\x05abc"),
        (be.DataRow, b"\xff\xff"),
        (be.DataRow, b"\x00\x01\xff\xff\xff\xfe"),
        (be.NegotiateProtocolVersion, b"\x00\x03\x00\x00\x00\x00\x00\x05a\x00"),
        (be.CommandComplete, b"SELECT 1"),
        (be.NoData, b"\x00"),
        (be.ErrorResponse, b"SFATAL\x00"),
    ],
)
def test_backend_decode_rejects(cls: type, payload: bytes) -> None:
    with pytest.raises(ServerProtocolError) as info:
        cls.decode(payload)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("cls", "payload"),
    [
        (fe.Close, b"Xname\x00"),
        (fe.Describe, b"S"),
        (fe.Query, b"SELECT 1"),
        (fe.Query, b"a\x00b\x00"),
        (fe.Parse, b"s\x00q\x00\x00\x02\x00\x00\x00\x19"),
        (fe.Execute, b"p\x00\x00\x00"),
        (fe.Sync, b"x"),
        (fe.SASLInitialResponse, b"M\x00\x00\x00\x00\x09ab"),
        (fe.PasswordMessage, b"pw"),
    ],
)
def test_frontend_decode_rejects(cls: type, payload: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        cls.decode(payload)


def test_negotiate_protocol_version_minor() -> None:
    message = be.NegotiateProtocolVersion(3 << 16 | 0, ("_pq_.x",))
    assert message.newest_minor == 0
    assert be.NegotiateProtocolVersion(3 << 16 | 2).newest_minor == 2


def test_encode_refuses_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        fe.Query("a\x00b").encode()
    with pytest.raises(ValueError):
        be.ErrorResponse((("SS", "x"),)).encode()


def test_non_utf8_text_round_trips_byte_for_byte() -> None:
    payload = b"caf\xe9\x00"  # LATIN1 text from a server with another client_encoding
    tag = be.CommandComplete.decode(payload)
    assert tag.encode()[5:] == payload


FRONTEND_DECODERS = [
    fe.StartupMessage.decode,
    fe.SSLRequest.decode,
    fe.GSSENCRequest.decode,
    fe.CancelRequest.decode,
    fe.decode_startup_packet,
    fe.PasswordMessage.decode,
    fe.SASLInitialResponse.decode,
    fe.SASLResponse.decode,
    fe.Query.decode,
    fe.Parse.decode,
    fe.Close.decode,
    fe.Describe.decode,
    fe.Execute.decode,
    fe.Sync.decode,
    fe.Flush.decode,
    fe.Terminate.decode,
]
BACKEND_DECODERS = [
    be.decode_authentication,
    be.error_fields,
    *(cls.decode for cls in be.BY_TYPE.values()),
    *(
        cls.decode
        for cls in (
            be.AuthenticationOk,
            be.AuthenticationCleartextPassword,
            be.AuthenticationMD5Password,
            be.AuthenticationSASL,
            be.AuthenticationSASLContinue,
            be.AuthenticationSASLFinal,
        )
    ),
]

# Payloads biased toward almost-valid: real encodings with bytes cut, flipped or appended.
VALID_PAYLOADS = [m.encode()[5:] for m in TYPED_FRONTEND + TYPED_BACKEND] + [p.encode()[4:] for p in STARTUP_PACKETS]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    base = bytearray(draw(st.sampled_from(VALID_PAYLOADS)))
    if base and draw(st.booleans()):
        base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(base)))
    return bytes(base[:cut]) + draw(st.binary(max_size=4))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads())
def test_decoders_raise_only_protocol_errors(payload: bytes) -> None:
    for decode in FRONTEND_DECODERS:
        try:
            decode(payload)
        except ProtocolError as error:
            assert isinstance(error, ClientProtocolError)
            assert len(error.sqlstate) == 5
    for decode in BACKEND_DECODERS:
        try:
            decode(payload)
        except ProtocolError as error:
            assert isinstance(error, ServerProtocolError)
            assert len(error.sqlstate) == 5


@settings(max_examples=200, deadline=None)
@given(
    fields=st.lists(
        st.tuples(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E),
            st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20),
        ),
        max_size=8,
    )
)
def test_error_response_round_trip_property(fields: list[tuple[str, str]]) -> None:
    message = be.ErrorResponse(tuple(fields))
    payload = message.encode()[5:]
    assert be.ErrorResponse.decode(payload) == message
    assert be.error_fields(payload) == dict(fields)


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=10),
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=10),
        max_size=5,
    )
)
def test_startup_message_round_trip_property(params: dict[str, str]) -> None:
    packet = fe.StartupMessage(params)
    assert fe.decode_startup_packet(packet.encode()[4:]) == packet


def test_sqlstate_table_covers_the_classes_pgsidecar_reports() -> None:
    for klass in ("08", "25", "28", "3D", "53", "57"):
        assert any(code.startswith(klass) for code in sqlstate.NAMES), klass
    assert sqlstate.NAMES[sqlstate.IDLE_SESSION_TIMEOUT] == "idle_session_timeout"
    assert sqlstate.NAMES[sqlstate.TRANSACTION_TIMEOUT] == "transaction_timeout"
    assert sqlstate.name_of("57P01") == "admin_shutdown"
    assert sqlstate.name_of("08ZZZ") == "Connection Exception"
    assert sqlstate.CLASSES["57"] == "Operator Intervention"
    assert all(len(code) == 5 for code in sqlstate.NAMES)


def test_protocol_error_defaults() -> None:
    assert ProtocolError("x").sqlstate == sqlstate.PROTOCOL_VIOLATION
    assert ClientProtocolError("x", sqlstate="28P01").sqlstate == "28P01"
    assert str(ServerProtocolError("boom")) == "boom"
