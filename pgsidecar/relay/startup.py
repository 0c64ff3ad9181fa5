"""The session's first phase, sans-IO: startup packets and the client's side of authentication.

PostgreSQL docs 55.2.1 "Start-up": SSLRequest and GSSENCRequest come first, then the
StartupMessage or a CancelRequest. Startup parameters are carried byte for byte (non-UTF-8 bytes
as surrogate escapes, see wire/payload.py) and shown escaped in logs and records.
"""

from __future__ import annotations

from pgsidecar.auth.scram import ScramServer
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.commands import LogLevel, TimerName
from pgsidecar.relay.context import SessionContext
from pgsidecar.relay.login import Login
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ClientProtocolError
from pgsidecar.wire.frames import FrameScanner, MessageBuffer, StartupReader

_PIPELINED = "messages sent before authentication completed are not accepted"


class ClientStartup:
    """The client's startup packets and, in configured auth, its SCRAM or password exchange."""

    def __init__(self, ctx: SessionContext, login: Login) -> None:
        self.ctx = ctx
        self.login = login
        self.reader = StartupReader()
        self.scram: ScramServer | None = None
        self.password_scan = FrameScanner(b"p", 100_000, client=True)  # SASL messages
        self.auth_buffer = MessageBuffer(100_000, client=True)  # the cleartext password message
        self.answered = False  # the client gave its password: what follows waits for relaying

    def connected(self, event: ev.ClientConnected) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.peer, ctx.trusted_transport = event.peer, event.trusted_transport
        ctx.last_client_at = event.now
        if event.refusal is not None:
            # The listener is full or shutting down: PostgreSQL's own words for both.
            code, text = event.refusal
            return [*ctx.fatal_to_client(code, text), cmd.Log(LogLevel.WARNING, f"refused a client: {text}")]
        return [cmd.SetTimer(TimerName.STARTUP, ctx.policy.startup_timeout_s)]

    def tls_started(self, event: ev.ClientTLSStarted) -> list[cmd.Command]:
        self.ctx.client_tls = True
        return []

    def timeout(self) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.goto(Phase.CLOSED)
        return [
            cmd.Log(LogLevel.INFO, f"client {ctx.peer} did not finish startup in time"),
            cmd.CloseClient(),
            cmd.CloseServer(),
        ]

    def data(self, data: bytes) -> list[cmd.Command]:
        ctx = self.ctx
        self.reader.feed(data)
        out: list[cmd.Command] = []
        while ctx.phase is Phase.STARTUP:
            payload = self.reader.next_packet()
            if payload is None:
                break
            msg = fe.decode_startup_packet(payload)
            if isinstance(msg, fe.SSLRequest):
                if ctx.client_tls or self.reader.rest():
                    raise ClientProtocolError("SSLRequest after TLS, or with data pipelined after it")
                out.append(cmd.StartClientTLS() if ctx.policy.client_tls else cmd.SendToClient(b"N"))
            elif isinstance(msg, fe.GSSENCRequest):
                out.append(cmd.SendToClient(b"N"))
            elif isinstance(msg, fe.CancelRequest):
                ctx.goto(Phase.CLOSED)
                out += [cmd.ForwardCancel(msg.pid, msg.secret), cmd.CloseClient()]
            else:
                out += self._startup_message(msg)
                rest = self.reader.rest() if self._authenticating() else b""
                if rest:
                    if self.scram is not None:
                        raise ClientProtocolError(_PIPELINED)  # SCRAM cannot be answered in advance
                    # A password (and more) sent before it was asked for, as PostgreSQL allows:
                    # kept until the server asks (Login calls buffered_password).
                    self.auth_buffer.feed(rest)
        return out

    def _authenticating(self) -> bool:
        return self.ctx.phase is Phase.AUTHENTICATING  # a method: the phase changes under a loop

    def _startup_message(self, msg: fe.StartupMessage) -> list[cmd.Command]:
        ctx = self.ctx
        policy = ctx.policy
        if msg.protocol >> 16 != 3:
            raise ClientProtocolError(
                f"unsupported frontend protocol {msg.protocol >> 16}.{msg.protocol & 0xFFFF}: "
                "server supports 3.0 to 3.0"
            )
        out: list[cmd.Command] = []
        unknown = tuple(k for k in msg.params if k.startswith("_pq_."))
        if msg.protocol != fe.PROTOCOL_3_0 or unknown:
            out.append(cmd.SendToClient(be.NegotiateProtocolVersion(fe.PROTOCOL_3_0, unknown).encode()))
        params = {k: v for k, v in msg.params.items() if not k.startswith("_pq_.")}
        if not params.get("user"):
            return out + ctx.fatal_to_client(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no PostgreSQL user name specified in startup packet"
            )
        refusal = self._transport_refusal()
        if refusal:
            return out + ctx.fatal_to_client(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, refusal, log=f"refused {ctx.peer}: {refusal}"
            )
        params.setdefault("database", params["user"])
        if policy.upstream_user is not None:
            params["user"] = policy.upstream_user
        if policy.upstream_dbname:
            params["database"] = policy.upstream_dbname
        if policy.application_name and "application_name" not in params:
            params["application_name"] = policy.application_name
        ctx.params = params
        ctx.goto(Phase.AUTHENTICATING)
        if policy.upstream_user is not None and policy.client_auth == "scram":
            # 55.3 SASL Authentication, with pgsidecar as the server for the local hop.
            self.scram = ScramServer(policy.client_password or "")
            return [*out, cmd.SendToClient(be.AuthenticationSASL(("SCRAM-SHA-256",)).encode())]
        return [*out, cmd.CancelTimer(TimerName.STARTUP), self.ctx.open_server(reconnect=False)]

    def _transport_refusal(self) -> str | None:
        """Passwords cross only loopback, unix sockets or TLS; configured trust is loopback only."""
        ctx = self.ctx
        if ctx.policy.upstream_user is None:
            if ctx.trusted_transport or ctx.client_tls:
                return None
            return "pgsidecar accepts passwords only over loopback, a unix socket or TLS; connect with sslmode=require"
        if ctx.policy.client_auth == "trust" and not ctx.trusted_transport:
            return "pgsidecar trusts only loopback and unix socket clients (auth.client_auth: trust)"
        return None

    def _client_scram_data(self, data: bytes) -> list[cmd.Command]:
        assert self.scram is not None
        out: list[cmd.Command] = []
        before = self.password_scan.messages
        for i, (_t, payload) in enumerate(self.password_scan.feed(data)):
            scram = self.scram
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
                    user = self.ctx.params.get("user", "")
                    return out + self.ctx.fatal_to_client(
                        sqlstate.INVALID_PASSWORD,
                        f'password authentication failed for user "{user}"',
                        log="local SCRAM authentication failed",
                    )
                raise
            self.scram = None
            if self.password_scan.messages - before != i + 1 or not self.password_scan.at_boundary:
                raise ClientProtocolError(_PIPELINED)
            return [
                *out,
                cmd.SendToClient(be.AuthenticationSASLFinal(final).encode()),
                cmd.CancelTimer(TimerName.STARTUP),
                self.ctx.open_server(reconnect=False),
            ]
        return out

    def buffered_password(self) -> list[cmd.Command]:
        """The server asked for the password: answer it with one the client already sent."""
        return self._take_password() if self.auth_buffer.pending() else []

    def password(self, data: bytes) -> list[cmd.Command]:
        """The client answers the AuthenticationCleartextPassword we sent on the server's behalf.
        What it sends after its password, before the login is done, is held and relayed from
        that message boundary once relaying starts (PostgreSQL would read it then too)."""
        if self.scram is not None:
            return self._client_scram_data(data)
        if self.answered:
            return self.ctx.hold(data)
        self.auth_buffer.feed(data)
        if not self.login.waiting:
            return []  # sent before the server asked: kept for buffered_password
        return self._take_password()

    def _take_password(self) -> list[cmd.Command]:
        message = self.auth_buffer.next()
        if message is None:
            return []  # the password message is split across reads: wait for the rest
        t, payload = message
        if t != fe.PasswordMessage.TYPE[0]:
            # 55.2.1: only a password response is valid here.
            raise ClientProtocolError("expected a password response message")
        self.answered = True
        out = self.login.provide_password(payload.rstrip(b"\x00").decode("utf-8", "replace"))
        rest = self.auth_buffer.rest()
        return out + self.ctx.hold(rest) if rest else out
