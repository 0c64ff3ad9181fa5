"""plan_replay: the messages that rebuild a session on a new connection, or a refusal.

Order (docs/architecture.md, "The drop path" 4): the startup parameters travel in the
StartupMessage itself; then session authorization and role (setting session_authorization resets
role, so it goes first), other settings, SQL-level prepared statements, LISTEN channels, then
protocol-level prepared statements from the client's own Parse bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgsidecar.session.state import SessionState, sql_literal
from pgsidecar.wire import frontend as fe
from pgsidecar.wire.payload import typed_message


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    data: bytes  # bytes to send upstream
    purposes: tuple[str, ...]  # one per sync point they earn, in order
    summary: str  # what is replayed, for logs and records


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def prepare_statement_text(text: str) -> str | None:
    """The PREPARE statement alone: pg_prepared_statements.statement is the client's whole query
    string (checked on PostgreSQL 15), which may hold other statements that must not run again."""
    body = text.strip().rstrip(";").strip()
    if ";" not in body:
        return body
    if any(quote in body for quote in "'\"$-/"):
        return None  # quotes or comments could hide a ';': do not guess
    parts = [part.strip() for part in body.split(";") if re.match(r"(?is)\s*prepare\b", part)]
    return parts[0] if len(parts) == 1 else None


def plan_replay(state: SessionState, parses: dict[str, bytes]) -> ReplayPlan | str:
    """Messages that rebuild ``state``; a string (the reason) when it cannot be rebuilt."""
    lost = state.non_replayable()
    if lost:
        return "the session held " + ", ".join(lost) + ", which cannot be restored on a new connection"
    calls = []
    if state.session_authorization:
        calls.append(("session_authorization", state.session_authorization))
    if state.role:
        calls.append(("role", state.role))
    calls += list(state.settings)
    statements = []
    if calls:
        statements.append(
            "SELECT " + ", ".join(f"pg_catalog.set_config({sql_literal(n)}, {sql_literal(v)}, false)" for n, v in calls)
        )
    for text in state.sql_statements:
        prepare = prepare_statement_text(text)
        if prepare is None:
            return "a SQL PREPARE was sent together with other statements, so it cannot be repeated alone"
        statements.append(prepare)
    statements += [f"LISTEN {_ident(channel)}" for channel in state.listen]
    data = bytearray()
    purposes: list[str] = []
    if statements:
        data += fe.Query("; ".join(statements)).encode()
        purposes.append("replay")
    # Parse bodies (one copy each, kept by the relay), framed again only now.
    kept = [typed_message(b"P", parses[name]) for name in state.protocol_statements if name in parses]
    missing = [name for name in state.protocol_statements if name not in parses]
    if missing:
        return f"prepared statement(s) {', '.join(missing)} were created in a way pgsidecar cannot repeat"
    if kept:
        for message in kept:
            data += message
        data += fe.Sync().encode()
        purposes.append("parse")
    summary = (
        f"{len(calls)} setting(s), {len(state.sql_statements) + len(kept)} prepared statement(s), "
        f"{len(state.listen)} LISTEN channel(s)"
    )
    return ReplayPlan(bytes(data), tuple(purposes), summary)
