"""ConnectGate (runtime/gate.py): reconnects before first logins, both bounded, cancellation safe.

Plain asyncio, no sockets and no clocks: every wait is a future the test resolves itself, and
every run is bounded by asyncio.timeout so a gate bug fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from pgsidecar.runtime.gate import ConnectGate, default_reserve

BOUND_S = 5.0  # a generous cap on each scenario; nothing here sleeps


def run(coro):
    async def bounded():
        async with asyncio.timeout(BOUND_S):
            return await coro

    return asyncio.run(bounded())


async def settle(rounds: int = 5) -> None:
    """Let every runnable task take its next step (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Holder:
    """One connect: acquires a slot, records when it got it, holds it until `done` is resolved."""

    def __init__(self, gate: ConnectGate, name: str, reconnect: bool, granted: list[str]) -> None:
        self.name = name
        self.done = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run(gate, reconnect, granted))

    async def _run(self, gate: ConnectGate, reconnect: bool, granted: list[str]) -> None:
        async with gate.slot(reconnect):
            granted.append(self.name)
            await self.done

    def finish(self) -> None:
        self.done.set_result(None)


def test_default_reserve():
    assert [default_reserve(n) for n in (1, 2, 3, 4, 8, 16)] == [1, 1, 1, 1, 2, 4]
    assert ConnectGate(8).bound == 10 and ConnectGate(1).bound == 2
    with pytest.raises(ValueError):
        ConnectGate(0)


def test_waiting_reconnects_are_served_before_waiting_first_logins():
    """The FIFO semaphore this replaces would grant in arrival order (F1 R1 F2 R2 F3 here)."""

    async def scenario():
        gate, granted = ConnectGate(2, reserve=0), []
        busy = [Holder(gate, f"busy{i}", False, granted) for i in range(2)]
        await settle()
        arrivals = [("F1", False), ("R1", True), ("F2", False), ("R2", True), ("F3", False)]
        queued = []
        for name, reconnect in arrivals:
            queued.append(Holder(gate, name, reconnect, granted))
            await settle()
        assert granted == ["busy0", "busy1"]
        assert (gate.waiting(True), gate.waiting(False)) == (2, 3)
        order = []
        for holder in busy + queued:  # free one slot at a time; each grant is one new name
            before = len(granted)
            holder.finish()
            await settle()
            order += granted[before:]
        assert order == ["R1", "R2", "F1", "F2", "F3"]
        assert gate.active == 0 and gate.active_reconnects == 0

    run(scenario())


def test_reserve_lets_a_reconnect_in_while_first_logins_hold_every_slot():
    async def scenario():
        gate, granted = ConnectGate(1), []  # reserve 1: at most 2 at once
        first = Holder(gate, "F1", False, granted)
        second = Holder(gate, "F2", False, granted)
        await settle()
        assert granted == ["F1"] and gate.waiting(False) == 1
        reconnect = Holder(gate, "R1", True, granted)
        await settle()
        assert granted == ["F1", "R1"], "the reconnect took the reserved slot at once"
        assert gate.active == gate.bound == 2
        other = Holder(gate, "R2", True, granted)  # reconnects are bounded by `limit` (1)
        await settle()
        assert granted == ["F1", "R1"] and gate.waiting(True) == 1
        first.finish()
        await settle()
        # R2 waits for a reconnect slot, and F2 must not overtake it.
        assert granted == ["F1", "R1"] and gate.active == 1
        reconnect.finish()
        await settle()
        assert granted == ["F1", "R1", "R2"], "the freed slot goes to the waiting reconnect"
        other.finish()
        await settle()
        assert granted[-1] == "F2"
        second.finish()
        await settle()
        assert gate.active == 0

    run(scenario())


def test_first_logins_never_exceed_limit_and_all_never_exceed_bound():
    """A random mix of arrivals and finishes (seeded, bounded): the counts hold at every step."""

    async def scenario():
        rng = random.Random(10)
        gate, granted = ConnectGate(4), []  # reserve 1, bound 5
        holders: list[Holder] = []
        for step in range(400):
            if rng.random() < 0.55 and len(holders) < 300:
                holders.append(Holder(gate, f"h{step}", rng.random() < 0.3, granted))
            else:
                running = [h for h in holders if h.name in granted and not h.done.done()]
                if running:
                    rng.choice(running).finish()
            await settle()
            assert gate.active <= gate.bound
            assert gate.active_reconnects <= gate.limit
            assert gate.active - gate.active_reconnects <= gate.limit
            held = {h.name: h for h in holders if h.name in granted and not h.task.done()}
            assert len(held) == gate.active
            if gate.waiting(True):  # nobody jumps a waiting reconnect
                assert gate.active_reconnects == gate.limit or gate.active == gate.bound
        for holder in holders:
            if not holder.done.done():
                holder.finish()
            await settle()
        await asyncio.wait_for(asyncio.gather(*(h.task for h in holders)), BOUND_S)
        assert len(granted) == len(holders)
        assert gate.active == gate.active_reconnects == 0
        assert gate.waiting(True) == gate.waiting(False) == 0

    run(scenario())


def test_cancelled_waiter_leaves_its_queue_and_leaks_nothing():
    async def scenario():
        gate, granted = ConnectGate(1, reserve=0), []
        busy = Holder(gate, "busy", False, granted)
        await settle()
        gone_f = Holder(gate, "gone-F", False, granted)
        gone_r = Holder(gate, "gone-R", True, granted)
        stays = Holder(gate, "stays", False, granted)
        await settle()
        assert (gate.waiting(True), gate.waiting(False)) == (1, 2)
        gone_r.task.cancel()  # the session closed while its reconnect waited
        gone_f.task.cancel()
        await settle()
        assert (gate.waiting(True), gate.waiting(False)) == (0, 1), "no stale waiters"
        assert gone_r.task.cancelled() and gone_f.task.cancelled()
        busy.finish()
        await settle()
        assert granted == ["busy", "stays"]
        stays.finish()
        await settle()
        assert gate.active == gate.active_reconnects == 0

    run(scenario())


def test_slot_granted_then_cancelled_before_resuming_is_given_back():
    """The slot is counted for a waiter when it is handed over; if that waiter's task is cancelled
    in the same loop iteration, before it runs, the slot must go to the next waiter."""

    async def scenario():
        gate, granted = ConnectGate(1, reserve=0), []
        busy = Holder(gate, "busy", True, granted)
        await settle()
        unlucky = Holder(gate, "unlucky", True, granted)
        nxt = Holder(gate, "next", False, granted)
        await settle()
        busy.done.set_result(None)
        await asyncio.sleep(0)  # busy resumes and releases: the slot is handed to `unlucky`
        while not busy.task.done():  # noqa: ASYNC110 - bounded: busy needs one more step at most
            await asyncio.sleep(0)
        assert gate.active == 1 and gate.waiting(True) == 0, "handed over, not yet resumed"
        assert "unlucky" not in granted
        unlucky.task.cancel()
        await settle()
        assert unlucky.task.cancelled()
        assert granted == ["busy", "next"], "the handed-over slot came back and went on"
        assert gate.active == 1 and gate.active_reconnects == 0
        nxt.finish()
        await settle()
        assert gate.active == 0

    run(scenario())


def test_cancelled_holder_releases_its_slot():
    async def scenario():
        gate, granted = ConnectGate(1, reserve=0), []
        holder = Holder(gate, "holder", True, granted)
        waiter = Holder(gate, "waiter", False, granted)
        await settle()
        holder.task.cancel()  # e.g. the session closed during the TLS handshake
        await settle()
        assert granted == ["holder", "waiter"]
        assert gate.active == 1 and gate.active_reconnects == 0
        waiter.finish()
        await settle()
        assert gate.active == 0

    run(scenario())


def test_release_without_acquire_is_an_error():
    gate = ConnectGate(2)
    with pytest.raises(RuntimeError):
        gate.release()

    async def one_first_login():
        await gate.acquire(False)
        with pytest.raises(RuntimeError):
            gate.release(True)  # a reconnect count never goes negative
        gate.release(False)

    run(one_first_login())
    assert gate.active == 0
