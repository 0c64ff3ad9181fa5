"""bench/report.py with fake numbers: medians, ratios, the table layout, verdicts and the JSON.

No process is started, no socket opened and nothing is timed: the benchmark's arithmetic is
checked here so a real run is only needed for the numbers themselves. Also the two pure helpers
of the runners: the floor's AuthenticationSASL edit and the reading of pgbench --log files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench.floor import without_plus
from bench.report import (
    Check,
    MemoryResult,
    ProcessSnapshot,
    Sample,
    ScaleResult,
    Summary,
    Verdict,
    format_memory,
    format_reconnect,
    format_scale,
    format_table,
    format_verdict,
    median,
    percentiles,
    ratio,
    summarize,
    to_json,
    verdicts,
)
from bench.workloads import transaction_latencies_us


def _fake() -> dict[str, list[Sample]]:
    return {
        "direct": [Sample(1000.0, 1.0), Sample(1200.0, 0.8), Sample(1100.0, 0.9)],
        "pgbouncer": [Sample(800.0, 1.25, 20.0), Sample(900.0, 1.1, 22.0), Sample(1000.0, 1.0, 30.0)],
        "pgsidecar": [Sample(990.0, 1.01, 40.0), Sample(880.0, 1.2, 50.0), Sample(1210.0, 0.85, 45.0)],
    }


def test_median_and_ratio_handle_missing_data() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert median([]) is None
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, 4.0) == 0.25


def test_summarize_takes_medians_per_path_and_both_ratios() -> None:
    summary = summarize("select-only -c16 simple", "tps", _fake())
    assert summary.median == {"direct": 1100.0, "pgbouncer": 900.0, "pgsidecar": 990.0}
    assert summary.latency_ms == {"direct": 0.9, "pgbouncer": 1.1, "pgsidecar": 1.01}
    assert summary.cpu_us == {"direct": None, "pgbouncer": 22.0, "pgsidecar": 45.0}
    assert summary.ratios["pgsidecar/direct"] == pytest.approx(0.9)
    assert summary.ratios["pgsidecar/pgbouncer"] == pytest.approx(1.1)


def test_a_path_that_failed_every_round_gives_no_ratio() -> None:
    samples = _fake()
    samples["pgbouncer"] = []
    summary = summarize("tpc-b -c8", "tps", samples)
    assert summary.median["pgbouncer"] is None
    assert summary.ratios["pgsidecar/pgbouncer"] is None
    assert "pgsidecar/pgbouncer = -" in format_table(summary)


def test_table_has_a_row_per_path_and_the_ratios() -> None:
    text = format_table(summarize("bulk SELECT 3M rows", "MB/s", _fake()))
    lines = text.splitlines()
    assert lines[0] == "== bulk SELECT 3M rows (MB/s, median of 3)"
    assert " ".join(lines[1].split()) == "path MB/s latency ms cpu us user sys p50 us p99 us rounds"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["direct"][1:3] == ["1,100.0", "0.900"]
    assert rows["pgsidecar"][1:4] == ["990.0", "1.010", "45.0"]
    assert rows["direct"][3] == "-"  # no proxy CPU on the direct path
    assert rows["pgsidecar"][4:8] == ["-", "-", "-", "-"]  # no split, no per-transaction latencies
    assert rows["pgbouncer"][-3:] == ["800.0", "900.0", "1,000.0"]  # every round, in order
    assert lines[5] == "MB/s: pgsidecar/direct = 0.90   pgsidecar/pgbouncer = 1.10"
    assert lines[6] == "cpu/txn: pgsidecar/pgbouncer = 2.05"
    assert len(lines) == 7  # no p50, so no added-latency line


def _c1() -> dict[str, list[Sample]]:
    """select-only -c1 simple, two rounds, every path (the unix ones too)."""

    def two(tps: float, cpu: tuple[float, float] | None, p50: float, p99: float) -> list[Sample]:
        user, system = cpu if cpu else (None, None)
        total = user + system if user is not None and system is not None else None
        return [Sample(tps, 1000 / tps, total, user, system, p50, p99)] * 2

    return {
        "direct": two(8000.0, None, 110.0, 200.0),
        "floor": two(6000.0, (5.0, 10.0), 150.0, 260.0),
        "pgbouncer": two(5000.0, (4.0, 12.0), 180.0, 300.0),
        "pgsidecar": two(4000.0, (20.0, 12.0), 230.0, 400.0),
        "floor-unix": two(7000.0, (4.0, 8.0), 130.0, 220.0),
        "pgsidecar-unix": two(5500.0, (18.0, 9.0), 170.0, 300.0),
    }


def test_table_shows_the_floor_the_cpu_split_latency_percentiles_and_the_unix_rows() -> None:
    summary = summarize("select-only -c1 simple", "tps", _c1())
    assert list(summary.median) == ["direct", "floor", "pgbouncer", "pgsidecar", "floor-unix", "pgsidecar-unix"]
    assert summary.user_us["pgsidecar"] == 20.0 and summary.sys_us["pgsidecar"] == 12.0
    assert summary.ratios["pgsidecar/floor"] == pytest.approx(4000 / 6000)
    assert summary.cpu_ratios["pgsidecar/floor"] == pytest.approx(32 / 15)
    assert summary.added_us == {
        "floor": 40.0,
        "pgbouncer": 70.0,
        "pgsidecar": 120.0,
        "floor-unix": 20.0,
        "pgsidecar-unix": 60.0,
    }
    lines = format_table(summary).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:8]}
    assert rows["pgsidecar"][1:8] == ["4,000.0", "0.250", "32.0", "20.0", "12.0", "230", "400"]
    assert rows["direct"][3:8] == ["-", "-", "-", "110", "200"]
    assert rows["pgsidecar-unix"][1] == "5,500.0"
    assert lines[8] == (
        "tps: pgsidecar/direct = 0.50   pgsidecar/floor = 0.67   pgsidecar/pgbouncer = 0.80   "
        "pgsidecar-unix/pgbouncer = 1.10   pgsidecar-unix/floor-unix = 0.79"
    )
    assert lines[9] == "cpu/txn: pgsidecar/floor = 2.13   pgsidecar/pgbouncer = 2.00   pgsidecar-unix/floor-unix = 2.25"
    assert lines[10] == (
        "added per round trip over direct TLS (p50 us): floor +40, pgbouncer +70, pgsidecar +120, "
        "floor-unix +20, pgsidecar-unix +60"
    )


def _summaries(**scale: float) -> list[Summary]:
    """The four targeted workloads; `scale` multiplies pgsidecar's figures per workload key."""
    c16 = {
        "direct": [Sample(20000.0)],
        "floor": [Sample(18000.0, None, 15.0, 7.0, 8.0)],
        "pgbouncer": [Sample(17000.0, None, 22.0, 8.0, 14.0)],
        "pgsidecar": [Sample(17000.0 * scale.get("c16_tps", 1.0), None, 22.0 * scale.get("c16_cpu", 1.0), 10.0, 12.0)],
        "pgsidecar-unix": [Sample(17000.0 * scale.get("unix", 1.0))],
    }
    connect = {
        "direct": [Sample(70.0)],
        "pgbouncer": [Sample(100.0, None, 4000.0)],
        "pgsidecar": [Sample(100.0 * scale.get("connect", 1.0), None, 3800.0)],
    }
    return [
        summarize("select-only -c1 simple", "tps", _c1()),
        summarize("select-only -c16 prepared", "tps", c16),
        summarize("connect per txn -C -S -c4", "tps", connect),
    ]


def test_verdicts_name_each_target_with_its_figures() -> None:
    lines = [format_verdict(v) for v in verdicts(_summaries(c16_tps=0.5, c16_cpu=2.0, unix=1.2, connect=1.0))]
    assert lines == [
        "verdict select-only -c16 prepared: NOT MET: tps 0.50 x PgBouncer (target >= 0.95) no; "
        "cpu/txn 2.00 x PgBouncer (target <= 1.10) no",
        "verdict select-only -c1 simple: NOT MET: user cpu/txn 20.0 us, floor 5.0 + 1.5 = 6.5 (target <=) no; "
        "p50 230.0 us, PgBouncer 180.0 + 10 = 190.0 (target <=) no",
        "verdict select-only -c1 simple, unix socket: MET: unix-socket tps 1.10 x PgBouncer over TCP (target >= 1.05) ok",
        "verdict select-only -c16 prepared, unix socket: MET: unix-socket tps 1.20 x PgBouncer over TCP "
        "(target >= 1.05) ok",
        "verdict connect per txn -C -S -c4: MET: connects/s 1.00 x PgBouncer (target >= 1.00) ok",
    ]


def test_a_verdict_is_met_only_when_every_check_is() -> None:
    by_name = {v.workload: v for v in verdicts(_summaries(c16_tps=0.96, c16_cpu=1.1, connect=0.99))}
    assert by_name["select-only -c16 prepared"].met is True  # both limits are inclusive
    assert by_name["connect per txn -C -S -c4"].met is False
    assert by_name["select-only -c16 prepared, unix socket"].met is False  # 1.0 x < 1.05 x
    half = Verdict("w", (Check("a", 1.0, 2.0, True), Check("b", 1.0, 2.0, False)))
    assert half.met is False


def test_a_target_without_its_figures_is_not_measured() -> None:
    samples = _c1()
    del samples["floor"]
    (c1,) = verdicts([summarize("select-only -c1 simple", "tps", samples)])[:1]
    assert c1.met is None
    line = format_verdict(c1)
    assert line.startswith("verdict select-only -c1 simple: NOT MEASURED: user cpu/txn 20.0 us, floor - + 1.5 = -")
    assert " ?; p50 230.0 us" in line
    assert verdicts([summarize("tpc-b -c8", "tps", _fake())]) == []  # no target for it
    assert Verdict("w", ()).met is None


def test_the_floor_strikes_plus_from_authentication_sasl_only() -> None:
    def sasl(*names: bytes) -> bytes:
        body = struct.pack("!I", 10) + b"".join(n + b"\0" for n in names) + b"\0"
        return b"R" + struct.pack("!I", len(body) + 4) + body

    assert without_plus(sasl(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256")) == sasl(b"SCRAM-SHA-256")
    assert without_plus(sasl(b"SCRAM-SHA-256")) == sasl(b"SCRAM-SHA-256")
    md5 = b"R" + struct.pack("!II", 12, 5) + b"salt"
    error = b"E" + struct.pack("!I", 9) + b"SFATAL\0"
    assert without_plus(md5) == md5 and without_plus(error) == error


def test_pgbench_log_files_give_per_transaction_latencies(tmp_path: Path) -> None:
    prefix = str(tmp_path / "txn")
    Path(prefix + ".123").write_text("0 0 150 0 1700000000 1\n0 1 250 0 1700000000 2\n")
    Path(prefix + ".123.1").write_text("1 0 350 0 1700000000 3\n")
    Path(str(tmp_path / "other.123")).write_text("0 0 999 0 1700000000 1\n")
    assert sorted(transaction_latencies_us(prefix)) == [150.0, 250.0, 350.0]
    assert percentiles(transaction_latencies_us(prefix), (50, 99)) == {"p50": 250.0, "p99": 350.0, "max": 350.0}


def test_memory_table_reports_growth_per_idle_client() -> None:
    results = [
        MemoryResult("pgbouncer", {0: 8000, 100: 12000, 1000: 48000}),
        MemoryResult("pgsidecar", {0: 40000, 100: 45000, 1000: 90000}),
    ]
    assert results[0].per_client_kib(1000) == 40.0
    assert results[1].per_client_kib(100) == 50.0
    assert results[1].per_client_kib(0) is None
    text = format_memory(results, (0, 100, 1000))
    sidecar_row = next(line for line in text.splitlines() if line.startswith("pgsidecar "))
    assert sidecar_row.split() == ["pgsidecar", "40,000", "45,000", "90,000", "50.0", "50.0"]
    assert text.splitlines()[-1].endswith("at 1000) = 1.25")


def test_reconnect_line_and_json_document() -> None:
    assert "median 0.200 s" in format_reconnect([0.1, 0.2, 0.9])
    assert "median - s" in format_reconnect([])
    summary = summarize("tpc-b -c8", "tps", _fake())
    memory = [MemoryResult("pgsidecar", {0: 100, 1000: 50100})]
    doc = json.loads(to_json({"rounds": 3}, [summary], memory, [0.1, 0.3]))
    assert doc["meta"] == {"rounds": 3}
    workload = doc["workloads"][0]
    assert workload["name"] == "tpc-b -c8" and workload["unit"] == "tps"
    assert workload["median"]["pgsidecar"] == 990.0
    assert workload["samples"]["direct"][0] == {
        "value": 1000.0,
        "latency_ms": 1.0,
        "cpu_us": None,
        "user_us": None,
        "sys_us": None,
        "p50_us": None,
        "p99_us": None,
    }
    assert doc["memory"][0]["per_client_kib"] == {"1000": 50.0}
    assert doc["reconnect_s"] == {"rounds": [0.1, 0.3], "median": 0.2}


def _scale(**changes: object) -> ScaleResult:
    fields: dict = dict(
        clients=1000,
        seconds=30.0,
        connect_s=5.5,
        connected=1000,
        connect_errors=0,
        query_errors=0,
        error_samples=[],
        queries=180_000,
        latency_ms={"p50": 160.0, "p95": 230.5, "p99": 249.0, "max": 368.0},
        before=ProcessSnapshot(14, 46_000, 5),
        during=ProcessSnapshot(2014, 95_000, 5),
        after=ProcessSnapshot(14, 100_000, 5),
        settle_s=5.0,
        fds_back_s=1.25,
        backends={"before": 1, "during": 1001, "after": 1},
        sidecar_cpu_s=18.0,
        client_cpu_s=5.0,
        nofile=20000,
    )
    fields.update(changes)
    return ScaleResult(**fields)


def test_percentiles_use_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_scale_table_shows_rate_latency_and_the_sidecar_before_during_after() -> None:
    result = _scale()
    assert result.qps == 6000.0 and result.errors == 0
    lines = format_scale(result).splitlines()
    assert lines[0].startswith("== scale: 1000 clients x 30.0 s through one pgsidecar")
    assert lines[1] == (
        "queries 180,000   queries/s 6,000.0   errors 0 (connect 0, query 0)   connected 1000/1000 in 5.5 s"
    )
    assert lines[2].split() == ["latency", "ms", "p50", "160.000", "p95", "230.500", "p99", "249.000", "max", "368.000"]
    rows = {line[:18].strip(): line[18:].split() for line in lines[4:8]}
    assert rows["sidecar open fds"] == ["14", "2,014", "14"]
    assert rows["sidecar RSS KiB"] == ["46,000", "95,000", "100,000"]
    assert rows["server backends"] == ["1", "1,001", "1"]
    assert lines[8] == "fds back to baseline: yes, 1.2 s after the last client closed"
    assert lines[9].startswith("sidecar cpu 18.0 s (100.0 us/query)")


def test_scale_table_names_a_descriptor_leak_and_the_errors() -> None:
    result = _scale(
        after=ProcessSnapshot(20, 100_000, 5),
        fds_back_s=None,
        query_errors=2,
        error_samples=["client 3: connection closed by the sidecar"],
    )
    text = format_scale(result)
    assert "errors 2 (connect 0, query 2)" in text
    assert "fds back to baseline: NO: 6 more than before, 5 s later" in text
    assert text.splitlines()[-1] == "  ! client 3: connection closed by the sidecar"


def test_scale_goes_into_the_json_document_only_when_run() -> None:
    assert "scale" not in json.loads(to_json({}, [], [], []))
    assert "verdicts" not in json.loads(to_json({}, [], [], []))
    doc = json.loads(to_json({}, [], [], [], _scale()))
    assert doc["scale"]["qps"] == 6000.0 and doc["scale"]["errors"] == 0
    assert doc["scale"]["before"] == {"fds": 14, "rss_kib": 46_000, "threads": 5}
    assert doc["scale"]["latency_ms"]["p99"] == 249.0


def test_verdicts_go_into_the_json_document() -> None:
    judged = verdicts(_summaries(connect=1.5))
    doc = json.loads(to_json({}, _summaries(connect=1.5), [], [], judged=judged))
    connect = next(v for v in doc["verdicts"] if v["workload"] == "connect per txn -C -S -c4")
    assert connect["met"] is True
    assert connect["checks"][0]["value"] == pytest.approx(1.5) and connect["checks"][0]["limit"] == 1.0
    c1 = next(v for v in doc["verdicts"] if v["workload"] == "select-only -c1 simple")
    assert [c["limit"] for c in c1["checks"]] == [6.5, 190.0]
