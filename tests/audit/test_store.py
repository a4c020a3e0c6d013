"""The local audit log and the spool: durable, ordered, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageshare.audit.store import AuditLog, Spool


def test_log_appends_lines(tmp_path: Path) -> None:
    """Each message is one line, appended; a reopened log keeps what was there."""
    log = AuditLog(tmp_path / "audit.log")
    log.append(b"one")
    log.close()
    log = AuditLog(tmp_path / "audit.log")
    log.append(b"two")
    log.close()
    assert (tmp_path / "audit.log").read_bytes() == b"one\ntwo\n"


def test_log_refuses_line_breaks(tmp_path: Path) -> None:
    """A message with a line break would become two records: refused."""
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "audit.log").append(b"a\nb")


def test_spool_order_remove_and_restart(tmp_path: Path) -> None:
    """Messages come back oldest first, survive a reopen, and go once the repository took them."""
    spool = Spool(tmp_path / "s.sqlite3", 1 << 20)
    for i in range(5):
        assert spool.add(b"m%d" % i)
    assert [b for _, b in spool.batch(0, 3)] == [b"m0", b"m1", b"m2"]
    last = spool.batch(0, 2)[-1][0]
    assert spool.remove_through(last) == 2
    spool.close()
    spool = Spool(tmp_path / "s.sqlite3", 1 << 20)
    assert spool.pending == 3
    assert [b for _, b in spool.batch(0)] == [b"m2", b"m3", b"m4"]
    spool.close()


def test_spool_bound_keeps_the_oldest(tmp_path: Path) -> None:
    """A full spool keeps what waits and refuses new messages until room is made."""
    spool = Spool(tmp_path / "s.sqlite3", 10)
    assert spool.add(b"12345") and spool.add(b"67890")
    assert not spool.add(b"x")
    assert [b for _, b in spool.batch(0)] == [b"12345", b"67890"]
    spool.remove_through(spool.batch(0, 1)[0][0])
    assert spool.add(b"x")
    spool.close()
