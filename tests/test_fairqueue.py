"""The fair queue in front of a worker pool: turns, per-client caps, cancellation."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from imageshare.fairqueue import FairQueue, QueueFull


class FakePool:
    """A pool whose jobs end when the test says so; ``started`` lists them in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.started: list[str] = []
        self._pending: dict[str, Deferred[Any]] = {}

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        name = f(*args, **kwargs)  # the jobs here only name themselves
        self.started.append(name)
        self._pending[name] = Deferred()
        return self._pending[name]

    def finish(self, name: str, result: Any = None) -> None:
        self._pending.pop(name).callback(name if result is None else result)

    def finish_first(self) -> str:
        name = next(iter(self._pending))
        self.finish(name)
        return name


def job(name: str) -> str:
    return name


def collect(d: Deferred[Any], into: list[Any]) -> None:
    d.addBoth(into.append)


def test_clients_take_turns_for_the_workers() -> None:
    """With both workers busy, a freed worker goes to the waiting client with the fewest jobs
    running, among equals to the one whose turn it is (a client just served waits for the
    others), not in arrival order; results reach their callers."""
    pool = FakePool(2)
    queue = FairQueue(pool, max_per_client=10)
    results: list[Any] = []
    for i in range(1, 7):
        collect(queue.submit("A", job, f"A{i}"), results)
    for i in range(1, 3):
        collect(queue.submit("B", job, f"B{i}"), results)
    collect(queue.submit("C", job, "C1"), results)
    assert pool.started == ["A1", "A2"] and queue.running == 2 and queue.waiting == 7
    assert (queue.waiting_for("A"), queue.waiting_for("B"), queue.waiting_for("C")) == (4, 2, 1)
    for _ in range(9):
        pool.finish_first()
    # A1 ends: B1 (A has one running, B none); A2 ends: A3 (A's turn before C's); B1 ends:
    # C1 (none running, its turn before B's); A3 ends: B2; then the rest of A's.
    assert pool.started == ["A1", "A2", "B1", "A3", "C1", "B2", "A4", "A5", "A6"]
    assert results == ["A1", "A2", "B1", "A3", "C1", "B2", "A4", "A5", "A6"]
    assert queue.running == 0 and queue.waiting == 0


def test_a_client_over_its_cap_is_refused_at_once() -> None:
    """Beyond max_per_client waiting jobs a client gets QueueFull (nothing is queued); other
    clients are still queued; max_waiting bounds all clients together; a job that starts
    frees its client's place."""
    pool = FakePool(1)
    queue = FairQueue(pool, max_per_client=2, max_waiting=3)
    queue.submit("A", job, "A1")  # runs: not counted as waiting
    queue.submit("A", job, "A2")
    queue.submit("A", job, "A3")
    with pytest.raises(QueueFull) as info:
        queue.submit("A", job, "A4")
    assert info.value.retry_after == 1 and "2 requests waiting" in info.value.reason
    assert queue.waiting_for("A") == 2
    queue.submit("B", job, "B1")
    with pytest.raises(QueueFull) as info:
        queue.submit("C", job, "C1")  # 3 waiting in all
    assert "too many requests" in info.value.reason
    pool.finish("A1")  # A2 starts
    queue.submit("A", job, "A4")
    assert queue.waiting_for("A") == 2 and queue.waiting == 3
    for _ in range(4):
        pool.finish_first()
    assert pool.started == ["A1", "A2", "B1", "A3", "A4"]


def test_cancelled_waiting_jobs_never_run() -> None:
    """Cancelling a waiting job (its client went away) drops it: it fails with
    CancelledError, frees its place and is never handed to the pool."""
    pool = FakePool(1)
    queue = FairQueue(pool, max_per_client=2)
    queue.submit("A", job, "A1")
    a2 = queue.submit("A", job, "A2")
    b1 = queue.submit("B", job, "B1")
    a3 = queue.submit("A", job, "A3")
    outcomes: list[Any] = []
    collect(a2, outcomes)
    a2.cancel()
    b1.cancel()
    assert isinstance(outcomes[0], Failure) and outcomes[0].check(CancelledError)
    assert queue.waiting == 1 and queue.waiting_for("B") == 0
    pool.finish("A1")
    pool.finish("A3")
    assert pool.started == ["A1", "A3"] and a3.result == "A3"
    assert queue.running == 0 and queue.waiting == 0


def test_a_cancelled_running_job_keeps_its_worker_until_it_ends() -> None:
    """A running job cannot be interrupted: cancelling it fails its Deferred at once, but
    its worker stays busy until it ends; its result, even an error, is discarded."""
    pool = FakePool(1)
    queue = FairQueue(pool, max_per_client=5)
    running = queue.submit("A", job, "A1")
    running.addErrback(lambda f: f.trap(CancelledError))
    running.cancel()
    assert running.called and queue.running == 1
    queue.submit("B", job, "B1")
    assert pool.started == ["A1"]
    pool._pending.pop("A1").errback(RuntimeError("the rendering failed"))  # no unhandled error
    assert pool.started == ["A1", "B1"] and queue.running == 1


def test_a_freed_worker_goes_to_waiting_work_before_new_work() -> None:
    """Work submitted by the callbacks of a finished job queues behind the jobs already
    waiting, instead of taking the worker its job freed."""
    pool = FakePool(1)
    queue = FairQueue(pool, max_per_client=5)
    queue.submit("A", job, "A1").addCallback(lambda _: queue.submit("A", job, "A2"))
    queue.submit("B", job, "B1")
    pool.finish("A1")
    assert pool.started == ["A1", "B1"] and queue.waiting_for("A") == 1


def test_a_synchronous_pool_runs_everything_in_order() -> None:
    """With a pool that answers at once, jobs run as submitted and errors reach the caller."""

    class SyncPool:
        size = 1

        def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            return succeed(f(*args, **kwargs))

    queue = FairQueue(SyncPool(), max_per_client=1)
    assert queue.submit("A", job, "A1").result == "A1"

    def broken() -> None:
        raise ValueError("bad")

    failures: list[Failure] = []
    queue.submit("A", broken).addErrback(failures.append)
    assert failures[0].check(ValueError) and queue.running == 0 and queue.waiting == 0
