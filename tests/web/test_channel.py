"""The scanning HTTP channel: requests numbered on arrival, early notice, Twisted unchanged."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from imageshare.web.pipeline import ScannedRequest
from imageshare.web.root import QuietSite


class Held(Resource):
    """Answers nothing until told: the next pipelined request waits in Twisted's buffer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


def connect(site: QuietSite) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_pipelined_requests_are_numbered_and_reported_while_the_first_is_open() -> None:
    resource = Held()
    site = QuietSite(resource, request_log=False, reactor=Clock())
    seen: list[tuple[bytes, int]] = []
    site.observers.append(lambda r, n: seen.append((r.target, n)))
    channel, transport = connect(site)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [(b"/a", 1), (b"/b", 2)]  # /b is known although Twisted holds it back
    assert [r.arrival for r in resource.requests] == [1]
    channel.dataReceived(b"GET /c HTTP/1.1\r\nHo")
    channel.dataReceived(b"st: x\r\n\r\n")
    assert seen[-1] == (b"/c", 3)
    resource.requests[0].finish()  # Twisted now replays /b and /c: not numbered again
    assert [r.arrival for r in resource.requests] == [1, 2]
    resource.requests[1].finish()
    assert [r.arrival for r in resource.requests] == [1, 2, 3] and len(seen) == 3
    assert transport.value().count(b"HTTP/1.1 200") == 2


def test_observer_failure_is_logged_not_fatal() -> None:
    resource = Held()
    site = QuietSite(resource, request_log=False, reactor=Clock())

    def broken(r: ScannedRequest, n: int) -> None:
        raise RuntimeError("observer bug")

    site.observers.append(broken)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel, _ = connect(site)
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(resource.requests) == 1  # served all the same
    failures = [e for e in events if "log_failure" in e]
    assert failures and failures[0]["log_failure"].check(RuntimeError)
    for f in failures:
        f["log_failure"].cleanFailure()


def test_unscannable_framing_still_numbers_requests() -> None:
    """A chunked request body stops the scanner; requests still get arrival numbers."""
    resource = Held()
    site = QuietSite(resource, request_log=False, reactor=Clock())
    channel, _ = connect(site)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert resource.requests[0].arrival == 1


def test_pull_producer_registered_while_the_transport_is_full_starts_paused() -> None:
    """Twisted would start it unpaused and fail with NotPaused at the next resume."""
    resource = Held()
    site = QuietSite(resource, request_log=False, reactor=Clock())
    channel, _ = connect(site)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    request = resource.requests[0]
    channel.pauseProducing()  # the transport's buffer is full

    class Pull:
        calls = 0

        def resumeProducing(self) -> None:
            self.calls += 1

        def stopProducing(self) -> None:
            pass

    pull = Pull()
    request.registerProducer(pull, False)
    channel.resumeProducing()  # must not raise NotPaused
    request.unregisterProducer()
