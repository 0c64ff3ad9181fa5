"""Giving the memory that ended TLS connections freed back to the OS (glibc's malloc_trim).

uvloop's TLS transport (its SSLProtocol) mallocs a 256 KiB read buffer for every connection, and
every `SSLObject.read(256 KiB)` it makes allocates a 256 KiB bytes object before shrinking it.
Once the first such block is freed, glibc raises its mmap threshold above 256 KiB (the dynamic
threshold, mallopt(3) M_MMAP_THRESHOLD), so from then on these blocks come from the heap; when
the connections end, glibc keeps the freed pages (it returns only the top of the heap, and a
live chunk above them pins it), and each wave of new connections touches other pages of that
free space. With 1000 upstream TLS connections per wave the RSS grew 64 -> 182 MB over 10 waves
while the bytes in use by malloc's callers stayed at 3.7 MB (`python -m bench.tlschurn`). That
is allocator retention, not a leak, and `malloc_trim(0)` hands those pages back (it also
releases whole free pages inside the heap, glibc 2.8+): 33 MB after every wave.

So every TLS connection made with pgsidecar's contexts is watched (tls.py sets their
`sslobject_class` to `TrimmingSSLObject`), and `TRIM_DELAY_S` after connections have ended and
been freed, one `malloc_trim(0)` runs on the loop: at most one per delay while connections
churn, none while none end. Where malloc_trim does not exist (macOS, some libcs) nothing is
watched.

The trim can give back only what was freed: an ended session must be freed at once, by reference
counting, not at some later full garbage collection (a session that lived a while sits in the
oldest generation). The runtime releases the brain at teardown for that (SidecarConnection.release,
tests/unit/test_release.py); with it, a full collection right after 1000 sessions ended found
nothing to free, and `python -m bench.waves` (10 waves of 1000 upstream TLS clients, RSS 6 s after
each) went from 65.4 -> 74.3 MiB to 59.5 -> 60.8 MiB.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import ssl
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds from the first freed TLS connection to the trim: a wave of closes costs one trim.
TRIM_DELAY_S = 2.0


def load_malloc_trim() -> Callable[[], object] | None:
    """`malloc_trim(0)` from the C library the interpreter runs on, or None where it has none.

    CDLL(None) is the running program: no library search (ctypes.util.find_library would start
    `ldconfig`), and always the same libc as the interpreter's own malloc.
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim() -> object:
        return fn(0)

    return trim


class HeapTrimmer:
    """Counts TLS objects as they are freed and trims the heap `delay_s` after the first one
    since the last trim, on the event loop that is running when it is freed."""

    def __init__(self, delay_s: float = TRIM_DELAY_S, trim: Callable[[], object] | None = None) -> None:
        self.delay_s = delay_s
        self._trim = trim
        self._loaded = trim is not None
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pending = 0  # watched objects freed since the last trim
        self.trims = 0
        self.last_trim_s = 0.0  # how long the last malloc_trim took

    @property
    def available(self) -> bool:
        if not self._loaded:
            self._trim, self._loaded = load_malloc_trim(), True
        return self._trim is not None

    def freed(self) -> None:
        """A watched object was freed: trim `delay_s` from now, unless a trim is due already."""
        if not self.available:
            return
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # freed outside a running loop (at shutdown): nothing left to trim for
        if self._handle is not None and self._loop is loop:
            return  # a trim is already due on this loop
        self._loop = loop
        self._handle = loop.call_later(self.delay_s, self.trim_now)

    def trim_now(self) -> None:
        self._handle = None
        if not self.pending or self._trim is None:
            return
        freed, self.pending = self.pending, 0
        began = time.perf_counter()
        self._trim()
        self.last_trim_s = time.perf_counter() - began
        self.trims += 1
        log.debug("malloc_trim after %d TLS connections ended: %.1f ms", freed, self.last_trim_s * 1000)


#: The process's one trimmer: every TLS connection of pgsidecar's contexts reports to it.
HEAP = HeapTrimmer()


class TrimmingSSLObject(ssl.SSLObject):
    """The SSLObject of a connection made with pgsidecar's contexts: it is freed with the
    transport that read through it (uvloop's SSLProtocol holds it to the end), and then the heap
    is trimmed soon after (HEAP). Nothing else differs; the hot path does not pass here."""

    _heap = HEAP  # a class attribute: still there while modules are torn down at exit

    def __del__(self) -> None:
        self._heap.freed()


def track_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make `ctx`'s connections report to HEAP when they are freed; returns ctx."""
    ctx.sslobject_class = TrimmingSSLObject
    return ctx
