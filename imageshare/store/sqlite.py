"""
An SQLite file shared by threads: a bounded pool of connections, durable write transactions.

The catalog, the embedded XDS store and the XDS outbox each keep their own file with the
same discipline: WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on
disk when it returns: acknowledgements and registrations depend on it), foreign keys on,
autocommit connections with explicit ``BEGIN IMMEDIATE`` transactions (the write lock is
taken at once, so two writers never deadlock upgrading a read lock). Never used on the
reactor thread.

A connection is checked out for one operation (a block of :meth:`SqliteDatabase._connection`,
:meth:`~SqliteDatabase._read` or :meth:`~SqliteDatabase._write`) and handed back when the
block ends, so the number of open files does not depend on how many threads ever used the
store: pynetdicom runs every association in a thread of its own, and a connection per thread
kept two descriptors per association open until the process ran out of them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from imageshare.logsafe import Logger


log = Logger()


class ConnectionsExhausted(TimeoutError):
    """Every connection of a store stayed in use for longer than its checkout timeout."""


class SqliteDatabase:
    """
    Base of the SQLite-backed stores.

    Parameters
    ----------
    path
        The database file; created if missing.
    busy_timeout
        Seconds a connection waits for another's write lock.
    max_connections
        Most connections open at once; an operation beyond them waits for one to be handed
        back.
    checkout_timeout
        Seconds such an operation waits before :class:`ConnectionsExhausted` is raised
        (``None``: ``busy_timeout``, the wait a writer accepts anyway).
    """

    #: Raised once :meth:`close` was called (subclasses name their own).
    closed_error: type[Exception] = RuntimeError
    #: How the error message names the store.
    what = "the database"

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout: float = 30.0,
        max_connections: int = 8,
        checkout_timeout: float | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._path = str(path)
        self._busy_timeout = busy_timeout
        self._max_connections = max_connections
        self._checkout_timeout = busy_timeout if checkout_timeout is None else checkout_timeout
        self._cond = threading.Condition(threading.Lock())
        # Last in, first out: the warmest connection (page cache) serves the next operation.
        self._idle: list[sqlite3.Connection] = []
        self._open = 0  # idle + checked out + being opened
        self._closed = False
        # The connection this thread has checked out: a nested block (remove_instance reads
        # through get_instance inside its write transaction) must use the same one, both to
        # see the transaction and not to wait on the pool for a second connection.
        self._held = threading.local()

    @property
    def open_connections(self) -> int:
        """How many connections are open now (idle or in use)."""
        with self._cond:
            return self._open

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _acquire(self) -> sqlite3.Connection:
        deadline = time.monotonic() + self._checkout_timeout
        exhausted = False
        with self._cond:
            while True:
                if self._closed:
                    raise self.closed_error(f"{self.what} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max_connections:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    exhausted = True
                    break
                self._cond.wait(remaining)
        if exhausted:  # logged outside the lock: observers may be slow
            log.warn(
                "{what}: all {max_connections} connections stayed in use for {timeout} s",
                what=self.what, max_connections=self._max_connections, timeout=self._checkout_timeout,
            )
            raise ConnectionsExhausted(
                f"{self.what}: all {self._max_connections} connections stayed in use"
                f" for {self._checkout_timeout:g} s"
            )
        # Opened outside the lock: it touches the disk, and others may check in meanwhile.
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, conn: sqlite3.Connection) -> None:
        keep = True
        # Left in a transaction (a failed COMMIT, a block that began one): never hand it on.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                keep = False
        with self._cond:
            if keep and not self._closed:
                self._idle.append(conn)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        conn.close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """
        A connection for the block, in autocommit mode (each statement its own snapshot).

        Finish every cursor inside the block (``fetchall``/``fetchone``): the connection
        serves another thread afterwards. A nested block on the same thread gets the same
        connection.

        Raises
        ------
        ConnectionsExhausted
            Every connection stayed in use for ``checkout_timeout`` seconds.
        """
        held: sqlite3.Connection | None = getattr(self._held, "conn", None)
        if held is not None:
            yield held
            return
        conn = self._acquire()
        self._held.conn = conn
        try:
            yield conn
        finally:
            self._held.conn = None
            self._release(conn)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several SELECTs (WAL: writers go on meanwhile)."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def close(self) -> None:
        """
        Close the idle connections now and those in use when their block ends; later use
        raises :attr:`closed_error` (also in an operation waiting for a connection).
        """
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()
