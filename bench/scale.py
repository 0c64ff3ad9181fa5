"""The scale run: many clients querying at once through one pgsidecar, then a count of what is left.

Issue 7 item 4: a thousand sessions each run simple queries in a loop for 30 s; no query may fail;
p50/p95/p99 latency and total queries/s are reported; and once every client has gone, the sidecar's
open descriptors must fall back to where they were (a leaked socket shows there first), with RSS,
threads and the server's backend count beside them (RSS is no leak signal on its own: uvloop's
TLS transport keeps native memory after its connections close, MagicStack/uvloop#565). All
clients live in this process on uvloop, as bench/pgclient.py sessions; the query loop reads
replies by frame header only, so the client costs as little CPU as it can on a machine it shares
with the sidecar and the server.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import struct
import subprocess
import time
from dataclasses import dataclass, field

from bench.pgclient import MiniClient, PgError
from bench.report import ProcessSnapshot, ScaleResult, percentiles
from bench.stack import Stack, tree_cpu_s, tree_rss_kib


@dataclass(frozen=True, slots=True)
class ScalePlan:
    """How many clients for how long; every loop below is bounded by these numbers."""

    clients: int = 1000
    seconds: float = 30.0
    accounts: int = 1_000_000
    connect_concurrency: int = 50
    connect_timeout_s: float = 60.0
    max_queries_per_client: int = 1_000_000
    grace_s: float = 30.0
    settle_s: float = 5.0


FULL = ScalePlan()
QUICK = ScalePlan(clients=200, seconds=10.0)


@dataclass(slots=True)
class Tally:
    """What every client loop adds to: latencies in seconds, and the errors it saw."""

    latencies: list[float] = field(default_factory=list)
    query_errors: int = 0
    samples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.query_errors += 1
        if len(self.samples) < 5:
            self.samples.append(text)


@dataclass(slots=True)
class Window:
    """The shared start signal and deadline, set once every loop is parked so all run alike."""

    start: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: float = 0.0


def _query(sql: str) -> bytes:
    # Query message: 'Q', int32 length, the SQL as a C string (PostgreSQL docs 55.7 "Message Formats").
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


SELECT_1 = _query("SELECT 1")


def snapshot(pid: int) -> ProcessSnapshot:
    """Open descriptors (/proc/PID/fd), RSS and thread count of one process, as proc(5) gives them."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as fh:
        threads = next((int(line.split()[1]) for line in fh if line.startswith("Threads:")), 0)
    return ProcessSnapshot(fds, tree_rss_kib(pid), threads)


def nofile_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE the process runs with (/proc/PID/limits), to show it was raised."""
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    return None


def server_backends(stack: Stack) -> int | None:
    """Client backends on the server, counted over a direct TLS psql session (which is one of them)."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", sql], env=stack.env("direct"), capture_output=True, text=True, timeout=60
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else None


async def _until_ready(reader: asyncio.StreamReader, tally: Tally) -> None:
    """Read one query's replies up to ReadyForQuery by frame header only (type byte + int32 length,
    PostgreSQL docs 55.7); an ErrorResponse counts as a query error, EOF raises PgError."""
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise PgError("connection closed by the sidecar")
        buf += chunk
        pos, size = 0, len(buf)
        while pos + 5 <= size:
            kind = buf[pos]
            end = pos + 1 + struct.unpack_from("!I", buf, pos + 1)[0]
            if end > size:
                break
            if kind == 0x45:  # 'E' ErrorResponse; ReadyForQuery still follows
                tally.error(_error_text(buf[pos + 5 : end]))
            elif kind == 0x5A:  # 'Z' ReadyForQuery: the query is done
                if end != size:
                    raise PgError(f"{size - end} bytes after ReadyForQuery")
                return
            pos = end
        buf = buf[pos:]


def _error_text(body: bytes) -> str:
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"


async def _client_loop(client: MiniClient, window: Window, plan: ScalePlan, seed: int, tally: Tally) -> None:
    """Alternate SELECT 1 and one pgbench_accounts row by random aid until the deadline or the cap."""
    await window.start.wait()
    deadline = window.deadline
    reader, writer = client.reader, client.writer
    assert reader is not None and writer is not None
    rng, clock, latencies = random.Random(seed), time.perf_counter, tally.latencies
    for n in range(plan.max_queries_per_client):
        if time.monotonic() >= deadline:
            return
        message = (
            SELECT_1
            if n % 2 == 0
            else _query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, plan.accounts)}")
        )
        began = clock()
        writer.write(message)
        try:
            await _until_ready(reader, tally)
        except (PgError, ConnectionError) as exc:
            tally.error(f"client {seed}: {exc}")
            return
        latencies.append(clock() - began)


async def _connect_all(stack: Stack, plan: ScalePlan, tally: Tally) -> tuple[list[MiniClient], int]:
    """Open `plan.clients` sessions, `connect_concurrency` at a time; returns them and the failures."""
    gate, clients, failures = asyncio.Semaphore(plan.connect_concurrency), [], 0

    async def one() -> None:
        nonlocal failures
        async with gate:
            client = MiniClient(stack.port("pgsidecar"), stack.user, stack.password)
            try:
                await asyncio.wait_for(client.connect(), plan.connect_timeout_s)
                clients.append(client)
            except (TimeoutError, PgError, OSError) as exc:
                failures += 1
                client.close()
                if len(tally.samples) < 5:
                    tally.samples.append(f"connect: {exc!r}")

    await asyncio.gather(*(one() for _ in range(plan.clients)))
    return clients, failures


async def _sample_peak(pid: int, stop: asyncio.Event, peak: list[ProcessSnapshot]) -> None:
    """Keep the largest fds, RSS and threads seen, once a second, until `stop` is set."""
    while not stop.is_set():
        now = snapshot(pid)
        last = peak[-1]
        peak[-1] = ProcessSnapshot(
            max(now.fds, last.fds), max(now.rss_kib, last.rss_kib), max(now.threads, last.threads)
        )
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def _run_clients(clients: list[MiniClient], plan: ScalePlan, tally: Tally) -> float:
    """Start every loop at once; returns the measured wall time. Loops still running `grace_s`
    past the deadline are cancelled and counted as errors (a stuck session)."""
    window = Window()
    tasks = [asyncio.ensure_future(_client_loop(c, window, plan, i, tally)) for i, c in enumerate(clients)]
    await asyncio.sleep(0)  # every loop is now parked on the start event
    began = time.monotonic()
    window.deadline = began + plan.seconds
    window.start.set()
    _, pending = await asyncio.wait(tasks, timeout=plan.seconds + plan.grace_s)
    for task in pending:
        task.cancel()
        tally.error("a client loop was still waiting for a reply after the grace period")
    await asyncio.gather(*pending, return_exceptions=True)
    return time.monotonic() - began


async def _settle(pid: int, baseline: int, settle_s: float) -> float | None:
    """Seconds until the sidecar's descriptors are back at `baseline`, or None within `settle_s`."""
    began = time.monotonic()
    while time.monotonic() - began < settle_s:
        if len(os.listdir(f"/proc/{pid}/fd")) <= baseline:
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    return None


async def measure_scale(stack: Stack, plan: ScalePlan) -> ScaleResult:
    """Baseline, connect all, run, disconnect all, settle; the sidecar is watched from /proc."""
    pid, tally = stack.proxy_pid("pgsidecar"), Tally()
    backends = {"before": server_backends(stack)}
    before = snapshot(pid)
    connect_began = time.monotonic()
    clients, connect_errors = await _connect_all(stack, plan, tally)
    connect_s = time.monotonic() - connect_began
    backends["during"] = server_backends(stack)
    peak, stop = [snapshot(pid)], asyncio.Event()
    sampler = asyncio.ensure_future(_sample_peak(pid, stop, peak))
    cpu_before, own_before = tree_cpu_s(pid), _own_cpu_s()
    try:
        elapsed = await _run_clients(clients, plan, tally)
    finally:
        cpu = tree_cpu_s(pid) - cpu_before
        own = _own_cpu_s() - own_before
        stop.set()
        await sampler
        for client in clients:
            client.close()
    await asyncio.sleep(0.2)  # let the loop flush the Terminate messages and close the sockets
    fds_back_s = await _settle(pid, before.fds, plan.settle_s)
    await asyncio.sleep(max(0.0, plan.settle_s - (fds_back_s or plan.settle_s)))
    after = snapshot(pid)
    backends["after"] = server_backends(stack)
    ms = {k: (v * 1000 if v is not None else None) for k, v in percentiles(tally.latencies).items()}
    return ScaleResult(
        plan.clients,
        round(elapsed, 3),
        connect_s,
        len(clients),
        connect_errors,
        tally.query_errors,
        tally.samples,
        len(tally.latencies),
        ms,
        before,
        peak[-1],
        after,
        plan.settle_s,
        fds_back_s,
        backends,
        cpu,
        own,
        nofile_limit(pid),
    )


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_scale(stack: Stack, plan: ScalePlan) -> ScaleResult:
    """measure_scale on uvloop (the sidecar's own loop), so the clients cost less CPU."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a pgsidecar dependency
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(measure_scale(stack, plan))
