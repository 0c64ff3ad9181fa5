"""The one typed configuration model: frozen values, units in field names.

Everything else reads these; only `load.py` builds them from files, environment and flags, and
only `conninfo.py` builds an `UpstreamTarget` from a libpq connection string.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class SslMode(enum.Enum):
    """libpq's sslmode values, spelled exactly as libpq spells them (PostgreSQL docs 34.19.1)."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class TargetSessionAttrs(enum.Enum):
    """libpq's target_session_attrs values, spelled as libpq spells them (PostgreSQL docs 34.1.2):
    which kind of server a connection attempt accepts, tried host by host."""

    ANY = "any"
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"
    PRIMARY = "primary"
    STANDBY = "standby"
    PREFER_STANDBY = "prefer-standby"


class LoadBalanceHosts(enum.Enum):
    """libpq 16's load_balance_hosts values (PostgreSQL docs 34.1.2): try the hosts in the given
    order, or in a random order chosen once per connection."""

    DISABLE = "disable"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class UpstreamHost:
    """One entry of libpq's host / hostaddr / port lists.

    `host` is a name, an IP literal, or a unix socket directory (starts with '/'): what TLS
    verifies and SNI sends. `hostaddr` is a numeric address to dial instead of resolving `host`
    (libpq's hostaddr); with it the connection is TCP even when `host` starts with '/'.
    """

    host: str
    port: int
    hostaddr: str | None = None

    @property
    def is_unix_socket(self) -> bool:
        """libpq: a host starting with a slash is a socket directory, unless hostaddr is given
        (PostgreSQL docs 34.1.2)."""
        return self.hostaddr is None and self.host.startswith("/")

    def label(self) -> str:
        """ "host:port", or "host (hostaddr):port" when a different address is dialled; an IPv6
        literal is bracketed. For logs and `pgsidecar check`."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("/") else self.host
        if self.hostaddr is not None and self.hostaddr != self.host:
            host = f"{host} ({self.hostaddr})"
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and how to reach the real PostgreSQL server, in libpq's terms.

    `hosts` is libpq's host list in the given order (host, hostaddr and port zipped together);
    built without it, it is the one host `host`/`port`/`hostaddr`. `host`, `port` and `hostaddr`
    are always the first entry's; `at(i)` gives a single-host copy for entry i. `dbname` and
    `user` None mean "whatever the client asked for". The password never shows in repr or logs.
    """

    host: str
    port: int = 5432
    dbname: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sslmode: SslMode = SslMode.PREFER
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslsni: bool = True
    connect_timeout_s: float | None = None
    application_name: str | None = None
    options: str | None = None
    hostaddr: str | None = None
    hosts: tuple[UpstreamHost, ...] = ()
    target_session_attrs: TargetSessionAttrs = TargetSessionAttrs.ANY
    load_balance_hosts: LoadBalanceHosts = LoadBalanceHosts.DISABLE

    def __post_init__(self) -> None:
        first = UpstreamHost(self.host, self.port, self.hostaddr)
        if not self.hosts:
            object.__setattr__(self, "hosts", (first,))
            return
        object.__setattr__(self, "hosts", tuple(self.hosts))
        if self.hosts[0] != first:
            raise ValueError(f"host, port and hostaddr must be the first of hosts: {first} is not {self.hosts[0]}")

    @property
    def is_unix_socket(self) -> bool:
        """The first host's: a socket directory (starts with '/') and no hostaddr (34.1.2)."""
        return self.hosts[0].is_unix_socket

    def at(self, index: int) -> UpstreamTarget:
        """A single-host copy for `hosts[index]`, everything else the same: what one dial uses."""
        entry = self.hosts[index]
        return replace(self, host=entry.host, port=entry.port, hostaddr=entry.hostaddr, hosts=(entry,))

    def redacted(self) -> str:
        """A key=value connection string for logs that parse_conninfo reads back to an equal
        target (all hosts); it never contains the password."""
        ports = {h.port for h in self.hosts}
        parts: list[tuple[str, str | None]] = [
            ("host", ",".join(h.host for h in self.hosts)),
            ("hostaddr", None),
            ("port", str(self.port) if len(ports) == 1 else ",".join(str(h.port) for h in self.hosts)),
        ]
        if any(h.hostaddr is not None for h in self.hosts):
            parts[1] = ("hostaddr", ",".join(h.hostaddr or "" for h in self.hosts))
        parts += [
            ("dbname", self.dbname),
            ("user", self.user),
            ("sslmode", self.sslmode.value),
            ("sslrootcert", self.sslrootcert),
            ("sslcert", self.sslcert),
            ("sslkey", self.sslkey),
            ("sslsni", None if self.sslsni else "0"),
            ("connect_timeout", _seconds_text(self.connect_timeout_s)),
            ("application_name", self.application_name),
            ("options", self.options),
            ("target_session_attrs", _unless_default(self.target_session_attrs, TargetSessionAttrs.ANY)),
            ("load_balance_hosts", _unless_default(self.load_balance_hosts, LoadBalanceHosts.DISABLE)),
        ]
        return " ".join(f"{k}={quote_conninfo_value(v)}" for k, v in parts if v is not None)


def _unless_default(value: enum.Enum, default: enum.Enum) -> str | None:
    return None if value is default else str(value.value)


def quote_conninfo_value(value: str) -> str:
    """Quote a value the way libpq's key=value parser reads it back (PostgreSQL docs 34.1.1.1):
    single quotes around empty values or values with spaces, quotes and backslashes escaped."""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _seconds_text(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return str(int(seconds)) if float(seconds).is_integer() else repr(seconds)


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    """TCP keepalive for the upstream socket: aggressive, so a dead path shows in seconds."""

    idle_s: float = 10.0
    interval_s: float = 5.0
    count: int = 3
    user_timeout_s: float | None = None

    @property
    def effective_user_timeout_s(self) -> float:
        """TCP_USER_TIMEOUT: as set, else idle + interval x count - 0.5 s (Odyssey's rule), so
        unacknowledged data fails the socket at about the moment keepalive would."""
        if self.user_timeout_s is not None:
            return self.user_timeout_s
        return self.idle_s + self.interval_s * self.count - 0.5


SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
# Linux's own net.core.somaxconn default since 5.4, for when /proc cannot tell us.
FALLBACK_BACKLOG = 4096


def kernel_somaxconn(path: str = SOMAXCONN_PATH) -> int:
    """net.core.somaxconn: the kernel silently caps every listen() backlog at it, so asking for
    exactly this much gets the largest accept queue the host allows. FALLBACK_BACKLOG if the file
    is missing or unreadable (not Linux, a sandbox without /proc)."""
    try:
        with open(path, encoding="ascii") as handle:
            value = int(handle.read().strip())
    except (OSError, ValueError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where applications connect to pgsidecar, and the limits on what they may send.
    `backlog` None means the kernel's somaxconn, read when the listeners start."""

    host: str = "127.0.0.1"
    port: int = 6432
    unix_socket_dir: str | None = None
    tls: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    max_clients: int = 1000
    startup_timeout_s: float = 10.0
    max_message_bytes: int = 1073741823
    backlog: int | None = None

    @property
    def effective_backlog(self) -> int:
        """The listen() backlog: as set, else the kernel's somaxconn (read now, at each call)."""
        return self.backlog if self.backlog is not None else kernel_somaxconn()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The real server and how the connection to it is kept alive and checked."""

    target: UpstreamTarget
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    check_after_idle_s: float | None = None
    # Close the upstream of a session idle this long (between transactions, rebuildable state
    # only); its next request reconnects and replays. None: never.
    park_after_s: float | None = None


AUTH_MODES = ("passthrough", "configured")
CLIENT_AUTH_MODES = ("trust", "scram")
# auth.token: the cloud whose own library mints the upstream password (an optional extra each).
TOKEN_PROVIDERS = ("aws", "gcp", "azure")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How pgsidecar authenticates upstream (`mode`) and how it checks local clients
    (`client_auth`, used in `configured` mode). Secrets never show in repr.

    In `configured` mode the upstream password is `password` (or `password_file`'s content),
    or fetched afresh for every upstream connect: `password_command`'s stdout (cached for
    `password_command_ttl_s`; 0 runs it every time) or a cloud IAM token (`token`)."""

    mode: str = "passthrough"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    client_auth: str = "trust"
    client_password: str | None = field(default=None, repr=False)
    password_command: tuple[str, ...] | None = field(default=None, repr=False)  # argv, run without a shell
    password_command_timeout_s: float = 10.0
    password_command_ttl_s: float = 0.0
    token: str | None = None  # one of TOKEN_PROVIDERS
    token_region: str | None = None  # aws: the region the token is signed for (default: AWS_REGION, botocore's)


TRANSACTION_LOSS_ACTIONS = ("error", "close")


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    """How long and how hard to try for a new upstream connection after a drop."""

    deadline_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    max_concurrent: int = 8
    on_transaction_loss: str = "error"
    max_buffered_bytes: int = 1048576


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Backpressure: stop reading one side above high water, resume below low water."""

    high_water_bytes: int = 262144
    low_water_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class DropLogConfig:
    """Where drop records go: None is off, "-" is stderr, else a file rotated by size."""

    path: str | None = None
    max_bytes: int = 104857600
    backups: int = 5


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The HTTP listener for /metrics and health endpoints; None turns it off."""

    listen: str | None = "127.0.0.1:9188"


LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Process log format ("auto" is text on a terminal, JSON otherwise) and level."""

    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """How long a drain may take on SIGTERM before remaining clients are closed."""

    grace_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. Keyword-only: only `upstream` has no default."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig
    auth: AuthConfig = field(default_factory=AuthConfig)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    drop_log: DropLogConfig = field(default_factory=DropLogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    sidecar_id: str | None = None
