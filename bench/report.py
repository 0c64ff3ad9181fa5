"""Medians, ratios, tables and JSON for the benchmark: pure functions, no processes, no clocks.

Kept apart from the runners so the arithmetic and the layout are unit-tested with fake numbers
(tests/unit/test_bench_report.py) and a real run is only ever needed for the numbers themselves.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

#: The paths every round measures, in every workload: direct TLS, the bare relay (the floor:
#: bench/floor.py, the least a uvloop hop can cost), PgBouncer and pgsidecar.
PATHS = ("direct", "floor", "pgbouncer", "pgsidecar")
#: The app reaching the floor and pgsidecar over a unix socket (their upstream is TLS over TCP as
#: ever), in the workloads marked for it only. PgBouncer is compared over TCP, as the target says.
UNIX_PATHS = ("floor-unix", "pgsidecar-unix")
ALL_PATHS = PATHS + UNIX_PATHS
#: Throughput ratios, each printed when both paths were measured.
RATIOS = (
    ("pgsidecar", "direct"),
    ("pgsidecar", "floor"),
    ("pgsidecar", "pgbouncer"),
    ("pgsidecar-unix", "pgbouncer"),
    ("pgsidecar-unix", "floor-unix"),
)
#: Proxy CPU per transaction ratios.
CPU_RATIOS = (("pgsidecar", "floor"), ("pgsidecar", "pgbouncer"), ("pgsidecar-unix", "floor-unix"))
#: Latency added per round trip over direct TLS (p50 minus direct's p50), for these paths.
ADDED_LATENCY = ("floor", "pgbouncer", "pgsidecar", "floor-unix", "pgsidecar-unix")


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of one path in one round: `value` in the workload's unit; `cpu_us` is the
    proxy's CPU time per transaction (user + system), the cost a 2-core host pays for the hop, and
    `user_us` / `sys_us` its two parts; `p50_us` / `p99_us` are percentiles of the transactions'
    own latencies (pgbench --log) where the workload logs them."""

    value: float
    latency_ms: float | None = None
    cpu_us: float | None = None
    user_us: float | None = None
    sys_us: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None


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
    user_us: dict[str, float | None] = field(default_factory=dict)
    sys_us: dict[str, float | None] = field(default_factory=dict)
    p50_us: dict[str, float | None] = field(default_factory=dict)
    p99_us: dict[str, float | None] = field(default_factory=dict)
    cpu_ratios: dict[str, float | None] = field(default_factory=dict)
    added_us: dict[str, float | None] = field(default_factory=dict)  # p50 over direct's p50


def median(values: list[float]) -> float | None:
    """The median, or None when nothing was measured (a path that failed every round)."""
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _medians(samples: dict[str, list[Sample]], paths: list[str], attr: str) -> dict[str, float | None]:
    """The median of one Sample attribute per path, over the rounds that have it."""
    return {p: median([v for s in samples[p] if (v := getattr(s, attr)) is not None]) for p in paths}


def summarize(name: str, unit: str, samples: dict[str, list[Sample]]) -> Summary:
    """Medians per path of every figure (each median taken on its own), then the ratios."""
    medians = {p: median([s.value for s in samples.get(p, [])]) for p in ALL_PATHS if p in samples}
    paths = list(medians)
    latencies, cpu = _medians(samples, paths, "latency_ms"), _medians(samples, paths, "cpu_us")
    p50 = _medians(samples, paths, "p50_us")
    ratios = {f"{a}/{b}": ratio(medians.get(a), medians.get(b)) for a, b in RATIOS if a in medians and b in medians}
    cpu_ratios = {f"{a}/{b}": ratio(cpu.get(a), cpu.get(b)) for a, b in CPU_RATIOS if a in cpu and b in cpu}
    added = {p: _difference(p50[p], p50.get("direct")) for p in ADDED_LATENCY if p in p50 and "direct" in p50}
    return Summary(
        name,
        unit,
        {p: list(v) for p, v in samples.items()},
        medians,
        latencies,
        cpu,
        ratios,
        user_us=_medians(samples, paths, "user_us"),
        sys_us=_medians(samples, paths, "sys_us"),
        p50_us=p50,
        p99_us=_medians(samples, paths, "p99_us"),
        cpu_ratios=cpu_ratios,
        added_us={p: v for p, v in added.items() if v is not None},
    )


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+,.0f}"


def format_table(summary: Summary) -> str:
    """One workload: a row per path (median value, latency, proxy CPU per transaction and its user
    and system parts, p50 / p99 of the transactions, the rounds), then the ratios."""
    lines = [
        f"== {summary.name} ({summary.unit}, median of {_rounds(summary)})",
        f"{'path':<15}{summary.unit:>11}{'latency ms':>12}{'cpu us':>9}{'user':>8}{'sys':>8}"
        f"{'p50 us':>9}{'p99 us':>9}   rounds",
    ]
    for path, value in summary.median.items():
        rounds = " ".join(_num(s.value) for s in summary.samples.get(path, []))
        lines.append(
            f"{path:<15}{_num(value):>11}{_num(summary.latency_ms.get(path), 3):>12}"
            f"{_num(summary.cpu_us.get(path), 1):>9}{_num(summary.user_us.get(path), 1):>8}"
            f"{_num(summary.sys_us.get(path), 1):>8}{_num(summary.p50_us.get(path), 0):>9}"
            f"{_num(summary.p99_us.get(path), 0):>9}   {rounds}"
        )
    ratios = "   ".join(f"{name} = {_num(value, 2)}" for name, value in summary.ratios.items())
    if ratios:
        lines.append(f"{summary.unit}: {ratios}")
    cpu = [(name, value) for name, value in summary.cpu_ratios.items() if value is not None]
    if cpu:
        lines.append("cpu/txn: " + "   ".join(f"{name} = {_num(value, 2)}" for name, value in cpu))
    if summary.added_us:
        added = ", ".join(f"{p} {_signed(v)}" for p, v in summary.added_us.items())
        lines.append(f"added per round trip over direct TLS (p50 us): {added}")
    return "\n".join(lines)


def _rounds(summary: Summary) -> int:
    return max((len(v) for v in summary.samples.values()), default=0)


# --- Verdicts against issue 13's targets: printed by `make bench`, never asserted ---


@dataclass(frozen=True, slots=True)
class Check:
    """One condition of a target: `value` against `limit` (`at_most` or at least), None if unmeasured."""

    text: str
    value: float | None
    limit: float | None
    at_most: bool

    @property
    def met(self) -> bool | None:
        if self.value is None or self.limit is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit


@dataclass(frozen=True, slots=True)
class Verdict:
    """A target on one workload: met when every check is, unmeasured when any check is."""

    workload: str
    checks: tuple[Check, ...]

    @property
    def met(self) -> bool | None:
        results = [c.met for c in self.checks]
        if not results or any(r is None for r in results):
            return None
        return all(results)


def _ratio_check(what: str, value: float | None, ref: str, limit: float, *, at_most: bool) -> Check:
    sign = "<=" if at_most else ">="
    return Check(f"{what} {_num(value, 2)} x {ref} (target {sign} {limit:.2f})", value, limit, at_most)


def _offset_check(what: str, value: float | None, ref: str, ref_value: float | None, offset: float) -> Check:
    limit = None if ref_value is None else ref_value + offset
    text = f"{what} {_num(value, 1)} us, {ref} {_num(ref_value, 1)} + {offset:g} = {_num(limit, 1)} (target <=)"
    return Check(text, value, limit, True)


#: Workload names the targets are stated for (bench/workloads.py spells them so).
C16_PREPARED = "select-only -c16 prepared"
C1_SIMPLE = "select-only -c1 simple"
CONNECT = "connect per txn -C -S -c4"


def verdicts(summaries: list[Summary]) -> list[Verdict]:
    """Issue 13's targets, for the workloads that were run:

    - select-only -c16 -M prepared: tps >= 0.95 x PgBouncer, proxy CPU/txn <= 1.1 x PgBouncer;
    - select-only -c1 -M simple: user CPU/txn <= the floor's + 1.5 us, p50 <= PgBouncer's + 10 us;
    - over a unix socket (each workload with a pgsidecar-unix row): tps >= 1.05 x PgBouncer over TCP;
    - -C -S -c4: connects (= transactions) per second >= 1.0 x PgBouncer.
    """
    by_name = {s.name: s for s in summaries}
    out: list[Verdict] = []
    if (c16 := by_name.get(C16_PREPARED)) is not None:
        tps = ratio(c16.median.get("pgsidecar"), c16.median.get("pgbouncer"))
        cpu = ratio(c16.cpu_us.get("pgsidecar"), c16.cpu_us.get("pgbouncer"))
        out.append(
            Verdict(
                C16_PREPARED,
                (
                    _ratio_check("tps", tps, "PgBouncer", 0.95, at_most=False),
                    _ratio_check("cpu/txn", cpu, "PgBouncer", 1.10, at_most=True),
                ),
            )
        )
    if (c1 := by_name.get(C1_SIMPLE)) is not None:
        user, floor_user = c1.user_us.get("pgsidecar"), c1.user_us.get("floor")
        p50, bouncer_p50 = c1.p50_us.get("pgsidecar"), c1.p50_us.get("pgbouncer")
        out.append(
            Verdict(
                C1_SIMPLE,
                (
                    _offset_check("user cpu/txn", user, "floor", floor_user, 1.5),
                    _offset_check("p50", p50, "PgBouncer", bouncer_p50, 10.0),
                ),
            )
        )
    for summary in summaries:
        if "pgsidecar-unix" in summary.median:
            tps = ratio(summary.median.get("pgsidecar-unix"), summary.median.get("pgbouncer"))
            check = _ratio_check("unix-socket tps", tps, "PgBouncer over TCP", 1.05, at_most=False)
            out.append(Verdict(f"{summary.name}, unix socket", (check,)))
    if (connect := by_name.get(CONNECT)) is not None:
        rate = ratio(connect.median.get("pgsidecar"), connect.median.get("pgbouncer"))
        out.append(Verdict(CONNECT, (_ratio_check("connects/s", rate, "PgBouncer", 1.0, at_most=False),)))
    return out


def format_verdict(verdict: Verdict) -> str:
    """One line: the workload, MET / NOT MET / NOT MEASURED, and each check with its figures."""
    word = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[verdict.met]
    checks = "; ".join(f"{c.text} {'ok' if c.met else 'no' if c.met is False else '?'}" for c in verdict.checks)
    return f"verdict {verdict.workload}: {word}: {checks}"


def verdict_json(verdict: Verdict) -> dict:
    return {
        "workload": verdict.workload,
        "met": verdict.met,
        "checks": [{"text": c.text, "value": c.value, "limit": c.limit, "met": c.met} for c in verdict.checks],
    }


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
    judged: list[Verdict] | None = None,
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
    if judged:
        doc["verdicts"] = [verdict_json(v) for v in judged]
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
