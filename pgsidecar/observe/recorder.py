"""Turns the brain's drop facts into a classified DropRecord: written, logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pgsidecar.config.model import Config
from pgsidecar.drops.classify import Evidence, Observed, ReconnectOutcome, classify
from pgsidecar.drops.record import (
    REVEAL_KEYS,
    ClientInfo,
    DropRecord,
    ServerSnapshot,
    UpstreamInfo,
    human_line,
    iso_utc,
)
from pgsidecar.observe.droplog import DropLogWriter

log = logging.getLogger("pgsidecar.drops")

_OBSERVED_KEYS = ("sqlstate", "severity", "message", "tls_close_notify", "errno_name")
# The impact the brain gives a book closed because the client left mid-reconnect
# (relay/connection.py _client_closed): that reconnect neither failed nor succeeded.
ABANDONED_IMPACT = "client left during reconnect"


def _abandoned(info: dict[str, Any], rec: dict[str, Any]) -> bool | None:
    if rec.get("abandoned") is not None:
        return bool(rec["abandoned"])
    if rec.get("succeeded"):
        return None
    return True if str(info.get("impact", "")).startswith(ABANDONED_IMPACT) else None


def _snapshot(facts: Any) -> ServerSnapshot | None:
    """session/state.py ServerFacts (or its dict) -> the record's ServerSnapshot."""
    if facts is None:
        return None
    get: Callable[[str], Any] = facts.get if isinstance(facts, dict) else (lambda name: getattr(facts, name, None))
    return ServerSnapshot(
        postmaster_start=get("postmaster_start"),
        in_recovery=get("in_recovery"),
        read_only=get("read_only"),
        system_identifier=get("system_identifier"),
        timeline=get("timeline"),
        address=get("server_addr"),
        port=get("server_port"),
    )


def build_record(info: dict[str, Any], *, sidecar: str, config: Config) -> DropRecord:
    """Pure assembly: the brain's facts -> Evidence -> classify -> DropRecord."""
    obs = info["observed"]
    observed = Observed(
        kind=obs["kind"],
        tcp_info=obs.get("tcp_info"),
        tls_alert=obs.get("detail") if obs["kind"] == "tls_error" else None,
        **{key: obs.get(key) for key in _OBSERVED_KEYS},
    )
    rec = info.get("reconnect") or {}
    reconnect = (
        ReconnectOutcome(
            attempts=int(rec.get("attempts", 0)),
            duration_s=float(rec.get("duration_s", 0.0)),
            succeeded=bool(rec.get("succeeded")),
            errors=tuple(rec.get("errors", ())),
            abandoned=_abandoned(info, rec),
            **{key: rec.get(key) for key in REVEAL_KEYS},
        )
        if rec
        else None
    )
    keepalive = config.upstream.keepalive
    evidence = Evidence(
        observed=observed,
        state=info["state"],
        idle_s=float(info["idle_s"]),
        age_s=float(info["age_s"]),
        keepalive_idle_s=keepalive.idle_s,
        user_timeout_s=keepalive.effective_user_timeout_s,
        reconnect=reconnect,
    )
    up = info.get("upstream") or {}
    cl = info.get("client") or {}
    not_after = up.get("cert_not_after")
    return DropRecord.from_evidence(
        time=float(info["time"]),
        sidecar=sidecar,
        client=ClientInfo(
            addr=cl.get("addr"),
            application_name=cl.get("application_name"),
            user=cl.get("user"),
            database=cl.get("database"),
        ),
        upstream=UpstreamInfo(
            host=up.get("host"),
            address=up.get("address"),
            port=up.get("port"),
            backend_pid=up.get("backend_pid"),
            server_version=up.get("server_version"),
            tls_version=up.get("tls_version"),
            tls_cipher=up.get("tls_cipher"),
            cert_fingerprint_sha256=up.get("cert_fingerprint"),
            cert_not_after=iso_utc(not_after) if isinstance(not_after, (int, float)) else not_after,
        ),
        connected_at=float(info.get("connected_at") or 0.0),
        client_idle_s=info.get("client_idle_s"),
        evidence=evidence,
        impact=info.get("impact", "transparent"),
        classification=classify(evidence),
        server_before=_snapshot(info.get("server_facts_before")),
        server_after=_snapshot(info.get("server_facts_after")),
    )


class DropRecorder:
    """Owns the drop log; one call per drop from the runtime."""

    def __init__(self, config: Config, sidecar: str, *, on_record: Callable[[DropRecord], None] | None = None) -> None:
        self.config = config
        self.sidecar = sidecar
        self.writer = DropLogWriter(config.drop_log.path, config.drop_log.max_bytes, config.drop_log.backups)
        self.on_record = on_record

    def record(self, driver: object, info: dict[str, Any]) -> DropRecord | None:
        """Build, write, log and count one record. Never raises into the session that dropped:
        a record that cannot be built or written is one error line, and the session goes on."""
        try:
            rec = build_record(info, sidecar=self.sidecar, config=self.config)
        except Exception as exc:  # noqa: BLE001 - an internal bug must not kill the session
            log.error("could not build a drop record: %s (%r)", exc, info)
            return None
        try:
            self.writer.write(rec)
            level = logging.INFO if rec.impact.startswith("transparent") else logging.WARNING
            log.log(level, human_line(rec), extra={"fields": {"drop": rec.to_dict()}})
            if self.on_record is not None:
                self.on_record(rec)
        except Exception as exc:  # noqa: BLE001 - nor a full disk or a broken metric
            log.error("could not write or count a drop record: %s", exc)
        return rec

    def reopen(self) -> None:
        self.writer.reopen()

    def close(self) -> None:
        self.writer.close()
