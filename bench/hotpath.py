"""`python -m bench.hotpath`: the relay's own Python cost per pgbench transaction, without sockets.

A shared 2-core machine makes end-to-end tps too noisy to see a 5 % change in the relay's Python
code; this drives one ClientDriver + SidecarConnection in the relaying phase with stub transports
and takes the best of several repeats, so a hot-path edit can be measured on its own.
`--profile` prints cProfile's top functions by own time instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import sys
import time
from types import SimpleNamespace

from pgsidecar.relay.connection import SessionPolicy, SidecarConnection
from pgsidecar.relay.phases import Phase
from pgsidecar.runtime.driver import ClientDriver, ServerSide


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _row_description() -> bytes:
    field = b"abalance\0" + struct.pack("!IhIhih", 16397, 3, 23, 4, -1, 0)
    return _msg(b"T", struct.pack("!h", 1) + field)


#: pgbench -S, simple protocol: one Query; the server answers T, D, C, Z (PostgreSQL docs 55.7).
SIMPLE = (
    _msg(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;\0"),
    _row_description() + _msg(b"D", struct.pack("!hI", 1, 1) + b"0") + _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I"),
)
#: pgbench -S -M prepared after the first Parse: Bind, Execute, Sync; 2, D, C, Z back.
PREPARED = (
    _msg(b"B", b"\0P0_1\0" + struct.pack("!hhhI", 0, 1, 0, 5) + b"48213" + struct.pack("!h", 0))
    + _msg(b"E", b"\0" + struct.pack("!I", 0))
    + _msg(b"S", b""),
    _msg(b"2", b"") + _msg(b"D", struct.pack("!hI", 1, 1) + b"0") + _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I"),
)


class _Transport:
    """Stands in for a uvloop transport: counts bytes, never blocks."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


def relaying_driver() -> tuple[ClientDriver, _Transport, _Transport]:
    """A driver whose session is logged in and relaying, as after a real login (no loop needed)."""
    driver = ClientDriver.__new__(ClientDriver)
    tally = SimpleNamespace(client_to_server=0, server_to_client=0)
    driver.sidecar = SimpleNamespace(tally=tally, on_client_error=None, register=lambda d: None)
    driver.brain = SidecarConnection(SessionPolicy(), secret=b"\0\0\0\1")
    driver.brain.ctx.phase = Phase.RELAYING
    driver.brain.ctx.first_backend_pid = 4242
    driver.cancel_key, driver.closed, driver.failed, driver.timers, driver.paused_by = (
        (4242, b"\0\0\0\1"),
        False,
        False,
        {},
        set(),
    )
    client, server = _Transport(), _Transport()
    driver.client = client  # type: ignore[assignment]
    driver.server = ServerSide(driver)
    driver.server.transport = server  # type: ignore[assignment]
    return driver, client, server


def transactions(driver: ClientDriver, exchange: tuple[bytes, bytes], count: int) -> None:
    request, reply = exchange
    side = driver.server
    assert side is not None
    for _ in range(count):
        driver.data_received(request)
        side.data_received(reply)


def measure(exchange: tuple[bytes, bytes], count: int, repeats: int) -> float:
    """Best-of-`repeats` microseconds per transaction (request in, reply out)."""
    best = float("inf")
    for _ in range(repeats):
        driver, client, server = relaying_driver()
        start = time.perf_counter()
        transactions(driver, exchange, count)
        best = min(best, time.perf_counter() - start)
        assert server.written == len(exchange[0]) * count and client.written == len(exchange[1]) * count
    return best / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.profile:
        driver, _, _ = relaying_driver()
        profiler = cProfile.Profile()
        profiler.runcall(transactions, driver, SIMPLE, args.count)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    for name, exchange in (("simple", SIMPLE), ("prepared", PREPARED)):
        print(f"{name:<9} {measure(exchange, args.count, args.repeats):6.2f} us per transaction (Python relay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
