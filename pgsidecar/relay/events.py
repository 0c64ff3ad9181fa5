"""Events the runtime feeds to the brain. Each carries ``now`` (monotonic seconds) and, where a
wall-clock time matters for records, ``wall`` (epoch seconds): the brain never reads a clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from pgsidecar.relay.commands import TimerName
from pgsidecar.wire.ending import SocketEnd


@dataclass(frozen=True, slots=True)
class ClientConnected:
    now: float
    wall: float
    peer: str  # "127.0.0.1:53422" or "unix"
    trusted_transport: bool  # loopback or unix socket: cleartext passwords may cross it
    refusal: tuple[str, str] | None = None  # (SQLSTATE, text): the listener cannot take it


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


class ConnectionFacts(TypedDict, total=False):
    """What the runtime knows of a new upstream socket, kept for the drop record's "upstream"."""

    host: str | None
    address: str | None
    port: int | None
    tls: bool
    tls_version: str | None
    tls_cipher: str | None
    cert_fingerprint: str | None
    cert_not_after: float | None


@dataclass(frozen=True, slots=True)
class ServerConnected:
    """The upstream socket (and TLS, if any) is up; the brain now speaks startup and auth."""

    now: float
    wall: float
    address: str
    tls: bool
    channel_binding: bytes | None  # RFC 5929 tls-server-end-point hash of the server certificate
    cert_fingerprint: str | None = None
    facts: ConnectionFacts = field(default_factory=lambda: ConnectionFacts())
    cert_der: bytes | None = None  # the server certificate; the brain derives channel binding from it
    # configured mode: the password fetched for this connect (auth.password_command, auth.token).
    password: str | None = field(default=None, repr=False)


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
    kind: SocketEnd
    errno_name: str | None = None
    tls_close_notify: bool | None = None
    detail: str | None = None
    tcp_info: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class Timer:
    now: float
    wall: float
    name: TimerName


@dataclass(frozen=True, slots=True)
class Drain:
    """Shutdown: close idle sessions now, busy ones at their next idle point."""

    now: float


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A CancelRequest on another socket named this session's key."""

    now: float


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
    | Drain
    | CancelRequested
)
