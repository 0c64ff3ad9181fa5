"""Turns the brain's drop facts into a classified DropRecord: written, logged and counted."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pgsidecar.config.model import Config
from pgsidecar.drops.classify import Evidence, classify
from pgsidecar.drops.record import DropFacts, DropRecord, human_line
from pgsidecar.observe.droplog import DropLogWriter

log = logging.getLogger("pgsidecar.drops")


def build_record(facts: DropFacts, *, sidecar: str, config: Config) -> DropRecord:
    """Pure assembly: the brain's facts plus the keepalive settings -> classify -> DropRecord."""
    keepalive = config.upstream.keepalive
    evidence = Evidence(
        observed=facts.observed,
        state=facts.state,
        idle_s=facts.idle_s,
        age_s=facts.age_s,
        keepalive_idle_s=keepalive.idle_s,
        user_timeout_s=keepalive.effective_user_timeout_s,
        reconnect=facts.reconnect,
    )
    return DropRecord.from_evidence(
        time=facts.time,
        sidecar=sidecar,
        client=facts.client,
        upstream=facts.upstream,
        connected_at=facts.connected_at,
        client_idle_s=facts.client_idle_s,
        evidence=evidence,
        impact=facts.impact,
        classification=classify(evidence),
        server_before=facts.server_before,
        server_after=facts.server_after,
        upstream_after=facts.upstream_after,
    )


class DropRecorder:
    """Owns the drop log; one call per drop from the runtime."""

    def __init__(self, config: Config, sidecar: str, *, on_record: Callable[[DropRecord], None] | None = None) -> None:
        self.config = config
        self.sidecar = sidecar
        self.writer = DropLogWriter(config.drop_log.path, config.drop_log.max_bytes, config.drop_log.backups)
        self.on_record = on_record

    def record(self, driver: object, facts: DropFacts) -> DropRecord | None:
        """Build, write, log and count one record. Never raises into the session that dropped:
        a record that cannot be built or written is one error line, and the session goes on."""
        try:
            rec = build_record(facts, sidecar=self.sidecar, config=self.config)
        except Exception as exc:  # noqa: BLE001 - an internal bug must not kill the session
            log.error("could not build a drop record: %s (%r)", exc, facts)
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
