"""The `pgsidecar` command: run, check, drops, demo, version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pgsidecar import __version__

if TYPE_CHECKING:
    from pgsidecar.config.model import Config

# CLI flag -> dotted config key (every flag also has a PGSIDECAR_* twin through the loader).
_FLAG_KEYS = {
    "unix_socket_dir": "listen.unix_socket_dir",
    "upstream": "upstream.dsn",
    "drop_log": "drop_log.path",
    "metrics": "metrics.listen",
    "log_format": "log.format",
    "log_level": "log.level",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: $PGSIDECAR_CONFIG)")
    p.add_argument("--listen", metavar="HOST:PORT", help="client listener (default 127.0.0.1:6432)")
    p.add_argument("--unix-socket-dir", metavar="DIR", help="also listen on DIR/.s.PGSQL.<port>")
    p.add_argument("--upstream", metavar="DSN", help="upstream libpq URI or key=value conninfo")
    p.add_argument("--drop-log", metavar="PATH", help="drop records (JSON lines) file, or - for stderr")
    p.add_argument("--metrics", metavar="HOST:PORT", help="metrics and health endpoints, or none")
    p.add_argument("--log-format", choices=("auto", "json", "text"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    if getattr(args, "listen", None):
        host, sep, port = args.listen.rpartition(":")
        if not sep:
            host, port = args.listen, "6432"
        out["listen.host"] = host.strip("[]") or "127.0.0.1"
        out["listen.port"] = port
    return out


def _load(args: argparse.Namespace) -> Config:
    from pgsidecar.config.load import ConfigError, load_config

    try:
        return load_config(path=args.config, env=os.environ, overrides=_overrides(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None


def _warn_unknown_env(emit: Callable[[str], None]) -> None:
    """Unknown PGSIDECAR_* variables (Kubernetes service links, a wrapper's own) are ignored, and
    said so once, here, after logging is set up: not on SIGHUP, whose environment is the same."""
    from pgsidecar.config.load import unknown_env_warning

    line = unknown_env_warning(os.environ)
    if line is not None:
        emit(line)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    from pgsidecar.app import run
    from pgsidecar.config.load import load_config
    from pgsidecar.observe.logs import setup_logging

    setup_logging(config.log.format, config.log.level)
    _warn_unknown_env(lambda line: logging.getLogger("pgsidecar").warning("%s", line))
    overrides = _overrides(args)
    # SIGHUP re-reads the same file, environment and flags.
    return run(config, reload=lambda: load_config(path=args.config, env=os.environ, overrides=overrides))


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    _warn_unknown_env(lambda line: print(f"warning: {line}", file=sys.stderr))
    from pgsidecar.runtime.probe import check_hosts

    target = config.upstream.target
    reports = asyncio.run(check_hosts(config))
    if len(reports) > 1 or target.target_session_attrs.value != "any":
        print(f"hosts (target_session_attrs={target.target_session_attrs.value}):")
        for r in reports:
            state = f"reachable, {r.role}" if r.result is not None else f"unreachable: {r.error}"
            mark = "  <- chosen" if r.chosen else ("" if r.fits or r.result is None else "  (wrong role)")
            print(f"  {r.label:<28} {state}{mark}")
    chosen = next((r for r in reports if r.chosen), None)
    if chosen is None or chosen.result is None:
        errors = "; ".join(f"{r.label}: {r.error or 'wrong role: ' + r.role}" for r in reports)
        print(f"pgsidecar check: {target.redacted()}: no usable host: {errors}", file=sys.stderr)
        return 4
    result = chosen.result
    f = result.facts
    print(f"upstream:        {target.redacted()}")
    print(f"address:         {f.address} port {f.port}")
    print(f"server version:  {result.params.get('server_version', '?')}")
    print(f"backend pid:     {result.backend_pid}   auth: {result.auth_method or 'trust'}")
    if f.tls:
        print(f"TLS:             {f.tls_version} {f.tls_cipher}  (sslmode={target.sslmode.value})")
        if f.cert is not None:
            print(f"  subject:       {f.cert.subject}")
            print(f"  issuer:        {f.cert.issuer}")
            print(f"  SANs:          {', '.join(f.cert.sans) or '-'}")
            days = (f.cert.not_after - time.time()) / 86400
            print(f"  expires:       {_ts(f.cert.not_after)} ({days:.0f} days)")
            print(f"  sha256:        {f.cert.fingerprint_sha256}")
    else:
        print(f"TLS:             off (sslmode={target.sslmode.value})")
    ka = config.upstream.keepalive
    print(
        f"keepalive:       idle {ka.idle_s:g}s, interval {ka.interval_s:g}s, count {ka.count}, "
        f"user timeout {ka.effective_user_timeout_s:g}s"
    )
    if result.keepalive:
        print("  on the socket: " + ", ".join(f"{k}={v}" for k, v in result.keepalive.items()))
    return 0


def cmd_drops(args: argparse.Namespace, rest: list[str]) -> int:
    from pgsidecar.drops.report import main

    return main(rest, now=time.time())


def cmd_demo(args: argparse.Namespace) -> int:
    from pgsidecar.demo import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgsidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_flags(sub.add_parser("run", help="run the sidecar"))
    _add_config_flags(sub.add_parser("check", help="connect upstream once and report what was found"))
    sub.add_parser("drops", help="read drop records and say what is going on", add_help=False)
    demo = sub.add_parser("demo", help="throwaway TLS PostgreSQL + sidecar + app + real drops")
    demo.add_argument("--keep", action="store_true", help="leave the demo directory for inspection")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "drops":
        return cmd_drops(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"pgsidecar {__version__}")
        return 0
    return {"run": cmd_run, "check": cmd_check, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
