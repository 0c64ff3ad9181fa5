"""PostgreSQL's md5 password response (55.3.1 / 55.7 AuthenticationMD5Password).

Still sent by servers whose roles have md5-hashed passwords, so pgsidecar must answer it when
authenticating upstream in passthrough mode.
"""

from __future__ import annotations

import hashlib

__all__ = ["md5_password"]


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage content for an md5 request, without its NUL:
    ``"md5" + md5(md5(password + user).hexdigest() + salt).hexdigest()``."""
    if len(salt) != 4:
        raise ValueError(f"an md5 salt is 4 bytes, not {len(salt)}")
    inner = hashlib.md5(
        password.encode("utf-8", "surrogateescape") + user.encode("utf-8", "surrogateescape")
    ).hexdigest()
    return b"md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest().encode("ascii")
