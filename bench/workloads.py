"""The measurements: pgbench runs, bulk reads, idle-client memory and reconnect time.

Each function measures one path once and returns numbers; __main__ interleaves them over the
rounds and report.py turns them into tables. pgbench and psql are the clients, so every path is
driven by the same libpq code an application would use.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from bench.pgclient import MiniClient
from bench.report import MemoryResult, Sample, percentiles
from bench.stack import Stack, tree_cpu_split, tree_rss_kib


@dataclass(frozen=True, slots=True)
class PgbenchWorkload:
    """One pgbench invocation; `args` exclude duration and connection settings. `latencies`: log
    every transaction's latency (pgbench --log) for p50 / p99; `unix`: also run over the unix
    sockets of the floor and pgsidecar."""

    name: str
    args: tuple[str, ...]
    latencies: bool = False
    unix: bool = False


PGBENCH_WORKLOADS = (
    PgbenchWorkload("select-only -c1 simple", ("-S", "-c1", "-j1", "-M", "simple"), latencies=True, unix=True),
    PgbenchWorkload("select-only -c1 prepared", ("-S", "-c1", "-j1", "-M", "prepared"), latencies=True),
    PgbenchWorkload("select-only -c16 simple", ("-S", "-c16", "-j2", "-M", "simple")),
    PgbenchWorkload("select-only -c16 prepared", ("-S", "-c16", "-j2", "-M", "prepared"), unix=True),
    PgbenchWorkload("tpc-b -c8", ("-c8", "-j2", "-M", "simple")),
    PgbenchWorkload("connect per txn -C -S -c4", ("-C", "-S", "-c4", "-j2", "-M", "simple")),
)

BULK_WORKLOADS = (
    ("bulk COPY pgbench_accounts TO STDOUT", "COPY pgbench_accounts TO STDOUT"),
    ("bulk SELECT 3M rows", "SELECT g, repeat('x', 20) FROM generate_series(1, 3000000) g"),
)

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_TXNS = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def pgbench_init(stack: Stack, scale: int) -> None:
    """Create the pgbench tables directly (TLS), then VACUUM ANALYZE once so runs can use -n."""
    out = subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(scale)], env=stack.env("direct"), capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {out.stderr.strip()}")


def transaction_latencies_us(prefix: str) -> list[float]:
    """The per-transaction latencies (us) pgbench --log wrote to prefix.<pid>[.<thread>]: without
    --aggregate-interval each line is "client_id transaction_no time script_no time_epoch time_us",
    `time` the transaction's elapsed microseconds (pgbench docs, "Per-Transaction Logging")."""
    values: list[float] = []
    for name in glob.glob(glob.escape(prefix) + ".*"):
        with open(name) as fh:
            values += [float(fields[2]) for line in fh if len(fields := line.split()) >= 6]
    return values


def run_pgbench(stack: Stack, path: str, workload: PgbenchWorkload, seconds: int) -> Sample | None:
    """One pgbench run; None (and a line on stdout) when the run failed. The proxy's utime and
    stime (/proc/<pid>/stat) are read just before and just after, and divided by the transactions."""
    with tempfile.TemporaryDirectory(prefix="pgbench-log-") as logdir:
        prefix = os.path.join(logdir, "txn")
        logging = ("--log", f"--log-prefix={prefix}") if workload.latencies else ()
        argv = ["pgbench", "-n", "-T", str(seconds), *logging, *workload.args]
        pid = stack.proxy_pid(path) if path != "direct" else 0
        before = tree_cpu_split(pid) if pid else (0.0, 0.0)
        out = subprocess.run(
            argv, env=stack.env(path), capture_output=True, text=True, timeout=seconds + 120, cwd=logdir
        )
        after = tree_cpu_split(pid) if pid else (0.0, 0.0)
        tps, latency = _TPS.search(out.stdout), _LATENCY.search(out.stdout)
        if out.returncode != 0 or tps is None:
            print(f"  ! {workload.name} via {path} failed (rc {out.returncode}): {out.stderr.strip()[-300:]}")
            return None
        lat = percentiles(transaction_latencies_us(prefix), (50, 99)) if workload.latencies else {}
    txns_match = _TXNS.search(out.stdout)
    txns = int(txns_match.group(1)) if txns_match else 0
    user, system = (
        ((after[0] - before[0]) / txns * 1e6, (after[1] - before[1]) / txns * 1e6) if pid and txns else (None, None)
    )
    return Sample(
        float(tps.group(1)),
        float(latency.group(1)) if latency else None,
        user + system if user is not None and system is not None else None,
        user,
        system,
        lat.get("p50"),
        lat.get("p99"),
    )


def _psql(sql: str) -> list[str]:
    """psql unaligned, tuples only: the client formats as little as it can."""
    return ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]


def bulk_bytes(stack: Stack, sql: str) -> int:
    """The size of the result as psql writes it, counted once (untimed) on the direct path."""
    proc = subprocess.Popen(_psql(sql), env=stack.env("direct"), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    if proc.wait(600) != 0:
        raise RuntimeError(f"psql failed counting bytes of {sql!r}")
    return total


class RssPeak:
    """Samples a process tree's RSS every 50 ms in a thread; `peak_kib` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self._stop = pid, threading.Event()
        self.start_kib = self.peak_kib = tree_rss_kib(pid)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_bulk(stack: Stack, path: str, sql: str, nbytes: int) -> tuple[Sample | None, int | None]:
    """One bulk read to /dev/null: (MB/s with the run's time as latency, proxy RSS growth KiB)."""
    monitor = RssPeak(stack.proxy_pid(path)) if path != "direct" else None
    start = time.perf_counter()
    if monitor is not None:
        monitor.__enter__()
    try:
        out = subprocess.run(
            _psql(sql), env=stack.env(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600
        )
    finally:
        elapsed = time.perf_counter() - start
        if monitor is not None:
            monitor.__exit__()
    if out.returncode != 0:
        print(f"  ! bulk via {path} failed: {out.stderr.strip()[-300:]}")
        return None, None
    growth = monitor.peak_kib - monitor.start_kib if monitor else None
    return Sample(nbytes / elapsed / 1e6, elapsed * 1000), growth


async def _open_idle(stack: Stack, path: str, count: int, clients: list[MiniClient]) -> None:
    """Open `count` more sessions, each past startup and one query (so PgBouncer links a server)."""
    gate = asyncio.Semaphore(32)

    async def one() -> None:
        async with gate:
            client = MiniClient(stack.port(path), stack.user, stack.password)
            await client.connect()
            await client.query("SELECT 1")
            clients.append(client)

    await asyncio.gather(*(one() for _ in range(count)))


async def _settled_rss(pid: int) -> int:
    """RSS once the proxy has had a moment to finish what the last logins started."""
    await asyncio.sleep(1.0)
    return tree_rss_kib(pid)


async def measure_memory(stack: Stack, path: str, counts: tuple[int, ...]) -> MemoryResult:
    """RSS of the proxy with 0, 100, 1000 (`counts`) idle sessions held open at once."""
    pid = stack.proxy_pid(path)
    clients: list[MiniClient] = []
    rss: dict[int, int] = {}
    try:
        for count in sorted(counts):
            await _open_idle(stack, path, count - len(clients), clients)
            rss[count] = await _settled_rss(pid)
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.5)
    return MemoryResult(path, rss)


def _postmaster_ready(datadir: str, old_pid: int) -> bool:
    """postmaster.pid names a new postmaster whose status line says "ready" (accepting)."""
    try:
        with open(os.path.join(datadir, "postmaster.pid")) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return False
    return len(lines) >= 8 and lines[0].strip() != str(old_pid) and lines[7].strip() == "ready"


async def measure_reconnect(stack: Stack, deadline_s: float = 60.0) -> float | None:
    """Seconds from the restarted server accepting to the first successful query of an idle client."""
    assert stack.cluster is not None
    cluster = stack.cluster
    client = MiniClient(stack.port("pgsidecar"), stack.user, stack.password)
    await client.connect()
    await client.query("SELECT 1")
    old_pid = cluster.pid
    restart = threading.Thread(target=cluster.restart, args=("fast",), daemon=True)
    restart.start()
    try:
        deadline = time.monotonic() + deadline_s
        while not _postmaster_ready(cluster.datadir, old_pid):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.002)
        back = time.perf_counter()
        while time.monotonic() < deadline:
            try:
                await client.query("SELECT 1")
                return time.perf_counter() - back
            except Exception as exc:  # noqa: BLE001 - an error the client saw: the reconnect was not transparent
                print(f"  ! reconnect query failed: {exc}")
                if "connection closed" in str(exc):
                    return None
        return None
    finally:
        client.close()
        restart.join(90)
