"""`pgsidecar demo`: a throwaway TLS PostgreSQL, the sidecar, and the classic psycopg2 app,
through real drops. The same app also runs connected directly, and fails where the one behind
pgsidecar does not. Everything started here is stopped by PID at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgsidecar.demo_cluster import DemoCluster, free_port

if TYPE_CHECKING:  # psycopg2 itself is imported when the demo runs (main() checks it is there)
    from psycopg2.extensions import connection as PgConnection


def _say(text: str = "") -> None:
    print(text, flush=True)


class DemoApp:
    """The app from our users' stories: one psycopg2 connection kept between requests."""

    def __init__(self, name: str, dsn: str) -> None:
        self.name = name
        self.dsn = dsn
        self.conn: PgConnection | None = None
        self.errors: list[str] = []
        self.requests = 0

    def _connect(self) -> PgConnection:
        import psycopg2

        return psycopg2.connect(
            self.dsn,
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=5,
            connect_timeout=10,
            application_name=f"demo-{self.name}",
        )

    def request(self) -> str:
        """One web request's worth of work; an error is what the app's user would see."""
        import psycopg2

        self.requests += 1
        try:
            if self.conn is None:
                self.conn = self._connect()
            with self.conn.cursor() as cur:
                cur.execute("INSERT INTO demo_events(app) VALUES (%s)", (self.name,))
                cur.execute("SELECT count(*) FROM demo_events WHERE app = %s", (self.name,))
                row = cur.fetchone()
                assert row is not None  # count(*) always answers one row
                (count,) = row
            self.conn.commit()
            return f"ok ({count} rows)"
        except psycopg2.Error as exc:
            text = str(exc).strip().splitlines()[0]
            self.errors.append(text)
            try:
                if self.conn is not None:
                    self.conn.close()
            except Exception:  # noqa: BLE001 - closing a connection that already failed
                pass
            # The app's own reconnect-on-error code, which it must carry today: the next
            # request gets a fresh connection (a pool would do the same).
            try:
                self.conn = self._connect()
            except psycopg2.Error:
                self.conn = None
            return f"ERROR: {text}"

    def backend_pid(self) -> int | None:
        if self.conn is None:
            return None
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                row = cur.fetchone()
                assert row is not None
                pid: int = row[0]
            self.conn.commit()
            return pid
        except Exception:  # noqa: BLE001 - no pid to show is all a failed query means here
            return None


def _admin(cluster: DemoCluster) -> PgConnection:
    import psycopg2

    conn = psycopg2.connect(cluster.dsn(application_name="demo-admin"), connect_timeout=10)
    conn.autocommit = True
    return conn


def _admin_sql(cluster: DemoCluster, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = _admin(cluster)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def fault_terminate(cluster: DemoCluster, apps: list[DemoApp]) -> None:
    _admin_sql(
        cluster,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name IN ('demo-sidecar', 'demo-direct', 'pgsidecar') "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )


def fault_idle_session_timeout(cluster: DemoCluster, apps: list[DemoApp]) -> None:
    _admin_sql(cluster, "ALTER SYSTEM SET idle_session_timeout = '1s'")
    _admin_sql(cluster, "SELECT pg_reload_conf()")
    # An idle backend reads its new configuration only before its next command.
    time.sleep(0.2)
    for app in apps:
        app.backend_pid()
    time.sleep(1.6)
    _admin_sql(cluster, "ALTER SYSTEM RESET idle_session_timeout")
    _admin_sql(cluster, "SELECT pg_reload_conf()")


def fault_fast_restart(cluster: DemoCluster, apps: list[DemoApp]) -> None:
    cluster.restart("fast")


def fault_crash(cluster: DemoCluster, apps: list[DemoApp]) -> None:
    """kill -9 of another backend: the postmaster ends every session and runs crash recovery."""
    victim = _admin(cluster)
    with victim.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        row = cur.fetchone()
        assert row is not None
        pid = row[0]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    try:
        victim.close()
    except Exception:  # noqa: BLE001 - its backend was just killed
        pass


FAULTS: list[tuple[str, Callable[[DemoCluster, list[DemoApp]], None]]] = [
    ("pg_terminate_backend() of both apps' backends", fault_terminate),
    ("idle_session_timeout = 1s while the apps are idle", fault_idle_session_timeout),
    ("pg_ctl restart -m fast", fault_fast_restart),
    ("kill -9 of another backend (crash recovery, like the OOM killer)", fault_crash),
]


def _start_sidecar(cluster: DemoCluster, root: str) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    drop_log = os.path.join(root, "drops.jsonl")
    upstream = f"host=localhost port={cluster.port} sslmode=verify-full sslrootcert={cluster.ca}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSIDECAR_")}
    with open(os.path.join(root, "sidecar.log"), "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pgsidecar",
                "run",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                upstream,
                "--drop-log",
                drop_log,
                "--metrics",
                "none",
                "--log-format",
                "text",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("pgsidecar exited early; see " + os.path.join(root, "sidecar.log"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port, drop_log
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("pgsidecar did not start listening")


def _read_drops(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _wait_drops(path: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    drops = _read_drops(path)
    while len(drops) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        drops = _read_drops(path)
    return drops


def run_demo(root: str) -> int:
    _say("pgsidecar demo: a throwaway PostgreSQL with TLS, the sidecar in front of it, and the same")
    _say("psycopg2 app twice: once through pgsidecar, once connected directly.\n")
    cluster = DemoCluster(root)
    sidecar = None
    try:
        cluster.create()
        _say(f"  PostgreSQL  {cluster.bindir}  port {cluster.port}  (ssl=on, scram-sha-256)")
        sidecar, port, drop_log = _start_sidecar(cluster, root)
        _say(f"  pgsidecar   127.0.0.1:{port} -> localhost:{cluster.port} (sslmode=verify-full)\n")
        _admin_sql(
            cluster, "CREATE TABLE demo_events (id bigserial PRIMARY KEY, app text, at timestamptz DEFAULT now())"
        )
        via = DemoApp(
            "sidecar",
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres password={cluster.password} sslmode=require",
        )
        direct = DemoApp("direct", cluster.dsn())
        _say(f"  request 0: via pgsidecar: {via.request():<30} direct: {direct.request()}")
        seen = 0
        for number, (title, fault) in enumerate(FAULTS, start=1):
            _say(f"\nfault {number}: {title}")
            fault(cluster, [via, direct])
            time.sleep(1.0)  # the apps are idle between requests, as real apps are
            expected = seen + 1
            drops = _wait_drops(drop_log, expected)
            _say(f"  request {number}: via pgsidecar: {via.request():<30} direct: {direct.request()}")
            for record in drops[seen:]:
                rec = record.get("reconnect") or {}
                _say(
                    f"  pgsidecar saw the drop: cause={record['cause']}, idle {record['idle_s']:.1f}s, "
                    f"reconnected in {rec.get('duration_s', 0):.2f}s, impact: {record['impact']}"
                )
            seen = len(drops)
        _say("\nresult")
        _say(f"  app through pgsidecar: {via.requests} requests, {len(via.errors)} errors")
        _say(f"  app connected directly: {direct.requests} requests, {len(direct.errors)} errors")
        for text in direct.errors:
            _say(f"    direct: {text}")
        _say("\nwhat `pgsidecar drops` says about this run's drop log:\n")
        from pgsidecar.drops.report import main as drops_main

        drops_main([drop_log], now=time.time())
        return 0 if not via.errors else 1
    finally:
        if sidecar is not None and sidecar.poll() is None:
            sidecar.send_signal(signal.SIGKILL)
            sidecar.wait(10)
        cluster.destroy()


def main(args: argparse.Namespace) -> int:
    try:
        import psycopg2  # noqa: F401 - the demo's app is the psycopg2 app of our users' stories
    except ImportError:
        _say("pgsidecar demo runs a psycopg2 app: pip install psycopg2-binary (make demo installs it)")
        return 2
    root = tempfile.mkdtemp(prefix="pgsidecar-demo-")
    try:
        return run_demo(root)
    except KeyboardInterrupt:
        _say("\ninterrupted; cleaning up")
        return 130
    except RuntimeError as exc:
        _say(f"demo failed: {exc}")
        return 1
    finally:
        if getattr(args, "keep", False):
            _say(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
