"""`pgsidecar drops` on generated files: clusters, correlation, windows, errors, --json, .gz."""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from pathlib import Path

import pytest

from pgsidecar.drops.causes import DropCause
from pgsidecar.drops.classify import Observed, ReconnectOutcome
from pgsidecar.drops.record import ClientInfo, DropRecord, UpstreamInfo
from pgsidecar.drops.report import find_clusters, main, middlebox_for, parse_duration

DAY0 = 1_764_115_200.0  # 2025-11-26T00:00:00Z


def rec(
    t: float,
    *,
    cause: DropCause = DropCause.PATH_IDLE_TIMEOUT,
    idle: float = 10.0,
    sidecar: str = "s1",
    client: str = "10.0.0.1:5000",
    host: str = "db",
    evidence: tuple[str, ...] = ("kind=timeout",),
    keepalive: float | None = None,
    impact: str = "transparent",
) -> DropRecord:
    return DropRecord(
        time=t,
        sidecar=sidecar,
        client=ClientInfo(client, "app", "u", "d"),
        upstream=UpstreamInfo(host, "10.1.1.1", 5432, 100),
        connected_at=t - 5000.0,
        age_s=5000.0,
        idle_s=idle,
        client_idle_s=idle,
        state="idle",
        observed=Observed("timeout", errno_name="ETIMEDOUT"),
        reconnect=ReconnectOutcome(1, 0.05, True),
        impact=impact,
        cause=cause,
        evidence=evidence,
        hint=cause.hint,
        keepalive_idle_s=keepalive,
    )


def write(path: Path, records: list[DropRecord], extra: list[str] | None = None) -> Path:
    lines = [r.to_json() for r in records] + (extra or [])
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv: list[str], stdin: str = "", now: float | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err, now=now)
    return code, out.getvalue(), err.getvalue()


def story(tmp_path: Path) -> list[Path]:
    """The issue's story: 38 drops at idle 350 s +/- 2 s among noise, and one restart on 6 pods."""
    rng = random.Random(5)
    files = []
    restart_at = DAY0 + 2 * 3600 + 14 * 60 + 7.2
    for pod in range(6):
        recs = []
        for i in range(pod * 7, pod * 7 + 7):
            if i < 38:
                recs.append(rec(DAY0 + i * 2200.0, idle=350.0 + rng.uniform(-2, 2), sidecar=f"pod{pod}"))
        if pod < 3:
            recs.append(
                rec(
                    restart_at + pod * 0.1,
                    cause=DropCause.SERVER_RESTART,
                    idle=rng.uniform(0, 900),
                    sidecar=f"pod{pod}",
                    evidence=("kind=fatal", "sqlstate=57P01", "postmaster_start_changed"),
                )
            )
        files.append(write(tmp_path / f"pod{pod}.jsonl", sorted(recs, key=lambda r: r.time)))
    noise = [rec(DAY0 + 500.0 + k * 7000, idle=rng.uniform(20, 3000), sidecar="pod5") for k in range(6)]
    files.append(write(tmp_path / "noise.jsonl", noise))
    return files


def test_story_text(tmp_path: Path) -> None:
    code, out, err = run([str(p) for p in story(tmp_path)])
    assert code == 0, err
    assert err == ""
    first = out.splitlines()[0]
    assert first.startswith("47 drops in 23 h; 38 at idle 350 s +/- 2 s: a load balancer or NAT")
    assert first.endswith(
        "; 3 at 02:14:07 across 3 sidecars (3 clients): server restart (postmaster start time changed)."
    )
    assert "path_idle_timeout" in out and "server_restart" in out
    assert "38 at idle 350 s +/- 2 s (path_idle_timeout, 38 of 44)" in out
    assert "AWS NLB / NAT Gateway / Gateway LB (350 s)" in out
    assert "set upstream.keepalive.idle below it (now off)" in out
    assert "  3 at 02:14:07 on db:5432 across 3 sidecars" in out
    assert "server restart (postmaster start time changed)" in out
    assert "Timeline (per hour, UTC)" in out
    assert "Hints" in out


def test_story_json_schema(tmp_path: Path) -> None:
    code, out, _ = run([*map(str, story(tmp_path)), "--json"])
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {
        "count",
        "first",
        "last",
        "span_s",
        "sidecars",
        "by_cause",
        "timeline",
        "idle_clusters",
        "events",
        "hints",
        "impact",
        "secondary",
        "malformed",
    }
    assert data["count"] == 47 and data["sidecars"] == 6 and data["malformed"] == 0
    assert data["by_cause"][0] == {
        "cause": "path_idle_timeout",
        "phrase": DropCause.PATH_IDLE_TIMEOUT.phrase,
        "count": 44,
    }
    [cluster] = data["idle_clusters"]
    assert cluster["count"] == 38 and abs(cluster["idle_s"] - 350) <= 2
    assert cluster["middlebox"].startswith("AWS NLB")
    [event] = data["events"]
    assert event["drops"] == 3 and event["cause"] == "server_restart"
    assert event["evidence"] == ["sqlstate=57P01", "postmaster_start_changed"]
    assert data["timeline"]["bucket"] == "hour"
    assert sum(row["count"] for row in data["timeline"]["rows"]) == 47
    assert {h["cause"]: h["count"] for h in data["hints"]} == {
        "path_idle_timeout": 44,
        "server_restart": 3,
    }


def test_six_sidecars_in_the_same_second(tmp_path: Path) -> None:
    t = DAY0 + 3600.4
    recs = [
        rec(
            t + k * 0.15,
            cause=DropCause.SERVER_CRASH,
            sidecar=f"pod{k}",
            idle=5.0 * k,
            evidence=("kind=eof", "in_recovery_seen"),
        )
        for k in range(6)
    ]
    recs.append(rec(t + 30, cause=DropCause.ADMIN_TERMINATE, sidecar="pod1"))  # unrelated
    path = write(tmp_path / "all.jsonl", recs)
    code, out, _ = run([str(path)])
    assert code == 0
    assert "6 at 01:00:00 on db:5432 across all 6 sidecars: server crash (crash recovery)" in out
    assert "server was in crash recovery" in out
    _, js, _ = run([str(path), "--json"])
    [event] = json.loads(js)["events"]
    assert event["sidecars"] == 6 and event["all_sidecars"] is True
    assert event["cause"] == "server_crash"


def test_switchover_event_names_what_told_it(tmp_path: Path) -> None:
    """A switchover hits every session of every sidecar at once; the event line says what the
    new connections found (a standby, the postmaster changed), and the hint is the record's."""
    t = DAY0 + 7200.2
    evidence = ("kind=fatal", "sqlstate=57P01", "postmaster_start_changed", "in_recovery_now")
    recs = [rec(t + k * 0.1, cause=DropCause.SWITCHOVER, sidecar=f"pod{k}", evidence=evidence) for k in range(3)]
    recs.append(
        rec(
            t + 30,
            cause=DropCause.ADMIN_TERMINATE,
            sidecar="pod0",  # unrelated
            evidence=("kind=fatal", "sqlstate=57P01", "reconnect_abandoned"),
        )
    )
    path = write(tmp_path / "all.jsonl", recs)
    code, out, _ = run([str(path)])
    assert code == 0
    assert (
        "across all 3 sidecars: switchover to another server (postmaster start time changed, a standby now)"
    ) in out, out
    assert re.search(r"^\s+3\s+switchover\s+switchover to another server$", out, re.MULTILINE), out
    assert "switchover: the server was shut down and another server took over" in out, out
    _, js, _ = run([str(path), "--json"])
    summary = json.loads(js)
    assert {c["cause"]: c["count"] for c in summary["by_cause"]} == {"switchover": 3, "admin_terminate": 1}
    [event] = summary["events"]
    assert event["cause"] == "switchover" and event["drops"] == 3
    assert event["evidence"] == ["sqlstate=57P01", "postmaster_start_changed", "in_recovery_now"]


def test_same_second_different_upstreams_not_correlated(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 0.1, sidecar=f"p{k}", host=f"db{k}") for k in range(4)]
    _, js, _ = run([str(write(tmp_path / "a.jsonl", recs)), "--json"])
    assert json.loads(js)["events"] == []


def test_three_clients_of_one_sidecar_correlate(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 0.1, client=f"10.0.0.{k}:1") for k in range(3)]
    _, js, _ = run([str(write(tmp_path / "a.jsonl", recs)), "--json"])
    [event] = json.loads(js)["events"]
    assert event["clients"] == 3 and event["sidecars"] == 1


def test_drops_further_apart_than_a_second_are_not_one_event(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 1.5, sidecar=f"p{k}") for k in range(4)]
    _, js, _ = run([str(write(tmp_path / "a.jsonl", recs)), "--json"])
    assert json.loads(js)["events"] == []


def test_hints_grouped_per_cause_even_when_templated(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k, idle=300.0 + k) for k in range(5)]
    recs = [DropRecord(**{**{f: getattr(r, f) for f in r.__slots__}, "hint": f"after {r.idle_s} s"}) for r in recs]
    recs.append(rec(DAY0 + 9, cause=DropCause.NETWORK_RESET))
    _, js, _ = run([str(write(tmp_path / "a.jsonl", recs)), "--json"])
    assert json.loads(js)["hints"] == [
        {"cause": "path_idle_timeout", "count": 5, "hint": DropCause.PATH_IDLE_TIMEOUT.hint},
        {"cause": "network_reset", "count": 1, "hint": DropCause.NETWORK_RESET.hint},
    ]


def test_empty_input_says_no_drops(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run([str(empty)]) == (0, "no drops\n", "")
    assert run(["-"], stdin="") == (0, "no drops\n", "")
    code, out, _ = run([str(empty), "--json"])
    assert code == 0 and json.loads(out) == {"count": 0, "malformed": 0}


def test_malformed_lines_named_and_rest_counted(tmp_path: Path) -> None:
    good = [rec(DAY0 + k) for k in range(3)]
    path = tmp_path / "m.jsonl"
    lines = [good[0].to_json(), "garbage", good[1].to_json(), "", '{"time": 1}', good[2].to_json()]
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run([str(path)])
    assert code == 0
    assert out.startswith("3 drops")
    err_lines = err.splitlines()
    assert err_lines[0].startswith(f"{path}:2: not a drop record: invalid JSON")
    assert err_lines[1].startswith(f"{path}:5: not a drop record: missing required key(s): ")
    assert len(err_lines) == 2


def test_path_with_nothing_readable_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\nstill not\n")
    good = write(tmp_path / "good.jsonl", [rec(DAY0)])
    code, out, err = run([str(good), str(bad)])
    assert code == 1
    assert out.startswith("1 drop ")
    assert f"{bad}: no drop records could be read (2 malformed lines)" in err


def test_missing_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    code, out, err = run([str(missing)])
    assert code == 2 and out == ""
    assert f"{missing}: no such file" in err


def test_stdin_and_files_together(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [rec(DAY0, sidecar="a")])
    code, out, _ = run([str(f), "-", "--json"], stdin=rec(DAY0 + 1, sidecar="b").to_json() + "\n")
    assert code == 0 and json.loads(out)["sidecars"] == 2


def test_since_until(tmp_path: Path) -> None:
    recs = [rec(DAY0 + h * 3600.0) for h in range(10)]  # 00:00 .. 09:00
    path = str(write(tmp_path / "a.jsonl", recs))

    def count(*args: str, now: float | None = None) -> int:
        code, out, err = run([path, "--json", *args], now=now)
        assert code == 0, err
        return int(json.loads(out)["count"])

    assert count("--since", "2h") == 3  # relative to the newest record: 07, 08, 09
    assert count("--since", "2h", now=DAY0 + 10 * 3600) == 2  # 08, 09
    assert count("--since", "1h30m", now=DAY0 + 9 * 3600) == 2
    assert count("--since", "2025-11-26T03:00:00Z", "--until", "2025-11-26T05:00:00Z") == 3
    assert count("--until", "2025-11-26 01:00:00") == 2  # naive is UTC
    assert count("--until", "8h", now=DAY0 + 10 * 3600) == 3


def test_bad_since_exits_2(tmp_path: Path) -> None:
    path = str(write(tmp_path / "a.jsonl", [rec(DAY0)]))
    code, _, err = run([path, "--since", "last tuesday"])
    assert code == 2 and "not a duration or an ISO-8601 time" in err


def test_gz_input(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 60.0, idle=240.0 + k % 3) for k in range(5)]
    path = tmp_path / "old.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(r.to_json() for r in recs) + "\n")
    code, out, err = run([str(path)])
    assert code == 0, err
    assert out.startswith("5 drops in 4 min")
    assert "Azure Load Balancer (240 s default)" in out
    assert "Timeline (per minute, UTC)" in out


def test_unknown_cluster_value_is_described_generically(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 100.0, idle=900.0 + k) for k in range(4)]
    _, out, _ = run([str(write(tmp_path / "a.jsonl", recs))])
    assert "a device with a ~902 s idle timeout" in out


def test_cluster_at_keepalive_idle_blames_a_shorter_device(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 100.0, idle=615.0 + k, keepalive=600.0) for k in range(4)]
    _, out, _ = run([str(write(tmp_path / "a.jsonl", recs))])
    assert "dropped when keepalive probes started (upstream.keepalive.idle = 600 s)" in out


def test_server_timeout_cluster_names_the_setting(tmp_path: Path) -> None:
    recs = [rec(DAY0 + k * 100.0, idle=300.2, cause=DropCause.IDLE_SESSION_TIMEOUT) for k in range(3)]
    _, out, _ = run([str(write(tmp_path / "a.jsonl", recs))])
    assert "the server's idle_session_timeout is about 300 s" in out


def test_day_timeline_for_long_spans(tmp_path: Path) -> None:
    recs = [rec(DAY0 + d * 86400.0) for d in range(5)]
    _, js, _ = run([str(write(tmp_path / "a.jsonl", recs)), "--json"])
    assert json.loads(js)["timeline"]["bucket"] == "day"


def test_find_clusters_rules() -> None:
    assert find_clusters([350, 351, 349], 11) == []  # 3 of 11 < 30 %
    assert find_clusters([350, 351, 349], 10) == [[349, 350, 351]]  # 30 % is enough
    assert find_clusters([10, 100, 1000], 3) == []
    two = find_clusters([100.0] * 4 + [500.0] * 3, 7)
    assert [len(c) for c in two] == [4, 3]
    assert find_clusters([1000, 1019, 981], 3) == [[981, 1000, 1019]]  # +/- 2 %


def test_middlebox_names_and_durations() -> None:
    assert middlebox_for(350.0) and "AWS" in str(middlebox_for(352.0))
    assert "Azure" in str(middlebox_for(240.0))
    assert "GCP" in str(middlebox_for(1200.0))
    assert "Linux" in str(middlebox_for(7800.0))
    assert middlebox_for(500.0) is None
    assert parse_duration("24h") == 86400 and parse_duration("90m") == 5400
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    assert parse_duration("2025-11-26") is None and parse_duration("") is None


@pytest.mark.parametrize("flag", ["--help"])
def test_help_exits_0(flag: str) -> None:
    code, _, _ = run([flag])
    assert code == 0


def test_failovers_are_counted_with_the_wait_and_where_the_writer_went(tmp_path: Path) -> None:
    """Issue 12: how many failovers, how long the app waited, which host served before and after."""
    from dataclasses import replace

    from pgsidecar.drops.record import ServerSnapshot

    t = DAY0 + 3600.0
    old, new = UpstreamInfo("db.cluster", "10.0.0.1", 5432, 7), UpstreamInfo("db.cluster", "10.0.0.2", 5432, 9)
    primary, standby = ServerSnapshot(1.0, False, False, "1", 1), ServerSnapshot(2.0, True, True, "1", 1)
    moved = [
        replace(
            rec(t + k, cause=DropCause.FAILOVER, sidecar=f"pod{k}"),
            upstream=old,
            upstream_after=new,
            server_before=primary,
            server_after=replace(primary, timeline=2),
            reconnect=ReconnectOutcome(9, 20.0 + k, True),
        )
        for k in range(3)
    ]
    demoted = replace(moved[0], cause=DropCause.SWITCHOVER, upstream_after=old, server_after=standby, time=t + 9)
    path = write(tmp_path / "f.jsonl", [*moved, demoted, rec(t + 50)])
    _, out, _ = run([str(path)])
    assert "Failovers (3 failover, 1 switchover; 4 transparent; the app waited 21.0 s median, 22.0 s at most)" in out
    assert re.search(
        r"^\s+3\s+db\.cluster \(10\.0\.0\.1\) primary\s+->\s+db\.cluster \(10\.0\.0\.2\) primary$", out, re.M
    )
    assert re.search(
        r"^\s+1\s+db\.cluster \(10\.0\.0\.1\) primary\s+->\s+db\.cluster \(10\.0\.0\.1\) standby$", out, re.M
    )
    _, js, _ = run([str(path), "--json"])
    summary = json.loads(js)["failovers"]
    assert summary["count"] == 4 and summary["wait_s"] == {"median": 21.0, "max": 22.0, "reconnected": 4}
    again = DropRecord.from_json(moved[0].to_json())
    assert again.upstream_after == new  # the new connection is kept in the line and read back
