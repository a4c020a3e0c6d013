"""The HTTP resource tree and site."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Site


class RootResource(Resource):
    """``/``: children are added by the service that owns them (status, jpip, wado...)."""

    def render_GET(self, request: object) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[attr-defined]
        return b"ImageShare\n"


class QuietSite(Site):
    """A Site that writes no access log unless asked: URLs may carry identifiers."""

    def __init__(self, resource: Resource, *, request_log: bool) -> None:
        super().__init__(resource)
        self._request_log = request_log

    def log(self, request: object) -> None:
        if self._request_log:
            super().log(request)  # type: ignore[arg-type]
