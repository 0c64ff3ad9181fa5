"""The drop log file: one JSON line per record, safe with several processes appending.

Each record is one `os.write` on an O_APPEND descriptor, so lines from concurrent writers never
interleave (POSIX write(2): with O_APPEND the seek to the end and the write are one atomic step).
Rotation is by rename under an flock on the current file: whoever holds the lock re-checks that
the path still names its file before rotating, so two processes never rotate the same file twice;
a writer that finds the path renamed under it reopens. `reopen()` serves SIGHUP after logrotate.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading

from pgsidecar.drops.record import DropRecord

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o640


class DropLogWriter:
    """Append drop records to a file (or stderr for "-"), rotating by size."""

    def __init__(self, path: str | None, max_bytes: int = 0, backups: int = 5) -> None:
        """path None disables the log; max_bytes 0 disables rotation. Opening errors raise."""
        self.path = path
        self.max_bytes = max_bytes
        self.backups = max(0, backups)
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None and path != "-":
            self._fd = os.open(path, _FLAGS, _MODE)

    def write(self, rec: DropRecord) -> None:
        """Append one record as one line; failures are counted, never raised into the relay."""
        if self.path is None:
            return
        with self._lock:
            try:
                # Client-supplied text (application_name, user) may carry bytes that are not
                # UTF-8 (kept as surrogate escapes): written as \\xNN, never raised.
                data = (rec.to_json() + "\n").encode("utf-8", "backslashreplace")
                if self.path == "-":
                    _write_all(sys.stderr.fileno(), data)
                    return
                self._prepare(len(data))
                assert self._fd is not None
                _write_all(self._fd, data)
            except (OSError, ValueError) as exc:
                self.failures += 1
                self.last_error = f"{self.path}: {getattr(exc, 'strerror', None) or exc}"

    def reopen(self) -> None:
        """Close and reopen the path (SIGHUP after an external logrotate moved the file)."""
        with self._lock:
            if self.path is None or self.path == "-":
                return
            self._swap(os.open(self.path, _FLAGS, _MODE))

    def close(self) -> None:
        """Release the descriptor; later writes are dropped silently."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.path = None

    def _prepare(self, incoming: int) -> None:
        """Make sure our fd is the file the path names, rotating it first if it is full."""
        assert self.path is not None
        if self._fd is None or not self._is_current():
            self._swap(os.open(self.path, _FLAGS, _MODE))
        assert self._fd is not None
        if self.max_bytes <= 0:
            return
        size = os.fstat(self._fd).st_size
        if size == 0 or size + incoming <= self.max_bytes:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            # Another process may have rotated while we waited for the lock.
            if self._is_current() and os.fstat(self._fd).st_size + incoming > self.max_bytes:
                self._rotate()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._swap(os.open(self.path, _FLAGS, _MODE))

    def _is_current(self) -> bool:
        assert self._fd is not None and self.path is not None
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def _rotate(self) -> None:
        """path.N-1 -> path.N, ..., path -> path.1 (the oldest is overwritten)."""
        assert self.path is not None
        if self.backups == 0:
            os.unlink(self.path)
            return
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def _swap(self, fd: int) -> None:
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
