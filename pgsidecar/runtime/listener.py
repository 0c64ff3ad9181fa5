"""The Sidecar: listeners (TCP and unix), client limits, cancel routing, drop hand-off, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from pgsidecar.config.model import Config, LoadBalanceHosts, SslMode
from pgsidecar.observe.metrics import Tallies
from pgsidecar.relay import events as ev
from pgsidecar.relay.commands import DropFacts
from pgsidecar.relay.connection import SessionPolicy
from pgsidecar.relay.hosts import Attrs
from pgsidecar.runtime.credentials import PasswordSource, password_source
from pgsidecar.runtime.driver import ClientDriver
from pgsidecar.runtime.gate import ConnectGate
from pgsidecar.runtime.tls import local_server_context, upstream_context
from pgsidecar.runtime.upstream import UpstreamError, UpstreamFacts, open_upstream, pinned
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate

log = logging.getLogger("pgsidecar")


def policy_from_config(config: Config) -> SessionPolicy:
    auth = config.auth
    configured = auth.mode == "configured"
    target = config.upstream.target
    return SessionPolicy(
        client_tls=config.listen.tls,
        max_message_bytes=config.listen.max_message_bytes,
        startup_timeout_s=config.listen.startup_timeout_s,
        reconnect_deadline_s=config.reconnect.deadline_s,
        backoff_initial_s=config.reconnect.backoff_initial_s,
        backoff_max_s=config.reconnect.backoff_max_s,
        on_transaction_loss=config.reconnect.on_transaction_loss,
        max_buffered_bytes=config.reconnect.max_buffered_bytes,
        upstream_user=(auth.user or target.user) if configured else None,
        upstream_password=(auth.password or target.password) if configured else None,
        upstream_dbname=target.dbname if configured else None,
        application_name=target.application_name,
        check_after_idle_s=config.upstream.check_after_idle_s,
        client_auth=auth.client_auth,
        client_password=auth.client_password,
        allow_tls_retry=target.sslmode is SslMode.ALLOW,
        open_tls=target.sslmode not in (SslMode.DISABLE, SslMode.ALLOW),
        plaintext_retry=target.sslmode is SslMode.PREFER,
        host_count=len(target.hosts),
        target_session_attrs=Attrs(target.target_session_attrs.value),
        load_balance=target.load_balance_hosts is LoadBalanceHosts.RANDOM,
        park_after_s=config.upstream.park_after_s,
    )


class Sidecar:
    """Everything the client drivers share; built once by the app from the config."""

    def __init__(self, config: Config, *, on_drop: Callable[[ClientDriver, DropFacts], object] | None = None) -> None:
        self.config = config
        self.policy = policy_from_config(config)
        self.password_source = password_source(config.auth, config.upstream.target)
        self.target = config.upstream.target
        self.keepalive = config.upstream.keepalive
        self.client_tls_context = local_server_context(config.listen)
        self.upstream_tls_context = upstream_context(self.target)
        self.write_limits = (config.relay.high_water_bytes, config.relay.low_water_bytes)
        self.startup_timeout_s = config.listen.startup_timeout_s
        limit = config.reconnect.max_concurrent
        # Reconnects before first logins; at most limit + max(1, limit // 4) connects at once.
        self.connect_slots = ConnectGate(limit if limit > 0 else 1_000_000)
        self.drivers: set[ClientDriver] = set()
        self.cancels: set[asyncio.Task[None]] = set()  # in flight, held: the loop keeps tasks weakly
        self.by_key: dict[tuple[int, bytes], ClientDriver] = {}
        self.servers: list[asyncio.Server] = []
        self.on_drop = on_drop
        self.draining = False
        self.unix_path: str | None = None
        self.tally = Tallies()  # bytes and clients, bumped per batch, read by /metrics
        self.on_client_error: Callable[[str], None] | None = None  # SQLSTATE pgsidecar sent
        self.on_upstream: Callable[[bool, str | None], None] | None = None  # connect outcome
        self.on_role: Callable[[str, str, str, bool], None] | None = None  # a login's server and role
        self.on_parking: Callable[[bool, float | None], None] | None = None  # parked, or unparked in s
        self.parked: set[ClientDriver] = set()  # sessions parked (upstream.park_after), until unparked

    # ---------------------------------------------------------------- listeners
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        # listen.backlog, or the kernel's somaxconn read now: a burst of connects beyond the
        # accept queue loses SYNs, and each lost one costs its client a 1 s retransmit.
        backlog = listen.effective_backlog
        server = await loop.create_server(lambda: ClientDriver(self), listen.host, listen.port, backlog=backlog)
        self.servers.append(server)
        if listen.unix_socket_dir:
            path = os.path.join(listen.unix_socket_dir, f".s.PGSQL.{listen.port}")
            if os.path.exists(path):  # noqa: ASYNC240 - one stat of a local path, at start
                os.unlink(path)
            unix = await loop.create_unix_server(lambda: ClientDriver(self, unix=True), path, backlog=backlog)
            os.chmod(path, 0o777)
            self.unix_path = path
            self.servers.append(unix)

    @property
    def ports(self) -> list[int]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    out.append(name[1])
        return out

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for driver in list(self.drivers):
            if driver.client is not None:
                driver.client.close()
        for server in self.servers:
            await server.wait_closed()
        if self.unix_path and os.path.exists(self.unix_path):  # noqa: ASYNC240 - one stat, at stop
            os.unlink(self.unix_path)

    # ---------------------------------------------------------------- sessions
    def admit(self, driver: ClientDriver) -> tuple[str, str] | None:
        """Take the client, or say why not (SQLSTATE, text): the brain tells the client."""
        if self.draining:
            return sqlstate.ADMIN_SHUTDOWN, "the sidecar is shutting down"
        if len(self.drivers) >= self.config.listen.max_clients:
            return sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already"
        self.drivers.add(driver)
        self.tally.clients_total += 1
        return None

    def register(self, driver: ClientDriver, key: tuple[int, bytes]) -> None:
        self.by_key[key] = driver

    def unregister(self, driver: ClientDriver) -> None:
        self.drivers.discard(driver)
        self.parked.discard(driver)
        if driver.cancel_key is not None and self.by_key.get(driver.cancel_key) is driver:
            del self.by_key[driver.cancel_key]

    def password_source_for(self, policy: SessionPolicy) -> PasswordSource | None:
        """Where a session's connects get the upstream password: the current source, unless the
        session was opened (before a reload) in passthrough mode or for another upstream user;
        such a session keeps the password it has."""
        if policy.upstream_user is None or policy.upstream_user != self.policy.upstream_user:
            return None
        return self.password_source

    def connected_event(self, facts: UpstreamFacts, password: str | None = None) -> ev.ServerConnected:
        cert = facts.cert
        if cert is not None:
            self.tally.cert_not_after = cert.not_after
        if self.on_upstream is not None:
            self.on_upstream(True, None)
        record: ev.ConnectionFacts = {
            "host": facts.host,
            "address": facts.address,
            "port": facts.port,
            "tls": facts.tls,
            "tls_version": facts.tls_version,
            "tls_cipher": facts.tls_cipher,
            "cert_fingerprint": cert.fingerprint_sha256 if cert else None,
            "cert_not_after": cert.not_after if cert else None,
        }
        return ev.ServerConnected(
            time.monotonic(),
            time.time(),
            facts.address,
            facts.tls,
            None,
            cert.fingerprint_sha256 if cert else None,
            record,
            cert.der if cert else None,
            password,
        )

    def connect_failed(self, error: UpstreamError) -> None:
        if self.on_upstream is not None:
            self.on_upstream(False, str(error))

    def record_drop(self, driver: ClientDriver, info: DropFacts) -> None:
        if self.on_drop is not None:
            self.on_drop(driver, info)

    # ---------------------------------------------------------------- cancel
    def forward_cancel(self, pid: int, secret: bytes) -> None:
        """A CancelRequest arrived: the session that owns the key says where it goes."""
        driver = self.by_key.get((pid, secret))
        if driver is None:
            log.info("cancel request for an unknown session key ignored")
            return
        driver.cancel()

    def note_upstream(self, host: str, address: str, role: str, fits: bool) -> None:
        if self.on_role is not None:
            self.on_role(host, address, role, fits)

    def note_parking(self, driver: ClientDriver, parked: bool, unpark_s: float | None) -> None:
        """A session parked or unparked: the gauge counts the parked set at scrape time (a session
        that ends parked leaves it in unregister), the counters and histogram go to metrics."""
        if parked:
            self.parked.add(driver)
        else:
            self.parked.discard(driver)
        if self.on_parking is not None:
            self.on_parking(parked, unpark_s)

    @property
    def parked_sessions(self) -> int:
        return len(self.parked)

    def send_cancel(self, pid: int, secret: bytes, host: int = 0, address: str | None = None) -> None:
        task = asyncio.ensure_future(self._send_cancel(pid, secret, host, address))
        self.cancels.add(task)
        task.add_done_callback(self.cancels.discard)

    async def _send_cancel(self, pid: int, secret: bytes, host: int = 0, address: str | None = None) -> None:
        """55.2.8 "Canceling Requests in Progress": a new connection carrying only CancelRequest."""
        done = asyncio.get_running_loop().create_future()

        class _Closer(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                if not done.done():
                    done.set_result(None)

        try:
            # The backend lives at the address that serves the session, whatever DNS says now.
            transport, _, _ = await open_upstream(
                pinned(self.target.at(host), address), self.keepalive, _Closer, ssl_context=self.upstream_tls_context
            )
        except UpstreamError as exc:
            log.warning("could not forward a cancel request: %s", exc)
            return
        transport.write(fe.CancelRequest(pid, secret).encode())
        try:
            await asyncio.wait_for(done, 5.0)
        except TimeoutError:
            pass
        transport.close()

    # ---------------------------------------------------------------- reload
    def reload(self, config: Config) -> None:
        """SIGHUP: new sessions get the new policy, TLS contexts and upstream; open sessions keep
        their sockets. Raises (TlsConfigError, OSError, ssl.SSLError) before changing anything."""
        client_ctx = local_server_context(config.listen)
        upstream_ctx = upstream_context(config.upstream.target)
        if (config.listen.host, config.listen.port, config.listen.unix_socket_dir) != (
            self.config.listen.host,
            self.config.listen.port,
            self.config.listen.unix_socket_dir,
        ):
            log.warning("reload: listen address changes take effect only after a restart")
        if (config.auth, config.upstream.target) != (self.config.auth, self.config.upstream.target):
            self.password_source = password_source(config.auth, config.upstream.target)  # a new cache too
        self.config = config
        self.policy = policy_from_config(config)
        self.target = config.upstream.target
        self.keepalive = config.upstream.keepalive
        self.client_tls_context = client_ctx
        self.upstream_tls_context = upstream_ctx
        self.write_limits = (config.relay.high_water_bytes, config.relay.low_water_bytes)
        self.startup_timeout_s = config.listen.startup_timeout_s

    # ---------------------------------------------------------------- drain
    def drain(self) -> None:
        """Stop accepting; idle sessions get 57P01 now, busy ones when their transaction ends."""
        self.draining = True
        for server in self.servers:
            server.close()
        for driver in list(self.drivers):
            driver.drain()
