"""SCRAM-SHA-256 for PostgreSQL (RFC 5802, RFC 7677), both sides, sans-IO.

ScramClient authenticates pgsidecar to the upstream server, with tls-server-end-point channel
binding (RFC 5929) when the server offers SCRAM-SHA-256-PLUS. ScramServer checks local clients
against a configured password (``auth.mode: configured``). Both take and return the bytes of the
SASL messages only; the relay wraps them in AuthenticationSASL* / SASL*Response messages (55.3.2
"SASL Authentication"). Passwords go through SASLprep exactly as PostgreSQL's pg_saslprep does,
including its fallback to the raw bytes, so that client and server derive the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError

__all__ = [
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "SaltedPasswordCache",
    "ScramClient",
    "ScramSecret",
    "ScramServer",
    "salted_password",
    "salted_passwords",
    "saslprep_password",
    "tls_server_end_point",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
_NONCE_BYTES = 18  # libpq's SCRAM_RAW_NONCE_LEN
_SALT_BYTES = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_MAX_ITERATIONS = 2**31 - 1  # scram_iterations is an int GUC
_CACHE_ENTRIES = 64  # SaltedPasswordCache bound: distinct (password, salt, iterations) kept


# --- SASLprep, as PostgreSQL's src/common/saslprep.c does it ---

_PROHIBITED: tuple[Callable[[str], bool], ...] = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,
)


def saslprep_password(password: str) -> bytes:
    """The password bytes SCRAM hashes: SASLprep (RFC 4013) output, or, where pg_saslprep
    fails (not UTF-8, prohibited characters, empty, bidi rules), the raw bytes as libpq and
    the server both fall back to. Like pg_saslprep, the checks run on the mapped string before
    normalization, and pure ASCII passes unchanged."""
    raw = password.encode("utf-8", "surrogateescape")
    if password.isascii():
        return raw
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes: not valid UTF-8
        return raw
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    if not mapped:
        return raw
    if any(check(c) for c in mapped for check in _PROHIBITED):
        return raw
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


# --- The SCRAM functions (RFC 5802 section 3) ---


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _unb64(text: str, error: type[ProtocolError], what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"malformed SCRAM message: {what} is not valid base64") from None


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _new_nonce() -> str:
    return base64.b64encode(secrets.token_bytes(_NONCE_BYTES)).decode("ascii")


def _check_nonce(nonce: str) -> str:
    # RFC 5802 section 7: c-nonce is printable ASCII except ','.
    if not nonce or any(not 0x21 <= ord(c) <= 0x7E or c == "," for c in nonce):
        raise ValueError(f"a SCRAM nonce is printable ASCII without commas: {nonce!r}")
    return nonce


def _saslname(user: str) -> bytes:
    # RFC 5802 section 5.1: '=' and ',' in a user name are escaped as =3D and =2C.
    return user.replace("=", "=3D").replace(",", "=2C").encode("utf-8", "surrogateescape")


def _attributes(
    message: bytes, names: str, error: type[ProtocolError], what: str, *, extra_ok: bool = False
) -> list[str]:
    """The values of the comma-separated ``k=v`` attributes ``names``, in that order."""
    try:
        parts = bytes(message).decode("utf-8").split(",")
    except UnicodeDecodeError:
        raise error(f"malformed SCRAM message: {what} is not UTF-8") from None
    if parts and parts[0].startswith("m="):
        raise error(f"unsupported SCRAM extension in {what}", sqlstate="0A000")
    if len(parts) < len(names) or (len(parts) > len(names) and not extra_ok):
        raise error(f"malformed SCRAM message: {what} has {len(parts)} attributes")
    values = []
    for name, part in zip(names, parts, strict=False):
        if not part.startswith(name + "="):
            raise error(f"malformed SCRAM message: {what} lacks attribute {name!r}")
        values.append(part[2:])
    return values


# --- SaltedPassword := Hi(password, salt, i), computed once per process ---


class SaltedPasswordCache:
    """Hi(password, salt, i) (RFC 5802 section 2.2, PBKDF2-HMAC-SHA-256) per (password, salt,
    iteration count), in memory for the life of the process: a reconnect, or a new client with the
    same credentials, skips the 4,096 (or more) HMAC rounds, about 2 ms of CPU each time.

    Bounded: at most ``maxsize`` entries (64 by default, ``_CACHE_ENTRIES``), least recently used
    dropped first, so a server that sends a new salt on every login cannot grow it.

    Keys are HMAC-SHA-256 digests of the length-prefixed triple under a random per-process key, so
    no password is held in the clear as a dict key and a key reveals nothing without that secret.
    The values are the salted passwords themselves, which are secret-equivalent: ClientKey, and
    hence a valid proof, follows from one. They live only in this process's memory, are never
    written anywhere or logged (``repr`` shows counts only), and ``clear()`` forgets them.

    Used from one event loop thread; the lookup and the insert are not locked.
    """

    def __init__(self, maxsize: int = _CACHE_ENTRIES) -> None:
        if maxsize < 1:
            raise ValueError("a SaltedPasswordCache holds at least one entry")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._key = secrets.token_bytes(32)  # keys the dict's slots
        self._salt_key = secrets.token_bytes(32)  # derives salt_for(); a key of its own
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def _slot(self, password: bytes, salt: bytes, iterations: int) -> bytes:
        # Length prefixes: no two different triples are encoded alike.
        material = b"".join(
            (
                len(password).to_bytes(4, "big"),
                password,
                len(salt).to_bytes(4, "big"),
                salt,
                iterations.to_bytes(4, "big"),
            )
        )
        return _hmac(self._key, material)

    def salted_password(self, password: bytes, salt: bytes, iterations: int) -> bytes:
        """Hi(password, salt, iterations) for the SASLprep'd ``password``, from memory if seen."""
        slot = self._slot(password, salt, iterations)
        found = self._entries.get(slot)
        if found is not None:
            self._entries.move_to_end(slot)
            self.hits += 1
            return found
        self.misses += 1
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self._entries[slot] = salted
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return salted

    def salt_for(self, password: bytes) -> bytes:
        """A salt for ``password`` that stays the same for the life of the process (ScramServer's
        default): an HMAC under a random per-process key, so it tells nothing about the password
        and differs between processes; PostgreSQL's per-role salt likewise stays fixed until the
        password changes."""
        return _hmac(self._salt_key, password)[:_SALT_BYTES]

    def clear(self) -> None:
        """Forget every salted password (the counters stay)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SaltedPasswordCache({len(self)}/{self.maxsize} entries, {self.hits} hits, {self.misses} misses)"


#: The process's one cache, used by ScramClient, ScramSecret.from_password and ScramServer.
salted_passwords = SaltedPasswordCache()


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi(password, salt, iterations) through the process's cache (``salted_passwords``)."""
    return salted_passwords.salted_password(password, salt, iterations)


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """What a server stores instead of the password (PostgreSQL's rolpassword form:
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``)."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> Self:
        if not 0 < iterations <= _MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count {iterations} is out of range")
        salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
        salted = salted_password(saslprep_password(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Read the rolpassword form; ValueError says what is wrong with it."""
        try:
            method, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            secret = cls(
                int(iterations),
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except (ValueError, binascii.Error):
            raise ValueError("not a SCRAM-SHA-256 secret") from None
        if (
            method != SCRAM_SHA_256
            or len(secret.stored_key) != 32
            or len(secret.server_key) != 32
            or not 0 < secret.iterations <= _MAX_ITERATIONS
        ):
            raise ValueError("not a SCRAM-SHA-256 secret")
        return secret

    def __str__(self) -> str:
        salt, stored, server = (_b64(x).decode("ascii") for x in (self.salt, self.stored_key, self.server_key))
        return f"{SCRAM_SHA_256}${self.iterations}:{salt}${stored}:{server}"


class ScramClient:
    """The client side: initial_response(), continue_(server_first), finish(server_final).

    ``channel_binding`` is tls_server_end_point() of the upstream's certificate, or None when
    the connection has no TLS or the hash cannot be computed (Ed25519 certificates).
    """

    def __init__(
        self,
        user: str,
        password: str,
        *,
        mechanisms: Sequence[str],
        channel_binding: bytes | None = None,
        nonce: str | None = None,
    ) -> None:
        offered = tuple(mechanisms)
        if channel_binding is not None and SCRAM_SHA_256_PLUS in offered:
            self._mechanism = SCRAM_SHA_256_PLUS
            gs2 = b"p=tls-server-end-point,,"
            self._cbind_input = gs2 + channel_binding
        elif SCRAM_SHA_256 in offered:
            self._mechanism = SCRAM_SHA_256
            # RFC 5802 section 6, as libpq does it: "y" says "I could bind, you did not offer
            # it", so a server that does offer PLUS can detect a downgrade; "n" otherwise.
            gs2 = b"y,," if channel_binding is not None else b"n,,"
            self._cbind_input = gs2
        else:
            reason = (
                " (SCRAM-SHA-256-PLUS needs TLS channel binding data, which is missing)"
                if SCRAM_SHA_256_PLUS in offered
                else ""
            )
            raise ServerProtocolError(
                f"server offered no SASL mechanism pgsidecar supports: {list(offered)}{reason}", sqlstate="08001"
            )
        self._gs2 = gs2
        self._nonce = _check_nonce(nonce if nonce is not None else _new_nonce())
        self._password = saslprep_password(password)
        self._first_bare = b"n=" + _saslname(user) + b",r=" + self._nonce.encode("ascii")
        self._server_signature: bytes | None = None
        self._state = "start"

    @property
    def mechanism(self) -> str:
        return self._mechanism

    @property
    def channel_bound(self) -> bool:
        return self._mechanism == SCRAM_SHA_256_PLUS

    @property
    def done(self) -> bool:
        """True once the server proved it knows the password; accept AuthenticationOk only then."""
        return self._state == "done"

    def initial_response(self) -> bytes:
        """The client-first-message, for SASLInitialResponse."""
        if self._state not in ("start", "first"):
            raise RuntimeError("initial_response() after the exchange moved on")
        self._state = "first"
        return self._gs2 + self._first_bare

    def continue_(self, server_first: bytes) -> bytes:
        """Answer AuthenticationSASLContinue's server-first-message with the client-final."""
        if self._state != "first":
            raise ServerProtocolError("unexpected AuthenticationSASLContinue")
        nonce, salt_b64, iterations_text = _attributes(server_first, "rsi", ServerProtocolError, "server-first-message")
        if len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce):
            raise ServerProtocolError("invalid SCRAM response: nonce mismatch")
        salt = _unb64(salt_b64, ServerProtocolError, "salt")
        if not salt:
            raise ServerProtocolError("malformed SCRAM message: empty salt")
        if not iterations_text.isdigit() or not 0 < int(iterations_text) <= _MAX_ITERATIONS:
            raise ServerProtocolError(f"invalid SCRAM iteration count {iterations_text!r}")
        salted = salted_password(self._password, salt, int(iterations_text))
        final_without_proof = b"c=" + _b64(self._cbind_input) + b",r=" + nonce.encode("ascii")
        auth_message = b",".join((self._first_bare, bytes(server_first), final_without_proof))
        client_key = _hmac(salted, b"Client Key")
        client_signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = _xor(client_key, client_signature)
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self._state = "final"
        return final_without_proof + b",p=" + _b64(proof)

    def finish(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal's server signature; raises unless it is right."""
        if self._state != "final" or self._server_signature is None:
            raise ServerProtocolError("unexpected AuthenticationSASLFinal")
        text = bytes(server_final)
        if text.startswith(b"e="):
            reason = text[2:].decode("utf-8", "replace")
            raise ServerProtocolError(f"server rejected SCRAM authentication: {reason}", sqlstate="28000")
        (signature_b64,) = _attributes(text, "v", ServerProtocolError, "server-final-message")
        signature = _unb64(signature_b64, ServerProtocolError, "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ServerProtocolError(
                "invalid SCRAM server signature: the server does not know the password", sqlstate="28000"
            )
        self._state = "done"


class ScramServer:
    """The server side for local clients: handle_first(client_first) -> server-first,
    handle_final(client_final) -> server-final. Offers SCRAM-SHA-256 only (no PLUS).

    Built from a password without a salt, it uses that password's per-process salt, so the
    secret comes from the salted-password cache after the first client."""

    #: What to put in AuthenticationSASL.
    mechanisms: tuple[str, ...] = (SCRAM_SHA_256,)

    def __init__(
        self,
        password: str,
        *,
        iterations: int = DEFAULT_ITERATIONS,
        salt: bytes | None = None,
        nonce: str | None = None,
    ) -> None:
        # Without a salt, the password's per-process one (SaltedPasswordCache.salt_for): the same
        # for every client, so Hi() runs once per process, not once per login, as PostgreSQL's
        # stored per-role salt does. The nonces keep each exchange fresh.
        if salt is None:
            salt = salted_passwords.salt_for(saslprep_password(password))
        self._init(ScramSecret.from_password(password, iterations=iterations, salt=salt), nonce)

    @classmethod
    def from_secret(cls, secret: ScramSecret, *, nonce: str | None = None) -> Self:
        """Check against a stored secret (see ScramSecret.parse) instead of a password."""
        server = cls.__new__(cls)
        server._init(secret, nonce)
        return server

    def _init(self, secret: ScramSecret, nonce: str | None) -> None:
        self._secret = secret
        self._server_nonce = _check_nonce(nonce if nonce is not None else _new_nonce())
        self._state = "start"
        self._gs2 = b""
        self._first_bare = b""
        self._server_first = b""
        self._nonce = ""

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def started(self) -> bool:
        """True once the client-first-message was read."""
        return self._state != "start"

    def handle_first(self, client_first: bytes) -> bytes:
        """Read the client-first-message (SASLInitialResponse data), return server-first."""
        if self._state != "start":
            raise ClientProtocolError("unexpected SASLInitialResponse")
        data = bytes(client_first)
        flag = data[:1]
        if flag == b"p":
            raise ClientProtocolError("channel binding is not supported by pgsidecar's SCRAM server; use SCRAM-SHA-256")
        if flag not in (b"n", b"y") or data[1:2] != b",":
            raise ClientProtocolError("malformed SCRAM message: bad GS2 header")
        if data[2:3] != b",":
            raise ClientProtocolError("client uses authorization identity, which is not supported", sqlstate="0A000")
        self._gs2, self._first_bare = data[:3], data[3:]
        _user, client_nonce = _attributes(
            self._first_bare, "nr", ClientProtocolError, "client-first-message", extra_ok=True
        )
        try:
            _check_nonce(client_nonce)
        except ValueError:
            raise ClientProtocolError("malformed SCRAM message: bad client nonce") from None
        self._nonce = client_nonce + self._server_nonce
        salt = _b64(self._secret.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={self._secret.iterations}".encode()
        self._state = "first"
        return self._server_first

    def handle_final(self, client_final: bytes) -> bytes:
        """Check the client-final-message's proof, return server-final (``v=...``)."""
        if self._state != "first":
            raise ClientProtocolError("unexpected SASLResponse")
        data = bytes(client_final)
        cut = data.rfind(b",p=")
        if cut < 0:
            raise ClientProtocolError("malformed SCRAM message: client-final-message has no proof")
        without_proof, proof_b64 = data[:cut], data[cut + 3 :]
        cbind, nonce = _attributes(without_proof, "cr", ClientProtocolError, "client-final-message", extra_ok=True)
        if _unb64(cbind, ClientProtocolError, "channel binding") != self._gs2:
            raise ClientProtocolError("SCRAM channel binding check failed")
        if nonce != self._nonce:
            raise ClientProtocolError("SCRAM nonce mismatch")
        proof = _unb64(proof_b64.decode("ascii", "replace"), ClientProtocolError, "proof")
        auth_message = b",".join((self._first_bare, self._server_first, without_proof))
        client_signature = _hmac(self._secret.stored_key, auth_message)
        if len(proof) != len(client_signature) or not hmac.compare_digest(
            hashlib.sha256(_xor(proof, client_signature)).digest(), self._secret.stored_key
        ):
            self._state = "failed"
            raise ClientProtocolError("password authentication failed", sqlstate="28P01")
        self._state = "done"
        return b"v=" + _b64(_hmac(self._secret.server_key, auth_message))


# --- tls-server-end-point (RFC 5929 section 4.1) ---

# Signature algorithm OID -> hash. MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 4.1).
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.2.840.113549.1.1.11": "sha256",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
}
_RSASSA_PSS = "1.2.840.113549.1.1.10"
# RSASSA-PSS names its hash in its parameters (RFC 4055); SHA-1 is the default.
_DIGEST_HASHES = {
    "1.3.14.3.2.26": "sha256",  # sha1
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
}


def _der(data: bytes, pos: int, end: int, tag: int | None = None) -> tuple[int, int, int]:
    """The DER element at ``pos``: (tag, contents start, contents end). Low tag numbers only."""
    if pos + 2 > end:
        raise ValueError("certificate DER is truncated")
    found, length = data[pos], data[pos + 1]
    if tag is not None and found != tag:
        raise ValueError(f"certificate DER has tag {found:#x} where {tag:#x} belongs")
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > end:
            raise ValueError("certificate DER has a bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("certificate DER is truncated")
    return found, pos, pos + length


def _oid(data: bytes, pos: int, end: int) -> tuple[str, int]:
    """Decode the OBJECT IDENTIFIER at ``pos``; return it dotted and the position after it."""
    _, start, stop = _der(data, pos, end, 0x06)
    if start == stop:
        raise ValueError("certificate DER has an empty OID")
    arcs: list[int] = []
    value = 0
    for byte in data[start:stop]:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:]), stop


def _pss_hash(data: bytes, pos: int, end: int) -> str:
    """The hash of RSASSA-PSS-params: [0] EXPLICIT AlgorithmIdentifier, default SHA-1."""
    if pos >= end:
        return "sha256"
    _, start, stop = _der(data, pos, end, 0x30)
    if start < stop and data[start] == 0xA0:
        _, inner, inner_end = _der(data, start, stop, 0xA0)
        _, alg, alg_end = _der(data, inner, inner_end, 0x30)
        oid, _ = _oid(data, alg, alg_end)
        if oid not in _DIGEST_HASHES:
            raise ValueError(f"unsupported RSASSA-PSS hash {oid}")
        return _DIGEST_HASHES[oid]
    return "sha256"


def tls_server_end_point(cert_der: bytes) -> bytes:
    """The channel binding data for SCRAM-SHA-256-PLUS: the hash of the server's DER
    certificate with the hash of its signature algorithm (RFC 5929 section 4.1).

    Raises ValueError for malformed DER or a signature with no single hash (Ed25519, Ed448);
    the caller should then authenticate without channel binding (channel_binding=None).
    """
    data = bytes(cert_der)
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    _, body, body_end = _der(data, 0, len(data), 0x30)
    _, _, tbs_end = _der(data, body, body_end, 0x30)
    _, alg, alg_end = _der(data, tbs_end, body_end, 0x30)
    oid, after = _oid(data, alg, alg_end)
    if oid == _RSASSA_PSS:
        name = _pss_hash(data, after, alg_end)
    elif oid in _SIGNATURE_HASHES:
        name = _SIGNATURE_HASHES[oid]
    else:
        raise ValueError(f"no tls-server-end-point hash for signature algorithm {oid}")
    return hashlib.new(name, data).digest()


def channel_binding_for(cert_der: bytes) -> bytes | None:
    """tls-server-end-point data, or None where RFC 5929 defines none (e.g. Ed25519 certificates):
    the client then says "n,," and PostgreSQL accepts plain SCRAM-SHA-256."""
    try:
        return tls_server_end_point(cert_der)
    except ValueError:
        return None
