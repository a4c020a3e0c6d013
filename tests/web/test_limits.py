"""Receive bounds: request bodies by path, deadlines, connection caps, the Server header."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import directlyProvides

from imageshare.conncaps import ConnectionCaps
from imageshare.web.connections import HTTP_REFUSAL, CappedFactory
from imageshare.web.limits import BodyLimits, HttpLimits
from imageshare.web.root import QuietSite

KIB = 1024


# -- the pure rules ---------------------------------------------------------------------------


def test_body_limit_by_longest_path_prefix_segment_by_segment() -> None:
    """A prefix covers its subtree only (not a longer name), the longest wins, quoting is undone."""
    limits = BodyLimits(100, {"/jpip": 1000, "/xds": 5000, "/xds/registry": 7000})
    assert limits.limit_for(b"/jpip") == 1000
    assert limits.limit_for(b"/jpip?target=x&len=5") == 1000
    assert limits.limit_for(b"/%6Apip") == 1000  # as twisted.web resolves it
    assert limits.limit_for(b"/jpipx") == 100
    assert limits.limit_for(b"/xds/repository") == 5000
    assert limits.limit_for(b"/xds/registry/") == 7000
    assert limits.limit_for(b"/xdsfoo") == 100
    assert limits.limit_for(b"/") == 100
    assert limits.limit_for(b"*") == 100
    with pytest.raises(ValueError):
        BodyLimits(1, {"jpip": 5})


# -- the channel --------------------------------------------------------------------------------


class Recorder(Resource):
    """Answers every method with ``ok`` and records what body it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        self.bodies.append(request.content.read())
        return b"ok"


class Held(Resource):
    """Answers nothing until told: a response that takes as long as it takes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        request.write(b"first part of a long response")
        return NOT_DONE_YET


LIMITS = HttpLimits(
    bodies=BodyLimits(100, {"/big": 1000}), header_timeout=20.0, body_timeout=30.0, idle_timeout=60.0
)


def connect(resource: Resource, limits: HttpLimits = LIMITS) -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    site = QuietSite(resource, request_log=False, limits=limits, reactor=clock)
    peer = IPv4Address("TCP", "192.0.2.7", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    return channel, transport, clock


def head(target: bytes, *headers: bytes, method: bytes = b"POST") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: x\r\n" % (method, target) + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def status_line(transport: StringTransport) -> bytes:
    return transport.value().split(b"\r\n", 1)[0]


def test_content_length_over_the_limit_gets_413_before_any_body_and_instead_of_100() -> None:
    """The limit is checked on the headers: nothing is spooled, no 100 Continue, then close."""
    resource = Recorder()
    channel, transport, _ = connect(resource)
    channel.dataReceived(head(b"/", b"Content-Length: 101", b"Expect: 100-continue"))
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply
    assert b"\r\nConnection: close\r\n" in reply and b"\r\nServer: ImageShare\r\n" in reply
    assert reply.endswith(b"\r\n\r\nrequest body larger than 100 bytes\n")
    assert transport.disconnecting
    assert channel.requests[-1].content is None  # Twisted never made a spool for it
    channel.dataReceived(b"x" * 101)  # whatever is still on its way is not read
    assert resource.bodies == [] and transport.value() == reply


def test_a_refused_body_still_on_its_way_is_discarded_then_the_connection_closes() -> None:
    """Without Expect the client sends its body anyway; reading the 413 only once it has sent
    everything (as urllib does), it must not meet a closed socket. The body is discarded
    (never kept) and the connection closes as soon as all of it is in, or after 10 s."""
    resource = Recorder()
    channel, transport, clock = connect(resource)
    channel.dataReceived(head(b"/", b"Content-Length: 500") + b"x" * 200)
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 413 ") and not transport.disconnecting
    channel.dataReceived(b"x" * 299)
    assert not transport.disconnecting and channel.requests[-1].content is None
    channel.dataReceived(b"x")
    assert transport.disconnecting and transport.value() == reply and resource.bodies == []
    channel, transport, clock = connect(resource)
    channel.dataReceived(head(b"/", b"Content-Length: 500") + b"x" * 10)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


def test_body_limit_follows_the_path_and_applies_to_get() -> None:
    """/big takes 1000 bytes, the rest 100; a GET with a body is held to the same limits."""
    resource = Recorder()
    channel, transport, _ = connect(resource)
    channel.dataReceived(head(b"/big/x", b"Content-Length: 1000", b"Expect: 100-continue") + b"b" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    assert resource.bodies == [b"b" * 1000]
    channel, transport, _ = connect(resource)
    channel.dataReceived(head(b"/small", b"Content-Length: 1000", method=b"GET"))
    assert status_line(transport) == b"HTTP/1.1 413 Content Too Large"


def test_chunked_body_is_cut_as_soon_as_its_count_passes_the_limit() -> None:
    """Decoded bytes are counted; the chunk that passes the limit is not kept, nor is the rest,
    and a body end in the same read does not reach the resource."""
    resource = Recorder()
    channel, transport, clock = connect(resource)
    channel.dataReceived(head(b"/", b"Transfer-Encoding: chunked"))
    channel.dataReceived(b"3c\r\n" + b"a" * 60 + b"\r\n")
    assert transport.value() == b""
    request = channel.requests[-1]
    channel.dataReceived(b"3c\r\n" + b"b" * 60 + b"\r\n" + b"5\r\nccccc\r\n0\r\n\r\n")
    assert status_line(transport) == b"HTTP/1.1 413 Content Too Large"
    assert request.content.tell() == 60  # the first chunk only
    assert resource.bodies == []
    clock.advance(10)  # what the client still sends is discarded for a while, then it is closed
    assert transport.disconnecting


def test_chunked_body_within_the_limit_is_served() -> None:
    """A chunked body at exactly the limit goes through."""
    resource = Recorder()
    channel, transport, _ = connect(resource)
    channel.dataReceived(head(b"/", b"Transfer-Encoding: chunked") + b"64\r\n" + b"a" * 100 + b"\r\n0\r\n\r\n")
    assert status_line(transport) == b"HTTP/1.1 200 OK" and resource.bodies == [b"a" * 100]


def test_headers_trickled_line_by_line_are_cut_at_the_header_deadline() -> None:
    """Every byte used to restart Twisted's timeout; the deadline runs from the first byte: 408."""
    resource = Recorder()
    channel, transport, clock = connect(resource)
    clock.advance(5)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for i in range(1, 4):
        clock.advance(6)  # 18 s since the first byte
        channel.dataReceived(b"X-Line-%d: y\r\n" % i)
        assert transport.value() == b""
    clock.advance(2)
    assert status_line(transport) == b"HTTP/1.1 408 Request Timeout"
    assert b"\r\nConnection: close\r\n" in transport.value() and transport.disconnecting
    channel.dataReceived(b"\r\n")
    assert resource.bodies == []


def test_body_deadline_runs_from_the_end_of_the_headers() -> None:
    """A body that trickles in is cut body_timeout after its headers."""
    resource = Recorder()
    channel, transport, clock = connect(resource)
    channel.dataReceived(head(b"/", b"Content-Length: 50"))
    for _ in range(29):
        clock.advance(1)
        channel.dataReceived(b"z")
    assert transport.value() == b""
    clock.advance(1)
    assert status_line(transport) == b"HTTP/1.1 408 Request Timeout"
    assert resource.bodies == []


def test_idle_connection_is_closed_without_an_answer() -> None:
    """No request in progress: closed after idle_timeout, from the connection or the last answer."""
    resource = Recorder()
    channel, transport, clock = connect(resource)
    clock.advance(59)
    assert not transport.disconnecting
    channel.dataReceived(head(b"/", method=b"GET"))  # answered at once
    answered = transport.value()
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting and transport.value() == answered  # closed, no 408


def test_idle_deadline_waits_while_the_last_response_is_still_being_sent() -> None:
    """A finished response the transport has not sent yet (the client reads slowly) is not
    idling; once the transport has drained, the idle deadline runs again."""
    channel, transport, clock = connect(Recorder())
    channel.dataReceived(head(b"/", method=b"GET"))
    channel.pauseProducing()  # the transport's buffer is full of the response
    clock.advance(600)
    assert not transport.disconnecting
    channel.resumeProducing()
    clock.advance(60)
    assert transport.disconnecting


def test_stray_crlf_between_requests_starts_no_header_deadline() -> None:
    """A CRLF after a body (old browsers send one) is no request: the idle deadline still applies."""
    channel, transport, clock = connect(Recorder())
    channel.dataReceived(b"\r\n")
    clock.advance(59)
    assert transport.value() == b""
    clock.advance(1)
    assert transport.disconnecting and transport.value() == b""


def test_a_long_response_is_not_cut_and_the_next_request_gets_its_own_deadline() -> None:
    """While a request is answered no receive deadline runs, however long; a pipelined
    request's head deadline starts when Twisted turns to it."""
    resource = Held()
    channel, transport, clock = connect(resource)
    channel.dataReceived(head(b"/", method=b"GET") + b"GET /next HTTP/1.1\r\n")  # the second is incomplete
    clock.advance(3600)
    assert not transport.disconnecting and b"408" not in transport.value()
    resource.requests[0].finish()
    clock.advance(19)
    assert b"408" not in transport.value()
    clock.advance(1)
    assert transport.value().split(b"\r\n0\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 408 ")


def test_a_client_that_does_not_read_the_408_is_aborted() -> None:
    """After an answer written by the channel, the close waits for the client only so long."""
    channel, transport, clock = connect(Recorder())
    channel.dataReceived(b"GET / HT")
    clock.advance(20)
    assert transport.disconnecting and not transport.disconnected
    clock.advance(channel.abortTimeout)
    assert transport.disconnected  # StringTransport: abortConnection was called


def test_deadline_and_body_refusals_are_logged_at_most_once_per_address_per_10_s() -> None:
    """Many 413s from one address make one log line, then one with a count."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    clock = Clock()
    site = QuietSite(Recorder(), request_log=False, limits=LIMITS, reactor=clock)
    try:
        for i in range(30):
            peer = IPv4Address("TCP", "192.0.2.9", 1000 + i)
            channel = site.buildProtocol(peer)
            channel.makeConnection(StringTransport(peerAddress=peer))
            channel.dataReceived(head(b"/", b"Content-Length: 999"))
            clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("limit") == 100 and e.get("address") == "192.0.2.9"]
    assert [e["count"] for e in lines] == [1, 20]


def test_server_header_names_no_version_on_any_response() -> None:
    """Pages, Twisted's error pages and 500s say ``Server: ImageShare``, never TwistedWeb/x.y."""

    class Broken(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            raise RuntimeError("bug")

    root = Resource()
    root.putChild(b"ok", Recorder())
    root.putChild(b"broken", Broken())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for target in (b"/ok", b"/missing", b"/broken"):
            channel, transport, _ = connect(root)
            channel.dataReceived(head(target, method=b"GET"))
            headers = transport.value().split(b"\r\n\r\n", 1)[0]
            assert b"\r\nServer: ImageShare\r\n" in headers + b"\r\n", target
            assert b"Twisted" not in headers
    finally:
        globalLogPublisher.removeObserver(events.append)
    for e in events:
        if "log_failure" in e:
            e["log_failure"].cleanFailure()


# -- request line and head length ---------------------------------------------------------------

SHORT_LINES = HttpLimits(bodies=BodyLimits(100), max_request_line=200, header_bytes=300)


def request_line_of(size: int) -> bytes:
    """A GET request line of exactly ``size`` bytes (CRLF not counted)."""
    start, end = b"GET /", b" HTTP/1.1"
    return start + b"a" * (size - len(start) - len(end)) + end


def test_request_line_at_the_limit_is_served_one_byte_more_gets_414() -> None:
    """``max_request_line`` bytes are a request; one more is 414 with Connection: close."""
    channel, transport, _ = connect(Recorder(), SHORT_LINES)
    channel.dataReceived(request_line_of(200) + b"\r\nHost: x\r\n\r\n")
    assert status_line(transport) == b"HTTP/1.1 200 OK"
    channel, transport, _ = connect(Recorder(), SHORT_LINES)
    channel.dataReceived(request_line_of(201) + b"\r\nHost: x\r\n\r\n")
    reply = transport.value()
    assert status_line(transport) == b"HTTP/1.1 414 URI Too Long"
    assert b"\r\nConnection: close\r\n" in reply and b"\r\nServer: ImageShare\r\n" in reply
    assert reply.endswith(b"\r\n\r\nrequest line longer than 200 bytes\n")
    assert transport.disconnecting  # the head's end was in the same read


@pytest.mark.parametrize("size", [20 * KIB, 64 * KIB, 1024 * KIB])
@pytest.mark.parametrize("chunk", [1000, 65536])
def test_long_request_line_is_refused_at_every_length_holding_no_more_than_the_limit(size: int, chunk: int) -> None:
    """Twisted's line limit used to close without an answer. Now 414 comes as soon as the
    line passes the limit, without waiting for its end; the channel's line buffer never
    holds more than the limit; the rest of the head is read and dropped, and the connection
    closes once the head's blank line has gone by (so the client can read the answer)."""
    resource = Recorder()
    channel, transport, _ = connect(resource, SHORT_LINES)
    data = request_line_of(size) + b"\r\nHost: x\r\nX-After: y\r\n\r\n"
    held = 0
    for i in range(0, len(data) - 2, chunk):
        channel.dataReceived(data[i : min(i + chunk, len(data) - 2)])
        held = max(held, len(channel._buffer))  # LineReceiver's pending line
        assert status_line(transport) == b"HTTP/1.1 414 URI Too Long"
        assert not transport.disconnecting  # the head is not over yet
    assert held <= 200 + 1
    reply = transport.value()
    channel.dataReceived(b"\r\n")
    assert transport.disconnecting and transport.value() == reply and resource.bodies == []


def test_refused_head_that_never_ends_is_closed_after_10_s() -> None:
    """A client that goes on sending one endless line is discarded for 10 s, then closed."""
    channel, transport, clock = connect(Recorder(), SHORT_LINES)
    channel.dataReceived(b"GET /" + b"a" * 1000)
    assert status_line(transport) == b"HTTP/1.1 414 URI Too Long"
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"a" * 100_000)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_head_over_its_limit_gets_431_one_long_line_or_many() -> None:
    """Request line plus headers over ``max_head`` (500 here) get 431, whether one header
    line is too long (even before its end arrives) or many short ones add up; exactly the
    limit is served."""
    line = request_line_of(100)  # + "Host: x" (7) leaves 393 bytes of further header lines
    too_long = b"431 Request Header Fields Too Large"
    for extra, status in ((b"X: " + b"v" * 390, b"200 OK"), (b"X: " + b"v" * 391, too_long)):
        channel, transport, _ = connect(Recorder(), SHORT_LINES)
        channel.dataReceived(line + b"\r\nHost: x\r\n" + extra + b"\r\n\r\n")
        assert status_line(transport) == b"HTTP/1.1 " + status, len(extra)
    channel, transport, _ = connect(Recorder(), SHORT_LINES)
    channel.dataReceived(line + b"\r\nHost: x\r\n" + b"".join(b"X-%03d: v\r\n" % i for i in range(60)))
    assert status_line(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"\r\nConnection: close\r\n" in transport.value() and not transport.disconnecting
    channel.dataReceived(b"X-Last: v\r\n\r\n")
    assert transport.disconnecting
    channel, transport, _ = connect(Recorder(), SHORT_LINES)
    channel.dataReceived(line + b"\r\nX-Long: " + b"v" * 600)  # no end yet
    assert status_line(transport) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert len(channel._buffer) == 0


def test_pipelined_request_with_a_long_line_gets_414_after_the_answer_before_it() -> None:
    """A request before the over-long one is answered first; then 414 and the close."""
    resource = Recorder()
    channel, transport, _ = connect(resource, SHORT_LINES)
    channel.dataReceived(head(b"/first", method=b"GET") + request_line_of(5000) + b"\r\n\r\n")
    first, second = transport.value().split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and second.startswith(b"414 URI Too Long")
    assert transport.disconnecting and len(resource.bodies) == 1


def test_default_limits_answer_16_kib_request_lines_and_refuse_longer() -> None:
    """The defaults keep what Twisted served (a 16384-byte request line, now with headers
    beside it) and answer 414 past it instead of closing silently."""
    channel, transport, _ = connect(Recorder(), HttpLimits())
    channel.dataReceived(request_line_of(16384) + b"\r\nHost: x\r\nX-Pad: " + b"p" * 8000 + b"\r\n\r\n")
    assert status_line(transport) == b"HTTP/1.1 200 OK"
    channel, transport, _ = connect(Recorder(), HttpLimits())
    channel.dataReceived(request_line_of(16385) + b"\r\n\r\n")
    assert status_line(transport) == b"HTTP/1.1 414 URI Too Long"


def test_long_line_refusals_are_logged_at_most_once_per_address_per_10_s() -> None:
    """A flood of 414s from one address makes one line, then one with the count."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    clock = Clock()
    site = QuietSite(Recorder(), request_log=False, limits=SHORT_LINES, reactor=clock)
    try:
        for i in range(30):
            peer = IPv4Address("TCP", "192.0.2.10", 1000 + i)
            channel = site.buildProtocol(peer)
            channel.makeConnection(StringTransport(peerAddress=peer))
            channel.dataReceived(request_line_of(300) + b"\r\n\r\n")
            clock.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("address") == "192.0.2.10" and e.get("limit") == 200]
    assert [e["count"] for e in lines] == [1, 20]


# -- connection caps ----------------------------------------------------------------------------


class Echo(Protocol):
    """Records its transport and what it hears."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.SEND_LIMIT = 1234  # as the HTTP channel tunes its transport

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


class TcpTransport(StringTransport):
    SEND_LIMIT = 131072


def open_from(factory: CappedFactory, host: str, port: int = 5000, tls: bool = False) -> tuple[Any, TcpTransport]:
    address = IPv4Address("TCP", host, port)
    protocol = factory.buildProtocol(address)
    transport = TcpTransport(peerAddress=address)
    if tls:
        directlyProvides(transport, ISSLTransport)
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.fixture
def capped() -> Iterator[tuple[CappedFactory, list[dict[str, Any]], Clock]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    clock = Clock()
    try:
        yield CappedFactory(Factory.forProtocol(Echo), ConnectionCaps(4, 2), clock, label="test",
                            refusal=HTTP_REFUSAL), events, clock
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_connections_over_the_per_address_cap_are_refused_at_once(capped: Any) -> None:
    """The third connection from one address gets a 503 and is closed; another address is
    admitted; a closed connection frees its slot."""
    factory, _, _ = capped
    first, _ = open_from(factory, "198.51.100.1")
    open_from(factory, "198.51.100.1")
    refused, transport = open_from(factory, "198.51.100.1")
    assert transport.value() == HTTP_REFUSAL and transport.disconnecting
    assert HTTP_REFUSAL.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in HTTP_REFUSAL
    _, other = open_from(factory, "198.51.100.2")
    assert other.value() == b"" and not other.disconnecting
    first.connectionLost(Failure(ConnectionError()))
    _, again = open_from(factory, "198.51.100.1")
    assert not again.disconnecting
    assert factory.caps.open == 3


def test_connections_over_the_total_cap_are_refused(capped: Any) -> None:
    """The total cap holds whatever the addresses."""
    factory, _, _ = capped
    for i in range(4):
        open_from(factory, f"198.51.100.{i}")
    _, transport = open_from(factory, "198.51.100.99")
    assert transport.disconnecting and transport.value() == HTTP_REFUSAL


def test_a_refused_tls_connection_is_aborted_without_an_answer(capped: Any) -> None:
    """An answer over TLS would wait for a handshake the client may never finish."""
    factory, _, _ = capped
    for _ in range(2):
        open_from(factory, "198.51.100.1", tls=True)
    _, transport = open_from(factory, "198.51.100.1", tls=True)
    assert transport.disconnected and transport.value() == b""


def test_admitted_protocol_talks_to_the_real_transport(capped: Any) -> None:
    """No wrapper between the protocol and its transport: tuning (SEND_LIMIT) and producer
    registration reach the transport; data and connectionLost still reach the protocol."""
    factory, _, _ = capped
    admitted, transport = open_from(factory, "198.51.100.1")
    echo = admitted.protocol
    assert echo.transport is transport and transport.SEND_LIMIT == 1234
    admitted.dataReceived(b"hello")
    admitted.connectionLost(Failure(ConnectionError()))
    assert echo.received == b"hello" and echo.lost and factory.caps.open == 0
    admitted.connectionLost(Failure(ConnectionError()))  # a second notice releases nothing
    assert factory.caps.open == 0


def test_refusals_are_logged_at_most_once_per_address_every_10_s(capped: Any) -> None:
    """A flood of refused connections makes one line per address and 10 s, with a count."""
    factory, events, clock = capped
    for _ in range(2):
        open_from(factory, "203.0.113.5")
    for _ in range(500):
        open_from(factory, "203.0.113.5")
        clock.advance(0.01)
    clock.advance(10)
    open_from(factory, "203.0.113.5")
    lines = [e for e in events if e.get("address") == "203.0.113.5"]
    assert [e["count"] for e in lines] == [1, 500]
    assert lines[0]["which"] == "per-address" and lines[0]["cap"] == 2


def test_open_files_limit_is_raised_and_a_shortfall_is_logged() -> None:
    """The soft RLIMIT_NOFILE goes up to the hard one; caps beyond it are reported, not fatal."""
    import resource

    from imageshare.web.connections import ensure_open_files, raise_open_files_limit

    soft, hard = raise_open_files_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        ensure_open_files(10**9)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("needed") == 10**9 and e["log_level"].name == "warn" for e in events) or soft == -1
