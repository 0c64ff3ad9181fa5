"""The session's first phase, sans-IO: startup packets and the client's side of authentication.

PostgreSQL docs 55.2.1 "Start-up": SSLRequest and GSSENCRequest come first, then the
StartupMessage or a CancelRequest. Kept apart from connection.py, which holds the rest of the
session; this mixin reads and sets the same attributes.
"""

from __future__ import annotations

from pgsidecar.auth.scram import ScramServer
from pgsidecar.relay import commands as cmd
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError
from pgsidecar.wire.frames import FrameScanner

class StartupMixin:
    """Startup and client authentication for SidecarConnection."""

    def _startup_data(self, data: bytes) -> list[object]:
        self.startup.feed(data)
        out: list[object] = []
        while self.phase is Phase.STARTUP:
            payload = self.startup.next_packet()
            if payload is None:
                break
            msg = fe.decode_startup_packet(payload)
            if isinstance(msg, fe.SSLRequest):
                if self.client_tls or self.startup.rest():
                    raise ClientProtocolError("SSLRequest after TLS, or with data pipelined after it")
                out.append(cmd.StartClientTLS() if self.policy.client_tls else cmd.SendToClient(b"N"))
            elif isinstance(msg, fe.GSSENCRequest):
                out.append(cmd.SendToClient(b"N"))
            elif isinstance(msg, fe.CancelRequest):
                self._goto(Phase.CLOSED)
                out += [cmd.ForwardCancel(msg.pid, msg.secret), cmd.CloseClient()]
            else:
                out += self._startup_message(msg)
        return out

    def _startup_message(self, msg: fe.StartupMessage) -> list[object]:
        if msg.protocol >> 16 != 3:
            raise ClientProtocolError(
                f"unsupported frontend protocol {msg.protocol >> 16}.{msg.protocol & 0xFFFF}: "
                "server supports 3.0 to 3.0"
            )
        out: list[object] = []
        unknown = tuple(k for k in msg.params if k.startswith("_pq_."))
        if msg.protocol != fe.PROTOCOL_3_0 or unknown:
            out.append(cmd.SendToClient(be.NegotiateProtocolVersion(fe.PROTOCOL_3_0, unknown).encode()))
        params = {k: v for k, v in msg.params.items() if not k.startswith("_pq_.")}
        if not params.get("user"):
            return out + self._fatal_to_client(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no PostgreSQL user name specified in startup packet"
            )
        refusal = self._transport_refusal()
        if refusal:
            return out + self._fatal_to_client(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, refusal, log=f"refused {self.peer}: {refusal}"
            )
        params.setdefault("database", params["user"])
        if self.policy.upstream_user is not None:
            params["user"] = self.policy.upstream_user
        if self.policy.upstream_dbname:
            params["database"] = self.policy.upstream_dbname
        if self.policy.application_name and "application_name" not in params:
            params["application_name"] = self.policy.application_name
        self.params = params
        self._goto(Phase.AUTHENTICATING)
        if self.policy.upstream_user is not None and self.policy.client_auth == "scram":
            # 55.3 SASL Authentication, with pgsidecar as the server for the local hop.
            self.client_scram = ScramServer(self.policy.client_password or "")
            self.client_scan = FrameScanner(b"p", 100_000, client=True)
            return out + [cmd.SendToClient(be.AuthenticationSASL(("SCRAM-SHA-256",)).encode())]
        return out + [cmd.CancelTimer("startup"), cmd.OpenServer()]

    def _transport_refusal(self) -> str | None:
        """Passwords cross only loopback, unix sockets or TLS; configured trust is loopback only."""
        if self.policy.upstream_user is None:
            if self.trusted_transport or self.client_tls:
                return None
            return "pgsidecar accepts passwords only over loopback, a unix socket or TLS; connect with sslmode=require"
        if self.policy.client_auth == "trust" and not self.trusted_transport:
            return "pgsidecar trusts only loopback and unix socket clients (auth.client_auth: trust)"
        return None

    def _client_scram_data(self, data: bytes) -> list[object]:
        assert self.client_scram is not None
        out: list[object] = []
        for t, payload in self.client_scan.feed(data):
            scram = self.client_scram
            try:
                if not scram.started:
                    first = fe.SASLInitialResponse.decode(payload)
                    if first.mechanism != "SCRAM-SHA-256":
                        raise ClientProtocolError(f"unsupported SASL mechanism {first.mechanism}")
                    reply = scram.handle_first(first.data)
                    out.append(cmd.SendToClient(be.AuthenticationSASLContinue(reply).encode()))
                    continue
                final = scram.handle_final(fe.SASLResponse.decode(payload).data)
            except ClientProtocolError as exc:
                if exc.sqlstate == sqlstate.INVALID_PASSWORD:
                    user = self.params.get("user", "")
                    return out + self._fatal_to_client(
                        sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user}"',
                        log="local SCRAM authentication failed")
                raise
            self.client_scram = None
            return out + [cmd.SendToClient(be.AuthenticationSASLFinal(final).encode()),
                          cmd.CancelTimer("startup"), cmd.OpenServer()]
        return out

    def _password_data(self, data: bytes) -> list[object]:
        """The client answers the AuthenticationCleartextPassword we sent on the server's behalf."""
        if self.client_scram is not None:
            return self._client_scram_data(data)
        before = self.client_scan.messages
        frames = self.client_scan.feed(data)
        if self.login is None or not self.login_waiting:
            raise ClientProtocolError("unexpected message before authentication completed")
        for _t, payload in frames:
            password = payload.rstrip(b"\x00").decode("utf-8", "replace")
            self.password = password
            self.login_waiting = False
            return [cmd.CancelTimer("startup"), cmd.SendToServer(self.login.provide_password(password))]
        if self.client_scan.messages != before:
            # 55.2.1: only a password response is valid here.
            raise ClientProtocolError("expected a password response message")
        return []  # the password message is split across reads: wait for the rest
