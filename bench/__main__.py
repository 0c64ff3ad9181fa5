"""`python -m bench [--quick]`: direct TLS vs the floor vs PgBouncer vs pgsidecar, interleaved.

Every path runs against the same throwaway server in the same round, in rotating order, so drift
(page cache, CPU boost, a noisy neighbour) lands on all of them alike; the medians over the rounds
are what the tables show. The floor is bench/floor.py, the bare uvloop relay, the reference for
what any Python hop costs; the ``-unix`` paths are the floor and pgsidecar reached over a unix
socket. A verdict line per target follows the tables. Results go to stdout and bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import churn, scale, workloads
from bench.report import (
    ALL_PATHS,
    PATHS,
    UNIX_PATHS,
    MemoryResult,
    Sample,
    format_churn,
    format_memory,
    format_reconnect,
    format_scale,
    format_table,
    format_verdict,
    summarize,
    to_json,
    verdicts,
)
from bench.stack import Stack

MEMORY_COUNTS = (0, 100, 1000)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s runs, scale 5: about 3 minutes")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument("--seconds", type=int, help="seconds per pgbench run (default 10, quick 3)")
    parser.add_argument("--scale", type=int, help="pgbench scale (default 10, quick 5)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: pgbench,bulk,memory,reconnect,scale,churn "
        "(scale: many clients querying through pgsidecar; churn: an idle session's reconnect "
        "while many clients connect and disconnect; both only when named)",
    )
    parser.add_argument(
        "--workloads",
        default="",
        help="comma-separated substrings: only the pgbench workloads whose name holds one "
        "(e.g. 'connect' or '-c1 simple,-c16 prepared'); default all",
    )
    parser.add_argument("--scale-clients", type=int, help="clients in the scale run (default 1000, quick 200)")
    parser.add_argument("--scale-seconds", type=float, help="seconds of the scale run (default 30, quick 10)")
    parser.add_argument("--churn-clients", type=int, help="clients in the churn run (default 1000, quick 200)")
    parser.add_argument("--churn-reps", type=int, help="terminations of the idle session (default 10, quick 3)")
    parser.add_argument("--churn-interval", type=float, help="seconds between terminations (default 2)")
    parser.add_argument(
        "--churn-max-concurrent",
        default=",".join(map(str, churn.DEFAULT_MAX_CONCURRENT)),
        help="comma-separated reconnect.max_concurrent values, one churn run each (default 8,2)",
    )
    parser.add_argument("--output", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seconds = args.seconds or (3 if args.quick else 10)
    args.scale = args.scale or (5 if args.quick else 10)
    args.parts = set(args.only.split(",")) if args.only else {"pgbench", "bulk", "memory", "reconnect"}
    wanted = [w for w in args.workloads.split(",") if w]
    args.pgbench = tuple(w for w in workloads.PGBENCH_WORKLOADS if not wanted or any(x in w.name for x in wanted))
    plan = scale.QUICK if args.quick else scale.FULL
    args.scale_plan = dataclasses.replace(
        plan,
        clients=args.scale_clients or plan.clients,
        seconds=args.scale_seconds or plan.seconds,
        accounts=args.scale * 100_000,
    )
    churn_plan = churn.QUICK if args.quick else churn.FULL
    args.churn_plan = dataclasses.replace(
        churn_plan,
        clients=args.churn_clients or churn_plan.clients,
        reps=args.churn_reps or churn_plan.reps,
        interval_s=args.churn_interval or churn_plan.interval_s,
    )
    args.churn_max_concurrent = tuple(int(v) for v in args.churn_max_concurrent.split(",") if v)
    return args


def _machine() -> dict:
    """The facts a reader needs to compare numbers: cores, CPU model, memory, versions."""

    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    model = next(
        (line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines() if line.startswith("Model name")),
        platform.processor(),
    )
    mem = next((line.split()[1] for line in run(["free", "-h"]).splitlines() if line.startswith("Mem:")), "")
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pgbouncer": run(["pgbouncer", "--version"]).splitlines()[0:1],
        "pgbench": run(["pgbench", "--version"]),
    }


def _raise_nofile() -> None:
    """A thousand idle clients need ~2 descriptors each in this process and in each proxy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _rotated(round_no: int) -> tuple[str, ...]:
    """Every path once, the order shifted by one each round (the unix paths run fewer workloads)."""
    shift = round_no % len(ALL_PATHS)
    return ALL_PATHS[shift:] + ALL_PATHS[:shift]


def run(args: argparse.Namespace, stack: Stack) -> int:
    started = time.monotonic()
    samples: dict[str, dict[str, list[Sample]]] = {}
    units: dict[str, str] = {}
    bulk_peak: dict[str, int] = {}
    memory: list[MemoryResult] = []
    reconnect: list[float] = []
    if args.parts != {"churn"}:  # the churn run uses no tables
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        workloads.pgbench_init(stack, args.scale)
    sizes = (
        {sql: workloads.bulk_bytes(stack, sql) for _, sql in workloads.BULK_WORKLOADS} if "bulk" in args.parts else {}
    )
    if "memory" in args.parts:
        # First, on fresh proxies: RSS grown by earlier workloads would hide the per-client cost.
        for path in ("pgbouncer", "pgsidecar"):
            print(f"memory: {path} ...", flush=True)
            memory.append(asyncio.run(workloads.measure_memory(stack, path, MEMORY_COUNTS)))
            if path == "pgbouncer":
                stack.restart_bouncer()
    for round_no in range(args.rounds):
        for path in _rotated(round_no):
            unix = path in UNIX_PATHS
            todo = [wl for wl in args.pgbench if wl.unix or not unix] if "pgbench" in args.parts else []
            if not todo and (unix or "bulk" not in args.parts):
                continue
            print(f"round {round_no + 1}/{args.rounds}: {path} ...", flush=True)
            for wl in todo:
                sample = workloads.run_pgbench(stack, path, wl, args.seconds)
                units[wl.name] = "tps"
                by_path = samples.setdefault(wl.name, {p: [] for p in PATHS})
                by_path.setdefault(path, []).extend([sample] if sample else [])
            if "bulk" in args.parts and not unix:
                for name, sql in workloads.BULK_WORKLOADS:
                    sample, peak = workloads.run_bulk(stack, path, sql, sizes[sql])
                    units[name] = "MB/s"
                    samples.setdefault(name, {p: [] for p in PATHS})[path] += [sample] if sample else []
                    if peak is not None:
                        bulk_peak[path] = max(bulk_peak.get(path, 0), peak)
    if "reconnect" in args.parts:
        for round_no in range(args.rounds):
            print(f"reconnect {round_no + 1}/{args.rounds} ...", flush=True)
            seconds = asyncio.run(workloads.measure_reconnect(stack))
            reconnect += [seconds] if seconds is not None else []
    scaled = None
    if "scale" in args.parts:
        plan = args.scale_plan
        print(f"scale: {plan.clients} clients x {plan.seconds:g} s through pgsidecar ...", flush=True)
        scaled = scale.run_scale(stack, plan)
    churned = []
    if "churn" in args.parts:
        churn_plan = args.churn_plan
        print(
            f"churn: {churn_plan.clients} clients connecting and disconnecting; idle session terminated "
            f"every {churn_plan.interval_s:g} s x {churn_plan.reps} ...",
            flush=True,
        )
        churned = churn.run_churn(stack, churn_plan, args.churn_max_concurrent)
    summaries = [summarize(name, units[name], by_path) for name, by_path in samples.items()]
    print()
    for summary in summaries:
        print(format_table(summary), end="\n\n")
    if memory:
        print(format_memory(memory, MEMORY_COUNTS), end="\n\n")
    if bulk_peak:
        print(
            "proxy RSS growth during a bulk read, largest (KiB): "
            + ", ".join(f"{p} {kib:,}" for p, kib in bulk_peak.items()),
            end="\n\n",
        )
    if "reconnect" in args.parts:
        print(format_reconnect(reconnect), end="\n\n")
    if scaled is not None:
        print(format_scale(scaled), end="\n\n")
    for result in churned:
        print(format_churn(result), end="\n\n")
    judged = verdicts(summaries)
    if judged:
        print("against issue 13's targets (printed, not asserted):")
        for verdict in judged:
            print(format_verdict(verdict))
        print()
    meta = {
        "machine": _machine(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "scale": args.scale,
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
        "bulk_bytes": {name: sizes.get(sql) for name, sql in workloads.BULK_WORKLOADS},
        "bulk_rss_growth_kib": bulk_peak,
    }
    Path(args.output).write_text(to_json(meta, summaries, memory, reconnect, scaled, churned, judged) + "\n")
    print(f"wrote {args.output} ({meta['elapsed_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _raise_nofile()
    stack = Stack()
    try:
        print("starting PostgreSQL (TLS), the floor, PgBouncer, pgsidecar ...", flush=True)
        stack.start()
        return run(args, stack)
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
