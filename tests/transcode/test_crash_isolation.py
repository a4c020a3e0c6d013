"""A worker process that dies on one instance does not take the server or other instances down."""

from __future__ import annotations

import pytest_twisted

from imageshare.transcode.service import TranscodeService
from imageshare.workers import ProcessPoolService, WorkerPoolService
from tests.transcode import crashy


class NoPending:
    def pending(self, limit: int, exclude: object = ()) -> list[str]:
        return []


@pytest_twisted.ensureDeferred
async def test_poison_instance_is_given_up_and_others_complete(reactor) -> None:
    """The crashing instance is retried once then given up; the others finish; the pool recovers."""
    pool = ProcessPoolService("crash-test-pool", 2, reactor)
    db = WorkerPoolService("crash-test-db", 1, reactor)
    given_up: list[tuple[str, str]] = []
    svc = TranscodeService(crashy.job, NoPending(), pool, db,  # type: ignore[arg-type]
                           give_up=lambda uid, reason: given_up.append((uid, reason)))
    for s in (pool, db, svc):
        s.startService()
    try:
        for uid in ("ok-1", "crash-1", "ok-2", "ok-3"):
            svc.enqueue(uid)
        await svc.when_idle()
        assert [uid for uid, _ in given_up] == ["crash-1"]
        assert "crashed" in given_up[0][1]
        assert svc.done == 3
        # The pool was rebuilt and still works.
        assert await pool.run(crashy.job, "ok-4") == "done ok-4"
    finally:
        svc.stopService()
        try:
            await pool.stopService()
        finally:
            db.stopService()
