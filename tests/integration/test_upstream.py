"""open_upstream against a real PostgreSQL with ssl=on (and one with ssl=off), on both loops.

Each connection is proven usable by sending a StartupMessage through it and reading the server's
first reply, so "TLS" means the server decrypted what we sent. Cases a real server cannot
produce (an 'E' or junk answer to SSLRequest, injected bytes after 'S', a server that never
answers) use a tiny fake listener on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import uvloop

from pgsidecar.config.model import KeepaliveConfig, SslMode, UpstreamTarget
from pgsidecar.runtime.tls import generate_local_certificate, load_pem_chain, upstream_context
from pgsidecar.runtime.upstream import (
    UpstreamError,
    UpstreamFacts,
    keepalive_readback,
    open_upstream,
    tcp_info,
)
from tests.fixtures.certs import certificate_fingerprint, make_pki
from tests.fixtures.postgres import PgCluster

pytestmark = pytest.mark.server

T = TypeVar("T")
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # PostgreSQL docs 55.7, SSLRequest


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop of the parametrized kind (the runtime uses uvloop)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 30))

    return runner


class Collect(asyncio.Protocol):
    """Buffers what the server sends, so a test can wait for its first reply."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.changed.set()


def startup_message(user: str, dbname: str) -> bytes:
    body = struct.pack("!i", 196608)  # protocol 3.0 (PostgreSQL docs 55.7, StartupMessage)
    for key, value in (("user", user), ("database", dbname)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def first_reply_type(transport: asyncio.Transport, proto: Collect, dbname: str = "app") -> bytes:
    """Send a StartupMessage; the server's first message type ('R' = authentication request)."""
    transport.write(startup_message("app", dbname))
    for _ in range(100):
        if proto.data or proto.lost:
            break
        proto.changed.clear()
        await asyncio.wait_for(proto.changed.wait(), 10)
    return bytes(proto.data[:1])


def target(pg: PgCluster, mode: str, **kw: Any) -> UpstreamTarget:
    kw.setdefault("host", pg.host)
    kw.setdefault("port", pg.port)
    return UpstreamTarget(sslmode=SslMode(mode), **kw)


async def connect(t: UpstreamTarget, **kw: Any) -> tuple[asyncio.Transport, Collect, UpstreamFacts]:
    ctx = kw.pop("ssl_context", None) or upstream_context(t, home="/nonexistent")
    keepalive = kw.pop("keepalive", KeepaliveConfig())
    transport, proto, facts = await open_upstream(t, keepalive, Collect, ssl_context=ctx, **kw)
    assert isinstance(proto, Collect)
    return transport, proto, facts


async def connect_and_greet(t: UpstreamTarget, dbname: str = "app", **kw: Any) -> tuple[UpstreamFacts, bytes]:
    transport, proto, facts = await connect(t, **kw)
    try:
        return facts, await first_reply_type(transport, proto, dbname)
    finally:
        transport.close()


def refused_port() -> int:
    """A loopback port nobody listens on (bound, never listened, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- sslmode against the real server ------------------------------------------------------------


def test_disable_is_plaintext(pg: PgCluster, run: Any) -> None:
    facts, reply = run(connect_and_greet(target(pg, "disable")))
    assert reply == b"R"
    assert facts.tls is False and facts.tls_version is None and facts.cert is None
    assert facts.address == "127.0.0.1" and facts.port == pg.port
    assert facts.local_address == "127.0.0.1"


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_prefer_and_require_encrypt(pg: PgCluster, run: Any, mode: str) -> None:
    facts, reply = run(connect_and_greet(target(pg, mode)))
    assert reply == b"R"
    assert facts.tls is True
    assert facts.tls_version in ("TLSv1.2", "TLSv1.3")
    assert facts.tls_cipher
    assert facts.cert is not None
    assert facts.cert.fingerprint_sha256 == certificate_fingerprint(pg.pki.server_cert)
    assert "127.0.0.1" in facts.cert.sans


def test_allow_starts_plaintext_and_use_tls_upgrades_it(pg: PgCluster, run: Any) -> None:
    plain, reply = run(connect_and_greet(target(pg, "allow")))
    assert plain.tls is False and reply == b"R"
    tls, reply = run(connect_and_greet(target(pg, "allow"), use_tls=True))
    assert tls.tls is True and reply == b"R"


def test_verify_ca_with_the_right_and_a_wrong_ca(pg: PgCluster, run: Any, tmp_path: Any) -> None:
    facts, reply = run(connect_and_greet(target(pg, "verify-ca", sslrootcert=pg.pki.ca_cert)))
    assert facts.tls and reply == b"R"
    wrong = make_pki(tmp_path / "wrong")
    with pytest.raises(UpstreamError) as info:
        run(connect(target(pg, "verify-ca", sslrootcert=wrong.ca_cert)))
    assert info.value.kind == "tls"
    assert "certificate verify failed" in str(info.value)
    lead = f'connection to server at "127.0.0.1", port {pg.port} failed: '
    assert str(info.value).startswith(lead)


def test_prefer_with_a_wrong_root_cert_falls_back_to_plaintext(pg: PgCluster, run: Any, tmp_path: Any) -> None:
    """libpq checks a root certificate in every mode, and prefer retries without SSL on failure."""
    wrong = make_pki(tmp_path / "wrong")
    facts, reply = run(connect_and_greet(target(pg, "prefer", sslrootcert=wrong.ca_cert)))
    assert facts.tls is False and reply == b"R"


def test_verify_full_by_name(pg: PgCluster, run: Any) -> None:
    facts, reply = run(connect_and_greet(target(pg, "verify-full", host="localhost", sslrootcert=pg.pki.ca_cert)))
    assert facts.tls and reply == b"R"
    assert facts.host == "localhost" and facts.address in ("127.0.0.1", "::1")


def _fake_getaddrinfo(
    real: Any, name: str, entries: list[tuple[str, int]], calls: list[str]
) -> Callable[..., Awaitable[Any]]:
    async def fake(self: Any, host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host != name:
            return await real(self, host, port, *args, **kw)
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (addr, p)) for addr, p in entries]

    return fake


def _resolve_to(monkeypatch: pytest.MonkeyPatch, name: str, entries: list[tuple[str, int]]) -> list[str]:
    """Make `name` resolve to `entries` (address, port) on any loop; returns the call log."""
    calls: list[str] = []
    for cls in (asyncio.BaseEventLoop, uvloop.Loop):
        fake = _fake_getaddrinfo(cls.getaddrinfo, name, entries, calls)
        monkeypatch.setattr(cls, "getaddrinfo", fake)
    return calls


@pytest.mark.parametrize("sslsni", [True, False])
def test_verify_full_rejects_a_name_the_certificate_lacks(
    pg: PgCluster, run: Any, monkeypatch: pytest.MonkeyPatch, sslsni: bool
) -> None:
    """db.example resolves to the server, whose certificate names only the loopbacks. Without SNI
    Python cannot check names during the handshake, so upstream.py checks after it."""
    _resolve_to(monkeypatch, "db.example", [("127.0.0.1", pg.port)])
    t = target(pg, "verify-full", host="db.example", sslrootcert=pg.pki.ca_cert, sslsni=sslsni)
    with pytest.raises(UpstreamError) as info:
        run(connect(t))
    assert info.value.kind == "tls"
    assert 'connection to server at "db.example" (127.0.0.1)' in str(info.value)
    assert "db.example" in str(info.value).split("failed:", 1)[1]
    # verify-ca does not check names: the same server is fine.
    t = target(pg, "verify-ca", host="db.example", sslrootcert=pg.pki.ca_cert)
    facts, reply = run(connect_and_greet(t))
    assert facts.tls and reply == b"R" and facts.address == "127.0.0.1"


def test_verify_full_without_sni_accepts_the_right_name(pg: PgCluster, run: Any) -> None:
    t = target(pg, "verify-full", host="localhost", sslrootcert=pg.pki.ca_cert, sslsni=False)
    facts, reply = run(connect_and_greet(t))
    assert facts.tls and reply == b"R"


def test_unix_socket_never_uses_tls(pg: PgCluster, run: Any) -> None:
    t = target(pg, "require", host=pg.socket_dir)
    facts, reply = run(connect_and_greet(t, dbname=pg.trust_dbname))
    assert reply == b"R"  # trust: AuthenticationOk
    assert facts.tls is False
    assert facts.address == f"{pg.socket_dir}/.s.PGSQL.{pg.port}"
    with pytest.raises(UpstreamError) as info:
        run(connect(target(pg, "disable", host=pg.socket_dir, port=refused_port())))
    assert info.value.kind == "refused" and info.value.errno_name == "ENOENT"
    assert str(info.value).startswith(f'connection to server on socket "{pg.socket_dir}/.s.PGSQL.')


# -- failures --------------------------------------------------------------------------------


def test_refused_port_fails_fast(run: Any) -> None:
    port = refused_port()
    t = UpstreamTarget(host="127.0.0.1", port=port, sslmode=SslMode.PREFER)
    start = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        run(connect(t, timeout_s=10))
    assert time.monotonic() - start < 2
    assert info.value.kind == "refused" and info.value.errno_name == "ECONNREFUSED"
    lead = f'connection to server at "127.0.0.1", port {port} failed: '
    assert str(info.value) == lead + "Connection refused"


def test_unknown_host_is_a_dns_error(run: Any) -> None:
    t = UpstreamTarget(host="no-such-host.invalid", port=5432, sslmode=SslMode.DISABLE)
    with pytest.raises(UpstreamError) as info:
        run(connect(t, timeout_s=10))
    assert info.value.kind == "dns"
    expected = 'could not translate host name "no-such-host.invalid" to address'
    assert str(info.value).startswith(expected)


def test_dns_is_resolved_on_every_call_and_addresses_tried_in_order(
    pg: PgCluster, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = refused_port()
    calls = _resolve_to(monkeypatch, "db.example", [("127.0.0.1", dead), ("127.0.0.1", pg.port)])
    t = target(pg, "require", host="db.example")
    for _ in range(2):
        facts, reply = run(connect_and_greet(t))
        assert facts.tls and reply == b"R"
    assert calls == ["db.example", "db.example"]
    # The first address that works is used; later ones are never tried.
    _resolve_to(monkeypatch, "db.example", [("127.0.0.1", pg.port), ("127.0.0.1", dead)])
    facts, reply = run(connect_and_greet(t))
    assert facts.tls and reply == b"R"
    # Every address failing: the last error is the one raised.
    calls = _resolve_to(monkeypatch, "db.example", [("127.0.0.1", pg.port), ("127.0.0.1", dead)])
    with pytest.raises(UpstreamError) as info:
        run(connect(target(pg, "verify-full", host="db.example", sslrootcert=pg.pki.ca_cert)))
    assert info.value.kind == "refused"


def test_addresses_of_the_wrong_role_are_avoided_and_a_hostaddr_skips_dns(
    pg: PgCluster, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The brain avoids addresses it found with the wrong role (OpenServer.avoid); with every
    address avoided the runtime says "skipped"; a hostaddr is dialled without resolving the host."""
    # 127.0.0.2 is loopback too, but the server listens on 127.0.0.1 only: a refusal proves the
    # avoided 127.0.0.1 was not dialled.
    calls = _resolve_to(monkeypatch, "db.example", [("127.0.0.1", pg.port), ("127.0.0.2", pg.port)])
    t = target(pg, "require", host="db.example")
    with pytest.raises(UpstreamError) as info:
        run(connect(t, avoid=frozenset({"127.0.0.1"})))
    assert info.value.kind == "refused" and "127.0.0.2" in str(info.value)
    with pytest.raises(UpstreamError) as info:
        run(connect(t, avoid=frozenset({"127.0.0.1", "127.0.0.2"})))
    assert info.value.kind == "skipped"
    facts, reply = run(connect_and_greet(t, avoid=frozenset({"127.0.0.2"})))
    assert reply == b"R" and facts.address == "127.0.0.1"
    calls.clear()
    numeric = target(pg, "require", host="db.example", hostaddr="127.0.0.1")
    facts, reply = run(connect_and_greet(numeric))
    assert reply == b"R" and facts.address == "127.0.0.1" and calls == []


# -- keepalive and TCP_INFO on the live socket ----------------------------------------------------


async def _socket_report(t: UpstreamTarget, keepalive: KeepaliveConfig) -> tuple[dict[str, int], dict[str, int] | None]:
    transport, proto, _ = await connect(t, keepalive=keepalive)
    try:
        await first_reply_type(transport, proto)  # some traffic, so rtt is measured
        sock = transport.get_extra_info("socket")
        return keepalive_readback(sock), tcp_info(sock)
    finally:
        transport.close()


def test_keepalive_options_read_back_from_the_live_socket(pg: PgCluster, run: Any) -> None:
    options, _info = run(_socket_report(target(pg, "require"), KeepaliveConfig()))
    assert options == {
        "keepalive": 1,
        "keepidle_s": 10,
        "keepintvl_s": 5,
        "keepcnt": 3,
        "user_timeout_ms": 24500,
        "nodelay": 1,
    }
    custom = KeepaliveConfig(idle_s=7, interval_s=2, count=4, user_timeout_s=9.5)
    options, _ = run(_socket_report(target(pg, "disable"), custom))
    assert (options["keepidle_s"], options["keepintvl_s"], options["keepcnt"]) == (7, 2, 4)
    assert options["user_timeout_ms"] == 9500


def test_tcp_info_reports_rtt_and_retransmits(pg: PgCluster, run: Any) -> None:
    _, info = run(_socket_report(target(pg, "require"), KeepaliveConfig()))
    assert info is not None
    assert info["state"] == 1  # TCP_ESTABLISHED
    assert info["retransmits"] == 0 and info["total_retrans"] == 0
    assert 0 < info["rtt"] < 1_000_000  # microseconds, on loopback
    assert info["snd_mss"] > 0


# -- answers only a fake server gives -----------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback listener; yields its port and the first 8 bytes each connection sent."""
    firsts: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            firsts.append(await reader.readexactly(8))
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], firsts
    finally:
        server.close()


async def _fake_connect(
    handler: Handler,
    mode: str,
    *,
    greet: bool = False,
    seen: Callable[[], bool] | None = None,
    **kw: Any,
) -> tuple[UpstreamFacts | UpstreamError, list[bytes]]:
    """Connect to a fake server; with `greet`, send a StartupMessage and wait until it is seen
    (by default: as the first bytes of another connection; else when `seen()` says so)."""
    async with fake_server(handler) as (port, firsts):
        t = UpstreamTarget(host="127.0.0.1", port=port, sslmode=SslMode(mode))
        try:
            transport, _, facts = await connect(t, **kw)
            before = len(firsts)
            if greet:
                transport.write(startup_message("app", "app"))
                for _ in range(200):
                    if seen() if seen else len(firsts) > before:
                        break
                    await asyncio.sleep(0.01)
            transport.close()
            return facts, firsts
        except UpstreamError as e:
            return e, firsts


async def _answer_e(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    fields = b"SFATAL\0C53300\0Msorry, too many clients already\0\0"
    writer.write(b"E" + struct.pack("!i", len(fields) + 4) + fields)
    await writer.drain()


def test_error_answer_to_ssl_request(run: Any) -> None:
    err, firsts = run(_fake_connect(_answer_e, "prefer"))
    assert isinstance(err, UpstreamError) and err.kind == "ssl_rejected"
    assert str(err).endswith("server sent an error response during SSL exchange")
    assert err.detail == "53300: sorry, too many clients already"  # kept apart: unauthenticated
    assert firsts == [SSL_REQUEST]


def test_unencrypted_bytes_after_s_are_refused(run: Any) -> None:
    async def inject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"S" + b"R\0\0\0\x08\0\0\0\0")  # 'S' plus a forged AuthenticationOk
        await writer.drain()
        await reader.read(1)

    err, _ = run(_fake_connect(inject, "require"))
    assert isinstance(err, UpstreamError) and err.kind == "protocol"
    assert str(err).endswith("received unencrypted data after SSL response")


def test_server_without_ssl(run: Any) -> None:
    """A server with ssl=off answers 'N' (PostgreSQL docs 55.2.10): an error for require and the
    verify modes, plaintext on the same connection for prefer. (The pg fixture's start() insists
    on a TLS connection, so a real ssl=off cluster cannot be started from it yet.)"""

    async def no(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"N")
        await writer.drain()
        firsts_after_n.append(await reader.readexactly(8))

    for mode in ("require", "verify-ca", "verify-full"):
        firsts_after_n: list[bytes] = []
        err, _ = run(_fake_connect(no, mode, ssl_context=ssl.create_default_context()))
        assert isinstance(err, UpstreamError) and err.kind == "ssl_not_supported", mode
        assert str(err).endswith("server does not support SSL, but SSL was required")
    firsts_after_n = []
    facts, firsts = run(_fake_connect(no, "prefer", greet=True, seen=lambda: bool(firsts_after_n)))
    assert isinstance(facts, UpstreamFacts) and facts.tls is False
    assert firsts == [SSL_REQUEST]
    assert firsts_after_n == [startup_message("app", "app")[:8]]  # same connection, plaintext


def test_junk_answer_to_ssl_request(run: Any) -> None:
    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"H")
        await writer.drain()

    err, _ = run(_fake_connect(junk, "require"))
    assert isinstance(err, UpstreamError) and err.kind == "protocol"
    assert "invalid response to SSL negotiation" in str(err)


async def _s_then_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """'S', then answer the ClientHello with something that is not TLS; plaintext on retry."""
    writer.write(b"S")
    await writer.drain()
    await reader.read(1)  # the ClientHello has begun
    writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    await writer.drain()


def test_handshake_failure_under_prefer_retries_in_plaintext(run: Any) -> None:
    err, firsts = run(_fake_connect(_s_then_garbage, "require"))
    assert isinstance(err, UpstreamError) and err.kind == "tls"
    assert firsts == [SSL_REQUEST]

    calls = 0

    async def first_tls_then_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _s_then_garbage(reader, writer)

    facts, firsts = run(_fake_connect(first_tls_then_plain, "prefer", greet=True))
    assert isinstance(facts, UpstreamFacts) and facts.tls is False
    assert firsts == [SSL_REQUEST, startup_message("app", "app")[:8]]  # a new, plaintext connection


def test_silent_server_times_out(run: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    start = time.monotonic()
    err, _ = run(_fake_connect(silent, "require", timeout_s=0.3))
    assert time.monotonic() - start < 3
    assert isinstance(err, UpstreamError) and err.kind == "timeout"
    assert str(err).endswith("failed: timeout expired")


@pytest.mark.parametrize(
    ("host", "sslsni", "expected"),
    [("localhost", True, "localhost"), ("localhost", False, None), ("127.0.0.1", True, None)],
)
def test_sni_follows_sslsni(run: Any, host: str, sslsni: bool, expected: str | None) -> None:
    """A fake TLS server records the SNI name: sent for a name when sslsni=1, never for an IP."""
    seen: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_pem_chain(server_ctx, *generate_local_certificate())

    def record_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    server_ctx.sni_callback = record_sni  # type: ignore[assignment]

    async def tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(server_ctx)
        await reader.read(1)

    async def go() -> UpstreamFacts:
        async with fake_server(tls) as (port, _):
            t = UpstreamTarget(host=host, port=port, sslmode=SslMode.REQUIRE, sslsni=sslsni)
            transport, _, facts = await connect(t)
            transport.close()
            return facts

    facts = run(go())
    assert facts.tls is True
    assert seen == [expected]
