"""libpq connection strings and PG* variables -> UpstreamTarget.

Reads both forms libpq reads (PostgreSQL docs 34.1.1 "Connection Strings"): `key=value` pairs with
single-quoted values and backslash escapes, and `postgresql://` / `postgres://` URIs with
percent-encoding. Keywords missing from the string come from the `PG*` environment variables
(PostgreSQL docs 34.15 "Environment Variables"); a keyword present in the string always wins, even
when its value is empty, as in libpq. The parsing follows libpq's own `conninfo_parse` and
`conninfo_uri_parse_options` (src/interfaces/libpq/fe-connect.c) so that a string that works with
psql works here, and error texts match libpq's where libpq has one.

Multiple hosts work as in libpq's connectOptions2: `host`, `hostaddr` and `port` are
comma-separated lists (`host=a,b port=5432,5433`, `postgresql://a:5432,[::1]:5433/db`, also in the
`?host=&port=` query), kept in order in `UpstreamTarget.hosts`. With `hostaddr` the host count
follows it and `host`, when given, must have as many entries; each non-empty `hostaddr` entry must
be a numeric IPv4/IPv6 address as getaddrinfo(AI_NUMERICHOST) reads it (glibc: `127.1` and
`0x7f.0.0.1` too; an interface-name `%scope` is not looked up), and an entry without a host name uses the address as its host. One `port`
applies to every host, otherwise there must be one per host; an empty port entry means 5432. An
empty `host` entry is libpq's default host: pgsidecar has no compiled-in default, so it uses what
Debian's libpq uses, the socket directory `/var/run/postgresql` (an entry with a hostaddr uses the
address instead). A missing host altogether (no host, hostaddr, PGHOST or PGHOSTADDR) is still an
error rather than that default. `target_session_attrs` (any, read-write, read-only, primary,
standby, prefer-standby) and `load_balance_hosts` (disable, random) are checked as in libpq,
including that an empty value is invalid; connecting host by host is the runtime's work.

The keepalive keywords (`keepalives*`, `tcp_user_timeout`) are accepted and ignored: pgsidecar's
own `upstream.keepalive` settings govern the upstream socket. `gssencmode`, `sslcompression` and
`fallback_application_name` are accepted and ignored too. Other libpq keywords pgsidecar cannot
honour (`service`, `passfile`, `channel_binding`, ...) are refused.
"""

from __future__ import annotations

import enum
import ipaddress
import string
from collections.abc import Callable, Mapping
from typing import TypeVar

from pgsidecar.config.model import (
    LoadBalanceHosts,
    SslMode,
    TargetSessionAttrs,
    UpstreamHost,
    UpstreamTarget,
)

__all__ = [
    "DEFAULT_SOCKET_DIR",
    "PG_ENVIRONMENT",
    "URI_PREFIXES",
    "ConninfoError",
    "is_numeric_address",
    "parse_conninfo",
    "parse_keyword_value",
    "parse_uri",
]

URI_PREFIXES = ("postgresql://", "postgres://")

# libpq's DEFAULT_PGSOCKET_DIR as Debian and Ubuntu build it: an empty entry in a host list.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PORT = 5432

# Keywords pgsidecar uses, with the variable libpq reads when the keyword is absent
# (PostgreSQL docs 34.15).
PG_ENVIRONMENT: Mapping[str, str] = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslsni": "PGSSLSNI",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}

# Accepted so that existing DSNs keep working, but without effect (see the module docstring).
_IGNORED = frozenset(
    {
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "gssencmode",
        "sslcompression",
        "fallback_application_name",
    }
)

# Real libpq keywords pgsidecar cannot honour yet: refusing beats silently ignoring them.
_UNSUPPORTED = frozenset(
    {
        "service",
        "passfile",
        "channel_binding",
        "require_auth",
        "sslpassword",
        "sslcrl",
        "sslcrldir",
        "sslcertmode",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "requirepeer",
        "replication",
        "client_encoding",
    }
)

# libpq skips blanks with C isspace() in the C locale, so only ASCII whitespace separates pairs.
_BLANKS = frozenset(" \t\n\r\v\f")

_SSLMODES = ", ".join(m.value for m in SslMode)

# Builds the error for a keyword, naming the PG* variable when the value came from there.
_Fail = Callable[[str, str], "ConninfoError"]
_E = TypeVar("_E", bound=enum.Enum)


class ConninfoError(ValueError):
    """A connection string or PG* variable libpq would also refuse (or pgsidecar cannot honour).

    `keyword` is the libpq keyword at fault when known; `env` names the PG* variable when the bad
    value came from the environment. Messages never contain a password.
    """

    def __init__(self, message: str, *, keyword: str | None = None, env: str | None = None):
        super().__init__(message)
        self.keyword = keyword
        self.env = env


def parse_conninfo(dsn: str, env: Mapping[str, str]) -> UpstreamTarget:
    """Parse a libpq connection string (key=value or URI; may be empty) plus PG* variables.

    Defaults as in libpq: port 5432, sslmode prefer. Two libpq sslmode rules apply
    (PostgreSQL docs 34.19.1): sslmode=require with an explicitly given sslrootcert behaves like
    verify-ca; sslrootcert=system makes the default sslmode verify-full and refuses weaker modes.
    A host is required (host or hostaddr, from the string or PGHOST / PGHOSTADDR); host, hostaddr
    and port may be lists (see the module docstring); a unix socket directory starts with '/'.
    """
    values = parse_uri(dsn) if dsn.startswith(URI_PREFIXES) else parse_keyword_value(dsn)
    sources: dict[str, str | None] = dict.fromkeys(values)
    for keyword, variable in PG_ENVIRONMENT.items():
        if keyword not in values and env.get(variable):
            values[keyword] = env[variable]
            sources[keyword] = variable
    return _build_target(values, sources)


def _check_keyword(keyword: str, *, in_uri: bool) -> None:
    if keyword in PG_ENVIRONMENT or keyword in _IGNORED:
        return
    if keyword in _UNSUPPORTED:
        raise ConninfoError(f'connection option "{keyword}" is not supported by pgsidecar', keyword=keyword)
    if in_uri:
        raise ConninfoError(f'invalid URI query parameter: "{keyword}"', keyword=keyword)
    raise ConninfoError(f'invalid connection option "{keyword}"', keyword=keyword)


def parse_keyword_value(text: str) -> dict[str, str]:
    """libpq's key=value form (PostgreSQL docs 34.1.1.1): spaces around '=' are allowed, a value
    with spaces or an empty value is single-quoted, and backslash escapes the next character."""
    values: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        if text[i] in _BLANKS:
            i += 1
            continue
        start = i
        while i < n and text[i] != "=" and text[i] not in _BLANKS:
            i += 1
        name = text[start:i]
        while i < n and text[i] in _BLANKS:
            i += 1
        if i >= n or text[i] != "=":
            raise ConninfoError(f'missing "=" after "{name}" in connection info string')
        i += 1
        while i < n and text[i] in _BLANKS:
            i += 1
        value, i = _read_value(text, i)
        _check_keyword(name, in_uri=False)
        values[name] = value
    return values


def _read_value(text: str, i: int) -> tuple[str, int]:
    """One value of the key=value form, quoted or bare; returns it and the index after it."""
    out: list[str] = []
    n = len(text)
    quoted = i < n and text[i] == "'"
    if quoted:
        i += 1
    while True:
        if i >= n:
            if quoted:
                raise ConninfoError("unterminated quoted string in connection info string")
            return "".join(out), i
        c = text[i]
        if c == "\\":
            if i + 1 < n:
                out.append(text[i + 1])
            i += 2
        elif (quoted and c == "'") or (not quoted and c in _BLANKS):
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1


def parse_uri(uri: str) -> dict[str, str]:
    """libpq's URI form (PostgreSQL docs 34.1.1.2):
    postgresql://[user[:password]@][host][:port][,...][/dbname][?param=value&...]"""
    rest = uri[len(next(p for p in URI_PREFIXES if uri.startswith(p))) :]
    values: dict[str, str] = {}
    # libpq looks for '@' only up to the first '/', so the password may hold ':' but not '@'.
    at = _end_of(rest, 0, "@/")
    if at < len(rest) and rest[at] == "@":
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, password = userinfo.partition(":")
        if user:
            values["user"] = _percent_decode(user, "user")
        if colon and password:
            values["password"] = _percent_decode(password, "password")
    hosts, ports, rest = _split_hosts(rest)
    # libpq stores host and port only when non-empty, so PGHOST still applies to postgresql:///db
    host_list = ",".join(_percent_decode(h, "host") for h in hosts)
    port_list = ",".join(_percent_decode(p, "port") for p in ports)
    if host_list:
        values["host"] = host_list
    if port_list:
        values["port"] = port_list
    if rest.startswith("/"):
        dbname, sep, query = rest[1:].partition("?")
        if dbname:
            values["dbname"] = _percent_decode(dbname, "dbname")
        rest = sep + query
    if rest.startswith("?"):
        values.update(_parse_query(rest[1:]))
    return values


def _split_hosts(rest: str) -> tuple[list[str], list[str], str]:
    """The comma-separated host[:port] list of a URI; IPv6 addresses are in brackets.
    Returns hosts, ports (empty string when absent) and what follows the list."""
    hosts: list[str] = []
    ports: list[str] = []
    while True:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ConninfoError('end of string reached when looking for matching "]" in IPv6 host address in URI')
            if end == 1:
                raise ConninfoError("IPv6 host address may not be empty in URI")
            hosts.append(rest[1:end])
            i = end + 1
            if i < len(rest) and rest[i] not in ":/?,":
                raise ConninfoError(
                    f'unexpected character "{rest[i]}" after IPv6 host address in URI (expected ":" or "/")'
                )
        else:
            i = _end_of(rest, 0, ":/?,")
            hosts.append(rest[:i])
        port = ""
        if i < len(rest) and rest[i] == ":":
            end = _end_of(rest, i + 1, "/?,")
            port, i = rest[i + 1 : end], end
        ports.append(port)
        if i < len(rest) and rest[i] == ",":
            rest = rest[i + 1 :]
            continue
        return hosts, ports, rest[i:]


def _end_of(text: str, start: int, stops: str) -> int:
    """Index of the first character in `stops` at or after `start`, else len(text)."""
    for i in range(start, len(text)):
        if text[i] in stops:
            return i
    return len(text)


def _parse_query(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in query.split("&") if query else []:
        if item.count("=") > 1:
            raise ConninfoError(f'extra key/value separator "=" in URI query parameter: "{item.split("=")[0]}"')
        if "=" not in item:
            raise ConninfoError(f'missing key/value separator "=" in URI query parameter: "{item}"')
        raw_key, _, raw_value = item.partition("=")
        key = _percent_decode(raw_key, "query parameter")
        value = _percent_decode(raw_value, key)
        if key == "ssl" and value == "true":  # libpq's JDBC compatibility spelling
            key, value = "sslmode", "require"
        _check_keyword(key, in_uri=True)
        values[key] = value
    return values


def _percent_decode(text: str, what: str) -> str:
    """RFC 3986 percent-decoding as libpq does it: '+' stays '+', %00 is refused. Errors show
    only the bad token, never the value (it may be a password)."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            token = text[i : i + 3]
            if len(token) < 3 or not all(c in string.hexdigits for c in token[1:]):
                raise ConninfoError(f'invalid percent-encoded token in URI {what}: "{token}"')
            if token == "%00":
                raise ConninfoError(f"forbidden value %00 in percent-encoded URI {what}")
            out.append(int(token[1:], 16))
            i += 3
        else:
            out.extend(text[i].encode())
            i += 1
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ConninfoError(f"percent-encoded URI {what} is not valid UTF-8") from None


def _build_target(values: dict[str, str], sources: Mapping[str, str | None]) -> UpstreamTarget:
    """Turn raw keyword values into a checked UpstreamTarget."""

    def fail(keyword: str, message: str) -> ConninfoError:
        return ConninfoError(message, keyword=keyword, env=sources.get(keyword))

    def text(keyword: str) -> str | None:
        return values.get(keyword) or None

    hosts = _hosts(text("host"), text("hostaddr"), text("port"), fail)
    return UpstreamTarget(
        host=hosts[0].host,
        port=hosts[0].port,
        hostaddr=hosts[0].hostaddr,
        hosts=hosts,
        dbname=text("dbname"),
        user=text("user"),
        password=text("password"),
        sslmode=_sslmode(text("sslmode"), text("sslrootcert"), fail),
        sslrootcert=text("sslrootcert"),
        sslcert=text("sslcert"),
        sslkey=text("sslkey"),
        sslsni=_sslsni(text("sslsni"), fail),
        connect_timeout_s=_connect_timeout(text("connect_timeout"), fail),
        application_name=text("application_name"),
        options=text("options"),
        target_session_attrs=_choice(TargetSessionAttrs, "target_session_attrs", values, fail, TargetSessionAttrs.ANY),
        load_balance_hosts=_choice(LoadBalanceHosts, "load_balance_hosts", values, fail, LoadBalanceHosts.DISABLE),
    )


def _hosts(host: str | None, hostaddr: str | None, port: str | None, fail: _Fail) -> tuple[UpstreamHost, ...]:
    """libpq's connectOptions2: zip the host, hostaddr and port lists into one entry per host."""
    if host is None and hostaddr is None:
        raise fail("host", "no host: set host in the connection string or PGHOST")
    names = host.split(",") if host is not None else None
    addresses = hostaddr.split(",") if hostaddr is not None else None
    # libpq counts hostaddr entries when hostaddr is given, else host entries.
    count = len(addresses) if addresses is not None else len(names or ())
    if names is not None and addresses is not None and len(names) != count:
        raise fail("host", f"could not match {len(names)} host names to {count} hostaddr values")
    ports = port.split(",") if port is not None else [""]
    if len(ports) == 1:
        ports *= count
    elif len(ports) != count:
        raise fail("port", f"could not match {len(ports)} port numbers to {count} hosts")
    entries = []
    for i in range(count):
        name = names[i] if names is not None else ""
        address = (addresses[i] if addresses is not None else "") or None
        if address is not None and not is_numeric_address(address):
            raise fail("hostaddr", f'could not parse network address "{address}": Name or service not known')
        entries.append(UpstreamHost(name or address or DEFAULT_SOCKET_DIR, _port(ports[i], fail), address))
    return tuple(entries)


def _port(value: str, fail: _Fail) -> int:
    """One entry of the port list; empty means libpq's default, 5432."""
    if not value:
        return DEFAULT_PORT
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= 65535:
        raise fail("port", f'invalid port number: "{value}"')
    return int(digits)


def is_numeric_address(text: str) -> bool:
    """Whether glibc's getaddrinfo() with AI_NUMERICHOST, as libpq calls it for hostaddr, reads
    `text` as an address: IPv4 in inet_aton's forms (`10.0.0.5`, `10.5`, `0x0a.0.0.5`, `167772165`),
    else IPv6 with an optional `%scope` (a number, or for link-local addresses an interface name,
    which is not looked up here: the config layer does no I/O)."""
    if _is_inet_aton_exact(text):
        return True
    address, percent, scope = text.partition("%")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return False
    if not percent:
        return True
    if scope[:1].isdigit() and scope.isascii():
        return scope.isdigit() and int(scope) <= 0xFFFFFFFF
    packed = parsed.packed
    link_local = parsed.is_link_local or (packed[0] == 0xFF and packed[1] & 0x0F in (1, 2))
    return link_local and bool(scope)


def _is_inet_aton_exact(text: str) -> bool:
    """glibc's __inet_aton_exact: 1 to 4 dot-separated numbers in C notation (0x hex, leading-0
    octal, decimal), the last filling the remaining bytes, and nothing after them."""
    parts = text.split(".")
    if len(parts) > 4:
        return False
    numbers = []
    for part in parts:
        if not (part[:1].isascii() and part[:1].isdigit()):
            return False
        lower = part.lower()
        if lower.startswith("0x"):
            digits, base = lower[2:], 16
        elif lower.startswith("0") and len(lower) > 1:
            digits, base = lower[1:], 8
        else:
            digits, base = lower, 10
        if not digits or any(c not in "0123456789abcdef"[:base] for c in digits):
            return False
        numbers.append(int(digits, base))
    *leading, last = numbers
    return all(n <= 0xFF for n in leading) and last < 1 << (8 * (4 - len(leading)))


def _choice(kind: type[_E], keyword: str, values: Mapping[str, str], fail: _Fail, default: _E) -> _E:
    """An enumerated keyword; as in libpq, a value given but empty is invalid."""
    if keyword not in values:
        return default
    try:
        return kind(values[keyword])
    except ValueError:
        raise fail(keyword, f'invalid {keyword} value: "{values[keyword]}"') from None


def _sslmode(value: str | None, rootcert: str | None, fail: _Fail) -> SslMode:
    """sslmode with libpq's rules for sslrootcert (PostgreSQL docs 34.19.1 and 34.1.2)."""
    if value is None:
        # libpq 16+: sslrootcert=system changes the default sslmode to verify-full.
        return SslMode.VERIFY_FULL if rootcert == "system" else SslMode.PREFER
    try:
        mode = SslMode(value)
    except ValueError:
        raise fail("sslmode", f'invalid sslmode value: "{value}" (valid: {_SSLMODES})') from None
    if rootcert == "system" and mode is not SslMode.VERIFY_FULL:
        raise fail(
            "sslmode",
            f'weak sslmode "{value}" may not be used with sslrootcert=system (use "verify-full")',
        )
    if mode is SslMode.REQUIRE and rootcert is not None:
        # "If a root certificate file exists, the behavior of sslmode=require will be the same
        # as that of verify-ca" (34.19.1); only an explicitly given sslrootcert counts here.
        return SslMode.VERIFY_CA
    return mode


def _sslsni(value: str | None, fail: _Fail) -> bool:
    if value is None:
        return True
    if value not in ("0", "1"):
        raise fail("sslsni", f'invalid sslsni value: "{value}" (valid: 0, 1)')
    return value == "1"


def _connect_timeout(value: str | None, fail: _Fail) -> float | None:
    """libpq: seconds as an integer; zero or negative waits forever; 1 means 2 (34.1.2)."""
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        raise fail(
            "connect_timeout", f'invalid integer value "{value}" for connection option "connect_timeout"'
        ) from None
    if seconds <= 0:
        return None
    return float(max(seconds, 2))
