"""One drop record: every fact gathered about one drop, as one JSON line and one log line.

The writer (observe/droplog.py) appends `to_json()` lines; the reader (`pgsidecar drops`) parses
them back with `DropRecord.from_json`, tolerant of keys it does not know (newer writers), strict
on missing required ones. Times are epoch floats in memory and ISO-8601 UTC with milliseconds in
JSON, so a person can read the file and a machine can sort it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from pgsidecar.drops.causes import DropCause
from pgsidecar.drops.classify import Classification, Evidence, Observed, ReconnectOutcome


class DropRecordError(ValueError):
    """A line that is not a valid drop record; the message says which key and why."""


#: What a new connection can reveal about the drop (reconnect.<name>: true, false or absent).
REVEAL_KEYS = (
    "postmaster_start_changed",
    "in_recovery_seen",
    "certificate_changed",
    "address_changed",
    "read_only_now",
    "in_recovery_now",
    "timeline_changed",
    "system_identifier_changed",
)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who the app was, as it introduced itself to pgsidecar."""

    addr: str | None = None
    application_name: str | None = None
    user: str | None = None
    database: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    """The upstream connection that ended, as it was when it was established."""

    host: str | None = None
    address: str | None = None
    port: int | None = None
    backend_pid: int | None = None
    server_version: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    cert_fingerprint_sha256: str | None = None
    cert_not_after: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """What the server said of itself right after a login (session/state.py FACTS_SQL): the
    facts that tell a restart, a crash, a switchover and a failover apart."""

    postmaster_start: float | None = None
    in_recovery: bool | None = None
    read_only: bool | None = None
    system_identifier: str | None = None
    timeline: int | None = None
    address: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class DropFacts:
    """What the brain saw of one drop (relay/dropbook.py builds it, RecordDrop carries it): a
    record short of the two keepalive settings and the verdict, which observe/recorder.py adds."""

    time: float
    state: str  # one of classify.STATES
    impact: str
    connected_at: float
    age_s: float
    idle_s: float
    client_idle_s: float | None
    observed: Observed
    reconnect: ReconnectOutcome | None
    client: ClientInfo
    upstream: UpstreamInfo
    server_before: ServerSnapshot | None = None
    server_after: ServerSnapshot | None = None
    upstream_after: UpstreamInfo | None = None  # the connection that replaced it


@dataclass(frozen=True, slots=True)
class DropRecord:
    """Everything known about one upstream connection that ended without the client asking."""

    time: float
    sidecar: str
    client: ClientInfo
    upstream: UpstreamInfo
    connected_at: float
    age_s: float
    idle_s: float
    client_idle_s: float | None
    state: str
    observed: Observed
    reconnect: ReconnectOutcome | None
    impact: str
    cause: DropCause
    evidence: tuple[str, ...]
    hint: str
    secondary: tuple[DropCause, ...] = ()
    keepalive_idle_s: float | None = None
    user_timeout_s: float | None = None
    server_before: ServerSnapshot | None = None  # of the connection that ended
    server_after: ServerSnapshot | None = None  # of the new connection
    upstream_after: UpstreamInfo | None = None  # the new connection: another host or address after a failover

    @classmethod
    def from_evidence(
        cls,
        *,
        time: float,
        sidecar: str,
        client: ClientInfo,
        upstream: UpstreamInfo,
        connected_at: float,
        client_idle_s: float | None,
        evidence: Evidence,
        impact: str,
        classification: Classification,
        server_before: ServerSnapshot | None = None,
        server_after: ServerSnapshot | None = None,
        upstream_after: UpstreamInfo | None = None,
    ) -> DropRecord:
        """Assemble a record from what the runtime collected and what `classify` decided."""
        return cls(
            time=time,
            sidecar=sidecar,
            client=client,
            upstream=upstream,
            connected_at=connected_at,
            age_s=evidence.age_s,
            idle_s=evidence.idle_s,
            client_idle_s=client_idle_s,
            state=evidence.state,
            observed=evidence.observed,
            reconnect=evidence.reconnect,
            impact=impact,
            cause=classification.cause,
            evidence=classification.evidence,
            hint=classification.hint,
            secondary=classification.secondary,
            keepalive_idle_s=evidence.keepalive_idle_s,
            user_timeout_s=evidence.user_timeout_s,
            server_before=server_before,
            server_after=server_after,
            upstream_after=upstream_after,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict in field order; non-finite floats become null."""
        return {
            "time": iso_utc(self.time),
            "sidecar": self.sidecar,
            "client": _plain(self.client),
            "upstream": _plain(self.upstream),
            "connected_at": iso_utc(self.connected_at),
            "age_s": _finite(self.age_s),
            "idle_s": _finite(self.idle_s),
            "client_idle_s": _finite(self.client_idle_s),
            "state": self.state,
            "observed": observed_to_dict(self.observed),
            "reconnect": None if self.reconnect is None else _plain(self.reconnect),
            "impact": self.impact,
            "cause": self.cause.value,
            "evidence": list(self.evidence),
            "hint": self.hint,
            "secondary": [c.value for c in self.secondary],
            "keepalive_idle_s": _finite(self.keepalive_idle_s),
            "user_timeout_s": _finite(self.user_timeout_s),
            "server_before": _snapshot_to_dict(self.server_before),
            "server_after": _snapshot_to_dict(self.server_after),
            "upstream_after": None if self.upstream_after is None else _plain(self.upstream_after),
        }

    def to_json(self) -> str:
        """One line, keys in a stable order, no NaN, no trailing newline."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> DropRecord:
        """Parse one line; raise DropRecordError naming the problem."""
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DropRecordError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(data, dict):
            raise DropRecordError("not a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DropRecord:
        """Build from a parsed object; extra keys are ignored, missing required keys are not."""
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise DropRecordError("missing required key(s): " + ", ".join(missing))
        reconnect = data.get("reconnect")
        return cls(
            time=_time(data["time"], "time"),
            sidecar=_str(data["sidecar"], "sidecar"),
            client=_sub(ClientInfo, data["client"], "client"),
            upstream=_sub(UpstreamInfo, data["upstream"], "upstream"),
            connected_at=_time(data["connected_at"], "connected_at"),
            age_s=_float(data["age_s"], "age_s"),
            idle_s=_float(data["idle_s"], "idle_s"),
            client_idle_s=_opt_float(data.get("client_idle_s"), "client_idle_s"),
            state=_str(data["state"], "state"),
            observed=observed_from_dict(data["observed"]),
            reconnect=None if reconnect is None else reconnect_from_dict(reconnect),
            impact=_str(data["impact"], "impact"),
            cause=_cause(data["cause"], "cause"),
            evidence=tuple(_str_list(data["evidence"], "evidence")),
            hint=_str(data["hint"], "hint"),
            secondary=tuple(_cause(c, "secondary") for c in _str_list(data.get("secondary", []), "secondary")),
            keepalive_idle_s=_opt_float(data.get("keepalive_idle_s"), "keepalive_idle_s"),
            user_timeout_s=_opt_float(data.get("user_timeout_s"), "user_timeout_s"),
            server_before=_snapshot_from_dict(data.get("server_before"), "server_before"),
            server_after=_snapshot_from_dict(data.get("server_after"), "server_after"),
            upstream_after=None
            if data.get("upstream_after") is None
            else _sub(UpstreamInfo, data["upstream_after"], "upstream_after"),
        )


REQUIRED_KEYS: tuple[str, ...] = (
    "time",
    "sidecar",
    "client",
    "upstream",
    "connected_at",
    "age_s",
    "idle_s",
    "state",
    "observed",
    "impact",
    "cause",
    "evidence",
    "hint",
)


def human_line(rec: DropRecord) -> str:
    """The log line mirrored for each record: cause, timing, reconnect outcome, impact, hint."""
    parts = [
        f"upstream drop: cause={rec.cause.value}",
        f"state={rec.state}",
        f"idle={rec.idle_s:.1f}s",
        f"age={rec.age_s:.0f}s",
    ]
    if rec.observed.sqlstate:
        parts.append(f"sqlstate={rec.observed.sqlstate}")
    r = rec.reconnect
    if r is None or (r.attempts == 0 and not r.succeeded):  # 0 attempts: none was tried
        outcome = "no reconnect"
    elif r.succeeded:
        outcome = f"reconnected in {r.duration_s:.2f}s ({_attempts(r.attempts)})"
    elif r.abandoned:
        outcome = f"reconnect abandoned after {r.duration_s:.2f}s ({_attempts(r.attempts)})"
    else:
        outcome = f"reconnect failed after {r.duration_s:.2f}s ({_attempts(r.attempts)})"
    line = " ".join(parts) + f" {outcome}, {rec.impact}"
    if rec.secondary:
        line += "; also " + ", ".join(c.value for c in rec.secondary)
    return f"{line}; hint: {rec.hint}"


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def iso_utc(t: float) -> str:
    """Epoch seconds -> '2026-01-02T03:04:05.678Z'."""
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """ISO-8601 (naive means UTC, 'Z' accepted) -> epoch seconds; ValueError if not a time."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def observed_to_dict(obs: Observed) -> dict[str, Any]:
    """Observed as a plain dict; tcp_info keys sorted so lines compare equal."""
    out = _plain(obs)
    if obs.tcp_info is not None:
        out["tcp_info"] = {k: _finite(obs.tcp_info[k]) for k in sorted(obs.tcp_info)}
    return out


def observed_from_dict(data: Any) -> Observed:
    """Inverse of observed_to_dict."""
    if not isinstance(data, Mapping):
        raise DropRecordError("observed: expected an object")
    if "kind" not in data:
        raise DropRecordError("observed: missing required key 'kind'")
    tcp = data.get("tcp_info")
    if tcp is not None and not isinstance(tcp, Mapping):
        raise DropRecordError("observed.tcp_info: expected an object")
    return Observed(
        kind=_str(data["kind"], "observed.kind"),
        sqlstate=_opt_str(data.get("sqlstate"), "observed.sqlstate"),
        severity=_opt_str(data.get("severity"), "observed.severity"),
        message=_opt_str(data.get("message"), "observed.message"),
        tls_close_notify=_opt_bool(data.get("tls_close_notify"), "observed.tls_close_notify"),
        errno_name=_opt_str(data.get("errno_name"), "observed.errno_name"),
        tls_alert=_opt_str(data.get("tls_alert"), "observed.tls_alert"),
        tcp_info=None
        if tcp is None
        else {str(k): v for k, v in tcp.items() if isinstance(v, int | float) and v is not True},
    )


def reconnect_from_dict(data: Any) -> ReconnectOutcome:
    """ReconnectOutcome from its dict; attempts, duration_s and succeeded are required."""
    if not isinstance(data, Mapping):
        raise DropRecordError("reconnect: expected an object or null")
    for key in ("attempts", "duration_s", "succeeded"):
        if key not in data:
            raise DropRecordError(f"reconnect: missing required key '{key}'")
    flags = {name: _opt_bool(data.get(name), f"reconnect.{name}") for name in (*REVEAL_KEYS, "abandoned")}
    return ReconnectOutcome(
        attempts=int(_float(data["attempts"], "reconnect.attempts")),
        duration_s=_float(data["duration_s"], "reconnect.duration_s"),
        succeeded=_bool(data["succeeded"], "reconnect.succeeded"),
        errors=tuple(_str_list(data.get("errors", []), "reconnect.errors")),
        replayed=_opt_str(data.get("replayed"), "reconnect.replayed") or "",
        **flags,
    )


def _snapshot_to_dict(snap: ServerSnapshot | None) -> dict[str, Any] | None:
    if snap is None:
        return None
    out = _plain(snap)
    out["postmaster_start"] = None if snap.postmaster_start is None else iso_utc(snap.postmaster_start)
    return out


def _snapshot_from_dict(data: Any, key: str) -> ServerSnapshot | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise DropRecordError(f"{key}: expected an object or null")
    start = data.get("postmaster_start")
    timeline, port = data.get("timeline"), data.get("port")
    return ServerSnapshot(
        postmaster_start=None if start is None else _time(start, f"{key}.postmaster_start"),
        in_recovery=_opt_bool(data.get("in_recovery"), f"{key}.in_recovery"),
        read_only=_opt_bool(data.get("read_only"), f"{key}.read_only"),
        system_identifier=_opt_str(data.get("system_identifier"), f"{key}.system_identifier"),
        timeline=None if timeline is None else int(_float(timeline, f"{key}.timeline")),
        address=_opt_str(data.get("address"), f"{key}.address"),
        port=None if port is None else int(_float(port, f"{key}.port")),
    )


def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, float):
            value = _finite(value)
        out[f.name] = value
    return out


def _finite(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def _sub(cls: Any, data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise DropRecordError(f"{key}: expected an object")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def _time(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError:
            raise DropRecordError(f"{key}: not an ISO-8601 time: {value!r}") from None
    return _float(value, key)


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DropRecordError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _opt_float(value: Any, key: str) -> float | None:
    return None if value is None else _float(value, key)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise DropRecordError(f"{key}: expected a string, got {value!r}")
    return value


def _opt_str(value: Any, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _opt_bool(value: Any, key: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise DropRecordError(f"{key}: expected true, false or null, got {value!r}")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise DropRecordError(f"{key}: expected true or false, got {value!r}")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DropRecordError(f"{key}: expected a list of strings")
    return value


def _cause(value: Any, key: str) -> DropCause:
    try:
        return DropCause(value)
    except ValueError:
        raise DropRecordError(f"{key}: unknown cause {value!r}") from None
