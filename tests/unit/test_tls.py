"""TLS contexts per libpq sslmode, certificate facts and the generated local certificate.

No sockets: handshakes run between two in-memory SSLObjects (MemoryBIO), so a context that
would accept the wrong server fails here, not in production.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgsidecar.config.model import ListenConfig, SslMode, UpstreamTarget
from pgsidecar.runtime.tls import (
    CertFacts,
    TlsConfigError,
    cert_facts,
    generate_local_certificate,
    host_matches_certificate,
    local_server_context,
    upstream_context,
)
from tests.fixtures.certs import TestPKI, make_pki

DAY_S = 86400.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def local_cert() -> tuple[bytes, bytes]:
    return generate_local_certificate()


def _der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def _target(mode: str, **kw: object) -> UpstreamTarget:
    host = str(kw.pop("host", "localhost"))
    return UpstreamTarget(host=host, sslmode=SslMode(mode), **kw)  # type: ignore[arg-type]


def _write(path: Path, data: bytes, mode: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str | None) -> str:
    """A TLS handshake in memory; returns the negotiated version or raises the client's error."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):  # a TLS 1.3 handshake needs 2-3 flights
        for name, obj in (("c", cli), ("s", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["c"] and done["s"]:
            return str(cli.version())
    raise AssertionError("handshake did not finish")


# -- certificate facts --------------------------------------------------------------------------


def test_generated_certificate_names_every_loopback_and_lasts_825_days(
    local_cert: tuple[bytes, bytes],
) -> None:
    cert_pem, key_pem = local_cert
    facts = cert_facts(_der(cert_pem))
    assert set(facts.sans) == {"localhost", "127.0.0.1", "::1"}
    assert "CN=localhost" in facts.subject
    assert facts.issuer == facts.subject  # self-signed
    now = time.time()
    assert facts.not_before <= now
    assert abs(facts.not_after - (now + 825 * DAY_S)) < 120
    assert len(facts.fingerprint_sha256) == 64
    int(facts.fingerprint_sha256, 16)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_generated_certificates_differ_and_take_names_and_days() -> None:
    cert_pem, _ = generate_local_certificate(["db.internal", "10.1.2.3"], days=7)
    facts = cert_facts(_der(cert_pem))
    assert facts.sans == ("db.internal", "10.1.2.3")
    assert abs(facts.not_after - (time.time() + 7 * DAY_S)) < 120
    other = cert_facts(_der(generate_local_certificate(["db.internal", "10.1.2.3"], days=7)[0]))
    assert other.fingerprint_sha256 != facts.fingerprint_sha256


def test_cert_facts_match_cryptography_and_hide_der_from_repr(pki: TestPKI) -> None:
    cert = x509.load_pem_x509_certificate(Path(pki.server_cert).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    facts = cert_facts(der)
    assert isinstance(facts, CertFacts)
    assert facts.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert facts.not_after == cert.not_valid_after_utc.timestamp()
    assert "CN=pgsidecar test CA" in facts.issuer
    assert facts.der == der
    assert "der=" not in repr(facts)


# -- upstream contexts per sslmode --------------------------------------------------------------


def test_disable_has_no_context(tmp_path: Path) -> None:
    assert upstream_context(_target("disable"), home=str(tmp_path)) is None


@pytest.mark.parametrize("mode", ["allow", "prefer", "require"])
def test_encrypting_modes_without_root_cert_do_not_verify(mode: str, tmp_path: Path) -> None:
    ctx = upstream_context(_target(mode), home=str(tmp_path))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_verify_ca_checks_chain_but_not_name(pki: TestPKI, tmp_path: Path) -> None:
    ctx = upstream_context(_target("verify-ca", sslrootcert=pki.ca_cert), home=str(tmp_path))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is False


def test_verify_full_checks_chain_and_name(pki: TestPKI, tmp_path: Path) -> None:
    ctx = upstream_context(_target("verify-full", sslrootcert=pki.ca_cert), home=str(tmp_path))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_verify_full_without_sni_leaves_the_name_check_to_upstream(pki: TestPKI, tmp_path: Path) -> None:
    """Python checks names only together with SNI; with sslsni=0 upstream.py checks afterwards."""
    by_name = upstream_context(_target("verify-full", sslrootcert=pki.ca_cert, sslsni=False), home=str(tmp_path))
    assert by_name is not None and by_name.check_hostname is False
    assert by_name.verify_mode == ssl.CERT_REQUIRED
    by_ip = upstream_context(
        _target("verify-full", host="127.0.0.1", sslrootcert=pki.ca_cert, sslsni=False),
        home=str(tmp_path),
    )
    assert by_ip is not None and by_ip.check_hostname is True  # no SNI is sent for an IP anyway


def test_require_with_root_cert_acts_as_verify_ca(pki: TestPKI, tmp_path: Path) -> None:
    ctx = upstream_context(_target("require", sslrootcert=pki.ca_cert), home=str(tmp_path))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is False
    # ... and it really rejects a server whose certificate that CA did not sign.
    other = make_pki(tmp_path / "other")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(other.server_cert, other.server_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ctx, server, None)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    assert _handshake(ctx, server, None).startswith("TLSv1.")


def test_default_root_cert_in_home_is_used_like_libpq(pki: TestPKI, tmp_path: Path) -> None:
    _write(tmp_path / ".postgresql" / "root.crt", Path(pki.ca_cert).read_bytes(), 0o644)
    ctx = upstream_context(_target("verify-full"), home=str(tmp_path))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    prefer = upstream_context(_target("prefer"), home=str(tmp_path))
    assert prefer is not None and prefer.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verify_without_root_cert_is_a_clear_error(mode: str, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError) as info:
        upstream_context(_target(mode), home=str(tmp_path))
    text = str(info.value)
    assert str(tmp_path / ".postgresql" / "root.crt") in text
    assert "does not exist" in text
    assert "sslrootcert=system" in text


def test_configured_root_cert_that_is_missing_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    for mode in ("require", "verify-full"):
        with pytest.raises(TlsConfigError, match=r"nope\.crt"):
            upstream_context(_target(mode, sslrootcert=missing), home=str(tmp_path))


def test_system_roots_need_verify_full(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match='weak sslmode "require"'):
        upstream_context(_target("require", sslrootcert="system"), home=str(tmp_path))
    ctx = upstream_context(_target("verify-full", sslrootcert="system"), home=str(tmp_path))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_client_certificate_loaded_and_key_checked(pki: TestPKI, tmp_path: Path) -> None:
    target = _target("require", sslcert=pki.client_cert, sslkey=pki.client_key)
    assert upstream_context(target, home=str(tmp_path)) is not None
    loose_key = _write(tmp_path / "loose.key", Path(pki.client_key).read_bytes(), 0o644)
    with pytest.raises(TlsConfigError, match="group or world access"):
        upstream_context(_target("require", sslcert=pki.client_cert, sslkey=loose_key), home=str(tmp_path))
    with pytest.raises(TlsConfigError, match="does not exist"):
        upstream_context(_target("require", sslcert=str(tmp_path / "x.crt")), home=str(tmp_path))


def test_default_client_certificate_needs_its_key(pki: TestPKI, tmp_path: Path) -> None:
    _write(tmp_path / ".postgresql" / "postgresql.crt", Path(pki.client_cert).read_bytes(), 0o644)
    with pytest.raises(TlsConfigError, match="certificate present, but not private key file"):
        upstream_context(_target("require"), home=str(tmp_path))
    _write(tmp_path / ".postgresql" / "postgresql.key", Path(pki.client_key).read_bytes(), 0o600)
    assert upstream_context(_target("require"), home=str(tmp_path)) is not None


# -- local (client-facing) contexts and name checks ---------------------------------------------


def test_local_context_off_when_tls_off() -> None:
    assert local_server_context(ListenConfig(tls=False)) is None


def test_generated_local_context_verifies_for_loopback_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = local_server_context(ListenConfig())
    assert server is not None
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert list(tmp_path.iterdir()) == []  # the key's temp directory is gone
    # A client that trusts nothing still encrypts (sslmode=require) ...
    client = upstream_context(_target("require"), home=str(tmp_path))
    assert client is not None
    assert _handshake(client, server, None)


def test_generated_certificate_passes_verify_full_only_for_its_names(
    local_cert: tuple[bytes, bytes], tmp_path: Path
) -> None:
    cert_pem, key_pem = local_cert
    root = _write(tmp_path / "local.crt", cert_pem, 0o644)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _write(tmp_path / "k" / "local.key", key_pem, 0o600)
    server.load_cert_chain(root, str(tmp_path / "k" / "local.key"))
    for host in ("localhost", "127.0.0.1", "::1"):
        t = _target("verify-full", host=host, sslrootcert=root)
        ctx = upstream_context(t, home=str(tmp_path))
        assert ctx is not None
        assert _handshake(ctx, server, host)
    t = _target("verify-full", host="db.example", sslrootcert=root)
    ctx = upstream_context(t, home=str(tmp_path))
    assert ctx is not None
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        _handshake(ctx, server, "db.example")


def test_configured_local_certificate(pki: TestPKI) -> None:
    ctx = local_server_context(ListenConfig(tls_cert=pki.server_cert, tls_key=pki.server_key))
    assert ctx is not None
    client = upstream_context(_target("verify-full", sslrootcert=pki.ca_cert), home="/nonexistent")
    assert client is not None
    assert _handshake(client, ctx, "localhost")
    with pytest.raises(TlsConfigError, match="together"):
        local_server_context(ListenConfig(tls_cert=pki.server_cert))
    with pytest.raises(TlsConfigError, match="could not load"):
        local_server_context(ListenConfig(tls_cert=pki.server_cert, tls_key=pki.client_key))


def _cert_with(names: list[str], cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_host_name_matching_follows_libpq() -> None:
    wild = _cert_with(["*.db.example", "exact.example"], cn="ignored.example")
    assert host_matches_certificate(wild, "a.db.example")
    assert host_matches_certificate(wild, "A.DB.Example.")
    assert host_matches_certificate(wild, "exact.example")
    assert not host_matches_certificate(wild, "db.example")  # '*' is exactly one label
    assert not host_matches_certificate(wild, "a.b.db.example")
    assert not host_matches_certificate(wild, "ignored.example")  # CN ignored when SANs exist
    assert not host_matches_certificate(wild, "127.0.0.1")
    cn_only = _cert_with([], cn="cn.example")
    assert host_matches_certificate(cn_only, "cn.example")
    assert not host_matches_certificate(cn_only, "other.example")
    local = _der(generate_local_certificate()[0])
    assert host_matches_certificate(local, "::1")
    assert host_matches_certificate(local, "127.0.0.1")
    assert not host_matches_certificate(local, "127.0.0.2")
