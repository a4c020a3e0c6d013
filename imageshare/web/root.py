"""The HTTP resource tree and site."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from twisted.web.resource import Resource
from twisted.web.server import Site

from imageshare.logsafe import Logger
from imageshare.logthrottle import LogThrottle
from imageshare.web.channel import ArrivalRequest, ScanningHTTPChannel
from imageshare.web.limits import HttpLimits
from imageshare.web.pipeline import ScannedRequest

log = Logger(namespace="imageshare.http")


class RootResource(Resource):
    """``/``: children are added by the service that owns them (status, jpip, wado...)."""

    def render_GET(self, request: object) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[attr-defined]
        return b"ImageShare\n"


class QuietSite(Site):
    """
    A Site that writes no access log unless asked (URLs may carry identifiers), and whose
    channels number requests as they arrive and report each one early to
    :attr:`observers` (``observer(request, arrival)``), for JPIP pre-emption.

    Its channels enforce :attr:`limits` (request bodies by path, receive deadlines) on
    ``reactor``'s clock; Twisted's idle timeout is off, the deadlines replace it.
    """

    protocol = ScanningHTTPChannel
    requestFactory = ArrivalRequest

    def __init__(
        self,
        resource: Resource,
        *,
        request_log: bool,
        next_arrival: Callable[[], int] | None = None,
        limits: HttpLimits | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, timeout=None, reactor=reactor)
        self.limits = limits or HttpLimits()
        # 408s and 413s are logged at most once per address and kind every 10 s.
        self.refusals = LogThrottle(10.0)
        self._request_log = request_log
        self.next_arrival = next_arrival or itertools.count(1).__next__
        self.observers: list[Callable[[ScannedRequest, int], None]] = []

    def request_arrived(self, request: ScannedRequest, arrival: int) -> None:
        for observer in self.observers:
            try:
                observer(request, arrival)
            except Exception:
                log.failure("a request observer failed")

    def log(self, request: object) -> None:
        if self._request_log:
            super().log(request)  # type: ignore[arg-type]
