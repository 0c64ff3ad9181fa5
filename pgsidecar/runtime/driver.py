"""Per-client driver: reads both sockets, feeds SidecarConnection, carries out its commands.

asyncio Protocol callbacks, not streams: one read is one call into the brain and, on the hot
path, one write (the brain answers None for "relay it as it came": no event, no command object).
Backpressure: a side whose write buffer passes the high-water mark pauses reading on the other.
Nothing here decides anything about the session; the brain does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import ssl
import time
from typing import TYPE_CHECKING

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.connection import SidecarConnection
from pgsidecar.runtime.credentials import CredentialError
from pgsidecar.runtime.upstream import ERRNO_KINDS, UpstreamError, open_upstream, tcp_info
from pgsidecar.wire.ending import SocketEnd

if TYPE_CHECKING:
    from pgsidecar.runtime.listener import Sidecar

log = logging.getLogger("pgsidecar.session")

# One errno table for connects and established sockets; an established one cannot be refused.
_ERRNO_KIND = {code: SocketEnd(kind) for code, kind in ERRNO_KINDS.items() if kind != "refused"}


def classify_exception(
    exc: BaseException | None, saw_eof: bool, tls: bool
) -> tuple[SocketEnd, str | None, bool | None]:
    """(how it ended, errno name, TLS close_notify seen: None without TLS) for a socket's end."""
    if exc is None:
        # Under TLS, asyncio reports close_notify as eof_received; a bare TCP FIN is not.
        return SocketEnd.EOF, None, saw_eof if tls else None
    if isinstance(exc, ssl.SSLError):
        return SocketEnd.TLS_ERROR, getattr(exc, "reason", None) or type(exc).__name__, False
    code = getattr(exc, "errno", None)
    if code in _ERRNO_KIND:
        return _ERRNO_KIND[code], errno.errorcode.get(code), False
    if isinstance(exc, ConnectionResetError):
        return SocketEnd.RESET, "ECONNRESET", False
    if isinstance(exc, TimeoutError):
        return SocketEnd.TIMEOUT, "ETIMEDOUT", False
    return SocketEnd.OTHER, errno.errorcode.get(code) if code else type(exc).__name__, False


class ServerSide(asyncio.Protocol):
    """The upstream socket of one session."""

    __slots__ = ("closing", "driver", "last_tcp_info", "saw_eof", "transport")

    def __init__(self, driver: ClientDriver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.saw_eof = False
        self.closing = False
        self.last_tcp_info: dict[str, object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(*self.driver.sidecar.write_limits)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        driver = self.driver
        if self is not driver.server:
            return  # a socket already replaced; its last bytes belong to no one
        driver.sidecar.tally.server_to_client += len(data)
        if driver.failed:
            return
        try:
            out = driver.brain.server_read(time.monotonic(), data)
            if out is None:
                if driver.client is not None:
                    driver.client.write(data)
            else:
                driver.run(out)
        except Exception:  # noqa: BLE001 - a bug ends this session only; fail() logs the traceback
            driver.internal_error("ServerData")

    def eof_received(self) -> bool:
        self.saw_eof = True
        self.last_tcp_info = _tcp_info_of(self.transport)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.driver.server_lost(self, exc)

    def pause_writing(self) -> None:
        self.driver.pause_client_reading("server-buffer")

    def resume_writing(self) -> None:
        self.driver.resume_client_reading("server-buffer")


def _tcp_info_of(transport: asyncio.BaseTransport | None) -> dict[str, object] | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.fileno() < 0:
        return None
    try:
        info = tcp_info(sock)
    except OSError:
        return None
    # ServerClosed.tcp_info is a dict[str, object] (dict is invariant): a copy of the ints.
    return dict(info) if info is not None else None


class ClientDriver(asyncio.Protocol):
    """One client connection: the brain plus the two transports it steers."""

    def __init__(self, sidecar: Sidecar, *, unix: bool = False) -> None:
        self.sidecar = sidecar
        self.unix = unix
        self.loop = asyncio.get_running_loop()
        self.brain = SidecarConnection(sidecar.policy, secret=secrets.token_bytes(4))
        self.client: asyncio.Transport | None = None
        self.server: ServerSide | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.timers: dict[cmd.TimerName, asyncio.TimerHandle] = {}
        self.paused_by: set[str] = set()
        self.cancel_key: tuple[int, bytes] | None = None  # registered with the sidecar, by the brain's command
        self.closed = False
        self.failed = False  # an internal error ended this session; later events are ignored

    # ---------------------------------------------------------------- client socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(*self.sidecar.write_limits)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if self.unix or not peer:
            peer_text, trusted = "unix", True
        else:
            peer_text = f"{peer[0]}:{peer[1]}"
            trusted = peer[0].startswith("127.") or peer[0] in ("::1", "::ffff:127.0.0.1")
        refusal = self.sidecar.admit(self)
        log.debug("client connected: %s", peer_text)
        self.feed(ev.ClientConnected(time.monotonic(), time.time(), peer_text, trusted, refusal))

    def data_received(self, data: bytes) -> None:
        self.sidecar.tally.client_to_server += len(data)
        if self.failed:
            return
        try:
            out = self.brain.client_read(time.monotonic(), data)
            if out is None:
                server = self.server
                if server is not None and server.transport is not None:
                    server.transport.write(data)
            else:
                self.run(out)
        except Exception:  # noqa: BLE001 - a bug ends this session only; fail() logs the traceback
            self.internal_error("ClientData")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            log.debug("client disconnected: %s", self.brain.ctx.peer or "?")
            if not self.closed:
                self.feed(ev.ClientClosed(time.monotonic(), str(exc) if exc else None))
        finally:
            self._teardown()

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def pause_client_reading(self, why: str) -> None:
        if not self.paused_by and self.client is not None:
            self.client.pause_reading()
        self.paused_by.add(why)

    def resume_client_reading(self, why: str) -> None:
        self.paused_by.discard(why)
        if not self.paused_by and self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    # ---------------------------------------------------------------- server socket
    def server_lost(self, side: ServerSide, exc: Exception | None) -> None:
        if side is not self.server:
            return
        self.server = None
        tls = side.transport is not None and side.transport.get_extra_info("ssl_object") is not None
        kind, errno_name, close_notify = classify_exception(exc, side.saw_eof, tls)
        info = side.last_tcp_info or _tcp_info_of(side.transport)
        event = ev.ServerClosed(
            time.monotonic(), time.time(), kind, errno_name, close_notify, str(exc) if exc else None, info
        )
        self.feed(event)

    # ---------------------------------------------------------------- commands
    def feed(self, event: ev.Event) -> None:
        """Hand one event to the brain and carry out its commands. An internal error (in the brain
        or in carrying out a command) ends this session only: one log line, resources given back."""
        if self.failed:
            return
        try:
            self.run(self.brain.handle(event))
        except Exception:  # noqa: BLE001 - a bug ends this session only; fail() logs the traceback
            self.internal_error(type(event).__name__)

    def internal_error(self, what: str) -> None:
        """From an ``except`` block: a bug while handling ``what`` ends this session."""
        self.fail(f"internal error in session {self.brain.ctx.peer or '?'} on {what}; closing it")

    def fail(self, message: str) -> None:
        """End this session after an internal error, once: log, close both sockets, free the slot."""
        if self.failed:
            return
        self.failed = True
        log.exception(message)  # noqa: LOG004 - called only from `except` blocks
        try:
            self._close_server(abort=True)
            if self.client is not None:
                self.client.abort()
        finally:
            self._teardown()

    def run(self, commands: list[cmd.Command]) -> None:
        """Carry out the brain's commands in order; bytes it marked as its own errors are counted."""
        for command in commands:
            # Exact types, the two hot commands first; `type(...) is` also narrows for mypy.
            if type(command) is cmd.SendToServer:
                server = self.server
                if server is not None and server.transport is not None:
                    server.transport.write(command.data)
            elif type(command) is cmd.SendToClient:
                if self.client is not None:
                    self.client.write(command.data)
                if command.errors and self.sidecar.on_client_error is not None:
                    for code in command.errors:
                        self.sidecar.on_client_error(code)
            else:
                self._other(command)

    def _other(self, command: object) -> None:
        if isinstance(command, cmd.OpenServer):
            self._open_server(command)
        elif isinstance(command, cmd.CloseServer):
            self._close_server(abort=command.abort)
        elif isinstance(command, cmd.CloseClient):
            self.closed = True
            if self.client is not None:
                self.client.close()
        elif isinstance(command, cmd.StartClientTLS):
            self._start_client_tls()
        elif isinstance(command, cmd.SetTimer):
            self._set_timer(command.name, command.delay_s)
        elif isinstance(command, cmd.CancelTimer):
            handle = self.timers.pop(command.name, None)
            if handle is not None:
                handle.cancel()
        elif isinstance(command, cmd.PauseClient):
            self.pause_client_reading("brain")
        elif isinstance(command, cmd.ResumeClient):
            self.resume_client_reading("brain")
        elif isinstance(command, cmd.RecordDrop):
            self.sidecar.record_drop(self, command.drop)
        elif isinstance(command, cmd.ForwardCancel):
            self.sidecar.forward_cancel(command.pid, command.secret)
        elif isinstance(command, cmd.RegisterCancelKey):
            self.cancel_key = (command.pid, command.secret)
            self.sidecar.register(self, self.cancel_key)
        elif isinstance(command, cmd.SendCancel):
            self.sidecar.send_cancel(command.pid, command.secret, command.host, command.address)
        elif isinstance(command, cmd.NoteUpstream):
            self.sidecar.note_upstream(command.host, command.address, command.role, command.fits)
        elif isinstance(command, cmd.NoteParking):
            self.sidecar.note_parking(self, command.parked, command.unpark_s)
        elif isinstance(command, cmd.Log):
            getattr(log, command.level)(command.message)
        else:
            raise TypeError(f"unknown command {command!r}")

    def drain(self) -> None:
        """Shutdown: the brain decides when this session closes (now, or at its next idle point)."""
        self.feed(ev.Drain(time.monotonic()))

    def cancel(self) -> None:
        """A cancel request named this session: the brain knows which backend serves it now."""
        self.feed(ev.CancelRequested(time.monotonic()))

    def _set_timer(self, name: cmd.TimerName, delay: float) -> None:
        old = self.timers.pop(name, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            self.timers.pop(name, None)
            self.feed(ev.Timer(time.monotonic(), time.time(), name))

        self.timers[name] = self.loop.call_later(delay, fire)

    def _start_client_tls(self) -> None:
        assert self.client is not None
        self.client.write(b"S")
        self.client.pause_reading()
        self.connecting_tls = asyncio.ensure_future(self._client_tls())

    async def _client_tls(self) -> None:
        # The brain asks for TLS only on an open client socket with local TLS configured.
        assert self.client is not None and self.sidecar.client_tls_context is not None
        try:
            new = await self.loop.start_tls(
                self.client,
                self,
                self.sidecar.client_tls_context,
                server_side=True,
                ssl_handshake_timeout=self.sidecar.startup_timeout_s,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("client TLS handshake failed: %s", exc)
            self.closed = True
            if self.client is not None:
                self.client.close()
            return
        if new is None:
            return
        self.client = new
        self.feed(ev.ClientTLSStarted(time.monotonic()))

    def _open_server(self, command: cmd.OpenServer) -> None:
        self._close_server()
        self.connecting = asyncio.ensure_future(self._connect(command))

    async def _connect(self, command: cmd.OpenServer) -> None:
        try:
            await self._connect_once(command)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug ends this session only; fail() logs the traceback
            self.fail(f"internal error while connecting upstream for session {self.brain.ctx.peer or '?'}; closing it")

    async def _connect_once(self, command: cmd.OpenServer) -> None:
        side = ServerSide(self)
        target = self.sidecar.target.at(command.host)
        source = self.sidecar.password_source_for(self.brain.ctx.policy)
        password: str | None = None
        try:
            # The brain's reconnect mark picks the gate's class: reconnects go before first logins.
            async with self.sidecar.connect_slots.slot(command.reconnect):
                if source is not None:
                    # Fetched for every connect, inside the slot: at most max_concurrent at once.
                    try:
                        password = await source.password(target.host, target.port)
                    except CredentialError as exc:
                        raise UpstreamError("auth", str(exc)) from None
                transport, _, facts = await open_upstream(
                    target,
                    self.sidecar.keepalive,
                    lambda: side,
                    ssl_context=self.sidecar.upstream_tls_context,
                    use_tls=command.use_tls,
                    plaintext_retry=command.plaintext_retry,
                    avoid=command.avoid,
                    shuffle=command.shuffle,
                )
        except UpstreamError as exc:
            self.connecting = None
            self.sidecar.connect_failed(exc)
            if not self.closed:
                self.feed(ev.ServerConnectFailed(time.monotonic(), exc.kind, str(exc), exc.errno_name))
            return
        self.connecting = None
        if self.closed:
            side.closing = True
            transport.close()
            return
        self.server = side
        self.feed(self.sidecar.connected_event(facts, password))

    def _close_server(self, *, abort: bool = False) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.server is not None:
            self.server.closing = True
            if self.server.transport is not None:
                if abort:
                    self.server.transport.abort()
                else:
                    self.server.transport.close()
            self.server = None

    def _teardown(self) -> None:
        """Give everything back; safe to call more than once."""
        self.closed = True
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        self._close_server()
        self.sidecar.unregister(self)
        # No cycle left for the garbage collector: the client transport points at this driver,
        # and the brain's handlers at each other (the session is freed by reference counting).
        self.client = None
        self.brain.release()
