"""
The transcoding queue: which instance is transcoded next, and how many at once.

The catalog is the durable queue (every instance in state ``pending``); this service only
keeps a bounded window of it in memory. New instances are announced through
:meth:`TranscodeService.enqueue`; when the in-memory queue is full, or after a restart, the
service refills it from the catalog, so a backlog of any size costs bounded memory and a
restart resumes all pending work.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred

from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.transcode.job import Cancelled
from imageshare.workers import BrokenProcessPool, ProcessPoolService, WorkerPoolService


class TranscodeService(Service):
    """
    Runs ``job(sop_instance_uid)`` on the transcode pool for every pending instance.

    Parameters
    ----------
    job
        Blocking, picklable callable run in the transcode pool; it records the outcome in
        the catalog itself and returns a short description for the log.
    pool
        The transcode pool; at most ``pool.size`` jobs run at once.
    db
        The pool that runs catalog queries.
    give_up
        Blocking callable ``(uid, reason)`` run on ``db`` when an instance kills its worker
        process twice in a row: it is then recorded as failed instead of retried forever.
    on_done
        Called on the reactor with the SOP Instance UID after each transcode (so that
        caches of the old codestreams can be dropped).
    """

    log = Logger(namespace="imageshare.transcode")

    def __init__(
        self,
        job: Callable[[str], Any],
        catalog: ICatalog,
        pool: ProcessPoolService | WorkerPoolService,
        db: WorkerPoolService,
        *,
        max_queue: int = 1024,
        give_up: Callable[[str, str], Any] | None = None,
        on_done: Callable[[str], Any] | None = None,
    ) -> None:
        self.setName("transcoder")
        self._job = job
        self._catalog = catalog
        self._pool = pool
        self._db = db
        self._max_queue = max_queue
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()  # received again while being transcoded
        self._overflow = False  # some announcements were dropped; the catalog has them
        self._refilling = False
        self._crashed: set[str] = set()  # not retried until restart or a new receive
        # Were in the pool when a worker process died. They are re-run one at a time, so
        # that the instance that really kills its worker is known and given up on.
        self._suspects: set[str] = set()
        self._alone: str | None = None  # the suspect now running by itself
        self._give_up = give_up
        self._on_done = on_done
        self._idle: list[Deferred[None]] = []
        self.done = 0
        self.failed = 0

    # -- queue -----------------------------------------------------------------------------

    def enqueue(self, sop_instance_uid: str) -> None:
        """Announce an instance that needs (re)transcoding."""
        if not self.running:
            return  # it stays pending in the catalog; the next start picks it up
        self._crashed.discard(sop_instance_uid)
        if sop_instance_uid in self._active:
            self._again.add(sop_instance_uid)
        elif sop_instance_uid not in self._queued:
            if len(self._queue) >= self._max_queue:
                self._overflow = True
            else:
                self._queue.append(sop_instance_uid)
                self._queued.add(sop_instance_uid)
        self._pump()

    def _pump(self) -> None:
        limit = 1 if self._suspects else self._pool.size
        while self.running and self._queue and len(self._active) < limit:
            uid = self._queue.popleft()
            self._queued.discard(uid)
            self._alone = uid if uid in self._suspects and not self._active else None
            self._active.add(uid)
            ensureDeferred(self._run(uid))
        if self.running and not self._queue and self._overflow and not self._refilling:
            ensureDeferred(self._refill())
        if not self._queue and not self._active and not self._refilling:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    async def _run(self, uid: str) -> None:
        try:
            summary = await self._pool.run(self._job, uid)
            self.done += 1
            self._suspects.discard(uid)
            if self._on_done is not None:
                self._on_done(uid)
            self.log.info("transcoded {sop_instance_uid}: {summary}", sop_instance_uid=uid, summary=summary)
        except Cancelled:
            # The server is stopping: the instance stays pending and is resumed at the next start.
            self.log.info("transcoding {sop_instance_uid} stopped with the server; it stays pending",
                          sop_instance_uid=uid)
        except BrokenProcessPool:
            if uid == self._alone or self._give_up is None:
                self._suspects.discard(uid)
                self._crashed.add(uid)
                self.failed += 1
                self.log.error("the transcoder process crashed on {sop_instance_uid}; giving up", sop_instance_uid=uid)
                if self._give_up is not None:
                    try:
                        await self._db.run(self._give_up, uid, "the transcoder process crashed on this instance")
                    except Exception:
                        self.log.failure("cannot record the failure of {sop_instance_uid}", sop_instance_uid=uid)
            else:
                self.log.warn("a transcoder process died while {sop_instance_uid} was in the pool; "
                              "it will be retried alone", sop_instance_uid=uid)
                self._suspects.add(uid)
                if uid not in self._queued:
                    self._queue.appendleft(uid)
                    self._queued.add(uid)
        except Exception:
            # The job records expected failures itself; reaching here is a bug or a broken
            # catalog. The instance stays pending; it is retried when received again or
            # after a restart, not in a hot loop.
            self._crashed.add(uid)
            self.failed += 1
            self.log.failure("transcoding {sop_instance_uid} crashed", sop_instance_uid=uid)
        finally:
            self._active.discard(uid)
            if self._alone == uid:
                self._alone = None
            if uid in self._again:
                self._again.discard(uid)
                self.enqueue(uid)
            self._pump()

    async def _refill(self) -> None:
        self._refilling = True
        self._overflow = False
        try:
            exclude = self._active | self._queued | self._crashed
            uids = await self._db.run(self._catalog.pending, self._max_queue - len(self._queue), exclude)
        except Exception:
            self.log.failure("cannot read pending instances from the catalog")
            uids = []
        finally:
            self._refilling = False
        if len(uids) >= self._max_queue - len(self._queue):
            self._overflow = True  # there may be more than we asked for
        for uid in uids:
            if uid not in self._active and uid not in self._queued:
                self._queue.append(uid)
                self._queued.add(uid)
        self._pump()

    def when_idle(self) -> Deferred[None]:
        """Fires when nothing is queued or running (tests and orderly shutdown)."""
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._pump()
        return d

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._active)

    # -- lifetime --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._overflow = True  # whatever was pending before the restart
        self._pump()

    def stopService(self) -> None:
        super().stopService()
        # Running jobs finish with the pool; queued ones stay pending in the catalog.
        self._queue.clear()
        self._queued.clear()
