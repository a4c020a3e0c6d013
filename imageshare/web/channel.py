"""
An HTTP/1.1 channel that hears of every request as soon as its bytes are in, and bounds
what receiving a request may cost.

Twisted's ``HTTPChannel`` answers pipelined requests one at a time: while a response
streams, the next request waits unparsed in a buffer. JPIP pre-emption (a newer request
cuts the current response short) has to know of that request while the response still
streams. This channel runs every inbound byte through a :class:`RequestScanner` before
Twisted sees it, numbers each request when its request line arrives, and tells the site
of each complete request; Twisted then serves them exactly as before, so the rest of the
web tree does not notice.

Bounds (:class:`~imageshare.web.limits.HttpLimits`, from the site):

- a request body over the limit of its path gets 413 at once, from its ``Content-Length``
  before any of it is read (and instead of ``100 Continue``), or as soon as a chunked body
  passes the limit; nothing more of it is kept, and the connection closes once what the
  client still sends is discarded (bounded in time and bytes; at once after ``Expect``);
- the request line and headers must arrive within ``header_timeout`` of the request's
  first byte, the body within ``body_timeout`` of the headers; otherwise 408 and close.
  Twisted's own idle timeout restarts on every byte, which keeps a trickling client
  forever, so it is off and these deadlines replace it;
- a connection with no request in progress closes after ``idle_timeout``;
- a request line over ``max_request_line`` gets 414, a head over ``max_head`` (or one
  header line that alone would pass it) 431. Twisted's ``LineReceiver`` closes the
  connection without a word past its line limit, so the channel sets that limit to ours
  and answers instead; it never holds more than the limit of the line it is reading. The
  rest of the refused head is discarded (bounded in time and bytes) and the connection
  closes when the head's blank line has gone by, so a client that sends its whole request
  before reading gets the answer rather than a reset.

None of them runs while a request is being answered: a long JPIP stream is never cut.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from imageshare.logsafe import Logger
from imageshare.web.clients import address_key
from imageshare.web.headers import WireCaseHeaders
from imageshare.web.pipeline import RequestScanner, RequestStarted, ScannedRequest

log = Logger(namespace="imageshare.http")

_SEND_LIMIT = 1 << 20

# After a 413 the connection lingers so that a client still sending its body (one that
# reads only once it has sent everything, as urllib does) gets to read the answer instead
# of a broken pipe: further bytes are discarded unread into nothing, for at most this long
# and this much, and the connection closes as soon as a declared body is all in.
_LINGER_SECONDS = 10.0
_LINGER_BYTES = 256 << 20

#: The ``Server`` header of every response: no product versions for a scanner to match.
SERVER = b"ImageShare"

# What the channel is waiting for; a deadline runs in every phase but the last.
_IDLE = "idle"  # the next request (no byte of it yet)
_HEAD = "head"  # the rest of a request line and headers
_BODY = "body"  # the rest of a body
_ANSWERING = "answering"  # Twisted has the request: no receive deadline


def plain_response(status: int, reason: bytes, text: bytes) -> bytes:
    """A whole ``Connection: close`` response with a short text body, for the channel's own answers."""
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Server: %s\r\n"
        b"Connection: close\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"\r\n" % (status, reason, SERVER, len(text))
    ) + text


class ScanningHTTPChannel(HTTPChannel):
    """``HTTPChannel`` plus early notice of (pipelined) requests and receive bounds; see the module docstring."""

    def connectionMade(self) -> None:
        self._transport_full = False  # before Twisted registers us with the transport
        self._phase = _IDLE
        self._deadline: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._cut = False  # answered 408/413 and closing: nothing more is parsed or kept
        self._linger_left: int | None = None  # bytes still to discard before closing
        self._head_tail: bytes | None = None  # after a 414/431: the last bytes, to see the head end
        self._in_head = False  # the request line is in, the headers are being read
        limits = self.site.limits
        # LineReceiver buffers a line up to MAX_LENGTH: ours, per line kind (see lineReceived).
        self.MAX_LENGTH = limits.max_request_line
        self.totalHeadersSize = limits.max_head
        self._body_limit = 0
        self._body_seen = 0
        super().connectionMade()
        # Twisted writes at most 128 KiB per send(); whole DICOM objects and JPIP responses
        # are megabytes, and each extra pass through the reactor costs more than the copy.
        if hasattr(self.transport, "SEND_LIMIT"):
            self.transport.SEND_LIMIT = _SEND_LIMIT
        self._scanner = RequestScanner(max_head=limits.max_head, max_request_line=limits.max_request_line)
        self._untaken: collections.deque[int] = collections.deque()  # numbered, no Request yet
        self._incomplete: dict[int, int] = {}  # request index → number, until its bytes are in
        self._replaying = False
        self._enter(_IDLE)

    def setLineMode(self, extra: bytes = b"") -> Any:
        # Twisted replays the bytes it held back through dataReceived: seen already.
        self._replaying = True
        try:
            return super().setLineMode(extra)
        finally:
            self._replaying = False

    def dataReceived(self, data: bytes) -> None:
        if self._cut:
            self._discard(data)
            return
        # The header deadline runs from a request's first byte (a stray CRLF between
        # requests is no request, as in HTTPChannel).
        if self._phase == _IDLE and data.strip(b"\r\n"):
            self._enter(_HEAD)
        if self._scanner.active and not self._replaying:
            for event in self._scanner.feed(data):
                if isinstance(event, RequestStarted):
                    number = self.site.next_arrival()
                    self._untaken.append(number)
                    self._incomplete[event.index] = number
                elif isinstance(event, ScannedRequest):
                    self.site.request_arrived(event, self._incomplete.pop(event.index))
            if not self._scanner.active:
                self._incomplete.clear()
                log.debug("request scanning stopped on this connection (unusual framing)")
        super().dataReceived(data)

    # -- receive bounds ------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._cut:
            return
        if not self._in_head:
            if line:  # the request line (an empty line before it is Twisted's to eat or refuse)
                self._in_head = True
                self.MAX_LENGTH = self.totalHeadersSize  # no header line is longer; the sum is checked below
        elif self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            # Twisted would answer 400 here: say what is wrong. What follows this line in
            # the same read is LineReceiver's buffer; take it so nothing more is parsed.
            rest, self._buffer = self._buffer, b""
            self._refuse_head(431, b"\r\n", rest)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver found a line longer than MAX_LENGTH (or that much without its end):
        # ``line`` is it, and whatever followed in the buffer. Twisted would just close.
        if self._cut:
            self._discard(line)
            return
        self._refuse_head(431 if self._in_head else 414, b"", line)

    def _refuse_head(self, status: int, tail: bytes, rest: bytes) -> None:
        limits = self.site.limits
        if status == 414:
            self._note("414", "request line from {address} longer than {limit} bytes: 414",
                       limit=limits.max_request_line)
            self._cut_short(414, b"URI Too Long", b"request line longer than %d bytes\n" % limits.max_request_line,
                            linger=_LINGER_BYTES)
        else:
            self._note("431", "request head from {address} longer than {limit} bytes: 431", limit=limits.max_head)
            self._cut_short(431, b"Request Header Fields Too Large",
                            b"request line and headers longer than %d bytes\n" % limits.max_head, linger=_LINGER_BYTES)
        # The rest of the head is read and dropped; the close comes at its blank line.
        self._head_tail = tail
        self._discard(rest)

    def allHeadersReceived(self) -> None:
        limit = self.site.limits.bodies.limit_for(self._path)
        if self.length is not None and self.length > limit:
            # Before Twisted spools anything (gotLength) or answers 100 Continue. A client
            # that asked for 100 Continue sends no body: nothing to linger for.
            expect = self.requests[-1].requestHeaders.getRawHeaders(b"expect") or [b""]
            self._refuse_body(limit, 0 if expect[0].lower() == b"100-continue" else self.length)
            return
        self._body_limit, self._body_seen = limit, 0
        super().allHeadersReceived()
        if self.length != 0:
            self._enter(_BODY)

    def body_received(self, size: int) -> bool:
        """Count ``size`` decoded body bytes; ``False`` (and 413) once the body is over its limit."""
        if self._cut:
            return False
        self._body_seen += size
        if self._body_seen > self._body_limit:
            self._refuse_body(self._body_limit, _LINGER_BYTES)  # a chunked body: its end is unknown
            return False
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if self._cut:
            self._discard(data)  # the rest of a read in which the body was refused
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self._cut:
            return  # a chunked body's end in the same read as the bytes that broke its limit
        self._in_head = False  # Twisted reads the next request line after this answer
        self.MAX_LENGTH = self.site.limits.max_request_line
        self._enter(_ANSWERING)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Before Twisted replays the pipelined bytes it held, which may start the next request.
        self._enter(_IDLE)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel(self._deadline)
        self._cancel(self._abort_call)
        self._deadline = self._abort_call = None
        super().connectionLost(reason)

    def _enter(self, phase: str) -> None:
        self._phase = phase
        self._cancel(self._deadline)
        self._deadline = None
        limits = self.site.limits
        timeout = {_IDLE: limits.idle_timeout, _HEAD: limits.header_timeout, _BODY: limits.body_timeout}.get(phase)
        if timeout is not None and not self._cut:
            self._deadline = self.site.reactor.callLater(timeout, self._expired, phase, timeout)

    def _expired(self, phase: str, timeout: float) -> None:
        self._deadline = None
        if self.transport is None:
            return
        if phase == _IDLE and self._waitingForTransport:
            # The last response is still on its way out (the transport asked us to wait):
            # sending is not idling, and the deadlines bound receiving only.
            self._enter(_IDLE)
            return
        if self.transport.disconnecting:
            self.transport.abortConnection()  # a close the client holds up by not reading
        elif phase == _IDLE:
            log.debug("closing a connection from {peer} idle for {timeout} s", peer=self._peer(), timeout=timeout)
            self._close()
        else:
            # Nothing of this request has been answered: Twisted answers after the body only.
            self._note("408", "request from {address} cut with 408: {part} not complete within {timeout} s",
                       part="headers" if phase == _HEAD else "body", timeout=timeout)
            self._cut_short(408, b"Request Timeout", b"request not received in time\n")

    def _refuse_body(self, limit: int, coming: int) -> None:
        self._note("413", "request body from {address} over the limit of {limit} bytes: 413", limit=limit)
        self._cut_short(413, b"Content Too Large", b"request body larger than %d bytes\n" % limit, linger=coming)

    def _cut_short(self, status: int, reason: bytes, text: bytes, *, linger: int = 0) -> None:
        self._cut = True
        self._cancel(self._deadline)
        self._deadline = None
        self.transport.write(plain_response(status, reason, text))
        if linger > 0:
            self._linger_left = min(linger, _LINGER_BYTES)
            self._deadline = self.site.reactor.callLater(_LINGER_SECONDS, self._close)
        else:
            self._close()

    def _discard(self, data: bytes) -> None:
        if self._linger_left is None:
            return
        self._linger_left -= len(data)
        if self._head_tail is not None:
            # A refused head: it ends at its blank line (a body after it is not waited for).
            ended = b"\r\n\r\n" in self._head_tail + data[:3] or b"\r\n\r\n" in data
            self._head_tail = data[-3:] if len(data) >= 3 else (self._head_tail + data)[-3:]
            if ended:
                self._close()
                return
        if self._linger_left <= 0:
            self._close()

    def _close(self) -> None:
        self._linger_left = None
        self._cancel(self._deadline)
        self._deadline = None
        self.loseConnection()  # after what is written; nothing more is read
        if self._abort_call is None:
            # A client that does not read what we wrote must not hold the close up.
            self._abort_call = self.site.reactor.callLater(self.abortTimeout, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _note(self, kind: str, text: str, **fields: Any) -> None:
        address = self._peer()
        count = self.site.refusals.hit((kind, address), self.site.reactor.seconds())
        if count is not None:
            log.info(text + " ({count} since the last such line; at most one every {interval:.0f} s)",
                     address=address, count=count, interval=self.site.refusals.interval, **fields)

    def _peer(self) -> str:
        return address_key(self.transport.getPeer() if self.transport is not None else None)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    # Twisted registers a pull producer unpaused even while the transport's buffer is
    # full; resuming it later then fails (NotPaused). That happens when a response ends
    # while the client is not reading (a pre-empted one) and a pipelined request follows.
    def pauseProducing(self) -> None:
        self._transport_full = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._transport_full = False
        super().resumeProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming and self._transport_full:
            self._requestProducer.pauseProducing()  # the wrapper Twisted made for it

    def take_arrival(self) -> int:
        """The number of the request Twisted is creating now (both parse in the same order)."""
        if self._untaken:
            return self._untaken.popleft()
        return int(self.site.next_arrival())


class ArrivalRequest(Request):
    """
    A request that knows its arrival number (:attr:`arrival`), for pre-emption, has its
    body metered by the channel, names no software version in ``Server``, and writes JPIP
    header names as ISO/IEC 15444-9 spells them (``JPIP-cnew``, see ``web/headers.py``).
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.responseHeaders = WireCaseHeaders(dict(self.responseHeaders.getAllRawHeaders()))
        take = getattr(channel, "take_arrival", None)
        self.arrival: int | None = take() if take is not None else None

    def handleContentChunk(self, data: bytes) -> None:
        meter = getattr(self.channel, "body_received", None)
        if meter is not None and not meter(len(data)):
            return  # over the limit: the channel answered 413; not one more byte is kept
        super().handleContentChunk(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # Twisted set TwistedWeb/<version> in process(); error pages pass here too.
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)
