"""DropLogWriter: whole lines from concurrent processes, size rotation, reopen, stderr."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pgsidecar.drops.classify import Evidence, Observed, ReconnectOutcome, classify
from pgsidecar.drops.record import ClientInfo, DropRecord, UpstreamInfo
from pgsidecar.observe.droplog import DropLogWriter


def record(n: int, sidecar: str = "s") -> DropRecord:
    ev = Evidence(
        Observed("reset", errno_name="ECONNRESET", message="x" * (n % 50)),
        "idle",
        float(n),
        100.0 + n,
        10.0,
        24.5,
        ReconnectOutcome(1, 0.01, True),
    )
    return DropRecord.from_evidence(
        time=1_700_000_000.0 + n,
        sidecar=sidecar,
        client=ClientInfo(f"127.0.0.1:{1000 + n}"),
        upstream=UpstreamInfo("db", "127.0.0.1", 5432, n),
        connected_at=1_699_990_000.0,
        client_idle_s=1.0,
        evidence=ev,
        impact="transparent",
        classification=classify(ev),
    )


def _lines(paths: list[Path]) -> list[DropRecord]:
    out = []
    for p in paths:
        for line in p.read_text().splitlines():
            out.append(DropRecord.from_json(line))  # raises on a torn line
    return out


def _append(path: str, sidecar: str, count: int, max_bytes: int, backups: int) -> None:
    writer = DropLogWriter(path, max_bytes, backups)
    for i in range(count):
        writer.write(record(i, sidecar))
    assert writer.failures == 0, writer.last_error
    writer.close()


def _run_processes(path: Path, max_bytes: int, backups: int) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append, args=(str(path), f"p{k}", 500, max_bytes, backups)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0


def test_four_processes_append_2000_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "drops.jsonl"
    _run_processes(path, max_bytes=0, backups=0)
    recs = _lines([path])
    assert len(recs) == 2000
    for k in range(4):
        assert sorted(r.upstream.backend_pid for r in recs if r.sidecar == f"p{k}") == list(range(500))


def test_four_processes_with_rotation_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "drops.jsonl"
    _run_processes(path, max_bytes=64 * 1024, backups=200)
    files = [path, *sorted(tmp_path.glob("drops.jsonl.*"))]
    assert len(files) > 3  # rotation happened
    recs = _lines(files)
    assert len(recs) == 2000
    assert len({(r.sidecar, r.upstream.backend_pid) for r in recs}) == 2000


def test_rotation_keeps_backups_and_size(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    line_len = len(record(0).to_json()) + 1
    writer = DropLogWriter(str(path), max_bytes=line_len * 10 + 5, backups=2)
    for i in range(35):
        writer.write(record(i))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= line_len * 10 + 5 + 50  # messages vary a little in length
    newest = _lines([path])
    assert newest[-1].upstream.backend_pid == 34
    older = _lines([tmp_path / "d.jsonl.1"])
    assert older[-1].upstream.backend_pid == newest[0].upstream.backend_pid - 1


def test_writer_follows_a_rotation_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    a = DropLogWriter(str(path), 0, 1)
    b = DropLogWriter(str(path), 0, 1)
    a.write(record(1))
    os.replace(path, tmp_path / "d.jsonl.1")  # someone else rotated
    b.write(record(2))
    a.write(record(3))
    assert [r.upstream.backend_pid for r in _lines([path])] == [2, 3]
    assert [r.upstream.backend_pid for r in _lines([tmp_path / "d.jsonl.1"])] == [1]
    a.close()
    b.close()


def test_reopen_after_logrotate_move(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    w = DropLogWriter(str(path), 0, 0)
    w.write(record(1))
    os.rename(path, tmp_path / "moved")
    w.reopen()
    w.write(record(2))
    assert [r.upstream.backend_pid for r in _lines([path])] == [2]
    w.close()


def test_dash_writes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    w = DropLogWriter("-", 0, 0)
    w.write(record(7))
    err = capfd.readouterr().err
    assert json.loads(err)["upstream"]["backend_pid"] == 7


def test_none_path_is_disabled(tmp_path: Path) -> None:
    w = DropLogWriter(None, 0, 0)
    w.write(record(1))
    assert list(tmp_path.iterdir()) == []


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    w = DropLogWriter(str(path), 0, 0)
    os.close(w._fd)  # type: ignore[arg-type]  # simulate a broken descriptor
    w._fd = os.open(os.devnull, os.O_RDONLY)
    os.unlink(path)
    os.mkdir(path)  # the path can no longer be opened as a file
    w.write(record(1))
    assert w.failures == 1 and w.last_error and str(path) in w.last_error
