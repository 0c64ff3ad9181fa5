"""runtime/heap.py: one malloc_trim per delay after watched TLS objects are freed, none without."""

from __future__ import annotations

import asyncio
import gc
import ssl

from pgsidecar.runtime.heap import HeapTrimmer, TrimmingSSLObject, load_malloc_trim, track_tls


def test_a_wave_of_frees_costs_one_trim_after_the_delay() -> None:
    calls: list[int] = []
    heap = HeapTrimmer(delay_s=0.05, trim=lambda: calls.append(1))

    async def wave() -> None:
        for _ in range(1000):
            heap.freed()
        assert calls == []  # not at once: the wave is still ending
        await asyncio.sleep(0.2)

    asyncio.run(wave())
    assert calls == [1] and heap.trims == 1 and heap.pending == 0


def test_no_frees_no_trim_and_outside_a_loop_nothing_is_scheduled() -> None:
    calls: list[int] = []
    heap = HeapTrimmer(delay_s=0.01, trim=lambda: calls.append(1))
    heap.freed()  # no running loop (interpreter shutdown): counted, never scheduled
    heap.trim_now()  # the explicit trim still gives it back
    assert calls == [1]
    heap.trim_now()
    assert calls == [1]  # nothing freed since: nothing to do


def test_contexts_made_by_pgsidecar_report_their_objects() -> None:
    ctx = track_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    assert ctx.sslobject_class is TrimmingSSLObject
    freed: list[int] = []
    TrimmingSSLObject._heap = HeapTrimmer(trim=lambda: None)  # type: ignore[assignment]
    try:
        TrimmingSSLObject._heap.freed = lambda: freed.append(1)  # type: ignore[method-assign]
        obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
        del obj
        gc.collect()
        assert freed == [1]
    finally:
        from pgsidecar.runtime import heap

        TrimmingSSLObject._heap = heap.HEAP


def test_malloc_trim_is_found_on_glibc() -> None:
    trim = load_malloc_trim()
    assert trim is not None  # Debian's glibc: the deployment this is for
    trim()
