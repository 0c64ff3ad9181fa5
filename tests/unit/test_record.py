"""DropRecord: JSON round trip, stable key order, required keys, the human log line."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from pgsidecar.drops.causes import DropCause
from pgsidecar.drops.classify import Evidence, Observed, ReconnectOutcome, classify
from pgsidecar.drops.record import (
    REQUIRED_KEYS,
    ClientInfo,
    DropFacts,
    DropRecord,
    DropRecordError,
    ServerSnapshot,
    UpstreamInfo,
    human_line,
    iso_utc,
    parse_time,
)
from pgsidecar.observe.recorder import build_record
from pgsidecar.relay.dropbook import snapshot
from pgsidecar.session.state import ServerFacts

T0 = 1_764_116_047.125  # 2025-11-26T00:14:07.125Z


def make(
    *,
    observed: Observed | None = None,
    reconnect: ReconnectOutcome | None = None,
    impact: str = "transparent",
    time: float = T0,
) -> DropRecord:
    obs = observed or Observed(
        "fatal",
        sqlstate="57P01",
        severity="FATAL",
        message="terminating connection due to administrator command",
        tls_close_notify=True,
        tcp_info={"rtt_us": 250, "retransmits": 0, "probes": 0, "last_data_recv_ms": 12300},
    )
    r = reconnect or ReconnectOutcome(
        3, 0.84, True, ("57P03 the database system is starting up", "ECONNREFUSED"), True, False
    )
    ev = Evidence(obs, "idle", 12.3, 3600.0, 10.0, 24.5, r)
    return DropRecord.from_evidence(
        time=time,
        sidecar="pod-a/1",
        client=ClientInfo("10.0.0.5:40112", "billing", "app", "shop"),
        upstream=UpstreamInfo(
            "db.internal",
            "10.1.2.3",
            5432,
            4242,
            "15.4",
            "TLSv1.3",
            "TLS_AES_256_GCM_SHA384",
            "ab" * 32,
            "2026-06-01T00:00:00Z",
        ),
        connected_at=time - 3600.0,
        client_idle_s=11.0,
        evidence=ev,
        impact=impact,
        classification=classify(ev),
    )


def test_round_trip() -> None:
    rec = make()
    line = rec.to_json()
    assert "\n" not in line
    back = DropRecord.from_json(line)
    assert back == rec
    assert back.to_json() == line


def test_every_design_field_is_present_in_order() -> None:
    data = json.loads(make().to_json())
    assert list(data)[:15] == [
        "time",
        "sidecar",
        "client",
        "upstream",
        "connected_at",
        "age_s",
        "idle_s",
        "client_idle_s",
        "state",
        "observed",
        "reconnect",
        "impact",
        "cause",
        "evidence",
        "hint",
    ]
    assert set(data["client"]) == {"addr", "application_name", "user", "database"}
    assert set(data["upstream"]) == {
        "host",
        "address",
        "port",
        "backend_pid",
        "server_version",
        "tls_version",
        "tls_cipher",
        "cert_fingerprint_sha256",
        "cert_not_after",
    }
    assert data["time"] == "2025-11-26T00:14:07.125Z"
    assert data["cause"] == "server_restart"
    assert data["reconnect"]["errors"][0].startswith("57P03")
    assert list(data["observed"]["tcp_info"]) == sorted(data["observed"]["tcp_info"])


def test_classification_travels_into_the_record() -> None:
    rec = make()
    assert rec.cause is DropCause.SERVER_RESTART
    assert "postmaster_start_changed" in rec.evidence
    assert rec.hint == DropCause.SERVER_RESTART.hint


def test_nan_and_inf_become_null() -> None:
    rec = make(observed=Observed("timeout", tcp_info={"rtt_us": math.nan, "probes": 3}))
    line = rec.to_json()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["observed"]["tcp_info"] == {"probes": 3, "rtt_us": None}


def test_extra_keys_are_ignored() -> None:
    data = json.loads(make().to_json())
    data["future_field"] = {"x": 1}
    data["client"]["pod"] = "a"
    data["observed"]["new"] = True
    assert DropRecord.from_json(json.dumps(data)) == make()


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key_is_named(key: str) -> None:
    data = json.loads(make().to_json())
    del data[key]
    with pytest.raises(DropRecordError, match=key):
        DropRecord.from_json(json.dumps(data))


def test_optional_keys_may_be_missing() -> None:
    data = json.loads(make().to_json())
    for key in ("reconnect", "client_idle_s", "secondary", "keepalive_idle_s", "user_timeout_s"):
        del data[key]
    rec = DropRecord.from_json(json.dumps(data))
    assert rec.reconnect is None and rec.client_idle_s is None and rec.secondary == ()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(cause="gremlins"), "unknown cause 'gremlins'"),
        (lambda d: d.update(idle_s="long"), "idle_s: expected a number"),
        (lambda d: d.update(time="yesterday"), "time: not an ISO-8601 time"),
        (lambda d: d["observed"].pop("kind"), "observed: missing required key 'kind'"),
        (lambda d: d["reconnect"].pop("attempts"), "reconnect: missing required key 'attempts'"),
        (lambda d: d["reconnect"].update(succeeded="yes"), "reconnect.succeeded"),
        (lambda d: d.update(evidence="x"), "evidence: expected a list"),
        (lambda d: d.update(client=[]), "client: expected an object"),
    ],
)
def test_bad_values_are_named(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(make().to_json())
    mutate(data)
    with pytest.raises(DropRecordError, match=needle.replace("(", r"\(")):
        DropRecord.from_json(json.dumps(data))


def test_not_json_and_not_object() -> None:
    with pytest.raises(DropRecordError, match="invalid JSON"):
        DropRecord.from_json("{nope")
    with pytest.raises(DropRecordError, match="not a JSON object"):
        DropRecord.from_json("[1, 2]")


def test_epoch_numbers_accepted_for_times() -> None:
    data = json.loads(make().to_json())
    data["time"] = T0
    assert DropRecord.from_json(json.dumps(data)).time == T0


def test_iso_helpers() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    assert parse_time("1970-01-01 00:01:00") == 60.0  # naive means UTC
    assert parse_time("1970-01-01T01:01:00+01:00") == 60.0
    assert parse_time(iso_utc(T0)) == T0


def test_human_line() -> None:
    line = human_line(make())
    assert line.startswith("upstream drop: cause=server_restart state=idle idle=12.3s age=3600s")
    assert "reconnected in 0.84s (3 attempts), transparent; hint: " in line
    assert "\n" not in line


def test_human_line_failed_reconnect_and_error_impact() -> None:
    rec = make(
        reconnect=ReconnectOutcome(12, 30.0, False, ("ECONNREFUSED",)),
        impact="fatal 08006 client closed",
    )
    line = human_line(rec)
    assert "reconnect failed after 30.00s (12 attempts), fatal 08006 client closed" in line


def test_human_line_mentions_secondary() -> None:
    r = ReconnectOutcome(2, 1.0, True, ("53300 sorry, too many clients already",), False)
    rec = make(reconnect=r)
    assert rec.secondary == (DropCause.TOO_MANY_CONNECTIONS,)
    assert "also too_many_connections" in human_line(rec)


# -- server facts and the abandoned reconnect (issue 10 items 7 and 8) --------------------------

PRIMARY = ServerSnapshot(T0 - 86400.5, False, False, "7714444273140419620", 1, "10.1.2.3", 5432)
STANDBY = ServerSnapshot(T0 - 600.25, True, True, "7714444273140419620", 1, "10.1.2.3", 5432)


def test_server_facts_round_trip_exactly() -> None:
    rec = replace(make(), server_before=PRIMARY, server_after=STANDBY)
    data = json.loads(rec.to_json())
    assert data["server_before"]["postmaster_start"] == iso_utc(PRIMARY.postmaster_start or 0)
    assert data["server_after"]["system_identifier"] == "7714444273140419620"  # a string: exact
    assert data["server_after"] == {
        "postmaster_start": iso_utc(T0 - 600.25),
        "in_recovery": True,
        "read_only": True,
        "system_identifier": "7714444273140419620",
        "timeline": 1,
        "address": "10.1.2.3",
        "port": 5432,
    }
    assert DropRecord.from_json(rec.to_json()) == rec


def test_records_without_server_facts_still_read() -> None:
    data = json.loads(make().to_json())
    assert data["server_before"] is None and data["server_after"] is None
    for key in ("server_before", "server_after"):
        del data[key]
    assert DropRecord.from_json(json.dumps(data)) == make()
    data["server_after"] = {"timeline": "two"}
    with pytest.raises(DropRecordError, match=r"server_after\.timeline: expected a number"):
        DropRecord.from_json(json.dumps(data))


def test_new_reconnect_flags_round_trip() -> None:
    r = ReconnectOutcome(
        2,
        1.5,
        False,
        ("ECONNREFUSED",),
        in_recovery_now=True,
        timeline_changed=False,
        system_identifier_changed=False,
        abandoned=True,
    )
    rec = make(reconnect=r, impact="client left during reconnect")
    back = DropRecord.from_json(rec.to_json())
    assert back.reconnect == r
    assert json.loads(rec.to_json())["reconnect"]["abandoned"] is True


def test_human_line_when_no_reconnect_was_tried() -> None:
    rec = make(reconnect=ReconnectOutcome(0, 0.0, False), impact="fatal 08006 client closed")
    assert " no reconnect, fatal 08006 client closed" in human_line(rec)


def test_human_line_abandoned_reconnect() -> None:
    rec = make(reconnect=ReconnectOutcome(2, 1.5, False, (), abandoned=True), impact="client left during reconnect")
    line = human_line(rec)
    assert "reconnect abandoned after 1.50s (2 attempts), client left during reconnect" in line
    assert "reconnect failed" not in line


KEEPALIVE = SimpleNamespace(
    upstream=SimpleNamespace(keepalive=SimpleNamespace(idle_s=10.0, effective_user_timeout_s=24.5))
)


def brain_facts(impact: str, reconnect: ReconnectOutcome, **extra: object) -> DropFacts:
    """What relay/dropbook.py DropTracker.finish hands to the recorder."""
    facts = DropFacts(
        time=T0,
        state="idle",
        impact=impact,
        connected_at=T0 - 60,
        age_s=60.0,
        idle_s=5.0,
        client_idle_s=5.0,
        observed=Observed(
            kind="fatal",
            sqlstate="57P01",
            severity="FATAL",
            message="terminating connection due to administrator command",
        ),
        reconnect=reconnect,
        client=ClientInfo(addr="127.0.0.1:5000"),
        upstream=UpstreamInfo(host="db", address="10.1.2.3", port=5432, backend_pid=7),
    )
    return replace(facts, **extra)  # type: ignore[arg-type]


def test_recorder_keeps_an_abandoned_reconnect_apart_from_a_failed_one() -> None:
    """The brain marks a book closed because the client left mid-reconnect as abandoned; the old
    rules read its succeeded=False as a restart (47 of 111 records in one run)."""
    refused = ('53300 too many connections for role "app"',) * 2
    info = brain_facts("client left during reconnect", ReconnectOutcome(3, 1.2, False, refused, abandoned=True))
    rec = build_record(info, sidecar="s", config=KEEPALIVE)  # type: ignore[arg-type]
    assert rec.reconnect is not None and rec.reconnect.abandoned is True
    assert rec.cause is DropCause.ADMIN_TERMINATE and "reconnect_abandoned" in rec.evidence
    failed = build_record(
        brain_facts("fatal 08006 client closed", ReconnectOutcome(9, 30.0, False)),
        sidecar="s",
        config=KEEPALIVE,  # type: ignore[arg-type]
    )
    assert failed.reconnect is not None and failed.reconnect.abandoned is None
    assert failed.cause is DropCause.SERVER_RESTART  # a reconnect that ran out still is a sign


def test_recorder_keeps_the_server_facts_of_both_connections() -> None:
    before = ServerFacts(T0 - 86400.5, False, False, "10.1.2.3", 5432, "77", 1)
    after = ServerFacts(T0 - 600.25, True, True, "10.1.2.3", 5432, "77", 1)
    outcome = ReconnectOutcome(
        attempts=2,
        duration_s=0.5,
        succeeded=True,
        errors=("ECONNREFUSED",),
        postmaster_start_changed=True,
        in_recovery_now=True,
        read_only_now=True,
        system_identifier_changed=False,
        timeline_changed=False,
        replayed="1 setting(s)",
    )
    info = brain_facts("transparent", outcome, server_before=snapshot(before), server_after=snapshot(after))
    rec = build_record(info, sidecar="s", config=KEEPALIVE)  # type: ignore[arg-type]
    assert rec.server_before == ServerSnapshot(T0 - 86400.5, False, False, "77", 1, "10.1.2.3", 5432)
    assert rec.server_after is not None and rec.server_after.in_recovery is True
    assert rec.cause is DropCause.SWITCHOVER and rec.reconnect is not None
    assert rec.reconnect.in_recovery_now is True and rec.reconnect.abandoned is None
    # what was replayed is kept in the written line and read back
    assert DropRecord.from_json(rec.to_json()).reconnect == rec.reconnect
