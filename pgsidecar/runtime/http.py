"""/metrics and the health endpoints: a tiny HTTP/1.1 responder on the metrics listener.

No framework: probes and scrapers send one GET and read one answer, so each connection gets one
response and `Connection: close`. Also here: the periodic TCP/TLS-level upstream probe behind
/readyz and /startupz, and the loop heartbeat behind /livez.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from pgsidecar import __version__
from pgsidecar.observe.health import Health
from pgsidecar.observe.metrics import Metrics
from pgsidecar.runtime.upstream import UpstreamError, UpstreamFacts, open_upstream

if TYPE_CHECKING:
    from pgsidecar.runtime.listener import Sidecar

log = logging.getLogger("pgsidecar.http")

PROBE_INTERVAL_S = 10.0  # readiness follows an outage within this long
PROBE_TIMEOUT_S = 5.0
HEARTBEAT_S = 1.0
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:9188` or `[::1]:9188` -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class Operations:
    """The running HTTP listener, the upstream prober and the loop heartbeat."""

    def __init__(
        self, sidecar: Sidecar, metrics: Metrics, health: Health, *, probe_interval_s: float = PROBE_INTERVAL_S
    ) -> None:
        self.sidecar = sidecar
        self.metrics = metrics
        self.health = health
        self.probe_interval_s = probe_interval_s
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int | None:
        if self.server is None or not self.server.sockets:
            return None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self, listen: str | None) -> None:
        self.health.listening = True
        if listen is None:
            return
        host, port = split_host_port(listen)
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        self.tasks = [asyncio.ensure_future(self._probe_loop()), asyncio.ensure_future(self._heartbeat())]
        log.info(
            "metrics and health endpoints on http://%s:%s/ (/metrics /startupz /livez /readyz)",
            listen.rpartition(":")[0],
            self.port,
        )

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # ---------------------------------------------------------------- background
    async def _probe_loop(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.probe_interval_s)

    async def _reach_any(self) -> tuple[asyncio.Transport, asyncio.Protocol, UpstreamFacts]:
        """The first host of the list that answers (libpq multi-host); the last error if none."""
        sidecar = self.sidecar
        hosts = len(sidecar.target.hosts)
        for i in range(hosts):
            try:
                return await open_upstream(
                    sidecar.target.at(i),
                    sidecar.keepalive,
                    asyncio.Protocol,
                    ssl_context=sidecar.upstream_tls_context,
                    timeout_s=PROBE_TIMEOUT_S,
                )
            except (TimeoutError, UpstreamError, OSError) as exc:
                if i == hosts - 1:
                    raise exc from None
        raise ValueError("no upstream host")

    async def probe(self) -> bool:
        """One TCP (+TLS per sslmode) connect to the upstream, closed at once: reachability only,
        no credentials needed."""
        sidecar = self.sidecar
        try:
            transport, _, facts = await self._reach_any()
        except (TimeoutError, UpstreamError, OSError, ValueError) as exc:
            # Log the first failure and each change from reachable to unreachable, not every probe.
            worth_a_line = not self.health.probed or (
                self.health.last_ok is not None and (self.health.last_fail or 0) < self.health.last_ok
            )
            self.health.upstream_result(False, str(exc) or type(exc).__name__)
            if worth_a_line:
                log.warning("upstream probe failed: %s", exc)
            return False
        transport.close()
        if facts.cert is not None:
            sidecar.tally.cert_not_after = facts.cert.not_after
        if self.health.last_fail is not None and (self.health.last_ok or 0) < self.health.last_fail:
            log.info("upstream reachable again")
        self.health.upstream_result(True)
        return True

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + HEARTBEAT_S
            await asyncio.sleep(HEARTBEAT_S)
            self.health.tick(max(0.0, loop.time() - expected))

    # ---------------------------------------------------------------- HTTP
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            status, ctype, body = self._respond(head)
            method = head.split(b" ", 1)[0]
            writer.write(_response(status, ctype, b"" if method == b"HEAD" else body, len(body)))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # an answer must never take the sidecar down
            log.exception("internal error answering an HTTP request")
        finally:
            writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, text, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET and HEAD\n"
        if target == "/metrics":
            body, ctype = self.metrics.exposition()
            return 200, ctype, body
        answer = self.health.answer(target)
        if answer is None:
            return 404, text, b"not found; try /metrics /startupz /livez /readyz\n"
        return answer.status, text, answer.text.encode()


def _response(status: int, ctype: str, body: bytes, length: int) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def start_http(app: Any) -> Operations:
    """Build the metrics and health state, wire them to the sidecar, serve them.

    `app` is the App (pgsidecar/app.py): its sidecar, drop recorder and config are read here so
    the composition root stays short.
    """
    sidecar: Sidecar = app.sidecar
    metrics = Metrics(__version__)
    metrics.watch(sidecar)
    health = Health(draining=lambda: sidecar.draining, stale_after_s=3 * PROBE_INTERVAL_S)
    sidecar.on_client_error = metrics.client_error
    sidecar.on_upstream = health.upstream_result
    sidecar.on_role = metrics.upstream_noted
    sidecar.on_parking = metrics.parking_noted
    drops = getattr(app, "drops", None)
    if drops is not None:
        drops.on_record = metrics.drop_recorded
    ops = Operations(sidecar, metrics, health)
    await ops.start(app.config.metrics.listen)
    return ops
