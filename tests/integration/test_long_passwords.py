"""A 2,048-character password through the sidecar against the real server, for each way the
server asks for it: cleartext (`password`), md5 and SCRAM-SHA-256 (tests/fixtures/postgres.py's
hba: app_plain -> password, app_md5 -> md5, every other role -> scram-sha-256; all over TLS).
Cloud IAM tokens are this long (an RDS token with a session token passes 1,000 characters)."""

from __future__ import annotations

import secrets
import string
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.fixtures.postgres import PgCluster
from tests.fixtures.sidecar import upstream_dsn_for

pytestmark = pytest.mark.server

LENGTH = 2048
# Printable and awkward: spaces, quotes, backslashes, conninfo's own separators.
ALPHABET = string.ascii_letters + string.digits + " !#$%&()*+,-./:;<=>?@[]^_{|}~'\"\\"

# (role, pg_hba method, password_encryption for the stored verifier)
METHODS = [
    ("app_plain", "password", "scram-sha-256"),
    ("app_md5", "md5", "md5"),
    ("app", "scram-sha-256", "scram-sha-256"),
]


def long_password() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


@pytest.fixture(scope="module")
def cluster(pg_factory) -> Iterator[tuple[PgCluster, dict[str, str]]]:
    """A private cluster (the shared one's roles keep their passwords) whose three roles have
    2,048-character passwords, stored as each method needs."""
    cluster = pg_factory()
    passwords = {role: long_password() for role, _, _ in METHODS}
    for role, _, encryption in METHODS:
        cluster.sql(
            f"SET password_encryption = '{encryption}'; ALTER ROLE {role} PASSWORD %s; RESET password_encryption",
            (passwords[role],),
        )
        stored = cluster.sql("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))[0][0]
        assert stored.startswith("md5" if encryption == "md5" else "SCRAM-SHA-256$")
    yield cluster, passwords


def conninfo_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check(conn: psycopg2.extensions.connection, role: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, length(repeat('x', 2048))")
        assert cur.fetchone() == (role, LENGTH)
    conn.close()


def log_size(cluster: PgCluster) -> int:
    return Path(cluster.log_path).stat().st_size


def authenticated_with(cluster: PgCluster, since: int, role: str, method: str) -> bool:
    """PostgreSQL 14+ logs `connection authenticated: identity="..." method=...` (log_connections):
    a login since the log had `since` bytes used `method`."""
    with open(cluster.log_path, "rb") as handle:
        handle.seek(since)
        return f'identity="{role}" method={method}'.encode() in handle.read()


@pytest.mark.parametrize(("role", "method", "encryption"), METHODS)
def test_passthrough_with_a_2048_character_password(cluster, sidecar_factory, role, method, encryption) -> None:
    pg, passwords = cluster
    password = passwords[role]
    assert len(password) == LENGTH
    sc = sidecar_factory(upstream_dsn_for(pg))
    mark = log_size(pg)
    conn = psycopg2.connect(
        f"host=127.0.0.1 port={sc.port} user={role} dbname=app sslmode=disable password={conninfo_quote(password)}"
    )
    check(conn, role)
    assert authenticated_with(pg, mark, role, method)
    assert password not in sc.logs()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            f"host=127.0.0.1 port={sc.port} user={role} dbname=app sslmode=disable "
            f"password={conninfo_quote(password[:-1] + ('x' if password[-1] != 'x' else 'y'))}"
        )


@pytest.mark.parametrize(("role", "method", "encryption"), METHODS)
def test_configured_with_a_2048_character_password(cluster, sidecar_factory, role, method, encryption) -> None:
    pg, passwords = cluster
    password = passwords[role]
    sc = sidecar_factory(
        upstream_dsn_for(pg, user=role, dbname="app"),
        env={"PGSIDECAR_AUTH_MODE": "configured", "PGSIDECAR_AUTH_PASSWORD": password},
    )
    mark = log_size(pg)
    check(psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=whoever dbname=x sslmode=disable"), role)
    assert authenticated_with(pg, mark, role, method)
    assert password not in sc.logs()


@pytest.mark.parametrize(("role", "method", "encryption"), METHODS)
def test_password_command_with_a_2048_character_password(
    cluster, sidecar_factory, tmp_path: Path, role, method, encryption
) -> None:
    pg, passwords = cluster
    password = passwords[role]
    secret = tmp_path / "secret"
    secret.write_text(password + "\n")
    script = tmp_path / "get-password.py"
    script.write_text(f"import sys; sys.stdout.write(open({str(secret)!r}).read())\n")
    sc = sidecar_factory(
        upstream_dsn_for(pg, user=role, dbname="app"),
        config_yaml=f"auth:\n  mode: configured\n  password_command: [{sys.executable!r}, {str(script)!r}]\n",
    )
    mark = log_size(pg)
    check(psycopg2.connect(f"host=127.0.0.1 port={sc.port} user=whoever dbname=x sslmode=disable"), role)
    assert authenticated_with(pg, mark, role, method)
    assert password not in sc.logs()
