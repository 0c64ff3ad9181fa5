"""The replies still owed by the server, as a queue of sync points.

Every simple Query, Sync and FunctionCall earns exactly one ReadyForQuery (PostgreSQL docs 55.2.2
"Simple Query", 55.2.3 "Extended Query"). Requests pgsidecar injects are tagged INTERNAL so the
relay swallows their replies; ReadyForQuery is the only source of the transaction status.
"""

from __future__ import annotations

import enum
from collections import deque
from itertools import repeat

from pgsidecar.wire.errors import ServerProtocolError


class Owner(enum.Enum):
    CLIENT = "client"
    INTERNAL = "internal"


class TxStatus(enum.Enum):
    """The transaction status byte of ReadyForQuery (55.7, "ReadyForQuery")."""

    IDLE = b"I"
    IN_TRANSACTION = b"T"
    FAILED = b"E"


_STATUS = {ord("I"): TxStatus.IDLE, ord("T"): TxStatus.IN_TRANSACTION, ord("E"): TxStatus.FAILED}


class PendingReplies:
    """Sync points sent and not yet answered, oldest first.

    ``front`` (the oldest owner, None when nothing is owed) is a plain attribute kept in step with
    the queue, not a property: the relay reads it on every read, and a property costs a call."""

    __slots__ = ("_queue", "front", "status")

    def __init__(self) -> None:
        self._queue: deque[Owner] = deque()
        self.front: Owner | None = None
        self.status = TxStatus.IDLE

    def __len__(self) -> int:
        return len(self._queue)

    def expect(self, owner: Owner, count: int = 1) -> None:
        queue = self._queue
        if count == 1:
            queue.append(owner)
        else:
            queue.extend(repeat(owner, count))
        self.front = queue[0] if queue else None

    @property
    def client_owed(self) -> int:
        return sum(1 for owner in self._queue if owner is Owner.CLIENT)

    def ready(self, status_byte: int) -> Owner:
        """A ReadyForQuery arrived: settle the oldest sync point and take the new status."""
        status = _STATUS.get(status_byte)
        if status is None:
            raise ServerProtocolError(f"invalid transaction status {status_byte!r} in ReadyForQuery")
        queue = self._queue
        if not queue:
            raise ServerProtocolError("ReadyForQuery without an outstanding request")
        self.status = status
        owner = queue.popleft()
        self.front = queue[0] if queue else None
        return owner

    def clear(self) -> None:
        self._queue.clear()
        self.front = None

    @property
    def idle(self) -> bool:
        """Nothing owed and no transaction open: the only moment a drop can be hidden."""
        return not self._queue and self.status is TxStatus.IDLE
