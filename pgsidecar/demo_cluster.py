"""A throwaway TLS PostgreSQL for `pgsidecar demo`: CA, server certificate, scram, cleanup by PID.

The demo must work on a fresh machine as root, and PostgreSQL refuses to run as root, so the
server runs as ``nobody`` there. Everything lives in one temporary directory.
"""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def find_bindir() -> str:
    """PG_BINDIR, `pg_config --bindir`, or the newest /usr/lib/postgresql/*/bin with initdb."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "initdb")):
            return path
    raise RuntimeError("PostgreSQL server binaries not found: install postgresql or set PG_BINDIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(directory: str) -> tuple[str, str, str]:
    """A CA and a server certificate for localhost/127.0.0.1; returns (ca, cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgsidecar demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (
        os.path.join(directory, "ca.crt"),
        os.path.join(directory, "server.crt"),
        os.path.join(directory, "server.key"),
    )
    for path, data in zip(
        paths,
        (ca.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)),
        strict=True,
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    os.chmod(paths[0], 0o644)
    os.chmod(paths[1], 0o644)
    return paths


@dataclass
class DemoCluster:
    """One demo PostgreSQL server. ``password`` is the app role's."""

    root: str
    bindir: str = field(default_factory=find_bindir)
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    pid: int = 0

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def ca(self) -> str:
        return os.path.join(self.root, "ca.crt")

    def _run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        user = "nobody" if os.geteuid() == 0 else None
        return subprocess.run(
            argv,
            user=user,
            group="nogroup" if user else None,
            extra_groups=[] if user else None,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
            **kw,
        )

    def create(self) -> None:
        os.chmod(self.root, 0o755)
        make_certs(self.root)
        if os.geteuid() == 0:
            for name in ("server.key", "server.crt"):
                shutil.chown(os.path.join(self.root, name), "nobody", "nogroup")
            shutil.chown(self.root, "nobody", "nogroup")
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as fh:
            fh.write(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "nobody", "nogroup")
        out = self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D",
                self.datadir,
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip()}")
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as fh:
            fh.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                f"ssl = on\nssl_cert_file = '{self.root}/server.crt'\nssl_key_file = '{self.root}/server.key'\n"
                "fsync = off\nmax_connections = 50\nlog_connections = on\n"
            )
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as fh:
            fh.write("local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
        self.start()

    def start(self) -> None:
        out = self._run(
            [
                os.path.join(self.bindir, "pg_ctl"),
                "-D",
                self.datadir,
                "-l",
                os.path.join(self.root, "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        if out.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {out.stderr.strip() or out.stdout.strip()}")
        with open(os.path.join(self.datadir, "postmaster.pid")) as fh:
            self.pid = int(fh.readline())

    def restart(self, mode: str) -> None:
        out = self._run(
            [
                os.path.join(self.bindir, "pg_ctl"),
                "-D",
                self.datadir,
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "-l",
                os.path.join(self.root, "server.log"),
                "restart",
            ]
        )
        if out.returncode != 0:
            raise RuntimeError(f"restart failed: {out.stderr.strip()}")
        with open(os.path.join(self.datadir, "postmaster.pid")) as fh:
            self.pid = int(fh.readline())

    def dsn(self, **extra: str) -> str:
        parts = {
            "host": "localhost",
            "port": str(self.port),
            "user": "postgres",
            "dbname": "postgres",
            "password": self.password,
            "sslmode": "verify-full",
            "sslrootcert": self.ca,
        }
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def destroy(self) -> None:
        """Stop our own postmaster by PID (immediate), never by name."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            self.pid = 0
