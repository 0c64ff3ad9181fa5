"""bench/report.py with fake numbers: medians, ratios, the table layout and the JSON document.

No process is started and nothing is timed: the benchmark's arithmetic is checked here so a real
run is only needed for the numbers themselves.
"""

from __future__ import annotations

import json

import pytest

from bench.report import (
    MemoryResult,
    Sample,
    format_memory,
    format_reconnect,
    format_table,
    median,
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
    results = [MemoryResult("pgbouncer", {0: 8000, 100: 12000, 1000: 48000}),
               MemoryResult("pgsidecar", {0: 40000, 100: 45000, 1000: 90000})]
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
