"""The thread-to-reactor bridge: notify, call with timeout, shutdown guard."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from imageshare.protocols.dicom.bridge import BridgeStopped, BridgeTimeout, ReactorBridge


@pytest_twisted.ensureDeferred
async def test_notify_runs_on_the_reactor_thread(reactor) -> None:
    """notify() from a thread runs the callable on the reactor thread."""
    bridge = ReactorBridge(reactor)
    seen: defer.Deferred[str] = defer.Deferred()
    await threads.deferToThread(bridge.notify, lambda v: seen.callback(threading.current_thread().name), 1)
    name = await seen
    assert name == threading.main_thread().name


@pytest_twisted.ensureDeferred
async def test_call_returns_deferred_results(reactor) -> None:
    """call() waits for a Deferred result and re-raises failures in the caller's thread."""
    bridge = ReactorBridge(reactor)

    def later(v: int) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        reactor.callLater(0.01, d.callback, v * 2)
        return d

    assert await threads.deferToThread(bridge.call, later, 21, timeout=5) == 42

    def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        await threads.deferToThread(bridge.call, boom, timeout=5)


@pytest_twisted.ensureDeferred
async def test_call_times_out(reactor) -> None:
    """A Deferred that never fires gives BridgeTimeout, not a hung thread."""
    bridge = ReactorBridge(reactor)
    with pytest.raises(BridgeTimeout):
        await threads.deferToThread(bridge.call, defer.Deferred, timeout=0.2)


@pytest_twisted.ensureDeferred
async def test_stop_releases_waiters_and_refuses_new_work(reactor) -> None:
    """stop() releases a waiting thread with BridgeStopped; later calls are refused."""
    bridge = ReactorBridge(reactor)
    waiting = threads.deferToThread(bridge.call, defer.Deferred, timeout=30)
    await deferLater(reactor, 0.1)
    bridge.stop()
    with pytest.raises(BridgeStopped):
        await waiting
    with pytest.raises(BridgeStopped):
        await threads.deferToThread(bridge.call, lambda: 1, timeout=1)
    assert bridge.notify(lambda: None) is False


def test_call_on_reactor_thread_is_refused(reactor) -> None:
    """call() on the reactor thread raises instead of deadlocking."""
    bridge = ReactorBridge(reactor)
    with pytest.raises(RuntimeError):
        bridge.call(lambda: 1, timeout=1)


def deferLater(reactor, seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
