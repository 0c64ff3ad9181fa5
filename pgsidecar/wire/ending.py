"""How a connection ended, as the socket told it: one vocabulary for the runtime that sees it,
the brain that decides on it and the classifier that names its cause."""

from __future__ import annotations

import enum


class SocketEnd(enum.StrEnum):
    EOF = "eof"  # a FIN (under TLS: with or without close_notify, said separately)
    RESET = "reset"  # ECONNRESET / EPIPE
    TIMEOUT = "timeout"  # keepalives or TCP_USER_TIMEOUT gave up (ETIMEDOUT)
    UNREACHABLE = "unreachable"  # EHOSTUNREACH / ENETUNREACH
    TLS_ERROR = "tls_error"  # an alert or a broken record
    OTHER = "other"
    ROLE_LOST = "role_lost"  # pgsidecar left a server that lost the role the session needs  # anything else (a protocol error of the server's, an unknown errno)
