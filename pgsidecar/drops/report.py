"""`pgsidecar drops`: read drop records from many sidecars and say what happened.

Sections: totals by cause, a timeline, idle ages that cluster at one value (a middlebox idle
timeout names itself this way), drops at the same moment across sidecars (a server-side event),
and the hints with their counts. Pure: the caller passes `now`; files are only read.
Known middlebox timeouts: docs/drops.md "Managed services and middleboxes".
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

# The one duration syntax of pgsidecar lives with the configuration (README "Configuration").
from pgsidecar.config.load import parse_duration as config_duration
from pgsidecar.drops.causes import DropCause
from pgsidecar.drops.record import DropRecord, DropRecordError, ServerSnapshot, UpstreamInfo, iso_utc, parse_time

# Idle-age clustering: members lie within +/- max(2 %, 3 s) of the center.
CLUSTER_REL = 0.02
CLUSTER_ABS_S = 3.0
CLUSTER_MIN_COUNT = 3
CLUSTER_MIN_SHARE = 0.30
# Correlation: drops against one upstream within this window form one event.
EVENT_WINDOW_S = 1.0
EVENT_MIN_SIDECARS = 2
EVENT_MIN_CLIENTS = 3

_NETWORK_CAUSES = frozenset(
    {
        DropCause.PATH_IDLE_TIMEOUT,
        DropCause.NETWORK_RESET,
        DropCause.NETWORK_TIMEOUT,
        DropCause.UNKNOWN,
    }
)
_SERVER_SETTING = {
    DropCause.IDLE_SESSION_TIMEOUT: "idle_session_timeout",
    DropCause.IDLE_IN_TRANSACTION_TIMEOUT: "idle_in_transaction_session_timeout",
    DropCause.TRANSACTION_TIMEOUT: "transaction_timeout",
}
# Causes where the idle age is the mechanism (a timeout somewhere). A restart, crash or terminate
# hits sessions at whatever idle age they have: a "cluster" there is coincidence, not a finding.
_IDLE_DRIVEN = _NETWORK_CAUSES | frozenset(_SERVER_SETTING) | {DropCause.UPSTREAM_POOLER}
_EVIDENCE_WORDS = {
    "postmaster_start_changed": "postmaster start time changed",
    "in_recovery_seen": "server was in crash recovery",
    "reconnect_first_error=57P03": "server was starting up or shutting down",
    "reconnect_first_error=ECONNREFUSED": "connection refused at first",
    "reconnect_failed": "reconnect failed",
    "certificate_changed": "certificate changed",
    "address_changed": "address changed",
    "read_only_now": "server read-only now",
    "postmaster_unchanged": "postmaster unchanged",
    "in_recovery_now": "a standby now",
    "timeline_changed": "new timeline (a promoted standby)",
    "system_identifier_changed": "another cluster (system identifier changed)",
    "reconnect_abandoned": "client left during reconnect",
}


@dataclass(frozen=True, slots=True)
class Middlebox:
    """A device or default known to forget idle flows after a fixed time."""

    low_s: float
    high_s: float
    name: str


MIDDLEBOXES: tuple[Middlebox, ...] = (
    Middlebox(233.0, 247.0, "Azure Load Balancer (240 s default)"),
    Middlebox(343.0, 357.0, "AWS NLB / NAT Gateway / Gateway LB (350 s)"),
    Middlebox(1176.0, 1224.0, "GCP Cloud NAT (1200 s established)"),
    Middlebox(7200.0, 8000.0, "Linux keepalive defaults (7200 s + 9 x 75 s)"),
)


def middlebox_for(idle_s: float) -> str | None:
    """The known middlebox whose idle timeout matches this idle age, if any."""
    for box in MIDDLEBOXES:
        if box.low_s <= idle_s <= box.high_s:
            return box.name
    return None


@dataclass(slots=True)
class Source:
    """What one input yielded, for error reporting."""

    name: str
    records: int = 0
    malformed: int = 0


@dataclass(slots=True)
class Loaded:
    """All records read, and per-source counts."""

    records: list[DropRecord] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)


class UsageError(Exception):
    """A bad argument or an input that cannot be opened (exit 2)."""


def main(
    argv: list[str],
    *,
    stdin: IO[str] = sys.stdin,
    stdout: IO[str] = sys.stdout,
    stderr: IO[str] = sys.stderr,
    now: float | None = None,
) -> int:
    """Run `pgsidecar drops`; returns the exit code (0 ok, 1 unreadable input, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the message
        return int(exc.code or 0)
    try:
        loaded = load(args.paths or ["-"], stdin=stdin, stderr=stderr)
        records = _window(loaded.records, args.since, args.until, now)
    except UsageError as exc:
        print(f"pgsidecar drops: {exc}", file=stderr)
        return 2
    summary = summarize(records)
    summary["malformed"] = sum(s.malformed for s in loaded.sources)
    if args.json:
        stdout.write(json.dumps(summary, ensure_ascii=False, allow_nan=False) + "\n")
    else:
        stdout.write(render_text(summary))
    failed = [s for s in loaded.sources if s.records == 0 and s.malformed > 0]
    for src in failed:
        print(
            f"pgsidecar drops: {src.name}: no drop records could be read"
            f" ({src.malformed} malformed line{'s' if src.malformed != 1 else ''})",
            file=stderr,
        )
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgsidecar drops",
        description="Summarise pgsidecar drop logs (JSON lines, .gz too; '-' or none: stdin).",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="drop log files, or - for stdin")
    p.add_argument("--since", help="DURATION back from now (e.g. 24h, 90m, 1h30m) or a TIME")
    p.add_argument("--until", help="DURATION back from now or an ISO-8601 TIME (UTC if naive)")
    p.add_argument("--json", action="store_true", help="one JSON object for machines")
    return p


# -- reading ---------------------------------------------------------------------------------


def load(paths: Sequence[str], *, stdin: IO[str], stderr: IO[str]) -> Loaded:
    """Read every path; malformed lines are reported on stderr and skipped."""
    loaded = Loaded()
    for path in paths:
        src = Source("<stdin>" if path == "-" else path)
        loaded.sources.append(src)
        with _InputLines(path, stdin) as lines:
            try:
                _read_lines(lines, src, loaded.records, stderr)
            except (OSError, EOFError, UnicodeDecodeError) as exc:
                print(f"pgsidecar drops: {src.name}: read error: {exc}", file=stderr)
                src.malformed += 1
    return loaded


def _read_lines(lines: Iterable[str], src: Source, out: list[DropRecord], stderr: IO[str]) -> None:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(DropRecord.from_json(line))
        except DropRecordError as exc:
            src.malformed += 1
            print(f"{src.name}:{lineno}: not a drop record: {exc}", file=stderr)
        else:
            src.records += 1


class _InputLines:
    """Context manager yielding text lines from a path, a .gz file, or stdin for '-'."""

    def __init__(self, path: str, stdin: IO[str]) -> None:
        self.path, self.stdin = path, stdin
        self.handle: IO[str] | None = None
        self.raw: IO[bytes] | None = None

    def __enter__(self) -> Iterator[str]:
        if self.path == "-":
            return iter(self.stdin)
        try:
            raw = open(self.path, "rb")  # closed in __exit__
        except FileNotFoundError:
            raise UsageError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot open: {exc.strerror or exc}") from None
        self.raw = raw
        binary: IO[bytes] = raw
        if raw.peek(2)[:2] == b"\x1f\x8b":  # gzip magic (RFC 1952), whatever the file name
            binary = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        self.handle = io.TextIOWrapper(binary, encoding="utf-8", errors="replace")
        return iter(self.handle)

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.raw is not None:
            self.raw.close()  # GzipFile leaves a passed-in fileobj open


# -- time window -----------------------------------------------------------------------------


def parse_duration(text: str) -> float | None:
    """'24h', '90m', '1h30m', '45s', '2d', '300' (seconds) -> seconds; None if not a duration
    (then it may be a time). The syntax is the configuration's, read as a window."""
    try:
        return config_duration(text, window=True)
    except ValueError:
        return None


def resolve_bound(text: str, reference: float) -> float:
    """A --since/--until value: a duration back from `reference`, or an absolute time."""
    duration = parse_duration(text)
    if duration is not None:
        return reference - duration
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"not a duration or an ISO-8601 time: {text!r}") from None


def _window(records: list[DropRecord], since: str | None, until: str | None, now: float | None) -> list[DropRecord]:
    if since is None and until is None:
        return records
    reference = now if now is not None else max((r.time for r in records), default=0.0)
    low = resolve_bound(since, reference) if since else float("-inf")
    high = resolve_bound(until, reference) if until else float("inf")
    return [r for r in records if low <= r.time <= high]


# -- analysis --------------------------------------------------------------------------------


def summarize(records: Sequence[DropRecord]) -> dict[str, Any]:
    """Every section of the report as plain data (what --json prints)."""
    recs = sorted(records, key=lambda r: r.time)
    if not recs:
        return {"count": 0}
    first, last = recs[0].time, recs[-1].time
    by_cause = Counter(r.cause for r in recs)
    return {
        "count": len(recs),
        "first": iso_utc(first),
        "last": iso_utc(last),
        "span_s": round(last - first, 3),
        "sidecars": len({r.sidecar for r in recs}),
        "upstreams": len({_upstream_key(r) for r in recs}),
        "by_cause": [{"cause": c.value, "phrase": c.phrase, "count": n} for c, n in by_cause.most_common()],
        "impact": _impact(recs),
        "secondary": dict(Counter(s.value for r in recs for s in r.secondary).most_common()),
        "timeline": timeline(recs),
        "idle_clusters": idle_clusters(recs),
        "events": correlated_events(recs),
        "hints": _hints(recs),
        "failovers": failovers(recs),
    }


_MOVES = frozenset({DropCause.FAILOVER, DropCause.SWITCHOVER})


def _role(snap: ServerSnapshot | None) -> str:
    if snap is None or snap.in_recovery is None:
        return "?"
    if snap.in_recovery:
        return "standby"
    return "read-only" if snap.read_only else "primary"


def _where(up: UpstreamInfo | None) -> str:
    if up is None or (up.host is None and up.address is None):
        return "?"
    if up.address and up.host and up.address != up.host:
        return f"{up.host} ({up.address})"
    return str(up.address or up.host)


def failovers(recs: Sequence[DropRecord]) -> dict[str, Any] | None:
    """Drops where the writer moved: how many, how long the app waited, from where to where."""
    moved = [r for r in recs if r.cause in _MOVES]
    if not moved:
        return None
    waits = sorted(r.reconnect.duration_s for r in moved if r.reconnect is not None and r.reconnect.succeeded)
    paths = Counter(
        (f"{_where(r.upstream)} {_role(r.server_before)}", f"{_where(r.upstream_after)} {_role(r.server_after)}")
        for r in moved
    )
    return {
        "count": len(moved),
        "by_cause": dict(Counter(r.cause.value for r in moved).most_common()),
        "transparent": sum(1 for r in moved if r.impact == "transparent"),
        "wait_s": {
            "median": waits[len(waits) // 2] if waits else None,
            "max": waits[-1] if waits else None,
            "reconnected": len(waits),
        },
        "paths": [{"before": b, "after": a, "count": n} for (b, a), n in paths.most_common()],
    }


def _impact(recs: Sequence[DropRecord]) -> dict[str, int]:
    transparent = sum(1 for r in recs if r.impact == "transparent")
    return {"transparent": transparent, "client_saw_error": len(recs) - transparent}


def timeline(recs: Sequence[DropRecord]) -> dict[str, Any]:
    """Counts per minute (span < 2 h), per hour (< 3 days) or per day; empty buckets omitted."""
    span = recs[-1].time - recs[0].time
    if span < 7200:
        unit, size = "minute", 60
    else:
        unit, size = ("hour", 3600) if span < 259200 else ("day", 86400)
    buckets: dict[int, Counter[str]] = {}
    for r in recs:
        buckets.setdefault(int(r.time // size) * size, Counter())[r.cause.value] += 1
    rows = [
        {"start": iso_utc(start), "count": sum(c.values()), "by_cause": dict(c.most_common())}
        for start, c in sorted(buckets.items())
    ]
    return {"bucket": unit, "rows": rows}


def _tolerance(value: float) -> float:
    return max(CLUSTER_REL * value, CLUSTER_ABS_S)


def find_clusters(values: Sequence[float], total: int) -> list[list[float]]:
    """Tight groups of idle ages: >= 3 members and >= 30 % of `total`, densest first."""
    remaining = sorted(values)
    clusters: list[list[float]] = []
    while len(remaining) >= CLUSTER_MIN_COUNT:
        best: list[float] = []
        lo = 0
        for center in remaining:
            tol = _tolerance(center)
            while remaining[lo] < center - tol:
                lo += 1
            hi = lo
            while hi < len(remaining) and remaining[hi] <= center + tol:
                hi += 1
            if hi - lo > len(best):
                best = remaining[lo:hi]
        if len(best) < CLUSTER_MIN_COUNT or len(best) < CLUSTER_MIN_SHARE * total:
            break
        clusters.append(best)
        taken = Counter(best)
        rest = []
        for v in remaining:
            if taken[v]:
                taken[v] -= 1
            else:
                rest.append(v)
        remaining = rest
    return clusters


def idle_clusters(recs: Sequence[DropRecord]) -> list[dict[str, Any]]:
    """Per cause, drops whose idle ages cluster at one value, with what that value suggests."""
    out: list[dict[str, Any]] = []
    by_cause: dict[DropCause, list[DropRecord]] = {}
    for r in recs:
        by_cause.setdefault(r.cause, []).append(r)
    for cause, group in by_cause.items():
        if cause not in _IDLE_DRIVEN:
            continue
        for members in find_clusters([r.idle_s for r in group], len(group)):
            lo, hi = members[0], members[-1]
            center = (lo + hi) / 2
            in_cluster = [r for r in group if lo <= r.idle_s <= hi]
            described = _describe_cluster(cause, center, lo, hi, len(members), len(group), in_cluster)
            out.append(described)
    out.sort(key=lambda c: -c["count"])
    return out


def _describe_cluster(
    cause: DropCause,
    center: float,
    lo: float,
    hi: float,
    count: int,
    of_cause: int,
    members: Sequence[DropRecord],
) -> dict[str, Any]:
    spread = (hi - lo) / 2
    keepalives = Counter(r.keepalive_idle_s for r in members)
    keepalive = keepalives.most_common(1)[0][0] if keepalives else None
    box = middlebox_for(center) if cause in _NETWORK_CAUSES else None
    return {
        "cause": cause.value,
        "idle_s": round(center, 1),
        "spread_s": round(spread, 1),
        "count": count,
        "of_cause": of_cause,
        "middlebox": box,
        "keepalive_idle_s": keepalive,
        "explanation": _cluster_explanation(cause, center, box, keepalive),
    }


def _cluster_explanation(cause: DropCause, center: float, box: str | None, keepalive: float | None) -> str:
    if cause in _SERVER_SETTING:
        return f"the server's {_SERVER_SETTING[cause]} is about {center:.0f} s"
    if cause not in _NETWORK_CAUSES:
        return f"{cause.phrase} after the same idle time"
    if keepalive is not None and keepalive > 0 and keepalive <= center <= keepalive + 60:
        return (
            f"dropped when keepalive probes started (upstream.keepalive.idle = {keepalive:g} s):"
            " a device on this path forgets flows idle for less than that: lower"
            " upstream.keepalive.idle"
        )
    device = box or f"a device with a ~{center:.0f} s idle timeout"
    now = "off" if keepalive is None else f"{keepalive:g} s"
    advice = ""
    if keepalive is None or keepalive >= center:
        advice = (
            f"; keepalives are off or longer than {center:.0f} s on this path: set"
            f" upstream.keepalive.idle below it (now {now})"
        )
    return f"a load balancer or NAT idle timeout between you and the server: {device}{advice}"


def _upstream_key(r: DropRecord) -> str:
    host = r.upstream.host or r.upstream.address or "?"
    return f"{host}:{r.upstream.port}" if r.upstream.port is not None else host


def correlated_events(recs: Sequence[DropRecord]) -> list[dict[str, Any]]:
    """Drops against one upstream within one second from >= 2 sidecars or >= 3 clients."""
    by_upstream: dict[str, list[DropRecord]] = {}
    for r in recs:
        by_upstream.setdefault(_upstream_key(r), []).append(r)
    all_sidecars = len({r.sidecar for r in recs})
    events: list[dict[str, Any]] = []
    for upstream, group in by_upstream.items():
        for window in _windows(group):
            event = _event(upstream, window, all_sidecars)
            if event is not None:
                events.append(event)
    events.sort(key=lambda e: e["time"])
    return events


def _windows(group: Sequence[DropRecord]) -> Iterator[list[DropRecord]]:
    """Split time-sorted records into runs no longer than EVENT_WINDOW_S from their first."""
    current: list[DropRecord] = []
    for r in group:
        if current and r.time - current[0].time > EVENT_WINDOW_S:
            yield current
            current = []
        current.append(r)
    if current:
        yield current


def _event(upstream: str, group: list[DropRecord], all_sidecars: int) -> dict[str, Any] | None:
    sidecars = {r.sidecar for r in group}
    clients = {(r.sidecar, r.client.addr, r.client.application_name) for r in group}
    if len(sidecars) < EVENT_MIN_SIDECARS and len(clients) < EVENT_MIN_CLIENTS:
        return None
    causes = Counter(r.cause for r in group)
    cause = causes.most_common(1)[0][0]
    shared = set(group[0].evidence)
    for r in group[1:]:
        shared &= set(r.evidence)
    facts = [e for e in group[0].evidence if e in shared and not e.startswith("kind=")]
    return {
        "time": iso_utc(group[0].time),
        "upstream": upstream,
        "drops": len(group),
        "sidecars": len(sidecars),
        "all_sidecars": len(sidecars) == all_sidecars and all_sidecars > 1,
        "clients": len(clients),
        "cause": cause.value,
        "phrase": cause.phrase,
        "causes": {c.value: n for c, n in causes.most_common()},
        "evidence": facts,
    }


def _hints(recs: Sequence[DropRecord]) -> list[dict[str, Any]]:
    """One hint per cause: the records' own when they agree, else the cause's generic one."""
    per_cause: dict[DropCause, Counter[str]] = {}
    for r in recs:
        per_cause.setdefault(r.cause, Counter())[r.hint] += 1
    rows: list[dict[str, Any]] = []
    for cause, hints in per_cause.items():
        hint = next(iter(hints)) if len(hints) == 1 else cause.hint
        rows.append({"cause": cause.value, "count": sum(hints.values()), "hint": hint})
    rows.sort(key=lambda row: -int(row["count"]))
    return rows


# -- text output -----------------------------------------------------------------------------


def human_span(seconds: float) -> str:
    """A span in the unit a person would use."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 259200:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.1f} days"


def _short_time(iso: str, same_day: bool) -> str:
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return f"{dt:%H:%M:%S}" if same_day else f"{dt:%Y-%m-%d %H:%M:%S}Z"


def render_text(summary: dict[str, Any]) -> str:
    """The terminal report: headline, then one block per section."""
    if summary["count"] == 0:
        return "no drops\n"
    lines = [_headline(summary), _details(summary), ""]
    lines += _by_cause_block(summary)
    lines += _timeline_block(summary["timeline"])
    same_day = summary["first"][:10] == summary["last"][:10]
    if summary["idle_clusters"]:
        lines.append("Idle ages")
        for c in summary["idle_clusters"]:
            lines.append(f"  {_cluster_head(c)} ({c['cause']}, {c['count']} of {c['of_cause']}): {c['explanation']}.")
        lines.append("")
    if summary["events"]:
        lines.append("Same moment, several sidecars or clients (server-side events)")
        for e in summary["events"]:
            lines.append("  " + _event_line(e, same_day) + ".")
        lines.append("")
    moves = summary.get("failovers")
    if moves:
        causes = ", ".join(f"{n} {c}" for c, n in moves["by_cause"].items())
        wait = moves["wait_s"]
        waited = (
            f"the app waited {wait['median']:.1f} s median, {wait['max']:.1f} s at most"
            if wait["reconnected"]
            else "no reconnect succeeded"
        )
        lines.append(f"Failovers ({causes}; {moves['transparent']} transparent; {waited})")
        for p in moves["paths"]:
            lines.append(f"  {p['count']:>4}  {p['before']}  ->  {p['after']}")
        lines.append("")
    lines.append("Hints")
    for h in summary["hints"]:
        lines.append(f"  {h['count']:>4}  {h['cause']}: {h['hint']}")
    return "\n".join(lines) + "\n"


def _headline(s: dict[str, Any]) -> str:
    """One sentence: how many, then each idle cluster and each server-side event."""
    n = s["count"]
    when = f"in {human_span(s['span_s'])}" if s["span_s"] >= 1 else f"at {s['first']}"
    parts = [f"{n} drop{'s' if n != 1 else ''} {when}"]
    for c in s["idle_clusters"]:
        parts.append(f"{_cluster_head(c)}: {c['explanation']}")
    same_day = s["first"][:10] == s["last"][:10]
    parts += [_event_line(e, same_day, with_upstream=False) for e in s["events"]]
    if len(parts) == 1:
        parts += [f"{c['count']} {c['phrase']}" for c in s["by_cause"][:3]]
    return "; ".join(parts) + "."


def _details(s: dict[str, Any]) -> str:
    impact = s["impact"]
    where = f"{s['sidecars']} sidecar{'s' if s['sidecars'] != 1 else ''}"
    return (
        f"({s['first']} .. {s['last']}, {where}, {s['upstreams']} upstream(s);"
        f" {impact['transparent']} transparent, {impact['client_saw_error']} reached the client)"
    )


def _cluster_head(c: dict[str, Any]) -> str:
    return f"{c['count']} at idle {c['idle_s']:.0f} s +/- {max(c['spread_s'], 1):.0f} s"


def _by_cause_block(s: dict[str, Any]) -> list[str]:
    width = max(len(c["cause"]) for c in s["by_cause"])
    lines = ["By cause"]
    for c in s["by_cause"]:
        lines.append(f"  {c['count']:>4}  {c['cause']:<{width}}  {c['phrase']}")
    for name, n in s["secondary"].items():
        lines.append(f"        also during reconnect: {name} x{n}")
    return [*lines, ""]


def _timeline_block(t: dict[str, Any]) -> list[str]:
    fmt, suffix = {"minute": (16, ""), "hour": (13, ":00"), "day": (10, "")}[t["bucket"]]
    peak = max(row["count"] for row in t["rows"])
    lines = [f"Timeline (per {t['bucket']}, UTC)"]
    for row in t["rows"]:
        bar = "#" * max(1, round(40 * row["count"] / peak))
        stamp = row["start"][:fmt].replace("T", " ") + suffix
        causes = ", ".join(f"{c} {n}" for c, n in row["by_cause"].items())
        lines.append(f"  {stamp:<16} {row['count']:>4} {bar}  {causes}")
    return [*lines, ""]


def _event_line(e: dict[str, Any], same_day: bool, *, with_upstream: bool = True) -> str:
    who = (
        f"across all {e['sidecars']} sidecars"
        if e["all_sidecars"]
        else f"across {e['sidecars']} sidecar{'s' if e['sidecars'] != 1 else ''} ({e['clients']} clients)"
    )
    words = [_EVIDENCE_WORDS[f] for f in e["evidence"] if f in _EVIDENCE_WORDS]
    why = ", ".join(words or e["evidence"][:3])
    reason = f"{e['phrase']} ({why})" if why else e["phrase"]
    on = f" on {e['upstream']}" if with_upstream else ""
    return f"{e['drops']} at {_short_time(e['time'], same_day)}{on} {who}: {reason}"
