"""SCRAM-SHA-256 client and server (pgsidecar.auth.scram): test vectors, both sides, binding."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pgsidecar.auth import scram
from pgsidecar.auth.scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    SaltedPasswordCache,
    ScramClient,
    ScramSecret,
    ScramServer,
    salted_passwords,
    saslprep_password,
    tls_server_end_point,
)
from pgsidecar.wire.errors import ClientProtocolError, ProtocolError, ServerProtocolError

# RFC 7677 section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# rolpassword values written by PostgreSQL 15 (CREATE ROLE ... PASSWORD, scram-sha-256).
PG15_SECRETS = {
    "pencil": "SCRAM-SHA-256$4096:j+u/AiyNiabNrV2qLgM/TA==$fiHoDdbStI/+WOeb98hc4empkbyNnP0+Kz4TQ"
    "ysjJsk=:40gHSkibOKGYBH90ML4y/SqYAUyGRfCLpTl1VqysYNs=",
    "pässwörd": "SCRAM-SHA-256$4096:7yjq2fgQasQUPaqbvQ5g1g==$dz3R4TSqr7t4MSaVHdYIlqe/n3or7LXtlct"
    "pTu17Hj8=:wc8SgI8Tvv87RsEaL6rXHSrXclLtttEzpfjqLQ/tUBI=",
    # soft hyphen (mapped to nothing), no-break space (to space), fi ligature (NFKC to "fi")
    "a\u00adb\u00a0c\ufb01": "SCRAM-SHA-256$4096:jx1bARq3JdbSO0enXco6yA==$Fihwb4ZrnUPn1EGzKMOKmb"
    "6QVmesmXDLRisAz4Mg338=:50jaOiLnxn+/PYb1tPGd9FnRiguEmotJGjQ5BEu8+Vc=",
    # a prohibited control character: SASLprep fails and PostgreSQL uses the raw bytes
    "\u00e9\u0007": "SCRAM-SHA-256$4096:XxnB8NcuASqNa5l5JxUKAg==$Oze29ZrVPTC9T6DM2A/47gqZwjirBIwG"
    "JCenqx++d8E=:GEhxGzF220tSPuB/x0CCZJUGAryzOXi5ENhMcZFHmp4=",
}


def rfc_client() -> ScramClient:
    return ScramClient("user", "pencil", mechanisms=[SCRAM_SHA_256], nonce=RFC_NONCE)


def test_rfc7677_client_vector() -> None:
    client = rfc_client()
    assert client.mechanism == SCRAM_SHA_256 and not client.channel_bound
    assert client.initial_response() == RFC_CLIENT_FIRST
    assert client.continue_(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.done
    client.finish(RFC_SERVER_FINAL)
    assert client.done


def test_rfc7677_server_vector() -> None:
    server = ScramServer("pencil", salt=base64.b64decode(RFC_SALT), nonce=RFC_SERVER_NONCE)
    assert server.handle_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done


def test_client_rejects_a_wrong_server_signature() -> None:
    client = rfc_client()
    client.initial_response()
    client.continue_(RFC_SERVER_FIRST)
    with pytest.raises(ServerProtocolError, match="server signature") as info:
        client.finish(b"v=" + base64.b64encode(bytes(32)))
    assert info.value.sqlstate == "28000"
    assert not client.done


def test_client_reports_a_server_error_attribute() -> None:
    client = rfc_client()
    client.initial_response()
    client.continue_(RFC_SERVER_FIRST)
    with pytest.raises(ServerProtocolError, match="invalid-proof") as info:
        client.finish(b"e=invalid-proof")
    assert info.value.sqlstate == "28000"


@pytest.mark.parametrize(
    ("server_first", "fragment"),
    [
        (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce mismatch"),
        (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce mismatch"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iteration count"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1", "iteration count"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x", "iteration count"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=not*base64,i=4096", "base64"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096", "empty salt"),
        (b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "extension"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096,s=W22ZaJ0SNY7soEsUEjb6gQ==", "lacks attribute"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==", "attributes"),
        (b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1,x=y", "attributes"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_client_validates_server_first(server_first: bytes, fragment: str) -> None:
    client = rfc_client()
    client.initial_response()
    with pytest.raises(ServerProtocolError, match=fragment):
        client.continue_(server_first)


def test_client_enforces_message_order() -> None:
    client = rfc_client()
    with pytest.raises(ServerProtocolError, match="unexpected"):
        client.continue_(RFC_SERVER_FIRST)
    client.initial_response()
    with pytest.raises(ServerProtocolError, match="unexpected"):
        client.finish(RFC_SERVER_FINAL)
    client.continue_(RFC_SERVER_FIRST)
    with pytest.raises(ServerProtocolError, match="unexpected"):
        client.continue_(RFC_SERVER_FIRST)


def test_client_needs_a_mechanism_it_knows() -> None:
    with pytest.raises(ServerProtocolError, match="no SASL mechanism") as info:
        ScramClient("u", "p", mechanisms=["OAUTHBEARER"])
    assert info.value.sqlstate == "08001"
    with pytest.raises(ServerProtocolError, match="channel binding"):
        ScramClient("u", "p", mechanisms=[SCRAM_SHA_256_PLUS])


def test_user_name_is_escaped() -> None:
    client = ScramClient("a=b,c", "p", mechanisms=[SCRAM_SHA_256], nonce="abc")
    assert client.initial_response() == b"n,,n=a=3Db=2Cc,r=abc"


def test_generated_nonces_differ_and_are_printable() -> None:
    first = ScramClient("u", "p", mechanisms=[SCRAM_SHA_256]).initial_response()
    second = ScramClient("u", "p", mechanisms=[SCRAM_SHA_256]).initial_response()
    assert first != second
    nonce = first.split(b",r=")[1]
    assert len(nonce) == 24 and b"," not in nonce
    with pytest.raises(ValueError):
        ScramClient("u", "p", mechanisms=[SCRAM_SHA_256], nonce="a,b")


def exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.handle_first(client.initial_response())
    server_final = server.handle_final(client.continue_(server_first))
    client.finish(server_final)


@pytest.mark.parametrize("password", ["pencil", "", "pässwörd", "a\u00adb\u00a0c\ufb01", "é\x07"])
def test_client_against_server(password: str) -> None:
    client = ScramClient("app", password, mechanisms=ScramServer.mechanisms)
    server = ScramServer(password, iterations=1024)
    exchange(client, server)
    assert client.done and server.done


def test_wrong_password_fails_on_the_server_side() -> None:
    client = ScramClient("app", "wrong", mechanisms=[SCRAM_SHA_256])
    server = ScramServer("right")
    server_first = server.handle_first(client.initial_response())
    with pytest.raises(ClientProtocolError, match="password authentication failed") as info:
        server.handle_final(client.continue_(server_first))
    assert info.value.sqlstate == "28P01"
    assert not server.done


def test_server_without_the_password_fails_on_the_client_side() -> None:
    """A server that accepts any proof cannot forge the server signature."""
    client = ScramClient("app", "secret", mechanisms=[SCRAM_SHA_256])
    impostor = ScramServer("not the secret")
    server_first = impostor.handle_first(client.initial_response())
    client.continue_(server_first)
    forged = b"v=" + base64.b64encode(hmac.digest(b"guess", b"x", "sha256"))
    with pytest.raises(ServerProtocolError):
        client.finish(forged)


@pytest.mark.parametrize("password", list(PG15_SECRETS))
def test_keys_match_postgresql(password: str) -> None:
    secret = ScramSecret.parse(PG15_SECRETS[password])
    assert ScramSecret.from_password(password, iterations=secret.iterations, salt=secret.salt) == secret
    assert str(secret) == PG15_SECRETS[password]
    # And a server holding only PostgreSQL's secret accepts our client.
    client = ScramClient("app", password, mechanisms=[SCRAM_SHA_256])
    server = ScramServer.from_secret(secret)
    exchange(client, server)
    assert client.done


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_secret_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ScramSecret.parse(text)


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("I\u00adX", b"IX"),  # RFC 4013 section 3 example: soft hyphen maps to nothing
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),  # NFKC
        ("x\u00a0y\u00e9", "x y\u00e9".encode()),  # non-ASCII space maps to space
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw
        ("\u00e9\u0007", "\u00e9\u0007".encode()),  # prohibited: raw
        ("\u0627\u00e91", "\u0627\u00e91".encode()),  # RandAL not last: raw
        ("\u0627\u0628", "\u0627\u0628".encode()),  # all RandAL: prepared as is
        ("caf\udce9", b"caf\xe9"),  # not UTF-8 (surrogate-escaped byte): raw
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep_password(password) == prepared


def test_server_accepts_y_and_checks_the_binding_echo() -> None:
    client = ScramClient("app", "pw", mechanisms=[SCRAM_SHA_256], channel_binding=b"x" * 32)
    first = client.initial_response()
    assert first.startswith(b"y,,n=app,r=")
    server = ScramServer("pw")
    final = client.continue_(server.handle_first(first))
    assert final.startswith(b"c=eSws,")  # base64("y,,")
    client.finish(server.handle_final(final))
    assert client.done


@pytest.mark.parametrize(
    ("client_first", "fragment", "code"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding", "08P01"),
        (b"n,a=admin,n=,r=abc", "authorization identity", "0A000"),
        (b"x,,n=,r=abc", "GS2", "08P01"),
        (b"n,,r=abc", "attribute", "08P01"),
        (b"n,,n=,r=", "nonce", "08P01"),
        (b"n,,m=x,n=,r=abc", "extension", "0A000"),
    ],
)
def test_server_validates_client_first(client_first: bytes, fragment: str, code: str) -> None:
    with pytest.raises(ClientProtocolError, match=fragment) as info:
        ScramServer("pw").handle_first(client_first)
    assert info.value.sqlstate == code


def test_server_validates_client_final() -> None:
    server = ScramServer("pw", nonce="SERVER")
    server.handle_first(b"n,,n=,r=abc")
    good_proof = base64.b64encode(bytes(32)).decode()
    for final, fragment in [
        (f"c=eSws,r=abcSERVER,p={good_proof}", "channel binding"),
        (f"c=biws,r=abcOTHER,p={good_proof}", "nonce"),
        ("c=biws,r=abcSERVER", "no proof"),
        ("c=biws,r=abcSERVER,p=***", "base64"),
        (f"c=biws,r=abcSERVER,p={good_proof}", "password authentication failed"),
    ]:
        with pytest.raises(ClientProtocolError, match=fragment):
            server.handle_final(final.encode())
    with pytest.raises(ClientProtocolError, match="unexpected"):
        ScramServer("pw").handle_final(b"c=biws,r=x,p=y")


def test_plus_uses_tls_server_end_point_binding() -> None:
    binding = hashlib.sha256(b"certificate").digest()
    client = ScramClient(
        "user", "pencil", mechanisms=[SCRAM_SHA_256_PLUS, SCRAM_SHA_256], channel_binding=binding, nonce=RFC_NONCE
    )
    assert client.mechanism == SCRAM_SHA_256_PLUS and client.channel_bound
    first = client.initial_response()
    assert first == b"p=tls-server-end-point,,n=user,r=" + RFC_NONCE.encode()
    final = client.continue_(RFC_SERVER_FIRST)
    without_proof, proof_b64 = final.split(b",p=")
    cbind = base64.b64encode(b"p=tls-server-end-point,," + binding)
    assert without_proof == b"c=" + cbind + b",r=" + RFC_SERVER_FIRST[2:].split(b",")[0]
    # Check the proof with the RFC 5802 formulas written out independently.
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(RFC_SALT), 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    auth_message = b",".join((first[len(b"p=tls-server-end-point,,") :], RFC_SERVER_FIRST, without_proof))
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    assert base64.b64decode(proof_b64) == bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    client.finish(b"v=" + base64.b64encode(hmac.digest(server_key, auth_message, "sha256")))
    assert client.done


def test_plus_is_not_chosen_without_binding_data() -> None:
    client = ScramClient("u", "p", mechanisms=[SCRAM_SHA_256_PLUS, SCRAM_SHA_256])
    assert client.mechanism == SCRAM_SHA_256
    assert client.initial_response().startswith(b"n,,")


def make_cert(key: object, algorithm: hashes.HashAlgorithm | None, **sign_args: object) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.example")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    cert = builder.sign(key, algorithm, **sign_args)  # type: ignore[arg-type]
    return cert.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
        (hashes.SHA224(), "sha224"),
    ],
)
def test_tls_server_end_point_rsa(rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected: str) -> None:
    der = make_cert(rsa_key, algorithm)
    assert tls_server_end_point(der) == hashlib.new(expected, der).digest()


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [(hashes.SHA256(), "sha256"), (hashes.SHA384(), "sha384"), (hashes.SHA512(), "sha512")],
)
def test_tls_server_end_point_ecdsa(algorithm: hashes.HashAlgorithm, expected: str) -> None:
    der = make_cert(ec.generate_private_key(ec.SECP384R1()), algorithm)
    assert tls_server_end_point(der) == hashlib.new(expected, der).digest()


# DER of the OID sha256WithRSAEncryption (1.2.840.113549.1.1.11); .4 is MD5, .5 is SHA-1.
SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")


@pytest.mark.parametrize("last_arc", [4, 5])
def test_tls_server_end_point_md5_and_sha1_use_sha256(rsa_key: rsa.RSAPrivateKey, last_arc: int) -> None:
    # cryptography no longer signs with MD5 or SHA-1, so relabel a SHA-256 certificate: the
    # hash choice reads only the signatureAlgorithm OID, not the signature.
    der = make_cert(rsa_key, hashes.SHA256()).replace(SHA256_WITH_RSA, SHA256_WITH_RSA[:-1] + bytes([last_arc]))
    assert SHA256_WITH_RSA not in der
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


@pytest.mark.parametrize(("algorithm", "expected"), [(hashes.SHA384(), "sha384"), (hashes.SHA256(), "sha256")])
def test_tls_server_end_point_rsa_pss(
    rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected: str
) -> None:
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    der = make_cert(rsa_key, algorithm, rsa_padding=pss)
    assert tls_server_end_point(der) == hashlib.new(expected, der).digest()


def test_tls_server_end_point_refuses_ed25519_and_garbage() -> None:
    with pytest.raises(ValueError, match=r"1\.3\.101\.112"):
        tls_server_end_point(make_cert(ed25519.Ed25519PrivateKey.generate(), None))
    for garbage in (b"", b"\x30", b"\x30\x03\x02\x01\x00", b"\x04\x00", b"\x30\x84\xff\xff\xff\xff"):
        with pytest.raises(ValueError):
            tls_server_end_point(garbage)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_scram_parsers_raise_only_protocol_errors(data: bytes) -> None:
    client = rfc_client()
    client.initial_response()
    for step in (client.continue_, client.finish):
        try:
            step(data)
        except ServerProtocolError:
            pass
    for feed in (ScramServer("pw", iterations=1).handle_first,):
        try:
            feed(data)
        except ClientProtocolError:
            pass
    server = ScramServer("pw", iterations=1)
    server.handle_first(b"n,,n=,r=abc")
    try:
        server.handle_final(data)
    except ClientProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_der_walk_raises_only_value_error(data: bytes) -> None:
    try:
        tls_server_end_point(b"\x30" + bytes([min(len(data), 127)]) + data)
    except ValueError:
        pass


def test_protocol_errors_are_the_wire_ones() -> None:
    assert issubclass(ClientProtocolError, ProtocolError)
    assert issubclass(ServerProtocolError, ProtocolError)


# --- The salted-password cache ---


def _hi(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def test_cache_hits_on_the_same_triple_and_returns_hi() -> None:
    cache = SaltedPasswordCache()
    first = cache.salted_password(b"pencil", b"salt", 4096)
    assert first == _hi(b"pencil", b"salt", 4096)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert cache.salted_password(b"pencil", b"salt", 4096) == first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("password", "salt", "iterations"),
    [(b"pencil", b"other salt", 4096), (b"pencil", b"salt", 4097), (b"pencil!", b"salt", 4096)],
    ids=["salt", "iterations", "password"],
)
def test_cache_misses_when_any_of_the_triple_differs(password: bytes, salt: bytes, iterations: int) -> None:
    cache = SaltedPasswordCache()
    cache.salted_password(b"pencil", b"salt", 4096)
    assert cache.salted_password(password, salt, iterations) == _hi(password, salt, iterations)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)


def test_cache_keys_do_not_run_together() -> None:
    """(b"ab", b"c") and (b"a", b"bc") concatenate alike; the length prefixes keep them apart."""
    cache = SaltedPasswordCache()
    cache.salted_password(b"ab", b"c", 1)
    assert cache.salted_password(b"a", b"bc", 1) == _hi(b"a", b"bc", 1)
    assert cache.misses == 2


def test_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    assert SaltedPasswordCache().maxsize == 64
    cache = SaltedPasswordCache(maxsize=3)
    for n in range(3):
        cache.salted_password(b"pw", bytes([n]), 1)
    cache.salted_password(b"pw", bytes([0]), 1)  # 0 is now the most recently used
    for n in range(3, 10):
        cache.salted_password(b"pw", bytes([n]), 1)
        assert len(cache) <= 3
    assert len(cache) == 3
    hits = cache.hits
    cache.salted_password(b"pw", bytes([9]), 1)
    assert cache.hits == hits + 1
    cache.salted_password(b"pw", bytes([0]), 1)  # evicted by now
    assert cache.hits == hits + 1
    with pytest.raises(ValueError):
        SaltedPasswordCache(maxsize=0)


def test_cache_keeps_no_password_in_the_clear() -> None:
    cache = SaltedPasswordCache()
    cache.salted_password(b"hunter2-secret", b"salt", 1)
    (slot,) = cache._entries  # the only key
    assert b"hunter2" not in slot and len(slot) == 32
    assert "hunter2" not in repr(cache) and repr(cache).startswith("SaltedPasswordCache(1/64 entries")
    cache.clear()
    assert len(cache) == 0


def test_client_reuses_the_salted_password_and_the_exchange_still_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "salted_passwords", SaltedPasswordCache())
    cache = scram.salted_passwords
    secret = ScramSecret.parse(PG15_SECRETS["pencil"])  # PostgreSQL's stored keys: no Hi() here
    for round_no in range(3):
        client = ScramClient("app", "pencil", mechanisms=[SCRAM_SHA_256])
        server = ScramServer.from_secret(secret)
        exchange(client, server)
        assert client.done and server.done
        assert cache.misses == 1 and cache.hits == round_no  # Hi() ran on the first login only
    # The RFC 7677 vector, twice: the second time from the cache, byte for byte the same.
    for _ in range(2):
        client = rfc_client()
        client.initial_response()
        assert client.continue_(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
        client.finish(RFC_SERVER_FINAL)
        assert client.done
    assert cache.misses == 2


def test_a_cached_wrong_password_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "salted_passwords", SaltedPasswordCache())
    server_secret = ScramSecret.from_password("right", salt=b"fixed salt")
    for _ in range(2):
        client = ScramClient("app", "wrong", mechanisms=[SCRAM_SHA_256])
        server = ScramServer.from_secret(server_secret)
        with pytest.raises(ClientProtocolError, match="password authentication failed"):
            server.handle_final(client.continue_(server.handle_first(client.initial_response())))
    assert scram.salted_passwords.hits == 1


def test_server_keeps_one_salt_per_password_so_logins_hit_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "salted_passwords", SaltedPasswordCache())
    cache = scram.salted_passwords
    firsts = []
    for _ in range(3):
        client = ScramClient("app", "pw", mechanisms=ScramServer.mechanisms)
        server = ScramServer("pw")
        firsts.append(server.handle_first(client.initial_response()))
        client.finish(server.handle_final(client.continue_(firsts[-1])))
        assert client.done and server.done
    salts = {first.split(b",s=")[1].split(b",")[0] for first in firsts}
    assert len(salts) == 1 and len(base64.b64decode(salts.pop())) == 16
    # Server and client share the one process cache here: one PBKDF2 for all six sides.
    assert cache.misses == 1 and cache.hits == 5
    other = ScramServer("another password").handle_first(b"n,,n=,r=abc")
    assert other.split(b",s=")[1] != firsts[0].split(b",s=")[1]


def test_the_process_cache_is_the_default() -> None:
    assert isinstance(salted_passwords, SaltedPasswordCache) and salted_passwords.maxsize == 64
