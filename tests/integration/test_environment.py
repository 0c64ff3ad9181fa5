"""The real `pgsidecar run` in the environment it meets in production: the names Kubernetes injects
for a Service called `pgsidecar` (ignored, with one warning line), a known variable with a bad
value (exit 2), and `listen.backlog` reaching the listening sockets and absorbing a connect burst."""

from __future__ import annotations

import errno
import itertools
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg2
import pytest

from pgsidecar.config.model import kernel_somaxconn
from pgsidecar.runtime.upstream import tcp_info
from tests.fixtures.sidecar import upstream_dsn_for
from tests.fixtures.tools import unavailable

pytestmark = pytest.mark.server

# Exactly what the kubelet injects into every pod of the namespace for a Service named
# `pgsidecar` with one port, 6432 (Kubernetes docs, Service, "Environment variables").
K8S_SERVICE_LINKS = {
    "PGSIDECAR_PORT": "tcp://10.0.0.7:6432",
    "PGSIDECAR_PORT_6432_TCP": "tcp://10.0.0.7:6432",
    "PGSIDECAR_PORT_6432_TCP_PROTO": "tcp",
    "PGSIDECAR_PORT_6432_TCP_PORT": "6432",
    "PGSIDECAR_PORT_6432_TCP_ADDR": "10.0.0.7",
    "PGSIDECAR_SERVICE_HOST": "10.0.0.7",
    "PGSIDECAR_SERVICE_PORT": "6432",
}
WRAPPER_VARIABLE = {"PGSIDECAR_SOMETHING": "1"}  # a start script's own setting
WARNING_PREFIX = "ignoring unknown environment variables (not pgsidecar settings): "
BURST = 1500
TCP_ESTABLISHED = 1  # linux/tcp_states.h


def _query(sc, pg) -> int:
    conn = psycopg2.connect(sc.dsn(password=pg.users["app"], connect_timeout=10))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 6432")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _log_lines_naming(sc, needle: str) -> list[str]:
    return [line for line in sc.logs().splitlines() if needle in line]


def _wait_log(sc, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in sc.logs():
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the sidecar log:\n{sc.logs()[-2000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------- unknown variables


def test_kubernetes_service_links_start_serve_and_warn_once(pg, sidecar_factory):
    sc = sidecar_factory(upstream_dsn_for(pg), env={**K8S_SERVICE_LINKS, **WRAPPER_VARIABLE})
    assert _query(sc, pg) == 6432
    expected = WARNING_PREFIX + ", ".join(sorted([*K8S_SERVICE_LINKS, *WRAPPER_VARIABLE]))

    def the_one_warning() -> None:
        lines = _log_lines_naming(sc, "PGSIDECAR_")
        assert len(lines) == 1, sc.logs()[-3000:]
        record = json.loads(lines[0])
        assert (record["level"], record["message"]) == ("warning", expected)

    the_one_warning()
    assert "10.0.0.7" not in sc.logs()  # names only, never the values
    # SIGHUP re-reads the same environment: no second warning.
    sc.proc.send_signal(signal.SIGHUP)
    _wait_log(sc, "SIGHUP: configuration and certificates reloaded")
    the_one_warning()
    assert _query(sc, pg) == 6432


def test_known_variable_with_bad_value_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(K8S_SERVICE_LINKS, **WRAPPER_VARIABLE, PGSIDECAR_LISTEN_PORT="abc")
    # No --listen: the flag would override the variable under test.
    out = subprocess.run(
        [sys.executable, "-m", "pgsidecar", "run", "--upstream", "host=127.0.0.1 sslmode=disable", "--metrics", "none"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr.splitlines() == ["config: listen.port: expected a port number; got 'abc'"]


# ---------------------------------------------------------------- listen.backlog


def _ss_listen_queues(*filter_args: str) -> tuple[int, int]:
    """(Recv-Q, Send-Q) of the one listening socket `ss` finds: for a listener Recv-Q is the
    accept queue now and Send-Q the backlog the kernel applied (listen() capped at somaxconn)."""
    ss = shutil.which("ss") or unavailable("tool 'ss' not found (iproute2)")
    out = subprocess.run([ss, "-Hln", *filter_args], capture_output=True, text=True, timeout=10, check=True).stdout
    rows = [line.split() for line in out.splitlines() if "LISTEN" in line.split()]
    assert len(rows) == 1, out
    at = rows[0].index("LISTEN")
    return int(rows[0][at + 1]), int(rows[0][at + 2])


def test_listen_backlog_from_environment_reaches_both_sockets(pg, sidecar_factory):
    # Below any somaxconn in use, so the kernel keeps it as given.
    backlog = min(777, kernel_somaxconn())
    sc = sidecar_factory(upstream_dsn_for(pg), unix=True, env={"PGSIDECAR_LISTEN_BACKLOG": str(backlog)})
    assert _ss_listen_queues("-t", f"sport = :{sc.port}")[1] == backlog
    unix_path = os.path.join(sc.unix_dir, f".s.PGSQL.{sc.port}")
    assert _ss_listen_queues("-x", "src", unix_path)[1] == backlog
    assert _query(sc, pg) == 6432


def _listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace: SYNs and handshake ACKs dropped because
    an accept queue was full."""
    try:
        with open("/proc/net/netstat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        unavailable("/proc/net/netstat is not readable")
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=False))["ListenOverflows"])
    unavailable("no TcpExt ListenOverflows in /proc/net/netstat")


@pytest.fixture
def burst_fds() -> Iterator[None]:
    """Room for BURST sockets here and in the sidecar (which inherits the limit at spawn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = BURST + 1024
    if hard != resource.RLIM_INFINITY and hard < need:
        unavailable(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _burst(port: int) -> tuple[int, list[socket.socket]]:
    """BURST non-blocking connects, as fast as one thread can issue them (bounded to 20 s), then
    ListenOverflows' growth once every handshake that could complete has. Loopback runs the
    handshake inside connect(), so a socket not ESTABLISHED right after had its SYN dropped."""
    socks: list[socket.socket] = []
    before = _listen_overflows()
    deadline = time.monotonic() + 20.0
    try:
        for _ in range(BURST):
            assert time.monotonic() < deadline, f"only {len(socks)} connects issued in 20 s"
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), os.strerror(code)
        # Handshake ACKs the listener drops also count; give them a moment to be counted.
        time.sleep(0.3)
        return _listen_overflows() - before, socks
    except BaseException:
        for sock in socks:
            sock.close()
        raise


def _not_established(socks: list[socket.socket]) -> int:
    return sum(1 for sock in socks if (tcp_info(sock) or {}).get("state") != TCP_ESTABLISHED)


def _all_connected(socks: list[socket.socket], timeout: float) -> bool:
    """Every socket writable (connected) with no error, within `timeout` (bounded poll)."""
    poller = select.poll()
    pending = {sock.fileno(): sock for sock in socks}
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd, None)
            poller.unregister(fd)
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                return False
    return not pending


@pytest.mark.slow
def test_burst_of_1500_connects_does_not_overflow_the_default_backlog(pg, sidecar_factory, burst_fds):
    somaxconn = kernel_somaxconn()
    if somaxconn < BURST + 100:
        unavailable(f"net.core.somaxconn is {somaxconn}: the default backlog cannot hold {BURST}")
    # max_clients above the burst, so every connect is a plain accepted client (beyond it the
    # sidecar would accept and answer FATAL 53300, which also empties the queue).
    env = {"PGSIDECAR_LISTEN_MAX_CLIENTS": str(BURST + 500)}
    quiet = ("--log-level", "info")  # last flag wins over the fixture's debug
    sc = sidecar_factory(upstream_dsn_for(pg), env=env, args=quiet)
    assert _ss_listen_queues("-t", f"sport = :{sc.port}")[1] == somaxconn
    overflows, socks = _burst(sc.port)
    try:
        dropped = _not_established(socks)
        assert (overflows, dropped) == (0, 0), (
            f"ListenOverflows grew by {overflows}; {dropped} of {BURST} connects had their SYN dropped"
        )
        assert _all_connected(socks, timeout=10.0)
    finally:
        for sock in socks:
            sock.close()
    assert _query(sc, pg) == 6432

    # The same burst against a tiny backlog: proves this measurement sees an overflow of the
    # sidecar's own socket (the counter is live here and the burst outruns accept()).
    small = sidecar_factory(upstream_dsn_for(pg), env={**env, "PGSIDECAR_LISTEN_BACKLOG": "16"}, args=quiet)
    assert _ss_listen_queues("-t", f"sport = :{small.port}")[1] == 16
    overflows, socks = _burst(small.port)
    try:
        assert overflows > 0 and _not_established(socks) > 0, overflows
    finally:
        for sock in socks:
            sock.close()
