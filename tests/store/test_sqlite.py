"""The SQLite base of the stores: a connection per thread, write transactions, close."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imageshare.store.sqlite import SqliteDatabase


class Closed(Exception):
    pass


class Db(SqliteDatabase):
    closed_error = Closed
    what = "the test database"


def test_threads_transactions_and_close(tmp_path: Path) -> None:
    """Each thread gets its own connection (WAL, synchronous FULL); a failing block rolls
    back; after close, use raises the store's own error."""
    db = Db(tmp_path / "t.sqlite3")
    with db._write() as conn:
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError):
        with db._write() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
            1 / 0
    main = db._conn()
    assert main.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert main.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(db._conn().execute("SELECT v FROM t").fetchall()))
    thread.start()
    thread.join(10)
    assert other == [[(1,)]] and db._conn() is main
    db.close()
    # This thread's connection is closed; a thread opening one now is refused.
    refused: list[BaseException] = []

    def late() -> None:
        try:
            db._conn()
        except Closed as e:
            refused.append(e)

    thread = threading.Thread(target=late)
    thread.start()
    thread.join(10)
    assert len(refused) == 1 and "the test database is closed" in str(refused[0])
