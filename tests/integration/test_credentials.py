"""Passwords fetched for every upstream connect, against the real server: auth.password_command
with a password rotated between connects and with a failing command, and auth.token: aws with
fixed credentials (the server cannot verify an RDS token, so a role's password is set to the
token botocore itself makes for the same moment, and the sidecar logs in with its own)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.fixtures.postgres import PgCluster
from tests.fixtures.sidecar import SidecarProcess, upstream_dsn_for

pytestmark = pytest.mark.server

ROLE = "rotating"


@pytest.fixture(scope="module")
def cluster(pg_factory) -> Iterator[PgCluster]:
    """A private cluster: its roles' passwords change under the tests."""
    cluster = pg_factory()
    cluster.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD 'first-password'")
    cluster.sql("CREATE ROLE iam_user LOGIN")
    yield cluster


def password_script(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(secret file, run log, script): the script prints the secret file and counts its runs; with
    a `fail` file beside it, it says why on stderr, prints junk on stdout, and exits 1."""
    secret, runs, fail = tmp_path / "secret", tmp_path / "runs", tmp_path / "fail"
    script = tmp_path / "get-password.py"
    script.write_text(
        "import pathlib, sys\n"
        f"pathlib.Path({str(runs)!r}).open('a').write('run\\n')\n"
        f"if pathlib.Path({str(fail)!r}).exists():\n"
        "    print('stdout-that-must-not-be-logged')\n"
        "    sys.stderr.write('vault: sealed\\n')\n"
        "    sys.exit(1)\n"
        f"print(pathlib.Path({str(secret)!r}).read_text().strip())\n"
    )
    return secret, runs, script


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def start(sidecar_factory, cluster: PgCluster, script: Path, **env: str):
    return sidecar_factory(
        upstream_dsn_for(cluster, user=ROLE, dbname="app"),
        env={
            "PGSIDECAR_AUTH_MODE": "configured",
            "PGSIDECAR_AUTH_PASSWORD_COMMAND": f"{sys.executable} {script}",
            "PGSIDECAR_RECONNECT_BACKOFF_MAX": "200ms",
            **env,
        },
    )


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def terminate(cluster: PgCluster, pid: int, sc: SidecarProcess | None = None, drops: int = 0) -> None:
    """End the backend, and wait until the sidecar has seen it go (its `drops`-th record), so the
    next query is not one sent into the dying connection (that one honestly gets 08007)."""
    assert cluster.terminate(pid)
    deadline = time.monotonic() + 10
    while pid in cluster.backend_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    if sc is not None:
        sc.wait_drops(drops)
    else:
        time.sleep(0.5)  # the reconnect cannot finish yet: give the sidecar time to see the close


def test_a_rotated_password_is_used_by_the_reconnect(cluster, sidecar_factory, tmp_path: Path) -> None:
    secret, run_log, script = password_script(tmp_path)
    secret.write_text("first-password\n")
    sc = start(sidecar_factory, cluster, script)
    conn = psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app sslmode=disable")
    conn.autocommit = True
    first = backend_pid(conn)
    assert runs(run_log) == 1
    # The secret store rotates the password: the server first, then what the command reads.
    cluster.sql(f"ALTER ROLE {ROLE} PASSWORD 'second-password'")
    secret.write_text("second-password\n")
    terminate(cluster, first, sc, 1)
    second = backend_pid(conn)  # the same client connection, on a new backend
    assert second != first
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == (ROLE,)
    assert runs(run_log) == 2  # one run per upstream connect: the login and the reconnect
    conn.close()
    logs = sc.logs()
    assert "first-password" not in logs and "second-password" not in logs
    drops = json.dumps(sc.drops())
    assert "first-password" not in drops and "second-password" not in drops


def test_a_failing_command_is_retried_and_logged_without_its_output(cluster, sidecar_factory, tmp_path: Path) -> None:
    cluster.sql(f"ALTER ROLE {ROLE} PASSWORD 'third-password'")
    secret, run_log, script = password_script(tmp_path)
    secret.write_text("third-password\n")
    sc = start(sidecar_factory, cluster, script)
    conn = psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app sslmode=disable")
    conn.autocommit = True
    first = backend_pid(conn)
    (tmp_path / "fail").write_text("")
    terminate(cluster, first)
    # The vault comes back after a while; meanwhile every reconnect attempt fails and is retried.
    healed = threading.Timer(2.0, (tmp_path / "fail").unlink)
    healed.start()
    try:
        started = time.monotonic()
        second = backend_pid(conn)  # held until a reconnect succeeds (within reconnect.deadline)
        waited = time.monotonic() - started
    finally:
        healed.cancel()
    assert second != first and waited >= 1.0
    assert runs(run_log) >= 3  # the login, failed attempts, the reconnect that worked
    logs = sc.logs()
    assert f"auth.password_command ({Path(sys.executable).name}) exited with status 1; stderr: vault: sealed" in logs
    assert "stdout-that-must-not-be-logged" not in logs and "third-password" not in logs
    conn.close()


def test_a_first_login_whose_command_fails_gets_a_fatal(cluster, sidecar_factory, tmp_path: Path) -> None:
    _, _, script = password_script(tmp_path)
    (tmp_path / "fail").write_text("")
    sc = start(sidecar_factory, cluster, script, PGSIDECAR_RECONNECT_DEADLINE="1s")
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app sslmode=disable connect_timeout=20")
    message = str(info.value)
    assert "could not reconnect within 1 s" in message
    assert f"auth: auth.password_command ({Path(sys.executable).name}) exited with status 1" in message
    assert "stdout-that-must-not-be-logged" not in message


# ---------------------------------------------------------------- auth.token: aws

FROZEN = "2026-01-02T03:04:05"  # the moment both the test and the sidecar sign for
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    # Temporary credentials (IRSA, ECS, SSO) add a session token: the RDS token passes 1,000 chars.
    "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjE" + "A" * 700,
    "AWS_REGION": "eu-central-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Loaded by the sidecar's interpreter at start (PYTHONPATH): botocore signs at FROZEN.
SITECUSTOMIZE = f"""
import datetime
import botocore.auth
_FROZEN = datetime.datetime.fromisoformat({FROZEN!r})
botocore.auth.get_current_datetime = lambda *args, **kwargs: _FROZEN
"""


@pytest.fixture
def frozen_botocore(monkeypatch: pytest.MonkeyPatch):
    import botocore.auth as botocore_auth

    # The freeze below patches botocore's clock: a botocore that reads it another way fails here.
    assert hasattr(botocore_auth, "get_current_datetime"), "botocore reads the clock another way"
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    from datetime import datetime

    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda *a, **k: datetime.fromisoformat(FROZEN))
    return botocore_auth


def test_aws_token_logs_in_as_a_role_whose_password_is_that_token(
    cluster, sidecar_factory, tmp_path: Path, frozen_botocore
) -> None:
    import botocore.session

    from pgsidecar.runtime.credentials import AwsRdsToken

    host, port = "localhost", cluster.port
    client = botocore.session.get_session().create_client("rds", region_name="eu-central-1")
    expected = client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername="iam_user", Region="eu-central-1")
    assert expected.startswith(f"{host}:{port}/?Action=connect&DBUser=iam_user&X-Amz-Algorithm=AWS4-HMAC-SHA256")
    assert "X-Amz-Date=20260102T030405Z" in expected and "X-Amz-Security-Token=" in expected
    assert len(expected) > 1000
    # pgsidecar's provider, in this process: botocore's own answer.
    import asyncio

    assert asyncio.run(AwsRdsToken("iam_user").password(host, port)) == expected

    cluster.sql("ALTER ROLE iam_user PASSWORD %s", (expected,))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    sc = sidecar_factory(
        upstream_dsn_for(cluster, user="iam_user", dbname="app"),
        env={**AWS_ENV, "PYTHONPATH": str(site), "PGSIDECAR_AUTH_MODE": "configured", "PGSIDECAR_AUTH_TOKEN": "aws"},
    )
    conn = psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=app dbname=app sslmode=disable")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert cur.fetchone() == ("iam_user", True)
    # A reconnect within the token's 10 minutes reuses it; the login works again.
    terminate(cluster, backend_pid(conn), sc, 1)
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("iam_user",)
    conn.close()
    logs = sc.logs()
    assert "X-Amz-Signature" not in logs and AWS_ENV["AWS_SESSION_TOKEN"] not in logs
    assert all("X-Amz" not in str(drop) for drop in sc.drops())
