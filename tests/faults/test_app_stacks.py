"""The stacks users run, behind the sidecar, across real idle-time faults: zero app-visible errors.

Each app keeps one connection between requests, the way production apps do (README "classic
app", Django persistent connections, a SQLAlchemy pool without pre-ping); between two requests
the server ends the session (pg_terminate_backend, idle_session_timeout, restarts, a crash of
another backend). The sidecar must hide every one: docs/session-rules.md, first row.
Each test gets its own cluster and sidecar (`rig_factory`), since the faults are destructive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg2
import pytest

from tests.fixtures.faults import (
    CLASSIC_KW,
    RAW_DROP_TEXTS,
    FaultRig,
    report_reconnect,
    request,
    wait_until,
)

pytestmark = [pytest.mark.server, pytest.mark.faults]

REQUEST_TIMEOUT_S = 30.0  # a request through the sidecar never legitimately takes this long
DROP_TIMEOUT_S = 40.0
# Named prepared statements on the current backend holding the tagged request query (the tag is
# split here so that this query never counts itself).
PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE strpos(statement, 'stack' || 'req') > 0"


@pytest.fixture
def worker() -> Iterator[Callable[..., Any]]:
    """call(fn) runs a blocking driver call on the test's one app thread and waits at most
    REQUEST_TIMEOUT_S, so a hang fails the test instead of stalling it (libpq retries poll() on
    EINTR, so pytest-timeout's signal cannot interrupt it). One thread throughout, because
    Django's connections are per thread."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="app")

    def call(fn: Callable[[], Any], timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        return pool.submit(fn).result(timeout_s)

    yield call
    pool.shutdown(wait=False, cancel_futures=True)


# -- faults ------------------------------------------------------------------------------------


def _terminate(rig: FaultRig, names: tuple[str, ...]) -> None:
    pids = [pid for name in names for pid in rig.cluster.backend_pids(application_name=name)]
    assert pids, f"no backend found for {names}"
    for pid in pids:
        rig.cluster.terminate(pid)


def _arm_idle_session_timeout(rig: FaultRig) -> None:
    """idle_session_timeout = 1 s for every session (docs: "Client Connection Defaults"). A
    backend arms the timer when it goes idle after a command, so this precedes the request
    after which the session is left idle."""
    rig.cluster.set_conf(idle_session_timeout="1s")


def _idle_session_timeout(rig: FaultRig, names: tuple[str, ...]) -> None:
    """Wait for the app's session to time out, then reset the setting. The sidecar's new
    backend started with the timer too, so it may time out once more: let that happen now."""
    before = len(rig.sidecar.drops())
    try:
        wait_until(lambda: len(rig.sidecar.drops()) > before, 15, "the idle-session timeout drop")
    finally:
        rig.cluster.set_conf(idle_session_timeout=None)
    time.sleep(2.0)


def _kill9_other(rig: FaultRig, names: tuple[str, ...]) -> None:
    """SIGKILL an unrelated backend: the postmaster resets every session (57P02), then runs
    crash recovery (docs: "Server Crash Recovery" in "Starting the Database Server")."""
    other = rig.cluster.connect(application_name="victim")
    pid = other.info.backend_pid
    rig.cluster.kill9(pid)
    try:
        other.close()
    except psycopg2.Error:
        pass


@dataclass(frozen=True, slots=True)
class Fault:
    """One idle-time fault and the cause the drop record should carry."""

    name: str
    cause: str
    inject: Callable[[FaultRig, tuple[str, ...]], None]
    arm: Callable[[FaultRig], None] | None = None  # before the request that precedes the idle

    def prepare(self, rig: FaultRig) -> None:
        if self.arm is not None:
            self.arm(rig)


TERMINATE = Fault("pg_terminate_backend", "admin_terminate", _terminate)
IDLE_TIMEOUT = Fault("idle_session_timeout", "idle_session_timeout", _idle_session_timeout, _arm_idle_session_timeout)
FAST_RESTART = Fault("restart -m fast", "server_restart", lambda rig, _n: rig.cluster.restart("fast"))
IMMEDIATE_RESTART = Fault("restart -m immediate", "server_restart", lambda rig, _n: rig.cluster.restart("immediate"))
KILL9_OTHER = Fault("kill -9 of another backend", "server_crash", _kill9_other)
ALL_IDLE_FAULTS = (TERMINATE, IDLE_TIMEOUT, FAST_RESTART, IMMEDIATE_RESTART, KILL9_OTHER)


def inject(rig: FaultRig, fault: Fault, *, sessions: int = 1, names: tuple[str, ...] = ()) -> list[dict]:
    """Inject while the app idles, then wait until the sidecar recorded (and so reconnected)
    every session's drop. Returns the new drop records."""
    before = len(rig.sidecar.drops())
    fault.inject(rig, names or (rig.app_name,))
    wait_until(
        lambda: len(rig.sidecar.drops()) >= before + sessions,
        DROP_TIMEOUT_S,
        f"{sessions} drop record(s) after {fault.name}",
    )
    time.sleep(0.2)
    new = rig.sidecar.drops()[before:]
    for drop in new:
        assert drop["state"] == "idle" and drop["impact"] == "transparent", drop
        report_reconnect(fault.name, drop)
    return new


# -- the classic psycopg2 app --------------------------------------------------------------------


def test_classic_psycopg2_app_sees_no_drop_errors_across_all_idle_faults(rig_factory, worker):
    rig = rig_factory(app_name="stack-psycopg2")
    app = rig.app()
    direct_name = "stack-psycopg2-direct"

    def direct_connect() -> Any:
        return rig.cluster.connect(user="app", autocommit=False, application_name=direct_name, **CLASSIC_KW)

    direct = direct_connect()  # control: the same app without the sidecar
    app_errors: list[str] = []
    direct_errors: list[str] = []
    causes: dict[str, list[str]] = {}
    pids = set()
    for n, fault in enumerate(ALL_IDLE_FAULTS):
        fault.prepare(rig)
        rows = worker(lambda: request(app, "SELECT %s + 1, pg_backend_pid()", (n,)))
        assert rows[0][0] == n + 1
        pids.add(rows[0][1])
        worker(lambda: request(direct, "SELECT 1"))
        drops = inject(rig, fault, names=(rig.app_name, direct_name))
        causes[fault.name] = [d["cause"] for d in drops]
        try:
            rows = worker(lambda: request(app, "SELECT %s * 2, pg_backend_pid()", (n,)))
            assert rows[0][0] == n * 2
            pids.add(rows[0][1])
        except psycopg2.Error as exc:
            app_errors.append(f"{fault.name}: {exc}")
        try:
            worker(lambda: request(direct, "SELECT 1"))
        except psycopg2.Error as exc:
            direct_errors.append(f"{fault.name}: {exc}")
            direct.close()
            direct = worker(direct_connect)
    direct.close()
    raw = [e for e in app_errors if any(text in e for text in RAW_DROP_TEXTS)]
    assert raw == [], raw
    assert app_errors == [], app_errors
    assert len(pids) == len(ALL_IDLE_FAULTS) + 1, "every fault gave the app a new backend"
    # The faults were real: the same app connected directly failed after each of them.
    assert len(direct_errors) == len(ALL_IDLE_FAULTS), direct_errors
    print("DIRECT", direct_errors)
    assert {name: got[0] for name, got in causes.items()} == {f.name: f.cause for f in ALL_IDLE_FAULTS}, causes


# -- psycopg 3 and asyncpg -----------------------------------------------------------------------


def test_psycopg3_session_survives_terminate_and_fast_restart(rig_factory, worker):
    rig = rig_factory(app_name="stack-psycopg3")
    dsn = rig.sidecar.dsn(password=rig.cluster.users["app"], application_name=rig.app_name, connect_timeout=10)
    conn = worker(lambda: psycopg.connect(dsn))

    def req(n: int) -> int:
        # Six runs of the same query: from the fifth, psycopg uses a named prepared statement
        # (prepare_threshold), which the sidecar must replay on the new backend.
        for _ in range(6):
            value, pid = conn.execute("SELECT %s::int + 1, pg_backend_pid() /* stackreq */", (n,)).fetchone()
        conn.commit()
        assert value == n + 1
        return pid

    def prepared_count() -> int:
        count = conn.execute(PREPARED).fetchone()[0]
        conn.commit()
        return count

    try:
        pids = [worker(lambda: req(0))]
        for n, fault in enumerate((TERMINATE, FAST_RESTART), start=1):
            inject(rig, fault)
            pids.append(worker(lambda: req(n)))  # any error fails the test
            assert worker(lambda: prepared_count()) >= 1, "replayed on the new backend"
        assert len(set(pids)) == 3, pids
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        conn.close()


def test_asyncpg_session_survives_terminate_and_fast_restart(rig_factory):
    import asyncpg

    rig = rig_factory(app_name="stack-asyncpg")

    async def main() -> list[int]:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=rig.sidecar.port,
            user="app",
            password=rig.cluster.users["app"],
            database="app",
            ssl=False,
            timeout=10,
            server_settings={"application_name": rig.app_name},
        )
        try:

            async def req(n: int) -> int:
                # asyncpg prepares named statements and caches them per connection.
                value = await asyncio.wait_for(conn.fetchval("SELECT $1::int + 1", n), REQUEST_TIMEOUT_S)
                assert value == n + 1
                return await asyncio.wait_for(
                    conn.fetchval("SELECT pg_backend_pid() /* stackreq */"), REQUEST_TIMEOUT_S
                )

            pids = [await req(0)]
            for n, fault in enumerate((TERMINATE, FAST_RESTART), start=1):
                await asyncio.to_thread(inject, rig, fault)
                pids.append(await req(n))
                assert await conn.fetchval(PREPARED) >= 1, "replayed on the new backend"
            return pids
        finally:
            await conn.close(timeout=10)

    pids = asyncio.run(main())
    assert len(set(pids)) == 3, pids


# -- Django with persistent connections ----------------------------------------------------------


def _django_view(request: Any) -> Any:
    from django.db import connection
    from django.http import JsonResponse

    with connection.cursor() as cur:
        cur.execute("SELECT %s::int + 1, pg_backend_pid()", [int(request.GET.get("n", "0"))])
        value, pid = cur.fetchone()
    return JsonResponse({"value": value, "pid": pid, "conn": id(connection.connection)})


def _django_urls() -> list[Any]:
    from django.urls import path

    return [path("q", _django_view)]


urlpatterns: list[Any] = []  # ROOT_URLCONF is this module; filled once Django is configured


def _configure_django(rig: FaultRig) -> None:
    """Settings in-process: persistent connections without health checks, the setup the README
    shows behind pgsidecar. Reconfigures the default alias if another test configured Django."""
    import django
    from django.conf import settings
    from django.db import connections

    db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": rig.cluster.users["app"],
        "HOST": "127.0.0.1",
        "PORT": str(rig.sidecar.port),
        "CONN_MAX_AGE": None,
        "CONN_HEALTH_CHECKS": False,
        "OPTIONS": {"sslmode": "disable", "application_name": rig.app_name, "connect_timeout": 10},
    }
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test",
            ALLOWED_HOSTS=["testserver"],
            USE_TZ=True,
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=["django.contrib.contenttypes"],
            MIDDLEWARE=[],
            DATABASES={"default": db},
        )
        django.setup()
    else:
        connections["default"].close()
        connections["default"].settings_dict.update(db)
    if not urlpatterns:
        urlpatterns.extend(_django_urls())


def test_django_persistent_connection_survives_terminate_and_fast_restart(rig_factory, worker):
    from django.db import connections
    from django.test import Client

    rig = rig_factory(app_name="stack-django")
    _configure_django(rig)
    client = Client()
    seen: list[dict] = []
    try:

        def get(n: int) -> dict:
            response = client.get("/q", {"n": n})  # raises what the view raised
            assert response.status_code == 200, response.content
            body = response.json()
            assert body["value"] == n + 1
            return body

        seen.append(worker(lambda: get(0)))
        seen.append(worker(lambda: get(1)))
        for n, fault in enumerate((TERMINATE, FAST_RESTART), start=2):
            inject(rig, fault)
            seen.append(worker(lambda: get(n)))
    finally:
        connections["default"].close()
    assert len({body["conn"] for body in seen}) == 1, "Django kept one persistent connection"
    assert len({body["pid"] for body in seen}) == 3, seen


# -- SQLAlchemy pool without pre-ping ------------------------------------------------------------


def test_sqlalchemy_pool_without_pre_ping_survives_terminate_and_fast_restart(rig_factory, worker):
    import sqlalchemy as sa

    rig = rig_factory(app_name="stack-sqlalchemy")
    url = sa.engine.URL.create(
        "postgresql+psycopg2",
        username="app",
        password=rig.cluster.users["app"],
        host="127.0.0.1",
        port=rig.sidecar.port,
        database="app",
        query={"sslmode": "disable", "application_name": rig.app_name, "connect_timeout": "10"},
    )
    engine = sa.create_engine(url, pool_pre_ping=False, pool_size=1, max_overflow=0)
    invalidated: list[str] = []
    sa.event.listen(engine, "invalidate", lambda *_a: invalidated.append("invalidate"))

    def req(n: int) -> tuple[int, int]:
        with engine.connect() as conn:
            value, pid = conn.execute(sa.text("SELECT :n + 1, pg_backend_pid()"), {"n": n}).one()
            conn.commit()
            assert value == n + 1
            return pid, id(conn.connection.dbapi_connection)

    try:
        seen = [worker(lambda: req(0))]
        for n, fault in enumerate((TERMINATE, FAST_RESTART), start=1):
            inject(rig, fault)
            seen.append(worker(lambda: req(n)))
    finally:
        engine.dispose()
    assert invalidated == [], "the pool never saw a dead connection"
    assert len({dbapi for _pid, dbapi in seen}) == 1, "the pool kept its one connection"
    assert len({pid for pid, _dbapi in seen}) == 3, seen
