"""PendingReplies (pgsidecar.session.pending): the sync points still owed, oldest first.

ReadyForQuery is the only source of the transaction status (PostgreSQL docs 55.2.2, 55.2.3), and
replies to requests pgsidecar injected are tagged INTERNAL so the relay can swallow them.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgsidecar.session.pending import Owner, PendingReplies, TxStatus
from pgsidecar.wire.errors import ServerProtocolError


def test_starts_idle_and_empty() -> None:
    pending = PendingReplies()
    assert len(pending) == 0 and not pending
    assert pending.front is None
    assert pending.client_owed == 0
    assert pending.status is TxStatus.IDLE
    assert pending.idle


def test_queue_is_first_in_first_out_and_takes_the_status() -> None:
    pending = PendingReplies()
    pending.expect(Owner.CLIENT)
    pending.expect(Owner.INTERNAL, 2)
    pending.expect(Owner.CLIENT)
    assert len(pending) == 4 and pending.client_owed == 2
    assert pending.front is Owner.CLIENT
    assert pending.ready(ord("T")) is Owner.CLIENT
    assert pending.status is TxStatus.IN_TRANSACTION and not pending.idle
    assert pending.front is Owner.INTERNAL
    assert pending.ready(ord("T")) is Owner.INTERNAL
    assert pending.ready(ord("E")) is Owner.INTERNAL
    assert pending.status is TxStatus.FAILED
    assert pending.client_owed == 1
    assert pending.ready(ord("I")) is Owner.CLIENT
    assert pending.status is TxStatus.IDLE and pending.idle


def test_idle_needs_both_nothing_owed_and_no_transaction() -> None:
    pending = PendingReplies()
    pending.expect(Owner.CLIENT)
    assert not pending.idle  # a request in flight
    pending.ready(ord("T"))
    assert len(pending) == 0 and not pending.idle  # inside a transaction
    pending.expect(Owner.CLIENT)
    pending.ready(ord("I"))
    assert pending.idle


def test_expect_zero_adds_nothing() -> None:
    pending = PendingReplies()
    pending.expect(Owner.CLIENT, 0)
    assert len(pending) == 0


@pytest.mark.parametrize("status", [0, ord("X"), ord("i"), 255])
def test_invalid_status_byte_is_a_server_protocol_error(status: int) -> None:
    pending = PendingReplies()
    pending.expect(Owner.CLIENT)
    with pytest.raises(ServerProtocolError, match="invalid transaction status"):
        pending.ready(status)
    # Nothing was settled by the bad message.
    assert len(pending) == 1 and pending.status is TxStatus.IDLE


def test_ready_without_a_request_is_a_server_protocol_error() -> None:
    with pytest.raises(ServerProtocolError, match="without an outstanding request"):
        PendingReplies().ready(ord("I"))


def test_clear_forgets_the_queue_but_not_the_status() -> None:
    pending = PendingReplies()
    pending.expect(Owner.CLIENT, 3)
    pending.ready(ord("T"))
    pending.clear()
    assert len(pending) == 0 and pending.front is None
    assert pending.status is TxStatus.IN_TRANSACTION


def test_status_enum_values_are_the_wire_bytes() -> None:
    assert [s.value for s in TxStatus] == [b"I", b"T", b"E"]


@given(st.lists(st.tuples(st.sampled_from(list(Owner)), st.integers(0, 3)), max_size=20))
def test_owners_come_back_in_the_order_expected(batches: list[tuple[Owner, int]]) -> None:
    pending = PendingReplies()
    order: list[Owner] = []
    for owner, count in batches:
        pending.expect(owner, count)
        order += [owner] * count
    assert pending.client_owed == order.count(Owner.CLIENT)
    assert [pending.ready(ord("I")) for _ in order] == order
    assert pending.idle
