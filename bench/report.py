"""Medians, ratios, tables and JSON for the benchmark: pure functions, no processes, no clocks.

Kept apart from the runners so the arithmetic and the layout are unit-tested with fake numbers
(tests/unit/test_bench_report.py) and a real run is only ever needed for the numbers themselves.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

PATHS = ("direct", "pgbouncer", "pgsidecar")
#: The two ratios every table ends with (issue 7's targets are stated in them).
RATIOS = (("pgsidecar", "direct"), ("pgsidecar", "pgbouncer"))


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of one path in one round: `value` in the workload's unit; `cpu_us` is the
    proxy's CPU time per transaction (user + system), the cost a 2-core host pays for the hop."""

    value: float
    latency_ms: float | None = None
    cpu_us: float | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """One workload over all rounds: the medians per path and the ratios between them."""

    name: str
    unit: str
    samples: dict[str, list[Sample]]
    median: dict[str, float | None] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_us: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)


def median(values: list[float]) -> float | None:
    """The median, or None when nothing was measured (a path that failed every round)."""
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def summarize(name: str, unit: str, samples: dict[str, list[Sample]]) -> Summary:
    """Medians of value and latency per path (latency median taken on its own), then the ratios."""
    medians = {p: median([s.value for s in samples.get(p, [])]) for p in PATHS if p in samples}
    latencies = {p: median([s.latency_ms for s in samples[p] if s.latency_ms is not None]) for p in medians}
    cpu = {p: median([s.cpu_us for s in samples[p] if s.cpu_us is not None]) for p in medians}
    ratios = {f"{a}/{b}": ratio(medians.get(a), medians.get(b)) for a, b in RATIOS if a in medians and b in medians}
    return Summary(name, unit, {p: list(v) for p, v in samples.items()}, medians, latencies, cpu, ratios)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_table(summary: Summary) -> str:
    """One workload: a row per path (median value, median latency, the rounds), then the ratios."""
    lines = [
        f"== {summary.name} ({summary.unit}, median of {_rounds(summary)})",
        f"{'path':<11}{summary.unit:>12}{'latency ms':>12}{'proxy cpu us':>14}   rounds",
    ]
    for path, value in summary.median.items():
        rounds = " ".join(_num(s.value) for s in summary.samples.get(path, []))
        lines.append(
            f"{path:<11}{_num(value):>12}{_num(summary.latency_ms.get(path), 3):>12}"
            f"{_num(summary.cpu_us.get(path), 1):>14}   {rounds}"
        )
    ratios = "   ".join(f"{name} = {_num(value, 2)}" for name, value in summary.ratios.items())
    if ratios:
        lines.append(ratios)
    return "\n".join(lines)


def _rounds(summary: Summary) -> int:
    return max((len(v) for v in summary.samples.values()), default=0)


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """RSS of one proxy (KiB) with N idle clients open, keyed by N."""

    path: str
    rss_kib: dict[int, int]

    def per_client_kib(self, clients: int) -> float | None:
        if 0 not in self.rss_kib or clients not in self.rss_kib or clients == 0:
            return None
        return (self.rss_kib[clients] - self.rss_kib[0]) / clients


def format_memory(results: list[MemoryResult], counts: tuple[int, ...]) -> str:
    """RSS at each idle-client count and the growth per client, plus pgsidecar/pgbouncer at the most."""
    head = "".join(f"{f'RSS@{n}':>11}" for n in counts)
    per = "".join(f"{f'KiB/cl@{n}':>12}" for n in counts if n)
    lines = ["== memory: proxy RSS with idle clients (KiB)", f"{'path':<11}{head}{per}"]
    for result in results:
        cells = "".join(f"{_num(result.rss_kib.get(n), 0):>11}" for n in counts)
        cells += "".join(f"{_num(result.per_client_kib(n), 1):>12}" for n in counts if n)
        lines.append(f"{result.path:<11}{cells}")
    by_path = {r.path: r for r in results}
    if "pgsidecar" in by_path and "pgbouncer" in by_path and counts:
        most = max(counts)
        value = ratio(by_path["pgsidecar"].per_client_kib(most), by_path["pgbouncer"].per_client_kib(most))
        lines.append(f"pgsidecar/pgbouncer (KiB per idle client at {most}) = {_num(value, 2)}")
    return "\n".join(lines)


def format_reconnect(seconds: list[float]) -> str:
    """Server back -> first successful query of an idle client through pgsidecar."""
    rounds = " ".join(f"{s:.3f}" for s in seconds) or "-"
    return (
        "== reconnect: server accepting again -> idle client's first query through pgsidecar\n"
        f"median {_num(median(seconds), 3)} s   rounds {rounds}"
    )


def to_json(
    meta: dict,
    summaries: list[Summary],
    memory: list[MemoryResult],
    reconnect_s: list[float],
    scale: ScaleResult | None = None,
    churn: list[ChurnResult] | None = None,
) -> str:
    """Everything the tables show, plus every round, as one JSON document."""
    doc = {
        "meta": meta,
        "workloads": [asdict(s) for s in summaries],
        "memory": [
            {
                "path": m.path,
                "rss_kib": {str(k): v for k, v in m.rss_kib.items()},
                "per_client_kib": {str(n): m.per_client_kib(n) for n in m.rss_kib if n},
            }
            for m in memory
        ],
        "reconnect_s": {"rounds": reconnect_s, "median": median(reconnect_s)},
    }
    if scale is not None:
        doc["scale"] = scale_json(scale)
    if churn:
        doc["churn"] = [asdict(c) for c in churn]
    return json.dumps(doc, indent=2, sort_keys=False)


@dataclass(frozen=True, slots=True)
class ProcessSnapshot:
    """What a leak would show in a process from outside: open descriptors, RSS, threads."""

    fds: int
    rss_kib: int
    threads: int


@dataclass(frozen=True, slots=True)
class ScaleResult:
    """Many clients querying at once through one pgsidecar, and the sidecar before, during, after.

    `during` holds the largest values sampled while the clients were connected; `after` is taken
    `settle_s` after the last client closed; `fds_back_s` is how long the descriptors took to fall
    back to the baseline (None: they never did within `settle_s`, a leak).
    """

    clients: int
    seconds: float
    connect_s: float
    connected: int
    connect_errors: int
    query_errors: int
    error_samples: list[str]
    queries: int
    latency_ms: dict[str, float | None]
    before: ProcessSnapshot
    during: ProcessSnapshot
    after: ProcessSnapshot
    settle_s: float
    fds_back_s: float | None
    backends: dict[str, int | None]
    sidecar_cpu_s: float | None = None
    client_cpu_s: float | None = None
    nofile: int | None = None

    @property
    def errors(self) -> int:
        return self.connect_errors + self.query_errors

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles and the maximum, keyed "p50", ..., "max"; None for no values."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for point in points:
        rank = -(-point * len(ordered) // 100)  # ceil(p/100 * n), nearest-rank definition
        out[f"p{point}"] = ordered[max(rank, 1) - 1] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    return out


def format_scale(result: ScaleResult) -> str:
    """Throughput, errors and latency, then the sidecar's descriptors, RSS and threads over time."""
    lat = "   ".join(f"{k} {_num(v, 3)}" for k, v in result.latency_ms.items())
    lines = [
        f"== scale: {result.clients} clients x {result.seconds:.1f} s through one pgsidecar "
        "(simple protocol: SELECT 1 / pgbench_accounts by aid)",
        f"queries {result.queries:,}   queries/s {_num(result.qps)}   errors {result.errors} "
        f"(connect {result.connect_errors}, query {result.query_errors})   "
        f"connected {result.connected}/{result.clients} in {result.connect_s:.1f} s",
        f"latency ms   {lat}",
        f"{'':<18}{'before':>10}{'during':>10}{'after':>10}",
    ]
    for label, attr in (("sidecar open fds", "fds"), ("sidecar RSS KiB", "rss_kib"), ("sidecar threads", "threads")):
        cells = "".join(f"{_num(getattr(s, attr), 0):>10}" for s in (result.before, result.during, result.after))
        lines.append(f"{label:<18}{cells}")
    cells = "".join(f"{_num(result.backends.get(k), 0):>10}" for k in ("before", "during", "after"))
    lines.append(f"{'server backends':<18}{cells}")
    if result.fds_back_s is None:
        verdict = f"NO: {result.after.fds - result.before.fds} more than before, {result.settle_s:g} s later"
    else:
        verdict = f"yes, {result.fds_back_s:.1f} s after the last client closed"
    lines.append(f"fds back to baseline: {verdict}")
    if result.sidecar_cpu_s is not None and result.queries:
        per_query_us = result.sidecar_cpu_s / result.queries * 1e6
        lines.append(
            f"sidecar cpu {result.sidecar_cpu_s:.1f} s ({per_query_us:.1f} us/query); "
            f"bench client cpu {_num(result.client_cpu_s)} s; sidecar nofile {result.nofile}"
        )
    lines += [f"  ! {sample}" for sample in result.error_samples]
    return "\n".join(lines)


def scale_json(result: ScaleResult) -> dict:
    """The scale run as plain data, with the derived totals a reader would otherwise recompute."""
    return {**asdict(result), "errors": result.errors, "qps": result.qps}


#: Issue 10's figure for the same scenario before the priority gate (one FIFO semaphore).
CHURN_BEFORE_GATE = "5-9 s as reported in issue 10"


@dataclass(frozen=True, slots=True)
class ChurnResult:
    """The churn run: `reconnect_s` holds one idle session's transparent reconnect time per rep
    (drop records' reconnect.duration_s) while `clients` loops connect and disconnect."""

    clients: int
    reps: int
    interval_s: float
    seconds: float
    cycles: int
    cycles_per_s: float | None
    connect_errors: int
    error_samples: list[str]
    connect_ms: dict[str, float | None]
    reconnect_s: list[float]
    failed_reps: int
    rep_samples: list[str]
    max_concurrent: int | None = None  # the sidecar's reconnect.max_concurrent in this run
    gate_connecting: list[float] = field(default_factory=list)  # upstream connects in progress or
    # waiting at the gate, sampled just before each terminate (the first logins a reconnect meets)


def format_churn(result: ChurnResult) -> str:
    """Reconnect min / median / max over the reps, and what the churn itself achieved."""
    secs = result.reconnect_s
    low, mid, high = (min(secs), median(secs), max(secs)) if secs else (None, None, None)
    connect = "   ".join(f"{k} {_num(v, 1)}" for k, v in result.connect_ms.items())
    gate = result.gate_connecting
    gate_text = (
        (
            f"   connects in progress or waiting at the gate before each terminate: "
            f"min {min(gate):,.0f} median {median(gate):,.0f} max {max(gate):,.0f}"
        )
        if gate
        else ""
    )
    lines = [
        f"== churn: {result.clients} clients connecting and disconnecting through pgsidecar "
        f"(reconnect.max_concurrent {result.max_concurrent if result.max_concurrent is not None else '?'}); "
        f"an idle session's backend terminated every {result.interval_s:g} s",
        f"transparent reconnect s   min {_num(low, 3)}   median {_num(mid, 3)}   max {_num(high, 3)}   "
        f"({len(secs)} of {result.reps} reps; target < 1 s; before the priority gate: {CHURN_BEFORE_GATE})",
        f"reps {' '.join(f'{s:.3f}' for s in secs) or '-'}   failed {result.failed_reps}",
        f"churn: {result.cycles:,} connect+query+disconnect cycles in {result.seconds:g} s "
        f"({_num(result.cycles_per_s)}/s while terminating)   connect errors {result.connect_errors}",
        f"first-login connect ms   {connect}{gate_text}",
    ]
    lines += [f"  ! {sample}" for sample in result.error_samples + result.rep_samples]
    return "\n".join(lines)
