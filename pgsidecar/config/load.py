"""Build the Config from defaults, a YAML file, PGSIDECAR_* variables and command-line flags.

Precedence, highest first: overrides (flags, as dotted keys) > `PGSIDECAR_*` environment > YAML
file > the model's defaults. Every key has one spelling, `listen.port`, and one environment twin,
`PGSIDECAR_LISTEN_PORT`. Every failure is a ConfigError naming the key path, so an operator can fix
it without reading code; unknown YAML keys and flags are errors (with the closest known key).
Unknown `PGSIDECAR_*` variables are not: orchestrators set names of their own under that prefix
(Kubernetes' service links for a Service named `pgsidecar`: `PGSIDECAR_PORT`,
`PGSIDECAR_SERVICE_HOST`, ...), so `load_config` ignores them and `unknown_env_warning` gives the
caller one line to log once logging is set up.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import yaml

from pgsidecar.config.conninfo import ConninfoError, parse_conninfo
from pgsidecar.config.model import (
    AUTH_MODES,
    CLIENT_AUTH_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    TOKEN_PROVIDERS,
    TRANSACTION_LOSS_ACTIONS,
    AuthConfig,
    Config,
    DropLogConfig,
    KeepaliveConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    ReconnectConfig,
    RelayConfig,
    ShutdownConfig,
    SslMode,
    UpstreamConfig,
    UpstreamTarget,
)

__all__ = [
    "CONFIG_ENV",
    "CONFIG_KEYS",
    "ConfigError",
    "env_name",
    "format_duration",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_size",
    "unknown_env",
    "unknown_env_warning",
]

CONFIG_ENV = "PGSIDECAR_CONFIG"
ENV_PREFIX = "PGSIDECAR_"


class ConfigError(Exception):
    """A configuration the operator must fix: `key` is the dotted key path (or "config" for the
    file itself, or the environment variable at fault), `problem` says what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = " ".join(problem.split("\n"))

    def __str__(self) -> str:
        return f"config: {self.key}: {self.problem}"


class _Invalid(ValueError):
    """A value parser's complaint; the loader adds the key path. A ValueError for direct callers
    of parse_duration and parse_size."""


Parser = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _Setting:
    key: str  # dotted key as written in YAML and flags
    section: str  # which dataclass receives it ("" is Config itself)
    field: str  # the model field, with its unit suffix
    parse: Parser


# ---------------------------------------------------------------- value parsers

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|m|h)?\s*")
_DURATION_UNITS: dict[str, int | Fraction] = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "min": 60, "h": 3600}
# A look back over drop logs (`pgsidecar drops --since 2d`) also counts in days and weeks, in any
# case, and adds up parts (`1h30m`); a setting stays one number and one unit.
_WINDOW_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|sec|min|[smhdw])?", re.IGNORECASE)
_WINDOW_UNITS = {**_DURATION_UNITS, "sec": 1, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)?\s*")
_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}
_DURATION_HINT = "expected a duration like 10s, 250ms, 5m"
_SIZE_HINT = "expected a size like 64kB, 1MB, 1GB or a number of bytes"
_OFF_WORDS = frozenset({"off", "none", "false", "no", "disable", "disabled"})
_TRUE_WORDS = frozenset({"true", "on", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "off", "no", "0"})


def _number(value: Any, pattern: re.Pattern[str], units: Mapping[str, Any], hint: str) -> Fraction:
    """A non-negative number with an optional unit, computed exactly; YAML numbers need no unit.
    Unit lookup is by the lower-cased unit, so `64kB` and `64KB` agree."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(f"{hint}; got {value!r}")
    if not isinstance(value, str):
        if not math.isfinite(value) or value < 0:
            raise _Invalid(f"{hint}; got {value!r}")
        return Fraction(value)
    match = pattern.fullmatch(value)
    if match is None:
        raise _Invalid(f"{hint}; got {value!r}")
    number, unit = match.groups()
    factor = 1 if unit is None else units.get(unit.lower())
    if factor is None:
        raise _Invalid(f"{hint}; got {value!r}")
    return Fraction(number) * factor


def parse_duration(value: Any, *, window: bool = False) -> float:
    """`10s`, `250ms`, `5m`, `1h`, or a plain number of seconds -> seconds; ValueError if not.

    `window`: a span of time back from now, as `pgsidecar drops --since` reads it: also `d` and
    `w`, units in any case, and a sum of parts such as `1h30m`."""
    if not window:
        return float(_number(value, _DURATION_RE, _DURATION_UNITS, _DURATION_HINT))
    text = value.strip() if isinstance(value, str) else ""
    total, pos = Fraction(0), 0
    for match in _WINDOW_PART_RE.finditer(text):
        if match.start() != pos:
            break
        number, unit = match.groups()
        total += Fraction(number) * _WINDOW_UNITS[(unit or "s").lower()]
        pos = match.end()
    if not text or pos != len(text):
        raise _Invalid(f"expected a duration like 24h, 90m, 1h30m, 2d; got {value!r}")
    return float(total)


def parse_size(value: Any) -> int:
    """`64kB`, `1MB`, `1GB` (1024-based, as PostgreSQL's memory units) or plain bytes -> bytes;
    ValueError if not."""
    size = _number(value, _SIZE_RE, _SIZE_UNITS, _SIZE_HINT)
    if size.denominator != 1:
        raise _Invalid(f"not a whole number of bytes; got {value!r}")
    return int(size)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling parse_duration reads back as the same float."""
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds % factor == 0 and float(seconds) == int(seconds // factor) * factor:
            return f"{int(seconds // factor)}{unit}"
    millis = round(seconds * 1000)
    if millis / 1000 == seconds:
        return f"{millis}ms"
    return f"{Decimal(repr(seconds)):f}s"  # plain digits: the parser takes no exponent


def format_size(size: int) -> str:
    """The largest exact unit: 65536 -> `64kB`."""
    for unit, factor in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _duration(*, positive: bool = False) -> Parser:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise _Invalid(f"must be more than 0; got {value!r}")
        return seconds

    return parse


def _is_off(value: Any) -> bool:
    """YAML null or false, or a word such as off / none (YAML 1.1 already reads `off` as false)."""
    if value is None or value is False:
        return True
    return isinstance(value, str) and value.strip().lower() in _OFF_WORDS


def _optional_duration(value: Any) -> float | None:
    """None means off: YAML null or false, `off`, `none`, or zero."""
    if _is_off(value):
        return None
    try:
        seconds = parse_duration(value)
    except _Invalid:
        raise _Invalid(f"{_DURATION_HINT}, or off; got {value!r}") from None
    return seconds or None


def _user_timeout(value: Any) -> float | None:
    """TCP_USER_TIMEOUT: None (unset) means derived from keepalive, so 0/off would be ambiguous."""
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Invalid(f"must be more than 0 (leave unset to derive it from keepalive); got {value!r}")
    return seconds


def _size(*, minimum: int = 0, maximum: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        size = parse_size(value)
        if size < minimum or (maximum is not None and size > maximum):
            raise _Invalid(f"must be {_bounds(minimum, maximum)} bytes; got {value!r}")
        return size

    return parse


def _bounds(minimum: int, maximum: int | None) -> str:
    return f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"


def _integer(*, minimum: int, maximum: int | None = None, what: str = "an integer", out_of_range: str = "") -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _Invalid(f"expected {what}; got {value!r}")
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise _Invalid(f"expected {what}; got {value!r}")
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            raise _Invalid(f"{out_of_range}must be {_bounds(minimum, maximum)}; got {value!r}")
        return number

    return parse


def _boolean(*, extra_true: frozenset[str] = frozenset(), extra_false: frozenset[str] = frozenset()) -> Parser:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = value.strip().lower() if isinstance(value, str) else None
        if word in _TRUE_WORDS or word in extra_true:
            return True
        if word in _FALSE_WORDS or word in extra_false:
            return False
        allowed = "true/false, on/off, yes/no, 1/0"
        if extra_true or extra_false:
            allowed += ", " + "/".join(sorted(extra_true | extra_false))
        raise _Invalid(f"expected a boolean ({allowed}); got {value!r}")

    return parse


def _choice(options: tuple[str, ...]) -> Parser:
    def parse(value: Any) -> str:
        word = value.strip().lower() if isinstance(value, str) else None
        if word not in options:
            raise _Invalid(f"expected one of: {', '.join(options)}; got {value!r}")
        return word

    return parse


def _optional_choice(options: tuple[str, ...]) -> Parser:
    """One of `options`, or None for null / off / none."""

    def parse(value: Any) -> str | None:
        if _is_off(value):
            return None
        word = value.strip().lower() if isinstance(value, str) else None
        if word not in options:
            raise _Invalid(f"expected one of: {', '.join(options)}, or none; got {value!r}")
        return word

    return parse


def _argv(value: Any) -> tuple[str, ...] | None:
    """A command run without a shell: a YAML list of arguments, or one string split as a POSIX
    shell would split it (shlex), quotes and all. The text is never shown: it may hold a secret."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise _Invalid(f"cannot split the command into arguments: {exc}") from None
    elif isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        argv = list(value)
    else:
        raise _Invalid(f"expected a list of strings or a string; got a value of type {type(value).__name__}")
    if not argv or not argv[0]:
        raise _Invalid("must name a program to run")
    return tuple(argv)


def _text(*, optional: bool, secret: bool = False) -> Parser:
    """A string. YAML numbers are refused rather than converted (YAML 1.1 reads 0123 as 83)."""

    def parse(value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            shown = f"a value of type {type(value).__name__}" if secret else repr(value)
            raise _Invalid(f"expected a string (quote it in YAML); got {shown}")
        if not value and not optional:
            raise _Invalid("must not be empty")
        return value or None

    return parse


def _absolute_dir(value: Any) -> str | None:
    path: str | None = _text(optional=True)(value)
    if path is not None and not path.startswith("/"):
        raise _Invalid(f"expected an absolute directory path; got {value!r}")
    return path


def _off_or_text(value: Any) -> str | None:
    """For settings where None turns a feature off: null, false, `off`, `none` or empty."""
    if _is_off(value):
        return None
    text: str | None = _text(optional=True)(value)
    return text


def _host_port(value: Any) -> str | None:
    """`host:port` (IPv6 in brackets), or off/none."""
    text = _off_or_text(value)
    if text is None:
        return None
    host, colon, port = text.rpartition(":")
    host_ok = bool(host) and (not host.startswith("[") or host.endswith("]"))
    port_ok = port.isascii() and port.isdigit() and int(port) <= 65535
    if not colon or not host_ok or not port_ok:
        raise _Invalid(f"expected host:port such as 127.0.0.1:9188, or none; got {value!r}")
    return text


# 0 lets the OS pick a free port (tests read the bound port back).
_PORT = _integer(minimum=0, maximum=65535, what="a port number", out_of_range="port out of range: ")
# listen() takes a C int; the kernel caps it at net.core.somaxconn anyway.
_BACKLOG = _integer(minimum=1, maximum=2**31 - 1)


def _backlog(value: Any) -> int | None:
    """None (unset) means the kernel's somaxconn, read when the listeners start."""
    return None if value is None else _BACKLOG(value)


# ---------------------------------------------------------------- the settings

_SETTINGS: tuple[_Setting, ...] = (
    _Setting("listen.host", "listen", "host", _text(optional=False)),
    _Setting("listen.port", "listen", "port", _PORT),
    _Setting("listen.unix_socket_dir", "listen", "unix_socket_dir", _absolute_dir),
    _Setting(
        "listen.tls",
        "listen",
        "tls",
        _boolean(extra_true=frozenset({"require", "enable"}), extra_false=frozenset({"disable"})),
    ),
    _Setting("listen.tls_cert", "listen", "tls_cert", _text(optional=True)),
    _Setting("listen.tls_key", "listen", "tls_key", _text(optional=True)),
    _Setting("listen.max_clients", "listen", "max_clients", _integer(minimum=1)),
    _Setting("listen.backlog", "listen", "backlog", _backlog),
    _Setting("listen.startup_timeout", "listen", "startup_timeout_s", _duration(positive=True)),
    # The message length field is an Int32 (PostgreSQL docs 55.7 "Message Formats").
    _Setting(
        "listen.max_message_size",
        "listen",
        "max_message_bytes",
        _size(minimum=1024, maximum=2**31 - 1),
    ),
    _Setting("upstream.dsn", "upstream", "dsn", _text(optional=True, secret=True)),
    _Setting("upstream.keepalive.idle", "keepalive", "idle_s", _duration(positive=True)),
    _Setting("upstream.keepalive.interval", "keepalive", "interval_s", _duration(positive=True)),
    _Setting("upstream.keepalive.count", "keepalive", "count", _integer(minimum=1)),
    _Setting("upstream.keepalive.user_timeout", "keepalive", "user_timeout_s", _user_timeout),
    _Setting("upstream.check_after_idle", "upstream", "check_after_idle_s", _optional_duration),
    _Setting("upstream.park_after", "upstream", "park_after_s", _optional_duration),
    _Setting("auth.mode", "auth", "mode", _choice(AUTH_MODES)),
    _Setting("auth.user", "auth", "user", _text(optional=True)),
    _Setting("auth.password", "auth", "password", _text(optional=True, secret=True)),
    _Setting("auth.password_file", "auth", "password_file", _text(optional=True)),
    _Setting("auth.client_auth", "auth", "client_auth", _choice(CLIENT_AUTH_MODES)),
    _Setting("auth.client_password", "auth", "client_password", _text(optional=True, secret=True)),
    _Setting("auth.password_command", "auth", "password_command", _argv),
    _Setting("auth.password_command_timeout", "auth", "password_command_timeout_s", _duration(positive=True)),
    _Setting("auth.password_command_ttl", "auth", "password_command_ttl_s", _duration()),
    _Setting("auth.token", "auth", "token", _optional_choice(TOKEN_PROVIDERS)),
    _Setting("auth.token_region", "auth", "token_region", _text(optional=True)),
    _Setting("reconnect.deadline", "reconnect", "deadline_s", _duration()),
    _Setting("reconnect.backoff_initial", "reconnect", "backoff_initial_s", _duration(positive=True)),
    _Setting("reconnect.backoff_max", "reconnect", "backoff_max_s", _duration(positive=True)),
    _Setting("reconnect.max_concurrent", "reconnect", "max_concurrent", _integer(minimum=1)),
    _Setting(
        "reconnect.on_transaction_loss",
        "reconnect",
        "on_transaction_loss",
        _choice(TRANSACTION_LOSS_ACTIONS),
    ),
    _Setting("reconnect.max_buffered", "reconnect", "max_buffered_bytes", _size()),
    _Setting("relay.high_water", "relay", "high_water_bytes", _size(minimum=1)),
    _Setting("relay.low_water", "relay", "low_water_bytes", _size()),
    _Setting("drop_log.path", "drop_log", "path", _off_or_text),
    _Setting("drop_log.max_size", "drop_log", "max_bytes", _size(minimum=1)),
    _Setting("drop_log.backups", "drop_log", "backups", _integer(minimum=0)),
    _Setting("metrics.listen", "metrics", "listen", _host_port),
    _Setting("log.format", "log", "format", _choice(LOG_FORMATS)),
    _Setting("log.level", "log", "level", _choice(LOG_LEVELS)),
    _Setting("shutdown.grace", "shutdown", "grace_s", _duration()),
    _Setting("sidecar_id", "", "sidecar_id", _text(optional=True)),
)

_BY_KEY: Mapping[str, _Setting] = {s.key: s for s in _SETTINGS}
CONFIG_KEYS: tuple[str, ...] = tuple(_BY_KEY)
_SECTIONS = frozenset(k.rpartition(".")[0] for k in CONFIG_KEYS if "." in k)
_RESERVED_ENV = frozenset({CONFIG_ENV})


def env_name(key: str) -> str:
    """The environment twin of a dotted key: listen.port -> PGSIDECAR_LISTEN_PORT."""
    return ENV_PREFIX + key.replace(".", "_").upper()


_BY_ENV: Mapping[str, str] = {env_name(k): k for k in CONFIG_KEYS}
assert len(_BY_ENV) == len(CONFIG_KEYS), "two keys share an environment name"


def _did_you_mean(word: str, candidates: tuple[str, ...] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# ---------------------------------------------------------------- layers

_Raw = dict[str, Any]  # dotted key -> raw value (string from env/flags, any YAML scalar)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError("config", f"duplicate key {key!r} at line {line}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> _Raw:
    """The file's settings, flattened to dotted keys; unknown keys are errors."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"cannot read {path}: not UTF-8 ({exc.reason})") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError("config", f"{path}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("config", f"{path}: YAML syntax error{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path}: YAML error: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("config", f"{path}: expected a mapping of settings at the top; got {document!r}")
    raw: _Raw = {}
    _flatten(document, "", raw)
    return raw


def _flatten(mapping: dict[Any, Any], prefix: str, raw: _Raw) -> None:
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if key in _BY_KEY:
            raw[key] = value
        elif key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(key, f"expected a mapping of settings; got {value!r}")
            _flatten(value, key + ".", raw)
        else:
            hint = _did_you_mean(key, CONFIG_KEYS + tuple(_SECTIONS))
            raise ConfigError(key, "unknown setting" + hint)


def _read_env(env: Mapping[str, str]) -> _Raw:
    """Known PGSIDECAR_* variables; an empty one counts as unset (compose files often leave `X=`).
    Unknown ones are skipped here and reported by unknown_env_warning."""
    raw: _Raw = {}
    for name, value in env.items():
        key = _BY_ENV.get(name)
        if key is not None and value != "":
            raw[key] = value
    return raw


def unknown_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The PGSIDECAR_* names in `env` that are no setting (and not PGSIDECAR_CONFIG), sorted."""
    return tuple(
        sorted(
            name for name in env if name.startswith(ENV_PREFIX) and name not in _BY_ENV and name not in _RESERVED_ENV
        )
    )


# Kubernetes service links (the Service's name upper-cased, "-" -> "_"): NAME_SERVICE_HOST,
# NAME_SERVICE_PORT[_PORTNAME], NAME_PORT, NAME_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]. Such names
# get no "did you mean": they are not typos, and a hint would send the operator the wrong way.
_SERVICE_LINK_RE = re.compile(
    r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)
_ENV_SUFFIXES = tuple(name.removeprefix(ENV_PREFIX) for name in _BY_ENV)


def _env_hint(name: str) -> str:
    """` (did you mean PGSIDECAR_X?)` for a likely typo, else "". Compared without the shared
    prefix, which would make every pair look alike, and strictly, so a wrapper's own variable
    (PGSIDECAR_SOMETHING) gets no suggestion."""
    if _SERVICE_LINK_RE.fullmatch(name):
        return ""
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), _ENV_SUFFIXES, n=1, cutoff=0.8)
    return f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""


def unknown_env_warning(env: Mapping[str, str]) -> str | None:
    """One line naming every unknown PGSIDECAR_* variable (never their values, which may be
    secrets), or None when there is none."""
    names = unknown_env(env)
    if not names:
        return None
    listed = ", ".join(name + _env_hint(name) for name in names)
    return f"ignoring unknown environment variables (not pgsidecar settings): {listed}"


def _read_overrides(overrides: Mapping[str, str]) -> _Raw:
    for key in overrides:
        if key not in _BY_KEY:
            raise ConfigError(key, "unknown setting" + _did_you_mean(key, CONFIG_KEYS))
    return dict(overrides)


# ---------------------------------------------------------------- assembly


def load_config(*, path: str | None, env: Mapping[str, str], overrides: Mapping[str, str]) -> Config:
    """The effective Config: overrides > PGSIDECAR_* env > YAML at `path` (or $PGSIDECAR_CONFIG)
    > defaults. The upstream comes from `upstream.dsn` and the PG* variables in `env`, as libpq
    reads them. Raises ConfigError naming the key path at fault. Unknown PGSIDECAR_* variables
    are ignored; the caller logs unknown_env_warning(env)."""
    if path is None:
        path = env.get(CONFIG_ENV) or None
    raw: _Raw = _read_yaml(path) if path is not None else {}
    raw.update(_read_env(env))
    raw.update(_read_overrides(overrides))
    fields: dict[str, dict[str, Any]] = {s.section: {} for s in _SETTINGS}
    for key, value in raw.items():
        setting = _BY_KEY[key]
        try:
            fields[setting.section][setting.field] = setting.parse(value)
        except _Invalid as exc:
            raise ConfigError(key, str(exc)) from None
    target = _upstream_target(fields["upstream"].pop("dsn", None), env)
    config = Config(
        listen=ListenConfig(**fields["listen"]),
        upstream=UpstreamConfig(target=target, keepalive=KeepaliveConfig(**fields["keepalive"]), **fields["upstream"]),
        auth=_auth(AuthConfig(**fields["auth"]), target),
        reconnect=ReconnectConfig(**fields["reconnect"]),
        relay=RelayConfig(**fields["relay"]),
        drop_log=DropLogConfig(**fields["drop_log"]),
        metrics=MetricsConfig(**fields["metrics"]),
        log=LogConfig(**fields["log"]),
        shutdown=ShutdownConfig(**fields["shutdown"]),
        **fields[""],
    )
    _check(config)
    return config


def _upstream_target(dsn: str | None, env: Mapping[str, str]) -> UpstreamTarget:
    if dsn is None and not env.get("PGHOST") and not env.get("PGHOSTADDR"):
        raise ConfigError("upstream.dsn", "no upstream: set upstream.dsn, --upstream or PGHOST")
    try:
        return parse_conninfo(dsn or "", env)
    except ConninfoError as exc:
        raise ConfigError(exc.env or "upstream.dsn", str(exc)) from None


def _auth(auth: AuthConfig, target: UpstreamTarget) -> AuthConfig:
    """Read the password file now (a missing secret should fail at start, not at the first drop);
    in `configured` mode, credentials not set under auth.* come from the upstream DSN / PG*."""
    if auth.password_file is not None:
        if auth.password is not None:
            raise ConfigError("auth.password_file", "set auth.password or auth.password_file, not both")
        try:
            with open(auth.password_file, encoding="utf-8") as handle:
                secret = handle.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 ({exc.reason})"
            problem = f"cannot read {auth.password_file}: {reason}"
            raise ConfigError("auth.password_file", problem) from None
        if not secret:
            raise ConfigError("auth.password_file", f"{auth.password_file} is empty")
        auth = dataclasses.replace(auth, password=secret)
    fetched = _check_fetched_password(auth, target)
    if auth.mode == "configured":
        # A password fetched per connect replaces a password in the DSN / PGPASSWORD.
        password = None if fetched else auth.password or target.password
        auth = dataclasses.replace(auth, user=auth.user or target.user, password=password)
        if auth.user is None:
            raise ConfigError(
                "auth.user",
                "auth.mode is configured but no user is set (auth.user, or user in upstream.dsn / PGUSER)",
            )
    if auth.client_auth == "scram" and auth.client_password is None:
        raise ConfigError("auth.client_password", "auth.client_auth is scram but auth.client_password is not set")
    return auth


# auth.token -> the modules its extra installs: the cloud's own maintained library (and, for
# google-auth, the HTTP transport its token refresh uses).
_TOKEN_MODULES = {"aws": ("botocore",), "gcp": ("google.auth", "requests"), "azure": ("azure.identity",)}
# Tokens are bearer secrets: they travel only over TLS (libpq's sslmode=require or stronger).
_TLS_REQUIRED = (SslMode.REQUIRE, SslMode.VERIFY_CA, SslMode.VERIFY_FULL)


def _importable(module: str) -> bool:
    """Whether `module` could be imported, without importing it (its parent package is)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_fetched_password(auth: AuthConfig, target: UpstreamTarget) -> bool:
    """auth.password_command and auth.token: one at most, configured mode only, no fixed password
    beside them; a token needs its extra installed and TLS upstream. True if either is set."""
    if auth.password_command is not None and auth.token is not None:
        raise ConfigError("auth.token", "set auth.password_command or auth.token, not both")
    if auth.token_region is not None and auth.token != "aws":
        raise ConfigError("auth.token_region", "is used only with auth.token: aws")
    key = "auth.password_command" if auth.password_command is not None else "auth.token" if auth.token else None
    if key is None:
        return False
    if auth.mode != "configured":
        raise ConfigError(key, f"needs auth.mode: configured (pgsidecar logs in upstream itself); got {auth.mode}")
    if auth.password is not None:
        fixed = "auth.password_file" if auth.password_file is not None else "auth.password"
        raise ConfigError(key, f"set {fixed} or {key}, not both")
    if auth.token is not None:
        missing = [m for m in _TOKEN_MODULES[auth.token] if not _importable(m)]
        if missing:
            raise ConfigError(
                "auth.token",
                f"auth.token is {auth.token} but {', '.join(missing)} is not installed: "
                f"pip install 'pgsidecar[{auth.token}]'",
            )
        if target.sslmode not in _TLS_REQUIRED:
            raise ConfigError(
                "auth.token",
                f"a token is a password: it needs TLS upstream, sslmode=require or stronger "
                f"(upstream.dsn or PGSSLMODE); got sslmode={target.sslmode.value}",
            )
    return True


def _check(config: Config) -> None:
    """Rules that involve more than one setting."""
    listen, relay, reconnect = config.listen, config.relay, config.reconnect
    for have, lack in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if getattr(listen, have) is not None and getattr(listen, lack) is None:
            raise ConfigError(
                f"listen.{lack}",
                f"listen.{have} is set but listen.{lack} is not; set both or neither",
            )
    if relay.low_water_bytes > relay.high_water_bytes:
        raise ConfigError(
            "relay.low_water",
            f"must not exceed relay.high_water ({relay.high_water_bytes} bytes); got {relay.low_water_bytes} bytes",
        )
    if reconnect.backoff_initial_s > reconnect.backoff_max_s:
        raise ConfigError(
            "reconnect.backoff_initial",
            f"must not exceed reconnect.backoff_max ({format_duration(reconnect.backoff_max_s)}); "
            f"got {format_duration(reconnect.backoff_initial_s)}",
        )
