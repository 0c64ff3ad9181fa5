"""TLS contexts for both sides of pgsidecar, certificate facts, and the local certificate.

The upstream side follows libpq's sslmode rules (PostgreSQL docs 34.19 "SSL Support") so that a
DSN moved from the app to pgsidecar keeps the security it had. The client side is on by default
with a certificate generated in memory, so `sslmode=require` in the app keeps working.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import shutil
import ssl
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgsidecar.config.model import ListenConfig, SslMode, UpstreamTarget
from pgsidecar.runtime.heap import track_tls

# PostgreSQL 17's libpq offers this ALPN name; older servers ignore ALPN (PostgreSQL docs 55.2.10).
ALPN_POSTGRESQL = "postgresql"

# libpq's default files, relative to the home directory (PostgreSQL docs 34.19.1, 34.19.2).
ROOT_CERT_FILE = ".postgresql/root.crt"
USER_CERT_FILE = ".postgresql/postgresql.crt"
USER_KEY_FILE = ".postgresql/postgresql.key"

_NO_ROOT_CERT_HINT = (
    "either provide the file, use the system's trusted roots with sslrootcert=system, "
    "or change sslmode to disable server certificate verification"
)


class TlsConfigError(ValueError):
    """A TLS setting that cannot work (missing root certificate, unreadable key): the operator's
    to fix, found before any connection is attempted."""


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What a drop record and `pgsidecar check` say about a certificate."""

    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_after: float
    not_before: float
    fingerprint_sha256: str
    der: bytes = field(repr=False)


@functools.lru_cache(maxsize=16)
def cert_facts(der: bytes) -> CertFacts:
    """Facts of a DER certificate (as from getpeercert(binary_form=True)). Cached by the DER bytes:
    a server shows the same certificate on every connect, and parsing it cost about 0.3 ms of
    each new client's connect (the facts are frozen, so one copy serves every session)."""
    cert = x509.load_der_x509_certificate(der)
    return CertFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=_san_strings(cert),
        not_after=cert.not_valid_after_utc.timestamp(),
        not_before=cert.not_valid_before_utc.timestamp(),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        der=der,
    )


def _san_strings(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = list(ext.value.get_values_for_type(x509.DNSName))
    names.extend(str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress))
    return tuple(names)


@functools.lru_cache(maxsize=64)
def host_matches_certificate(der: bytes, host: str) -> bool:
    """libpq's verify-full name check, done after the handshake as libpq does: an IP literal must
    equal an IP SAN; a name must match a DNS SAN (a leading '*' label matches one label); the
    subject CN counts only when the certificate has no DNS SAN (PostgreSQL docs 34.19.1)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    dns_names = san.get_values_for_type(x509.DNSName)
    if not dns_names:
        dns_names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(_dns_name_matches(pattern, host) for pattern in dns_names)


def _dns_name_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == host
    head, _, rest = host.partition(".")
    return bool(head) and rest == pattern[2:]


def generate_local_certificate(
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"), days: int = 825
) -> tuple[bytes, bytes]:
    """A self-signed server certificate and its EC P-256 key, both PEM, made in memory.

    825 days is the longest validity Apple clients accept; the key never touches a disk except
    for the moment ssl needs a file to load it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgsidecar"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "localhost"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a little clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if names:
        builder = builder.add_extension(_san_for(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _san_for(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def local_server_context(listen: ListenConfig) -> ssl.SSLContext | None:
    """The context for TLS from applications; None when local TLS is off.

    A configured certificate is loaded as given; otherwise one is generated at start, so apps
    whose DSN says sslmode=require keep working after only host and port change.
    """
    if not listen.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])  # as PostgreSQL 17's server; no ALPN is fine too
    if listen.tls_cert or listen.tls_key:
        if not (listen.tls_cert and listen.tls_key):
            raise TlsConfigError("listen.tls_cert and listen.tls_key must be given together")
        _load_chain(ctx, listen.tls_cert, listen.tls_key, what="listen certificate")
    else:
        cert_pem, key_pem = generate_local_certificate()
        load_pem_chain(ctx, cert_pem, key_pem)
    return track_tls(ctx)  # each ended connection's 256 KiB buffers go back to the OS (heap.py)


def load_pem_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load an in-memory certificate and key: ssl only reads files, so write them 0600 into a
    fresh 0700 directory and remove it right after loading."""
    tmp = tempfile.mkdtemp(prefix="pgsidecar-tls-")  # mkdtemp creates it 0700
    try:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, *, what: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f'could not load {what} "{cert}" with key "{key}": {e}') from e


def upstream_context(target: UpstreamTarget, *, home: str | None = None) -> ssl.SSLContext | None:
    """The client context for the real server, per libpq's sslmode rules (PostgreSQL docs 34.19.1,
    table "SSL Mode Descriptions"); None for sslmode=disable.

    allow/prefer/require encrypt without checking the server, except that a root certificate
    file, when one exists, is always checked against (libpq: require then behaves like
    verify-ca). verify-ca checks the chain, verify-full the chain and the host name. `home`
    replaces the home directory where libpq looks for ~/.postgresql/ files (tests use it).
    """
    mode = SslMode(target.sslmode)
    if target.sslrootcert == "system" and mode is not SslMode.VERIFY_FULL:
        # libpq refuses this combination (PostgreSQL docs 34.1.2, sslrootcert).
        raise TlsConfigError(f'weak sslmode "{mode.value}" may not be used with sslrootcert=system (use "verify-full")')
    if mode is SslMode.DISABLE:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    ctx.check_hostname = False
    home_dir = home if home is not None else _home_dir()
    have_root = _load_root(ctx, target, mode, home_dir)
    ctx.verify_mode = ssl.CERT_REQUIRED if have_root else ssl.CERT_NONE
    if mode is SslMode.VERIFY_FULL:
        # Python ties its name check to SNI; with sslsni=0 and a DNS name the check runs after
        # the handshake instead (upstream.py), as libpq always does it.
        ctx.check_hostname = target.sslsni or is_ip_literal(target.host)
    _load_client_cert(ctx, target, home_dir)
    # uvloop's TLS transport leaves glibc holding 256 KiB per ended connection; heap.py gives
    # it back (bench/tlschurn.py: RSS 64 -> 182 MB over 10 waves of 1000 connects without).
    return track_tls(ctx)


def _home_dir() -> str | None:
    try:
        return str(Path.home())
    except (RuntimeError, KeyError):
        return None


def is_ip_literal(host: str) -> bool:
    """An IP address, not a name: no SNI is sent for it (RFC 6066 section 3)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _load_root(ctx: ssl.SSLContext, target: UpstreamTarget, mode: SslMode, home: str | None) -> bool:
    """Load the root certificate(s) libpq would use; True when the server is then checked."""
    if target.sslrootcert == "system":
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return True
    path = target.sslrootcert or (os.path.join(home, ROOT_CERT_FILE) if home else None)
    if path and os.path.exists(path):
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f'could not read root certificate file "{path}": {e}') from e
        return True
    if mode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL):
        if path is None:
            raise TlsConfigError("could not get home directory to locate root certificate file; " + _NO_ROOT_CERT_HINT)
        raise TlsConfigError(f'root certificate file "{path}" does not exist; {_NO_ROOT_CERT_HINT}')
    if target.sslrootcert:
        # libpq would continue silently; a configured file that is missing is surely a mistake.
        raise TlsConfigError(f'root certificate file "{path}" does not exist')
    return False


def _load_client_cert(ctx: ssl.SSLContext, target: UpstreamTarget, home: str | None) -> None:
    """sslcert/sslkey when given, else ~/.postgresql/postgresql.crt/.key when present (libpq)."""
    cert = target.sslcert or (os.path.join(home, USER_CERT_FILE) if home else None)
    if cert is None or not os.path.exists(cert):
        if target.sslcert:
            raise TlsConfigError(f'certificate file "{cert}" does not exist')
        return
    key = target.sslkey or (os.path.join(home, USER_KEY_FILE) if home else None)
    if key is None or not os.path.exists(key):
        raise TlsConfigError(f'certificate present, but not private key file "{key}"')
    _check_key_permissions(key)
    _load_chain(ctx, cert, key, what="client certificate")


def _check_key_permissions(key: str) -> None:
    """libpq refuses a private key others can read: at most 0600 when owned by the user, 0640
    when owned by root (PostgreSQL docs 34.19.2)."""
    st = os.stat(key)
    if not stat.S_ISREG(st.st_mode):
        raise TlsConfigError(f'private key file "{key}" is not a regular file')
    allowed = 0o640 if st.st_uid == 0 else 0o600
    if st.st_mode & 0o777 & ~allowed:
        raise TlsConfigError(
            f'private key file "{key}" has group or world access; file must have permissions '
            "u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) "
            "or less if owned by root"
        )
