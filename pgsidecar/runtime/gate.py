"""ConnectGate: the bound on concurrent upstream connects, with reconnects served first.

Issue 10 item 5: with one FIFO semaphore, an established session's reconnect queued behind every
first login of a connect storm (1000 clients churning: 5-9 s, against the promised < 1 s). The
brain marks reconnects (`OpenServer.reconnect`); this gate carries that out:

- a reconnect waits only for other reconnects, never behind a waiting first login: on every
  release, waiting reconnects are served before waiting first logins, FIFO within each class;
- first logins may hold at most `limit` slots; reconnects may also take `reserve` more, so a
  reconnect finds a slot at once even while first logins hold all of theirs;
- reconnects never hold more than `limit` (a server restart makes every session reconnect at
  once: that stampede stays bounded exactly as `reconnect.max_concurrent` says).

So at most `limit + reserve` connects run at once, `reserve = max(1, limit // 4)` by default
(`reconnect.max_concurrent` 8 -> 10 in total; 1 -> 2).

A slot covers the TCP connect and the TLS handshake only (see ClientDriver._connect_once).
Cancellation is safe: a waiter whose task is cancelled leaves its queue, and a slot handed to a
waiter that is cancelled before it resumes is given back at once.
"""

from __future__ import annotations

import asyncio
from collections import deque


def default_reserve(limit: int) -> int:
    """Slots only reconnects may take, on top of `limit`: a quarter, at least one."""
    return max(1, limit // 4)


class ConnectGate:
    """`async with gate.slot(reconnect=...)`: one upstream connect in flight."""

    __slots__ = ("_waiting", "active", "active_reconnects", "limit", "reserve")

    def __init__(self, limit: int, reserve: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.reserve = default_reserve(limit) if reserve is None else reserve
        if self.reserve < 0:
            raise ValueError(f"reserve must not be negative, got {self.reserve}")
        self.active = 0  # slots held, both classes
        self.active_reconnects = 0
        # index True: reconnects, False: first logins; futures in arrival order
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    @property
    def bound(self) -> int:
        """The most connects that can ever run at once."""
        return self.limit + self.reserve

    def waiting(self, reconnect: bool) -> int:
        return len(self._waiting[reconnect])

    def _fits(self, reconnect: bool) -> bool:
        if reconnect:
            return self.active_reconnects < self.limit and self.active < self.limit + self.reserve
        # A first login never overtakes a waiting reconnect (redundant with the counts today,
        # kept so the ordering rule does not hang on that arithmetic).
        return self.active < self.limit and not self._waiting[True]

    def _take(self, reconnect: bool) -> None:
        self.active += 1
        if reconnect:
            self.active_reconnects += 1

    async def acquire(self, reconnect: bool = False) -> None:
        queue = self._waiting[reconnect]
        if not queue and self._fits(reconnect):  # no barging past waiters of the same class
            self._take(reconnect)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted (the slot was counted for us) but cancelled before resuming: give it back.
                self.release(reconnect)
            else:
                try:
                    queue.remove(future)
                except ValueError:
                    pass
                self._wake()  # a cancelled reconnect may have been what held first logins back
            raise

    def release(self, reconnect: bool = False) -> None:
        if self.active <= 0 or (reconnect and self.active_reconnects <= 0):
            raise RuntimeError("ConnectGate.release without a matching acquire")
        self.active -= 1
        if reconnect:
            self.active_reconnects -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiters: reconnects first, then first logins, FIFO in each."""
        for reconnect in (True, False):
            queue = self._waiting[reconnect]
            while queue:
                head = queue[0]
                if head.done():  # cancelled, its task has not run its cleanup yet
                    queue.popleft()
                    continue
                if not self._fits(reconnect):
                    break
                queue.popleft()
                self._take(reconnect)  # counted now, so nothing else takes it before it resumes
                head.set_result(None)

    def slot(self, reconnect: bool = False) -> _Slot:
        return _Slot(self, reconnect)


class _Slot:
    __slots__ = ("gate", "reconnect")

    def __init__(self, gate: ConnectGate, reconnect: bool) -> None:
        self.gate = gate
        self.reconnect = reconnect

    async def __aenter__(self) -> None:
        await self.gate.acquire(self.reconnect)

    async def __aexit__(self, *exc: object) -> None:
        self.gate.release(self.reconnect)
