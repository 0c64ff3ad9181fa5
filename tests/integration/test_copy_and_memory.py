"""Bulk data through the sidecar: COPY of 100 MB both ways with checksums, a 200 MB result under
a memory bound, and a client that leaves in the middle of a large result.

docs/architecture.md ("The hot path"): backpressure both ways, memory per session bounded by configuration and not
by the size of a result.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.fixtures.sidecar import upstream_dsn_for
from tests.integration.test_cancel import RawClient

pytestmark = pytest.mark.server

MIB = 1 << 20
COPY_ROWS = 1_000_000  # x 105 bytes a line = 105 MB
_BLOCK = hashlib.sha512(b"pgsidecar").hexdigest() * 8  # 1024 hex characters, no COPY escapes


class GeneratedCopy:
    """A file-like source of deterministic COPY text lines (`id<TAB>text<LF>`), hashed as read.

    Every line is in COPY's canonical text form, so `COPY ... TO STDOUT` must return the very same
    bytes (docs: COPY, "Text Format")."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.next_row = 0
        self.md5 = hashlib.md5()
        self.size = 0

    def read(self, size: int = -1) -> str:
        lines = []
        stop = min(self.rows, self.next_row + 10_000)
        for i in range(self.next_row, stop):
            start = (i * 37) % 900
            lines.append(f"{i:07d}\t{_BLOCK[start : start + 96]}\n")
        self.next_row = stop
        chunk = "".join(lines)
        data = chunk.encode()
        self.md5.update(data)
        self.size += len(data)
        return chunk


class HashingSink:
    """The other end of COPY TO STDOUT: keeps only the digest and the byte count."""

    def __init__(self) -> None:
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.md5.update(raw)
        self.size += len(raw)


@pytest.fixture
def table(pg) -> Iterator[str]:
    name = f"bulk_{uuid.uuid4().hex[:10]}"
    yield name
    pg.sql(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.slow
def test_copy_100mb_in_and_out_with_checksums(pg, sidecar, table):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"]))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE UNLOGGED TABLE {table} (id text NOT NULL, t text NOT NULL)")
            source = GeneratedCopy(COPY_ROWS)
            cur.copy_expert(f"COPY {table} FROM STDIN", source, size=MIB)
            assert cur.rowcount == COPY_ROWS
            assert source.size > 100 * 1000 * 1000
            # A seq scan of a table nobody else touches returns rows in insertion order, unless
            # it joins another scan midway (docs: synchronize_seqscans).
            cur.execute("SET synchronize_seqscans = off")
            sink = HashingSink()
            cur.copy_expert(f"COPY {table} TO STDOUT", sink, size=MIB)
        assert sink.size == source.size
        assert sink.md5.hexdigest() == source.md5.hexdigest()
    finally:
        conn.close()
    # The server holds what was sent: same count and the same digest computed on its side.
    expected = hashlib.md5(f"{COPY_ROWS - 1:07d}".encode()).hexdigest()
    assert pg.sql(f"SELECT count(*), md5(max(id)) FROM {table}") == [(COPY_ROWS, expected)]


# -- memory while streaming -----------------------------------------------------------------

RESULT_ROWS = 200_000
ROW_TEXT = 1000
RSS_HEADROOM_KIB = 64 * 1024  # the bound: baseline + 64 MiB, for a 200 MB result


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.samples = 0
        self.stop = threading.Event()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, self.rss_kib())
            self.samples += 1
            self.stop.wait(0.05)


def _read_result(client: RawClient, stall_after: int, stall_s: float) -> tuple[int, int, bytes]:
    """Read one simple-query result by frame headers only: (DataRows, bytes, CommandComplete tag).

    After `stall_after` bytes the reader stops for `stall_s`, as a slow app would: the server keeps
    producing, so only backpressure keeps that data out of the sidecar's memory."""
    sock, buf = client.sock, bytearray(client.buf)
    rows = total = 0
    tag = b""
    stalled = False
    pos = 0
    while True:
        while len(buf) - pos >= 5:
            kind, length = struct.unpack_from("!cI", buf, pos)
            if len(buf) - pos < 1 + length:
                break
            if kind == be.DataRow.TYPE:
                rows += 1
            elif kind == be.CommandComplete.TYPE:
                tag = bytes(buf[pos + 5 : pos + 1 + length]).rstrip(b"\0")
            elif kind == be.ErrorResponse.TYPE:
                raise AssertionError(be.ErrorResponse.decode(bytes(buf[pos + 5 : pos + 1 + length])).as_dict())
            elif kind == be.ReadyForQuery.TYPE:
                return rows, total, tag
            pos += 1 + length
        del buf[:pos]
        pos = 0
        if not stalled and total >= stall_after:
            stalled = True
            time.sleep(stall_s)
        sock.settimeout(30)
        chunk = sock.recv(1 << 18)
        if not chunk:
            raise EOFError("sidecar closed the connection mid-result")
        total += len(chunk)
        buf += chunk


@pytest.mark.slow
def test_200mb_result_streams_within_a_memory_bound(pg, sidecar_factory):
    private = sidecar_factory(upstream_dsn_for(pg))
    warm = psycopg2.connect(private.dsn(password=pg.users["app"]))
    with warm.cursor() as cur:  # load every module and TLS context before the baseline
        cur.execute("SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        cur.fetchall()
    warm.close()
    sampler = RssSampler(private.proc.pid)
    baseline = sampler.rss_kib()
    client = RawClient.connect(private.port)
    client.login("app", pg.users["app"])
    sampler.start()
    try:
        client.send(fe.Query(f"SELECT repeat('x', {ROW_TEXT}) FROM generate_series(1, {RESULT_ROWS})").encode())
        rows, total, tag = _read_result(client, stall_after=4 * MIB, stall_s=2.0)
    finally:
        sampler.stop.set()
        sampler.join(5)
        client.close()
    assert (rows, tag) == (RESULT_ROWS, f"SELECT {RESULT_ROWS}".encode())
    assert total > RESULT_ROWS * ROW_TEXT
    assert sampler.samples > 20, "the sampler must have watched the whole transfer"
    growth = sampler.peak_kib - baseline
    assert growth < RSS_HEADROOM_KIB, (
        f"sidecar RSS grew {growth // 1024} MiB (baseline {baseline // 1024} MiB) for a 200 MB result"
    )


# -- a client that leaves in the middle of a large result ------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["reset", "fin"])
def test_client_gone_mid_result_releases_the_backend(pg, sidecar_factory, how):
    private = sidecar_factory(upstream_dsn_for(pg))
    pid = private.proc.pid
    warm = psycopg2.connect(private.dsn(password=pg.users["app"]))
    warm.cursor().execute("SELECT 1")
    warm.close()
    time.sleep(0.2)
    baseline_fds = _fd_count(pid)
    app = f"leaver-{uuid.uuid4().hex[:8]}"
    client = RawClient.connect(private.port)
    client.login("app", pg.users["app"], application_name=app)
    # About 50 GB, streamed: a set-returning function in the select list is not materialised
    # first (docs: "Set Returning Functions"), so rows flow at once and never finish in time.
    client.send(fe.Query("SELECT generate_series(1, 50000000), repeat('y', 1000)").encode())
    got = 0
    while got < 2 * MIB:
        got += len(client.sock.recv(1 << 18))
    assert len(pg.backend_pids(application_name=app)) == 1
    if how == "reset":
        client.close_abruptly()
    else:
        client.sock.shutdown(socket.SHUT_RDWR)
        client.sock.close()
    _wait_for(lambda: not pg.backend_pids(application_name=app), 5.0, "the upstream backend was not released")
    again = psycopg2.connect(private.dsn(password=pg.users["app"]))
    try:
        with again.cursor() as cur:
            cur.execute("SELECT 6 * 7")
            assert cur.fetchone() == (42,)
    finally:
        again.close()
    _wait_for(
        lambda: _fd_count(pid) <= baseline_fds,
        5.0,
        f"sidecar fds did not return to {baseline_fds} (now {_fd_count(pid)})",
    )
    assert private.alive()
    assert private.drops() == [], "a client leaving is not an upstream drop"
