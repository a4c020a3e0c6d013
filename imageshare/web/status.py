"""``GET /status``: counters for monitoring, as JSON."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import attrs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imageshare import __version__
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.workers import WorkerPoolService


class StatusResource(Resource):
    """Counts come from the catalog, queried on the catalog pool, never on the reactor."""

    isLeaf = True
    log = Logger(namespace="imageshare.web")

    def __init__(
        self,
        catalog: ICatalog,
        db: WorkerPoolService,
        *,
        started: float,
        now: Callable[[], float],
        extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        super().__init__()
        self._catalog = catalog
        self._db = db
        self._started = started
        self._now = now
        self._extra = extra

    def render_GET(self, request: Request) -> int:
        gone = False

        def left(reason: Any) -> None:
            # The client went away during the query: nobody to answer, nothing to wait for.
            nonlocal gone
            gone = True
            d.cancel()

        d = self._db.run(self._catalog.counts)

        def respond(counts: Any) -> None:
            if gone:
                return
            body = {
                **attrs.asdict(counts),
                "uptime_s": int(self._now() - self._started),
                "version": __version__,
                **self._extra(),
            }
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-cache")
            request.write(json.dumps(body, sort_keys=True).encode() + b"\n")
            request.finish()

        def fail(failure: Any) -> None:
            if gone:
                return  # cancelled by left(), or failed after the client left: no one to tell
            self.log.failure("status query failed", failure)
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"error": "catalog unavailable"}\n')
            request.finish()

        request.notifyFinish().addErrback(left)
        d.addCallbacks(respond, fail)
        return NOT_DONE_YET


def wall_clock() -> float:
    return time.time()
