"""The churn run: an idle session's transparent reconnect while a thousand clients come and go.

Issue 10 item 5 ("reconnects first"): `clients` loops each connect through pgsidecar, run
`SELECT 1` and disconnect, over and over, so the sidecar's connect gate (runtime/gate.py) always
has a queue of first logins. Meanwhile one idle session (application_name `bench-churn-idle`)
has its backend ended with `pg_terminate_backend` every `interval_s`; each time, its drop record
(the sidecar's drop log) gives `reconnect.duration_s`, drop to usable new session, and the
session's next query must then succeed. Before the gate, reconnects queued FIFO behind the first
logins: 5-9 s as reported in issue 10. The target is under 1 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import urllib.request
from dataclasses import dataclass, field

from bench.pgclient import MiniClient, PgError
from bench.report import ChurnResult, percentiles
from bench.stack import Stack
from pgsidecar.observe.metrics import sample_value

IDLE_APP = "bench-churn-idle"
CHURN_APP = "bench-churn"


@dataclass(frozen=True, slots=True)
class ChurnPlan:
    """Every loop below is bounded by these numbers."""

    clients: int = 1000
    reps: int = 10
    max_concurrent: int = 8  # the sidecar's reconnect.max_concurrent for this run (8: its default)
    interval_s: float = 2.0
    warmup_s: float = 5.0  # churn before the first terminate, so the gate's queue is full
    spread_s: float = 1.0  # each churn loop starts at a random point within this
    connect_timeout_s: float = 60.0
    drop_timeout_s: float = 30.0
    max_cycles_per_client: int = 1_000_000
    grace_s: float = 30.0


FULL = ChurnPlan()
QUICK = ChurnPlan(clients=200, reps=3)
#: reconnect.max_concurrent values run by default: the default, and 2, which on a small machine
#: keeps nearly every churning first login waiting at the connect gate (see the gate samples).
DEFAULT_MAX_CONCURRENT = (8, 2)


@dataclass(slots=True)
class ChurnTally:
    connect_s: list[float] = field(default_factory=list)
    cycles: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(text)


async def _churn_loop(stack: Stack, plan: ChurnPlan, stop: asyncio.Event, seed: int, tally: ChurnTally) -> None:
    """Connect, SELECT 1, disconnect, until `stop` (or the cycle cap)."""
    await asyncio.sleep(random.Random(seed).uniform(0, plan.spread_s))
    port, clock = stack.port("pgsidecar"), time.perf_counter
    for _ in range(plan.max_cycles_per_client):
        if stop.is_set():
            return
        client = MiniClient(port, stack.user, stack.password, application_name=CHURN_APP)
        began = clock()
        try:
            await asyncio.wait_for(client.connect(), plan.connect_timeout_s)
            tally.connect_s.append(clock() - began)
            await asyncio.wait_for(client.query("SELECT 1"), plan.connect_timeout_s)
            tally.cycles += 1
        except (TimeoutError, PgError, OSError) as exc:
            tally.error(f"churn: {exc!r}")
            await asyncio.sleep(0.1)  # a refusing sidecar is not hammered in a tight loop
        finally:
            client.close()


def _idle_drops(path: str) -> list[dict]:
    """The drop records of the idle session, in the order the sidecar wrote them."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if (record.get("client") or {}).get("application_name") == IDLE_APP:
            out.append(record)
    return out


async def _wait_drop(path: str, count: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        drops = _idle_drops(path)
        if len(drops) >= count:
            return drops[count - 1]
        await asyncio.sleep(0.02)
    return None


def _connecting(metrics_port: int) -> float | None:
    """Upstream connects in progress or waiting at the gate (pgsidecar_upstream_connections)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return sample_value(text, "pgsidecar_upstream_connections", {"state": "connecting"})


async def _terminate_reps(
    stack: Stack,
    plan: ChurnPlan,
    idle: MiniClient,
    admin: MiniClient,
    offset: int,
    samples: list[str],
    gate: list[float],
) -> tuple[list[float], int]:
    """Every `interval_s`: terminate the idle session's backend, read its drop record, query it."""
    seconds, failed = [], 0
    loop = asyncio.get_running_loop()
    for rep in range(plan.reps):
        began = time.monotonic()
        if stack.metrics_port:  # how many first logins the reconnect is about to meet at the gate
            waiting = await loop.run_in_executor(None, _connecting, stack.metrics_port)
            gate += [waiting] if waiting is not None else []
        ended = await admin.query(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{IDLE_APP}'"
        )
        drop = await _wait_drop(stack.drop_log, offset + rep + 1, plan.drop_timeout_s) if ended == 1 else None
        ok = bool(
            drop is not None and drop.get("impact") == "transparent" and (drop.get("reconnect") or {}).get("succeeded")
        )
        try:
            await asyncio.wait_for(idle.query("SELECT 1"), plan.drop_timeout_s)
        except (TimeoutError, PgError, OSError) as exc:
            ok = False
            samples.append(f"rep {rep + 1}: the idle session's next query failed: {exc!r}")
        if ok and drop is not None:
            seconds.append(float(drop["reconnect"]["duration_s"]))
            print(f"  rep {rep + 1}/{plan.reps}: reconnect {seconds[-1]:.3f} s", flush=True)
        else:
            failed += 1
            samples.append(f"rep {rep + 1}: no transparent reconnect (terminated {ended}): {drop!r}"[:400])
            if drop is None:
                break  # the log is out of step now; later reps could not be matched
        await asyncio.sleep(max(0.0, plan.interval_s - (time.monotonic() - began)))
    return seconds, failed


async def measure_churn(stack: Stack, plan: ChurnPlan) -> ChurnResult:
    port = stack.port("pgsidecar")
    idle = MiniClient(port, stack.user, stack.password, application_name=IDLE_APP)
    admin = MiniClient(port, stack.user, stack.password, application_name="bench-churn-admin")
    await idle.connect()
    await idle.query("SELECT 1")
    await admin.connect()
    offset = len(_idle_drops(stack.drop_log))  # records of an earlier churn run in this stack
    tally, stop = ChurnTally(), asyncio.Event()
    samples: list[str] = []
    gate: list[float] = []
    began = time.monotonic()
    loops = [asyncio.ensure_future(_churn_loop(stack, plan, stop, i, tally)) for i in range(plan.clients)]
    try:
        await asyncio.sleep(plan.warmup_s)
        cycles_at_start = tally.cycles
        reps_began = time.monotonic()
        seconds, failed = await _terminate_reps(stack, plan, idle, admin, offset, samples, gate)
        reps_elapsed = time.monotonic() - reps_began
        cycles_during = tally.cycles - cycles_at_start
    finally:
        stop.set()
        _, pending = await asyncio.wait(loops, timeout=plan.connect_timeout_s + plan.grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        idle.close()
        admin.close()
    ms = {k: (v * 1000 if v is not None else None) for k, v in percentiles(tally.connect_s).items()}
    return ChurnResult(
        plan.clients,
        plan.reps,
        plan.interval_s,
        round(time.monotonic() - began, 1),
        tally.cycles,
        round(cycles_during / reps_elapsed, 1) if reps_elapsed else None,
        tally.errors,
        tally.samples,
        ms,
        seconds,
        failed,
        samples,
        plan.max_concurrent,
        gate,
    )


def run_churn(stack: Stack, plan: ChurnPlan, max_concurrent: tuple[int, ...]) -> list[ChurnResult]:
    """measure_churn once per reconnect.max_concurrent value, each on a fresh sidecar with its
    metrics listener, on uvloop (so the thousand client loops cost the shared CPUs less); the
    stack's sidecar is back to its start settings afterwards."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a pgsidecar dependency
        factory = asyncio.new_event_loop
    results = []
    try:
        for limit in max_concurrent:
            stack.restart_sidecar({"PGSIDECAR_RECONNECT_MAX_CONCURRENT": str(limit)}, metrics=True)
            print(f"  reconnect.max_concurrent {limit}:", flush=True)
            with asyncio.Runner(loop_factory=factory) as runner:
                results.append(runner.run(measure_churn(stack, dataclasses.replace(plan, max_concurrent=limit))))
    finally:
        stack.restart_sidecar()
    return results
