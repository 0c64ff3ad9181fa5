"""Peak memory of a real pgsidecar under the loads that cost it memory: `python -m bench.memory`.

One TLS PostgreSQL and one sidecar (bench.stack). For each scenario the sidecar's peak RSS
(VmHWM) is reset first (`/proc/<pid>/clear_refs` = 5, Linux 4.0+) and read after, so every line
is that scenario's own peak. The last line is the figure the Kubernetes example's memory limit
is derived from: the largest peak seen, with 50 % margin, rounded up to 32 MiB.
"""

from __future__ import annotations

import argparse
import math
import socket
import struct
import subprocess
import time

import psycopg2

from bench.stack import Stack
from pgsidecar.wire import frontend as fe

MB = 1024 * 1024


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def rss_mib(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def peak_mib(pid: int) -> float:
    return _status(pid, "VmHWM") / 1024


class Raw:
    """A raw protocol client through the sidecar (plain loopback), reading replies to Z."""

    def __init__(self, stack: Stack) -> None:
        self.sock = socket.create_connection(("127.0.0.1", stack.sidecar_port), timeout=120)
        self.sock.sendall(fe.StartupMessage({"user": stack.user, "database": "postgres"}).encode())
        self._until(b"R")  # cleartext password request
        self.sock.sendall(fe.PasswordMessage(stack.password.encode()).encode())
        self.drain()

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return bytes(out)

    def _until(self, want: bytes) -> None:
        while True:
            t, ln = struct.unpack("!cI", self._read(5))
            self._skip(ln - 4)
            if t == want:
                return

    def _skip(self, n: int) -> None:
        while n:
            n -= len(self._read(min(n, 1 << 20)))

    def drain(self) -> None:
        self._until(b"Z")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.sendall(fe.Terminate().encode())
        self.sock.close()


def scenarios(stack: Stack, clients: int, big_mb: int, result_mb: int, waves: int):
    pid = stack.proxy_pid("pgsidecar")
    dsn = f"host=127.0.0.1 port={stack.sidecar_port} user={stack.user} password={stack.password} dbname=postgres sslmode=disable"
    big = "x" * (big_mb * MB)

    def one(label: str, action) -> tuple[str, float, float]:
        before = rss_mib(pid)
        reset_peak(pid)
        action()
        time.sleep(0.3)
        return label, before, peak_mib(pid)

    conns: list = []

    def open_idle() -> None:
        for _ in range(clients):
            conns.append(psycopg2.connect(dsn))

    def close_idle() -> None:
        for c in conns:
            c.close()
        conns.clear()

    def raw_query(sql: str) -> None:
        r = Raw(stack)
        r.send(fe.Query(sql).encode())
        r.drain()
        r.close()

    def unnamed_parse() -> None:
        r = Raw(stack)
        r.send(
            fe.Parse("", f"SELECT length('{big}')").encode()
            + b"B\x00\x00\x00\x0c"
            + b"\x00" * 8
            + fe.Execute("").encode()
            + fe.Sync().encode()
        )
        r.drain()
        r.close()

    def named_parse() -> None:
        r = Raw(stack)
        r.send(fe.Parse("kept", f"SELECT length('{big}')").encode() + fe.Sync().encode())
        r.drain()
        r.send(fe.Query("SELECT 1").encode())  # the idle point: the statement is now kept for replay
        r.drain()
        r.close()

    def result() -> None:
        env = stack.env("pgsidecar")
        sql = f"COPY (SELECT repeat('r', 1000) FROM generate_series(1, {result_mb * 1000})) TO STDOUT"
        subprocess.run(["psql", "-X", "-q", "-c", sql], env=env, stdout=subprocess.DEVNULL, check=True, timeout=600)

    def churn() -> None:
        for _ in range(waves):
            batch = [psycopg2.connect(dsn) for _ in range(clients)]
            for c in batch:
                c.close()

    yield one("baseline (one query)", lambda: raw_query("SELECT 1"))
    yield one(f"{clients} idle clients (TLS upstreams)", open_idle)
    yield one(f"{clients} clients close", close_idle)
    yield one(f"{big_mb} MB ErrorResponse", lambda: raw_query(f"SELECT repeat('e', {big_mb * MB})::int"))
    yield one(
        f"{big_mb} MB NoticeResponse",
        lambda: raw_query(f"DO $$ BEGIN RAISE NOTICE '%', repeat('n', {big_mb * MB}); END $$"),
    )
    yield one(f"{big_mb} MB simple Query", lambda: raw_query(f"SELECT length('{big}')"))
    yield one(f"{big_mb} MB unnamed Parse", unnamed_parse)
    yield one(f"{big_mb} MB named Parse (kept for replay)", named_parse)
    yield one(f"{result_mb} MB result (COPY TO STDOUT)", result)
    yield one(f"{waves} waves of {clients} connect/disconnect", churn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--result-mb", type=int, default=1000)
    parser.add_argument("--waves", type=int, default=3)
    args = parser.parse_args(argv)
    stack = Stack()
    try:
        stack.start()
        print(f"{'scenario':48} {'RSS before':>11} {'peak':>8} {'peak - before':>14}")
        worst = 0.0
        for label, before, peak in scenarios(stack, args.clients, args.big_mb, args.result_mb, args.waves):
            worst = max(worst, peak)
            print(f"{label:48} {before:9.1f} MiB {peak:6.1f} MiB {peak - before:10.1f} MiB", flush=True)
        limit = math.ceil(worst * 1.5 / 32) * 32
        print(f"largest peak {worst:.1f} MiB; with 50 % margin: memory limit {limit}Mi")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
