"""bench/report.py with fake numbers: medians, ratios, the table layout and the JSON document.

No process is started and nothing is timed: the benchmark's arithmetic is checked here so a real
run is only needed for the numbers themselves.
"""

from __future__ import annotations

import json

import pytest

from bench.report import (
    MemoryResult,
    ProcessSnapshot,
    Sample,
    ScaleResult,
    format_memory,
    format_reconnect,
    format_scale,
    format_table,
    median,
    percentiles,
    ratio,
    summarize,
    to_json,
)


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
    assert lines[1].split()[:2] == ["path", "MB/s"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["direct"][1:3] == ["1,100.0", "0.900"]
    assert rows["pgsidecar"][1:4] == ["990.0", "1.010", "45.0"]
    assert rows["direct"][3] == "-"  # no proxy CPU on the direct path
    assert rows["pgbouncer"][-3:] == ["800.0", "900.0", "1,000.0"]  # every round, in order
    assert lines[5] == "pgsidecar/direct = 0.90   pgsidecar/pgbouncer = 1.10"


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
    assert workload["samples"]["direct"][0] == {"value": 1000.0, "latency_ms": 1.0, "cpu_us": None}
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
    doc = json.loads(to_json({}, [], [], [], _scale()))
    assert doc["scale"]["qps"] == 6000.0 and doc["scale"]["errors"] == 0
    assert doc["scale"]["before"] == {"fds": 14, "rss_kib": 46_000, "threads": 5}
    assert doc["scale"]["latency_ms"]["p99"] == 249.0
