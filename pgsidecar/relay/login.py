"""The startup and authentication exchange with the upstream server, sans-IO.

PostgreSQL docs 55.2.1 "Start-up" and 55.3 "SASL Authentication": the client sends a
StartupMessage; the server asks for a password (cleartext, MD5 or SASL), says AuthenticationOk,
then ParameterStatus*, BackendKeyData and ReadyForQuery. The same exchange serves the first
connect, every reconnect and ``pgsidecar check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgsidecar.auth.md5 import md5_password
from pgsidecar.auth.scram import ScramClient, channel_binding_for
from pgsidecar.wire import backend as be
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.errors import ServerProtocolError
from pgsidecar.wire.frames import MessageBuffer
from pgsidecar.wire.payload import typed_message


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
        self._awaiting: be.AuthenticationCleartextPassword | be.AuthenticationMD5Password | be.AuthenticationSASL | None = None
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
        elif t == b"v"[0]:
            pass  # NegotiateProtocolVersion: we ask for 3.0 and no options, so nothing to adapt
        elif t == b"R"[0]:
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
        self._scram = ScramClient(
            user, password, mechanisms=request.mechanisms, channel_binding=self.channel_binding
        )
        self.auth_method = self._scram.mechanism
        return fe.SASLInitialResponse(self._scram.mechanism, self._scram.initial_response()).encode()
