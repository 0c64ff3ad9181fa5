"""Issue 10 item 5, "reconnects first": an established session's reconnect is served before first
logins that are already queued for the sidecar's connect slots (runtime/gate.py).

Order, not time, is the evidence. A loopback relay between the sidecar and the server holds new
connections (accepted, not yet forwarded) so the queue is built deterministically: with
`reconnect.max_concurrent` 1, one first login holds the only slot inside the relay, more first
logins wait for it, then the established session's backend is terminated and its reconnect joins
the wait. Released, the relay forwards in accept order, one connection at a time, and notes the
local port of each upstream connection; `pg_stat_activity.client_port` names the session behind
each port. With one slot, first logins reach the relay in the order the gate grants them: a FIFO
gate lets every queued first login in before the reconnect; the priority gate lets the reconnect
in right after the one that held the slot.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import urllib.request

import psycopg2
import pytest

from pgsidecar.observe.metrics import sample_value
from tests.fixtures.faults import wait_until
from tests.fixtures.sidecar import upstream_dsn_for

pytestmark = [pytest.mark.server]

FIRST_LOGINS = 12
PROBE = "prio_probe"
FIRST = "prio_first_"


class HoldingRelay:
    """A TCP forwarder on 127.0.0.1 to the server, on its own thread and event loop. While held,
    new connections are accepted but not forwarded; on release each is connected upstream in
    accept order, one after the other, then bytes are copied both ways until either side closes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="holding-relay", daemon=True)
        self.accepted = 0  # written on the relay's loop only; read by the test
        self.upstream_ports: list[int] = []  # local port of each upstream connection, in order
        self.port = 0
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self._call(self._start())

    async def _start(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.in_order = asyncio.Lock()  # FIFO: upstream connects happen in accept order
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._call(self._set(False))

    def release(self) -> None:
        self._call(self._set(True))

    async def _set(self, is_open: bool) -> None:
        if is_open:
            self.open.set()
        else:
            self.open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        handler = asyncio.current_task()  # so stop() also ends a connection still being held
        assert handler is not None
        self._tasks.add(handler)
        handler.add_done_callback(self._tasks.discard)
        async with self.in_order:
            await self.open.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self.upstream_ports.append(up_writer.get_extra_info("sockname")[1])
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):  # ends at EOF: bounded by the connection
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for writer in self._writers:
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            self._call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


def _startup(user: str, database: str, application_name: str) -> bytes:
    """StartupMessage, protocol 3.0 (PostgreSQL docs 55.7 "Message Formats")."""
    body = struct.pack("!I", 3 << 16)
    for key, value in (("user", user), ("database", database), ("application_name", application_name)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def _finish_login(sock: socket.socket, password: str, timeout: float = 30.0) -> None:
    """Answer the sidecar's cleartext password request, read to ReadyForQuery; fail on anything else."""
    sock.settimeout(timeout)
    buf = b""
    for _ in range(1000):  # bounded: a login is a handful of messages
        while len(buf) >= 5 and len(buf) >= 1 + struct.unpack("!I", buf[1:5])[0]:
            kind, end = buf[:1], 1 + struct.unpack("!I", buf[1:5])[0]
            payload, buf = buf[5:end], buf[end:]
            if kind == b"Z":
                return
            if kind == b"E":
                pytest.fail(f"a first login failed: {payload!r}")
            if kind == b"R" and struct.unpack("!I", payload[:4])[0] == 3:  # AuthenticationCleartextPassword
                body = password.encode() + b"\0"
                sock.sendall(b"p" + struct.pack("!I", len(body) + 4) + body)
        chunk = sock.recv(65536)
        if not chunk:
            pytest.fail("the sidecar closed a first login")
        buf += chunk
    pytest.fail("a first login did not finish")


def _connecting(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sample_value(text, "pgsidecar_upstream_connections", {"state": "connecting"}) or 0.0


def test_reconnect_is_served_before_queued_first_logins(pg, sidecar_factory):
    relay = HoldingRelay(pg.port)
    relay.start()
    firsts: list[socket.socket] = []
    probe = None
    try:
        upstream = upstream_dsn_for(pg).replace(f"host=localhost port={pg.port}", f"host=127.0.0.1 port={relay.port}")
        assert f"port={relay.port}" in upstream
        side = sidecar_factory(upstream, metrics=True, env={"PGSIDECAR_RECONNECT_MAX_CONCURRENT": "1"})
        password = pg.users["app"]
        probe = psycopg2.connect(side.dsn(password=password, application_name=PROBE, connect_timeout=10))
        probe.autocommit = True
        with probe.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            old_pid = cur.fetchone()[0]
        base = relay.accepted

        relay.hold()
        for i in range(FIRST_LOGINS):
            sock = socket.create_connection(("127.0.0.1", side.port), timeout=10)
            firsts.append(sock)
            sock.sendall(_startup("app", "app", f"{FIRST}{i:02d}"))
        # One first login holds the only slot (inside the relay); the others wait for it.
        wait_until(
            lambda: relay.accepted >= base + 1 and _connecting(side.metrics_port) == FIRST_LOGINS,
            20,
            "every first login queued behind the one holding the slot",
        )

        assert pg.terminate(old_pid)
        # The probe's reconnect has joined the queue (or, with priority, taken the reserved slot).
        wait_until(
            lambda: _connecting(side.metrics_port) == FIRST_LOGINS + 1,
            20,
            "the established session's reconnect waiting for a connect slot",
        )
        relay.release()

        for sock in firsts:
            _finish_login(sock, password)
        with probe.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")  # the session's next query: no error
            new_pid = cur.fetchone()[0]
        assert new_pid != old_pid

        rows = pg.sql(
            "SELECT client_port, application_name FROM pg_stat_activity"
            " WHERE application_name = %s OR application_name LIKE %s",
            (PROBE, FIRST + "%"),
        )
        by_port = dict(rows)
        # The relay's order, kept to these sessions (the health probe's TCP/TLS checks also pass).
        order = [by_port[port] for port in relay.upstream_ports if port in by_port]
        assert sorted(order) == sorted([PROBE] + [f"{FIRST}{i:02d}" for i in range(FIRST_LOGINS)]), order
        ahead = order.index(PROBE)
        # Only the first login that already held the slot may start before the reconnect.
        assert ahead <= 1, f"the reconnect was served after {ahead} queued first logins: {order}"

        drops = side.wait_drops(1, timeout=20)
        assert len(drops) == 1, drops
        assert drops[0]["impact"] == "transparent" and drops[0]["reconnect"]["succeeded"] is True, drops[0]
        print(
            f"ORDER reconnect served after {ahead} first login(s); "
            f"reconnect.duration_s={drops[0]['reconnect'].get('duration_s')}"
        )
    finally:
        for sock in firsts:
            try:
                sock.sendall(b"X\0\0\0\4")  # Terminate
            except OSError:
                pass
            sock.close()
        if probe is not None:
            probe.close()
        relay.stop()
