"""Thread pools owned by services: where blocking work runs, never on the reactor."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class WorkerPoolService(Service):
    """
    A dedicated, bounded thread pool with the lifetime of the service.

    Not the reactor's shared pool: that one also serves DNS and other users, and a long
    transcode there would stall them.
    """

    def __init__(self, name: str, size: int, reactor: Any) -> None:
        self.setName(name)
        self.size = size
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f`` on the pool; the Deferred fires on the reactor thread."""
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        # Joins the workers: running jobs finish first (they cannot be interrupted).
        self._pool.stop()
