"""The SQLite base of the stores: a bounded pool of connections, write transactions, close."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from imageshare.store.catalog import SqliteCatalog
from imageshare.store.sqlite import ConnectionsExhausted, SqliteDatabase


class Closed(Exception):
    pass


class Db(SqliteDatabase):
    closed_error = Closed
    what = "the test database"


def open_fds() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


def run_threads(count: int, target: Callable[[int], None], timeout: float = 30) -> list[BaseException]:
    """Run ``target(i)`` in ``count`` threads that then end; return what they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # reported to the test, which fails on it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads did not finish"
    return errors


def make_db(tmp_path: Path, **kw: float) -> Db:
    db = Db(tmp_path / "t.sqlite3", **kw)  # type: ignore[arg-type]
    with db._write() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
    return db


def test_connection_settings_transactions_and_close(tmp_path: Path) -> None:
    """Connections are in WAL mode, synchronous FULL, with foreign keys and autocommit; a
    failing write block rolls back; after close, use raises the store's own error."""
    db = make_db(tmp_path)
    with db._write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError):
        with db._write() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
            1 / 0
    with db._connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.isolation_level is None
        assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]
    other: list[object] = []

    def read(_: int) -> None:
        with db._connection() as conn:
            other.append(conn.execute("SELECT v FROM t").fetchall())

    assert run_threads(1, read) == [] and other == [[(1,)]]
    db.close()
    for use in (db._connection, db._read, db._write):
        with pytest.raises(Closed, match="the test database is closed"):
            with use():
                pass


def test_threads_that_end_leave_at_most_max_connections(tmp_path: Path) -> None:
    """Many short-lived threads (as pynetdicom makes, one per association), each writing and
    reading, leave at most ``max_connections`` connections and their descriptors open; at no
    time are more open; close() gives every descriptor back."""
    before = open_fds()
    db = make_db(tmp_path, max_connections=4)
    peak = [0]
    start = threading.Barrier(8)

    def work(i: int) -> None:
        if i < 8:
            start.wait(10)  # the first eight overlap, so the pool is full at least once
        with db._write() as conn:
            conn.execute("INSERT INTO t VALUES (?)", (i,))
        with db._read() as conn:
            conn.execute("SELECT COUNT(*) FROM t").fetchone()
            peak[0] = max(peak[0], db.open_connections)
            time.sleep(0.001)

    assert run_threads(200, work) == []
    assert db.open_connections <= 4 and peak[0] <= 4
    # Two descriptors per connection (database, WAL) and one shared -shm: the old
    # connection-per-thread design left 400 here.
    assert open_fds() - before <= 2 * 4 + 2
    with db._connection() as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 200
    db.close()
    assert db.open_connections == 0
    assert open_fds() <= before


def test_catalog_reads_from_many_threads_do_not_leak(tmp_path: Path) -> None:
    """The catalog's reads and its reader() from 300 threads that then end (one C-FIND per
    association) keep at most its ``max_connections`` open."""
    before = open_fds()
    catalog = SqliteCatalog(tmp_path / "catalog.sqlite3", max_connections=3)

    def work(i: int) -> None:
        assert catalog.get_instance(f"1.2.{i}") is None
        with catalog.reader() as conn:
            conn.execute("SELECT COUNT(*) FROM studies").fetchall()
        catalog.counts()

    for batch in range(3):
        assert run_threads(100, work) == []
    assert catalog.open_connections <= 3
    assert open_fds() - before <= 2 * 3 + 2
    catalog.close()
    assert open_fds() <= before


def test_waiting_beyond_the_maximum_times_out_with_a_clear_error(tmp_path: Path) -> None:
    """With every connection in use, an operation waits for one to be handed back: it gets
    one if that happens in time, else ConnectionsExhausted naming the store and the limit."""
    db = make_db(tmp_path, max_connections=1, checkout_timeout=0.3)
    outcome: list[object] = []

    def other(_: int) -> None:
        began = time.monotonic()
        try:
            with db._connection() as conn:
                outcome.append(conn.execute("SELECT 1").fetchone())
        except ConnectionsExhausted as e:
            outcome.append((e, time.monotonic() - began))

    with db._connection():
        assert run_threads(1, other) == []
    (error, waited), = outcome
    assert isinstance(error, ConnectionsExhausted) and isinstance(error, TimeoutError)
    assert "the test database: all 1 connections stayed in use for 0.3 s" in str(error)
    assert 0.25 <= waited < 5

    # Handed back in time: the waiter is served with the same connection.
    outcome.clear()
    held = threading.Event()
    release = threading.Event()

    def holder(_: int) -> None:
        with db._connection():
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder, args=(0,))
    t.start()
    assert held.wait(10)
    waiter = threading.Thread(target=other, args=(0,))
    waiter.start()
    time.sleep(0.05)
    release.set()
    waiter.join(10)
    t.join(10)
    assert outcome == [(1,)]
    assert db.open_connections == 1
    db.close()


def test_nested_blocks_share_the_thread_connection(tmp_path: Path) -> None:
    """A read nested in a write transaction on the same thread uses that transaction's
    connection (it sees the uncommitted row), so it never waits on a full pool."""
    db = make_db(tmp_path, max_connections=1, checkout_timeout=0.2)
    with db._write() as outer:
        outer.execute("INSERT INTO t VALUES (7)")
        with db._connection() as inner:
            assert inner is outer
            assert inner.execute("SELECT v FROM t").fetchall() == [(7,)]
    assert db.open_connections == 1
    db.close()


def test_close_closes_idle_and_in_use_connections(tmp_path: Path) -> None:
    """close() closes the idle connections at once, a connection in use when its block ends
    (the operation finishes first), and wakes a waiter with the closed error."""
    before = open_fds()
    db = make_db(tmp_path, max_connections=2, checkout_timeout=10)
    in_use = threading.Event()
    finish = threading.Event()
    seen: list[object] = []

    def busy(_: int) -> None:
        with db._write() as conn:
            in_use.set()
            finish.wait(10)
            conn.execute("INSERT INTO t VALUES (1)")  # still usable after close()

    def waiter(_: int) -> None:
        try:
            with db._connection():
                seen.append("served")
        except Closed as e:
            seen.append(e)

    # Two connections: one idle (opened here), one held by the busy thread.
    with db._connection() as first:
        t = threading.Thread(target=busy, args=(0,))
        t.start()
        assert in_use.wait(10)
    assert db.open_connections == 2
    w = threading.Thread(target=waiter, args=(0,))
    w.start()  # served by the idle connection, then returns it
    w.join(10)
    assert seen == ["served"]

    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")  # the idle one is closed
    assert db.open_connections == 1
    finish.set()
    t.join(10)
    assert db.open_connections == 0
    assert open_fds() <= before
    check = sqlite3.connect(tmp_path / "t.sqlite3")
    assert check.execute("SELECT v FROM t").fetchall() == [(1,)]  # the busy write committed
    check.close()
    seen.clear()
    assert run_threads(1, waiter) == []
    assert isinstance(seen[0], Closed)


def test_close_wakes_a_waiting_operation(tmp_path: Path) -> None:
    """An operation waiting for a connection when the store closes gets the closed error
    at once rather than at its timeout."""
    db = make_db(tmp_path, max_connections=1, checkout_timeout=30)
    seen: list[object] = []

    def waiter(_: int) -> None:
        began = time.monotonic()
        try:
            with db._connection():
                seen.append("served")
        except Closed:
            seen.append(time.monotonic() - began)

    with db._connection():
        w = threading.Thread(target=waiter, args=(0,))
        w.start()
        time.sleep(0.1)
        db.close()
        w.join(10)
    (waited,) = seen
    assert isinstance(waited, float) and waited < 5


def test_failed_write_rolls_back_and_the_connection_is_reused(tmp_path: Path) -> None:
    """A write block that raises (a constraint or any error) rolls back; the connection goes
    back to the pool outside any transaction and serves the next write."""
    db = make_db(tmp_path, max_connections=1)
    with db._write() as conn:
        conn.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO u VALUES (1)")
        first = conn
    with pytest.raises(sqlite3.IntegrityError):
        with db._write() as conn:
            conn.execute("INSERT INTO t VALUES (5)")
            conn.execute("INSERT INTO u VALUES (1)")
    with pytest.raises(RuntimeError):
        with db._read() as conn:
            conn.execute("SELECT * FROM t").fetchall()
            raise RuntimeError("a reader failed")
    with db._write() as conn:
        assert conn is first and conn.in_transaction
        conn.execute("INSERT INTO t VALUES (6)")
    with db._connection() as conn:
        assert conn is first and not conn.in_transaction
        assert conn.execute("SELECT v FROM t").fetchall() == [(6,)]
    assert db.open_connections == 1
    db.close()


def test_transaction_left_open_is_rolled_back_on_return(tmp_path: Path) -> None:
    """A connection handed back inside a transaction (a block that began one itself) is
    rolled back before another operation gets it: nothing uncommitted leaks to the next."""
    db = make_db(tmp_path, max_connections=1)
    with db._connection() as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (9)")
    with db._connection() as conn:
        assert not conn.in_transaction
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    db.close()


def test_max_connections_must_be_positive(tmp_path: Path) -> None:
    """A pool of no connections is refused when the store is made."""
    with pytest.raises(ValueError):
        Db(tmp_path / "t.sqlite3", max_connections=0)
