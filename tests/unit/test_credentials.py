"""runtime/credentials.py: the upstream password fetched for every connect (static, a command,
an RDS / Cloud SQL / Entra ID token), and the brain taking it from ServerConnected.

The aws provider runs the real botocore. The gcp and azure providers cannot reach a cloud here,
so they are tested against fake modules put in sys.modules that follow the documented API
(google.auth.default + refresh, DefaultAzureCredential.get_token); the `test` extra installs the
real libraries too, and a smoke test checks that those names exist in them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from pgsidecar.config.model import AuthConfig, UpstreamTarget
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.phases import Phase
from pgsidecar.runtime import credentials as cr
from pgsidecar.runtime.upstream import ERROR_KINDS, UpstreamError
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from tests.playbook import FACTS_REPLY, Playbook, hello, to_server

PY = sys.executable
TARGET = UpstreamTarget(host="db.example.com", port=5432, user="svc")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- building the source


def test_the_source_follows_the_auth_config() -> None:
    assert cr.password_source(AuthConfig(), TARGET) is None  # passthrough: the client's own password
    assert cr.password_source(AuthConfig(mode="configured", user="svc"), UpstreamTarget(host="db")) is None
    static = cr.password_source(AuthConfig(mode="configured", user="svc", password="pw"), TARGET)
    assert isinstance(static, cr.StaticPassword) and run(static.password("db", 5432)) == "pw"
    assert "pw" not in repr(static)
    from_dsn = cr.password_source(AuthConfig(mode="configured", user="svc"), UpstreamTarget(host="db", password="d"))
    assert from_dsn is not None and run(from_dsn.password("db", 5432)) == "d"
    command = cr.password_source(
        AuthConfig(
            mode="configured",
            user="svc",
            password_command=("/bin/echo", "--secret-arg"),
            password_command_timeout_s=3.0,
            password_command_ttl_s=60.0,
        ),
        TARGET,
    )
    assert isinstance(command, cr.CommandPassword)
    assert (command.argv, command.timeout_s, command.ttl_s) == (("/bin/echo", "--secret-arg"), 3.0, 60.0)
    assert "--secret-arg" not in repr(command)
    aws = cr.password_source(AuthConfig(mode="configured", user="svc", token="aws", token_region="eu-west-1"), TARGET)
    assert isinstance(aws, cr.AwsRdsToken) and (aws.user, aws.region) == ("svc", "eu-west-1")
    assert isinstance(cr.password_source(AuthConfig(mode="configured", user="svc", token="gcp"), TARGET), cr.GcpToken)
    azure = cr.password_source(AuthConfig(mode="configured", user="svc", token="azure"), TARGET)
    assert isinstance(azure, cr.AzureToken)


def test_auth_is_a_connect_error_kind_and_the_event_hides_the_password() -> None:
    assert "auth" in ERROR_KINDS
    assert UpstreamError("auth", "auth.password_command (x) exited with status 1").kind == "auth"
    event = ev.ServerConnected(1.0, 2.0, "10.0.0.5", True, None, password="hunter2-token")
    assert "hunter2" not in repr(event) and event.password == "hunter2-token"
    assert ev.ServerConnected(1.0, 2.0, "10.0.0.5", True, None).password is None


# ---------------------------------------------------------------- auth.password_command


def script(tmp_path: Path, body: str) -> tuple[str, ...]:
    path = tmp_path / "pw.py"
    path.write_text(body)
    return (PY, str(path))


def test_command_stdout_is_the_password_trailing_newline_stripped(tmp_path: Path) -> None:
    argv = script(tmp_path, "print('  pass word\\t')")
    assert run(cr.CommandPassword(argv).password("db", 5432)) == "  pass word\t"
    crlf = script(tmp_path, "import sys; sys.stdout.write('x\\r\\n')")
    assert run(cr.CommandPassword(crlf).password("db", 5432)) == "x"


def test_a_long_password_comes_through_whole(tmp_path: Path) -> None:
    argv = script(tmp_path, "print('p' * 4096)")
    assert run(cr.CommandPassword(argv).password("db", 5432)) == "p" * 4096


def test_ttl_zero_runs_the_command_for_every_connect(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    argv = script(
        tmp_path,
        f"import pathlib; p = pathlib.Path({str(counter)!r}); n = int(p.read_text() if p.exists() else 0) + 1\n"
        "p.write_text(str(n)); print(f'pw-{n}')",
    )
    source = cr.CommandPassword(argv)

    async def three() -> list[str]:
        return [await source.password("db", 5432) for _ in range(3)]

    assert run(three()) == ["pw-1", "pw-2", "pw-3"]


def test_ttl_caches_the_answer_and_concurrent_connects_share_one_run(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    argv = script(
        tmp_path,
        f"import pathlib, time; p = pathlib.Path({str(counter)!r}); n = int(p.read_text() if p.exists() else 0) + 1\n"
        "p.write_text(str(n)); time.sleep(0.2); print(f'pw-{n}')",
    )
    clock = Clock(100.0)
    source = cr.CommandPassword(argv, ttl_s=30.0, clock=clock)

    async def many() -> list[str]:
        return list(await asyncio.gather(*(source.password("db", 5432) for _ in range(5))))

    assert run(many()) == ["pw-1"] * 5
    clock.now += 29.0
    assert run(source.password("db", 5432)) == "pw-1"
    clock.now += 1.0
    assert run(source.password("db", 5432)) == "pw-2"


def test_a_failing_command_logs_stderr_and_status_never_stdout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = script(
        tmp_path, "import sys; print('the-secret-output'); sys.stderr.write('vault: permission denied\\n'); sys.exit(3)"
    )
    with caplog.at_level(logging.WARNING, logger="pgsidecar.credentials"):
        with pytest.raises(cr.CredentialError) as info:
            run(cr.CommandPassword(argv).password("db", 5432))
    assert str(info.value) == f"auth.password_command ({Path(PY).name}) exited with status 3"
    assert "vault: permission denied" in caplog.text and "status 3" in caplog.text
    assert "the-secret-output" not in caplog.text and "the-secret-output" not in str(info.value)


def test_stderr_is_truncated_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = script(tmp_path, "import sys; sys.stderr.write('e' * 5000); sys.exit(1)")
    with caplog.at_level(logging.WARNING, logger="pgsidecar.credentials"), pytest.raises(cr.CredentialError):
        run(cr.CommandPassword(argv).password("db", 5432))
    assert "e" * cr.STDERR_LOG_CHARS + "..." in caplog.text and "e" * (cr.STDERR_LOG_CHARS + 1) not in caplog.text


def test_empty_output_is_a_failure(tmp_path: Path) -> None:
    with pytest.raises(cr.CredentialError, match="printed no password"):
        run(cr.CommandPassword(script(tmp_path, "print()")).password("db", 5432))


def test_a_missing_program_is_a_failure() -> None:
    with pytest.raises(cr.CredentialError, match=r"\(no-such-program\) could not start"):
        run(cr.CommandPassword(("/nonexistent/no-such-program",)).password("db", 5432))


def test_a_command_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(60)",
    )
    started = time.monotonic()
    with pytest.raises(cr.CredentialError, match=r"timed out after 0\.5s and was killed"):
        run(cr.CommandPassword(argv, timeout_s=0.5).password("db", 5432))
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "zombie" not in _state(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "zombie" in _state(child)


def test_a_cancelled_connect_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    argv = script(tmp_path, f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")

    async def go() -> None:
        task = asyncio.ensure_future(cr.CommandPassword(argv).password("db", 5432))
        while not pidfile.exists() or not pidfile.read_text():  # noqa: ASYNC110 - a file, no event to wait on
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert not Path(f"/proc/{int(pidfile.read_text())}").exists()


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return "gone zombie"


# ---------------------------------------------------------------- aws (real botocore)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fixed credentials, no shared files, no instance metadata: botocore's chain finds the env."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def botocore_token(host: str, port: int, user: str, region: str) -> str:
    import botocore.session as botocore_session

    client = botocore_session.get_session().create_client("rds", region_name=region)
    return str(client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=user, Region=region))


def amz_date(token: str) -> str:
    return parse_qs(urlsplit("https://" + token).query)["X-Amz-Date"][0]


@pytest.mark.usefixtures("aws_env")
def test_aws_token_is_botocores_own() -> None:
    for _ in range(5):  # the signature covers the second it was made: compare within one second
        token = run(cr.AwsRdsToken("iam_user", "eu-west-1").password("db.example.com", 5432))
        expected = botocore_token("db.example.com", 5432, "iam_user", "eu-west-1")
        if amz_date(token) == amz_date(expected):
            break
    assert token == expected
    url = urlsplit("https://" + token)
    query = parse_qs(url.query)
    assert (url.hostname, url.port, url.path) == ("db.example.com", 5432, "/")
    assert query["Action"] == ["connect"] and query["DBUser"] == ["iam_user"]
    assert (
        query["X-Amz-Credential"][0].startswith("AKIDEXAMPLE/") and "/eu-west-1/rds-db/" in query["X-Amz-Credential"][0]
    )
    assert query["X-Amz-Expires"] == ["900"]


@pytest.mark.usefixtures("aws_env")
def test_aws_region_from_aws_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    token = run(cr.AwsRdsToken("u").password("db.example.com", 5432))
    assert "/ap-south-1/rds-db/" in parse_qs(urlsplit("https://" + token).query)["X-Amz-Credential"][0]


@pytest.mark.usefixtures("aws_env")
def test_aws_without_a_region_fails_the_connect_clearly() -> None:
    with pytest.raises(cr.CredentialError, match=r"no region: set auth\.token_region, AWS_REGION"):
        run(cr.AwsRdsToken("u").password("db.example.com", 5432))


@pytest.mark.usefixtures("aws_env")
def test_aws_without_credentials_fails_without_leaking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(cr.CredentialError, match=r"auth\.token aws: no token: NoCredentialsError"):
        run(cr.AwsRdsToken("u", "us-east-1").password("db.example.com", 5432))


@pytest.mark.usefixtures("aws_env")
def test_aws_token_reused_for_ten_minutes_per_host() -> None:
    clock = Clock(time.time())
    source = cr.AwsRdsToken("u", "us-east-1", clock=clock)
    minted: list[str] = []
    mint = source._mint

    def counting(host: str, port: int) -> tuple[str, float]:
        minted.append(host)
        return mint(host, port)

    source._mint = counting  # type: ignore[method-assign]

    async def go() -> tuple[str, ...]:
        first = await source.password("a.example.com", 5432)
        again = await source.password("a.example.com", 5432)
        other = await source.password("b.example.com", 5432)
        clock.now += cr.AWS_TOKEN_REUSE_S - 1
        still = await source.password("a.example.com", 5432)
        clock.now += 1
        await source.password("a.example.com", 5432)
        return first, again, other, still

    first, again, other, still = run(go())
    assert first == again == still
    assert minted == ["a.example.com", "b.example.com", "a.example.com"]
    assert other.startswith("b.example.com:5432/") and first.startswith("a.example.com:5432/")


def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore", None)
    monkeypatch.setitem(sys.modules, "botocore.session", None)
    with pytest.raises(cr.CredentialError, match=r"botocore is not installed: pip install 'pgsidecar\[aws\]'"):
        run(cr.AwsRdsToken("u", "us-east-1").password("db", 5432))
    monkeypatch.setitem(sys.modules, "google.auth", None)
    with pytest.raises(cr.CredentialError, match=r"pip install 'pgsidecar\[gcp\]'"):
        run(cr.GcpToken().password("db", 5432))
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    with pytest.raises(cr.CredentialError, match=r"pip install 'pgsidecar\[azure\]'"):
        run(cr.AzureToken().password("db", 5432))


# ---------------------------------------------------------------- gcp and azure (fake modules)


class FakeGoogle:
    """google.auth.default(scopes=...) -> (credentials, project); credentials.refresh(Request())
    sets .token and .expiry (a naive UTC datetime), as google-auth documents."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, lifetime: timedelta, delay_s: float = 0.0) -> None:
        self.scopes: list[list[str]] = []
        self.refreshes = 0
        self.threads: set[str] = set()
        fake = self

        class Credentials:
            token: str | None = None
            expiry: datetime | None = None

            def refresh(self, request: object) -> None:
                import threading

                assert isinstance(request, Request)
                time.sleep(delay_s)
                fake.refreshes += 1
                fake.threads.add(threading.current_thread().name)
                self.token = f"ya29.token-{fake.refreshes}"
                self.expiry = datetime.now(UTC).replace(tzinfo=None) + lifetime

        class Request:
            pass

        def default(scopes: list[str] | None = None) -> tuple[Credentials, str]:
            fake.scopes.append(list(scopes or []))
            return Credentials(), "project-1"

        google = types.ModuleType("google")
        auth = types.ModuleType("google.auth")
        transport = types.ModuleType("google.auth.transport")
        requests = types.ModuleType("google.auth.transport.requests")
        auth.default = default  # type: ignore[attr-defined]
        requests.Request = Request  # type: ignore[attr-defined]
        google.auth = auth  # type: ignore[attr-defined]
        auth.transport = transport  # type: ignore[attr-defined]
        transport.requests = requests  # type: ignore[attr-defined]
        for name, module in (
            ("google", google),
            ("google.auth", auth),
            ("google.auth.transport", transport),
            ("google.auth.transport.requests", requests),
        ):
            monkeypatch.setitem(sys.modules, name, module)


def test_gcp_token_from_default_credentials_cached_until_five_minutes_before_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeGoogle(monkeypatch, lifetime=timedelta(hours=1))
    clock = Clock(time.time())
    source = cr.GcpToken(clock=clock)
    assert run(source.password("10.1.2.3", 5432)) == "ya29.token-1"
    assert fake.scopes == [["https://www.googleapis.com/auth/sqlservice.login"]]
    clock.now += 3600 - cr.TOKEN_EXPIRY_MARGIN_S - 10
    assert run(source.password("10.1.2.3", 5432)) == "ya29.token-1"
    clock.now += 20
    assert run(source.password("10.1.2.3", 5432)) == "ya29.token-2"
    assert fake.scopes == [["https://www.googleapis.com/auth/sqlservice.login"]]  # default() once
    assert fake.refreshes == 2


def test_provider_calls_run_in_a_thread_not_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGoogle(monkeypatch, lifetime=timedelta(hours=1), delay_s=0.3)
    source = cr.GcpToken()

    async def go() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        tokens = await asyncio.gather(*(source.password("db", 5432) for _ in range(3)))
        task.cancel()
        assert list(tokens) == ["ya29.token-1"] * 3  # one mint served the three connects
        return ticks

    assert run(go()) >= 10  # the loop kept running during the 0.3 s refresh
    assert fake.refreshes == 1 and "MainThread" not in fake.threads


def test_gcp_errors_fail_the_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeGoogle(monkeypatch, lifetime=timedelta(hours=1))

    def default(scopes: list[str] | None = None) -> None:
        raise RuntimeError("Your default credentials were not found.")

    monkeypatch.setattr(sys.modules["google.auth"], "default", default)
    with pytest.raises(cr.CredentialError, match=r"auth\.token gcp: no token: RuntimeError: Your default credentials"):
        run(cr.GcpToken().password("db", 5432))


class FakeAzure:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, lifetime_s: float) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.created = 0
        fake = self

        class AccessToken(tuple):  # azure.core.credentials.AccessToken: (token, expires_on)
            @property
            def token(self) -> str:
                return str(self[0])

            @property
            def expires_on(self) -> int:
                return int(self[1])

        class DefaultAzureCredential:
            def __init__(self) -> None:
                fake.created += 1

            def get_token(self, *scopes: str) -> AccessToken:
                fake.scopes.append(scopes)
                return AccessToken((f"eyJ.token-{len(fake.scopes)}", int(time.time() + lifetime_s)))

        azure = types.ModuleType("azure")
        identity = types.ModuleType("azure.identity")
        identity.DefaultAzureCredential = DefaultAzureCredential  # type: ignore[attr-defined]
        azure.identity = identity  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "azure", azure)
        monkeypatch.setitem(sys.modules, "azure.identity", identity)


def test_azure_token_for_the_flexible_server_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeAzure(monkeypatch, lifetime_s=3600)
    clock = Clock(time.time())
    source = cr.AzureToken(clock=clock)
    assert run(source.password("srv.postgres.database.azure.com", 5432)) == "eyJ.token-1"
    assert fake.scopes == [("https://ossrdbms-aad.database.windows.net/.default",)]
    clock.now += 3600 - cr.TOKEN_EXPIRY_MARGIN_S - 30
    assert run(source.password("srv.postgres.database.azure.com", 5432)) == "eyJ.token-1"
    clock.now += 60
    assert run(source.password("srv.postgres.database.azure.com", 5432)) == "eyJ.token-2"
    assert fake.created == 1


def test_the_real_gcp_and_azure_libraries_have_the_names_used() -> None:
    """The `test` extra installs both libraries so this runs everywhere (no cloud call)."""
    import azure.identity as identity
    import google.auth as google_auth
    import google.auth.transport.requests as google_requests

    assert callable(google_auth.default) and callable(google_requests.Request)
    assert callable(identity.DefaultAzureCredential.get_token)
    from azure.core.credentials import AccessToken

    assert AccessToken("t", 1).expires_on == 1


# ---------------------------------------------------------------- the brain takes the fetched password


def _login_with(pb: Playbook, password: str | None) -> bytes:
    """One upstream login whose connect fetched `password`; what the brain answered the
    server's cleartext password request with."""
    facts: ev.ConnectionFacts = {"address": "10.0.0.5", "host": "db"}
    out = pb.handle(ev.ServerConnected(pb._tick(), 1.7e9, "10.0.0.5", True, None, facts=facts, password=password))
    assert b"svc" in to_server(out)  # the configured user's StartupMessage
    answer = to_server(pb.server(be.AuthenticationCleartextPassword().encode()))
    pb.server(hello())
    pb.server(FACTS_REPLY)
    assert pb.conn.phase is Phase.RELAYING
    return answer


def _drop(pb: Playbook) -> None:
    out = pb.server_closed()
    while not any(isinstance(c, cmd.OpenServer) for c in out):
        out = pb.timer("backoff")


def test_the_brain_logs_in_with_the_password_of_each_connect() -> None:
    pb = Playbook(upstream_user="svc", upstream_password="stale-config-password", upstream_dbname="app")
    assert pb.client_connected() == [cmd.SetTimer("startup", 10.0)]
    out = pb.client(fe.StartupMessage({"user": "whoever", "database": "x"}).encode())
    assert any(isinstance(c, cmd.OpenServer) for c in out), out
    assert _login_with(pb, "token-1") == fe.PasswordMessage(b"token-1").encode()
    _drop(pb)
    assert _login_with(pb, "token-2") == fe.PasswordMessage(b"token-2").encode()
    _drop(pb)
    # A connect that fetched nothing (a session opened before a reload): the last one serves.
    assert _login_with(pb, None) == fe.PasswordMessage(b"token-2").encode()


def test_without_a_fetched_password_the_configured_one_is_used() -> None:
    pb = Playbook(upstream_user="svc", upstream_password="config-password", upstream_dbname="app")
    pb.client_connected()
    pb.client(fe.StartupMessage({"user": "whoever", "database": "x"}).encode())
    assert _login_with(pb, None) == fe.PasswordMessage(b"config-password").encode()
