"""The `pgsidecar` command as an operator meets it: check, version, config errors, demo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.tools import free_port

pytestmark = pytest.mark.server


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGSIDECAR_"))}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgsidecar", *args], capture_output=True, text=True, timeout=timeout, env=base
    )


def test_version():
    out = _run("version")
    assert out.returncode == 0
    assert out.stdout.startswith("pgsidecar ")


def test_check_reports_server_tls_certificate_and_keepalives(pg):
    out = _run("check", "--upstream", pg.dsn(user="app"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "server version:  15" in text or "server version:  1" in text
    assert "TLSv1.3" in text or "TLSv1.2" in text
    assert "subject:" in text and "issuer:" in text and "pgsidecar test CA" in text
    assert "localhost" in text  # a SAN
    assert "expires:" in text
    # The server offers SCRAM-SHA-256-PLUS over TLS; pgsidecar binds to its certificate.
    assert "auth: SCRAM-SHA-256-PLUS" in text
    assert "keepalive:       idle 10s, interval 5s, count 3, user timeout 24.5s" in text
    assert "keepidle_s=10" in text and "user_timeout_ms=24500" in text  # read back from the socket
    assert pg.users["app"] not in text + out.stderr


def test_check_uses_pg_environment_variables(pg):
    env = {
        "PGHOST": "localhost",
        "PGPORT": str(pg.port),
        "PGUSER": "app",
        "PGPASSWORD": pg.users["app"],
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": pg.pki.ca_cert,
        "PGDATABASE": "app",
    }
    out = _run("check", env=env)
    assert out.returncode == 0, out.stderr
    assert "sslmode=verify-full" in out.stdout


def test_check_fails_clearly_when_unreachable():
    port = free_port()
    out = _run("check", "--upstream", f"host=127.0.0.1 port={port} user=x sslmode=disable connect_timeout=2")
    assert out.returncode == 4
    assert "Connection refused" in out.stderr


def test_check_reports_every_host_and_the_one_a_session_would_use(pg, standby_of):
    """libpq multi-host: a dead host, a standby, the primary; read-write picks the primary."""
    standby = standby_of(pg)
    dead = free_port()
    dsn = pg.dsn(user="app", port=f"{dead},{standby.port},{pg.port}", host="localhost,localhost,localhost")
    out = _run("check", "--upstream", dsn + " target_session_attrs=read-write connect_timeout=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "hosts (target_session_attrs=read-write):"
    assert f"localhost:{dead}" in lines[1] and "unreachable" in lines[1] and "Connection refused" in lines[1]
    assert f"localhost:{standby.port}" in lines[2] and "reachable, standby  (wrong role)" in lines[2]
    assert f"localhost:{pg.port}" in lines[3] and "reachable, primary  <- chosen" in lines[3]
    assert f"port {pg.port}" in out.stdout  # the details are the chosen host's
    only_standby = pg.dsn(user="app", port=str(standby.port)) + " target_session_attrs=primary"
    out = _run("check", "--upstream", only_standby)
    assert out.returncode == 4 and "no usable host" in out.stderr and "wrong role: standby" in out.stderr


def test_check_fails_clearly_on_wrong_password(pg):
    out = _run("check", "--upstream", pg.dsn(user="app", password="wrong"))
    assert out.returncode == 4
    assert "28P01" in out.stderr and "password authentication failed" in out.stderr


@pytest.mark.parametrize(
    "args, env, key",
    [
        (("--upstream", "host=x", "--listen", "127.0.0.1:notaport"), {}, "listen.port"),
        ((), {"PGSIDECAR_UPSTREAM_KEEPALIVE_IDLE": "abc", "PGHOST": "x"}, "upstream.keepalive.idle"),
        ((), {}, "upstream.dsn"),
        (("--upstream", "host=x sslmode=bogus"), {}, "upstream.dsn"),
        (("--config", "/nonexistent/pgsidecar.yaml"), {"PGHOST": "x"}, "config"),
    ],
)
def test_config_errors_are_one_line_exit_2_and_nothing_starts(args, env, key):
    port = free_port()
    out = (
        _run("run", "--metrics", "none", *args, env=env, timeout=20)
        if "--listen" in args
        else _run("run", "--metrics", "none", "--listen", f"127.0.0.1:{port}", *args, env=env, timeout=20)
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"config: {key}:")


def test_unknown_yaml_key_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream:\n  dsn: host=x\nlisten:\n  prot: 5\n")
    out = _run("run", "--config", str(cfg), timeout=20)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("config: listen.prot:")


def test_demo_runs_and_the_app_behind_the_sidecar_sees_no_error():
    out = _run("demo", timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "app through pgsidecar: 5 requests, 0 errors" in out.stdout
    direct = [line for line in out.stdout.splitlines() if line.startswith("  app connected directly")]
    assert direct and "0 errors" not in direct[0], out.stdout
    assert "By cause" in out.stdout  # the analyzer's summary closes the demo
