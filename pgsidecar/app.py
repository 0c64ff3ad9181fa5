"""Composition root: config -> observe -> runtime; signals; exit codes.

Exit codes (the Cloud SQL Auth Proxy's habit of naming them): 0 clean stop, 2 configuration
error, 3 cannot listen, 4 upstream check failed, 1 internal error.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgsidecar.config.model import Config
from pgsidecar.runtime.listener import Sidecar

if TYPE_CHECKING:  # imported when first used, as at run time
    from pgsidecar.observe.recorder import DropRecorder
    from pgsidecar.runtime.http import Operations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_LISTEN = 3
EXIT_UPSTREAM = 4

log = logging.getLogger("pgsidecar")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; plain asyncio still works
        log.warning("uvloop is not installed; using the standard asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def sidecar_id(config: Config) -> str:
    return config.sidecar_id or f"{socket.gethostname()}:{os.getpid()}"


class App:
    """One running sidecar: listeners, drop log, metrics and signal handling."""

    def __init__(self, config: Config, *, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload  # re-reads file, env and flags on SIGHUP
        self.id = sidecar_id(config)
        self.stopping: asyncio.Event | None = None
        self.sidecar: Sidecar | None = None
        self.drain_task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self.drops: DropRecorder | None = None
        self.metrics: Operations | None = None

    async def run(self) -> int:
        from pgsidecar.observe.recorder import DropRecorder

        self.stopping = asyncio.Event()
        self.drops = DropRecorder(self.config, self.id)
        self.sidecar = Sidecar(self.config, on_drop=self.drops.record)
        try:
            await self.sidecar.start()
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", self.config.listen.host, self.config.listen.port, exc)
            return EXIT_LISTEN
        try:
            self.metrics = await self._start_http()
        except OSError as exc:
            log.error("cannot listen for metrics on %s: %s", self.config.metrics.listen, exc)
            await self.sidecar.close()
            return EXIT_LISTEN
        # Everything made so far (modules, config, contexts) lives as long as the process: frozen,
        # Python's full garbage collections no longer walk its ~35,000 objects.
        gc.freeze()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_term)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        log.info(
            "pgsidecar listening on %s:%s, upstream %s",
            self.config.listen.host,
            self.sidecar.ports[0] if self.sidecar.ports else self.config.listen.port,
            self.config.upstream.target.redacted(),
        )
        await self.stopping.wait()
        await self._shutdown()
        return EXIT_OK

    async def _start_http(self) -> Operations | None:
        try:
            from pgsidecar.runtime.http import start_http
        except ImportError:
            return None
        return await start_http(self)

    def _on_term(self) -> None:
        assert self.stopping is not None and self.sidecar is not None
        if self.sidecar.draining:
            log.warning("second signal: exiting now")
            self.stopping.set()
            return
        log.info(
            "draining: no new clients; sessions finish their transaction (grace %ss)", self.config.shutdown.grace_s
        )
        self.sidecar.drain()
        self.drain_task = asyncio.ensure_future(self._drain_wait())

    async def _drain_wait(self) -> None:
        assert self.sidecar is not None and self.stopping is not None
        deadline = asyncio.get_running_loop().time() + self.config.shutdown.grace_s
        while self.sidecar.drivers and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - polls a set, no event to wait on
            await asyncio.sleep(0.05)
        if self.sidecar.drivers:
            log.warning("drain: grace period over; closing %d remaining session(s)", len(self.sidecar.drivers))
        else:
            log.info("drain: all sessions ended")
        self.stopping.set()

    def _on_hup(self) -> None:
        """Reload config and certificates for new sessions; open sessions keep their sockets.
        An invalid new config keeps the running one."""
        assert self.sidecar is not None
        if self.drops is not None:
            self.drops.reopen()
        if self.reload_config is None:
            log.warning("SIGHUP: no config source to re-read; reopened the drop log only")
            return
        try:
            new = self.reload_config()
            self.sidecar.reload(new)
        except Exception as exc:  # noqa: BLE001 - ConfigError, TlsConfigError, OSError, ssl.SSLError: keep running
            log.error("SIGHUP: reload failed, keeping the running configuration: %s", exc)
            return
        for name, old_value, new_value in (
            ("metrics.listen", self.config.metrics.listen, new.metrics.listen),
            ("drop_log.path", self.config.drop_log.path, new.drop_log.path),
        ):
            if old_value != new_value:
                log.warning("SIGHUP: %s changes take effect only after a restart", name)
        self.config = new
        if self.drops is not None:
            self.drops.config = new
        logging.getLogger("pgsidecar").setLevel(new.log.level.upper())
        log.info("SIGHUP: configuration and certificates reloaded; upstream %s", new.upstream.target.redacted())

    async def _shutdown(self) -> None:
        assert self.sidecar is not None
        await self.sidecar.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.drops is not None:
            self.drops.close()


def run(config: Config, *, reload: Callable[[], Config] | None = None) -> int:
    install_uvloop()
    return asyncio.run(App(config, reload=reload).run())
