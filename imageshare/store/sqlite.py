"""
An SQLite file shared by threads: one connection per thread, durable write transactions.

The catalog, the embedded XDS store and the XDS outbox each keep their own file with the
same discipline: WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on
disk when it returns: acknowledgements and registrations depend on it), foreign keys on,
autocommit connections with explicit ``BEGIN IMMEDIATE`` transactions (the write lock is
taken at once, so two writers never deadlock upgrading a read lock). Never used on the
reactor thread.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class SqliteDatabase:
    """
    Base of the SQLite-backed stores.

    Parameters
    ----------
    path
        The database file; created if missing.
    busy_timeout
        Seconds a connection waits for another's write lock.
    """

    #: Raised by :meth:`_conn` once :meth:`close` was called (subclasses name their own).
    closed_error: type[Exception] = RuntimeError
    #: How the error message names the store.
    what = "the database"

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0) -> None:
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._closed:
                    raise self.closed_error(f"{self.what} is closed")
                conn = sqlite3.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; later use raises :attr:`closed_error`."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.ProgrammingError:
                pass  # made in a thread that is still alive; SQLite closes it with the process
