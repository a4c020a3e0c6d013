"""
The one crossing between pynetdicom's threads and the Twisted reactor.

pynetdicom runs every association in a thread of its own; Twisted objects may only be
touched from the reactor thread. Association threads therefore never call Twisted code
directly: they hand a callable to :meth:`ReactorBridge.notify` (fire and forget) or
:meth:`ReactorBridge.call` (wait for a result, with a timeout). Once the bridge is stopped,
both refuse new work and every waiting caller is released with :class:`BridgeStopped`, so
no association thread can hang on a reactor that is going away.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python import threadable
from twisted.python.failure import Failure

from imageshare.logsafe import Logger

T = TypeVar("T")


class BridgeStopped(Exception):
    """The reactor side is shutting down; the work was not done."""


class BridgeTimeout(Exception):
    """The reactor side did not answer in time."""


class ReactorBridge:
    """Runs callables on the reactor thread on behalf of other threads."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopped = False
        self._lock = threading.Lock()
        self._waiting: set[queue.SimpleQueue[tuple[bool, Any]]] = set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def notify(self, f: Callable[..., Any], *args: Any) -> bool:
        """Schedule ``f(*args)`` on the reactor; ``False`` if the bridge is stopped."""
        if self._stopped:
            return False
        reactor: IReactorFromThreads = self._reactor
        reactor.callFromThread(self._run_logged, f, args)
        return True

    def _run_logged(self, f: Callable[..., Any], args: tuple[Any, ...]) -> None:
        d = maybeDeferred(f, *args)
        d.addErrback(
            lambda failure: self.log.failure("notification {name} failed", failure, name=getattr(f, "__name__", "?"))
        )

    def call(self, f: Callable[..., T | Deferred[T]], *args: Any, timeout: float) -> T:
        """
        Run ``f(*args)`` on the reactor and wait for its (possibly Deferred) result.

        Raises
        ------
        BridgeStopped
            The bridge is stopped or stops while waiting.
        BridgeTimeout
            No result within ``timeout`` seconds (the Deferred is cancelled).
        RuntimeError
            Called on the reactor thread itself, which would deadlock.
        """
        if threadable.isInIOThread():
            raise RuntimeError("ReactorBridge.call on the reactor thread would deadlock")
        box: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        with self._lock:
            if self._stopped:
                raise BridgeStopped("the server is shutting down")
            self._waiting.add(box)
        try:
            self._reactor.callFromThread(self._start, box, f, args, timeout)
            try:
                ok, value = box.get(timeout=timeout + 1.0)
            except queue.Empty:
                raise BridgeTimeout(f"no answer within {timeout} s") from None
        finally:
            with self._lock:
                self._waiting.discard(box)
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _start(self, box: queue.SimpleQueue[tuple[bool, Any]], f: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> None:
        if self._stopped:
            box.put((False, BridgeStopped("the server is shutting down")))
            return
        clock: IReactorTime = self._reactor
        d = maybeDeferred(f, *args)
        d.addTimeout(timeout, clock)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                exc = result.value
                if result.check(DeferredTimeout):
                    exc = BridgeTimeout(f"no answer within {timeout} s")
                box.put((False, exc))
            else:
                box.put((True, result))

        d.addBoth(done)

    def stop(self) -> None:
        """Refuse new work and release every waiting thread with :class:`BridgeStopped`."""
        with self._lock:
            self._stopped = True
            waiting = list(self._waiting)
        for box in waiting:
            box.put((False, BridgeStopped("the server is shutting down")))
