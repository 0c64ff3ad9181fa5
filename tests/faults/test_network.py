"""Network faults on the path between the sidecar and PostgreSQL, in a namespace of the test's own.

PostgreSQL listens on the host end of a veth pair; the sidecar and the app run inside the
namespace (tests/fixtures/netns.py). The rules drop, reset or forget only the sidecar's upstream
packets on the veth, so the app's own flow to the sidecar (namespace loopback) is never touched.

Keepalives are short here (idle 1 s, interval 1 s, count 2, so TCP_USER_TIMEOUT is derived as
1 + 1 x 2 - 0.5 = 2.5 s, config/pgsidecar.yaml `upstream.keepalive.user_timeout`) so that a dead
path is noticed in seconds.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import psycopg2
import pytest

from tests.fixtures.faults import CLASSIC_KW, RunInThread, request
from tests.fixtures.netns import NetPath, upstream_dsn_via
from tests.fixtures.sidecar import SidecarProcess

pytestmark = [pytest.mark.server, pytest.mark.faults, pytest.mark.netns]

KEEPALIVE_IDLE_S = 1.0
KEEPALIVE_INTERVAL_S = 1.0
KEEPALIVE_COUNT = 2
USER_TIMEOUT_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT - 0.5
# A silent path is noticed by the first probe after user timeout: at most idle + user timeout
# after the last packet; 1 s for scheduling and the 50 ms polls.
DETECT_WINDOW_S = KEEPALIVE_IDLE_S + USER_TIMEOUT_S + 1.0
CONNECT_TIMEOUT_S = 2  # upstream_dsn_via's connect_timeout
SHORT_KEEPALIVE = {
    "PGSIDECAR_UPSTREAM_KEEPALIVE_IDLE": "1s",
    "PGSIDECAR_UPSTREAM_KEEPALIVE_INTERVAL": "1s",
    "PGSIDECAR_UPSTREAM_KEEPALIVE_COUNT": str(KEEPALIVE_COUNT),
}


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _app(path: NetPath, side: SidecarProcess, cluster: Any, name: str) -> Any:
    """The classic psycopg2 app (README's keepalive and connect_timeout settings), connected
    from inside the namespace, autocommit off."""
    dsn = side.dsn(password=cluster.users["app"], application_name=name, **{k: str(v) for k, v in CLASSIC_KW.items()})
    return path.call_inside(lambda: psycopg2.connect(dsn))


def _one(conn: Any, query: str, timeout_s: float = 30.0) -> Any:
    """One request (cursor, execute, fetch, commit) in a helper thread: a hang fails the test
    instead of stalling it, since libpq retries poll() on EINTR and no signal can stop it."""
    runner = RunInThread(lambda: request(conn, query)[0][0])
    runner.join(timeout_s)
    if runner.error is not None:
        raise runner.error
    return runner.result


def _upstream_flow(cluster: Any, backend_pid: int) -> tuple[str, int]:
    """(client address, client port) of the sidecar's upstream connection as the server sees it."""
    rows = cluster.sql("SELECT host(client_addr), client_port FROM pg_stat_activity WHERE pid = %s", (backend_pid,))
    assert rows, f"backend {backend_pid} not found"
    return rows[0][0], rows[0][1]


def _poll(check: Any, timeout_s: float, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step_s)
    return check()


def test_silent_blackhole_while_idle_is_detected_within_user_timeout(net_faults, net_pg, netns_sidecars):
    side = netns_sidecars(upstream_dsn_via(net_faults, net_pg), env=SHORT_KEEPALIVE)
    conn = _app(net_faults, side, net_pg, "net-blackhole")
    try:
        pid1 = _one(conn, "SELECT pg_backend_pid()")
        assert _upstream_flow(net_pg, pid1)[0] == net_faults.ns_addr, "the upstream must cross the veth"
        time.sleep(0.3)
        began = time.time()
        net_faults.blackhole(net_pg.port)
        # A new SYN means the sidecar noticed the dead path and started to reconnect.
        noticed = _poll(lambda: net_faults.counters().get("syn", 0) > 0, DETECT_WINDOW_S + 3)
        noticed_after = time.time() - began
        assert noticed, f"no reconnect attempt within {DETECT_WINDOW_S + 3:.1f} s of the blackhole"
        assert noticed_after <= DETECT_WINDOW_S, f"noticed after {noticed_after:.2f} s"
        # Hold the blackhole past one connect_timeout (2 s): a reconnect attempt must fail.
        time.sleep(CONNECT_TIMEOUT_S + 0.7)
        net_faults.restore()
        restored = time.time()
        drops = side.wait_drops(1, timeout=15)
        assert len(drops) == 1, side.logs()[-3000:]
        drop = drops[0]
        assert began <= _epoch(drop["time"]) <= began + DETECT_WINDOW_S, (drop["time"], began)
        assert drop["state"] == "idle" and drop["impact"] == "transparent", drop
        assert drop["observed"]["kind"] == "timeout", drop["observed"]
        # Keepalives probe after 1 s, so the flow was never silent for the 60 s that would make
        # it a middlebox's idle timeout (classify rule 14): the path itself died.
        assert drop["cause"] == "network_timeout", drop
        assert drop["user_timeout_s"] == pytest.approx(USER_TIMEOUT_S)
        assert drop["reconnect"]["succeeded"] is True
        assert drop["reconnect"]["attempts"] >= 2, drop["reconnect"]  # one timed out in the hole
        assert any("timeout" in e for e in drop["reconnect"]["errors"]), drop["reconnect"]
        assert restored <= _epoch(drop["time"]) + drop["reconnect"]["duration_s"] + 0.5
        # The app's next query simply works, on a new backend.
        pid2 = _one(conn, "SELECT pg_backend_pid()")
        assert pid2 != pid1
        assert _one(conn, "SELECT 41 + 1") == 42
        assert len(side.drops()) == 1
    finally:
        conn.close()


def test_keepalives_keep_a_forgetful_middlebox_from_dropping_the_flow(net_faults, net_pg, netns_sidecars):
    timeout_s = 4
    net_faults.middlebox(timeout_s)  # before any flow starts: conntrack must see the SYNs
    side = netns_sidecars(upstream_dsn_via(net_faults, net_pg), env=SHORT_KEEPALIVE)
    conn = _app(net_faults, side, net_pg, "net-middlebox")
    # Control: a direct connection across the same middlebox, its first keepalive after 60 s.
    # (libpq sets tcp_user_timeout only when keepalives are on.)
    direct_dsn = net_pg.dsn(
        host=net_faults.host_addr,
        sslmode="verify-ca",
        keepalives=1,
        keepalives_idle=60,
        tcp_user_timeout=3000,
        connect_timeout=5,
        application_name="net-direct",
    )
    direct = net_faults.call_inside(lambda: psycopg2.connect(direct_dsn))
    try:
        pid1 = _one(conn, "SELECT pg_backend_pid()")
        assert _one(direct, "SELECT 1") == 1
        time.sleep(timeout_s + 3)  # idle well past the middlebox's memory
        assert _one(conn, "SELECT pg_backend_pid()") == pid1, "same backend: the flow survived"
        assert _one(conn, "SELECT 41 + 1") == 42
        time.sleep(0.5)
        assert side.drops() == [], side.drops()
        assert net_faults.middlebox_drops() == 0
        # Without keepalives the middlebox forgot the flow: its next packet is INVALID, dropped.
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError):
            _one(direct, "SELECT 1")
        assert time.monotonic() - started < 15
        assert net_faults.middlebox_drops() > 0, "the control never met the middlebox"
    finally:
        conn.close()
        direct.close()


def test_injected_tcp_reset_while_idle_is_handled_like_a_drop(net_faults, net_pg, netns_sidecars):
    side = netns_sidecars(upstream_dsn_via(net_faults, net_pg), env=SHORT_KEEPALIVE)
    conn = _app(net_faults, side, net_pg, "net-reset")
    try:
        pid1 = _one(conn, "SELECT pg_backend_pid()")
        addr, local_port = _upstream_flow(net_pg, pid1)
        assert addr == net_faults.ns_addr
        began = time.time()
        # Only this flow's packets: the reconnect (a new source port) goes through.
        net_faults.inject_reset(net_pg.port, local_port)
        drops = side.wait_drops(1, timeout=KEEPALIVE_IDLE_S + 10)
        assert len(drops) == 1, side.logs()[-3000:]
        drop = drops[0]
        # The next keepalive probe met the reset, so it came within one keepalive idle.
        assert began <= _epoch(drop["time"]) <= began + KEEPALIVE_IDLE_S + 1.5, (drop["time"], began)
        assert drop["observed"]["kind"] == "reset", drop["observed"]
        assert drop["observed"]["errno_name"] == "ECONNRESET", drop["observed"]
        assert drop["cause"] == "network_reset", drop
        assert drop["state"] == "idle" and drop["impact"] == "transparent", drop
        assert drop["reconnect"]["succeeded"] is True
        assert net_faults.counters().get("reset", 0) >= 1, "the reset rule never fired"
        pid2 = _one(conn, "SELECT pg_backend_pid()")
        assert pid2 != pid1
        assert _upstream_flow(net_pg, pid2)[1] != local_port
        assert _one(conn, "SELECT 41 + 1") == 42
        assert len(side.drops()) == 1
    finally:
        conn.close()
