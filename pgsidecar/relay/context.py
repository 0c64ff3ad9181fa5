"""What the handlers of one session share: its policy, identity, books, clocks and held bytes.

Each handler (startup, login, relaying, reconnect) owns its own flags and scanners; whatever two
of them must both see lives here, declared and typed, and nowhere else. The phase lives here too,
changed only through ``goto`` (the transition table of relay/phases.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pgsidecar.relay import commands as cmd
from pgsidecar.relay.dropbook import DropTracker
from pgsidecar.relay.events import ConnectionFacts
from pgsidecar.relay.hosts import Attrs, HostWalk, Role
from pgsidecar.relay.internal import InternalReplies
from pgsidecar.relay.phases import Phase, check_transition
from pgsidecar.relay.recovery import GroupAbort, LocalAbortResponder, error_bytes
from pgsidecar.session.pending import PendingReplies
from pgsidecar.session.state import ServerFacts, SessionBook
from pgsidecar.wire import backend as be


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The parts of the configuration one session needs (relay/ does not import config/)."""

    client_tls: bool = True
    max_message_bytes: int = 1073741823
    startup_timeout_s: float = 10.0
    reconnect_deadline_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    on_transaction_loss: str = "error"
    max_buffered_bytes: int = 1 << 20
    max_inflight_copy_bytes: int = 1 << 20
    upstream_user: str | None = None  # auth.mode configured: the upstream credentials
    upstream_password: str | None = None
    upstream_dbname: str | None = None
    application_name: str | None = None
    check_after_idle_s: float | None = None
    client_auth: str = "trust"  # configured mode: "trust" (loopback only) or "scram" against client_password
    client_password: str | None = None
    allow_tls_retry: bool = False  # sslmode=allow: a plaintext login the server rejects is retried over TLS
    # How to open the upstream (libpq sslmode): TLS first or not (None: let the runtime read
    # sslmode), and sslmode=prefer's plaintext retry after a failed handshake.
    open_tls: bool | None = None
    plaintext_retry: bool = False
    # libpq multi-host: how many hosts the upstream lists, the role a session needs, and
    # load_balance_hosts=random (relay/hosts.py).
    host_count: int = 1
    target_session_attrs: Attrs = Attrs.ANY
    load_balance: bool = False
    # upstream.park_after: close the upstream of a session idle this long (None: never).
    park_after_s: float | None = None


@dataclass(slots=True)
class SessionContext:
    """The shared state of one session. Handlers read and write it; only ``goto`` moves the phase."""

    policy: SessionPolicy
    secret: bytes  # pgsidecar's own cancel key for this client
    rng: random.Random
    phase: Phase = Phase.STARTUP
    # Who the client is, and what it was told.
    peer: str = ""
    trusted_transport: bool = False
    client_tls: bool = False
    params: dict[str, str] = field(default_factory=dict)  # startup parameters sent upstream, byte for byte
    password: str | None = None
    client_params: dict[str, str] = field(default_factory=dict)  # ParameterStatus values the client has
    first_backend_pid: int = 0
    backend_key: tuple[int, bytes] = (0, b"")  # the backend serving the session now
    # The books: replies owed, session state, pgsidecar's own queries, the drop in progress.
    pending: PendingReplies = field(default_factory=PendingReplies)
    book: SessionBook = field(default_factory=SessionBook)
    internal: InternalReplies = field(default_factory=InternalReplies)
    drops: DropTracker = field(default_factory=DropTracker)
    facts: ConnectionFacts = field(default_factory=lambda: ConnectionFacts())  # the upstream socket's, for records
    server_facts: ServerFacts | None = None  # what the server said of itself after login
    # Clocks (monotonic seconds from the events; the brain never reads a clock).
    now: float = 0.0
    connected_wall: float = 0.0
    connected_at: float = 0.0
    last_server_at: float = 0.0
    last_client_at: float = 0.0
    # Client bytes waiting for the upstream (reconnecting, or pgsidecar's own query owed).
    held: list[bytes] = field(default_factory=list)
    held_bytes: int = 0
    paused: bool = False
    # Client bytes since the last idle point (None once more than max_inflight_copy_bytes).
    inflight: list[bytes] | None = field(default_factory=list)
    inflight_bytes: int = 0
    inflight_commit: bool = False  # a request that may commit is among them
    messages_at_request: int = 0  # server messages seen when the request began
    # The server's last words before it closed.
    last_fatal: be.ErrorResponse | None = None
    last_fatal_raw: bytes = b""
    last_notice: be.NoticeResponse | None = None
    client_terminated: bool = False  # the client sent Terminate: a close that follows is no drop
    # Answers a client whose transaction (or request group) the drop cut off.
    responder: LocalAbortResponder | GroupAbort | None = None
    # Where connects go (libpq multi-host) and what the serving server is.
    walk: HostWalk = field(default_factory=HostWalk)
    role: Role = field(default_factory=Role)
    role_lost: str | None = None  # a writer the session needs is a writer no more: why

    def goto(self, phase: Phase) -> None:
        """The one way the phase changes (relay/phases.py TRANSITIONS)."""
        check_transition(self.phase, phase)
        self.phase = phase

    def open_server(self, *, reconnect: bool) -> cmd.OpenServer:
        """A new upstream connection, TLS as the policy says (sslmode)."""
        policy = self.policy
        return cmd.OpenServer(
            use_tls=policy.open_tls,
            plaintext_retry=policy.plaintext_retry,
            reconnect=reconnect,
            host=self.walk.host,
            avoid=frozenset(self.walk.avoid),
            shuffle=policy.load_balance,
        )

    def hold(self, data: bytes) -> list[cmd.Command]:
        """Keep client bytes until the upstream can take them; past max_buffered, stop reading."""
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes > self.policy.max_buffered_bytes and not self.paused:
            self.paused = True
            return [cmd.PauseClient()]
        return []

    def fatal_to_client(self, code: str, message: str, *, log: str | None = None) -> list[cmd.Command]:
        """End the session with a FATAL of pgsidecar's own (a client's protocol error, a refusal)."""
        self.goto(Phase.CLOSED)
        out: list[cmd.Command] = [
            cmd.SendToClient.mine(error_bytes("FATAL", code, message)),
            cmd.CloseClient(),
            cmd.CloseServer(),
        ]
        if log:
            out.append(cmd.Log(cmd.LogLevel.INFO, f"{self.peer}: {log}"))
        return out
