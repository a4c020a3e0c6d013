"""
A worker pool shared fairly between clients, without clocks or I/O.

A FIFO pool serves requests in arrival order, so one client that submits hundreds of
renderings makes everybody else wait behind all of them. :class:`FairQueue` sits in
front of the pool instead: it keeps no more jobs running than the pool has workers, and
holds the rest in one queue per client. A worker that frees up takes the next job of the
waiting client with the fewest jobs running, and among those of the one whose turn it is
(round robin): a client that asks while another holds every worker gets the next free one,
however many jobs the other queued, and busy clients share the workers evenly. Each client
may have only so many jobs waiting;
beyond that it is refused at once (:class:`QueueFull`), which the HTTP adapters answer with
503 and ``Retry-After``.

The client is a string key: the peer address today, an authenticated principal once
requests carry one. Jobs whose client went away are cancelled and never run.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Callable, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

__all__ = ["FairQueue", "Pool", "QueueFull"]

T = TypeVar("T")


class QueueFull(Exception):
    """Too many jobs are waiting already; ``retry_after`` seconds is a fair pause."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Pool(Protocol):
    """What :class:`FairQueue` needs of a pool (a :class:`~imageshare.workers.WorkerPoolService`)."""

    size: int

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


@attrs.define(eq=False)
class _Job:
    client: str
    f: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Deferred[Any] = attrs.field(init=False)
    started: bool = False


class FairQueue:
    """
    Runs jobs on ``pool``, taking turns between clients.

    Parameters
    ----------
    pool
        Where jobs run; at most ``pool.size`` of them are handed to it at once, so that
        the order in which they run is decided here and not by the pool's own queue.
    max_per_client
        Jobs one client may have waiting (not counting those running).
    max_waiting
        Jobs waiting in all; ``None``: only the per-client cap bounds them.
    """

    def __init__(self, pool: Pool, *, max_per_client: int, max_waiting: int | None = None) -> None:
        self._pool = pool
        self.workers = pool.size
        self.max_per_client = max_per_client
        self.max_waiting = max_waiting
        # Clients with jobs waiting, in turn order: the next job is the first client's.
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._waiting = 0
        self._running = 0
        self._active: dict[str, int] = {}  # jobs running, by client (no zero entries)
        self._dispatching = False

    @property
    def waiting(self) -> int:
        """Jobs waiting for a worker, of all clients."""
        return self._waiting

    @property
    def running(self) -> int:
        """Jobs handed to the pool and not finished."""
        return self._running

    def waiting_for(self, client: str) -> int:
        """Jobs of ``client`` waiting for a worker."""
        return len(self._queues.get(client, ()))

    def submit(self, client: str, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """
        Run ``f(*args, **kwargs)`` on the pool in ``client``'s turn.

        Cancelling the returned Deferred drops the job if it has not started; a started
        job cannot be interrupted (it is on a thread), so it runs on and its result is
        discarded, but its worker is counted busy until it ends.

        Raises
        ------
        QueueFull
            ``client`` has ``max_per_client`` jobs waiting, or ``max_waiting`` jobs wait
            in all. Nothing is queued.
        """
        job = _Job(client, f, args, kwargs)
        job.result = Deferred(lambda _: self._cancel(job))
        if self._running < self.workers:
            # A free worker means nobody is waiting (the queues are drained first).
            self._start(job)
            return job.result
        if self.waiting_for(client) >= self.max_per_client:
            raise QueueFull(f"this client has {self.max_per_client} requests waiting already; try again")
        if self.max_waiting is not None and self._waiting >= self.max_waiting:
            raise QueueFull("too many requests are waiting; try again")
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()  # a newly waiting client comes last in turn
        queue.append(job)
        self._waiting += 1
        return job.result

    def _start(self, job: _Job) -> None:
        job.started = True
        self._running += 1
        self._active[job.client] = self._active.get(job.client, 0) + 1
        maybeDeferred(self._pool.run, job.f, *job.args, **job.kwargs).addBoth(self._finished, job)

    def _finished(self, result: Any, job: _Job) -> None:
        self._running -= 1
        left = self._active[job.client] - 1
        if left:
            self._active[job.client] = left
        else:
            del self._active[job.client]
        # The freed worker goes to a waiting job before the result's callbacks run, so
        # that work they submit does not overtake it.
        self._dispatch()
        # Cancelled (its client went away): nobody wants the outcome, error or not.
        if not job.result.called:
            job.result.callback(result)

    def _dispatch(self) -> None:
        if self._dispatching:
            return  # a job that finished at once (a synchronous pool): the loop below goes on
        self._dispatching = True
        try:
            while self._running < self.workers and self._queues:
                # Fewest running first; min() keeps the first of equals, in turn order. The
                # scan is over waiting clients, at most max_waiting of them.
                client = min(self._queues, key=lambda c: self._active.get(c, 0))
                queue = self._queues[client]
                job = queue.popleft()
                self._waiting -= 1
                if queue:
                    self._queues.move_to_end(client)  # served: its next job waits for the others
                else:
                    del self._queues[client]
                self._start(job)
        finally:
            self._dispatching = False

    def _cancel(self, job: _Job) -> None:
        if job.started:
            return  # runs to its end; _finished discards the result
        queue = self._queues.get(job.client)
        if queue is None or job not in queue:
            return
        queue.remove(job)
        self._waiting -= 1
        if not queue:
            del self._queues[job.client]
