"""The paths under test, started fresh for one run: TLS PostgreSQL, the floor, PgBouncer, pgsidecar.

PostgreSQL comes from pgsidecar.demo_cluster (the demo's throwaway server), re-tuned for a
thousand idle clients. PgBouncer and PostgreSQL refuse to run as root, so both run as ``nobody``
there. The floor (bench/floor.py, the bare uvloop relay) and pgsidecar also listen on a unix
socket in one directory of their own. Every process is stopped by its own PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.report import ALL_PATHS, PATHS, UNIX_PATHS
from pgsidecar.demo_cluster import DemoCluster, free_port

#: The checkout, so `python -m bench.floor` resolves wherever the benchmark was started from.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ALL_PATHS", "PATHS", "UNIX_PATHS", "Stack", "stop_pid", "tree_cpu_s", "tree_cpu_split", "tree_rss_kib"]

#: Server settings for the benchmark: room for 1000 idle clients through each proxy, plus pgbench.
SERVER_SETTINGS = {
    "max_connections": "1100",
    "shared_buffers": "256MB",
    "log_connections": "off",
    "synchronous_commit": "off",
}


def _as_nobody() -> dict:
    """subprocess.Popen keywords that drop root to nobody (no-op when not root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "nobody", "group": "nogroup", "extra_groups": []}


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 20.0) -> None:
    """Poll until 127.0.0.1:port accepts, or fail naming the process that did not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def stop_pid(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop one child by its PID: the signal, then SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants (a proxy may fork workers), in KiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo += [int(child) for child in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) and its descendants so far, from
    utime and stime of /proc/<pid>/stat: clock ticks, 10 ms each at the usual CLK_TCK of 100."""
    tick = os.sysconf("SC_CLK_TCK")
    user, system, todo = 0.0, 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick  # utime (proc(5) field 14)
            system += int(fields[12]) / tick  # stime (field 15)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo += [int(child) for child in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return user, system


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (/proc/<pid>/stat)."""
    return sum(tree_cpu_split(pid))


@dataclass
class Stack:
    """One PostgreSQL with TLS and the floor and the two proxies in front of it; `port(path)` and
    `host(path)` pick a path (a ``-unix`` path: the same relay's unix socket)."""

    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pgsidecar-bench-"))
    cluster: DemoCluster | None = None
    bouncer: subprocess.Popen | None = None
    bouncer_port: int = 0
    sidecar: subprocess.Popen | None = None
    sidecar_port: int = 0
    metrics_port: int = 0  # 0: the sidecar runs without its metrics listener
    floor: subprocess.Popen | None = None
    floor_port: int = 0

    @property
    def user(self) -> str:
        return "postgres"

    @property
    def password(self) -> str:
        assert self.cluster is not None
        return self.cluster.password

    @property
    def socket_dir(self) -> str:
        """Where the floor and pgsidecar put their unix sockets (.s.PGSQL.<their TCP port>)."""
        return os.path.join(self.root, "sock")

    def port(self, path: str) -> int:
        assert self.cluster is not None
        ports = {
            "direct": self.cluster.port,
            "floor": self.floor_port,
            "pgbouncer": self.bouncer_port,
            "pgsidecar": self.sidecar_port,
        }
        return ports[path.removesuffix("-unix")]

    def host(self, path: str) -> str:
        """libpq's host: the socket directory for a ``-unix`` path, else loopback."""
        return self.socket_dir if path in UNIX_PATHS else "127.0.0.1"

    def sslmode(self, path: str) -> str:
        """Direct is TLS (as an app without a sidecar would be); the relays take plain loopback."""
        return "require" if path == "direct" else "disable"

    def proxy_pid(self, path: str) -> int:
        proc = {"floor": self.floor, "pgbouncer": self.bouncer, "pgsidecar": self.sidecar}[path.removesuffix("-unix")]
        assert proc is not None
        return proc.pid

    def env(self, path: str) -> dict[str, str]:
        """libpq variables that point psql and pgbench at `path`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGSIDECAR_"))}
        env.update(
            PGHOST=self.host(path),
            PGPORT=str(self.port(path)),
            PGUSER=self.user,
            PGDATABASE="postgres",
            PGPASSWORD=self.password,
            PGSSLMODE=self.sslmode(path),
            PGAPPNAME="bench",
        )
        return env

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)  # PostgreSQL and PgBouncer run as nobody below it
        pg_root = os.path.join(self.root, "pg")
        os.makedirs(pg_root)
        self.cluster = DemoCluster(pg_root)
        self.cluster.create()
        with open(os.path.join(self.cluster.datadir, "postgresql.conf"), "a") as fh:
            fh.write("".join(f"{k} = {v}\n" for k, v in SERVER_SETTINGS.items()))
        self.cluster.restart("fast")
        os.makedirs(self.socket_dir, mode=0o755)
        self._start_floor()
        self._start_bouncer()
        self._start_sidecar()

    def _start_floor(self) -> None:
        """The bare relay (bench/floor.py) on loopback and on a unix socket, TLS to PostgreSQL."""
        assert self.cluster is not None
        self.floor_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.floor",
            "--listen",
            f"127.0.0.1:{self.floor_port}",
            "--unix-socket-dir",
            self.socket_dir,
            "--upstream",
            f"127.0.0.1:{self.cluster.port}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH", "")]))
        with open(os.path.join(self.root, "floor.log"), "ab") as log:
            self.floor = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(self.floor_port, self.floor, "bench.floor")

    def restart_bouncer(self) -> None:
        """A fresh PgBouncer on the same port: session mode keeps every server link it ever made
        (server_idle_timeout 600 s), and a thousand pooled links would starve the other paths."""
        stop_pid(self.bouncer, signal.SIGINT)
        bdir = os.path.join(self.root, "pgbouncer")
        self.bouncer = subprocess.Popen(
            ["pgbouncer", os.path.join(bdir, "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **_as_nobody(),
        )
        wait_port(self.bouncer_port, self.bouncer, "pgbouncer")

    def _start_bouncer(self) -> None:
        assert self.cluster is not None
        if shutil.which("pgbouncer") is None:
            raise RuntimeError("pgbouncer not found: apt-get install pgbouncer (make setup does)")
        bdir = os.path.join(self.root, "pgbouncer")
        os.makedirs(bdir)
        self.bouncer_port = free_port()
        with open(os.path.join(bdir, "userlist.txt"), "w") as fh:
            fh.write(f'"{self.user}" "{self.password}"\n')
        ini = os.path.join(bdir, "pgbouncer.ini")
        with open(ini, "w") as fh:
            fh.write(
                "[databases]\n"
                f"postgres = host=127.0.0.1 port={self.cluster.port} dbname=postgres\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.bouncer_port}\nunix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {bdir}/userlist.txt\n"
                f"logfile = {bdir}/pgbouncer.log\npidfile = {bdir}/pgbouncer.pid\n"
                "pool_mode = session\nmax_client_conn = 2000\ndefault_pool_size = 1050\n"
                "max_db_connections = 1050\nserver_tls_sslmode = require\n"
                "ignore_startup_parameters = extra_float_digits\n"
                "log_connections = 0\nlog_disconnections = 0\nserver_login_retry = 1\n"
            )
        if os.geteuid() == 0:
            for name in os.listdir(bdir):
                shutil.chown(os.path.join(bdir, name), "nobody", "nogroup")
            shutil.chown(bdir, "nobody", "nogroup")
        self.bouncer = subprocess.Popen(
            ["pgbouncer", ini],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **_as_nobody(),
        )
        wait_port(self.bouncer_port, self.bouncer, "pgbouncer")

    def restart_sidecar(self, env: dict[str, str] | None = None, *, metrics: bool = False) -> None:
        """A fresh pgsidecar on the same port with extra PGSIDECAR_* settings (the churn run varies
        reconnect.max_concurrent) and optionally its metrics listener; None/False: as at start."""
        stop_pid(self.sidecar)
        self._start_sidecar(env, metrics=metrics, port=self.sidecar_port)

    def _start_sidecar(self, extra_env: dict[str, str] | None = None, *, metrics: bool = False, port: int = 0) -> None:
        assert self.cluster is not None
        self.sidecar_port = port or free_port()
        self.metrics_port = free_port() if metrics else 0
        upstream = f"host=127.0.0.1 port={self.cluster.port} sslmode=require"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGSIDECAR_"))}
        env["PGSIDECAR_LISTEN_MAX_CLIENTS"] = "2000"
        env.update(extra_env or {})
        # BENCH_SIDECAR_SRC=<a checkout>: run that tree's pgsidecar under this harness (before/after).
        src = os.environ.get("BENCH_SIDECAR_SRC") or _REPO
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
        argv = [
            sys.executable,
            *self.sidecar_prefix(),
            "-m",
            "pgsidecar",
            "run",
            "--listen",
            f"127.0.0.1:{self.sidecar_port}",
            "--unix-socket-dir",
            self.socket_dir,
            "--upstream",
            upstream,
            "--metrics",
            f"127.0.0.1:{self.metrics_port}" if metrics else "none",
            "--log-format",
            "json",
            "--log-level",
            "warning",
            "--drop-log",
            self.drop_log,
        ]
        # Appended: a restart keeps the earlier lines. The child keeps its own descriptor.
        with open(os.path.join(self.root, "sidecar.log"), "ab") as log:
            self.sidecar = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=src, start_new_session=True
            )
        wait_port(self.sidecar_port, self.sidecar, "pgsidecar")

    @property
    def drop_log(self) -> str:
        """The sidecar's drop records (one JSON line per drop; the churn run reads reconnect times)."""
        return os.path.join(self.root, "drops.jsonl")

    def sidecar_prefix(self) -> list[str]:
        """Interpreter options before `-m pgsidecar`: BENCH_SIDECAR_PROFILE=out.prof runs cProfile."""
        out = os.environ.get("BENCH_SIDECAR_PROFILE")
        return ["-m", "cProfile", "-o", out] if out else []

    def stop(self) -> None:
        # SIGINT lets a cProfile'd sidecar write its profile; pgsidecar treats it like SIGTERM.
        stop_pid(self.sidecar, signal.SIGINT if os.environ.get("BENCH_SIDECAR_PROFILE") else signal.SIGTERM)
        stop_pid(self.bouncer, signal.SIGINT)
        stop_pid(self.floor)
        if self.cluster is not None:
            self.cluster.destroy()
        shutil.rmtree(self.root, ignore_errors=True)
