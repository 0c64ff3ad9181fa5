"""A fuzzer in the suite (issue 10, item 10): mutated real conversations through a real sidecar.

Real clients (psycopg2 simple queries in a transaction, psycopg 3 extended protocol with prepared
statements and a pipeline, COPY FROM STDIN and TO STDOUT, a clean Terminate) are recorded through a
loopback relay in front of the sidecar (tests/fixtures/fuzz.py). Each fuzz stream replays one
recorded conversation, stamped with its seed and mutated from ``random.Random(seed)``, in random
chunks with random pauses, while a thread terminates fuzz backends at random moments (and sometimes
gives the fuzz role a short idle_session_timeout) and a healthy psycopg2 session runs beside them.
Every 60th stream is crafted instead: a message cut in two by a drop, then its rest. Asserted:

- no canary ever runs (statements inside another message's content: Bind parameters, COPY rows,
  the body of a message over PostgreSQL's per-type limit); checked on the server directly;
- the sidecar's log holds no traceback and no ERROR record, and the sidecar is alive;
- every stream is logged in or closed within the startup timeout (plus a margin for load);
- unmutated streams log in, are closed after their Terminate, and never get 08P01;
- the healthy session sees no error;
- client connections (metrics) and fuzz backends return to their baseline: no leaked session;
- no session is reconnected in a storm (upstream logins and drop records per stream).

``test_a_drop_inside_a_message_never_runs_its_rest`` runs the crafted cases one by one, with the
drops made by the test itself: the minimal reproductions.

Environment: PGSIDECAR_FUZZ_STREAMS (default 3000), PGSIDECAR_FUZZ_SEED (default fixed; "random"
draws one and prints it), PGSIDECAR_FUZZ_CONCURRENCY (24), PGSIDECAR_FUZZ_REPLAY (comma-separated
stream seeds: run only those, e.g. the seeds a failure names), PGSIDECAR_FUZZ_DROPS=0 (no random
drop thread: a replayed stream then sees only its own seeded drops, so it replays exactly). A
stream's seed is also its canary id: a row ``k202612000017`` was run by stream 202612000017.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.fuzz import (
    FROZEN_CASES,
    SMUGGLE_CASES,
    TERMINATE,
    Conversation,
    Direct,
    DropInjector,
    FuzzConfig,
    HealthySession,
    SmuggleResult,
    StreamResult,
    canary_statements,
    make_plan,
    mark_of,
    open_conn,
    password,
    query,
    record_conversations,
    run_smuggle,
    run_stream,
    startup_packet,
)
from tests.fixtures.sidecar import SidecarProcess, start_sidecar, upstream_dsn_for

pytestmark = [pytest.mark.server, pytest.mark.faults, pytest.mark.slow]

STARTUP_TIMEOUT_S = 1.5
DEFAULT_SEED = 2026120
STREAMS = int(os.environ.get("PGSIDECAR_FUZZ_STREAMS", "3000"))
CONCURRENCY = int(os.environ.get("PGSIDECAR_FUZZ_CONCURRENCY", "24"))
RANDOM_DROPS = os.environ.get("PGSIDECAR_FUZZ_DROPS", "1") != "0"  # 0: only the seeded, own-backend drops
CRAFTED_EVERY = 60  # a stream whose seed is 59 mod 60 is a crafted mid-message drop
MAX_RECONNECT_ATTEMPTS = 10  # per drop record; more is a reconnect storm
WALL_CAP_S = 600  # the whole fuzz run, whatever happens
ALLOWED_INTACT_CODES = {"08006", "08007", "25P02", "25P03", "57P01", "57P05"}  # what drops may show the app


def _seed() -> int:
    value = os.environ.get("PGSIDECAR_FUZZ_SEED", "")
    if value == "random":
        return random.SystemRandom().randrange(1, 10_000_000)
    return int(value) if value else DEFAULT_SEED


SEED = _seed()


def stream_seeds() -> list[int]:
    replay = os.environ.get("PGSIDECAR_FUZZ_REPLAY", "").strip()
    if replay:
        return [int(s) for s in replay.split(",") if s.strip()]
    return [SEED * 100_000 + i for i in range(STREAMS)]


def is_crafted(seed: int) -> bool:
    return seed % CRAFTED_EVERY == CRAFTED_EVERY - 1


@dataclass
class Rig:
    cluster: object
    sidecar: SidecarProcess
    direct: Direct
    fuzz_password: str
    convs: list[Conversation]
    cfg: FuzzConfig


def _provision(direct: Direct, pw: str) -> None:
    direct.sql("CREATE ROLE fuzz LOGIN PASSWORD %s", (pw,))
    direct.sql("GRANT USAGE, CREATE ON SCHEMA public TO fuzz")
    # The canary belongs to the superuser; the fuzz role may write it, so a canary that ran would stick.
    direct.sql("CREATE TABLE fuzz_canary (id text)")
    direct.sql("GRANT INSERT ON fuzz_canary TO fuzz")
    direct.sql("CREATE SEQUENCE fuzz_canary_seq")
    direct.sql("GRANT USAGE ON SEQUENCE fuzz_canary_seq TO fuzz")
    direct.sql("CREATE TABLE fuzz_data (id serial, note text, blob bytea)")
    direct.sql("CREATE TABLE fuzz_copy (id int, note text, data bytea)")
    direct.sql("ALTER TABLE fuzz_data OWNER TO fuzz")
    direct.sql("ALTER TABLE fuzz_copy OWNER TO fuzz")


async def _control_stream(cfg: FuzzConfig, pw: str, mark: bytes) -> list[tuple[str, str, str]]:
    """The canary statements sent as real Queries through the sidecar: they must run."""
    conn = await open_conn(cfg.port)
    view = conn.view
    try:
        await conn.send(
            startup_packet([(b"user", b"fuzz"), (b"database", b"app"), (b"application_name", b"fuzz-control")]), 10
        )
        await conn.wait(lambda: view.prompt_at is not None, 15)
        await conn.send(password(pw), 10)
        await conn.wait(lambda: view.logged_in_at is not None, 15)
        for statement in canary_statements(mark)[:2]:
            target = view.types[b"Z"] + 1
            await conn.send(query(statement), 10)
            await conn.wait(lambda: view.types[b"Z"] >= target, 15)
        await conn.send(TERMINATE, 10)
        await conn.wait(lambda: view.closed_at is not None, 10)
    finally:
        await conn.close()
    return view.errors


@pytest.fixture(scope="module")
def rig(pg_factory) -> Iterator[Rig]:
    """A private cluster (the fuzz role, the canary) and a sidecar with a short startup timeout."""
    cluster = pg_factory()
    direct = Direct(cluster.dsn(user="postgres", dbname="app"))
    pw = os.urandom(12).hex()
    _provision(direct, pw)
    sidecar = start_sidecar(
        upstream_dsn_for(cluster),
        metrics=True,
        env={"PGSIDECAR_LISTEN_STARTUP_TIMEOUT": f"{int(STARTUP_TIMEOUT_S * 1000)}ms"},
    )
    cfg = FuzzConfig(port=sidecar.port, startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        # The canary can fail: as the fuzz role, through this sidecar, its statements run.
        control = mark_of(1)
        errors = asyncio.run(_control_stream(cfg, pw, control))
        assert not errors, errors
        hits = direct.canary()
        assert hits["rows"] == [control.decode()] and hits["tables"] == ["fuzz_canary_" + control.decode()], hits
        assert direct.sql("SELECT has_sequence_privilege('fuzz', 'fuzz_canary_seq', 'USAGE')") == [(True,)]
        direct.sql("DELETE FROM fuzz_canary")
        direct.sql(f"DROP TABLE fuzz_canary_{control.decode()}")
        assert direct.canary() == {"rows": [], "tables": [], "nextval_called": False, "last_value": 1}
        convs = record_conversations(sidecar.port, "fuzz", pw, "app")
        yield Rig(cluster, sidecar, direct, pw, convs, cfg)
    finally:
        sidecar.stop()
        direct.close()


# ---------------------------------------------------------------- helpers


def log_problems(text: str) -> tuple[list[str], Counter]:
    """(internal errors, counts of info+ messages by shape). JsonFormatter puts log.exception's
    traceback under "exception" at level "error"; lines that are not JSON at all (a traceback
    printed by the event loop's default handler) are grouped into one problem per block."""
    problems: list[str] = []
    shapes: Counter = Counter()
    raw: list[str] = []

    def flush() -> None:
        if raw:
            problems.append("not JSON: " + raw[0][:200] + (f" ... {raw[-1][:300]}" if len(raw) > 1 else ""))
            raw.clear()

    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raw.append(line)
            continue
        flush()
        level = record.get("level", "")
        if level in ("error", "critical") or "exception" in record or "Traceback" in line:
            last = str(record.get("exception", "")).strip().splitlines()[-1:] or [""]
            problems.append(f"{level}: {str(record.get('message'))[:300]} {last[0][:300]}")
        if level not in ("debug", ""):
            shape = re.sub(r"\d+(\.\d+)*", "#", str(record.get("message", "")))[:140]
            shapes[(level, shape)] += 1
    flush()
    return problems, shapes


def problem_summary(problems: list[str]) -> str:
    """The distinct problems (digits and addresses folded), most frequent first."""
    kinds = Counter(re.sub(r"0x[0-9a-f]+|\d+", "#", p) for p in problems)
    return "\n    ".join(f"{n} x {kind[:700]}" for kind, n in kinds.most_common(8))


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    value = predicate()
    for _ in range(int(timeout / interval) + 2):
        if value or time.monotonic() > deadline:
            break
        time.sleep(interval)
        value = predicate()
    return value


def reproduction(res: SmuggleResult) -> str:
    lines = [
        f"stream seed {res.seed}: {res.case}",
        "  1. startup (user=fuzz database=app application_name=fuzz<seed>), cleartext password, ReadyForQuery",
    ]
    for step in res.setup:
        lines.append(f"  2. send {step[:80]!r}{'...' if len(step) > 80 else ''} and wait for its reply")
    lines.append(f"  3. send the first {len(res.first)} bytes of the carrier: {res.first[:24]!r}...{res.first[-12:]!r}")
    lines.append(
        "  4. the upstream drops ("
        + (
            "pg_terminate_backend of the session's backend"
            if "terminate" in res.case
            else "idle timeout of 300ms expires while the message is half sent"
            if "idle" in res.case
            else "the server ends the session on reading a length over its per-type limit"
        )
        + f"); the sidecar {'reconnected (new backend ' + str(res.new_pids) + ')' if res.reconnected else 'did not reconnect'}"
    )
    if res.middle:
        lines.append(
            f"  4b. send the next {len(res.middle)} bytes {res.middle[:20]!r}..., the upstream drops again"
            f" (pg_terminate_backend); new backend {res.second_pids}"
        )
    if "then-idle-timeout" in res.case:
        lines.append(
            f"  5. send the rest, {len(res.rest)} bytes starting {res.rest[:60]!r}, one message of the content"
            " at a time over 1.5 s: the backend the sidecar reconnected to (idle_session_timeout 300ms, replayed)"
            " times out meanwhile, a second drop while the rest of the cut message is still arriving"
        )
    elif "trickle" in res.case:
        lines.append(f"  5. send the rest, {len(res.rest)} bytes starting {res.rest[:60]!r}, in 1-8 byte writes")
    else:
        lines.append(f"  5. send the rest, {len(res.rest)} bytes, starting {res.rest[:60]!r}")
    lines.append(f"  client saw: errors {res.errors}, closed {res.closed_by_peer}")
    return "\n".join(lines)


INJECTED_CAUSES = {"admin_terminate", "idle_session_timeout", "idle_in_transaction_timeout"}
STORM_EXTRA_LOGINS = 5  # upstream logins beyond one per drop record (and the first)
STORM_OTHER_DROPS = 5  # drops of a cause the fuzzer did not inject (the session's own doing)


def upstream_logins(server_log: str) -> Counter:
    """Upstream logins per fuzz stream seed, from the server's log_connections lines."""
    return Counter(
        int(m.group(1))
        for m in re.finditer(r"connection authorized: user=fuzz database=\S+ application_name=fuzz(\d+)", server_log)
    )


def reconnect_storms(
    results: list[StreamResult], drops_of: dict[str, list[dict]], logins: Counter
) -> list[tuple[StreamResult, str]]:
    """Streams whose session the sidecar kept reconnecting: more upstream logins than its drops
    explain, many drops the fuzzer did not cause, or one drop with many attempts."""
    out = []
    for res in results:
        records = drops_of.get(res.peer, [])
        other = [d for d in records if d.get("cause") not in INJECTED_CAUSES]
        attempts = max([(d.get("reconnect") or {}).get("attempts", 0) for d in records], default=0)
        extra = logins.get(res.seed, 0) - len(records) - 1
        if extra > STORM_EXTRA_LOGINS:
            out.append((res, f"{logins[res.seed]} upstream logins for {len(records)} drop records"))
        elif len(other) >= STORM_OTHER_DROPS:
            out.append(
                (res, f"{len(other)} drops the fuzzer did not cause ({dict(Counter(d.get('cause') for d in other))})")
            )
        elif attempts > MAX_RECONNECT_ATTEMPTS:
            out.append((res, f"a reconnect of {attempts} attempts"))
    return out


def canary_since(before: dict, after: dict) -> dict:
    """The canary traces that appeared after ``before`` was taken."""
    return {
        "rows": [r for r in after["rows"] if r not in before["rows"]],
        "tables": [t for t in after["tables"] if t not in before["tables"]],
        "nextval_called": after["last_value"] != before["last_value"]
        or after["nextval_called"] != before["nextval_called"],
        "last_value": after["last_value"],
    }


def canary_report(hits: dict, by_mark: dict[str, StreamResult], drops_text=lambda res: "") -> list[str]:
    out = []
    for what, ident in [("INSERT ran: row", i) for i in hits["rows"]] + [
        ("CREATE TABLE ran:", t.removeprefix("fuzz_canary_")) for t in hits["tables"]
    ]:
        res = by_mark.get(ident)
        out.append(
            f"{what} {ident}"
            + (
                f" from {res.describe()}; client saw {[e[1] for e in res.errors]}; its drops: {drops_text(res)}"
                if res
                else ""
            )
        )
    if hits["nextval_called"]:
        out.append(
            f"nextval('fuzz_canary_seq') ran (last_value {hits['last_value']}): a canary ran, even if its"
            " transaction was rolled back"
        )
    return out


def intact_problem(res: StreamResult) -> str:
    """What is wrong with an unmutated stream's outcome ('' if nothing). Its bytes are what a real
    client sent, so every message boundary is where the client put it: the sidecar must log it in,
    close it after its Terminate, and never call its bytes a protocol violation. A drop may show
    as an error (ALLOWED_INTACT_CODES); after the first error the replay no longer matches what
    the client would have done (it would not use a statement whose Parse failed, say), so later
    errors are not judged, except 08P01."""
    if not res.logged_in:
        return "not logged in"
    if res.not_closed_after_terminate:
        return "not closed after its Terminate"
    if any(code == "08P01" for _, code, _ in res.errors):
        return "its valid bytes were called a protocol violation (08P01)"
    if res.errors and res.errors[0][1] not in ALLOWED_INTACT_CODES:
        return f"first error {res.errors[0][1]} is not one a drop explains"
    return ""


# ---------------------------------------------------------------- the deterministic smuggling cases


def _freezer(sidecar: SidecarProcess):
    def freeze(stop: bool) -> None:
        # Our own sidecar, by its PID: SIGSTOP holds its event loop while bytes pile up.
        os.kill(sidecar.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)

    return freeze


@pytest.mark.parametrize("case", SMUGGLE_CASES + FROZEN_CASES, ids=lambda c: c.name)
def test_a_drop_inside_a_message_never_runs_its_rest(rig, case):
    """The minimal reproduction: half a message, a drop, the rest. The rest is canary messages;
    a relay that sends it to the new server as if it were a message boundary runs them."""
    seed = 900_000_000_000 + (SMUGGLE_CASES + FROZEN_CASES).index(case)
    log_from = len(rig.sidecar.logs())
    res = asyncio.run(
        run_smuggle(
            seed,
            rig.cfg,
            "fuzz",
            rig.fuzz_password,
            "app",
            rig.direct.backends,
            rig.direct.terminate,
            case=case,
            freeze=_freezer(rig.sidecar),
        )
    )
    print("\n" + reproduction(res) + f"\n  server message types {res.types}")
    assert res.logged_in and not res.notes, (res.notes, res.errors)
    # The drop must have happened, or the case tested nothing.
    assert res.reconnected or res.closed_by_peer or res.errors, reproduction(res)
    mark = mark_of(seed).decode()
    hits = rig.direct.canary()
    ran = [r for r in hits["rows"] if r == mark] + [t for t in hits["tables"] if t.endswith(mark)]
    assert not ran, "a canary inside the cut message ran on the new server:\n" + reproduction(res)
    problems, _ = log_problems(rig.sidecar.logs()[log_from:])
    assert not problems, "sidecar log:\n    " + problem_summary(problems)
    assert rig.sidecar.alive()
    if case.carrier != "oversize":
        # Every byte the client sent is valid protocol: calling it a violation is wrong too.
        assert not [e for e in res.errors if e[1] == "08P01"], (
            "the sidecar called the rest of a valid message a protocol violation:\n" + reproduction(res)
        )


# ---------------------------------------------------------------- the fuzzer


async def _fuzz(rig: Rig, seeds: list[int]) -> tuple[list[StreamResult], list[str]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    results: list[StreamResult] = []
    own_errors: list[str] = []

    async def one(seed: int) -> None:
        async with sem:
            try:
                if is_crafted(seed):
                    res = await asyncio.wait_for(
                        run_smuggle(
                            seed, rig.cfg, "fuzz", rig.fuzz_password, "app", rig.direct.backends, rig.direct.terminate
                        ),
                        120,
                    )
                else:
                    plan = make_plan(seed, rig.convs)
                    res = await asyncio.wait_for(
                        run_stream(plan, rig.cfg, rig.direct.backends, rig.direct.terminate), rig.cfg.stream_cap_s + 30
                    )
                results.append(res)
            except Exception as exc:  # noqa: BLE001 - a defect of the fuzzer itself, reported with its seed
                own_errors.append(f"seed {seed}: fuzzer error {exc!r}")

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in seeds)), WALL_CAP_S)
    return results, own_errors


@pytest.mark.timeout(WALL_CAP_S + 300)
def test_fuzz_streams(rig):
    seeds = stream_seeds()
    sidecar, direct = rig.sidecar, rig.direct
    print(
        f"\nfuzz: seed {SEED}, {len(seeds)} streams, concurrency {CONCURRENCY}"
        f" (replay: PGSIDECAR_FUZZ_SEED={SEED} PGSIDECAR_FUZZ_STREAMS={STREAMS}, or PGSIDECAR_FUZZ_REPLAY=<seeds>)"
    )
    log_from = len(sidecar.logs())
    drops_before = len(sidecar.drops())
    server_log_from = os.path.getsize(rig.cluster.log_path)
    assert wait_for(lambda: metric(sidecar.metrics_port, "pgsidecar_client_connections") == 0, 30), (
        "client connections left over from earlier tests"
    )
    canary_before = direct.canary()  # the deterministic cases may have left some: not ours
    healthy = HealthySession(
        sidecar.dsn(user="app", password=rig.cluster.users["app"], application_name="healthy-fuzz-bystander")
    )
    healthy.start()
    assert not healthy.errors and healthy.queries > 0, healthy.errors
    baseline = metric(sidecar.metrics_port, "pgsidecar_client_connections")
    assert baseline == 1
    injector = DropInjector(rig.cluster.dsn(user="postgres", dbname="app"), "fuzz", SEED ^ 0xD809)
    if RANDOM_DROPS:
        injector.start()
    started = time.monotonic()
    try:
        results, own_errors = asyncio.run(_fuzz(rig, seeds))
    finally:
        if RANDOM_DROPS:
            injector.stop()
    wall = time.monotonic() - started

    # Everything the fuzz opened is closed: on the sidecar and on the server.
    conns_back = wait_for(lambda: metric(sidecar.metrics_port, "pgsidecar_client_connections") == baseline, 30)
    backends_left = wait_for(
        lambda: (
            not direct.sql("SELECT 1 FROM pg_stat_activity WHERE usename = 'fuzz' AND backend_type = 'client backend'")
        ),
        30,
    )
    healthy.stop()
    open_now = metric(sidecar.metrics_port, "pgsidecar_client_connections")
    leftover = direct.sql(
        "SELECT pid, application_name, state, left(query, 60) FROM pg_stat_activity"
        " WHERE usename = 'fuzz' AND backend_type = 'client backend'"
    )

    hits = canary_since(canary_before, direct.canary())
    problems, shapes = log_problems(sidecar.logs()[log_from:])
    with open(rig.cluster.log_path, "rb") as fh:
        fh.seek(server_log_from)
        server_log = fh.read().decode(errors="replace")
    drops = sidecar.drops()[drops_before:]
    by_mark = {mark_of(r.seed).decode(): r for r in results}

    failures: list[str] = []
    if own_errors:
        failures.append(f"{len(own_errors)} fuzzer errors (a defect of the test): " + "; ".join(own_errors[:5]))
    drops_of: dict[str, list[dict]] = {}
    for d in drops:
        drops_of.setdefault((d.get("client") or {}).get("addr") or "", []).append(d)

    def drops_text(res: StreamResult) -> str:
        return "; ".join(
            f"{d.get('state')} {d.get('cause')} -> {d.get('impact')}"
            for d in sorted(drops_of.get(res.peer, []), key=lambda d: str(d.get("time")))
        )

    canaries = canary_report(hits, by_mark, drops_text)
    if canaries:
        failures.append(f"{len(canaries)} canaries ran:\n    " + "\n    ".join(canaries[:30]))
    for res in results:
        if isinstance(res, SmuggleResult) and any(
            h.endswith(mark_of(res.seed).decode()) for h in hits["rows"] + hits["tables"]
        ):
            failures.append("crafted reproduction:\n" + reproduction(res))
            break
    if problems:
        failures.append(f"{len(problems)} internal errors in the sidecar log:\n    " + problem_summary(problems))
    if not sidecar.alive():
        failures.append(f"the sidecar died (exit {sidecar.proc.returncode})")
    missing = [r for r in results if r.verdict_missing or r.verdict_late]
    if missing:
        failures.append(
            f"{len(missing)} streams neither logged in nor were closed within"
            f" {STARTUP_TIMEOUT_S}s + {rig.cfg.margin_s}s:\n    "
            + "\n    ".join(f"{r.describe()} verdict {r.verdict_s}" for r in missing[:10])
        )
    intact = [r for r in results if r.intact]
    intact_bad = [r for r in intact if intact_problem(r)]
    if intact_bad:
        failures.append(
            f"{len(intact_bad)} unmutated streams went wrong:\n    "
            + "\n    ".join(
                f"{r.describe()} peer {r.peer}: {intact_problem(r)}; errors {r.errors[:3]}; its drops: {drops_text(r)}"
                for r in intact_bad[:10]
            )
        )
    if healthy.errors or not healthy.progressed:
        failures.append(f"the healthy session saw {healthy.errors!r} (progressed: {healthy.progressed})")
    if not conns_back:
        failures.append(f"pgsidecar_client_connections is {open_now}, not back to {baseline}: a leaked session")
    if not backends_left:
        failures.append(f"fuzz backends still open on the server: {leftover}")
    logins = upstream_logins(server_log)
    storms = reconnect_storms(results, drops_of, logins)
    if storms:
        failures.append(
            f"{len(storms)} streams made the sidecar reconnect in a storm:\n    "
            + "\n    ".join(f"{r.describe()}: {why}; its drops: {drops_text(r)[:600]}" for r, why in storms[:8])
        )

    most_extra_logins = max((logins.get(r.seed, 0) - len(drops_of.get(r.peer, [])) - 1 for r in results), default=0)
    most_other_drops = max(
        (sum(d.get("cause") not in INJECTED_CAUSES for d in drops_of.get(r.peer, [])) for r in results), default=0
    )
    crafted = [r for r in results if isinstance(r, SmuggleResult)]
    verdicts = sorted(r.verdict_s for r in results if r.verdict_s is not None)
    durations = sorted(r.ended_at - r.connected_at for r in results if r.ended_at) or [0.0]
    waited: Counter = Counter()
    for r in results:
        waited.update(r.waited)
    slowest = sorted((r for r in results if r.ended_at), key=lambda r: r.connected_at - r.ended_at)[:3]
    summary = [
        f"fuzz summary: seed {SEED}, {len(results)}/{len(seeds)} streams in {wall:.1f}s"
        f" ({len(results) / max(wall, 0.001):.1f}/s, concurrency {CONCURRENCY})",
        f"  random {len(results) - len(crafted)} (intact {len(intact)}), crafted mid-message drops {len(crafted)}"
        f" (reconnected {sum(r.reconnected for r in crafted)})",
        f"  logged in {sum(r.logged_in for r in results)}, closed by the sidecar {sum(r.closed_by_peer for r in results)},"
        f" got an ErrorResponse {sum(bool(r.errors) for r in results)}, closed by us before a verdict"
        f" {sum(r.self_closed_pre_verdict for r in results)}, hit the stream cap {sum(r.cut_by_cap for r in results)}",
        f"  startup verdict seconds: median {verdicts[len(verdicts) // 2] if verdicts else None},"
        f" max {verdicts[-1] if verdicts else None}",
        f"  error codes: {dict(Counter(code for r in results for _, code, _ in r.errors).most_common(12))}",
        f"  drops injected: {injector.terminated} backends terminated in {injector.rounds} rounds,"
        f" idle_session_timeout set {injector.idle_timeouts_set} times; injector errors {injector.errors[:2]}",
        f"  drop records {len(drops)}: {dict(Counter(d.get('cause') for d in drops).most_common(8))};"
        f" upstream logins of fuzz streams {sum(logins.values())}; per stream: most logins beyond its drops"
        f" {most_extra_logins}, most drops not injected {most_other_drops}",
        f"  stream seconds: median {durations[len(durations) // 2]:.2f}, p90 {durations[len(durations) * 9 // 10]:.2f},"
        f" max {durations[-1]:.2f}; waiting (s, all streams): "
        + ", ".join(f"{k} {v:.0f}" for k, v in waited.most_common()),
        "  slowest: " + "; ".join(f"{r.ended_at - r.connected_at:.1f}s {r.describe()} {r.waited}" for r in slowest),
        f"  healthy session: {healthy.queries} queries, slowest {healthy.slowest_s:.3f}s, errors {len(healthy.errors)}",
        f"  canary: {hits}",
        f"  sidecar log {sidecar.log_path}, drop log {sidecar.drop_log}",
        "  sidecar log (info and above): "
        + "; ".join(f"{n} x {lvl} {shape}" for (lvl, shape), n in shapes.most_common(12)),
    ]
    print("\n".join(summary))
    assert not failures, (
        "\n".join(summary)
        + (
            f"\n\nFAILURES (replay: PGSIDECAR_FUZZ_SEED={SEED}, or PGSIDECAR_FUZZ_REPLAY=<stream seeds>"
            " with PGSIDECAR_FUZZ_DROPS=0 for only the seeded drops):\n- "
        )
        + "\n- ".join(failures)
    )
