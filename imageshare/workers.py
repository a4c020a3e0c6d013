"""Pools owned by services: where blocking work runs, never on the reactor."""

from __future__ import annotations

import ctypes
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from imageshare.logsafe import Logger

T = TypeVar("T")

__all__ = ["BrokenProcessPool", "ProcessPoolService", "SharedFlag", "WorkerPoolService"]


class SharedFlag:
    """
    A flag this process sets and worker processes read: one byte of shared memory.

    It stands in for ``multiprocessing.Event`` (same ``set``/``is_set``), which is five
    named POSIX semaphores: twistd ends a SIGTERM stop by re-raising the signal, so
    multiprocessing's exit finalizers never unlink them, and its resource tracker then
    reports "5 leaked semaphore objects". Shared memory is an unlinked file whose
    descriptor dies with the process, so nothing is left to clean up. Workers only poll
    the flag between frames, which needs no lock.

    Pass it to worker processes when they start (``initargs``), as any shared ctypes value.
    """

    def __init__(self) -> None:
        self._value = multiprocessing.get_context("spawn").RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._value.value = True

    def is_set(self) -> bool:
        return bool(self._value.value)


class WorkerPoolService(Service):
    """
    A dedicated, bounded thread pool with the lifetime of the service.

    Not the reactor's shared pool: that one also serves DNS and other users, and a long
    job there would stall them.
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


class ProcessPoolService(Service):
    """
    A bounded pool of worker processes with the lifetime of the service.

    For work that is mostly Python or runs native decoders on untrusted input: a worker
    process has its own GIL, so it never slows the threads that answer DICOM peers, and
    when a native library crashes on hostile data only that worker dies. The pool is then
    rebuilt and the jobs it held fail with :class:`BrokenProcessPool`; the caller decides
    whether to retry them.

    Workers are started with ``spawn``: forking a process that runs the reactor and
    pynetdicom's threads could copy a lock in a held state.
    """

    log = Logger(namespace="imageshare.workers")

    def __init__(
        self,
        name: str,
        size: int,
        reactor: Any,
        *,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.setName(name)
        self.size = size
        self._reactor = reactor
        self._initializer = initializer
        self._initargs = initargs
        self._executor: ProcessPoolExecutor | None = None
        self._broken: list[ProcessPoolExecutor] = []

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=self._initializer,
            initargs=self._initargs,
        )

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run the picklable ``f(*args)`` in a worker; the Deferred fires on the reactor thread."""
        if self._executor is None:
            raise RuntimeError(f"{self.name} is not running")
        executor = self._executor
        d: Deferred[T] = Deferred()
        try:
            future = executor.submit(f, *args)
        except BrokenProcessPool as e:
            self._replace(executor)
            d.errback(e)
            return d

        def done(fut: Future[T]) -> None:
            # Runs in the executor's management thread: only hand over to the reactor.
            self._reactor.callFromThread(self._fire, d, fut, executor)

        future.add_done_callback(done)
        return d

    def _fire(self, d: Deferred[T], fut: Future[T], executor: ProcessPoolExecutor) -> None:
        exc = fut.exception()
        if exc is None:
            d.callback(fut.result())
            return
        if isinstance(exc, BrokenProcessPool):
            self._replace(executor)
        d.errback(exc)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is not broken or not self.running:
            return  # already replaced (every job of the broken pool reports it)
        self.log.error("a {name} worker process died; starting a new pool", name=self.name)
        self._executor = self._new_executor()
        # A surviving worker of a broken pool can be left waiting on its queue, and the
        # executor's management thread (and interpreter exit after it) then waits for it
        # for ever. Stop the survivors now, and make sure again at stop.
        _stop_workers(broken, kill=False)
        broken.shutdown(wait=False, cancel_futures=True)
        self._broken.append(broken)

    def startService(self) -> None:
        super().startService()
        self._executor = self._new_executor()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        executor, self._executor = self._executor, None

        broken, self._broken = self._broken, []

        def shutdown() -> None:
            for b in broken:
                _stop_workers(b, kill=True)
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

        # Waiting for workers blocks: do it off the reactor.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), shutdown)


def _stop_workers(executor: ProcessPoolExecutor, *, kill: bool) -> None:
    """Terminate (or kill) the worker processes of an executor that are still alive."""
    # The executor keeps no public handle on its processes.
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill() if kill else process.terminate()
            if kill:
                process.join(5)
