"""Failover and switchover with real servers, the upstream a host name that moves (issue 12, item 6).

Every test runs the sidecar inside a network namespace, its upstream `writer.failover.test`
(or a libpq host list) on port 5432, resolved from the namespace's own /etc/hosts; "host a" and
"host b" are two addresses that reach two clusters (tests/fixtures/failover.py draws the path).
The app keeps ONE psycopg2 connection in autocommit and inserts a row every 50 ms; afterwards the
table on the current primary says whether any acknowledged row was lost or written twice.

The promise checked in each test: no error reaches the app between transactions (a request sent
while no fault was under way), only a request in flight when the server went may fail, no
acknowledged row is lost, none is duplicated, and the app's connection stays open. Each test
prints one `FAILOVER scenario=...` line with its figures (`pytest -s`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.failover import (
    DEFAULT_NAMES,
    HOST_NAMES,
    HOSTS,
    WRITER,
    AppResult,
    FailoverNet,
    FailoverRig,
    HostsDns,
    Window,
    WriterApp,
    in_recovery,
    report_drops,
    terminate_clients,
)
from tests.fixtures.netns import NetnsError, NetPath
from tests.fixtures.postgres import ClusterFactory, PgCluster
from tests.fixtures.tools import unavailable

pytestmark = [pytest.mark.server, pytest.mark.faults, pytest.mark.netns]

STALE_S = 10.0  # scenario c: the old writer answers at the name's address as a reader this long
DEADLINE_S = 30.0  # reconnect.deadline, the default
OUTAGE_S = 75.0  # scenario e: no writer this long
IDLE_S = 40.0  # scenario e: the app sends nothing for this part of the outage
JOIN_S = 60.0  # the app's run must end this long after its planned end (a held request waits)


@pytest.fixture(scope="module")
def failover_net(netpath: NetPath, pg_factory: ClusterFactory) -> Iterator[FailoverNet]:
    """The module's namespace with host addresses a and b, the names, and the certificate."""
    try:
        net = FailoverNet.create(netpath, pg_factory)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        unavailable(f"could not set up the failover network: {exc}")
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def dns(failover_net: FailoverNet) -> HostsDns:
    """The namespace's host names, back at DEFAULT_NAMES: `dns.point(name, address)` moves one."""
    failover_net.dns.reset(DEFAULT_NAMES)
    return failover_net.dns


@pytest.fixture
def failover_rig(failover_net: FailoverNet, dns: HostsDns, pg_factory: ClusterFactory) -> Iterator[FailoverRig]:
    """This test's clusters, sidecars and apps; all stopped and removed at its end."""
    rig = FailoverRig(failover_net, pg_factory)
    try:
        yield rig
    finally:
        rig.close()


def _landed(result: AppResult, app: WriterApp, *, old: PgCluster, before: float, new: PgCluster, after: float) -> int:
    """Rows answered before `before` ran on `old`, rows sent after `after` ran on `new`; returns
    how many rows ran on `new`."""
    on_new = 0
    for attempt in app.attempts:
        if not attempt.ok:
            continue
        port = result.port_of.get(attempt.seq)
        if attempt.done < before:
            assert port == old.port, f"seq {attempt.seq} (before the fault) ran on port {port}"
        if attempt.sent > after:
            assert port == new.port, f"seq {attempt.seq} (after the switch) ran on port {port}, not {new.port}"
            on_new += 1
    return on_new


def _count(cluster: PgCluster) -> int:
    return int(cluster.sql("SELECT count(*) FROM failover_rows")[0][0])


def test_a_planned_switchover_with_the_name_moved(failover_rig: FailoverRig, dns: HostsDns) -> None:
    pair = failover_rig.pair()
    old, new = pair.primary, pair.standby
    assert new is not None
    side = failover_rig.sidecar(failover_rig.upstream(WRITER))
    app = failover_rig.app(side, old.users["app"])
    app.start(8.0)
    time.sleep(2.0)
    switch = pair.switchover()
    app.join(8.0 + JOIN_S)
    result = app.result([pair.primary], [switch.fault], switch.ready_at)
    print(result.line("a-switchover", **report_drops(side)), switch.line())
    result.assert_kept()
    assert dns.seen_by(side)[WRITER] == HOSTS["b"]
    assert pair.primary is new and not in_recovery(new)
    assert pair.standby is old and in_recovery(old), "the old primary rejoined as a standby"
    assert _landed(result, app, old=old, before=switch.fault.start, new=new, after=switch.ready_at) >= 20
    assert result.recovery_s is not None
    pair.wait_replayed(old)
    assert _count(old) == _count(new), "the rejoined old primary streams the new primary's rows"


def test_b_blue_green_name_flip(failover_rig: FailoverRig, dns: HostsDns) -> None:
    """Two independent primaries; the switch moves the name to green, then drops blue's
    sessions and makes blue read-only (what an RDS blue/green switchover does)."""
    blue = failover_rig.primary("a")
    green = failover_rig.primary("b")
    side = failover_rig.sidecar(failover_rig.upstream(WRITER))
    app = failover_rig.app(side, blue.users["app"])
    app.start(6.0)
    time.sleep(2.0)
    moved_at = dns.point(WRITER, HOSTS["b"])
    fault = terminate_clients(blue)
    blue.set_conf(default_transaction_read_only=True)
    app.join(6.0 + JOIN_S)
    result = app.result([blue, green], [fault], fault.end)
    print(
        result.line("b-blue-green", **report_drops(side)),
        f"name_moved_to_drop_s={fault.start - moved_at:.3f} drop_s={fault.seconds:.3f}",
    )
    result.assert_kept()
    assert _landed(result, app, old=blue, before=fault.start, new=green, after=fault.end) >= 20


def test_c_stale_name_reaches_the_old_writer_back_as_a_reader(failover_rig: FailoverRig, dns: HostsDns) -> None:
    """Aurora's failover: the old writer returns as a reader at the same address while the name
    still points there; with target_session_attrs=read-write the sidecar must wait for the name
    to move instead of handing the app a read-only server."""
    pair = failover_rig.pair()
    old, new = pair.primary, pair.standby
    assert new is not None
    side = failover_rig.sidecar(failover_rig.upstream(WRITER))
    app = failover_rig.app(side, old.users["app"])
    app.start(22.0)
    time.sleep(2.0)
    switch = pair.switchover(move_name_after_s=STALE_S)
    app.join(22.0 + JOIN_S)
    result = app.result([pair.primary], [switch.fault], switch.ready_at)
    print(result.line("c-stale-dns", **report_drops(side)), switch.line())
    assert switch.rejoined_at is not None and switch.name_moved_at is not None
    stale_reader_s = switch.name_moved_at - switch.rejoined_at
    assert stale_reader_s >= STALE_S - 5.0, (
        f"the old writer was a reader under the name for only {stale_reader_s:.1f} s"
    )
    result.assert_kept()
    assert _landed(result, app, old=old, before=switch.fault.start, new=new, after=switch.ready_at) >= 20
    assert in_recovery(old)


def test_d_host_list_with_the_first_host_dead(failover_rig: FailoverRig, dns: HostsDns) -> None:
    """`host=pg-a,pg-b` in order (load_balance_hosts=disable): host a's primary is killed and b
    promoted, nothing is renamed; later host a comes back as a reader (rebuilt with
    pg_basebackup) and the sidecar's session is ended again: it must still choose b."""
    pair = failover_rig.pair(name=None)
    old, new = pair.primary, pair.standby
    assert new is not None
    hosts = f"{HOST_NAMES['a']},{HOST_NAMES['b']}"
    side = failover_rig.sidecar(failover_rig.upstream(hosts, load_balance_hosts="disable"))
    app = failover_rig.app(side, old.users["app"])
    app.start(12.0)
    time.sleep(2.0)
    switch = pair.failover(move_name=False)
    time.sleep(2.0)
    reader = pair.rebuild_dead()  # host a: a standby of b now
    again = terminate_clients(new)
    app.join(12.0 + JOIN_S)
    result = app.result([pair.primary], [switch.fault, again], switch.ready_at)
    print(result.line("d-host-list", **report_drops(side)), switch.line(), f"second_drop_s={again.seconds:.3f}")
    result.assert_kept()
    assert in_recovery(reader)
    assert _landed(result, app, old=old, before=switch.fault.start, new=new, after=switch.ready_at) >= 20


@pytest.mark.slow
def test_e_writer_outage_of_75s_with_an_idle_app(failover_rig: FailoverRig, dns: HostsDns) -> None:
    """No writer for 75 s: the app is idle for the first 40 s (nothing gives up: the connection
    stays), then sends one request that waits. With the default reconnect.deadline (30 s, counted
    from the request) that request gets ERROR 08006 naming the last reconnect error, on a
    connection that stays open; the app's next request waits again, the standby is promoted and
    the name moved, and that request and the following ones succeed on the same connection."""
    pair = failover_rig.pair()
    old, new = pair.primary, pair.standby
    assert new is not None
    side = failover_rig.sidecar(failover_rig.upstream(WRITER))
    app = failover_rig.app(side, old.users["app"])
    app.run(2.0)
    crash = pair.crash_primary()
    time.sleep(IDLE_S)
    waiting = app.write_in_background()
    waiting.join(timeout=DEADLINE_S + 10.0)
    first = waiting.result
    assert first is not None and not first.ok and first.sqlstate == "08006", first
    assert "could not reconnect within 30 s" in (first.error or ""), first
    assert DEADLINE_S - 0.5 <= first.done - first.sent <= DEADLINE_S + 3.0, first
    assert app.conn is not None and not app.conn.closed  # an ERROR, not a FATAL: the connection stays
    again = app.write_in_background()  # the next request waits again, and tries at once
    time.sleep(max(0.0, crash.start + OUTAGE_S - time.monotonic()))
    early = again.finished_at
    switch = pair.promote_standby(crash)
    again.join(timeout=JOIN_S)
    app.run(3.0)
    # A request sent while there is no writer at all is judged as one sent during a fault: it
    # may get an error (the deadline's 08006), never a lost or duplicated write.
    outage = Window("no writer", crash.start, switch.ready_at)
    result = app.result([pair.primary], [crash, outage], switch.ready_at)
    held = again.result
    held_s = None if held is None else held.done - held.sent
    print(
        result.line("e-outage-75s", **report_drops(side)),
        switch.line(),
        f"first_request_s={first.done - first.sent:.3f} ({first.sqlstate})",
        f"held_request_s={'none' if held_s is None else f'{held_s:.3f}'}",
    )
    assert again.error is None, repr(again.error)
    assert early is None, f"the waiting request was answered during the outage: {held}"
    assert held is not None and held.ok, f"the request sent during the outage failed: {held}"
    assert held.done >= switch.ready_at
    assert [a.seq for a in result.errors_in_flight] == [first.seq]  # the one that waited past its deadline
    result.assert_kept()
    assert _landed(result, app, old=old, before=crash.start, new=new, after=switch.ready_at) >= 20


@pytest.mark.parametrize("attrs", ["read-only", "prefer-standby"])
def test_f_target_session_attrs_land_on_the_standby(failover_rig: FailoverRig, dns: HostsDns, attrs: str) -> None:
    """`host=pg-a,pg-b` with the primary first: the session must be on the standby."""
    pair = failover_rig.pair(name=None)
    standby = pair.standby
    assert standby is not None
    hosts = f"{HOST_NAMES['a']},{HOST_NAMES['b']}"
    side = failover_rig.sidecar(failover_rig.upstream(hosts, target_session_attrs=attrs))
    conn = failover_rig.connect(side, pair.primary.users["app"], "failover-reader")
    conn.autocommit = True
    seen = []
    for _ in range(5):
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM failover_rows")
            seen.append(cur.fetchone())
        time.sleep(0.05)
    print(
        f"FAILOVER scenario=f-{attrs} in_recovery={seen[0][0]} port={seen[0][1]}"
        f" standby_port={standby.port} primary_port={pair.primary.port}"
    )
    assert all(row[:2] == (True, standby.port) for row in seen), seen
