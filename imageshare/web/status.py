"""``GET /status``: counters for monitoring, as JSON."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import attrs
from imageshare.logsafe import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imageshare import __version__
from imageshare.interfaces import ICatalog
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
        d = self._db.run(self._catalog.counts)

        def respond(counts: Any) -> None:
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
            self.log.failure("status query failed", failure)
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"error": "catalog unavailable"}\n')
            request.finish()

        d.addCallbacks(respond, fail)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


def wall_clock() -> float:
    return time.time()
