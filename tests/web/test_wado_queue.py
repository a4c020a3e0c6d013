"""WADO-URI and RAD-69 over the shared fair queue: per-client refusal and dropped work."""

from __future__ import annotations

import io
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from imageshare.fairqueue import FairQueue
from imageshare.web import rad69
from imageshare.web.wado import Answer, WadoResource

QUERY = b"requestType=WADO&studyUID=1.2.3&seriesUID=1.2.4&objectUID=1.2.5"


class HeldPool:
    """Runs nothing until the test finishes a job; ``calls`` are the jobs handed to it."""

    size = 1

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append((f, args, Deferred()))
        return self.calls[-1][2]

    def finish(self, i: int) -> None:
        f, args, d = self.calls[i]
        d.callback(f(*args))


def soap_post(host: str) -> DummyRequest:
    request = DummyRequest([])
    request.method = b"POST"
    request.content = io.BytesIO(b"<request/>")  # the handler here does not read it
    request.client = IPv4Address("TCP", host, 40001)
    return request


def wado_request(host: str) -> DummyRequest:
    request = DummyRequest([])
    request.method = b"GET"
    request.uri = b"/wado?" + QUERY
    request.client = IPv4Address("TCP", host, 40000)
    return request


def test_wado_client_over_its_cap_gets_503_others_are_queued() -> None:
    """A client with max_queue_per_client renderings waiting gets 503 with Retry-After and
    a short reason at once; another address is still queued and answered."""
    pool = HeldPool()
    resource = WadoResource(lambda query, inm: Answer(200, b"img", "image/jpeg"), FairQueue(pool, max_per_client=2))
    flood = [wado_request("10.0.0.2") for _ in range(4)]
    assert [resource.render(r) for r in flood[:3]] == [NOT_DONE_YET] * 3  # one runs, two wait
    refused = flood[3]
    body = resource.render(refused)
    assert refused.responseCode == 503 and refused.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert body == b"this client has 2 requests waiting already; try again\n"
    viewer = wado_request("10.0.0.1")
    assert resource.render(viewer) == NOT_DONE_YET
    for i in range(3):
        pool.finish(i)  # FIFO would have served the whole flood before the viewer
    assert viewer.finished and viewer.written == [b"img"] and not flood[2].finished


def test_wado_request_of_a_client_that_left_is_never_run() -> None:
    """A waiting rendering whose client disconnected is dropped from the queue: the
    retriever never runs for it, and the next request takes its place."""
    pool = HeldPool()
    ran: list[str] = []

    def retriever(query: Any, inm: Any) -> Answer:
        ran.append(query.object_uid)
        return Answer(200, b"img", "image/jpeg")

    resource = WadoResource(retriever, FairQueue(pool, max_per_client=1))
    first, gone, last = (wado_request("10.0.0.2") for _ in range(3))
    resource.render(first)
    resource.render(gone)
    gone.processingFailed(Failure(ConnectionDone()))
    assert resource.render(last) == NOT_DONE_YET  # the place of the one that left is free
    pool.finish(0)
    pool.finish(1)
    assert len(pool.calls) == 2 and ran == ["1.2.5", "1.2.5"]
    assert first.finished and last.finished and not gone.finished and gone.written == []


def test_rad69_shares_the_queue_and_its_cap() -> None:
    """RAD-69 requests wait in the same per-client queue as renderings; over the cap the
    client gets a 503 SOAP Receiver fault with Retry-After."""
    pool = HeldPool()
    queue = FairQueue(pool, max_per_client=1)
    wado = WadoResource(lambda query, inm: Answer(200, b"img", "image/jpeg"), queue)
    retrieve = rad69.Rad69Resource(lambda content_type, body: rad69.Answer(200, "text/plain", b"ok"), queue)
    wado.render(wado_request("10.0.0.2"))
    wado.render(wado_request("10.0.0.2"))
    post = soap_post("10.0.0.2")
    body = retrieve.render(post)
    assert post.responseCode == 503 and post.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert b"Receiver" in body and b"requests waiting" in body
    other = soap_post("10.0.0.1")
    assert retrieve.render(other) == NOT_DONE_YET
    for i in range(3):
        pool.finish(i)
    assert other.finished and other.written == [b"ok"]
