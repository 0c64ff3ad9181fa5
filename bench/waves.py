"""RSS of a real pgsidecar after each wave of upstream TLS connections: `python -m bench.waves`.

Issue 13 item 4, end to end (bench/tlschurn.py isolates the cause without pgsidecar). One TLS
PostgreSQL and one sidecar (bench.stack; `BENCH_SIDECAR_SRC=<checkout>` measures another tree's
pgsidecar). A wave opens `--clients` psycopg2 connections through the sidecar, each of which
makes the sidecar open its own TLS connection upstream, holds them all, closes them all, and
waits `--settle` seconds (longer than runtime/heap.py's trim delay) before the sidecar's RSS is
read. Flat means: RSS after the last wave within 10 % of the first.
"""

from __future__ import annotations

import argparse
import time

import psycopg2

from bench.memory import rss_mib
from bench.stack import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.waves", description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000, help="connections per wave, all open at once")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after a wave before RSS is read")
    args = parser.parse_args(argv)
    stack = Stack()
    try:
        stack.start()
        pid = stack.proxy_pid("pgsidecar")
        dsn = f"host=127.0.0.1 port={stack.sidecar_port} user={stack.user} dbname=postgres sslmode=disable"
        print(f"sidecar RSS at start: {rss_mib(pid):.1f} MiB", flush=True)
        after: list[float] = []
        for wave in range(1, args.waves + 1):
            batch = [psycopg2.connect(dsn, password=stack.password) for _ in range(args.clients)]
            held = rss_mib(pid)
            for conn in batch:
                conn.close()
            time.sleep(args.settle)
            after.append(rss_mib(pid))
            print(f"wave {wave:2}: {held:7.1f} MiB with {args.clients} open, {after[-1]:7.1f} MiB after", flush=True)
        first, last = after[0], after[-1]
        print(
            "after each wave (MiB): " + " -> ".join(f"{x:.1f}" for x in after),
            f"\nlast / first = {last / first:.3f} (flat: <= 1.10); last / second = {last / after[min(1, len(after) - 1)]:.3f}",
        )
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
