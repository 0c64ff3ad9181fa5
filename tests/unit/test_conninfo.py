"""libpq connection strings and PG* variables -> UpstreamTarget (PostgreSQL docs 34.1.1, 34.15)."""

from __future__ import annotations

import dataclasses
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgsidecar.config.conninfo import (
    URI_PREFIXES,
    ConninfoError,
    parse_conninfo,
    parse_keyword_value,
    parse_uri,
)
from pgsidecar.config.model import SslMode, UpstreamTarget, quote_conninfo_value

NO_ENV: dict[str, str] = {}


def parse(dsn: str, **env: str) -> UpstreamTarget:
    return parse_conninfo(dsn, env)


def error(dsn: str, **env: str) -> ConninfoError:
    with pytest.raises(ConninfoError) as info:
        parse_conninfo(dsn, env)
    return info.value


# ---------------------------------------------------------------- defaults


def test_libpq_defaults() -> None:
    target = parse("host=db.example.com")
    assert target == UpstreamTarget(host="db.example.com")
    assert target.port == 5432
    assert target.sslmode is SslMode.PREFER
    assert target.sslsni is True
    assert (target.dbname, target.user, target.password) == (None, None, None)
    assert target.connect_timeout_s is None


def test_no_host_anywhere_is_an_error() -> None:
    err = error("dbname=app")
    assert err.keyword == "host"
    assert "PGHOST" in str(err)
    with pytest.raises(ConninfoError):
        parse("")


# ---------------------------------------------------------------- key=value


def test_keyword_value_all_keys() -> None:
    target = parse(
        "host=db port=6000 dbname=app user=alice password=pw sslmode=verify-full "
        "sslrootcert=/ca.pem sslcert=/c.pem sslkey=/k.pem sslsni=0 connect_timeout=7 "
        "application_name=web options='-c statement_timeout=5s'"
    )
    assert target == UpstreamTarget(
        host="db",
        port=6000,
        dbname="app",
        user="alice",
        password="pw",
        sslmode=SslMode.VERIFY_FULL,
        sslrootcert="/ca.pem",
        sslcert="/c.pem",
        sslkey="/k.pem",
        sslsni=False,
        connect_timeout_s=7.0,
        application_name="web",
        options="-c statement_timeout=5s",
    )


def test_spaces_around_equals_and_between_pairs() -> None:
    target = parse("  host = db\t port=\n5433   dbname =app ")
    assert (target.host, target.port, target.dbname) == ("db", 5433, "app")


def test_quoted_value_with_spaces_escaped_quote_and_backslash() -> None:
    target = parse(r"host=db password='it\'s a \\secret' application_name='' user=bob")
    assert target.password == "it's a \\secret"
    assert target.application_name is None  # empty value: as if not set
    assert target.user == "bob"


def test_backslash_escapes_in_bare_value() -> None:
    target = parse(r"host=db password=a\ b\'c")
    assert target.password == "a b'c"


def test_quoted_value_may_be_followed_directly_by_next_pair() -> None:
    assert parse("host='db'port=7").port == 7


def test_value_after_equals_is_next_token_even_if_it_looks_like_a_pair() -> None:
    # libpq skips blanks after '=', so `dbname= user=x` sets dbname to "user=x".
    assert parse("host=db dbname= user=x").dbname == "user=x"


def test_later_duplicate_wins() -> None:
    assert parse("host=a host=b").host == "b"


def test_unterminated_quote() -> None:
    assert "unterminated quoted string" in str(error("host=db password='abc"))


def test_missing_equals() -> None:
    assert str(error("host=db dbname")) == 'missing "=" after "dbname" in connection info string'
    assert 'missing "=" after "justaname"' in str(error("justaname"))


def test_unknown_keyword_is_named() -> None:
    err = error("host=db colour=blue")
    assert str(err) == 'invalid connection option "colour"'
    assert err.keyword == "colour"


def test_keywords_are_case_sensitive_like_libpq() -> None:
    assert str(error("Host=db")) == 'invalid connection option "Host"'


def test_known_but_unsupported_libpq_keyword() -> None:
    err = error("host=db service=prod")
    assert "not supported" in str(err) and '"service"' in str(err)


@pytest.mark.parametrize(
    "keyword",
    [
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "gssencmode",
        "sslcompression",
        "fallback_application_name",
    ],
)
def test_accepted_and_ignored_keywords(keyword: str) -> None:
    assert parse(f"host=db {keyword}=1") == UpstreamTarget(host="db")


# ---------------------------------------------------------------- URIs


def test_uri_full() -> None:
    target = parse(
        "postgresql://alice:s3cret@db.example.com:6543/app"
        "?sslmode=verify-ca&sslrootcert=/ca.pem&application_name=web&connect_timeout=5"
    )
    assert target == UpstreamTarget(
        host="db.example.com",
        port=6543,
        dbname="app",
        user="alice",
        password="s3cret",
        sslmode=SslMode.VERIFY_CA,
        sslrootcert="/ca.pem",
        connect_timeout_s=5.0,
        application_name="web",
    )


def test_postgres_scheme_is_accepted() -> None:
    assert parse("postgres://db/app").dbname == "app"


def test_uri_percent_decoding_everywhere() -> None:
    target = parse("postgresql://al%40ice:p%40ss%3Aw%2Fd@db/my%20db?options=-c%20x%3D1")
    assert target.user == "al@ice"
    assert target.password == "p@ss:w/d"
    assert target.dbname == "my db"
    assert target.options == "-c x=1"


def test_uri_plus_is_not_a_space() -> None:
    assert parse("postgresql://db/a+b").dbname == "a+b"


def test_uri_password_may_contain_a_raw_colon() -> None:
    assert parse("postgresql://u:a:b@db").password == "a:b"


def test_uri_user_without_password() -> None:
    target = parse("postgresql://alice@db")
    assert (target.user, target.password) == ("alice", None)


def test_uri_ipv6_with_and_without_port() -> None:
    target = parse("postgresql://[::1]:5433/app")
    assert (target.host, target.port, target.dbname) == ("::1", 5433, "app")
    assert parse("postgresql://[2001:db8::7]/app").host == "2001:db8::7"
    assert parse("postgresql://u@[::1]").host == "::1"


def test_uri_ipv6_errors() -> None:
    assert "IPv6" in str(error("postgresql://[::1/app"))
    assert "may not be empty" in str(error("postgresql://[]/app"))
    assert "unexpected character" in str(error("postgresql://[::1]x/app"))


def test_uri_unix_socket_dir_percent_encoded_host() -> None:
    target = parse("postgresql://%2Fvar%2Frun%2Fpostgresql/app")
    assert target.host == "/var/run/postgresql"
    assert target.is_unix_socket


def test_uri_unix_socket_dir_in_query() -> None:
    target = parse("postgresql:///app?host=/var/run/postgresql&port=5433")
    assert (target.host, target.port, target.dbname) == ("/var/run/postgresql", 5433, "app")


def test_uri_query_overrides_authority() -> None:
    assert parse("postgresql://a:1/app?host=b&port=2").host == "b"


def test_uri_ssl_true_means_require() -> None:
    assert parse("postgresql://db?ssl=true").sslmode is SslMode.REQUIRE


def test_uri_without_path_or_with_bare_slash() -> None:
    assert parse("postgresql://db").dbname is None
    assert parse("postgresql://db/").dbname is None
    assert parse("postgresql://db:7").port == 7


def test_uri_unknown_query_parameter() -> None:
    err = error("postgresql://db/app?colour=blue")
    assert str(err) == 'invalid URI query parameter: "colour"'
    assert err.keyword == "colour"


def test_uri_query_syntax_errors() -> None:
    assert "missing key/value separator" in str(error("postgresql://db/app?sslmode"))
    assert "extra key/value separator" in str(error("postgresql://db/app?sslmode=a=b"))


def test_uri_bad_percent_encoding_does_not_leak_the_password() -> None:
    err = error("postgresql://u:hunter2%zz@db/app")
    assert '"%zz"' in str(err)
    assert "hunter2" not in str(err)
    assert "%00" in str(error("postgresql://u:abc%00@db"))


def test_multiple_hosts_flow_through_uri_and_key_value() -> None:
    # Was test_multiple_hosts_are_not_supported_yet; the multi-host rules are in
    # test_conninfo_multihost.py.
    assert [h.label() for h in parse("postgresql://a:5432,b:5433/app").hosts] == ["a:5432", "b:5433"]
    assert [h.host for h in parse("host=a,b").hosts] == ["a", "b"]
    assert str(error("host=a port=1,2")) == "could not match 2 port numbers to 1 hosts"


def test_uri_empty_host_falls_back_to_pghost() -> None:
    target = parse("postgresql:///app", PGHOST="envhost", PGPORT="7777")
    assert (target.host, target.port, target.dbname) == ("envhost", 7777, "app")


# ---------------------------------------------------------------- PG* variables

PG_ENV = {
    "PGHOST": "envhost",
    "PGPORT": "6000",
    "PGDATABASE": "envdb",
    "PGUSER": "envuser",
    "PGPASSWORD": "envpw",
    "PGSSLMODE": "verify-full",
    "PGSSLROOTCERT": "/env/ca.pem",
    "PGSSLCERT": "/env/c.pem",
    "PGSSLKEY": "/env/k.pem",
    "PGSSLSNI": "0",
    "PGCONNECT_TIMEOUT": "9",
    "PGAPPNAME": "envapp",
    "PGOPTIONS": "-c search_path=x",
}


def test_every_pg_variable_is_read() -> None:
    assert parse_conninfo("", PG_ENV) == UpstreamTarget(
        host="envhost",
        port=6000,
        dbname="envdb",
        user="envuser",
        password="envpw",
        sslmode=SslMode.VERIFY_FULL,
        sslrootcert="/env/ca.pem",
        sslcert="/env/c.pem",
        sslkey="/env/k.pem",
        sslsni=False,
        connect_timeout_s=9.0,
        application_name="envapp",
        options="-c search_path=x",
    )


def test_dsn_values_win_over_pg_variables() -> None:
    target = parse_conninfo("postgresql://u:pw@dsnhost:1/dsndb?sslmode=disable", PG_ENV)
    assert (target.host, target.port, target.dbname, target.user, target.password) == (
        "dsnhost",
        1,
        "dsndb",
        "u",
        "pw",
    )
    assert target.sslmode is SslMode.DISABLE
    assert target.application_name == "envapp"  # not in the DSN: from PGAPPNAME


def test_keyword_present_but_empty_blocks_the_variable_as_in_libpq() -> None:
    assert parse("host=db user=''", PGUSER="envuser").user is None


def test_empty_variable_is_ignored() -> None:
    assert parse("host=db", PGPORT="").port == 5432


def test_bad_value_from_a_variable_names_the_variable() -> None:
    err = error("host=db", PGSSLMODE="sometimes")
    assert err.env == "PGSSLMODE"
    assert err.keyword == "sslmode"
    assert error("host=db sslmode=sometimes").env is None


def test_pghostaddr_alone_is_the_host() -> None:
    assert parse("", PGHOSTADDR="10.0.0.5").host == "10.0.0.5"
    assert parse("hostaddr=10.0.0.5").host == "10.0.0.5"
    # Was: hostaddr together with host refused. Now libpq's rule: dial hostaddr, verify host.
    target = parse("host=db hostaddr=10.0.0.5")
    assert (target.host, target.hostaddr, target.is_unix_socket) == ("db", "10.0.0.5", False)


# ---------------------------------------------------------------- values


def test_invalid_sslmode_lists_valid_ones() -> None:
    message = str(error("host=db sslmode=maybe"))
    assert 'invalid sslmode value: "maybe"' in message
    for mode in SslMode:
        assert mode.value in message


@pytest.mark.parametrize("mode", list(SslMode))
def test_every_sslmode_name(mode: SslMode) -> None:
    assert parse(f"host=db sslmode={mode.value}").sslmode is mode


def test_require_with_explicit_rootcert_behaves_like_verify_ca() -> None:
    assert parse("host=db sslmode=require sslrootcert=/ca.pem").sslmode is SslMode.VERIFY_CA
    assert parse("host=db sslmode=require", PGSSLROOTCERT="/ca.pem").sslmode is SslMode.VERIFY_CA
    assert parse("host=db sslmode=require").sslmode is SslMode.REQUIRE
    assert parse("host=db sslrootcert=/ca.pem").sslmode is SslMode.PREFER


def test_sslrootcert_system_defaults_to_verify_full_and_refuses_weaker_modes() -> None:
    assert parse("host=db sslrootcert=system").sslmode is SslMode.VERIFY_FULL
    assert "weak sslmode" in str(error("host=db sslrootcert=system sslmode=require"))
    assert parse("host=db sslrootcert=system sslmode=verify-full").sslmode is SslMode.VERIFY_FULL


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", "5432x"])
def test_invalid_port(port: str) -> None:
    err = error(f"host=db port={port}")
    assert err.keyword == "port" and "invalid port number" in str(err)


@pytest.mark.parametrize(("value", "seconds"), [("10", 10.0), ("1", 2.0), ("0", None), ("-3", None)])
def test_connect_timeout_follows_libpq(value: str, seconds: float | None) -> None:
    assert parse(f"host=db connect_timeout={value}").connect_timeout_s == seconds


def test_invalid_connect_timeout_and_sslsni() -> None:
    assert error("host=db connect_timeout=5s").keyword == "connect_timeout"
    assert error("host=db sslsni=yes").keyword == "sslsni"


# ---------------------------------------------------------------- secrets and redaction


def test_password_never_in_repr_str_or_redacted() -> None:
    target = parse("postgresql://alice:hunter2@db/app")
    assert target.password == "hunter2"
    for shown in (repr(target), str(target), target.redacted()):
        assert "hunter2" not in shown
    assert target.redacted() == "host=db port=5432 dbname=app user=alice sslmode=prefer"


def test_redacted_quotes_values() -> None:
    target = UpstreamTarget(host="db", options="-c a=1", application_name="it's", sslsni=False)
    assert target.redacted() == ("host=db port=5432 sslmode=prefer sslsni=0 application_name='it\\'s' options='-c a=1'")


_value = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1)
_optional = st.none() | _value


@given(
    host=_value.filter(lambda h: "," not in h),
    port=st.integers(1, 65535),
    dbname=_optional,
    user=_optional,
    sslmode=st.sampled_from([m for m in SslMode if m is not SslMode.REQUIRE]),
    sslrootcert=st.none() | _value.filter(lambda v: v != "system"),
    sslsni=st.booleans(),
    timeout=st.none() | st.integers(2, 10_000).map(float),
    options=_optional,
)
def test_redacted_reads_back_as_the_same_target_without_password(
    host: str,
    port: int,
    dbname: str | None,
    user: str | None,
    sslmode: SslMode,
    sslrootcert: str | None,
    sslsni: bool,
    timeout: float | None,
    options: str | None,
) -> None:
    target = UpstreamTarget(
        host=host,
        port=port,
        dbname=dbname,
        user=user,
        password="secret",
        sslmode=sslmode,
        sslrootcert=sslrootcert,
        sslsni=sslsni,
        connect_timeout_s=timeout,
        options=options,
    )
    assert parse_conninfo(target.redacted(), NO_ENV) == dataclasses.replace(target, password=None)


# ---------------------------------------------------------------- against libpq itself


def _libpq_parse(dsn: str) -> dict[str, str] | None:
    """libpq's own PQconninfoParse through psycopg (a test dependency); None if it refuses."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError:
        return None


def _ours(dsn: str) -> dict[str, str] | None:
    try:
        return parse_uri(dsn) if dsn.startswith(URI_PREFIXES) else parse_keyword_value(dsn)
    except ConninfoError:
        return None


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db port=5433 dbname=app",
        "  host = db\tdbname=\n'my db' ",
        r"host=db password='it\'s \\ here' user=a\ b",
        "host=db dbname= user=x",
        "host='db'port=7",
        "host=db password=''",
        "host=a host=b",
        "host=db dbname",
        "host=db password='abc",
        "postgresql://alice:s3cret@db.example.com:6543/app?sslmode=verify-ca&application_name=x",
        "postgres://db",
        "postgresql://",
        "postgresql:///app?host=/var/run/postgresql",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/app",
        "postgresql://al%40ice:p%40ss%3Aw@db/my%20db",
        "postgresql://u:a:b@db/a+b",
        "postgresql://[::1]:5433/app",
        "postgresql://[2001:db8::7]",
        "postgresql://u@[::1]",
        "postgresql://db:7",
        "postgresql://db/",
        "postgresql://db?ssl=true",
        "postgresql://db/app?sslmode",
        "postgresql://db/app?sslmode=a=b",
        "postgresql://[::1/app",
        "postgresql://[]/app",
        "postgresql://[::1]x/app",
        "postgresql://u:bad%zz@db",
        "postgresql://u:bad%00@db",
        "postgresql://a:1,b:2/app",
        "postgresql://a,b/app",
    ],
)
def test_raw_parse_matches_libpq(dsn: str) -> None:
    assert _ours(dsn) == _libpq_parse(dsn)


_KEYWORDS = ["host", "port", "dbname", "user", "password", "options", "application_name"]


@given(
    pairs=st.lists(st.tuples(st.sampled_from(_KEYWORDS), _value), min_size=1, max_size=5),
    quote_all=st.booleans(),
)
def test_quoted_key_value_matches_libpq(pairs: list[tuple[str, str]], quote_all: bool) -> None:
    parts = []
    for keyword, value in pairs:
        quoted = quote_conninfo_value(value)
        if quote_all and not quoted.startswith("'"):
            quoted = "'" + quoted.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{keyword}={quoted}")
    dsn = " ".join(parts)
    assert _ours(dsn) == _libpq_parse(dsn) == dict(pairs)


@given(
    user=_value,
    password=_value,
    host=_value.filter(lambda h: "," not in h),
    dbname=_value,
    appname=_value,
)
def test_percent_encoded_uri_matches_libpq(user: str, password: str, host: str, dbname: str, appname: str) -> None:
    def enc(text: str) -> str:
        return urllib.parse.quote(text, safe="")

    dsn = f"postgresql://{enc(user)}:{enc(password)}@{enc(host)}/{enc(dbname)}?application_name={enc(appname)}"
    expected = {
        "user": user,
        "password": password,
        "host": host,
        "dbname": dbname,
        "application_name": appname,
    }
    assert _ours(dsn) == _libpq_parse(dsn) == expected


_KV_PIECES = ["host", "port", "=", " ", "\t", "'", "\\", "a", "x y"]
_URI_PIECES = ["@", ":", "/", "?", "&", "=", "[", "]", ",", "%2F", "%4", "a", "host", "sslmode"]
_URI_PIECES += ["require", "::1", "5"]


@given(
    st.one_of(
        st.lists(st.sampled_from(_KV_PIECES), max_size=12).map("".join),
        st.lists(st.sampled_from(_URI_PIECES), max_size=12).map(lambda parts: "postgresql://" + "".join(parts)),
    )
)
def test_fuzzed_strings_parse_or_fail_exactly_like_libpq(dsn: str) -> None:
    assert _ours(dsn) == _libpq_parse(dsn)
