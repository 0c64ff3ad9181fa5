"""Events the runtime feeds to the brain. Each carries ``now`` (monotonic seconds) and, where a
wall-clock time matters for records, ``wall`` (epoch seconds): the brain never reads a clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ClientConnected:
    now: float
    wall: float
    peer: str  # "127.0.0.1:53422" or "unix"
    trusted_transport: bool  # loopback or unix socket: cleartext passwords may cross it


@dataclass(frozen=True, slots=True)
class ClientTLSStarted:
    now: float


@dataclass(frozen=True, slots=True)
class ClientData:
    now: float
    data: bytes


@dataclass(frozen=True, slots=True)
class ClientClosed:
    now: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConnected:
    """The upstream socket (and TLS, if any) is up; the brain now speaks startup and auth."""

    now: float
    wall: float
    address: str
    tls: bool
    channel_binding: bytes | None  # RFC 5929 tls-server-end-point hash of the server certificate
    cert_fingerprint: str | None = None
    facts: dict = field(default_factory=dict)  # UpstreamFacts as a dict, for drop records
    cert_der: bytes | None = None  # the server certificate; the brain derives channel binding from it


@dataclass(frozen=True, slots=True)
class ServerConnectFailed:
    now: float
    kind: str  # UpstreamError.kind: refused, timeout, unreachable, dns, tls, ...
    message: str
    errno_name: str | None = None


@dataclass(frozen=True, slots=True)
class ServerData:
    now: float
    data: bytes


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The upstream connection ended, as the socket told it."""

    now: float
    wall: float
    kind: str  # "eof", "reset", "timeout", "unreachable", "tls_error", "other"
    errno_name: str | None = None
    tls_close_notify: bool | None = None
    detail: str | None = None
    tcp_info: dict | None = None


@dataclass(frozen=True, slots=True)
class Timer:
    now: float
    wall: float
    name: str


Event = (
    ClientConnected
    | ClientTLSStarted
    | ClientData
    | ClientClosed
    | ServerConnected
    | ServerConnectFailed
    | ServerData
    | ServerClosed
    | Timer
)
