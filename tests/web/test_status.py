"""``/status``: counters as JSON, and a client that leaves during a slow query."""

from __future__ import annotations

import gc
import json
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from imageshare.web.root import QuietSite
from imageshare.web.status import StatusResource


@attrs.frozen
class Counts:
    instances: int = 3


class Catalog:
    def counts(self) -> Counts:
        return Counts()


class SlowPool:
    """A catalog pool whose queries end when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


def get_status(pool: SlowPool) -> tuple[Any, StringTransport]:
    site = QuietSite(StatusResource(Catalog(), pool, started=0.0, now=lambda: 5.0),
                     request_log=False, reactor=Clock())
    peer = IPv4Address("TCP", "192.0.2.1", 1234)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return channel, transport


def test_status_answers_with_the_counts() -> None:
    """A finished query is answered as JSON."""
    pool = SlowPool()
    _, transport = get_status(pool)
    pool.pending[0].callback(Counts())
    head, body = transport.value().split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Server: ImageShare" in head
    assert b'"instances": 3' in body and b'"uptime_s": 5' in body


def test_client_leaving_during_a_slow_query_is_no_error() -> None:
    """Nothing is written to a request whose client left, its query is cancelled, and no
    error is logged, neither then nor when the query would have ended."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pool = SlowPool()
        channel, transport = get_status(pool)
        query = pool.pending[0]
        channel.connectionLost(Failure(ConnectionLost()))
        assert query.called  # cancelled: nothing waits on the pool for it
        gc.collect()  # an unhandled failure in a Deferred would be logged now
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value() == b""
    failures = [e for e in events if "log_failure" in e or e.get("log_level") and e["log_level"].name == "critical"]
    for e in failures:
        if "log_failure" in e:
            e["log_failure"].cleanFailure()
    assert failures == []


def test_status_json_is_valid() -> None:
    """The body parses as JSON with the extra counters merged in."""
    pool = SlowPool()
    site = QuietSite(StatusResource(Catalog(), pool, started=0.0, now=lambda: 1.0,
                                    extra=lambda: {"transcode_queue": 2}), request_log=False, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    pool.pending[0].callback(Counts())
    body = transport.value().split(b"\r\n\r\n", 1)[1]
    chunk = body.split(b"\r\n", 2)[1]  # chunked transfer: one chunk
    assert json.loads(chunk)["transcode_queue"] == 2
