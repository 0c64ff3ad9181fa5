"""Drop records checked against what the test itself did: timings, upstream facts, one record per
affected connection, certificate rotation, and `pgsidecar drops` reading the records produced here.

pgsidecar/drops/record.py defines the fields; pgsidecar/drops/classify.py's docstring lists the rules.
Causes of the single faults (terminate, timeouts, restarts, crash, 53300) are checked in
test_idle_faults.py; this module checks the rest of the record, the analyzer on real output, and
the causes that need the server facts read after login: a reconnect the client abandoned, a
switchover or failover to a standby on the same address, and a crash of the same server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import psycopg2
import pytest
from cryptography import x509

from tests.fixtures.certs import certificate_fingerprint, make_server_cert
from tests.fixtures.faults import (
    FaultRig,
    assert_no_raw_drop,
    request,
    wait_until,
)
from tests.fixtures.postgres import move_to_port, promote

pytestmark = [pytest.mark.server, pytest.mark.faults]

IDLE_S = 2.0
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# Drop logs written by the tests of this module, read again by the `pgsidecar drops` test.
PRODUCED: list[str] = []


def _epoch(iso: str) -> float:
    assert ISO_MS.match(iso), f"not an ISO-8601 UTC time with milliseconds: {iso!r}"
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _pid(conn) -> int:
    return request(conn, "SELECT pg_backend_pid()")[0][0]


def _works(conn) -> int:
    try:
        return _pid(conn)
    except psycopg2.Error as exc:
        assert_no_raw_drop(exc)
        raise AssertionError(f"the app saw an error after an idle-time fault: {exc!r}") from exc


def _keep(rig: FaultRig) -> None:
    PRODUCED.append(rig.sidecar.drop_log)


def _drops_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgsidecar", "drops", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _exact_drops(rig: FaultRig, count: int, timeout: float = 20.0) -> list[dict]:
    drops = rig.sidecar.wait_drops(count, timeout)
    tail = rig.sidecar.logs()[-3000:]
    assert len(drops) >= count, f"{len(drops)} of {count} drop records; log tail:\n{tail}"
    time.sleep(0.5)
    drops = rig.sidecar.drops()
    assert len(drops) == count, f"expected exactly {count} records, got {len(drops)}: {drops}"
    return drops


def test_timing_and_upstream_facts_match_what_the_test_did(rig_factory):
    rig = rig_factory()
    wall_before_connect = time.time()
    conn = rig.app()
    wall_after_connect = time.time()
    pid = _pid(conn)
    last_request = time.monotonic()
    time.sleep(IDLE_S)
    wall_before_fault = time.time()
    before_fault = time.monotonic()
    assert rig.cluster.terminate(pid)
    after_fault = time.monotonic()
    drop = rig.one_drop()
    wall_seen = time.time()
    _keep(rig)
    assert _works(conn) != pid

    assert drop["cause"] == "admin_terminate" and drop["state"] == "idle", drop
    low, high = before_fault - last_request, after_fault - last_request
    for key in ("idle_s", "client_idle_s"):
        assert abs(drop[key] - IDLE_S) <= 1.0, (key, drop[key])
        assert low - 0.5 <= drop[key] <= high + 0.5, (key, drop[key], low, high)
    assert drop["age_s"] >= drop["idle_s"]

    connected_at, at = _epoch(drop["connected_at"]), _epoch(drop["time"])
    assert wall_before_connect - 0.5 <= connected_at <= wall_after_connect + 0.5
    assert wall_before_fault - 0.1 <= at <= wall_seen + 0.1
    assert abs((at - connected_at) - drop["age_s"]) <= 0.1, (at - connected_at, drop["age_s"])

    up = drop["upstream"]
    assert up["backend_pid"] == pid
    assert up["host"] == "localhost" and up["port"] == rig.cluster.port, up
    version = rig.cluster.sql("SHOW server_version")[0][0]
    assert up["server_version"] == version, (up["server_version"], version)
    assert up["tls_version"] in ("TLSv1.2", "TLSv1.3"), up
    assert isinstance(up["tls_cipher"], str) and up["tls_cipher"], up
    cert_path = rig.cluster.pki.server_cert
    assert up["cert_fingerprint_sha256"] == certificate_fingerprint(cert_path), up
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert abs(_epoch(up["cert_not_after"]) - cert.not_valid_after_utc.timestamp()) < 1.0, up


def test_one_record_per_client_on_restart_and_the_analyzer_correlates(rig_factory):
    rig = rig_factory()
    conns = [rig.app(application_name=f"corr{i}") for i in range(3)]
    old = {_pid(c) for c in conns}
    assert len(old) == 3
    rig.cluster.restart("fast")
    drops = _exact_drops(rig, 3)
    _keep(rig)
    assert not old & {_works(c) for c in conns}
    assert sorted(d["client"]["application_name"] for d in drops) == ["corr0", "corr1", "corr2"]
    assert {d["upstream"]["backend_pid"] for d in drops} == old
    assert [d["cause"] for d in drops] == ["server_restart"] * 3, drops
    times = [_epoch(d["time"]) for d in drops]
    assert max(times) - min(times) < 1.0, drops

    text = _drops_cli(rig.sidecar.drop_log)
    assert text.returncode == 0 and text.stderr == "", text
    out = text.stdout
    # The story's headline: the moment, who, why. The clients' idle ages at a restart are
    # whatever they were, so no idle-age "cluster" is claimed for them.
    assert re.search(
        r"^3 drops at \S+; 3 at \d\d:\d\d:\d\d across 1 sidecar \(3 clients\): server"
        r" restart \(postmaster start time changed",
        out,
        re.M,
    ), out
    assert "after the same idle time" not in out, out
    assert re.search(r"^\s+3\s+server_restart\s+server restart$", out, re.M), out
    assert re.search(r"^\s+3\s+server_restart: the server was restarted or shut down", out, re.M), out

    machine = _drops_cli("--json", rig.sidecar.drop_log)
    assert machine.returncode == 0, machine
    summary = json.loads(machine.stdout)
    assert summary["count"] == 3 and summary["malformed"] == 0 and summary["idle_clusters"] == []
    assert [(c["cause"], c["count"]) for c in summary["by_cause"]] == [("server_restart", 3)]
    (event,) = summary["events"]
    assert (event["drops"], event["clients"], event["sidecars"]) == (3, 3, 1), event
    assert event["cause"] == "server_restart" and "postmaster_start_changed" in event["evidence"]


@pytest.mark.parametrize("fault", ["terminate", "restart"])
def test_certificate_rotated_then_a_drop(rig_factory, tmp_path, fault):
    """classify.py rule 7: a new certificate on reconnect after a server-side close makes
    certificate_rotated the cause, and what rules 8-12 would have said goes to `secondary`."""
    rig = rig_factory()
    conn = rig.app()
    pid = _pid(conn)
    old_fp = certificate_fingerprint(rig.cluster.pki.server_cert)
    cert, key = make_server_cert(rig.cluster.pki, tmp_path)
    new_fp = certificate_fingerprint(cert)
    assert new_fp != old_fp
    rig.cluster.install_server_cert(cert, key)  # reloads; the live TLS session keeps the old one
    if fault == "terminate":
        assert rig.cluster.terminate(pid)
    else:
        rig.cluster.restart("fast")
    drop = rig.one_drop()
    _keep(rig)
    new_pid = _works(conn)
    assert new_pid != pid
    underlying = {"terminate": "admin_terminate", "restart": "server_restart"}[fault]
    assert drop["cause"] == "certificate_rotated", drop
    assert drop["secondary"][:1] == [underlying], drop
    assert drop["reconnect"]["certificate_changed"] is True, drop["reconnect"]
    assert "certificate_changed" in drop["evidence"]
    assert drop["upstream"]["cert_fingerprint_sha256"] == old_fp  # the connection that ended
    assert "certificate was replaced" in drop["hint"] and "; also " in drop["hint"], drop["hint"]
    if fault == "restart":
        return
    # The next drop on the same certificate is an ordinary one: "changed" compares with the
    # connection that ended, not with the certificate the sidecar first saw.
    assert rig.cluster.terminate(new_pid)
    drops = _exact_drops(rig, 2)
    second = drops[1]
    assert second["upstream"]["cert_fingerprint_sha256"] == new_fp
    assert second["cause"] == "admin_terminate", second
    assert second["reconnect"].get("certificate_changed") in (None, False)
    assert _works(conn) != new_pid


def test_drops_cli_on_these_records(rig_factory, tmp_path):
    """Totals match the records, and a garbage line is named once on stderr, the rest counted."""
    rig = rig_factory()
    first, second = rig.app(application_name="cli0"), rig.app(application_name="cli1")
    pid = _pid(first)
    _pid(second)
    assert rig.cluster.terminate(pid)
    rig.sidecar.wait_drops(1)
    _works(first)
    rig.cluster.restart("fast")
    own = _exact_drops(rig, 3)
    assert Counter(d["cause"] for d in own) == {"admin_terminate": 1, "server_restart": 2}, own

    logs = [rig.sidecar.drop_log, *(p for p in PRODUCED if Path(p).exists())]
    lines = [ln for p in logs for ln in Path(p).read_text().splitlines() if ln.strip()]
    expected = Counter(json.loads(ln)["cause"] for ln in lines)
    machine = _drops_cli("--json", *logs)
    assert machine.returncode == 0 and machine.stderr == "", machine
    summary = json.loads(machine.stdout)
    assert summary["count"] == len(lines)
    assert {c["cause"]: c["count"] for c in summary["by_cause"]} == dict(expected)
    text = _drops_cli(*logs).stdout
    for cause, n in expected.items():
        assert re.search(rf"^\s+{n}\s+{cause}\s", text, re.M), (cause, n, text)

    broken = tmp_path / "broken.jsonl"
    own_lines = Path(rig.sidecar.drop_log).read_text().splitlines()
    broken.write_text("\n".join([own_lines[0], "this is not a drop record {", *own_lines[1:]]) + "\n")
    shutil.copymode(rig.sidecar.drop_log, broken)
    bad = _drops_cli("--json", str(broken))
    assert bad.returncode == 0, bad
    err = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"{broken}:2: "), bad.stderr
    summary = json.loads(bad.stdout)
    assert summary["count"] == 3 and summary["malformed"] == 1, summary
    totals = {c["cause"]: c["count"] for c in summary["by_cause"]}
    assert totals == {"admin_terminate": 1, "server_restart": 2}, summary


# -- causes that need more than the last words: issue 10 items 7 and 8 --------------------------


def _server_log_has(cluster, *needles: str) -> bool:
    text = Path(cluster.log_path).read_text(errors="replace")
    return any(all(n in line for n in needles) for line in text.splitlines())


def test_client_leaving_during_the_reconnect_after_a_terminate_is_no_restart(rig_factory):
    """classify.py rules 10-11: an abandoned reconnect is neither success nor failure, so it is no
    restart sign. The reconnect is kept busy honestly: the app's role may not log in for now
    (CONNECTION LIMIT 0: every attempt gets 53300 "too many connections for role" and is retried),
    while the postmaster stays up; the client leaves during those retries."""
    rig = rig_factory()
    conn = rig.app()
    pid = _pid(conn)
    started = rig.cluster.postmaster_start_time()
    rig.cluster.sql("ALTER ROLE app CONNECTION LIMIT 0")
    try:
        assert rig.cluster.terminate(pid)
        wait_until(
            lambda: _server_log_has(rig.cluster, "53300", "too many connections for role"),
            10.0,
            "the sidecar's reconnect refused with 53300",
        )
        conn.close()  # the app leaves while the sidecar is still reconnecting
        drop = rig.one_drop()
    finally:
        rig.cluster.sql("ALTER ROLE app CONNECTION LIMIT -1")
    _keep(rig)
    assert rig.cluster.postmaster_start_time() == started  # the fault really was no restart

    assert drop["impact"] == "client left during reconnect", drop
    assert drop["cause"] == "admin_terminate", drop
    assert "server_restart" not in drop["secondary"], drop
    rec = drop["reconnect"]
    assert rec["abandoned"] is True and rec["succeeded"] is False, rec
    assert any(e.startswith("53300") for e in rec["errors"]), rec
    assert "reconnect_abandoned" in drop["evidence"] and "reconnect_failed" not in drop["evidence"]
    assert "too_many_connections" in drop["secondary"], drop
    assert "CONNECTION LIMIT" in drop["hint"], drop["hint"]


def _switch(rig, standby, *, old_primary_stop: str, promote_first: bool) -> None:
    """The primary goes, and the standby takes over the primary's port: the sidecar's upstream
    address stays the same, the server behind it does not."""
    port = rig.cluster.port
    rig.cluster.stop(old_primary_stop)
    if promote_first:
        promote(standby)
    standby.stop("fast")
    move_to_port(standby, port)
    standby.start()


def test_switchover_to_a_standby_at_the_same_address_is_no_crash(rig_factory, standby_of):
    """Old primary shut down fast (57P01 to every session), the same address then serves a hot
    standby that never crashed: switchover, not server_crash (the old rule read "in recovery" as
    crash recovery)."""
    rig = rig_factory()
    standby = standby_of(rig.cluster)
    conn = rig.app()
    pid = _pid(conn)
    before = rig.cluster.sql("SELECT system_identifier FROM pg_control_system()")[0][0]
    _switch(rig, standby, old_primary_stop="fast", promote_first=False)
    drop = rig.one_drop(timeout=30.0)
    _keep(rig)
    assert _works(conn) != pid
    assert standby.sql("SELECT pg_is_in_recovery()")[0][0] is True

    assert drop["observed"]["sqlstate"] == "57P01", drop["observed"]
    assert drop["cause"] == "switchover", drop
    assert "server_crash" not in drop["secondary"], drop
    rec = drop["reconnect"]
    assert rec["succeeded"] is True and rec.get("abandoned") is not True, rec
    assert rec["in_recovery_now"] is True and rec["postmaster_start_changed"] is True, rec
    assert rec["system_identifier_changed"] is False, rec  # a physical copy of the same cluster
    assert rec.get("address_changed") is not True, rec  # the address stayed: the facts told
    assert not rec.get("in_recovery_seen"), rec  # no crash recovery was seen
    old, new = drop["server_before"], drop["server_after"]
    assert old["in_recovery"] is False and new["in_recovery"] is True, (old, new)
    assert new["read_only"] is True and new["port"] == rig.cluster.port, new
    assert old["system_identifier"] == new["system_identifier"] == str(before), (old, new)
    assert "in_recovery_now" in drop["evidence"], drop["evidence"]
    assert "standby" in drop["hint"], drop["hint"]


def test_failover_to_a_promoted_standby_at_the_same_address(rig_factory, standby_of):
    """Old primary gone without a clean shutdown (immediate: WARNING 57P01, then EOF), a promoted
    standby on the same address: failover (the old rules said server_restart)."""
    rig = rig_factory()
    standby = standby_of(rig.cluster)
    conn = rig.app()
    pid = _pid(conn)
    _switch(rig, standby, old_primary_stop="immediate", promote_first=True)
    drop = rig.one_drop(timeout=30.0)
    _keep(rig)
    assert _works(conn) != pid
    assert standby.sql("SELECT pg_is_in_recovery()")[0][0] is False

    assert "immediate shutdown" in (drop["observed"]["message"] or ""), drop["observed"]
    assert drop["cause"] == "failover", drop
    rec = drop["reconnect"]
    assert rec["timeline_changed"] is True and rec["in_recovery_now"] is False, rec
    assert rec["system_identifier_changed"] is False, rec
    assert rec.get("address_changed") is not True, rec
    old, new = drop["server_before"], drop["server_after"]
    assert (old["timeline"], new["timeline"]) == (1, 2), (old, new)
    assert "timeline_changed" in drop["evidence"], drop["evidence"]


def test_kill9_of_a_backend_is_a_crash_of_the_same_server(rig_factory):
    """Crash recovery keeps the postmaster, its start time, the timeline and the system
    identifier: the record says so, and the cause stays server_crash."""
    rig = rig_factory()
    conn = rig.app()
    pid = _pid(conn)
    victim = rig.cluster.connect(user="app")
    try:
        rig.cluster.kill9(victim.info.backend_pid)
        drop = rig.one_drop()
    finally:
        victim.close()
    _keep(rig)
    assert _works(conn) != pid
    assert drop["observed"]["sqlstate"] == "57P02", drop["observed"]
    assert drop["cause"] == "server_crash", drop
    rec = drop["reconnect"]
    assert rec["postmaster_start_changed"] is False, rec
    assert rec["in_recovery_now"] is False and rec["timeline_changed"] is False, rec
    assert rec["system_identifier_changed"] is False, rec
    assert drop["server_before"]["postmaster_start"] == drop["server_after"]["postmaster_start"]


def test_identity_facts_are_skipped_where_they_would_fail_the_row(rig_factory):
    """session/state.py FACTS_SQL: on Aurora (told by its aurora_version() function) the WAL
    control functions raise, and one error would lose every fact; there the system identifier
    and timeline are left out, and the rest still decides. A function of that name in the app's
    database stands in for Aurora here."""
    rig = rig_factory()
    rig.cluster.sql("CREATE FUNCTION public.aurora_version() RETURNS text LANGUAGE sql AS $$SELECT 'a lookalike'$$")
    conn = rig.app()
    pid = _pid(conn)
    assert rig.cluster.terminate(pid)
    drop = rig.one_drop()
    _keep(rig)
    assert _works(conn) != pid
    assert drop["cause"] == "admin_terminate" and "postmaster_unchanged" in drop["evidence"], drop
    for side in ("server_before", "server_after"):
        facts = drop[side]
        assert facts["postmaster_start"] and facts["in_recovery"] is False, (side, facts)
        assert facts["port"] == rig.cluster.port, (side, facts)
        assert facts["system_identifier"] is None and facts["timeline"] is None, (side, facts)
    rec = drop["reconnect"]
    assert rec.get("timeline_changed") is None and rec.get("system_identifier_changed") is None
