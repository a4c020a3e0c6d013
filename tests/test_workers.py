"""The stop flag the transcoder's worker processes read."""

from __future__ import annotations

import pytest_twisted

from imageshare.workers import ProcessPoolService, SharedFlag

_flag: SharedFlag | None = None


def _keep(flag: SharedFlag) -> None:
    """Worker initializer: hold the flag, as ``transcode.worker.initialize`` does."""
    global _flag
    _flag = flag


def _read() -> bool:
    assert _flag is not None
    return _flag.is_set()


@pytest_twisted.ensureDeferred
async def test_shared_flag_set_in_the_server_is_seen_by_running_workers(reactor) -> None:
    """A SharedFlag handed to spawned workers at start reads False, then True once the
    server sets it, in the same worker processes (no semaphores involved)."""
    flag = SharedFlag()
    pool = ProcessPoolService("flag-test-pool", 1, reactor, initializer=_keep, initargs=(flag,))
    pool.startService()
    try:
        assert await pool.run(_read) is False
        flag.set()
        assert flag.is_set() and await pool.run(_read) is True
    finally:
        await pool.stopService()
