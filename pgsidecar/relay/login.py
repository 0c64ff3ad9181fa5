"""The startup and authentication exchange with the upstream server, sans-IO.

PostgreSQL docs 55.2.1 "Start-up" and 55.3 "SASL Authentication": the client sends a
StartupMessage; the server asks for a password (cleartext, MD5 or SASL), says AuthenticationOk,
then ParameterStatus*, BackendKeyData and ReadyForQuery. The same exchange serves the first
connect, every reconnect and ``pgsidecar check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pgsidecar.auth.md5 import md5_password
from pgsidecar.auth.scram import ScramClient, channel_binding_for
from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from pgsidecar.relay.events import ConnectionFacts
from pgsidecar.relay.hosts import Role, mismatch, probe_for, probed
from pgsidecar.relay.phases import Phase
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire import sqlstate
from pgsidecar.wire.errors import ServerProtocolError
from pgsidecar.wire.frames import MessageBuffer
from pgsidecar.wire.payload import show, typed_message

if TYPE_CHECKING:
    from pgsidecar.relay.context import SessionContext
    from pgsidecar.relay.reconnect import Reconnect
    from pgsidecar.relay.relaying import Relaying
    from pgsidecar.relay.startup import ClientStartup


@dataclass(slots=True)
class LoginResult:
    """What the server told us by the time it was ready for queries."""

    params: dict[str, str] = field(default_factory=dict)
    backend_pid: int = 0
    backend_secret: bytes = b""
    notices: list[bytes] = field(default_factory=list)
    leftover: bytes = b""


@dataclass(slots=True)
class LoginStep:
    """The outcome of one ``feed``: bytes to send, and at most one of the terminal outcomes."""

    send: bytes = b""
    needs_password: bool = False
    error: be.ErrorResponse | None = None
    error_bytes: bytes = b""
    done: LoginResult | None = None


class UpstreamLogin:
    """Drives one upstream login. ``password`` may arrive later through ``provide_password``."""

    def __init__(
        self,
        params: dict[str, str],
        password: str | None,
        *,
        channel_binding: bytes | None = None,
        cert_der: bytes | None = None,
        max_len: int = 1 << 20,
    ) -> None:
        self.params = params
        self.password = password
        if channel_binding is None and cert_der is not None:
            channel_binding = channel_binding_for(cert_der)
        self.channel_binding = channel_binding
        self.auth_method: str | None = None
        self._messages = MessageBuffer(max_len, client=False)
        self._scram: ScramClient | None = None
        self._awaiting: (
            be.AuthenticationCleartextPassword | be.AuthenticationMD5Password | be.AuthenticationSASL | None
        ) = None
        self._result = LoginResult()
        self._authenticated = False

    def start(self) -> bytes:
        return fe.StartupMessage(dict(self.params)).encode()

    def provide_password(self, password: str) -> bytes:
        """The client answered our password request; continue where the server left us."""
        self.password = password
        request = self._awaiting
        self._awaiting = None
        if request is None:
            return b""
        return self._answer(request)

    def feed(self, data: bytes) -> LoginStep:
        """Consume server bytes; login is not the hot path, so whole messages are buffered."""
        step = LoginStep()
        self._messages.feed(data)
        out = bytearray()
        while (message := self._messages.next()) is not None:
            t, payload = message
            if t == be.ErrorResponse.TYPE[0]:
                step.error = be.ErrorResponse.decode(payload)
                step.error_bytes = typed_message(be.ErrorResponse.TYPE, payload)
                return step
            if t == be.ReadyForQuery.TYPE[0]:
                if not self._authenticated:
                    raise ServerProtocolError("ReadyForQuery before authentication completed")
                self._result.leftover = self._messages.rest()
                step.send = bytes(out)
                step.done = self._result
                return step
            out += self._handle(t, payload, step)
        step.send = bytes(out)
        return step

    def _handle(self, t: int, payload: bytes, step: LoginStep) -> bytes:
        if t == be.ParameterStatus.TYPE[0]:
            msg = be.ParameterStatus.decode(payload)
            self._result.params[msg.name] = msg.value
        elif t == be.BackendKeyData.TYPE[0]:
            key = be.BackendKeyData.decode(payload)
            self._result.backend_pid, self._result.backend_secret = key.pid, key.secret
        elif t == be.NoticeResponse.TYPE[0]:
            self._result.notices.append(typed_message(be.NoticeResponse.TYPE, payload))
        elif t == be.NegotiateProtocolVersion.TYPE[0]:
            pass  # NegotiateProtocolVersion: we ask for 3.0 and no options, so nothing to adapt
        elif t == be.AuthenticationOk.TYPE[0]:  # every Authentication* request
            return self._auth(be.decode_authentication(payload), step)
        return b""

    def _auth(self, request: object, step: LoginStep) -> bytes:
        if isinstance(request, be.AuthenticationOk):
            if self._scram is not None and not self._scram.done:
                # A server that skips SASLFinal never proved it knows the password (RFC 5802).
                raise ServerProtocolError("AuthenticationOk before the SCRAM exchange completed")
            self._authenticated = True
            return b""
        if isinstance(request, (be.AuthenticationSASLContinue, be.AuthenticationSASLFinal)):
            if self._scram is None:
                raise ServerProtocolError(f"{type(request).__name__} without a SASL exchange in progress")
            if isinstance(request, be.AuthenticationSASLContinue):
                return fe.SASLResponse(self._scram.continue_(request.data)).encode()
            self._scram.finish(request.data)
            return b""
        if isinstance(
            request, (be.AuthenticationCleartextPassword, be.AuthenticationMD5Password, be.AuthenticationSASL)
        ):
            if self.password is None:
                self._awaiting = request
                step.needs_password = True
                return b""
            return self._answer(request)
        raise ServerProtocolError(f"unsupported authentication request {type(request).__name__}")

    def _answer(self, request: object) -> bytes:
        password = self.password or ""
        user = self.params.get("user", "")
        if isinstance(request, be.AuthenticationCleartextPassword):
            self.auth_method = "password"
            return fe.PasswordMessage(password.encode()).encode()
        if isinstance(request, be.AuthenticationMD5Password):
            self.auth_method = "md5"
            return fe.PasswordMessage(md5_password(user, password, request.salt)).encode()
        assert isinstance(request, be.AuthenticationSASL)
        self._scram = ScramClient(user, password, mechanisms=request.mechanisms, channel_binding=self.channel_binding)
        self.auth_method = self._scram.mechanism
        return fe.SASLInitialResponse(self._scram.mechanism, self._scram.initial_response()).encode()


class RoleProbe:
    """Reads the reply to libpq's role query: the first column of its one row, to ReadyForQuery.
    An error (the server refused the query) counts as the wrong role, as in libpq."""

    def __init__(self, result: LoginResult, role: Role, query: bytes, max_len: int) -> None:
        self.result = result
        self.role = role
        self.query = query
        self._messages = MessageBuffer(max_len, client=False)
        self._value: bytes | None = None
        self._failed = False

    def feed(self, data: bytes) -> Role | None:
        """The role with the answer folded in, once the reply is complete; else None."""
        self._messages.feed(data)
        while (msg := self._messages.next()) is not None:
            t, payload = msg
            if t == be.DataRow.TYPE[0]:
                row = be.DataRow.decode(payload)
                self._value = row.values[0] if row.values else None
            elif t == be.ErrorResponse.TYPE[0]:
                self._failed = True
            elif t == be.ReadyForQuery.TYPE[0]:
                if self._failed:
                    return Role(True, True)  # fits no attrs that needed asking
                return probed(self.role, self.query, self._value)
        return None


_GIVE_UP_STATES = frozenset(
    {sqlstate.INVALID_PASSWORD, sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, sqlstate.INVALID_CATALOG_NAME}
)


class Login:
    """The login phase of a session, first and again: runs an ``UpstreamLogin`` on every new
    upstream connection and owns the ``sslmode=allow`` retry over TLS."""

    def __init__(self, ctx: SessionContext, relay: Relaying, reconnect: Reconnect) -> None:
        self.ctx = ctx
        self.relay = relay
        self.reconnect = reconnect
        self.startup: ClientStartup  # wired by the facade
        self.exchange: UpstreamLogin | None = None
        self.waiting = False  # the server asked for a password the client has not given yet
        self.tried_tls = False
        self.probe: RoleProbe | None = None  # libpq's role query, when the login did not say

    def reset(self) -> None:
        self.exchange = None
        self.waiting = False
        self.probe = None

    def server_connected(self, event: ev.ServerConnected) -> list[cmd.Command]:
        ctx = self.ctx
        ctx.facts = ConnectionFacts(**event.facts)
        ctx.connected_wall, ctx.connected_at = event.wall, event.now
        ctx.last_server_at = event.now
        if event.password is not None:
            ctx.password = event.password  # fetched for this connect: it serves until a newer one comes
        # Channel binding is derived from the certificate in one place: UpstreamLogin.
        self.exchange = UpstreamLogin(
            ctx.params, ctx.password, channel_binding=event.channel_binding, cert_der=event.cert_der
        )
        self.waiting = False
        ctx.drops.connected(event)
        return [cmd.SendToServer(self.exchange.start())]

    def provide_password(self, password: str) -> list[cmd.Command]:
        """The client answered the password request pgsidecar made on the server's behalf."""
        assert self.exchange is not None
        self.ctx.password = password
        self.waiting = False
        return [cmd.CancelTimer(cmd.TimerName.STARTUP), cmd.SendToServer(self.exchange.provide_password(password))]

    def server_data(self, data: bytes) -> list[cmd.Command]:
        ctx = self.ctx
        if self.probe is not None:
            return self._probe_data(data)
        if self.exchange is None:
            raise ServerProtocolError(f"unexpected data from the server in phase {ctx.phase.value}")
        step = self.exchange.feed(data)
        out: list[cmd.Command] = [cmd.SendToServer(step.send)] if step.send else []
        if step.needs_password:
            if ctx.phase is not Phase.AUTHENTICATING:
                return self.reconnect.give_up("the server asked for a password that the client never gave")
            self.waiting = True
            out.append(cmd.SendToClient(be.AuthenticationCleartextPassword().encode()))
            # listen.startup_timeout covers the client's part of authentication too.
            out.append(cmd.SetTimer(cmd.TimerName.STARTUP, ctx.policy.startup_timeout_s))
            out += self.startup.buffered_password()
        elif step.error is not None:
            out += self._refused(step.error, step.error_bytes)
        elif step.done is not None:
            self.exchange = None
            ctx.backend_key = (step.done.backend_pid, step.done.backend_secret)  # the backend serving us now
            out += self._check_role(step.done, Role.from_params(step.done.params))
        return out

    # ------------------------------------------------------------------ target_session_attrs
    def _check_role(self, result: LoginResult, role: Role) -> list[cmd.Command]:
        """libpq's CONNECTION_CHECK_TARGET: ask when the login did not say, then use this
        server or leave it for the next address or host."""
        ctx = self.ctx
        walk = ctx.walk
        query = probe_for(walk.attrs, role, second_pass=walk.second_pass)
        if query is not None and not result.leftover:
            self.probe = RoleProbe(result, role, query, ctx.policy.max_message_bytes)
            return [cmd.SendToServer(query)]
        why = mismatch(walk.attrs, role, second_pass=walk.second_pass)
        address = ctx.facts.get("address") or ""
        if why is not None:
            walk.wrong_role(address, why)
            text = f'server at "{ctx.facts.get("host")}" ({address}) has the wrong role: {why}'
            self.reconnect.note_error(ctx.now, text)
            return [
                cmd.CloseServer(),
                cmd.NoteUpstream(str(ctx.facts.get("host") or ""), address, role.name, fits=False),
                cmd.Log(cmd.LogLevel.INFO, f"session {ctx.peer}: {text}; trying the next one"),
                ctx.open_server(reconnect=ctx.phase is not Phase.AUTHENTICATING),
            ]
        ctx.role = role
        ctx.role_lost = None
        out: list[cmd.Command] = [cmd.NoteUpstream(str(ctx.facts.get("host") or ""), address, role.name, fits=True)]
        if ctx.phase is Phase.AUTHENTICATING:
            return out + self.relay.start(result)
        return out + self.reconnect.start_replay(result)

    def _probe_data(self, data: bytes) -> list[cmd.Command]:
        probe = self.probe
        assert probe is not None
        answer = probe.feed(data)
        if answer is None:
            return []
        self.probe = None
        return self._check_role(probe.result, answer)

    def _refused(self, error: be.ErrorResponse, raw: bytes) -> list[cmd.Command]:
        ctx = self.ctx
        reconnecting = ctx.phase is Phase.RECONNECTING
        if (
            ctx.policy.allow_tls_retry
            and not self.tried_tls
            and error.code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
        ):
            # libpq's sslmode=allow: plaintext first; if the server refuses it, try again with TLS.
            self.tried_tls = True
            self.exchange = None
            return [cmd.CloseServer(), replace(ctx.open_server(reconnect=reconnecting), use_tls=True)]
        if error.code == sqlstate.CANNOT_CONNECT_NOW and ctx.walk.count > 1:
            # Starting up, shutting down, or not yet accepting (a standby): with a host list, a
            # host that cannot take connections now is passed over like one that is down.
            return self.reconnect.host_failed(ctx.now, f"{error.code} {error.message}", error.code)
        if ctx.phase is Phase.AUTHENTICATING:
            # The server's own startup and auth errors reach the client unchanged.
            ctx.goto(Phase.CLOSED)
            user = show(ctx.params.get("user", ""))
            return [
                cmd.SendToClient(raw),
                cmd.CloseServer(),
                cmd.CloseClient(),
                cmd.Log(cmd.LogLevel.INFO, f"upstream refused login for {user}: {error.code} {error.message}"),
            ]
        ctx.drops.reconnect_error(f"{error.code} {error.message}", error.code)
        self.exchange = None
        if error.code in _GIVE_UP_STATES:
            ctx.goto(Phase.CLOSED)
            return [
                cmd.CloseServer(),
                *self.reconnect.finish_drop(impact=f"fatal {error.code}", succeeded=False),
                cmd.SendToClient.mine(raw),
                cmd.CloseClient(),
            ]
        return [cmd.CloseServer(), *self.reconnect.schedule_retry(ctx.now)]
