"""What a client session holds on the server, and which of it can be rebuilt on a new connection.

The relay does not guess session state from SQL text. Text and command tags only mark the
session "dirty"; at the next idle point one internal query (``snapshot_sql``) reads the exact
state from the server's own catalogs. Checked against PostgreSQL 15: ``pg_settings`` with
``source = 'session'`` lists SET / set_config(..., false) values but not custom placeholder
settings (``app.x``), ``role`` or ``session_authorization``, so those are asked for by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# Command tags that can change replayable or non-replayable session state (55.7 CommandComplete).
DIRTY_TAGS = (
    b"SET",
    b"RESET",
    b"PREPARE",
    b"DEALLOCATE",
    b"LISTEN",
    b"UNLISTEN",
    b"DISCARD",
    b"CREATE TABLE",
    b"SELECT INTO",
    b"DECLARE CURSOR",
    b"CLOSE CURSOR",
    b"LOAD",
)

# Text that changes state without a telling tag (a SELECT that calls set_config or takes a lock).
# CREATE TEMP ... AS and SELECT ... INTO TEMP report "SELECT n"; a temporary view or sequence
# "CREATE VIEW" / "CREATE SEQUENCE": only the text says a temporary object now exists.
_DIRTY_TEXT = re.compile(rb"(?i)set_config|advisory|set\s+session|set\s+role|\btemp(?:orary)?\b|pg_temp")
_CUSTOM_SETTING = re.compile(
    rb"(?i)(?:\bset\s+(?:session\s+)?|\breset\s+|set_config\s*\(\s*')([a-z_][a-z0-9_$]*\.[a-z0-9_$.]+)"
)
_COMMIT = re.compile(rb"(?i)\b(?:commit|end|prepare\s+transaction)\b")
_ROLLBACK = re.compile(rb"(?i)^\s*(?:rollback|abort|commit|end)\b\s*(?:work|transaction)?\s*;?\s*$")

# Settings that pg_settings does not report by source, asked for explicitly.
_IDENTITY_SETTINGS = ("session_authorization", "role")


def tag_is_dirty(tag_payload: bytes) -> bool:
    """True when a CommandComplete tag may have changed session state. The tag's closing NUL
    needs no stripping: no DIRTY_TAGS entry holds a NUL, so a match never reaches it (the relay
    runs this same one call inline)."""
    return tag_payload.startswith(DIRTY_TAGS)


def text_is_dirty(sql: bytes) -> bool:
    return _DIRTY_TEXT.search(sql) is not None


def custom_setting_names(sql: bytes) -> set[str]:
    """Custom (dotted) setting names a statement may set, e.g. ``SET app.tenant = 'x'``."""
    return {m.group(1).decode("ascii", "replace").lower() for m in _CUSTOM_SETTING.finditer(sql)}


def may_commit(sql: bytes) -> bool:
    """A request whose text may commit: its outcome is unknown if the connection dies under it."""
    return _COMMIT.search(sql) is not None


def is_transaction_end(sql: bytes) -> bool:
    """ROLLBACK/ABORT (or COMMIT/END, which the server answers with ROLLBACK in a failed block)."""
    return _ROLLBACK.match(sql.rstrip(b"\x00")) is not None


def snapshot_sql(custom_names: set[str] | frozenset[str]) -> bytes:
    """One query, one row: the exact replayable and non-replayable state, and server facts."""
    custom = ", ".join(sql_literal(name) for name in sorted(custom_names)) or "NULL"
    return (
        "SELECT"
        " (SELECT COALESCE(pg_catalog.json_agg(pg_catalog.json_build_array(name,"
        " pg_catalog.current_setting(name))), '[]') FROM pg_catalog.pg_settings WHERE source = 'session'),"
        f" (SELECT COALESCE(pg_catalog.json_agg(pg_catalog.json_build_array(n,"
        f" pg_catalog.current_setting(n, true))), '[]') FROM pg_catalog.unnest(ARRAY[{custom}]::text[]) n"
        " WHERE pg_catalog.current_setting(n, true) IS NOT NULL),"
        " pg_catalog.current_setting('session_authorization'), pg_catalog.current_setting('role'),"
        " (SELECT COALESCE(pg_catalog.json_agg(name), '[]') FROM pg_catalog.pg_prepared_statements"
        " WHERE NOT from_sql),"
        " (SELECT COALESCE(pg_catalog.json_agg(statement), '[]') FROM"
        " pg_catalog.pg_prepared_statements WHERE from_sql),"
        " (SELECT COALESCE(pg_catalog.json_agg(c), '[]') FROM pg_catalog.pg_listening_channels() c),"
        " (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
        " (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
        " AND pid = pg_catalog.pg_backend_pid()),"
        " (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)"
    ).encode()


# The facts a later drop is judged against, read right after each login; checked on PostgreSQL
# 15 as an ordinary role (PUBLIC may execute every function here). The postmaster start time is
# kept by crash recovery and new after a restart or on another server; the system identifier is
# the same on every physical copy of one cluster; the timeline grows by one at each promotion.
#  - read-only is pg_settings.reset_val, not current_setting(): after a reconnect this runs after
#    the replay, and a replayed `SET default_transaction_read_only` is not the server's doing;
#    reset_val keeps the server, database, role and startup-packet values.
#  - a primary's timeline is its WAL insert position's (pg_walfile_name raises 55000 in
#    recovery, so it is not called there); pg_control_checkpoint() lags a promotion until the
#    checkpoint after it ends, so it serves only a standby (its last restartpoint's timeline).
#  - any error loses the whole row, so the identity facts are skipped (NULL) where they are known
#    to raise: Aurora (it has aurora_version()) refuses WAL control functions unless
#    wal_level = logical (reports in DataDog/integrations-core#20356, mackerel-agent-plugins#804).
#    A CASE guards only runtime errors: a REVOKE from PUBLIC still fails the row at executor start.
FACTS_SQL = (
    b"SELECT EXTRACT(epoch FROM pg_catalog.pg_postmaster_start_time())::float8,"
    b" pg_catalog.pg_is_in_recovery(),"
    b" (SELECT reset_val FROM pg_catalog.pg_settings WHERE name = 'default_transaction_read_only'),"
    b" pg_catalog.host(pg_catalog.inet_server_addr()), pg_catalog.inet_server_port(),"
    b" CASE WHEN NOT a.aurora THEN (SELECT system_identifier FROM pg_catalog.pg_control_system())::text END,"
    b" CASE WHEN a.aurora THEN NULL WHEN pg_catalog.pg_is_in_recovery()"
    b" THEN (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint())"
    b" ELSE pg_catalog.concat('x', pg_catalog.substr(pg_catalog.pg_walfile_name("
    b"pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int4 END"
    b" FROM (SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE proname = 'aurora_version') AS aurora) a"
)


def sql_literal(value: str) -> str:
    """A SQL string literal that does not depend on standard_conforming_strings."""
    tag = "$pgsc$"
    if tag in value:
        return "'" + value.replace("'", "''").replace("\\", "\\\\") + "'"
    return f"{tag}{value}{tag}"


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """The row of FACTS_SQL; None where the server did not say (an older reply, no privilege)."""

    postmaster_start: float | None = None
    in_recovery: bool | None = None
    read_only: bool | None = None  # new transactions are read-only: recovery, or the setting
    server_addr: str | None = None
    server_port: int | None = None
    system_identifier: str | None = None  # text: a 64-bit number stays exact in JSON
    timeline: int | None = None


def parse_facts(row: list[bytes | None]) -> ServerFacts:
    def text(i: int) -> str | None:
        value = row[i] if i < len(row) else None
        return None if value is None else value.decode()

    def number(i: int) -> int | None:
        value = text(i)
        return int(value) if value and value.lstrip("-").isdigit() else None

    start = text(0)
    recovery = None if text(1) is None else text(1) == "t"
    default_ro = None if text(2) is None else text(2) == "on"
    read_only = True if recovery or default_ro else (None if default_ro is None else False)
    return ServerFacts(
        postmaster_start=float(start) if start else None,
        in_recovery=recovery,
        read_only=read_only,
        server_addr=text(3),
        server_port=number(4),
        system_identifier=text(5),
        timeline=number(6),
    )


@dataclass(frozen=True, slots=True)
class SessionState:
    """One exact snapshot of what the session holds on the server."""

    settings: tuple[tuple[str, str], ...] = ()
    session_authorization: str | None = None
    role: str | None = None
    protocol_statements: tuple[str, ...] = ()  # names of Parse-level prepared statements
    sql_statements: tuple[str, ...] = ()  # "PREPARE name AS ..." texts
    listen: tuple[str, ...] = ()
    temp_tables: int = 0
    advisory_locks: int = 0
    hold_cursors: int = 0
    unknown: str | None = None  # why the state could not be read (then nothing is replayable)

    def non_replayable(self) -> list[str]:
        """What a new connection cannot get back; a drop with any of it must end the session."""
        lost = []
        if self.unknown:
            lost.append(f"session state that could not be read ({self.unknown})")
        if self.temp_tables:
            lost.append(f"{self.temp_tables} temporary table(s)")
        if self.advisory_locks:
            lost.append(f"{self.advisory_locks} session-level advisory lock(s)")
        if self.hold_cursors:
            lost.append(f"{self.hold_cursors} WITH HOLD cursor(s)")
        return lost


def parse_snapshot(row: list[bytes | None], login_user: str) -> SessionState:
    """Turn the row of ``snapshot_sql`` into a SessionState."""
    values = [v.decode() if v is not None else None for v in row]
    settings = [tuple(pair) for pair in json.loads(values[0] or "[]")]
    settings += [tuple(pair) for pair in json.loads(values[1] or "[]")]
    auth = values[2]
    role = values[3]
    return SessionState(
        settings=tuple(sorted((str(n), str(v)) for n, v in settings if n not in _IDENTITY_SETTINGS)),
        session_authorization=auth if auth and auth != login_user else None,
        role=role if role and role != "none" else None,
        protocol_statements=tuple(json.loads(values[4] or "[]")),
        sql_statements=tuple(json.loads(values[5] or "[]")),
        listen=tuple(json.loads(values[6] or "[]")),
        temp_tables=int(values[7] or 0),
        advisory_locks=int(values[8] or 0),
        hold_cursors=int(values[9] or 0),
    )


@dataclass(slots=True)
class SessionBook:
    """The relay's running book of one session: dirty flag, remembered Parse bytes, names."""

    state: SessionState = field(default_factory=SessionState)
    dirty: bool = False
    custom_names: set[str] = field(default_factory=set)
    parses: dict[str, bytes] = field(default_factory=dict)  # statement name -> its whole Parse body

    def note_request(self, sql: bytes) -> bool:
        """Book one statement text; True when it may commit (its outcome is then unknown if the
        connection dies under it). Exact substring prefilters run first: every pattern the
        regexes match contains one of these words, and most requests contain none of them.
        The words are looked for in a str: ``bytes in bytes`` first tries its operand as an int
        and builds a TypeError each time, and ``bytes.find`` parses its arguments as a tuple;
        latin-1 maps each byte to one character, so a match in the text is one in the bytes."""
        low = sql.lower().decode("latin-1")
        if "set" in low or "temp" in low or "advisory" in low:
            self.note_sql(sql, low)
        return ("commit" in low or "end" in low or "prepare" in low) and may_commit(sql)

    def note_sql(self, sql: bytes, low: str | None = None) -> None:
        """Book a statement text that may change session state. ``low``, its lowercase latin-1
        text, lets the regexes be skipped when the words they need are absent: every match of
        _DIRTY_TEXT holds set_config, advisory or temp (pg_temp, temporary), or set with session
        or role; every match of _CUSTOM_SETTING holds set and a dot. An UPDATE ... SET has none
        of the first, and the regex cost it 2-4 us."""
        if low is None:
            low = sql.lower().decode("latin-1")
        if (
            "set_config" in low
            or "advisory" in low
            or "temp" in low
            or ("set" in low and ("session" in low or "role" in low))
        ) and text_is_dirty(sql):
            self.dirty = True
        if "." in low and "set" in low:
            names = custom_setting_names(sql)
            if names:
                self.custom_names |= names
                self.dirty = True
