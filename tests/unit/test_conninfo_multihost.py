"""libpq's multi-host connection strings (fe-connect.c connectOptions2; PostgreSQL docs 34.1.1.3,
34.1.2, 34.15): host / hostaddr / port lists, target_session_attrs, load_balance_hosts."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pgsidecar.config.conninfo import (
    DEFAULT_SOCKET_DIR,
    PG_ENVIRONMENT,
    ConninfoError,
    is_numeric_address,
    parse_conninfo,
)
from pgsidecar.config.model import (
    LoadBalanceHosts,
    SslMode,
    TargetSessionAttrs,
    UpstreamHost,
    UpstreamTarget,
)

NO_ENV: dict[str, str] = {}


def parse(dsn: str, **env: str) -> UpstreamTarget:
    return parse_conninfo(dsn, env)


def error(dsn: str, **env: str) -> ConninfoError:
    with pytest.raises(ConninfoError) as info:
        parse_conninfo(dsn, env)
    return info.value


def entries(target: UpstreamTarget) -> list[tuple[str, int, str | None]]:
    return [(h.host, h.port, h.hostaddr) for h in target.hosts]


# ---------------------------------------------------------------- host and port lists


def test_host_list_with_one_port_for_all() -> None:
    target = parse("host=a,b,c port=6000")
    assert entries(target) == [("a", 6000, None), ("b", 6000, None), ("c", 6000, None)]
    assert (target.host, target.port, target.hostaddr) == ("a", 6000, None)


def test_host_list_with_a_port_each_and_empty_port_entries_defaulting_to_5432() -> None:
    assert entries(parse("host=a,b,c port=1,,3")) == [("a", 1, None), ("b", 5432, None), ("c", 3, None)]
    assert entries(parse("host=a,b")) == [("a", 5432, None), ("b", 5432, None)]
    assert entries(parse("host=a,b port=,")) == [("a", 5432, None), ("b", 5432, None)]


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=a,b,c port=1,2", "could not match 2 port numbers to 3 hosts"),
        ("host=a,b port=1,2,3", "could not match 3 port numbers to 2 hosts"),
        ("host=a port=,", "could not match 2 port numbers to 1 hosts"),
        ("hostaddr=10.0.0.1 port=1,2", "could not match 2 port numbers to 1 hosts"),
        ("postgresql://a:1,b:2/db?port=1,2,3", "could not match 3 port numbers to 2 hosts"),
    ],
)
def test_port_count_must_be_one_or_one_per_host(dsn: str, message: str) -> None:
    err = error(dsn)
    assert str(err) == message
    assert err.keyword == "port"


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", "5432x"])
def test_every_port_entry_is_checked(port: str) -> None:
    err = error(f"host=a,b port=5432,{port}")
    assert str(err) == f'invalid port number: "{port}"'
    assert err.keyword == "port"


def test_empty_host_entry_is_debians_default_socket_directory() -> None:
    assert DEFAULT_SOCKET_DIR == "/var/run/postgresql"
    target = parse("host=,b port=5433")
    assert entries(target) == [("/var/run/postgresql", 5433, None), ("b", 5433, None)]
    assert target.is_unix_socket
    assert entries(parse("host=a,")) == [("a", 5432, None), ("/var/run/postgresql", 5432, None)]
    assert [h.host for h in parse("host=,").hosts] == [DEFAULT_SOCKET_DIR] * 2


def test_no_host_at_all_is_still_an_error_not_the_default_socket() -> None:
    for dsn in ("", "host=", "host='' hostaddr=''", "port=1,2"):
        err = error(dsn)
        assert err.keyword == "host" and str(err).startswith("no host:")


def test_unix_socket_directories_in_a_list() -> None:
    target = parse("host=/run/a,/run/b,db port=1,2,3")
    assert [h.is_unix_socket for h in target.hosts] == [True, True, False]


# ---------------------------------------------------------------- hostaddr


def test_hostaddr_alone_gives_the_host_list() -> None:
    target = parse("hostaddr=10.0.0.1,::1 port=1,2")
    assert entries(target) == [("10.0.0.1", 1, "10.0.0.1"), ("::1", 2, "::1")]
    assert target.hostaddr == "10.0.0.1"


def test_host_and_hostaddr_zip_together() -> None:
    target = parse("host=db1,db2 hostaddr=10.0.0.1,10.0.0.2")
    assert entries(target) == [("db1", 5432, "10.0.0.1"), ("db2", 5432, "10.0.0.2")]
    assert (target.host, target.hostaddr) == ("db1", "10.0.0.1")


def test_empty_entries_in_host_and_hostaddr_lists() -> None:
    # libpq: a hostaddr entry wins; with an empty hostaddr the host name is resolved; with both
    # empty the default host (socket directory) is used.
    target = parse("host=,db2,db3,/tmp hostaddr=10.0.0.1,,10.0.0.3,")
    assert entries(target) == [
        ("10.0.0.1", 5432, "10.0.0.1"),
        ("db2", 5432, None),
        ("db3", 5432, "10.0.0.3"),
        ("/tmp", 5432, None),
    ]
    assert entries(parse("hostaddr=10.0.0.1,")) == [("10.0.0.1", 5432, "10.0.0.1"), (DEFAULT_SOCKET_DIR, 5432, None)]


def test_hostaddr_makes_a_socket_directory_host_tcp() -> None:
    target = parse("host=/tmp hostaddr=127.0.0.1")
    assert not target.is_unix_socket
    assert not target.hosts[0].is_unix_socket


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=a,b hostaddr=10.0.0.1,10.0.0.2,10.0.0.3", "could not match 2 host names to 3 hostaddr values"),
        ("host=a,b,c,d hostaddr=10.0.0.1,10.0.0.2,10.0.0.3", "could not match 4 host names to 3 hostaddr values"),
        ("host=a,b hostaddr=10.0.0.1", "could not match 2 host names to 1 hostaddr values"),
        ("host=a hostaddr=10.0.0.1,", "could not match 1 host names to 2 hostaddr values"),
    ],
)
def test_host_count_must_match_hostaddr_count(dsn: str, message: str) -> None:
    assert str(error(dsn)) == message


def test_hostaddr_count_is_checked_before_port_count_as_in_libpq() -> None:
    assert "host names" in str(error("host=a,b hostaddr=10.0.0.1 port=1,2,3"))


@pytest.mark.parametrize("address", ["db.example.com", "10.0.0.256", "1.2.3.4.5", "[::1]", "::1%", " 10.0.0.1", "0x"])
def test_hostaddr_must_be_numeric(address: str) -> None:
    err = error(f"host=a,b hostaddr={quote('10.0.0.1,' + address)}")
    assert str(err) == f'could not parse network address "{address}": Name or service not known'
    assert err.keyword == "hostaddr" and err.env is None


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.5",
        "10.5",  # inet_aton forms, which getaddrinfo(AI_NUMERICHOST) accepts
        "0x0a.0.0.5",
        "012.0.0.5",
        "167772165",
        "::1",
        "2001:db8::7",
        "::ffff:10.0.0.5",
        "fe80::1%eth0",
        "fe80::1%2",
        "2001:db8::1%7",
    ],
)
def test_numeric_addresses_libpq_accepts(address: str) -> None:
    assert is_numeric_address(address)
    assert parse(f"hostaddr={address}").hostaddr == address


@pytest.mark.parametrize(
    "address",
    [
        "08.0.0.1",
        "0x1g",
        "1..2",
        "10.0.0.1.",
        "4294967296",
        "10.16777216",
        "::1%lo",
        "fe80::1%",
        "::ffff:10.1",
        "1::2::3",
    ],
)
def test_non_numeric_addresses_libpq_refuses(address: str) -> None:
    assert not is_numeric_address(address)


_ADDRESS_PIECES = [
    "0",
    "1",
    "7",
    "8",
    "9",
    "25",
    "255",
    "256",
    "0x",
    "a",
    "f",
    "g",
    "X",
    ".",
    ":",
    "::",
    "%",
    "%1",
    " ",
]


@given(st.lists(st.sampled_from(_ADDRESS_PIECES), min_size=1, max_size=10).map("".join))
def test_numeric_address_matches_getaddrinfo_numerichost(text: str) -> None:
    """What libpq calls for hostaddr: glibc's getaddrinfo(AI_NUMERICHOST), which reads a numeric
    string and never touches the network. Interface-name scopes are left out: the config layer
    cannot look interfaces up."""
    assume("%" not in text or text.partition("%")[2].isdigit())
    try:
        socket.getaddrinfo(text.encode(), None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        expected = True
    except socket.gaierror:
        expected = False
    assert is_numeric_address(text) is expected


# ---------------------------------------------------------------- URIs


def test_uri_host_port_lists() -> None:
    assert entries(parse("postgresql://a:5432,b:5433/db")) == [("a", 5432, None), ("b", 5433, None)]
    assert entries(parse("postgresql://[::1]:5432,b/db")) == [("::1", 5432, None), ("b", 5432, None)]
    # A host without a port in the list leaves its entry empty: the default port.
    assert entries(parse("postgresql://a,b:5433/db")) == [("a", 5432, None), ("b", 5433, None)]
    assert entries(parse("postgresql://a,[2001:db8::1]:7/db")) == [("a", 5432, None), ("2001:db8::1", 7, None)]


def test_uri_query_host_port_hostaddr_lists() -> None:
    target = parse("postgresql:///db?host=a,b&port=1,2&hostaddr=10.0.0.1,10.0.0.2")
    assert entries(target) == [("a", 1, "10.0.0.1"), ("b", 2, "10.0.0.2")]
    assert entries(parse("postgresql://a,b/db?port=7")) == [("a", 7, None), ("b", 7, None)]
    assert entries(parse("postgresql://x/db?host=%2Frun%2Fpg,y")) == [("/run/pg", 5432, None), ("y", 5432, None)]


def test_uri_target_session_attrs_and_load_balance_hosts() -> None:
    target = parse("postgresql://a,b/db?target_session_attrs=read-write&load_balance_hosts=random")
    assert target.target_session_attrs is TargetSessionAttrs.READ_WRITE
    assert target.load_balance_hosts is LoadBalanceHosts.RANDOM


# ---------------------------------------------------------------- target_session_attrs, load_balance_hosts


def test_defaults() -> None:
    target = parse("host=a,b")
    assert target.target_session_attrs is TargetSessionAttrs.ANY
    assert target.load_balance_hosts is LoadBalanceHosts.DISABLE
    assert UpstreamTarget(host="a").target_session_attrs is TargetSessionAttrs.ANY


@pytest.mark.parametrize("attrs", list(TargetSessionAttrs))
def test_every_target_session_attrs_value(attrs: TargetSessionAttrs) -> None:
    assert parse(f"host=a target_session_attrs={attrs.value}").target_session_attrs is attrs


@pytest.mark.parametrize("mode", list(LoadBalanceHosts))
def test_every_load_balance_hosts_value(mode: LoadBalanceHosts) -> None:
    assert parse(f"host=a load_balance_hosts={mode.value}").load_balance_hosts is mode


@pytest.mark.parametrize("value", ["x", "ANY", "read_write", "''", "1"])
def test_invalid_target_session_attrs(value: str) -> None:
    err = error(f"host=a target_session_attrs={value}")
    shown = "" if value == "''" else value
    assert str(err) == f'invalid target_session_attrs value: "{shown}"'
    assert err.keyword == "target_session_attrs"


@pytest.mark.parametrize("value", ["x", "Random", "''", "true"])
def test_invalid_load_balance_hosts(value: str) -> None:
    err = error(f"host=a load_balance_hosts={value}")
    shown = "" if value == "''" else value
    assert str(err) == f'invalid load_balance_hosts value: "{shown}"'
    assert err.keyword == "load_balance_hosts"


# ---------------------------------------------------------------- PG* variables


def test_new_variables_are_known() -> None:
    assert PG_ENVIRONMENT["hostaddr"] == "PGHOSTADDR"
    assert PG_ENVIRONMENT["target_session_attrs"] == "PGTARGETSESSIONATTRS"
    assert PG_ENVIRONMENT["load_balance_hosts"] == "PGLOADBALANCEHOSTS"


def test_lists_and_modes_from_the_environment() -> None:
    target = parse(
        "",
        PGHOST="a,b",
        PGHOSTADDR="10.0.0.1,10.0.0.2",
        PGPORT="1,2",
        PGTARGETSESSIONATTRS="prefer-standby",
        PGLOADBALANCEHOSTS="random",
    )
    assert entries(target) == [("a", 1, "10.0.0.1"), ("b", 2, "10.0.0.2")]
    assert target.target_session_attrs is TargetSessionAttrs.PREFER_STANDBY
    assert target.load_balance_hosts is LoadBalanceHosts.RANDOM


def test_pghostaddr_alone_and_with_a_dsn_host() -> None:
    assert entries(parse("", PGHOSTADDR="10.0.0.1,10.0.0.2")) == [
        ("10.0.0.1", 5432, "10.0.0.1"),
        ("10.0.0.2", 5432, "10.0.0.2"),
    ]
    assert entries(parse("host=db", PGHOSTADDR="10.0.0.9")) == [("db", 5432, "10.0.0.9")]


def test_dsn_wins_over_the_new_variables() -> None:
    target = parse("host=a target_session_attrs=primary", PGTARGETSESSIONATTRS="standby", PGLOADBALANCEHOSTS="random")
    assert target.target_session_attrs is TargetSessionAttrs.PRIMARY
    assert target.load_balance_hosts is LoadBalanceHosts.RANDOM


def test_empty_variables_are_ignored() -> None:
    target = parse("host=a", PGTARGETSESSIONATTRS="", PGLOADBALANCEHOSTS="", PGHOSTADDR="")
    assert (target.target_session_attrs, target.load_balance_hosts, target.hostaddr) == (
        TargetSessionAttrs.ANY,
        LoadBalanceHosts.DISABLE,
        None,
    )


@pytest.mark.parametrize(
    ("env", "keyword", "variable"),
    [
        ({"PGTARGETSESSIONATTRS": "master"}, "target_session_attrs", "PGTARGETSESSIONATTRS"),
        ({"PGLOADBALANCEHOSTS": "yes"}, "load_balance_hosts", "PGLOADBALANCEHOSTS"),
        ({"PGHOSTADDR": "nope"}, "hostaddr", "PGHOSTADDR"),
        ({"PGPORT": "1,2,3"}, "port", "PGPORT"),
    ],
)
def test_bad_values_from_variables_name_the_variable(env: dict[str, str], keyword: str, variable: str) -> None:
    with pytest.raises(ConninfoError) as info:
        parse_conninfo("host=a", env)
    assert (info.value.keyword, info.value.env) == (keyword, variable)


# ---------------------------------------------------------------- the model


def test_single_host_construction_fills_hosts() -> None:
    target = UpstreamTarget(host="db", port=6000)
    assert target.hosts == (UpstreamHost("db", 6000),)
    assert target.hostaddr is None
    with_addr = UpstreamTarget(host="db", hostaddr="10.0.0.1")
    assert with_addr.hosts == (UpstreamHost("db", 5432, "10.0.0.1"),)
    assert parse("host=db port=6000") == target


def test_hosts_must_start_with_host_port_hostaddr() -> None:
    with pytest.raises(ValueError, match="first of hosts"):
        UpstreamTarget(host="a", hosts=(UpstreamHost("b", 5432),))
    with pytest.raises(ValueError, match="first of hosts"):
        UpstreamTarget(host="a", port=1, hosts=(UpstreamHost("a", 5432),))


def test_at_gives_a_single_host_copy() -> None:
    target = parse(
        "host=a,b hostaddr=,10.0.0.2 port=1,2 user=u password=pw sslmode=require target_session_attrs=primary"
    )
    second = target.at(1)
    assert (second.host, second.port, second.hostaddr) == ("b", 2, "10.0.0.2")
    assert second.hosts == (target.hosts[1],)
    assert (second.user, second.password, second.sslmode) == ("u", "pw", SslMode.REQUIRE)
    assert second.target_session_attrs is TargetSessionAttrs.PRIMARY
    assert second == dataclasses.replace(target, host="b", port=2, hostaddr="10.0.0.2", hosts=(target.hosts[1],))
    assert target.at(0).hosts == (UpstreamHost("a", 1),)
    assert target.at(-1) == second
    single = UpstreamTarget(host="db")
    assert single.at(0) == single
    with pytest.raises(IndexError):
        target.at(2)


def test_label() -> None:
    assert UpstreamHost("db", 5432).label() == "db:5432"
    assert UpstreamHost("db", 5432, "10.0.0.1").label() == "db (10.0.0.1):5432"
    assert UpstreamHost("10.0.0.1", 5432, "10.0.0.1").label() == "10.0.0.1:5432"
    assert UpstreamHost("::1", 5433).label() == "[::1]:5433"
    assert UpstreamHost("/var/run/postgresql", 5432).label() == "/var/run/postgresql:5432"


def test_upstream_host_unix_socket() -> None:
    assert UpstreamHost("/tmp", 5432).is_unix_socket
    assert not UpstreamHost("/tmp", 5432, "127.0.0.1").is_unix_socket
    assert not UpstreamHost("db", 5432).is_unix_socket


# ---------------------------------------------------------------- redacted()


def test_redacted_writes_the_whole_list() -> None:
    target = parse(
        "postgresql://u:hunter2@a:5432,b:5433/app?hostaddr=10.0.0.1,&target_session_attrs=read-only"
        "&load_balance_hosts=random"
    )
    shown = target.redacted()
    assert shown == (
        "host=a,b hostaddr=10.0.0.1, port=5432,5433 dbname=app user=u sslmode=prefer "
        "target_session_attrs=read-only load_balance_hosts=random"
    )
    assert "hunter2" not in shown and "hunter2" not in repr(target)
    assert parse_conninfo(shown, NO_ENV) == dataclasses.replace(target, password=None)


def test_redacted_single_port_and_defaults_left_out() -> None:
    assert parse("host=a,b port=7").redacted() == "host=a,b port=7 sslmode=prefer"
    assert UpstreamTarget(host="db").redacted() == "host=db port=5432 sslmode=prefer"


_name = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00,"),
    min_size=1,
    max_size=20,
)
_address = st.sampled_from(["10.0.0.1", "192.168.1.2", "::1", "2001:db8::5", "fe80::1%eth0", "127.1"])
_entry = st.builds(
    lambda host, port, addr, same: UpstreamHost(addr if (same and addr) else host, port, addr),
    _name,
    st.integers(1, 65535),
    st.none() | _address,
    st.booleans(),
)


@given(
    hosts=st.lists(_entry, min_size=1, max_size=4).map(tuple),
    attrs=st.sampled_from(list(TargetSessionAttrs)),
    balance=st.sampled_from(list(LoadBalanceHosts)),
    dbname=st.none() | _name,
)
def test_redacted_reads_back_as_the_same_multi_host_target(
    hosts: tuple[UpstreamHost, ...],
    attrs: TargetSessionAttrs,
    balance: LoadBalanceHosts,
    dbname: str | None,
) -> None:
    target = UpstreamTarget(
        host=hosts[0].host,
        port=hosts[0].port,
        hostaddr=hosts[0].hostaddr,
        hosts=hosts,
        dbname=dbname,
        password="secret",
        target_session_attrs=attrs,
        load_balance_hosts=balance,
    )
    shown = target.redacted()
    assert "secret" not in shown
    assert parse_conninfo(shown, NO_ENV) == dataclasses.replace(target, password=None)
    for i in range(len(hosts)):
        single = target.at(i)
        assert parse_conninfo(single.redacted(), NO_ENV) == dataclasses.replace(single, password=None)


# ---------------------------------------------------------------- against libpq itself


@pytest.mark.parametrize(
    "dsn",
    [
        "host=/nonexistent/a,/nonexistent/b,/nonexistent/c port=1,2",
        "host=/nonexistent/a,/nonexistent/b port=1,2,3",
        "host=/nonexistent/a port=,",
        "host=/nonexistent/a,/nonexistent/b hostaddr=127.0.0.1,127.0.0.2,127.0.0.3",
        "host=/nonexistent/a,/nonexistent/b,/nonexistent/c,/nonexistent/d hostaddr=127.0.0.1,127.0.0.2,127.0.0.3",
        "host=/nonexistent/a target_session_attrs=x",
        "host=/nonexistent/a target_session_attrs=''",
        "host=/nonexistent/a target_session_attrs=ANY",
        "host=/nonexistent/a load_balance_hosts=x",
        "host=/nonexistent/a load_balance_hosts=''",
    ],
)
def test_option_errors_match_libpq(dsn: str) -> None:
    """libpq refuses these in connectOptions2, before it resolves or dials anything (the hosts are
    socket directories that do not exist, in case a libpq ever accepted one)."""
    pq = pytest.importorskip("psycopg.pq")
    conn = pq.PGconn.connect_start(dsn.encode())
    try:
        assert conn.status == pq.ConnStatus.BAD
        libpq_message = conn.error_message.decode().strip()
    finally:
        conn.finish()
    assert str(error(dsn)) == libpq_message
