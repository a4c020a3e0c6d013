"""
Where audit messages are kept: the local append-only audit log and the spool of messages
the audit record repository has not taken yet. Both block: call them off the reactor (the
audit writer thread does).

The local log (``audit.log`` in the data folder) gets every message, one RFC 5424 message
per line (the XML never holds a raw line break), fsynced before :meth:`AuditLog.append`
returns. It is the complete trail and is never rotated or trimmed by the server.

The spool (``audit-spool.sqlite3``) keeps each message until the repository has taken it,
in order, across outages and restarts. It is bounded (``[audit] max_spool`` bytes): when
full, the messages already waiting are kept and new ones are not queued for the repository
(they are in the local log all the same), so the repository receives an unbroken run of
the oldest messages and the gap is announced in the server log, once when it starts and
once when it ends, with the number of messages left out.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from imageshare.store.sqlite import SqliteDatabase

__all__ = ["AuditLog", "Spool", "SpoolClosed"]


class AuditLog:
    """The local append-only audit log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def append(self, message: bytes) -> None:
        """Write one message as a line and fsync it."""
        if b"\n" in message:
            raise ValueError("an audit log line must not hold a line break")
        data = message + b"\n"
        with self._lock:
            if self._fd < 0:
                raise ValueError("the audit log is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class SpoolClosed(RuntimeError):
    """The spool was closed."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL
);
"""


class Spool(SqliteDatabase):
    """Messages waiting for the repository, oldest first (durable, bounded, thread-safe)."""

    closed_error = SpoolClosed
    what = "the audit spool"

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(path, max_connections=2)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        with self._connection() as conn:
            conn.executescript(_SCHEMA)
            count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM messages").fetchone()
        self._count, self._bytes = int(count), int(size)

    @property
    def pending(self) -> int:
        """Messages waiting."""
        with self._lock:
            return self._count

    def add(self, body: bytes) -> bool:
        """Queue a message; False (and nothing queued) when the spool is full."""
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                return False
            with self._write() as conn:
                conn.execute("INSERT INTO messages (body) VALUES (?)", (body,))
            self._count += 1
            self._bytes += len(body)
            return True

    def batch(self, after: int, limit: int = 100) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages after id ``after``, oldest first."""
        with self._connection() as conn:
            rows = conn.execute("SELECT id, body FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                                (after, limit)).fetchall()
        return [(int(i), bytes(b)) for i, b in rows]

    def remove_through(self, last: int) -> int:
        """Forget the messages up to id ``last`` (the repository took them); how many were removed."""
        with self._lock:
            with self._write() as conn:
                count, size = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM messages WHERE id <= ?", (last,)
                ).fetchone()
                conn.execute("DELETE FROM messages WHERE id <= ?", (last,))
            self._count -= int(count)
            self._bytes -= int(size)
            return int(count)
