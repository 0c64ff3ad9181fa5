"""Protocol errors that say whose fault they are.

h11 splits LocalProtocolError from RemoteProtocolError so the caller knows which side to blame;
pgsidecar sits between two peers, so the split is by peer: the client broke the protocol, or the
server did. Each error carries the SQLSTATE pgsidecar reports for it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ClientProtocolError", "ProtocolError", "ServerProtocolError"]


class ProtocolError(Exception):
    """A peer sent bytes that are not valid PostgreSQL protocol v3."""

    #: protocol_violation (PostgreSQL errcodes.txt, class 08); subclasses and callers may override.
    default_sqlstate: ClassVar[str] = "08P01"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate if sqlstate is not None else self.default_sqlstate


class ClientProtocolError(ProtocolError):
    """The client (the application side) broke the protocol or failed authentication."""


class ServerProtocolError(ProtocolError):
    """The upstream server broke the protocol, or asked for something pgsidecar cannot do."""
