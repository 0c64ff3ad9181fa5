"""Commands the brain gives the runtime. The runtime carries them out in order and decides nothing."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pgsidecar.drops.record import DropFacts as DropFacts  # re-exported: runtime/ cannot see drops/
from pgsidecar.wire import backend as be
from pgsidecar.wire.frames import MessageBuffer


class TimerName(enum.StrEnum):
    STARTUP = "startup"  # listen.startup_timeout: startup packets and the client's password
    BACKOFF = "backoff"  # the jittered wait before the next reconnect attempt
    DEADLINE = "deadline"  # reconnect.deadline: give up and tell the client
    PARK = "park"  # upstream.park_after: is the session idle enough to park? (one per session)


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def error_codes(data: bytes) -> tuple[str, ...]:
    """The SQLSTATEs of the ErrorResponses in bytes pgsidecar wrote itself (whole messages)."""
    messages = MessageBuffer(len(data), client=False)
    messages.feed(data)
    codes = []
    while (message := messages.next()) is not None:
        if message[0] == be.ErrorResponse.TYPE[0]:
            code = be.ErrorResponse.decode(message[1]).code
            if code:
                codes.append(code)
    return tuple(codes)


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Bytes for the client. ``errors``: the SQLSTATEs of the ErrorResponses pgsidecar wrote
    itself into them (``mine``), for the error counters; relayed server data has none."""

    data: bytes
    errors: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def mine(cls, data: bytes) -> SendToClient:
        """Bytes pgsidecar wrote itself (its own errors, or the server's words it passes on as
        its verdict): their ErrorResponses are counted. Kept off the relay's hot path."""
        return cls(data, error_codes(data))


@dataclass(frozen=True, slots=True)
class SendToServer:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Write ``S`` to the client, then start the TLS handshake on the client socket."""


@dataclass(frozen=True, slots=True)
class OpenServer:
    """Open the upstream socket: over TLS or not (None: as sslmode says, for callers without a
    policy), and under sslmode=prefer, whether a failed handshake is retried in plaintext on each
    address (libpq's rule; the brain decides it from the policy). ``reconnect`` marks an
    established session's reconnect, which the runtime serves before first logins.

    ``host`` indexes the upstream's host list (libpq multi-host); the runtime resolves that host
    again and tries its addresses in order (shuffled when ``shuffle``), except those in ``avoid``:
    the brain found the wrong role there in this pass (target_session_attrs)."""

    use_tls: bool | None = None
    plaintext_retry: bool = False
    reconnect: bool = False
    host: int = 0
    avoid: frozenset[str] = frozenset()
    shuffle: bool = False


@dataclass(frozen=True, slots=True)
class CloseServer:
    # True when the server is mid-reply: a TLS close would wait for a close_notify the busy
    # backend never sends (uvloop gives up after 30 s), so reset the socket and free it now.
    abort: bool = False


@dataclass(frozen=True, slots=True)
class CloseClient:
    pass


@dataclass(frozen=True, slots=True)
class PauseClient:
    """Stop reading the client until ResumeClient (bounded buffering while the upstream is away)."""


@dataclass(frozen=True, slots=True)
class ResumeClient:
    pass


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: TimerName
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: TimerName


@dataclass(frozen=True, slots=True)
class RecordDrop:
    """One upstream connection ended without the client asking: its facts, to classify and write."""

    drop: DropFacts


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    message: str


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """A CancelRequest arrived on a new client socket: cancel the session that owns this key."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class RegisterCancelKey:
    """The key this client was given: cancel requests naming it belong to this session."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class NoteUpstream:
    """The server a login reached, and whether its role fits target_session_attrs: for the
    upstream role gauge and the role-mismatch counter."""

    host: str
    address: str
    role: str  # relay/hosts.py Role.name
    fits: bool


@dataclass(frozen=True, slots=True)
class NoteParking:
    """The session parked (its upstream closed by pgsidecar while idle) or unparked, for the
    parking metrics. ``unpark_s``: from the client's first byte to the replay done."""

    parked: bool
    unpark_s: float | None = None


@dataclass(frozen=True, slots=True)
class SendCancel:
    """Cancel the request running on the backend that serves the session now (its real key),
    at the host and address that serve it."""

    pid: int
    secret: bytes
    host: int = 0
    address: str | None = None


Command = (
    SendToClient
    | SendToServer
    | StartClientTLS
    | OpenServer
    | CloseServer
    | CloseClient
    | PauseClient
    | ResumeClient
    | SetTimer
    | CancelTimer
    | RecordDrop
    | Log
    | ForwardCancel
    | RegisterCancelKey
    | SendCancel
    | NoteUpstream
    | NoteParking
)
