"""load_config: layers and precedence, value syntax, every error kind, the shipped YAML."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pgsidecar.config import (
    CONFIG_KEYS,
    AuthConfig,
    Config,
    ConfigError,
    KeepaliveConfig,
    ListenConfig,
    SslMode,
    UpstreamConfig,
    UpstreamTarget,
    env_name,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)
from pgsidecar.config.load import unknown_env, unknown_env_warning
from pgsidecar.config.model import FALLBACK_BACKLOG, SOMAXCONN_PATH, kernel_somaxconn

SHIPPED_YAML = Path(__file__).resolve().parents[2] / "config" / "pgsidecar.yaml"
UPSTREAM = {"PGHOST": "db"}


def defaults(host: str = "db") -> Config:
    return Config(upstream=UpstreamConfig(target=UpstreamTarget(host=host)))


def load(
    yaml_text: str | None = None,
    *,
    tmp_path: Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: str,
) -> Config:
    """Load with a YAML document (written to a file), env and dotted-key overrides."""
    path = None
    if yaml_text is not None:
        assert tmp_path is not None
        file = tmp_path / "pgsidecar.yaml"
        file.write_text(textwrap.dedent(yaml_text))
        path = str(file)
    return load_config(path=path, env={**UPSTREAM, **(env or {})}, overrides=_dotted(overrides))


def _dotted(overrides: dict[str, str]) -> dict[str, str]:
    return {k.replace("__", "."): v for k, v in overrides.items()}


def load_error(yaml_text: str | None = None, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(yaml_text, **kwargs)
    return info.value


def override_error(key: str, value: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path=None, env={**UPSTREAM, **(env or {})}, overrides={key: value})
    return info.value


# ---------------------------------------------------------------- defaults and model


def test_defaults_with_only_pghost() -> None:
    config = load_config(path=None, env=UPSTREAM, overrides={})
    assert config == defaults()
    assert config.listen.port == 6432 and config.listen.tls is True
    assert config.metrics.listen == "127.0.0.1:9188"
    assert config.drop_log.path is None


def test_keepalive_user_timeout_is_derived_unless_set() -> None:
    assert KeepaliveConfig().effective_user_timeout_s == 24.5
    assert KeepaliveConfig(idle_s=20, interval_s=2, count=5).effective_user_timeout_s == 29.5
    assert KeepaliveConfig(user_timeout_s=7.0).effective_user_timeout_s == 7.0


def test_secrets_never_in_repr() -> None:
    config = load_config(
        path=None,
        env={"PGSIDECAR_AUTH_CLIENT_PASSWORD": "clientpw1", "PGSIDECAR_AUTH_CLIENT_AUTH": "scram"},
        overrides={
            "upstream.dsn": "postgresql://app:dsnpw1@db/app",
            "auth.mode": "configured",
            "auth.password": "authpw1",
        },
    )
    assert config.upstream.target.password == "dsnpw1"
    assert config.auth.password == "authpw1"
    assert config.auth.client_password == "clientpw1"
    shown = repr(config) + str(config) + config.upstream.target.redacted()
    for secret in ("dsnpw1", "authpw1", "clientpw1"):
        assert secret not in shown


# ---------------------------------------------------------------- precedence


def test_precedence_all_four_layers(tmp_path: Path) -> None:
    file = "listen:\n  port: 1111\n"
    env = {"PGSIDECAR_LISTEN_PORT": "2222"}
    assert load(file, tmp_path=tmp_path, env=env, listen__port="3333").listen.port == 3333
    assert load(file, tmp_path=tmp_path, env=env).listen.port == 2222
    assert load(file, tmp_path=tmp_path).listen.port == 1111
    assert load().listen.port == 6432


def test_layers_merge_key_by_key(tmp_path: Path) -> None:
    file = "listen:\n  port: 1111\n  host: 0.0.0.0\nlog:\n  level: debug\n"
    config = load(file, tmp_path=tmp_path, env={"PGSIDECAR_LOG_LEVEL": "error"}, listen__port="5")
    assert (config.listen.host, config.listen.port, config.log.level) == ("0.0.0.0", 5, "error")


def test_config_path_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "from-env.yaml"
    file.write_text("listen:\n  port: 4444\n")
    other = tmp_path / "explicit.yaml"
    other.write_text("listen:\n  port: 5555\n")
    env = {**UPSTREAM, "PGSIDECAR_CONFIG": str(file)}
    assert load_config(path=None, env=env, overrides={}).listen.port == 4444
    assert load_config(path=str(other), env=env, overrides={}).listen.port == 5555


def test_every_key_has_a_working_environment_twin() -> None:
    names = {env_name(key) for key in CONFIG_KEYS}
    assert len(names) == len(CONFIG_KEYS)
    assert env_name("upstream.keepalive.idle") == "PGSIDECAR_UPSTREAM_KEEPALIVE_IDLE"
    assert env_name("listen.port") == "PGSIDECAR_LISTEN_PORT"
    config = load(env={"PGSIDECAR_UPSTREAM_KEEPALIVE_IDLE": "3s", "PGSIDECAR_SIDECAR_ID": "pod-7"})
    assert config.upstream.keepalive.idle_s == 3.0 and config.sidecar_id == "pod-7"


def test_empty_environment_variable_counts_as_unset() -> None:
    assert load(env={"PGSIDECAR_LISTEN_PORT": ""}).listen.port == 6432


def test_upstream_dsn_from_each_layer(tmp_path: Path) -> None:
    file = "upstream:\n  dsn: postgresql://filehost/app\n"
    assert load(file, tmp_path=tmp_path).upstream.target.host == "filehost"
    env = {"PGSIDECAR_UPSTREAM_DSN": "host=envhost"}
    assert load(file, tmp_path=tmp_path, env=env).upstream.target.host == "envhost"
    config = load(file, tmp_path=tmp_path, env=env, upstream__dsn="host=flaghost")
    assert config.upstream.target.host == "flaghost"


def test_pg_variables_fill_what_the_dsn_leaves_out() -> None:
    env = {"PGPORT": "7000", "PGUSER": "envuser", "PGSSLMODE": "require", "PGHOST": "envhost"}
    config = load(env=env, upstream__dsn="host=dsnhost user=dsnuser")
    target = config.upstream.target
    assert (target.host, target.port, target.user) == ("dsnhost", 7000, "dsnuser")
    assert target.sslmode is SslMode.REQUIRE


def test_pghost_alone_is_an_upstream() -> None:
    config = load_config(path=None, env={"PGHOST": "/var/run/postgresql"}, overrides={})
    assert config.upstream.target.host == "/var/run/postgresql"


def test_no_upstream_at_all() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path=None, env={}, overrides={})
    assert info.value.key == "upstream.dsn"
    assert str(info.value) == ("config: upstream.dsn: no upstream: set upstream.dsn, --upstream or PGHOST")


# ---------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        (" 3 s ", 3.0),
        (10, 10.0),
        (0.5, 0.5),
        ("0", 0.0),
    ],
)
def test_duration_syntax(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "10x", "", "s", "-1s", "10 S", "1d", True, [1], -3])
def test_duration_errors(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration like 10s, 250ms, 5m"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("24H", 86400.0),
        ("5min", 300.0),
        ("250ms", 0.25),
        ("45", 45.0),
        (" 3 h ", 10800.0),
    ],
)
def test_duration_window_syntax(text: str, seconds: float) -> None:
    """`pgsidecar drops --since` reads the same syntax, plus days, weeks and sums of parts."""
    assert parse_duration(text, window=True) == seconds


@pytest.mark.parametrize("text", ["", "2025-11-26", "1h 30m", "-5m", "10x", "h"])
def test_duration_window_errors(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text, window=True)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64kB", 65536),
        ("64KB", 65536),
        ("1MB", 1 << 20),
        ("1GB", 1 << 30),
        ("1TB", 1 << 40),
        ("100", 100),
        ("100B", 100),
        ("1.5kB", 1536),
        (4096, 4096),
    ],
)
def test_size_syntax(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1XB", "-5", "", "kB", "1 MiB", False])
def test_size_errors(text: Any) -> None:
    with pytest.raises(ValueError, match="expected a size like 64kB, 1MB, 1GB"):
        parse_size(text)


@given(st.integers(0, 10**9))
def test_duration_round_trip_milliseconds(millis: int) -> None:
    seconds = parse_duration(f"{millis}ms")
    assert seconds == millis / 1000
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(0, 1e7, allow_nan=False, allow_infinity=False))
def test_duration_round_trip_any_seconds(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_size_must_be_whole_bytes() -> None:
    assert parse_size("0.5kB") == 512
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size("1.5")


@given(st.integers(0, 1 << 45))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size
    assert parse_size(f"{size}kB") == size * 1024


def test_format_picks_the_largest_exact_unit() -> None:
    assert [format_duration(s) for s in (3600, 90, 10, 0.25)] == ["1h", "90s", "10s", "250ms"]
    assert format_duration(120) == "2m"
    assert [format_size(n) for n in (65536, 1 << 20, 1000)] == ["64kB", "1MB", "1000B"]


def test_values_in_yaml_and_strings(tmp_path: Path) -> None:
    file = """
        upstream:
          keepalive: {idle: 30, interval: 500ms, count: 9, user_timeout: 1m}
          check_after_idle: 5m
        relay: {high_water: 1MB, low_water: 1024}
        reconnect: {deadline: 0, max_buffered: 0}
    """
    config = load(file, tmp_path=tmp_path)
    assert config.upstream.keepalive == KeepaliveConfig(30.0, 0.5, 9, 60.0)
    assert config.upstream.check_after_idle_s == 300.0
    assert (config.relay.high_water_bytes, config.relay.low_water_bytes) == (1 << 20, 1024)
    assert (config.reconnect.deadline_s, config.reconnect.max_buffered_bytes) == (0.0, 0)


@pytest.mark.parametrize("off", ["off", "0", "0s", "none"])
def test_optional_duration_off_is_none(off: str) -> None:
    assert load(upstream__check_after_idle=off).upstream.check_after_idle_s is None


def test_optional_duration_off_in_yaml(tmp_path: Path) -> None:
    config = load("upstream:\n  check_after_idle: off\n", tmp_path=tmp_path)
    assert config.upstream.check_after_idle_s is None


def test_user_timeout_cannot_be_zero() -> None:
    err = override_error("upstream.keepalive.user_timeout", "0")
    assert err.key == "upstream.keepalive.user_timeout" and "derive" in err.problem


@pytest.mark.parametrize(
    ("word", "value"),
    [("true", True), ("on", True), ("yes", True), ("1", True), ("require", True)]  # noqa: RUF005 - true, then false
    + [("false", False), ("OFF", False), ("no", False), ("0", False), ("disable", False)],
)
def test_listen_tls_words(word: str, value: bool) -> None:
    assert load(listen__tls=word).listen.tls is value


def test_yaml_booleans(tmp_path: Path) -> None:
    assert load("listen:\n  tls: off\n", tmp_path=tmp_path).listen.tls is False


def test_metrics_listen_and_drop_log_path() -> None:
    assert load(metrics__listen="none").metrics.listen is None
    assert load(metrics__listen="[::1]:9100").metrics.listen == "[::1]:9100"
    assert load(metrics__listen="0.0.0.0:0").metrics.listen == "0.0.0.0:0"
    assert load(drop_log__path="-").drop_log.path == "-"
    assert load(drop_log__path="off").drop_log.path is None
    assert load(drop_log__path="/var/log/drops.jsonl").drop_log.path == "/var/log/drops.jsonl"


def test_choices_are_case_insensitive() -> None:
    assert load(log__format="JSON").log.format == "json"


def test_port_zero_lets_the_os_choose() -> None:
    assert load(listen__port="0").listen.port == 0


# ---------------------------------------------------------------- errors, each naming the key


def test_error_str_is_one_line_with_key_path() -> None:
    err = override_error("upstream.keepalive.idle", "abc")
    assert (err.key, err.problem) == (
        "upstream.keepalive.idle",
        "expected a duration like 10s, 250ms, 5m; got 'abc'",
    )
    assert str(err) == ("config: upstream.keepalive.idle: expected a duration like 10s, 250ms, 5m; got 'abc'")


def test_unknown_nested_yaml_key_suggests_closest(tmp_path: Path) -> None:
    err = load_error("upstream:\n  keepalive:\n    idel: 5s\n", tmp_path=tmp_path)
    assert err.key == "upstream.keepalive.idel"
    assert err.problem == "unknown setting; did you mean upstream.keepalive.idle?"


def test_unknown_yaml_section(tmp_path: Path) -> None:
    err = load_error("listn:\n  port: 1\n", tmp_path=tmp_path)
    assert err.key == "listn" and "did you mean listen?" in err.problem


def test_unknown_key_with_unit_suffix_points_to_the_yaml_spelling(tmp_path: Path) -> None:
    err = load_error("listen:\n  startup_timeout_s: 5\n", tmp_path=tmp_path)
    assert err.key == "listen.startup_timeout_s" and "listen.startup_timeout" in err.problem


def test_unknown_environment_variable_is_ignored_but_a_typo_gets_a_hint() -> None:
    env = {"PGSIDECAR_LISTEN_PROT": "1"}
    assert load(env=env) == defaults()
    warning = unknown_env_warning({**UPSTREAM, **env})
    assert warning is not None
    assert warning.endswith(": PGSIDECAR_LISTEN_PROT (did you mean PGSIDECAR_LISTEN_PORT?)")


def test_unknown_override_key() -> None:
    err = override_error("listen.prot", "1")
    assert err.key == "listen.prot" and "did you mean listen.port?" in err.problem


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    err = load_error("listen: 5\n", tmp_path=tmp_path)
    assert err.key == "listen" and "mapping" in err.problem


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    err = load_error("- a\n- b\n", tmp_path=tmp_path)
    assert err.key == "config"


def test_empty_file_and_empty_section_are_defaults(tmp_path: Path) -> None:
    assert load("", tmp_path=tmp_path) == defaults()
    assert load("listen:\nlog:\n", tmp_path=tmp_path) == defaults()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("listen.port", "http", "expected a port number; got 'http'"),
        ("listen.max_clients", "many", "expected an integer; got 'many'"),
        ("listen.max_clients", "0", "must be at least 1; got '0'"),
        ("listen.tls", "maybe", "expected a boolean"),
        ("listen.unix_socket_dir", "run/pg", "expected an absolute directory path"),
        ("listen.max_message_size", "3GB", "must be between 1024 and 2147483647 bytes"),
        ("listen.startup_timeout", "0", "must be more than 0"),
        ("relay.high_water", "lots", "expected a size like 64kB, 1MB, 1GB"),
        ("metrics.listen", "9188", "expected host:port"),
        ("drop_log.backups", "-1", "must be at least 0"),
        ("upstream.keepalive.count", "1.5", "expected an integer"),
        ("listen.backlog", "0", "must be between 1 and 2147483647; got '0'"),
        ("listen.backlog", "2147483648", "must be between 1 and 2147483647"),
        ("listen.backlog", "lots", "expected an integer; got 'lots'"),
    ],
)
def test_wrong_values(key: str, value: str, problem: str) -> None:
    err = override_error(key, value)
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"config: {key}: ")


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("auth.mode", "passthrough, configured"),
        ("auth.client_auth", "trust, scram"),
        ("reconnect.on_transaction_loss", "error, close"),
        ("log.format", "auto, json, text"),
        ("log.level", "debug, info, warning, error, critical"),
    ],
)
def test_enum_value_lists_allowed(key: str, allowed: str) -> None:
    err = override_error(key, "bogus")
    assert err.key == key
    assert err.problem == f"expected one of: {allowed}; got 'bogus'"


@pytest.mark.parametrize("port", ["65536", "-1", "100000"])
def test_port_out_of_range(port: str) -> None:
    err = override_error("listen.port", port)
    assert err.key == "listen.port" and "port out of range" in err.problem


def test_yaml_type_mismatch_names_the_key(tmp_path: Path) -> None:
    err = load_error("listen:\n  host: [a, b]\n", tmp_path=tmp_path)
    assert err.key == "listen.host" and "expected a string" in err.problem
    err = load_error("sidecar_id: 0123\n", tmp_path=tmp_path)
    assert err.key == "sidecar_id" and "quote it" in err.problem


def test_secret_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    err = load_error("auth:\n  password: 918273645\n", tmp_path=tmp_path)
    assert err.key == "auth.password"
    assert "918273645" not in str(err)


def test_unreadable_file_names_path_and_os_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path=str(missing), env=UPSTREAM, overrides={})
    assert info.value.key == "config"
    assert str(missing) in info.value.problem and "No such file or directory" in info.value.problem
    with pytest.raises(ConfigError) as info:
        load_config(path=str(tmp_path), env=UPSTREAM, overrides={})  # a directory
    assert info.value.key == "config" and "Is a directory" in info.value.problem


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    text = "listen:\n  port: 1\n  host: [unclosed\nlog:\n  level: info\n"
    err = load_error(text, tmp_path=tmp_path)
    assert err.key == "config"
    assert "YAML syntax error at line" in err.problem and "pgsidecar.yaml" in err.problem
    assert "\n" not in str(err)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    err = load_error("listen:\n  port: 1\n  port: 2\n", tmp_path=tmp_path)
    assert err.key == "config" and "duplicate key 'port' at line 3" in err.problem


def test_tls_cert_without_key_and_key_without_cert() -> None:
    err = override_error("listen.tls_cert", "/c.pem")
    assert err.key == "listen.tls_key" and "listen.tls_cert is set" in err.problem
    err = override_error("listen.tls_key", "/k.pem")
    assert err.key == "listen.tls_cert"
    config = load(listen__tls_cert="/c.pem", listen__tls_key="/k.pem")
    assert (config.listen.tls_cert, config.listen.tls_key) == ("/c.pem", "/k.pem")


def test_configured_mode_needs_a_user() -> None:
    err = override_error("auth.mode", "configured")
    assert err.key == "auth.user" and "configured" in err.problem


def test_configured_mode_takes_credentials_from_upstream_when_unset() -> None:
    config = load(auth__mode="configured", env={"PGUSER": "app", "PGPASSWORD": "pw"})
    assert config.auth == AuthConfig(mode="configured", user="app", password="pw")
    config = load(auth__mode="configured", auth__user="other", env={"PGUSER": "app"})
    assert config.auth.user == "other"


def test_password_file_is_read_and_newline_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret \n")
    config = load(auth__mode="configured", auth__user="app", auth__password_file=str(secret))
    assert config.auth.password == "s3cret "
    assert config.auth.password_file == str(secret)


def test_password_file_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    err = override_error("auth.password_file", str(missing))
    assert err.key == "auth.password_file"
    assert str(missing) in err.problem and "No such file" in err.problem


def test_password_file_empty_or_with_password(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert override_error("auth.password_file", str(empty)).key == "auth.password_file"
    secret = tmp_path / "pw"
    secret.write_text("x")
    err = load_error(auth__password="y", auth__password_file=str(secret))
    assert err.key == "auth.password_file" and "not both" in err.problem


def test_scram_client_auth_needs_a_client_password() -> None:
    err = override_error("auth.client_auth", "scram")
    assert err.key == "auth.client_password"


def test_low_water_above_high_water() -> None:
    err = load_error(relay__high_water="64kB", relay__low_water="128kB")
    assert err.key == "relay.low_water" and "relay.high_water" in err.problem
    assert load(relay__high_water="64kB", relay__low_water="64kB").relay.low_water_bytes == 65536


def test_backoff_initial_above_max() -> None:
    err = load_error(reconnect__backoff_initial="5s")
    assert err.key == "reconnect.backoff_initial" and "2s" in err.problem


def test_bad_dsn_names_upstream_dsn_without_leaking_the_password() -> None:
    err = override_error("upstream.dsn", "postgresql://u:topsecret@db:notaport/app")
    assert err.key == "upstream.dsn" and "invalid port number" in err.problem
    assert "topsecret" not in str(err)
    err = override_error("upstream.dsn", "host=db colour=blue")
    assert err.problem == 'invalid connection option "colour"'


def test_bad_pg_variable_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path=None, env={"PGHOST": "db", "PGSSLMODE": "sure"}, overrides={})
    assert info.value.key == "PGSSLMODE" and "invalid sslmode value" in info.value.problem


# ---------------------------------------------------------------- the shipped file


def test_shipped_yaml_loads_to_exactly_the_defaults() -> None:
    config = load_config(path=str(SHIPPED_YAML), env=UPSTREAM, overrides={})
    assert config == defaults()


def test_shipped_yaml_with_its_example_dsn() -> None:
    text = SHIPPED_YAML.read_text()
    example = next(line for line in text.splitlines() if line.strip().startswith("# dsn:"))
    dsn = yaml.safe_load(example.strip().removeprefix("# "))["dsn"]
    config = load_config(path=str(SHIPPED_YAML), env={}, overrides={"upstream.dsn": dsn})
    assert config.upstream.target.sslmode is SslMode.VERIFY_FULL
    assert config.upstream.target.host == "db.example.com"


def _leaf_keys(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in mapping.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_shipped_yaml_lists_every_setting_with_a_comment() -> None:
    text = SHIPPED_YAML.read_text()
    assert _leaf_keys(yaml.safe_load(text)) == set(CONFIG_KEYS) - {"upstream.dsn"}
    assert "# dsn:" in text
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert " # " in line, f"setting without a reason: {line!r}"


# ---------------------------------------------------------------- unknown PGSIDECAR_* variables

# What Kubernetes injects into every pod of a namespace with a Service named `pgsidecar` (port
# 6432, and a second, named port), as documented in "Environment variables" of the Service docs.
K8S_SERVICE_LINKS = {
    "PGSIDECAR_PORT": "tcp://10.0.0.7:6432",
    "PGSIDECAR_PORT_6432_TCP": "tcp://10.0.0.7:6432",
    "PGSIDECAR_PORT_6432_TCP_PROTO": "tcp",
    "PGSIDECAR_PORT_6432_TCP_PORT": "6432",
    "PGSIDECAR_PORT_6432_TCP_ADDR": "10.0.0.7",
    "PGSIDECAR_PORT_9188_TCP": "tcp://10.0.0.7:9188",
    "PGSIDECAR_PORT_9188_TCP_PROTO": "tcp",
    "PGSIDECAR_PORT_9188_TCP_PORT": "9188",
    "PGSIDECAR_PORT_9188_TCP_ADDR": "10.0.0.7",
    "PGSIDECAR_SERVICE_HOST": "10.0.0.7",
    "PGSIDECAR_SERVICE_PORT": "6432",
    "PGSIDECAR_SERVICE_PORT_METRICS": "9188",
}


def test_kubernetes_service_links_are_ignored_with_one_warning_line() -> None:
    env = {**UPSTREAM, **K8S_SERVICE_LINKS, "PGSIDECAR_SOMETHING": "1"}
    assert load_config(path=None, env=env, overrides={}) == defaults()
    names = sorted([*K8S_SERVICE_LINKS, "PGSIDECAR_SOMETHING"])
    assert unknown_env(env) == tuple(names)
    warning = unknown_env_warning(env)
    assert warning is not None and "\n" not in warning
    # All of them, sorted, no hints (none is a typo), and never a value (it may be a secret).
    assert warning == ("ignoring unknown environment variables (not pgsidecar settings): " + ", ".join(names))
    assert "10.0.0.7" not in warning and "tcp://" not in warning


def test_no_kubernetes_service_link_of_a_pgsidecar_service_is_a_setting() -> None:
    known = {env_name(key) for key in CONFIG_KEYS} | {"PGSIDECAR_CONFIG"}
    assert not set(K8S_SERVICE_LINKS) & known
    # A Service named pgsidecar-<anything> injects PGSIDECAR_<ANYTHING>_PORT, _SERVICE_HOST,
    # _SERVICE_PORT[_<NAME>], _PORT_<n>_TCP[...]. The one setting of that shape is listen.port
    # (a Service named pgsidecar-listen); a new setting ending in _PORT or _HOST must fail here.
    shaped = {
        name for name in known if name.endswith(("_PORT", "_SERVICE_HOST")) or "_SERVICE_PORT" in name or "_TCP" in name
    }
    assert shaped == {"PGSIDECAR_LISTEN_PORT"}


def test_known_variable_with_a_bad_value_still_stops_the_start() -> None:
    env = {**K8S_SERVICE_LINKS, "PGSIDECAR_SOMETHING": "1", "PGSIDECAR_LISTEN_PORT": "abc"}
    err = load_error(env=env)
    assert str(err) == "config: listen.port: expected a port number; got 'abc'"


def test_no_warning_when_every_variable_is_known() -> None:
    env = {
        **UPSTREAM,
        "PGSIDECAR_CONFIG": "",
        "PGSIDECAR_LISTEN_PORT": "7000",
        "PGSIDECAR_LISTEN_BACKLOG": "",
        "OTHER_PORT": "tcp://10.0.0.7:1",  # another Service's links: not our prefix
        "PGSIDECARX_PORT": "tcp://10.0.0.7:1",
    }
    assert unknown_env(env) == () and unknown_env_warning(env) is None
    assert load_config(path=None, env=env, overrides={}).listen.port == 7000


def test_an_empty_unknown_variable_is_still_named() -> None:
    assert unknown_env({"PGSIDECAR_SOMETHING": ""}) == ("PGSIDECAR_SOMETHING",)


def test_hints_only_for_likely_typos() -> None:
    env = {
        "PGSIDECAR_UPSTREAM_KEEPALIVE_IDEL": "5s",
        "PGSIDECAR_LISTEN_TLS_PORT": "tcp://10.0.0.7:6432",  # Service pgsidecar-listen-tls
        "PGSIDECAR_WRAPPER_MODE": "on",
    }
    warning = unknown_env_warning(env)
    assert warning is not None
    assert warning.endswith(
        ": PGSIDECAR_LISTEN_TLS_PORT, "
        "PGSIDECAR_UPSTREAM_KEEPALIVE_IDEL (did you mean PGSIDECAR_UPSTREAM_KEEPALIVE_IDLE?), "
        "PGSIDECAR_WRAPPER_MODE"
    )


# ---------------------------------------------------------------- listen.backlog


def test_backlog_default_is_the_kernel_somaxconn() -> None:
    config = load()
    assert config.listen.backlog is None
    try:
        with open(SOMAXCONN_PATH) as handle:
            expected = int(handle.read())
    except OSError:
        expected = FALLBACK_BACKLOG
    assert config.listen.effective_backlog == expected


def test_backlog_explicit_value_is_used_as_given(tmp_path: Path) -> None:
    assert load(env={"PGSIDECAR_LISTEN_BACKLOG": "2048"}).listen.effective_backlog == 2048
    assert load("listen:\n  backlog: 512\n", tmp_path=tmp_path).listen.backlog == 512
    assert load("listen:\n  backlog: null\n", tmp_path=tmp_path).listen.backlog is None
    # Above somaxconn too: the kernel caps it, pgsidecar does not second-guess it.
    assert load(listen__backlog="100000").listen.effective_backlog == 100000
    assert load(env={"PGSIDECAR_LISTEN_BACKLOG": ""}).listen.backlog is None


def test_kernel_somaxconn_reads_the_file_and_falls_back(tmp_path: Path) -> None:
    file = tmp_path / "somaxconn"
    file.write_text("8192\n")
    assert kernel_somaxconn(str(file)) == 8192
    for junk in ("", "lots\n", "0\n", "-5\n"):
        file.write_text(junk)
        assert kernel_somaxconn(str(file)) == FALLBACK_BACKLOG == 4096
    assert kernel_somaxconn(str(tmp_path / "missing")) == FALLBACK_BACKLOG
    assert ListenConfig(backlog=7).effective_backlog == 7


# ---------------------------------------------------------------- auth.password_command, auth.token

CONFIGURED = {"PGSIDECAR_AUTH_MODE": "configured", "PGUSER": "svc"}
TLS_UPSTREAM = {**CONFIGURED, "PGSSLMODE": "require"}


def test_password_command_as_a_list_or_a_string(tmp_path: Path) -> None:
    config = load(
        """
        auth:
          mode: configured
          user: svc
          password_command: [vault, read, -field=password, "secret/db pw"]
        """,
        tmp_path=tmp_path,
    )
    auth = config.auth
    assert auth.password_command == ("vault", "read", "-field=password", "secret/db pw")
    assert (auth.password_command_timeout_s, auth.password_command_ttl_s, auth.password) == (10.0, 0.0, None)
    assert "vault" not in repr(auth)
    split = load(env={**CONFIGURED, "PGSIDECAR_AUTH_PASSWORD_COMMAND": "/bin/get-pw --name 'db one'"})
    assert split.auth.password_command == ("/bin/get-pw", "--name", "db one")
    timed = load(
        env={
            **CONFIGURED,
            "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw",
            "PGSIDECAR_AUTH_PASSWORD_COMMAND_TIMEOUT": "2s",
            "PGSIDECAR_AUTH_PASSWORD_COMMAND_TTL": "5m",
        }
    )
    assert (timed.auth.password_command_timeout_s, timed.auth.password_command_ttl_s) == (2.0, 300.0)


def test_password_command_replaces_the_dsn_password() -> None:
    config = load(env={**CONFIGURED, "PGPASSWORD": "from-env", "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw"})
    assert config.auth.password is None and config.auth.user == "svc"


@pytest.mark.parametrize(
    ("yaml_value", "problem"),
    [
        ("[]", "must name a program to run"),
        ('""', "must name a program to run"),
        ("[get-pw, 3]", "expected a list of strings or a string; got a value of type list"),
        ("{a: b}", "expected a list of strings or a string; got a value of type dict"),
        ('"get-pw \'unclosed"', "cannot split the command into arguments: No closing quotation"),
    ],
)
def test_password_command_errors(tmp_path: Path, yaml_value: str, problem: str) -> None:
    err = load_error(f"auth:\n  mode: configured\n  user: svc\n  password_command: {yaml_value}\n", tmp_path=tmp_path)
    assert err.key == "auth.password_command" and err.problem == problem


def test_password_command_and_token_rules() -> None:
    err = load_error(env={"PGUSER": "svc", "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw"})
    assert err.key == "auth.password_command" and "needs auth.mode: configured" in err.problem
    err = load_error(env={**CONFIGURED, "PGSIDECAR_AUTH_PASSWORD": "x", "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw"})
    assert (err.key, err.problem) == ("auth.password_command", "set auth.password or auth.password_command, not both")
    err = load_error(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": "aws", "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw"})
    assert (err.key, err.problem) == ("auth.token", "set auth.password_command or auth.token, not both")
    err = load_error(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": "gcp", "PGSIDECAR_AUTH_TOKEN_REGION": "x"})
    assert (err.key, err.problem) == ("auth.token_region", "is used only with auth.token: aws")
    err = load_error(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": "oracle"})
    assert err.key == "auth.token" and err.problem == "expected one of: aws, gcp, azure, or none; got 'oracle'"


def test_password_file_and_a_command_conflict(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s\n")
    env = {**CONFIGURED, "PGSIDECAR_AUTH_PASSWORD_FILE": str(secret), "PGSIDECAR_AUTH_PASSWORD_COMMAND": "get-pw"}
    err = load_error(env=env)
    assert (err.key, err.problem) == (
        "auth.password_command",
        "set auth.password_file or auth.password_command, not both",
    )


def test_token_aws_with_a_region() -> None:
    pytest.importorskip("botocore")
    config = load(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": "AWS", "PGSIDECAR_AUTH_TOKEN_REGION": "eu-west-1"})
    assert (config.auth.token, config.auth.token_region, config.auth.password) == ("aws", "eu-west-1", None)
    assert load(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": "none"}).auth.token is None


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
def test_a_token_needs_tls_upstream(sslmode: str) -> None:
    pytest.importorskip("botocore")
    err = load_error(env={**CONFIGURED, "PGSSLMODE": sslmode, "PGSIDECAR_AUTH_TOKEN": "aws"})
    assert err.key == "auth.token"
    assert err.problem == (
        "a token is a password: it needs TLS upstream, sslmode=require or stronger (upstream.dsn or PGSSLMODE); "
        f"got sslmode={sslmode}"
    )
    for strong in ("require", "verify-ca", "verify-full"):
        assert load(env={**CONFIGURED, "PGSSLMODE": strong, "PGSIDECAR_AUTH_TOKEN": "aws"}).auth.token == "aws"


@pytest.mark.parametrize(
    ("token", "modules", "missing"),
    [
        ("aws", ("botocore",), "botocore"),
        ("gcp", ("google.auth",), "google.auth"),
        ("gcp", ("google",), "google.auth"),
        ("azure", ("azure.identity",), "azure.identity"),
    ],
)
def test_a_missing_extra_is_a_config_error_naming_pip(
    monkeypatch: pytest.MonkeyPatch, token: str, modules: tuple[str, ...], missing: str
) -> None:
    import sys

    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    err = load_error(env={**TLS_UPSTREAM, "PGSIDECAR_AUTH_TOKEN": token})
    assert err.key == "auth.token"
    assert f"auth.token is {token} but {missing}" in err.problem
    assert err.problem.endswith(f"is not installed: pip install 'pgsidecar[{token}]'")


def test_a_missing_extra_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['botocore'] = None\n"
        "from pgsidecar.cli import main\n"
        "sys.argv = ['pgsidecar', 'run', '--upstream', 'host=db sslmode=require user=svc']\n"
        "main()\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PGSIDECAR_AUTH_MODE": "configured", "PGSIDECAR_AUTH_TOKEN": "aws"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "config: auth.token: auth.token is aws but botocore is not installed: pip install 'pgsidecar[aws]'" in (
        proc.stderr
    )
