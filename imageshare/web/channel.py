"""
An HTTP/1.1 channel that hears of every request as soon as its bytes are in.

Twisted's ``HTTPChannel`` answers pipelined requests one at a time: while a response
streams, the next request waits unparsed in a buffer. JPIP pre-emption (a newer request
cuts the current response short) has to know of that request while the response still
streams. This channel runs every inbound byte through a :class:`RequestScanner` before
Twisted sees it, numbers each request when its request line arrives, and tells the site
of each complete request; Twisted then serves them exactly as before, so the rest of the
web tree does not notice.
"""

from __future__ import annotations

import collections
from typing import Any

from imageshare.logsafe import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from imageshare.web.pipeline import RequestScanner, RequestStarted, ScannedRequest

log = Logger(namespace="imageshare.http")

_SEND_LIMIT = 1 << 20


class ScanningHTTPChannel(HTTPChannel):
    """``HTTPChannel`` plus early notice of (pipelined) requests; see the module docstring."""

    def connectionMade(self) -> None:
        self._transport_full = False  # before Twisted registers us with the transport
        super().connectionMade()
        # Twisted writes at most 128 KiB per send(); whole DICOM objects and JPIP responses
        # are megabytes, and each extra pass through the reactor costs more than the copy.
        if hasattr(self.transport, "SEND_LIMIT"):
            self.transport.SEND_LIMIT = _SEND_LIMIT
        self._scanner = RequestScanner()
        self._untaken: collections.deque[int] = collections.deque()  # numbered, no Request yet
        self._incomplete: dict[int, int] = {}  # request index → number, until its bytes are in
        self._replaying = False

    def setLineMode(self, extra: bytes = b"") -> Any:
        # Twisted replays the bytes it held back through dataReceived: seen already.
        self._replaying = True
        try:
            return super().setLineMode(extra)
        finally:
            self._replaying = False

    def dataReceived(self, data: bytes) -> None:
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
    """A request that knows its arrival number (:attr:`arrival`), for pre-emption."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        take = getattr(channel, "take_arrival", None)
        self.arrival: int | None = take() if take is not None else None
