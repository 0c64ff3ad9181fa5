"""The replies still owed by the server, as a queue of sync points.

Every simple Query, Sync and FunctionCall earns exactly one ReadyForQuery (PostgreSQL docs 55.2.2
"Simple Query", 55.2.3 "Extended Query"). Requests pgsidecar injects are tagged INTERNAL so the
relay swallows their replies; ReadyForQuery is the only source of the transaction status.
"""

from __future__ import annotations

import enum
from collections import deque

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
    """Sync points sent and not yet answered, oldest first."""

    __slots__ = ("_queue", "status")

    def __init__(self) -> None:
        self._queue: deque[Owner] = deque()
        self.status = TxStatus.IDLE

    def __len__(self) -> int:
        return len(self._queue)

    def expect(self, owner: Owner, count: int = 1) -> None:
        for _ in range(count):
            self._queue.append(owner)

    @property
    def front(self) -> Owner | None:
        return self._queue[0] if self._queue else None

    @property
    def client_owed(self) -> int:
        return sum(1 for owner in self._queue if owner is Owner.CLIENT)

    def ready(self, status_byte: int) -> Owner:
        """A ReadyForQuery arrived: settle the oldest sync point and take the new status."""
        status = _STATUS.get(status_byte)
        if status is None:
            raise ServerProtocolError(f"invalid transaction status {status_byte!r} in ReadyForQuery")
        if not self._queue:
            raise ServerProtocolError("ReadyForQuery without an outstanding request")
        self.status = status
        return self._queue.popleft()

    def clear(self) -> None:
        self._queue.clear()

    @property
    def idle(self) -> bool:
        """Nothing owed and no transaction open: the only moment a drop can be hidden."""
        return not self._queue and self.status is TxStatus.IDLE
