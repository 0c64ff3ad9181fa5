"""Where the upstream password comes from in `configured` mode, fetched right before every
upstream connect (the first login and every reconnect): a fixed secret, a command's stdout
(`auth.password_command`), or a cloud IAM token minted by the cloud's own library (`auth.token`).

The driver asks its `PasswordSource` before it dials and hands the answer to the brain in
`ServerConnected.password`; a failure becomes `ServerConnectFailed(kind="auth")`, retried with
backoff like any other connect error. Secrets never reach a log line, an exception message or a
repr. The cloud libraries are optional extras, imported on first use; their calls block (files,
HTTP to metadata endpoints and STS), so they run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from pgsidecar.config.model import AuthConfig, UpstreamTarget

log = logging.getLogger("pgsidecar.credentials")

#: How much of a failing command's stderr goes into the log line.
STDERR_LOG_CHARS = 500
#: RDS IAM tokens are valid 15 minutes (generate_db_auth_token's default ExpiresIn=900): one is
#: used for connects in its first 10 and then minted again, so a login never carries a stale one.
AWS_TOKEN_REUSE_S = 600.0
#: OAuth2 access tokens (Cloud SQL, Entra ID) carry their expiry: reused until 5 minutes before it.
TOKEN_EXPIRY_MARGIN_S = 300.0
#: Cloud SQL IAM database authentication (Google's "Log in with IAM database authentication").
GCP_SCOPES = ("https://www.googleapis.com/auth/sqlservice.login",)
#: Azure Database for PostgreSQL flexible server, Microsoft Entra authentication.
AZURE_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"

_EXTRAS = {"aws": "botocore", "gcp": "google-auth", "azure": "azure-identity"}


class CredentialError(Exception):
    """No password for this connect. The message says why and never contains a secret."""


class PasswordSource(Protocol):
    """The upstream password for one connect to `host`:`port` (the host as configured, which
    TLS verifies and an RDS token is signed for)."""

    async def password(self, host: str, port: int) -> str: ...


def password_source(auth: AuthConfig, target: UpstreamTarget) -> PasswordSource | None:
    """The source `auth` configures, or None: passthrough mode (the client's own password goes
    upstream), or configured mode without any password (the server trusts the user)."""
    if auth.mode != "configured":
        return None
    if auth.password_command is not None:
        return CommandPassword(auth.password_command, auth.password_command_timeout_s, auth.password_command_ttl_s)
    user = auth.user or target.user or ""
    if auth.token == "aws":
        return AwsRdsToken(user, auth.token_region)
    if auth.token == "gcp":
        return GcpToken()
    if auth.token == "azure":
        return AzureToken()
    password = auth.password or target.password
    return StaticPassword(password) if password is not None else None


def _missing_extra(provider: str) -> CredentialError:
    return CredentialError(
        f"auth.token is {provider} but {_EXTRAS[provider]} is not installed: pip install 'pgsidecar[{provider}]'"
    )


def _short(text: str, limit: int = STDERR_LOG_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class StaticPassword:
    """auth.password, auth.password_file, or the password in upstream.dsn / PGPASSWORD."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __repr__(self) -> str:
        return "StaticPassword(<hidden>)"

    async def password(self, host: str, port: int) -> str:
        return self._secret


class CommandPassword:
    """auth.password_command: run `argv` (no shell, stdin closed, in a session of its own so a
    timeout kills its children too); its stdout less the trailing newline is the password.

    A non-zero exit, a timeout or empty output fails the connect: the log line gets the exit
    status and the start of stderr, never stdout. With `ttl_s` > 0 one answer serves every
    connect for that long (concurrent connects wait for one run); 0 runs it for every connect.
    """

    def __init__(
        self,
        argv: tuple[str, ...],
        timeout_s: float = 10.0,
        ttl_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = argv
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._cached: tuple[str, float] | None = None  # (password, when it was read)
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"CommandPassword({self.program!r}, timeout_s={self.timeout_s}, ttl_s={self.ttl_s})"

    @property
    def program(self) -> str:
        """The program's file name, for messages (its arguments may hold a secret)."""
        return os.path.basename(self.argv[0])

    async def password(self, host: str, port: int) -> str:
        if self.ttl_s <= 0:
            return await self._run()
        async with self._lock:
            cached = self._cached
            if cached is not None and self._clock() - cached[1] < self.ttl_s:
                return cached[0]
            secret = await self._run()
            self._cached = (secret, self._clock())
            return secret

    async def _run(self) -> str:
        what = f"auth.password_command ({self.program})"
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise self._failed(f"{what} could not start: {exc.strerror or type(exc).__name__}", b"") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            await _kill_group(proc)
            raise self._failed(f"{what} timed out after {self.timeout_s:g}s and was killed", b"") from None
        except asyncio.CancelledError:  # the session ended while it ran: leave no orphans
            await _kill_group(proc)
            raise
        if proc.returncode != 0:
            code = proc.returncode
            status = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
            raise self._failed(f"{what} {status}", err)
        try:
            secret = out.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise self._failed(f"{what} printed a password that is not UTF-8", err) from None
        if not secret:
            raise self._failed(f"{what} printed no password", err)
        return secret

    @staticmethod
    def _failed(message: str, stderr: bytes) -> CredentialError:
        excerpt = _short(stderr.decode("utf-8", "replace")) if stderr.strip() else "(empty)"
        log.warning("%s; stderr: %s", message, excerpt)
        return CredentialError(message)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command and whatever it started (its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        await asyncio.wait_for(proc.wait(), 5.0)
    except TimeoutError:
        log.warning("auth.password_command: pid %d did not exit after SIGKILL", proc.pid)


class _Token:
    """A cloud token, minted in a worker thread one at a time and cached per key until its
    refresh time (wall-clock seconds, as the providers state expiry)."""

    provider = ""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[str, float]] = {}  # key -> (token, refresh at)
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _key(self, host: str, port: int) -> tuple[str, int]:
        return ("", 0)  # the same token serves every host

    def _mint(self, host: str, port: int) -> tuple[str, float]:
        """(token, refresh at): blocking, called in a worker thread."""
        raise NotImplementedError

    async def password(self, host: str, port: int) -> str:
        key = self._key(host, port)
        async with self._lock:
            cached = self._cache.get(key)
            if cached is not None and self._clock() < cached[1]:
                return cached[0]
            loop = asyncio.get_running_loop()
            try:
                token, refresh_at = await loop.run_in_executor(None, self._mint, host, port)
            except CredentialError as exc:
                log.warning("%s", exc)
                raise
            except Exception as exc:  # noqa: BLE001 - each library raises its own types; the connect fails, retried
                message = f"auth.token {self.provider}: no token: {type(exc).__name__}: {_short(str(exc))}"
                log.warning("%s", message)
                raise CredentialError(message) from None
            if not token:
                raise CredentialError(f"auth.token {self.provider}: the provider returned an empty token")
            self._cache[key] = (token, refresh_at)
            return token


class AwsRdsToken(_Token):
    """RDS / Aurora IAM authentication: botocore's `generate_db_auth_token` for the host, port,
    user and region (a SigV4-presigned URL, signed locally). Credentials come from botocore's
    standard chain: environment, shared config and SSO, web identity (IRSA), ECS and EC2 roles."""

    provider = "aws"

    def __init__(self, user: str, region: str | None = None, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.user = user
        self.region = region
        self._client: Any = None

    def _key(self, host: str, port: int) -> tuple[str, int]:
        return (host, port)  # the token is signed for one host and port

    def _rds_client(self) -> Any:
        if self._client is None:
            try:
                import botocore.session
            except ImportError:
                raise _missing_extra("aws") from None
            session = botocore.session.get_session()
            region = self.region or os.environ.get("AWS_REGION") or session.get_config_variable("region")
            if not region:
                raise CredentialError(
                    "auth.token aws: no region: set auth.token_region, AWS_REGION or a region in the AWS config"
                )
            self.region = str(region)
            self._client = session.create_client("rds", region_name=self.region)
        return self._client

    def _mint(self, host: str, port: int) -> tuple[str, float]:
        client = self._rds_client()
        token = client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=self.user, Region=self.region)
        return str(token), self._clock() + AWS_TOKEN_REUSE_S


class GcpToken(_Token):
    """Cloud SQL IAM database authentication: an OAuth2 access token from google-auth's
    application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's, workload
    identity, the metadata server), with the Cloud SQL login scope."""

    provider = "gcp"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self._credentials: Any = None

    def _mint(self, host: str, port: int) -> tuple[str, float]:
        try:
            import google.auth
            import google.auth.transport.requests
        except ImportError:
            raise _missing_extra("gcp") from None
        if self._credentials is None:
            self._credentials, _project = google.auth.default(scopes=list(GCP_SCOPES))
        credentials = self._credentials
        credentials.refresh(google.auth.transport.requests.Request())
        return str(credentials.token or ""), _refresh_at(credentials.expiry, self._clock())


def _refresh_at(expiry: datetime | None, now: float) -> float:
    """google-auth states expiry as a naive UTC datetime; None (unknown): not reused."""
    if expiry is None:
        return now
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=UTC)
    return expiry.timestamp() - TOKEN_EXPIRY_MARGIN_S


class AzureToken(_Token):
    """Azure Database for PostgreSQL flexible server, Microsoft Entra ID: an access token from
    azure-identity's `DefaultAzureCredential` (environment, workload identity, managed identity,
    Azure CLI, ...) for the scope the flexible server documents."""

    provider = "azure"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self._credential: Any = None

    def _mint(self, host: str, port: int) -> tuple[str, float]:
        if self._credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError:
                raise _missing_extra("azure") from None
            self._credential = DefaultAzureCredential()
        access = self._credential.get_token(AZURE_SCOPE)
        return str(access.token or ""), float(access.expires_on) - TOKEN_EXPIRY_MARGIN_S
