"""The request scanner: request boundaries as Twisted's HTTPChannel finds them, and when it gives up."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageshare.web.pipeline import RequestScanner, RequestStarted, ScannedRequest

GET = b"GET /jpip?cid=X&fsiz=64,64 HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /jpip HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"


def scanned(events: list) -> list[ScannedRequest]:
    return [e for e in events if isinstance(e, ScannedRequest)]


def feed_all(chunks: list[bytes], **limits: int) -> tuple[list, RequestScanner]:
    scanner = RequestScanner(**limits)
    events: list = []
    for chunk in chunks:
        events += scanner.feed(chunk)
    return events, scanner


# --- well-formed input --------------------------------------------------------


def test_single_get() -> None:
    scanner = RequestScanner()
    assert scanner.feed(GET) == [
        RequestStarted(0),
        ScannedRequest(0, b"GET", b"/jpip?cid=X&fsiz=64,64", ((b"host", b"h"),), b""),
    ]
    assert scanner.active


def test_post_with_body() -> None:
    [started, request] = RequestScanner().feed(POST)
    assert started == RequestStarted(0)
    assert request == ScannedRequest(
        0, b"POST", b"/jpip", ((b"host", b"h"), (b"content-length", b"5")), b"hello"
    )


def test_header_names_lowered_values_stripped_order_kept() -> None:
    [_, request] = RequestScanner().feed(
        b"GET / HTTP/1.1\r\nX-B: \t two \t\r\nx-a:one\r\nX-B: three\r\n\r\n"
    )
    assert request.headers == ((b"x-b", b"two"), (b"x-a", b"one"), (b"x-b", b"three"))


def test_started_as_soon_as_request_line_is_complete() -> None:
    scanner = RequestScanner()
    assert scanner.feed(b"GET / HTTP/1.1") == []  # the CRLF is still missing
    assert scanner.feed(b"\r") == []
    assert scanner.feed(b"\nHost: h\r\n") == [RequestStarted(0)]
    assert scanner.feed(b"\r\n") == [ScannedRequest(0, b"GET", b"/", ((b"host", b"h"),), b"")]


def test_body_pending_until_content_length_bytes() -> None:
    scanner = RequestScanner()
    assert scanner.feed(POST[:-2]) == [RequestStarted(0)]
    assert scanner.feed(POST[-2:] + b"GET") == [scanned(RequestScanner().feed(POST))[0]]


def test_pipelined_requests_in_one_feed() -> None:
    events = RequestScanner().feed(GET + POST + GET)
    assert [type(e) for e in events] == [RequestStarted, ScannedRequest] * 3
    assert [e.index for e in events] == [0, 0, 1, 1, 2, 2]
    assert [r.method for r in scanned(events)] == [b"GET", b"POST", b"GET"]
    assert scanned(events)[1].body == b"hello"


def test_byte_by_byte() -> None:
    stream = GET + POST + b"\r\n" + GET
    events, scanner = feed_all([stream[i : i + 1] for i in range(len(stream))])
    assert events == RequestScanner().feed(stream)
    assert len(scanned(events)) == 3 and scanner.active


def test_body_bytes_that_look_like_http_are_body() -> None:
    body = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    stream = b"PUT /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) + GET
    events = RequestScanner().feed(stream)
    assert [r.body for r in scanned(events)] == [body, b""]


def test_one_extra_crlf_before_a_request_is_eaten() -> None:
    events, scanner = feed_all([b"\r\n" + POST, b"\r\n", GET, b"\r\n" + GET])
    assert [r.method for r in scanned(events)] == [b"POST", b"GET", b"GET"]
    assert [e.index for e in events] == [0, 0, 1, 1, 2, 2]
    assert scanner.active


def test_bare_lf_does_not_end_a_line() -> None:
    scanner = RequestScanner()
    assert scanner.feed(b"GET / HTTP/1.1\nHost: h\n\n") == []
    assert scanner.active
    assert scanner.feed(b"\r\n") == []  # one line with four space-separated parts
    _assert_gave_up(scanner)


def test_continuation_lines_join_with_one_space() -> None:
    [_, request] = RequestScanner().feed(
        b"GET / HTTP/1.1\r\nX-Long: a\r\n   b\r\n\t \tc \r\nHost: h\r\n\r\n"
    )
    assert request.headers == ((b"x-long", b"a b c"), (b"host", b"h"))


def test_continued_content_length_counts() -> None:
    # The joined value is what Twisted checks, so "Content-Length: 1\r\n 2" is "1 2": bad.
    scanner = RequestScanner()
    assert scanner.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\n 2\r\n\r\n") == [RequestStarted(0)]
    assert not scanner.active


def test_transfer_encoding_identity_is_followed() -> None:
    events = RequestScanner().feed(
        b"POST / HTTP/1.1\r\nTransfer-Encoding: Identity\r\nContent-Length: 2\r\n\r\nok" + GET
    )
    assert [r.body for r in scanned(events)] == [b"ok", b""]


@pytest.mark.parametrize("connection", [b"keep-alive", b"Upgrade", b"closed"])
def test_connection_other_than_close_stays_active(connection: bytes) -> None:
    events, scanner = feed_all([b"GET / HTTP/1.1\r\nConnection: %s\r\n\r\n" % connection + GET])
    assert len(scanned(events)) == 2 and scanner.active


# --- split invariance ---------------------------------------------------------

_header = st.tuples(
    st.sampled_from([b"Host", b"X-A", b"accept", b"Cache-Control"]),
    st.binary(max_size=8).map(lambda b: b.translate(None, b"\0\r\n")),
)


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=40))
    lines = [b"%s /p%d HTTP/1.1" % (draw(st.sampled_from([b"GET", b"POST"])), draw(st.integers(0, 99)))]
    lines += [b"%s: %s" % h for h in draw(st.lists(_header, max_size=4))]
    if body or draw(st.booleans()):
        lines.insert(draw(st.integers(1, len(lines))), b"Content-Length: %d" % len(body))
    if draw(st.booleans()):
        lines.append(b"X-Folded: a\r\n\t b")
    return draw(st.sampled_from([b"", b"\r\n"])) + b"\r\n".join(lines) + b"\r\n\r\n" + body


_stream = st.lists(_request(), min_size=1, max_size=5).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@given(data=_stream, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    whole = RequestScanner().feed(data)
    events, _ = feed_all(_split(data, cuts))
    assert events == whole
    assert [e.index for e in whole] == [i // 2 for i in range(len(whole))]


# --- giving up ----------------------------------------------------------------


def _assert_gave_up(scanner: RequestScanner) -> None:
    assert not scanner.active
    assert scanner.feed(GET) == []


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n continuation first\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Nul: a\0b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Cr: a\rb\r\n\r\n",
    ],
)
def test_gives_up_on_header_it_will_not_follow(head: bytes) -> None:
    scanner = RequestScanner()
    assert scanner.feed(head + GET) == [RequestStarted(0)]
    _assert_gave_up(scanner)


@pytest.mark.parametrize(
    "line",
    [
        b"GET /",
        b"GET / HTTP/1.1 extra",
        b"GET  / HTTP/1.1",
        b"GET / FTP/1.1",
        b"GET / HTTP/2.0",
        b"G(T / HTTP/1.1",
        b"GET /a\xffb HTTP/1.1",
        b"GET /\n HTTP/1.1",
        b"",  # a second empty line
    ],
)
def test_gives_up_on_malformed_request_line(line: bytes) -> None:
    scanner = RequestScanner()
    events = scanner.feed(GET + b"\r\n" + line + b"\r\n\r\n")
    assert events == RequestScanner().feed(GET)  # what came before is still reported
    _assert_gave_up(scanner)


def test_gives_up_on_too_many_headers() -> None:
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(500))
    events = RequestScanner().feed(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    assert len(scanned(events)[0].headers) == 500
    scanner = RequestScanner()
    assert scanner.feed(b"GET / HTTP/1.1\r\n" + headers + b"X: v\r\n\r\n") == [RequestStarted(0)]
    _assert_gave_up(scanner)


def _head_of_size(size: int) -> bytes:
    """A head whose lines (without CRLF) add up to ``size`` bytes."""
    line = b"GET / HTTP/1.1"
    return line + b"\r\nX: " + b"a" * (size - len(line) - 3) + b"\r\n\r\n"


def test_head_up_to_max_head_is_followed() -> None:
    events, scanner = feed_all([_head_of_size(100)], max_head=100)
    assert len(scanned(events)) == 1 and scanner.active
    # Lines count separately, so the eaten CRLF and the CRLFs themselves are free.
    events, scanner = feed_all([b"\r\n" + _head_of_size(100)] * 2, max_head=100)
    assert len(scanned(events)) == 2 and scanner.active


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_gives_up_on_head_over_max_head(chunk: int) -> None:
    data = _head_of_size(101)
    events, scanner = feed_all([data[i : i + chunk] for i in range(0, len(data), chunk)], max_head=100)
    assert events == [RequestStarted(0)]
    _assert_gave_up(scanner)


def test_gives_up_on_unterminated_line_without_waiting_for_its_end() -> None:
    scanner = RequestScanner(max_head=100)
    assert scanner.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 83 + b"\r") == [RequestStarted(0)]
    assert scanner.active  # exactly 100 bytes if this CR starts the CRLF
    assert scanner.feed(b"a") == []
    _assert_gave_up(scanner)


def test_body_up_to_max_body_is_followed() -> None:
    events = RequestScanner(max_body=5).feed(POST + GET)
    assert [r.body for r in scanned(events)] == [b"hello", b""]


def test_gives_up_on_body_over_max_body() -> None:
    scanner = RequestScanner(max_body=4)
    assert scanner.feed(POST + GET) == [RequestStarted(0)]
    _assert_gave_up(scanner)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: Keep-Alive CLOSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
    ],
)
def test_stops_after_a_request_that_ends_the_connection(head: bytes) -> None:
    # Twisted closes the connection after answering it and never parses what follows.
    scanner = RequestScanner()
    assert len(scanned(scanner.feed(head + GET))) == 1
    _assert_gave_up(scanner)


# --- memory -------------------------------------------------------------------


def _traced(action) -> tuple[int, int]:
    """(bytes still allocated after, peak bytes allocated during) ``action()``."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


def test_declared_10_mb_body_is_not_buffered() -> None:
    data = b"POST / HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n" + bytes(10_000_000)
    scanner = RequestScanner()
    current, peak = _traced(lambda: scanner.feed(data))
    _assert_gave_up(scanner)
    assert peak < 200_000


def test_endless_line_is_not_buffered() -> None:
    data = b"GET /" + b"a" * 10_000_000
    scanner = RequestScanner()
    current, peak = _traced(lambda: scanner.feed(data))
    _assert_gave_up(scanner)
    assert peak < 200_000


def _held(obj: object) -> int:
    """Bytes the scanner keeps reachable (tracemalloc would also count freelists)."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, RequestScanner):
        obj = vars(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(_held, obj)) if isinstance(obj, (list, tuple)) else 0


def test_many_pipelined_requests_in_one_feed_hold_only_the_unfinished_one() -> None:
    body = bytes(60_000)
    request = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    scanner = RequestScanner()
    assert len(scanned(scanner.feed(request * 100 + request[:-1]))) == 100
    assert scanner.active
    assert 60_000 < _held(scanner) <= 16384 + 65536
    assert len(scanned(scanner.feed(request[-1:]))) == 1
    assert _held(scanner) == 0


def test_gives_up_without_keeping_buffered_data() -> None:
    scanner = RequestScanner()
    scanner.feed(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(200)))
    assert _held(scanner) > 10_000
    assert scanner.feed(b"bad line\r\n\r\n") == []
    _assert_gave_up(scanner)
    assert _held(scanner) == 0


# --- agreement with Twisted ---------------------------------------------------


def _twisted_requests(chunks: list[bytes]) -> list[tuple[bytes, bytes, dict, bytes]]:
    """What a real HTTPChannel parses out of ``chunks``, answering each request at once."""
    from twisted.internet.testing import StringTransport
    from twisted.web import http

    seen: list[tuple[bytes, bytes, dict, bytes]] = []

    class Recorder(http.Request):
        def process(self) -> None:
            headers = {k.lower(): v for k, v in self.requestHeaders.getAllRawHeaders()}
            seen.append((self.method, self.uri, headers, self.content.read()))
            self.finish()

    channel = http.HTTPChannel()
    channel.requestFactory = Recorder
    channel.timeOut = None  # no delayed calls on the global reactor
    transport = StringTransport()
    channel.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        channel.dataReceived(chunk)
    return seen


def _grouped(request: ScannedRequest) -> tuple[bytes, bytes, dict, bytes]:
    headers: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        headers.setdefault(name, []).append(value)
    return request.method, request.target, headers, request.body


_noise = st.sampled_from(
    [b"\r\n", b"X-Bad : v\r\n", b"nocolon\r\n", b" folded\r\n", b"Connection: close\r\n",
     b"Content-Length: 1\r\n", b"Content-Length: x\r\n", b"GET / HTTP/1.0\r\n", b"GET /\r\n",
     b"\r\n\r\n", b"X: \x00\r\n", b"\n", b"GET / HTTP/1.1\n", b"X: a\nb\r\n", b"X: a\rb\r\n", b"X-Y:\tz \r\n"]
)


@given(
    parts=st.lists(st.one_of(_request(), _noise), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_agrees_with_twisted_httpchannel(parts: list[bytes], cuts: list[int]) -> None:
    chunks = _split(b"".join(parts), cuts)
    events, _ = feed_all(chunks)
    assert [_grouped(r) for r in scanned(events)] == _twisted_requests(chunks)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_request_line_up_to_max_request_line_is_followed_one_more_byte_gives_up(chunk: int) -> None:
    """The channel answers a longer request line with 414: the scanner reports no request for it."""
    line = b"GET /" + b"a" * 86 + b" HTTP/1.1"  # 100 bytes
    longer = line[:-9] + b"a HTTP/1.1"  # 101 bytes
    for data, followed in ((line + b"\r\nHost: h\r\n\r\n", True), (longer + b"\r\nHost: h\r\n\r\n", False)):
        events, scanner = feed_all([data[i : i + chunk] for i in range(0, len(data), chunk)],
                                   max_head=1000, max_request_line=100)
        assert (len(scanned(events)) == 1) is followed
        if not followed:
            assert events == []
            _assert_gave_up(scanner)
