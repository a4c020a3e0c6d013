"""Thread pools owned by services: where blocking work runs, never on the reactor."""

from __future__ import annotations

import os
import threading
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

    def __init__(self, name: str, size: int, reactor: Any, *, nice: int = 0) -> None:
        self.setName(name)
        self.size = size
        self._reactor = reactor
        self._nice = nice
        self._niced = threading.local()
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f`` on the pool; the Deferred fires on the reactor thread."""
        if self._nice:
            return deferToThreadPool(self._reactor, self._pool, self._run_niced, f, *args, **kwargs)
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def _run_niced(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # Background work yields the CPU to what a client is waiting for (a C-STORE
        # acknowledgement, an HTTP answer). On Linux a thread has its own nice value, and
        # the threads OpenJPEG starts from it inherit it.
        if not getattr(self._niced, "done", False):
            self._niced.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except (OSError, AttributeError):
                pass  # not Linux, or not permitted: run at normal priority
        return f(*args, **kwargs)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        # Joins the workers: running jobs finish first (they cannot be interrupted).
        self._pool.stop()
