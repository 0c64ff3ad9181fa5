"""The client side of the sidecar before a session starts: local TLS in its three modes,
GSSENCRequest, the cleartext-password rule, and NegotiateProtocolVersion.

docs/architecture.md (Auth): local TLS is on by default with a certificate generated at start, a configured
certificate serves apps that verify, `listen.tls: disable` answers N; GSSENCRequest is always N.
"""

from __future__ import annotations

import socket

import psycopg
import psycopg2
import pytest

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.connection import SessionPolicy, SidecarConnection
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from tests.fixtures.certs import make_pki
from tests.fixtures.sidecar import upstream_dsn_for
from tests.integration.test_cancel import RawClient

pytestmark = pytest.mark.server


def _select_one(conn) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


# -- default: a certificate generated at start ---------------------------------------------


def test_default_tls_require_works_and_is_in_use(pg, sidecar):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"], sslmode="require"))
    try:
        assert conn.info.ssl_in_use
        assert conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
        _select_one(conn)
    finally:
        conn.close()


def test_default_tls_still_allows_plaintext_on_loopback(pg, sidecar):
    conn = psycopg2.connect(sidecar.dsn(password=pg.users["app"], sslmode="disable"))
    try:
        assert not conn.info.ssl_in_use
        _select_one(conn)
    finally:
        conn.close()


def test_generated_certificate_fails_verification_against_an_unrelated_ca(pg, sidecar):
    """verify-full against the generated certificate must fail: it is not signed by any CA the
    app trusts, which is why a configured certificate exists."""
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
        psycopg2.connect(sidecar.dsn(password=pg.users["app"], sslmode="verify-full", sslrootcert=pg.pki.ca_cert))


# -- configured certificate and key -------------------------------------------------------


def test_configured_certificate_passes_verify_full(pg, sidecar_factory, tmp_path):
    pki = make_pki(tmp_path / "listen-pki")
    private = sidecar_factory(
        upstream_dsn_for(pg),
        env={"PGSIDECAR_LISTEN_TLS_CERT": pki.server_cert, "PGSIDECAR_LISTEN_TLS_KEY": pki.server_key},
    )
    conn = psycopg2.connect(private.dsn(password=pg.users["app"], sslmode="verify-full", sslrootcert=pki.ca_cert))
    try:
        assert conn.info.ssl_in_use
        _select_one(conn)
    finally:
        conn.close()
    # The upstream CA does not vouch for the listen certificate: proves which one was served.
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
        psycopg2.connect(private.dsn(password=pg.users["app"], sslmode="verify-full", sslrootcert=pg.pki.ca_cert))


# -- listen.tls: disable -------------------------------------------------------------------


@pytest.fixture
def no_tls_sidecar(pg, sidecar_factory):
    return sidecar_factory(upstream_dsn_for(pg), env={"PGSIDECAR_LISTEN_TLS": "off"})


def test_tls_off_refuses_sslmode_require(pg, no_tls_sidecar):
    with pytest.raises(psycopg2.OperationalError, match="server does not support SSL"):
        psycopg2.connect(no_tls_sidecar.dsn(password=pg.users["app"], sslmode="require"))


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_tls_off_serves_prefer_and_disable_in_plaintext(pg, no_tls_sidecar, sslmode):
    conn = psycopg2.connect(no_tls_sidecar.dsn(password=pg.users["app"], sslmode=sslmode))
    try:
        assert not conn.info.ssl_in_use
        _select_one(conn)
    finally:
        conn.close()


def test_tls_off_answers_sslrequest_with_n(pg, no_tls_sidecar):
    """55.2.10: the server answers SSLRequest with one byte; after N the client may go on in
    plaintext on the same connection."""
    client = RawClient.connect(no_tls_sidecar.port)
    try:
        client.send(fe.SSLRequest().encode())
        assert client.sock.recv(1) == b"N"
        client.login("app", pg.users["app"])
        assert client.scalar("SELECT 7 * 6") == "42"
    finally:
        client.close()


# -- GSSENCRequest -------------------------------------------------------------------------


def test_gssencrequest_is_answered_n_and_the_session_goes_on(pg, sidecar):
    """55.2.11: after N the client may send SSLRequest or the StartupMessage on the same socket."""
    client = RawClient.connect(sidecar.port)
    try:
        request = fe.GSSENCRequest().encode()
        assert len(request) == 8
        client.send(request)
        assert client.sock.recv(1) == b"N"
        client.login("app", pg.users["app"])
        assert client.scalar("SELECT current_user") == "app"
    finally:
        client.close()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_gssencmode_prefer_still_connects(pg, sidecar, driver):
    dsn = sidecar.dsn(password=pg.users["app"], gssencmode="prefer")
    conn = psycopg2.connect(dsn) if driver == "psycopg2" else psycopg.connect(dsn)
    try:
        _select_one(conn)
    finally:
        conn.close()


# -- cleartext passwords only over loopback, a unix socket or TLS ---------------------------
# A test cannot get a non-loopback peer without leaving loopback, so the rule is checked on the
# brain directly with the events the runtime would feed it.


def _startup_commands(trusted: bool, tls: bool) -> list[object]:
    brain = SidecarConnection(SessionPolicy(), secret=b"\x01\x02\x03\x04")
    out = brain.handle(ev.ClientConnected(0.0, 0.0, "192.0.2.7:40000", trusted))
    if tls:
        out = brain.handle(ev.ClientData(0.0, fe.SSLRequest().encode()))
        assert any(isinstance(c, cmd.StartClientTLS) for c in out)
        brain.handle(ev.ClientTLSStarted(0.0))
    return brain.handle(ev.ClientData(0.0, fe.StartupMessage({"user": "app", "database": "app"}).encode()))


def test_plaintext_client_from_a_non_loopback_peer_gets_28000():
    out = _startup_commands(trusted=False, tls=False)
    sent = b"".join(c.data for c in out if isinstance(c, cmd.SendToClient))
    assert sent[:1] == be.ErrorResponse.TYPE
    error = be.ErrorResponse.decode(sent[5:])
    assert (error.severity, error.code) == ("FATAL", sqlstate.INVALID_AUTHORIZATION_SPECIFICATION)
    assert any(isinstance(c, cmd.CloseClient) for c in out)
    assert any(isinstance(c, cmd.Log) and "192.0.2.7" in c.message for c in out)
    assert not any(isinstance(c, cmd.OpenServer) for c in out)


@pytest.mark.parametrize(("trusted", "tls"), [(True, False), (False, True)])
def test_loopback_or_tls_client_goes_upstream(trusted, tls):
    out = _startup_commands(trusted=trusted, tls=tls)
    assert any(isinstance(c, cmd.OpenServer) for c in out)
    assert not any(isinstance(c, cmd.SendToClient) for c in out)


# -- NegotiateProtocolVersion ---------------------------------------------------------------


def _first_reply(port: int, protocol: int, **params: str) -> tuple[RawClient, bytes, bytes]:
    client = RawClient(socket.create_connection(("127.0.0.1", port), timeout=10))
    client.startup("app", "app", protocol=protocol, **params)
    kind, payload = client.read_message()
    return client, kind, payload


@pytest.mark.parametrize(
    ("protocol", "options"),
    [(fe.PROTOCOL_3_2, {}), (fe.PROTOCOL_3_0, {"_pq_.foo": "on"}), (fe.PROTOCOL_3_2, {"_pq_.foo": "on"})],
    ids=["3.2", "_pq_.foo", "3.2+_pq_.foo"],
)
def test_negotiate_protocol_version_like_the_server(pg, sidecar, protocol, options):
    """55.2.1: a newer minor version or unknown _pq_ options get NegotiateProtocolVersion before
    authentication. The sidecar's message must equal PostgreSQL 15's own, byte for byte."""
    direct, kind, server_payload = _first_reply(pg.port, protocol, **options)
    try:
        assert kind == be.NegotiateProtocolVersion.TYPE, "the server itself must send 'v' first"
        assert direct.read_message()[0] == b"R", "then it asks for authentication"
    finally:
        direct.sock.close()
    via, kind, payload = _first_reply(sidecar.port, protocol, **options)
    try:
        assert kind == be.NegotiateProtocolVersion.TYPE
        assert be.NegotiateProtocolVersion.decode(payload) == be.NegotiateProtocolVersion.decode(server_payload)
        assert payload == server_payload
        via.finish_login(pg.users["app"])
        assert via.scalar("SELECT 1") == "1", "the session goes on at protocol 3.0"
    finally:
        via.close()


def test_libpq_asking_for_protocol_3_2_downgrades_through_the_sidecar(pg, sidecar):
    """libpq 18 with max_protocol_version=latest asks for 3.2 and accepts the server's 3.0."""
    if psycopg.pq.version() < 180000:
        pytest.skip(f"libpq {psycopg.pq.version()} cannot ask for protocol 3.2")
    conn = psycopg.connect(sidecar.dsn(password=pg.users["app"], max_protocol_version="latest"))
    try:
        assert conn.info.pgconn.protocol_version == 3
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()
