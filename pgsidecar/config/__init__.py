"""pgsidecar's configuration: one typed model (`model`), built by `load_config` from defaults, a
YAML file, PGSIDECAR_* variables and flags; the upstream from a libpq connection string and the
PG* variables (`conninfo`). Standard library and yaml only."""

from __future__ import annotations

from pgsidecar.config.conninfo import ConninfoError, parse_conninfo
from pgsidecar.config.load import (
    CONFIG_ENV,
    CONFIG_KEYS,
    ConfigError,
    env_name,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)
from pgsidecar.config.model import (
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
    "AuthConfig",
    "Config",
    "ConfigError",
    "ConninfoError",
    "DropLogConfig",
    "KeepaliveConfig",
    "ListenConfig",
    "LogConfig",
    "MetricsConfig",
    "ReconnectConfig",
    "RelayConfig",
    "ShutdownConfig",
    "SslMode",
    "UpstreamConfig",
    "UpstreamTarget",
    "env_name",
    "format_duration",
    "format_size",
    "load_config",
    "parse_conninfo",
    "parse_duration",
    "parse_size",
]
