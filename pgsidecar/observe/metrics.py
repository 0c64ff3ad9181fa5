"""Every Prometheus metric pgsidecar exports, defined once, in its own registry.

Counting stays off the per-message hot path: the runtime bumps plain integers per read batch
(`Tallies`), and the gauges that describe live state (open clients, upstream connections) are
computed from the sessions at scrape time. Rare events (drops, reconnects, errors pgsidecar sends)
go through ordinary prometheus_client counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pgsidecar.drops.record import DropRecord

# Reconnects usually take milliseconds (terminate, reset) or seconds (restart, failover).
RECONNECT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# An unpark is a connect, a login and a replay: a few milliseconds near the server, more over TLS
# or across a region; seconds only when the server was away.
UNPARK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The classic text format every Prometheus version reads (newer clients default to 1.0.0).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"

RESULT_SUCCESS = "success"
RESULT_FAILURE = "failure"
RESULT_ABANDONED = "abandoned"  # the client left while pgsidecar was still reconnecting


class Tallies:
    """Plain integers the runtime bumps per read batch; a prometheus Counter would take a lock
    on every call, and these are read only when someone scrapes."""

    __slots__ = ("cert_not_after", "client_to_server", "clients_total", "server_to_client")

    def __init__(self) -> None:
        self.client_to_server = 0
        self.server_to_client = 0
        self.clients_total = 0
        self.cert_not_after: float | None = None


# Read-only members (properties): the runtime's narrower attribute types then match.
class _Session(Protocol):
    @property
    def server(self) -> object | None: ...

    @property
    def connecting(self) -> object | None: ...


class Watched(Protocol):
    """What the collector reads from the runtime's Sidecar (observe does not import runtime)."""

    @property
    def tally(self) -> Tallies: ...

    @property
    def drivers(self) -> Iterable[_Session]: ...

    @property
    def parked_sessions(self) -> int: ...


class _LiveCollector:
    """Metrics whose value is the current state, read at scrape time."""

    def __init__(self) -> None:
        self.watched: Watched | None = None

    def describe(self) -> list[Metric]:
        # Names are declared here and nowhere else; an empty describe keeps the registry from
        # calling collect() before the Sidecar exists.
        return []

    def collect(self) -> Iterator[Metric]:
        watched = self.watched
        if watched is None:
            return
        tally = watched.tally
        drivers = list(watched.drivers)
        yield GaugeMetricFamily("pgsidecar_client_connections", "Client connections open now.", value=len(drivers))
        yield CounterMetricFamily(
            "pgsidecar_client_connections", "Client connections accepted.", value=tally.clients_total
        )
        up = GaugeMetricFamily("pgsidecar_upstream_connections", "Upstream connections by state.", labels=["state"])
        up.add_metric(["connected"], sum(1 for d in drivers if d.server is not None))
        up.add_metric(["connecting"], sum(1 for d in drivers if d.connecting is not None))
        yield up
        yield GaugeMetricFamily(
            "pgsidecar_parked_sessions",
            "Sessions whose upstream pgsidecar closed while idle (upstream.park_after), until unparked.",
            value=watched.parked_sessions,
        )
        moved = CounterMetricFamily("pgsidecar_bytes", "Bytes relayed, counted per read batch.", labels=["direction"])
        moved.add_metric(["client_to_server"], tally.client_to_server)
        moved.add_metric(["server_to_client"], tally.server_to_client)
        yield moved
        if tally.cert_not_after is not None:
            yield GaugeMetricFamily(
                "pgsidecar_upstream_certificate_expiry_timestamp_seconds",
                "notAfter of the upstream server certificate last seen (Unix time).",
                value=tally.cert_not_after,
            )


class Metrics:
    """The registry and every metric in it; one per process (the App owns it)."""

    def __init__(self, version: str, *, process: bool = True) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series: noise for operators
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.live = _LiveCollector()
        reg.register(self.live)
        self.drops = Counter(
            "pgsidecar_upstream_drops",
            "Upstream connections that ended without the client asking, by classified cause.",
            ["cause"],
            registry=reg,
        )
        self.reconnects = Counter(
            "pgsidecar_reconnects", "Reconnects after a drop, by result.", ["result"], registry=reg
        )
        self.reconnect_duration = Histogram(
            "pgsidecar_reconnect_duration_seconds",
            "Time from drop to a usable new connection.",
            buckets=RECONNECT_BUCKETS,
            registry=reg,
        )
        self.transparent = Counter("pgsidecar_transparent_recoveries", "Drops the client never saw.", registry=reg)
        self.client_errors = Counter(
            "pgsidecar_client_errors",
            "ErrorResponses pgsidecar itself sent to clients, by SQLSTATE.",
            ["sqlstate"],
            registry=reg,
        )
        self.upstream_role = Gauge(
            "pgsidecar_upstream_role",
            "1 for the host, address and role (primary, standby, read-only, read-write, unknown) of"
            " the server the last login chose; the previous one is removed.",
            ["host", "address", "role"],
            registry=reg,
        )
        self.role_mismatches = Counter(
            "pgsidecar_role_mismatches",
            "Servers reached whose role did not fit target_session_attrs (each was left for the next).",
            ["role"],
            registry=reg,
        )
        self.parks = Counter(
            "pgsidecar_parks", "Idle sessions whose upstream pgsidecar closed (upstream.park_after).", registry=reg
        )
        self.unparks = Counter(
            "pgsidecar_unparks", "Parked sessions whose next request reopened the upstream.", registry=reg
        )
        self.unpark_duration = Histogram(
            "pgsidecar_unpark_seconds",
            "From a parked session's next request to its replayed new connection (then the request runs).",
            buckets=UNPARK_BUCKETS,
            registry=reg,
        )
        self._current_role: tuple[str, str, str] | None = None
        build = Gauge("pgsidecar_build_info", "pgsidecar version; always 1.", ["version"], registry=reg)
        build.labels(version).set(1)
        if process:
            ProcessCollector(registry=reg)

    def watch(self, sidecar: Watched) -> None:
        """Read live gauges and tallies from this Sidecar from now on (also after a reload)."""
        self.live.watched = sidecar

    def upstream_noted(self, host: str, address: str, role: str, fits: bool) -> None:
        """A login reached a server: the role gauge follows the last chosen one."""
        if not fits:
            self.role_mismatches.labels(role).inc()
            return
        now = (host, address, role)
        if now == self._current_role:
            return
        if self._current_role is not None:
            self.upstream_role.remove(*self._current_role)
        self.upstream_role.labels(*now).set(1)
        self._current_role = now

    def parking_noted(self, parked: bool, unpark_s: float | None) -> None:
        """A session parked, or unparked (``unpark_s``: how long its first request waited)."""
        if parked:
            self.parks.inc()
        elif unpark_s is not None:
            self.unparks.inc()
            self.unpark_duration.observe(unpark_s)

    def client_error(self, code: str) -> None:
        self.client_errors.labels(code).inc()

    def drop_recorded(self, record: DropRecord) -> None:
        """One finished drop: its cause, how the reconnect went, whether the client saw it."""
        self.drops.labels(record.cause.value).inc()
        if record.impact.startswith("transparent"):
            self.transparent.inc()
        rec = record.reconnect
        if rec is None or (rec.attempts == 0 and not rec.succeeded):
            return
        if rec.succeeded:
            self.reconnects.labels(RESULT_SUCCESS).inc()
            self.reconnect_duration.observe(rec.duration_s)
        elif record.impact.startswith("client left"):
            self.reconnects.labels(RESULT_ABANDONED).inc()
        else:
            self.reconnects.labels(RESULT_FAILURE).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for GET /metrics."""
        return prometheus_client.generate_latest(self.registry), TEXT_FORMAT


def sample_value(text: str, name: str, labels: dict[str, Any] | None = None) -> float | None:
    """One sample's value from an exposition text (tests and `pgsidecar` tooling read it back)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {k: str(v) for k, v in (labels or {}).items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                return sample.value
    return None
