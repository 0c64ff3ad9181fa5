"""The md5 password response (pgsidecar.auth.md5)."""

from __future__ import annotations

import hashlib

import pytest

from pgsidecar.auth.md5 import md5_password


def test_md5_follows_the_documented_formula() -> None:
    # 55.3.1: concat('md5', md5(concat(md5(concat(password, username)), random-salt)))
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secret" + b"alice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_password("alice", "secret", salt) == expected
    assert len(expected) == 35 and b"\0" not in expected


def test_md5_known_pair_from_postgresql() -> None:
    # PostgreSQL 15 stored "md5e55f71fef883ee8efa627b60ba1e4c26" for role m, password postgres;
    # the response to a salt is md5 over that stored hex digest and the salt.
    salt = b"abcd"
    stored_hex = b"e55f71fef883ee8efa627b60ba1e4c26"
    assert md5_password("m", "postgres", salt) == (b"md5" + hashlib.md5(stored_hex + salt).hexdigest().encode())
    assert md5_password("m", "postgres", b"\x00\x00\x00\x00") == (
        b"md5" + hashlib.md5(stored_hex + b"\x00" * 4).hexdigest().encode()
    )


def test_md5_depends_on_user_salt_and_non_ascii_password() -> None:
    salt = b"salt"
    assert md5_password("a", "pw", salt) != md5_password("b", "pw", salt)
    assert md5_password("a", "pw", salt) != md5_password("a", "pw", b"tlas")
    inner = hashlib.md5("pässwörd".encode() + b"a").hexdigest().encode()
    assert md5_password("a", "pässwörd", salt) == b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def test_md5_salt_is_four_bytes() -> None:
    with pytest.raises(ValueError):
        md5_password("a", "b", b"abc")
