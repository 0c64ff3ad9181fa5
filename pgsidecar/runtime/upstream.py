"""Getting a connected, keepalive-armed, TLS-wrapped socket to the real server, as libpq would.

Resolve afresh (addresses move in failovers), try each address in order, set keepalive before
connect, then SSLRequest and TLS per sslmode. Nothing here speaks the startup or authentication
exchange: the relay brain does that over the transport this returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgsidecar.config.model import KeepaliveConfig, SslMode, UpstreamHost, UpstreamTarget
from pgsidecar.runtime.tls import CertFacts, cert_facts, host_matches_certificate, is_ip_literal
from pgsidecar.wire.frontend import SSLRequest

ERROR_KINDS = (
    "dns",
    "refused",
    "timeout",
    "unreachable",
    "reset",
    "tls",
    "ssl_not_supported",
    "ssl_rejected",
    "protocol",
    "skipped",  # every address left was found with the wrong role (target_session_attrs)
    "auth",  # no password for this connect: auth.password_command or auth.token failed (runtime/credentials.py)
)

#: errno -> kind, for a failed connect and (runtime/driver.py) for an established socket's end.
ERRNO_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.ENOENT: "refused",  # no socket file: nothing listens there
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.ENETDOWN: "unreachable",
    errno.EADDRNOTAVAIL: "unreachable",
    errno.ECONNRESET: "reset",
    errno.ECONNABORTED: "reset",
    errno.EPIPE: "reset",
}

_SSL_REQUEST = SSLRequest().encode()
_TLS_MODES = (SslMode.PREFER, SslMode.REQUIRE, SslMode.VERIFY_CA, SslMode.VERIFY_FULL)


@dataclass(frozen=True, slots=True)
class UpstreamFacts:
    """What the new connection revealed; drop records compare these across reconnects."""

    host: str
    address: str
    port: int
    tls: bool
    tls_version: str | None
    tls_cipher: str | None
    cert: CertFacts | None
    local_address: str | None


class UpstreamError(Exception):
    """A failed connect, with a closed `kind` for classification and a libpq-like sentence.

    `detail` holds text the server sent before it was authenticated (an 'E' answer to SSLRequest);
    like libpq since CVE-2024-10977, it never becomes the message.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        errno_name: str | None = None,
        address: str | None = None,
        detail: str | None = None,
    ) -> None:
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.errno_name = errno_name
        self.address = address
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"UpstreamError(kind={self.kind!r}, errno_name={self.errno_name!r}, {self.message!r})"


class _HandshakeFailed(Exception):
    """A TLS handshake that failed after the server said 'S': prefer may retry in plaintext."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class _Dial:
    """Everything one connection attempt needs, so helpers take one argument, not eight."""

    target: UpstreamTarget
    keepalive: KeepaliveConfig
    protocol_factory: Callable[[], asyncio.Protocol]
    ssl_context: ssl.SSLContext | None
    timeout_s: float | None

    @property
    def mode(self) -> SslMode:
        return SslMode(self.target.sslmode)


async def open_upstream(
    target: UpstreamTarget,
    keepalive: KeepaliveConfig,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    ssl_context: ssl.SSLContext | None,
    use_tls: bool | None = None,
    plaintext_retry: bool | None = None,
    timeout_s: float | None = None,
    avoid: frozenset[str] = frozenset(),
    shuffle: bool = False,
) -> tuple[asyncio.Transport, asyncio.Protocol, UpstreamFacts]:
    """Connect to `target`'s first host (callers pass `UpstreamTarget.at(i)`): every address it
    resolves to, in order (shuffled under load_balance_hosts=random, as libpq 16), except those in
    `avoid` (the brain found the wrong role there); raise UpstreamError with the last failure.

    `use_tls` None decides from sslmode: disable and allow start in plaintext (the brain retries
    allow with use_tls=True after an authentication rejection), the others send SSLRequest.
    `timeout_s` (default: target.connect_timeout_s) bounds each address attempt.
    """
    dial = _Dial(target, keepalive, protocol_factory, ssl_context, _timeout(target, timeout_s))
    if target.host.startswith(("/", "@")):
        # libpq never uses SSL over a unix socket (PostgreSQL docs 34.19).
        return await _open_unix(dial)
    tls = use_tls if use_tls is not None else dial.mode in _TLS_MODES
    if tls and ssl_context is None:
        raise ValueError(f"TLS requested for sslmode={dial.mode.value} but no ssl_context given")
    # A session's brain says both (OpenServer); other callers (check, health, cancel) leave
    # them to sslmode.
    retry_plaintext = (
        plaintext_retry if plaintext_retry is not None else (use_tls is None and dial.mode is SslMode.PREFER)
    )
    infos = [info for info in await _resolve(dial) if str(info[4][0]) not in avoid]
    if not infos:
        raise UpstreamError("skipped", f'every address of "{target.host}" was tried and had the wrong role')
    if shuffle:
        random.shuffle(infos)
    last: UpstreamError | None = None
    for family, _type, proto, _canon, sockaddr in infos:
        try:
            return await _attempt(dial, family, proto, sockaddr, tls, retry_plaintext)
        except UpstreamError as e:
            last = e
    assert last is not None  # getaddrinfo never returns an empty list without raising
    raise last


def pinned(target: UpstreamTarget, address: str | None) -> UpstreamTarget:
    """A single-host target dialled at `address` (a hostaddr), its host name kept for TLS."""
    if address is None or target.is_unix_socket:
        return target
    host = UpstreamHost(target.host, target.port, address)
    return dataclasses.replace(target, hostaddr=address, hosts=(host,))


def _timeout(target: UpstreamTarget, timeout_s: float | None) -> float | None:
    """libpq: connect_timeout 0 or unset waits forever; below 2 s counts as 2 s (docs 34.1.2)."""
    value = timeout_s if timeout_s is not None else target.connect_timeout_s
    if value is None or value <= 0:
        return None
    if timeout_s is None:
        return max(float(value), 2.0)
    return float(value)


async def _resolve(dial: _Dial) -> list[Any]:
    """Resolve on every call: after a failover the name points somewhere else. A hostaddr is
    dialled as it is, without DNS (libpq); the host name still serves TLS verification."""
    host, port = dial.target.host, dial.target.port
    numeric = dial.target.hostaddr
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(dial.timeout_s):
            infos = await loop.getaddrinfo(
                numeric or host,
                port,
                type=socket.SOCK_STREAM,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST if numeric else 0,
            )
    except TimeoutError:
        raise UpstreamError("dns", f'could not translate host name "{host}" to address: timeout expired') from None
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise UpstreamError("dns", f'could not translate host name "{host}" to address: {reason}') from e
    if not infos:
        raise UpstreamError("dns", f'could not translate host name "{host}" to address')
    return infos


def _prefix(target: UpstreamTarget, address: str) -> str:
    """libpq's lead-in: names the host, and the address when the host was a name."""
    if target.host.startswith(("/", "@")):
        return f'connection to server on socket "{address}" failed: '
    if address == target.host:
        return f'connection to server at "{target.host}", port {target.port} failed: '
    return f'connection to server at "{target.host}" ({address}), port {target.port} failed: '


async def _attempt(
    dial: _Dial, family: int, proto: int, sockaddr: Any, tls: bool, retry_plaintext: bool
) -> tuple[asyncio.Transport, asyncio.Protocol, UpstreamFacts]:
    """One address, bounded by the connect timeout; under prefer a failed handshake is retried
    once in plaintext on a new connection, as libpq does."""
    address = str(sockaddr[0])
    try:
        async with asyncio.timeout(dial.timeout_s):
            try:
                return await _dial_tcp(dial, family, proto, sockaddr, tls)
            except _HandshakeFailed as failed:
                if not retry_plaintext:
                    raise failed.error from None
            return await _dial_tcp(dial, family, proto, sockaddr, False)
    except TimeoutError as e:
        if e.errno is not None:  # the kernel's ETIMEDOUT, not our timer
            raise _os_error(e, dial.target, address) from e
        raise UpstreamError("timeout", _prefix(dial.target, address) + "timeout expired", address=address) from None


async def _dial_tcp(
    dial: _Dial, family: int, proto: int, sockaddr: Any, tls: bool
) -> tuple[asyncio.Transport, asyncio.Protocol, UpstreamFacts]:
    loop = asyncio.get_running_loop()
    address = str(sockaddr[0])
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        apply_keepalive(sock, dial.keepalive)  # before connect: covers the handshake too
        await loop.sock_connect(sock, sockaddr)
        ctx = await _negotiate_ssl(sock, dial, address) if tls else None
    except OSError as e:
        sock.close()
        raise _os_error(e, dial.target, address) from e
    except BaseException:
        sock.close()
        raise
    if ctx is None:
        transport, protocol = await _hand_over(loop, dial, sock, address, None)
        return transport, protocol, _facts(dial.target, transport, address)
    try:
        transport, protocol = await _hand_over(loop, dial, sock, address, ctx)
    except UpstreamError as e:
        raise _HandshakeFailed(e) from e
    _check_host_name(dial, transport, ctx, address)
    return transport, protocol, _facts(dial.target, transport, address)


async def _hand_over(
    loop: asyncio.AbstractEventLoop,
    dial: _Dial,
    sock: socket.socket,
    address: str,
    ctx: ssl.SSLContext | None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Give the connected socket to the loop (and TLS); the loop owns it from here on."""
    kwargs: dict[str, Any] = {}
    if ctx is not None:
        kwargs["ssl"] = ctx
        kwargs["server_hostname"] = _server_hostname(dial.target, ctx)
        # Our own timer (the connect timeout) fires first; this only replaces the loop's 60 s.
        kwargs["ssl_handshake_timeout"] = (dial.timeout_s + 1.0) if dial.timeout_s else None
    try:
        transport, protocol = await loop.create_connection(dial.protocol_factory, sock=sock, **kwargs)
    except OSError as e:
        _close_if_still_open(sock)
        raise _os_error(e, dial.target, address) from e
    except BaseException:
        _close_if_still_open(sock)
        raise
    return transport, protocol


def _close_if_still_open(sock: socket.socket) -> None:
    """asyncio closes the socket object with its transport; uvloop detaches it. Close it only if
    neither happened, so a reused file descriptor number is never closed by mistake."""
    if sock.fileno() != -1:
        sock.close()


def _server_hostname(target: UpstreamTarget, ctx: ssl.SSLContext) -> str:
    """The name for SNI and Python's name check: '' sends no SNI (sslsni=0, or an IP literal)."""
    if ctx.check_hostname:
        return target.host  # Python sends no SNI for an IP literal
    if target.sslsni and not is_ip_literal(target.host):
        return target.host
    return ""


async def _negotiate_ssl(sock: socket.socket, dial: _Dial, address: str) -> ssl.SSLContext | None:
    """SSLRequest and its one-byte answer (PostgreSQL docs 55.2.10 "SSL Session Encryption").

    Returns the context to handshake with, or None to go on in plaintext ('N' under
    allow/prefer).
    """
    loop = asyncio.get_running_loop()
    prefix = _prefix(dial.target, address)
    await loop.sock_sendall(sock, _SSL_REQUEST)
    answer = await loop.sock_recv(sock, 1)
    if not answer:
        raise UpstreamError(
            "reset",
            prefix + "server closed the connection unexpectedly during SSL negotiation",
            address=address,
        )
    if answer == b"S":
        if _bytes_waiting(sock):
            # CVE-2021-23222: bytes injected before the handshake would be read as if encrypted.
            raise UpstreamError("protocol", prefix + "received unencrypted data after SSL response", address=address)
        return dial.ssl_context
    if answer == b"N":
        if dial.mode in (SslMode.ALLOW, SslMode.PREFER):
            return None
        raise UpstreamError(
            "ssl_not_supported",
            prefix + "server does not support SSL, but SSL was required",
            address=address,
        )
    if answer == b"E":
        # Fork failure and the like; the text is unauthenticated, so it stays out of the message.
        detail = await _read_error_text(sock)
        raise UpstreamError(
            "ssl_rejected",
            prefix + "server sent an error response during SSL exchange",
            address=address,
            detail=detail,
        )
    raise UpstreamError(
        "protocol",
        prefix + f"received invalid response to SSL negotiation: {answer!r}",
        address=address,
    )


def _bytes_waiting(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False


async def _read_error_text(sock: socket.socket, limit: int = 2048, wait_s: float = 1.0) -> str:
    """Best effort: what followed 'E' (a v3 ErrorResponse, or a v2 line from a fork failure)."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        async with asyncio.timeout(wait_s):
            while len(data) < limit:
                chunk = await loop.sock_recv(sock, limit - len(data))
                if not chunk:
                    break
                data += chunk
                if _error_complete(data):
                    break
    except (TimeoutError, OSError):
        pass
    return _error_text(data)


def _error_complete(data: bytes) -> bool:
    if len(data) >= 4:
        length: int = struct.unpack("!I", data[:4])[0]
        if 4 <= length <= 1 << 16:
            return len(data) >= length
    return data.endswith(b"\0")


def _error_text(data: bytes) -> str:
    """The message (and SQLSTATE) fields of a v3 ErrorResponse body (docs 55.8), else v2 text."""
    if len(data) >= 5 and 4 <= struct.unpack("!I", data[:4])[0] <= 1 << 16:
        fields = {f[:1]: f[1:] for f in data[4:].split(b"\0") if f}
        text = fields.get(b"M", b"").decode("utf-8", "replace")
        code = fields.get(b"C", b"").decode("ascii", "replace")
        if text:
            return f"{code}: {text}" if code else text
    return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _check_host_name(dial: _Dial, transport: asyncio.Transport, ctx: ssl.SSLContext, address: str) -> None:
    """verify-full without Python's check (sslsni=0 and a DNS name): check after the handshake,
    as libpq always does."""
    if dial.mode is not SslMode.VERIFY_FULL or ctx.check_hostname:
        return
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der and host_matches_certificate(der, dial.target.host):
        return
    transport.abort()
    names = ", ".join(cert_facts(der).sans) if der else "no certificate"
    raise UpstreamError(
        "tls",
        _prefix(dial.target, address)
        + f'server certificate for "{names}" does not match host name "{dial.target.host}"',
        address=address,
    )


def _facts(target: UpstreamTarget, transport: asyncio.Transport, address: str) -> UpstreamFacts:
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    ssl_object = transport.get_extra_info("ssl_object")
    version = cipher = None
    cert = None
    if ssl_object is not None:
        version = ssl_object.version()
        cipher_info = ssl_object.cipher()
        cipher = cipher_info[0] if cipher_info else None
        der = ssl_object.getpeercert(binary_form=True)
        cert = cert_facts(der) if der else None
    return UpstreamFacts(
        host=target.host,
        address=str(peer[0]) if isinstance(peer, tuple) and peer else address,
        port=target.port,
        tls=ssl_object is not None,
        tls_version=version,
        tls_cipher=cipher,
        cert=cert,
        local_address=str(local[0]) if isinstance(local, tuple) and local else None,
    )


async def _open_unix(dial: _Dial) -> tuple[asyncio.Transport, asyncio.Protocol, UpstreamFacts]:
    """`{host}/.s.PGSQL.{port}`; a leading '@' is Linux's abstract namespace (docs 34.1.2)."""
    target = dial.target
    path = os.path.join(target.host, f".s.PGSQL.{target.port}")
    sockaddr = "\0" + path[1:] if path.startswith("@") else path
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(dial.timeout_s):
            await loop.sock_connect(sock, sockaddr)
    except TimeoutError as e:
        sock.close()
        if e.errno is not None:
            raise _os_error(e, target, path) from e
        raise UpstreamError("timeout", _prefix(target, path) + "timeout expired", address=path) from None
    except OSError as e:
        sock.close()
        raise _os_error(e, target, path) from e
    except BaseException:
        sock.close()
        raise
    transport, protocol = await _hand_over(loop, dial, sock, path, None)
    facts = UpstreamFacts(target.host, path, target.port, False, None, None, None, None)
    return transport, protocol, facts


def _os_error(e: OSError, target: UpstreamTarget, address: str) -> UpstreamError:
    """Map what the socket or ssl said to a kind, keeping the errno's name for the drop record."""
    prefix = _prefix(target, address)
    if isinstance(e, ssl.SSLCertVerificationError):
        reason = e.verify_message or e.reason or str(e)
        text = f"SSL error: certificate verify failed: {reason}"
        return UpstreamError("tls", prefix + text, address=address)
    if isinstance(e, ssl.SSLError):
        return UpstreamError("tls", prefix + f"SSL error: {e.reason or e}", address=address)
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    kind = ERRNO_KINDS.get(e.errno, "unreachable") if e.errno is not None else "reset"
    if e.errno is None and "handshake is taking longer" in str(e):
        kind = "timeout"
    # asyncio's own messages ("Connect call failed (...)") hide the plain errno text libpq shows.
    text = os.strerror(e.errno) if e.errno is not None else (str(e) or type(e).__name__)
    return UpstreamError(kind, prefix + text, errno_name=name, address=address)


def apply_keepalive(sock: socket.socket, keepalive: KeepaliveConfig) -> None:
    """SO_KEEPALIVE with our idle/interval/count, TCP_USER_TIMEOUT, and TCP_NODELAY: a dead path
    shows within seconds instead of the OS default of over two hours (docs/drops.md)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    _set_tcp(sock, "TCP_KEEPIDLE", max(1, round(keepalive.idle_s)))
    _set_tcp(sock, "TCP_KEEPINTVL", max(1, round(keepalive.interval_s)))
    _set_tcp(sock, "TCP_KEEPCNT", max(1, int(keepalive.count)))
    user_timeout_ms = round(keepalive.effective_user_timeout_s * 1000)
    if user_timeout_ms > 0:
        _set_tcp(sock, "TCP_USER_TIMEOUT", user_timeout_ms)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_tcp(sock: socket.socket, option: str, value: int) -> None:
    number = getattr(socket, option, None)
    if number is None and option == "TCP_KEEPIDLE":
        number = getattr(socket, "TCP_KEEPALIVE", None)  # macOS spells it so
    if number is not None:
        sock.setsockopt(socket.IPPROTO_TCP, number, value)


_READBACK = (
    ("keepalive", "SOL_SOCKET", "SO_KEEPALIVE"),
    ("keepidle_s", "IPPROTO_TCP", "TCP_KEEPIDLE"),
    ("keepintvl_s", "IPPROTO_TCP", "TCP_KEEPINTVL"),
    ("keepcnt", "IPPROTO_TCP", "TCP_KEEPCNT"),
    ("user_timeout_ms", "IPPROTO_TCP", "TCP_USER_TIMEOUT"),
    ("nodelay", "IPPROTO_TCP", "TCP_NODELAY"),
)


def keepalive_readback(sock: socket.socket) -> dict[str, int]:
    """The options as the kernel holds them on a live socket (works on the loop's socket wrapper
    from transport.get_extra_info("socket") too); options the platform lacks are left out."""
    out: dict[str, int] = {}
    for key, level_name, option_name in _READBACK:
        option = getattr(socket, option_name, None)
        if option is None:
            continue
        try:
            out[key] = sock.getsockopt(getattr(socket, level_name), option)
        except OSError:
            continue
    return out


# struct tcp_info from linux/tcp.h, in kernel order; the kernel returns a prefix on older
# versions, so only the fields it filled are reported. Times are microseconds (rtt, rto) or
# milliseconds (last_*), as the kernel gives them.
_TCP_INFO_FIELDS: tuple[tuple[str, str], ...] = (
    ("state", "B"),
    ("ca_state", "B"),
    ("retransmits", "B"),
    ("probes", "B"),
    ("backoff", "B"),
    ("options", "B"),
    ("wscale", "B"),
    ("flags", "B"),
    ("rto", "I"),
    ("ato", "I"),
    ("snd_mss", "I"),
    ("rcv_mss", "I"),
    ("unacked", "I"),
    ("sacked", "I"),
    ("lost", "I"),
    ("retrans", "I"),
    ("fackets", "I"),
    ("last_data_sent", "I"),
    ("last_ack_sent", "I"),
    ("last_data_recv", "I"),
    ("last_ack_recv", "I"),
    ("pmtu", "I"),
    ("rcv_ssthresh", "I"),
    ("rtt", "I"),
    ("rttvar", "I"),
    ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"),
    ("advmss", "I"),
    ("reordering", "I"),
    ("rcv_rtt", "I"),
    ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"),
    ("max_pacing_rate", "Q"),
    ("bytes_acked", "Q"),
    ("bytes_received", "Q"),
    ("segs_out", "I"),
    ("segs_in", "I"),
    ("notsent_bytes", "I"),
    ("min_rtt", "I"),
    ("data_segs_in", "I"),
    ("data_segs_out", "I"),
    ("delivery_rate", "Q"),
    ("busy_time", "Q"),
    ("rwnd_limited", "Q"),
    ("sndbuf_limited", "Q"),
    ("delivered", "I"),
    ("delivered_ce", "I"),
    ("bytes_sent", "Q"),
    ("bytes_retrans", "Q"),
    ("dsack_dups", "I"),
    ("reord_seen", "I"),
    ("rcv_ooopack", "I"),
    ("snd_wnd", "I"),
)
_TCP_INFO_MAX = struct.calcsize("=" + "".join(f for _, f in _TCP_INFO_FIELDS))


def tcp_info(sock: socket.socket) -> dict[str, int] | None:
    """Linux TCP_INFO of a live socket (retransmits, probes, rtt, ...); None where unavailable.

    `wscale` is split into snd_wscale and rcv_wscale (two 4-bit fields in the kernel struct).
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_MAX)
    except (OSError, TypeError):
        return None
    out: dict[str, int] = {}
    offset = 0
    for name, fmt in _TCP_INFO_FIELDS:
        size = struct.calcsize("=" + fmt)
        if offset + size > len(raw):
            break
        (out[name],) = struct.unpack_from("=" + fmt, raw, offset)
        offset += size
    if not out:
        return None
    wscale = out.pop("wscale", None)
    if wscale is not None:
        out["snd_wscale"], out["rcv_wscale"] = wscale & 0x0F, wscale >> 4
    out.pop("flags", None)
    return out
