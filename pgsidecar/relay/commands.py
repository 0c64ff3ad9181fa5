"""Commands the brain gives the runtime. The runtime carries them out in order and decides nothing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartClientTLS:
    """Write ``S`` to the client, then start the TLS handshake on the client socket."""


@dataclass(frozen=True, slots=True)
class OpenServer:
    """Open the upstream socket; ``use_tls`` None means "as sslmode says". ``reconnect`` marks an
    established session's reconnect, which the runtime serves before first logins."""

    use_tls: bool | None = None
    reconnect: bool = False


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
    name: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class RecordDrop:
    """One upstream connection ended without the client asking; ``drop`` is a DropInfo."""

    drop: object


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # "debug", "info", "warning", "error"
    message: str


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """A CancelRequest arrived on a new client socket: cancel the session that owns this key."""

    pid: int
    secret: bytes


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
)
