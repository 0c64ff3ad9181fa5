"""`pgsidecar check`: one upstream connection with the configured TLS and credentials."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pgsidecar.config.model import Config, UpstreamTarget
from pgsidecar.relay.hosts import Attrs, Role, mismatch
from pgsidecar.relay.login import UpstreamLogin
from pgsidecar.runtime.credentials import CredentialError, password_source
from pgsidecar.runtime.tls import upstream_context
from pgsidecar.runtime.upstream import UpstreamError, UpstreamFacts, keepalive_readback, open_upstream
from pgsidecar.wire import frontend as fe


class CheckFailed(Exception):
    """The upstream could not be reached or refused us; the message says why."""


@dataclass(slots=True)
class CheckResult:
    facts: UpstreamFacts
    params: dict[str, str]
    backend_pid: int
    auth_method: str | None
    keepalive: dict[str, int] = field(default_factory=dict)


class _Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


async def check_upstream(
    config: Config,
    *,
    user: str | None = None,
    password: str | None = None,
    dbname: str | None = None,
    timeout_s: float = 15.0,
    target: UpstreamTarget | None = None,
) -> CheckResult:
    target = target or config.upstream.target.at(0)
    user = user or config.auth.user or target.user
    if not user:
        raise CheckFailed("no user to log in with: set it in upstream.dsn, PGUSER or auth.user")
    params = {"user": user, "database": dbname or target.dbname or user, "application_name": "pgsidecar check"}
    if password is None:
        source = password_source(config.auth, target)  # a command or a cloud token: minted now
        if source is not None:
            try:
                password = await source.password(target.host, target.port)
            except CredentialError as exc:
                raise CheckFailed(f"could not get the upstream password: {exc}") from None
    collector = _Collector()
    transport, _, facts = await open_upstream(
        target,
        config.upstream.keepalive,
        lambda: collector,
        ssl_context=upstream_context(target),
        timeout_s=timeout_s,
    )
    try:
        sock = transport.get_extra_info("socket")
        readback = keepalive_readback(sock) if sock is not None else {}
        login = UpstreamLogin(
            params,
            password or config.auth.password or target.password,
            cert_der=facts.cert.der if facts.cert is not None else None,
        )
        transport.write(login.start())
        while True:
            data = await asyncio.wait_for(collector.queue.get(), timeout_s)
            if data is None:
                raise CheckFailed("the server closed the connection during login")
            step = login.feed(data)
            if step.send:
                transport.write(step.send)
            if step.needs_password:
                raise CheckFailed(
                    "the server asks for a password: set PGPASSWORD, upstream.dsn password or auth.password"
                )
            if step.error is not None:
                raise CheckFailed(
                    f"the server refused the login: {step.error.severity} {step.error.code} {step.error.message}"
                )
            if step.done is not None:
                transport.write(fe.Terminate().encode())
                return CheckResult(facts, step.done.params, step.done.backend_pid, login.auth_method, readback)
    finally:
        transport.close()


@dataclass(slots=True)
class HostReport:
    """One host of the upstream's list, as `pgsidecar check` found it."""

    label: str
    result: CheckResult | None = None
    error: str | None = None
    role: str = "unknown"
    fits: bool = False
    chosen: bool = False


async def check_hosts(config: Config, *, timeout_s: float = 15.0) -> list[HostReport]:
    """Every host in order: reachable, its role, and which one a session would use (the first
    whose role fits target_session_attrs; prefer-standby takes the first reachable otherwise).
    A role the login did not report (PostgreSQL before 14) shows as unknown."""
    target = config.upstream.target
    attrs = Attrs(target.target_session_attrs.value)
    reports: list[HostReport] = []
    for i, host in enumerate(target.hosts):
        report = HostReport(host.label())
        try:
            report.result = await check_upstream(config, timeout_s=timeout_s, target=target.at(i))
        except (TimeoutError, CheckFailed, UpstreamError, OSError) as exc:
            report.error = str(exc) or type(exc).__name__
            reports.append(report)
            continue
        role = Role.from_params(report.result.params)
        report.role = role.name
        report.fits = mismatch(attrs, role, second_pass=False) is None
        reports.append(report)
    chosen = next((r for r in reports if r.fits), None)
    if chosen is None and attrs is Attrs.PREFER_STANDBY:
        chosen = next((r for r in reports if r.result is not None), None)
    if chosen is not None:
        chosen.chosen = True
    return reports
