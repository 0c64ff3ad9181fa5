"""Upstream TLS churn, alone: `python -m bench.tlschurn` prints the RSS after each wave.

Issue 13 item 4. A wave opens `--conns` TLS connections to PostgreSQL the way pgsidecar's runtime
does (runtime/upstream.py: non-blocking socket, `sock_connect`, SSLRequest and its one-byte answer,
then the loop's TLS over the same socket), holds them all open, exchanges a little traffic on each
(StartupMessage, the server's authentication request), and closes them all. After each wave the
script collects garbage and prints the RSS together with glibc's own view of its heap
(`mallinfo2`: bytes in use by malloc's callers vs bytes free but kept by malloc), so a growing RSS
can be told apart as live memory (a leak) or as memory freed but retained by the allocator.

One variable at a time:

  --transport  uvloop (default: `create_connection(ssl=ctx, sock=...)`, as pgsidecar),
               uvloop-start-tls (`start_tls` on a plain transport), asyncio (the same calls on
               the stdlib loop), sslsocket (a non-blocking `ssl.SSLSocket` driven by add_reader /
               add_writer), sslobject (`SSLObject` + `MemoryBIO` over sock_recv / sock_sendall),
               plain (no TLS, a control)
  --loop       the loop under sslsocket / sslobject / plain (uvloop or asyncio)
  --context    shared (one SSLContext, as pgsidecar) or per-connect (a new one each time)
  --no-ticket  ssl.OP_NO_TICKET on the context
  --trim       malloc_trim(0) after each wave (prints RSS before and after)
  --arena-max  mallopt(M_ARENA_MAX) at start (like MALLOC_ARENA_MAX, which also works)
  --trim-threshold  mallopt(M_TRIM_THRESHOLD) at start (like MALLOC_TRIM_THRESHOLD_)
  --tracemalloc  Python-level allocations per wave, and the top growth between first and last
  --gc-types   live objects by type: growth between waves
  --pgsidecar-context  build the context with pgsidecar.runtime.tls.upstream_context (which
               includes the fix below)
  --heap-trimmer  the fix: pgsidecar.runtime.heap.track_tls on the context, so malloc_trim(0)
               runs TRIM_DELAY_S after connections are freed (use --settle 3 to see it)

Without --port, a throwaway TLS PostgreSQL is started (pgsidecar.demo_cluster) and removed after;
with --port it connects to an existing one (any TLS PostgreSQL; it never authenticates).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import gc
import os
import socket
import ssl
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

MB = 1024 * 1024
SSL_REQUEST = struct.pack("!II", 8, 80877103)
PROTOCOL_3_0 = 196608

# ---------------------------------------------------------------------------- glibc


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


LIBC = _libc()
HAVE_MALLINFO2 = LIBC is not None and hasattr(LIBC, "mallinfo2")
if HAVE_MALLINFO2:
    LIBC.mallinfo2.restype = _Mallinfo2
M_TRIM_THRESHOLD, M_ARENA_MAX = -1, -8


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def heap() -> tuple[float, float, float] | None:
    """(in use, free but retained, mmapped) MB, as glibc's malloc counts them (main arena +
    others: mallinfo2 sums every arena)."""
    if not HAVE_MALLINFO2:
        return None
    mi = LIBC.mallinfo2()
    return mi.uordblks / MB, mi.fordblks / MB, mi.hblkhd / MB


def malloc_trim() -> None:
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


# ---------------------------------------------------------------------------- contexts


def make_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.pgsidecar_context:
        from pgsidecar.config.model import UpstreamTarget
        from pgsidecar.runtime.tls import upstream_context

        ctx = upstream_context(UpstreamTarget(host=args.host, port=args.port, sslmode="require"))
        assert ctx is not None
    else:
        # What pgsidecar.runtime.tls.upstream_context builds for sslmode=require, no root cert.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["postgresql"])
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if args.no_ticket:
        ctx.options |= ssl.OP_NO_TICKET
    if args.heap_trimmer:
        from pgsidecar.runtime.heap import track_tls

        track_tls(ctx)
    return ctx


def startup_message() -> bytes:
    params = b"user\0postgres\0database\0postgres\0application_name\0tlschurn\0\0"
    body = struct.pack("!I", PROTOCOL_3_0) + params
    return struct.pack("!I", len(body) + 4) + body


STARTUP = startup_message()


def _complete(data: bytes | bytearray) -> bool:
    """One whole backend message (the authentication request, or an error)."""
    return len(data) >= 5 and len(data) >= 1 + struct.unpack("!I", data[1:5])[0]


# ---------------------------------------------------------------------------- one connection


async def _connected_socket(args: argparse.Namespace, tls: bool) -> socket.socket:
    """As runtime/upstream.py: non-blocking socket, sock_connect, SSLRequest, one-byte answer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, (args.host, args.port))
        if tls:
            await loop.sock_sendall(sock, SSL_REQUEST)
            answer = await loop.sock_recv(sock, 1)
            if answer != b"S":
                raise RuntimeError(f"server answered {answer!r} to SSLRequest")
    except BaseException:
        sock.close()
        raise
    return sock


class _Proto(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.reply: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if _complete(self.data) and not self.reply.done():
            self.reply.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectionError(f"closed: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(None)


class Conn:
    """One upstream connection: `open()`, `talk()`, `close()` per transport."""

    def __init__(self, args: argparse.Namespace, ctx_for: Callable[[], ssl.SSLContext]) -> None:
        self.args, self.ctx_for = args, ctx_for
        self.proto: _Proto | None = None
        self.sock: Any = None
        self.obj: ssl.SSLObject | None = None
        self.incoming = self.outgoing = None  # type: ssl.MemoryBIO | None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.args.transport
        sock = await _connected_socket(self.args, t != "plain")
        if t in ("uvloop", "asyncio"):
            _, proto = await loop.create_connection(
                _Proto, sock=sock, ssl=self.ctx_for(), server_hostname="", ssl_handshake_timeout=30.0
            )
            self.proto = proto
        elif t == "uvloop-start-tls":
            transport, proto = await loop.create_connection(_Proto, sock=sock)
            new = await loop.start_tls(transport, proto, self.ctx_for(), server_hostname="")
            assert new is not None
            proto.transport = new  # type: ignore[assignment]
            self.proto = proto
        elif t == "plain":
            _, proto = await loop.create_connection(_Proto, sock=sock)
            self.proto = proto
        elif t == "sslsocket":
            self.sock = self.ctx_for().wrap_socket(sock, do_handshake_on_connect=False, server_hostname=None)
            await self._retry(self.sock.do_handshake)
        elif t == "sslobject":
            self.sock = sock
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.obj = self.ctx_for().wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=None)
            await self._bio_retry(self.obj.do_handshake)
        else:
            raise ValueError(t)

    async def talk(self) -> None:
        """StartupMessage; wait for the server's first whole message (its auth request)."""
        if self.proto is not None:
            assert self.proto.transport is not None
            self.proto.transport.write(STARTUP)
            await self.proto.reply
        elif self.obj is not None:
            await self._bio_retry(lambda: self.obj.write(STARTUP))  # type: ignore[union-attr]
            data = b""
            while not _complete(data):
                data += await self._bio_retry(lambda: self.obj.read(16384))  # type: ignore[union-attr]
        else:
            # SSLSocket: one write of these few bytes; a retry passes the same bytes.
            await self._retry(lambda: self.sock.send(STARTUP))
            data = b""
            while not _complete(data):
                chunk = await self._retry(lambda: self.sock.recv(16384))
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk

    async def close(self) -> None:
        if self.proto is not None:
            assert self.proto.transport is not None
            self.proto.transport.close()  # TLS: close_notify, then the transport goes
            await self.proto.lost
        elif self.obj is not None:
            try:
                self.obj.unwrap()
            except ssl.SSLError:
                pass
            assert self.outgoing is not None
            pending = self.outgoing.read()
            if pending:
                try:
                    self.sock.send(pending)
                except OSError:
                    pass
            self.sock.close()
        else:
            self.sock.close()

    async def _retry(self, op: Callable[[], Any]) -> Any:
        """A non-blocking SSLSocket call, retried when the socket is ready as OpenSSL asks."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return op()
            except ssl.SSLWantReadError:
                waiter, add, remove = loop.create_future(), loop.add_reader, loop.remove_reader
            except ssl.SSLWantWriteError:
                waiter, add, remove = loop.create_future(), loop.add_writer, loop.remove_writer
            fd = self.sock.fileno()
            add(fd, lambda w=waiter: w.done() or w.set_result(None))
            try:
                await waiter
            finally:
                remove(fd)

    async def _bio_retry(self, op: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        assert self.incoming is not None and self.outgoing is not None
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                result = None
                want_read = True
            else:
                want_read = False
            pending = self.outgoing.read()
            if pending:
                await loop.sock_sendall(self.sock, pending)
            if not want_read:
                return result
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise ConnectionError("closed during TLS")
            self.incoming.write(chunk)


# ---------------------------------------------------------------------------- waves


async def one_wave(args: argparse.Namespace, ctx_for: Callable[[], ssl.SSLContext]) -> int:
    gate = asyncio.Semaphore(args.parallel)
    conns: list[Conn] = []

    async def opener() -> None:
        async with gate:
            conn = Conn(args, ctx_for)
            await conn.open()
            await conn.talk()
            conns.append(conn)

    results = await asyncio.gather(*(opener() for _ in range(args.conns)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    # All of them open at once, as 1000 clients of a sidecar would hold them; then all close.
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    if failed:
        print(f"  {len(failed)} connects failed, first: {failed[0]!r}", file=sys.stderr)
    return len(conns)


def _types() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


async def run(args: argparse.Namespace) -> None:
    shared = make_context(args)
    ctx_for = (lambda: shared) if args.context == "shared" else (lambda: make_context(args))
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    first_snap = None
    types_before = _types() if args.gc_types else None
    header = f"{'wave':>4} {'ok':>5} {'RSS MB':>8} {'malloc used':>12} {'malloc free':>12} {'mmap':>6}"
    header += f" {'py MB':>6}" if args.tracemalloc else ""
    header += f" {'RSS trimmed':>12}" if args.trim else ""
    header += "  sessions (shared ctx)"
    print(header, flush=True)
    rss: list[float] = []
    for wave in range(1, args.waves + 1):
        began = time.monotonic()
        ok = await one_wave(args, ctx_for)
        await asyncio.sleep(args.settle)
        gc.collect()
        rss.append(rss_mb())
        h = heap()
        line = f"{wave:>4} {ok:>5} {rss[-1]:8.1f}"
        line += f" {h[0]:12.1f} {h[1]:12.1f} {h[2]:6.1f}" if h else f" {'-':>12} {'-':>12} {'-':>6}"
        if args.tracemalloc:
            line += f" {tracemalloc.get_traced_memory()[0] / MB:6.1f}"
            snap = tracemalloc.take_snapshot()
            first_snap = first_snap or snap
            last_snap = snap
        if args.trim:
            t0 = time.perf_counter()
            malloc_trim()
            line += f" {rss_mb():12.1f} ({(time.perf_counter() - t0) * 1000:.1f} ms)"
        if args.heap_trimmer or args.pgsidecar_context:
            from pgsidecar.runtime.heap import HEAP

            line += f"  trims={HEAP.trims} last={HEAP.last_trim_s * 1000:.1f} ms"
        stats = shared.session_stats()
        line += f"  number={stats['number']} hits={stats['hits']} misses={stats['misses']}"
        line += f"  ({time.monotonic() - began:.1f} s)"
        print(line, flush=True)
        if args.gc_types and types_before is not None:
            now = _types()
            grown = sorted(((n - types_before[k], k) for k, n in now.items() if n > types_before[k]), reverse=True)
            if grown:
                print("       objects grown: " + ", ".join(f"{k} +{d}" for d, k in grown[:6]), flush=True)
            types_before = now
    if args.tracemalloc and first_snap is not None and args.waves > 1:
        print("tracemalloc: top growth, wave 1 -> last:")
        for stat in last_snap.compare_to(first_snap, "lineno")[:8]:
            print(f"  {stat}")
    if len(rss) > 1:
        growth = (rss[-1] - rss[0]) / rss[0] * 100
        print(f"RSS wave 1 {rss[0]:.1f} MB -> wave {len(rss)} {rss[-1]:.1f} MB: {growth:+.1f} %")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tlschurn", description=__doc__.splitlines()[0])
    p.add_argument(
        "--transport",
        default="uvloop",
        choices=("uvloop", "uvloop-start-tls", "asyncio", "sslsocket", "sslobject", "plain"),
    )
    p.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"), help="for sslsocket/sslobject/plain")
    p.add_argument("--context", default="shared", choices=("shared", "per-connect"))
    p.add_argument("--no-ticket", action="store_true")
    p.add_argument("--trim", action="store_true", help="malloc_trim(0) after each wave")
    p.add_argument("--arena-max", type=int, default=0, help="mallopt(M_ARENA_MAX, N) at start")
    p.add_argument("--trim-threshold", type=int, default=-1, help="mallopt(M_TRIM_THRESHOLD, N) at start")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    p.add_argument("--gc-types", action="store_true")
    p.add_argument("--pgsidecar-context", action="store_true")
    p.add_argument("--heap-trimmer", action="store_true", help="the fix: pgsidecar.runtime.heap.track_tls")
    p.add_argument("--waves", type=int, default=10)
    p.add_argument("--conns", type=int, default=1000, help="connections per wave, all open at once")
    p.add_argument("--parallel", type=int, default=100, help="handshakes in flight at once")
    p.add_argument("--settle", type=float, default=0.5, help="seconds after a wave before measuring")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="a TLS PostgreSQL; 0: start a throwaway one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if LIBC is not None and args.arena_max:
        LIBC.mallopt(M_ARENA_MAX, args.arena_max)
    if LIBC is not None and args.trim_threshold >= 0:
        LIBC.mallopt(M_TRIM_THRESHOLD, args.trim_threshold)
    cluster = None
    if not args.port:
        from pgsidecar.demo_cluster import DemoCluster

        root = tempfile.mkdtemp(prefix="tlschurn-")
        cluster = DemoCluster(root)
        cluster.create()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as fh:
            fh.write(f"max_connections = {args.conns + 50}\nlog_connections = off\n")
        cluster.restart("fast")
        args.port = cluster.port
    use_uvloop = args.transport in ("uvloop", "uvloop-start-tls") or (
        args.transport in ("sslsocket", "sslobject", "plain") and args.loop == "uvloop"
    )
    if use_uvloop:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        version = f"uvloop {uvloop.__version__}"
    else:
        loop_factory = asyncio.new_event_loop
        version = "asyncio"
    print(
        f"transport={args.transport} loop={version} context={args.context} no_ticket={args.no_ticket} "
        f"python {sys.version.split()[0]} {ssl.OPENSSL_VERSION} "
        f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '-')} arena_max={args.arena_max or '-'} "
        f"conns={args.conns} waves={args.waves}",
        flush=True,
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args))
    finally:
        if cluster is not None:
            cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
