"""A finished session is freed by reference counting once released, not by the cycle collector.

A session that lived a while sits in Python's oldest generation, collected rarely: while its
handlers pointed at each other, its memory stayed with the process after the client left (bench.waves
showed RSS 65 -> 74 MiB over 10 waves of 1000 clients). The runtime calls release() at teardown.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from pgsidecar.relay import commands as cmd
from pgsidecar.relay import events as ev
from tests.playbook import Playbook, first_query, login, reconnect


@contextmanager
def no_cycle_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def lived_a_session() -> Playbook:
    """Login, a query, a drop and a transparent reconnect, then the client leaves."""
    pb = Playbook()
    login(pb)
    first_query(pb)
    assert pb.server_closed() == [cmd.CloseServer(), cmd.OpenServer(reconnect=True)]
    reconnect(pb)
    first_query(pb)
    pb.handle(ev.ClientClosed(pb.now, None))
    return pb


def parts_of(pb: Playbook) -> list[weakref.ref[object]]:
    conn = pb.conn
    return [weakref.ref(x) for x in (conn, conn.relay, conn.reconnect, conn.login, conn.startup, conn.parking)]


def test_a_released_session_is_freed_by_reference_counting() -> None:
    gc.collect()
    with no_cycle_collector():
        pb = lived_a_session()
        refs = parts_of(pb)
        pb.conn.release()
        pb.conn.release()  # idempotent: the runtime's teardown may run twice
        del pb
        assert [r() for r in refs] == [None] * len(refs)
        # Nothing of it (the context, the books, the scanners) was left for the collector.
        assert gc.collect() == 0


def test_without_release_only_the_cycle_collector_frees_it() -> None:
    """The control: this is what release() is for (and proves the test above can fail)."""
    with no_cycle_collector():
        pb = lived_a_session()
        refs = parts_of(pb)
        del pb
        # The facade goes (nothing points back at it); the handlers it wired stay, in cycles.
        assert refs[0]() is None and all(r() is not None for r in refs[1:])
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
