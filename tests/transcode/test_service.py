"""The transcoding queue: concurrency bound, refills from the catalog, re-sends, crashes."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed

from imageshare.transcode.service import TranscodeService


class SyncPool:
    """A pool that runs jobs when told to, to observe concurrency deterministically."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running: list[tuple[Any, tuple[Any, ...], Any]] = []

    def run(self, f: Any, *args: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.running.append((f, args, d))
        return d

    def finish_one(self) -> None:
        f, args, d = self.running.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


class ImmediatePool:
    size = 2

    def run(self, f: Any, *args: Any) -> Any:
        return succeed(f(*args))


class FakeCatalog:
    def __init__(self, pending: list[str]) -> None:
        self._pending = list(pending)
        self.asked: list[tuple[int, set[str]]] = []

    def pending(self, limit: int, exclude: Any = ()) -> list[str]:
        self.asked.append((limit, set(exclude)))
        return [u for u in self._pending if u not in exclude][:limit]

    def done(self, uid: str) -> None:
        self._pending.remove(uid)


def test_bounded_concurrency_and_order() -> None:
    """No more than pool.size jobs run at once; jobs run in announcement order."""
    ran: list[str] = []
    catalog = FakeCatalog([])
    pool = SyncPool(2)
    svc = TranscodeService(ran.append, catalog, pool, ImmediatePool())  # type: ignore[arg-type]
    svc.startService()
    for uid in ["1", "2", "3", "4"]:
        svc.enqueue(uid)
    assert len(pool.running) == 2
    pool.finish_one()
    assert len(pool.running) == 2
    while pool.running:
        pool.finish_one()
    assert ran == ["1", "2", "3", "4"]


def test_restart_resumes_from_catalog_in_bounded_batches() -> None:
    """On start the catalog's pending instances are taken in batches no larger than max_queue."""
    pending = [str(i) for i in range(10)]
    catalog = FakeCatalog(pending)
    ran: list[str] = []

    def job(uid: str) -> None:
        ran.append(uid)
        catalog.done(uid)

    pool = SyncPool(1)
    svc = TranscodeService(job, catalog, pool, ImmediatePool(), max_queue=3)  # type: ignore[arg-type]
    svc.startService()
    for _ in range(100):
        if not pool.running:
            break
        pool.finish_one()
    assert ran == pending
    assert all(limit <= 3 for limit, _ in catalog.asked)


def test_resend_during_transcode_runs_again() -> None:
    """An instance received again while it is being transcoded is transcoded once more."""
    ran: list[str] = []
    pool = SyncPool(1)
    svc = TranscodeService(ran.append, FakeCatalog([]), pool, ImmediatePool())  # type: ignore[arg-type]
    svc.startService()
    svc.enqueue("1")
    svc.enqueue("1")  # arrives again while running
    svc.enqueue("2")
    svc.enqueue("2")  # duplicate while queued: once is enough
    while pool.running:
        pool.finish_one()
    assert ran == ["1", "2", "1"]


def test_crashing_job_is_not_retried_in_a_loop() -> None:
    """A job that raises is logged and set aside until the instance is received again."""
    catalog = FakeCatalog(["bad"])
    calls: list[str] = []

    def job(uid: str) -> None:
        calls.append(uid)
        raise RuntimeError("bug")

    pool = SyncPool(1)
    svc = TranscodeService(job, catalog, pool, ImmediatePool())  # type: ignore[arg-type]
    svc.startService()
    for _ in range(20):
        if not pool.running:
            break
        pool.finish_one()
    assert calls == ["bad"] and svc.failed == 1
    idle = svc.when_idle()
    assert idle.called
    svc.enqueue("bad")  # received again: tried again
    pool.finish_one()
    assert calls == ["bad", "bad"]


def test_when_idle_and_stop() -> None:
    """when_idle fires once the queue drains; after stop nothing new starts."""
    pool = SyncPool(1)
    svc = TranscodeService(lambda uid: None, FakeCatalog([]), pool, ImmediatePool())  # type: ignore[arg-type]
    svc.startService()
    svc.enqueue("1")
    idle = svc.when_idle()
    assert not idle.called
    pool.finish_one()
    assert idle.called
    svc.stopService()
    svc.enqueue("2")
    assert pool.running == []


def test_on_done_is_called_after_each_transcode() -> None:
    """on_done hears of every finished instance (the JPIP caches use it to drop stale codestreams)."""
    done: list[str] = []
    pool = SyncPool(1)
    svc = TranscodeService(lambda uid: None, FakeCatalog([]), pool, ImmediatePool(),  # type: ignore[arg-type]
                           on_done=done.append)
    svc.startService()
    svc.enqueue("1")
    svc.enqueue("2")
    while pool.running:
        pool.finish_one()
    assert done == ["1", "2"]


def test_a_job_cancelled_by_the_stop_is_neither_failed_nor_a_crash() -> None:
    """A job that stops because the server stops leaves its instance pending, logged at info,
    not counted as failed nor set aside as a crash (it resumes at the next start)."""
    from twisted.logger import LogLevel

    from imageshare.transcode.job import Cancelled

    def job(uid: str) -> None:
        raise Cancelled()

    events: list[dict[str, Any]] = []
    pool = SyncPool(1)
    svc = TranscodeService(job, FakeCatalog([]), pool, ImmediatePool())  # type: ignore[arg-type]
    svc.log = svc.log.__class__(namespace="test", observer=events.append)
    svc.startService()
    svc.enqueue("1")
    pool.finish_one()
    assert svc.failed == 0 and "1" not in svc._crashed
    assert [e["log_level"] for e in events] == [LogLevel.info]
    assert "stays pending" in events[0]["log_format"]
