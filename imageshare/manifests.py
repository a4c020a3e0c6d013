"""
Study manifests: one Key Object Selection document per study, kept up to date.

A study gets its manifest (``imageshare/dicom/manifest.py``) once nothing has been received
for it for ``[manifest] stable_after`` seconds; an instance received later makes it due
again, and the rebuilt manifest (a new SOP Instance UID) replaces the old one. A manifest is
stored through the :class:`~imageshare.store.ingest.Ingestor` like any received instance,
so C-FIND and WADO find it in its study.

Quiet is judged on this service's clock, not by comparing the catalog's wall-clock stamps:
a study is due when its last receive time, as the catalog reports it, has not moved for
``stable_after`` seconds of polling. Our own manifests are tracked in the catalog
(``manifests`` table) from before they are stored, so they never count as a change of
their study (which would rebuild for ever), even when a build is interrupted.

Replacing is done so that a crash at any point leaves a consistent state: note the new
manifest, store it, make it current (one transaction), then remove the stale one from the
catalog, unlink its file, and forget it. Whatever a crash leaves half-way is stale and is
swept on the next poll.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from typing import Any, Callable

import attrs
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall

from imageshare.dicom.manifest import KOS_SOP_CLASS, build_manifest, encode_manifest, series_uid_for
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.store.archive import Archive, fsync_dir
from imageshare.store.ingest import IngestError, Ingestor, Stored

LOCATION_UID_SETTING = "manifest.retrieve_location_uid"

# Failures of the environment (disk, database, a value we cannot store), not of our code:
# logged as errors and retried, never as tracebacks.
_EXPECTED = (OSError, sqlite3.Error, IngestError)


class LocationUid:
    """
    The Retrieve Location UID our manifests carry, which is also our XDS repositoryUniqueId
    (the embedded repository, RAD-69): configured, or generated once per data directory and
    kept in the catalog (whoever asks first creates it). Blocking on first call: call it on
    a pool.
    """

    def __init__(self, catalog: ICatalog, configured: str = "") -> None:
        self._catalog = catalog
        self._value = configured or None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._value is None:
                self._value = str(self._catalog.ensure_setting(LOCATION_UID_SETTING, generate_uid(prefix=None)))
            return self._value


@attrs.frozen
class Built:
    """A manifest stored and made current."""

    stored: Stored
    instances: int
    series: int
    replaces: str | None  # the manifest it supersedes


class ManifestBuilder:
    """
    The blocking half: reads the catalog, builds, stores and replaces one study's manifest.

    Every method blocks; they run on the catalog pool, one at a time (a single
    :class:`ManifestService` per catalog).
    """

    def __init__(
        self,
        catalog: ICatalog,
        archive: Archive,
        ingestor: Ingestor,
        *,
        retrieve_ae_title: str,
        retrieve_url: str,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self._catalog = catalog
        self._archive = archive
        self._ingestor = ingestor
        self._ae_title = retrieve_ae_title
        self._url = retrieve_url
        self._now = now

    def location_uid(self, configured: str) -> str:
        """The Retrieve Location UID: configured, or generated once and kept in the catalog."""
        return LocationUid(self._catalog, configured)()

    def build(self, study_instance_uid: str, location_uid: str) -> Built | None:
        """Store a new manifest for the study if it changed since the one in force."""
        sources = self._catalog.manifest_sources(study_instance_uid)
        if sources is None or not sources.instances:
            return None
        if not sources.changed:
            self._catalog.mark_manifest_checked(study_instance_uid, sources.updated_at)
            return None
        uid = generate_uid(prefix=None)
        ds = build_manifest(
            sources.study,
            sources.instances,
            retrieve_ae_title=self._ae_title,
            retrieve_location_uid=location_uid,
            retrieve_url=self._url,
            sop_instance_uid=uid,
            series_instance_uid=series_uid_for(study_instance_uid),
            now=self._now(),
            series_number=sources.series_number,
        )
        self._catalog.begin_manifest(study_instance_uid, uid)
        stored = self._ingestor.store(
            encode_manifest(ds),
            transfer_syntax=ExplicitVRLittleEndian,
            sop_class_uid=KOS_SOP_CLASS,
            sop_instance_uid=uid,
            calling_aet=self._ae_title,
        )
        self._catalog.adopt_manifest(
            study_instance_uid, uid, instances=len(sources.instances), receives=sources.receives,
            updated_at=sources.updated_at,
        )
        series = len({i.series_instance_uid for i in sources.instances})
        return Built(stored, len(sources.instances), series, sources.current_uid)

    def sweep(self) -> int:
        """Remove stale manifests (superseded or interrupted); return how many."""
        stale = self._catalog.stale_manifests()
        for uid in stale:
            # Catalog first: nothing may name a file that is gone.
            row = self._catalog.remove_instance(uid)
            if row is not None:
                path = self._archive.path(row.path)
                path.unlink(missing_ok=True)
                fsync_dir(path.parent)
            self._catalog.forget_manifest(uid)
        return len(stale)


class ManifestService(Service):
    """
    Polls the catalog every ``min(stable_after / 2, 10)`` seconds and builds the manifests
    that are due, one at a time on the catalog pool.

    Parameters
    ----------
    builder
        The blocking half.
    db
        The catalog pool (anything with ``run(f, *args) -> Deferred``).
    clock
        The reactor, or a ``task.Clock`` in tests.
    location_uid
        ``[manifest] retrieve_location_uid``; empty: generated once per data directory.
    on_stored
        Called on the reactor with every stored manifest (the transcoder classifies it).
    on_built
        Called on the reactor with every manifest made current, after ``on_stored``
        (the XDS submitter registers it; ``replaces`` names the superseded manifest).
    """

    log = Logger(namespace="imageshare.manifests")

    def __init__(
        self,
        builder: ManifestBuilder,
        catalog: ICatalog,
        db: Any,
        clock: Any,
        *,
        stable_after: float,
        location_uid: str = "",
        enabled: bool = True,
        on_stored: Callable[[Stored], Any] | None = None,
        on_built: Callable[[Built], Any] | None = None,
        batch: int = 1000,
    ) -> None:
        self.setName("manifests")
        self._builder = builder
        self._catalog = catalog
        self._db = db
        self._clock = clock
        self._stable_after = stable_after
        self._configured_location = location_uid
        self._location: str | None = None
        self._enabled = enabled
        self._on_stored = on_stored
        self._on_built = on_built
        self._batch = batch
        self.interval = min(stable_after / 2, 10.0)
        # study -> (last receive time as the catalog reported it, when we first saw it)
        self._seen: dict[str, tuple[float, float]] = {}
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        self.count = 0  # studies with a manifest in force, as of the last poll
        self.built = 0
        self.failed = 0

    def startService(self) -> None:
        super().startService()
        if not self._enabled:
            return
        self._loop = LoopingCall(lambda: ensureDeferred(self.poll()))
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is None:
            return None
        if loop.running:
            loop.stop()
        # Fires once a poll in progress has finished its current build.
        return self._loop_done

    async def poll(self) -> None:
        """One round: sweep, find what is due, build it. Never raises (the loop must go on)."""
        try:
            await self._poll()
        except _EXPECTED as e:
            self.log.error("manifest poll failed: {error}; retrying at the next poll", error=_describe(e))
        except Exception:
            self.log.failure("manifest poll crashed; retrying at the next poll")

    async def _poll(self) -> None:
        if self._location is None:
            self._location = await self._db.run(self._builder.location_uid, self._configured_location)
        await self._sweep()
        candidates = await self._db.run(self._catalog.manifest_candidates, self._batch)
        now = self._clock.seconds()
        seen, self._seen = self._seen, {}
        due = []
        for study, updated_at in candidates:
            last = seen.get(study)
            if last is None or last[0] != updated_at:
                last = (updated_at, now)  # new or received again: the quiet period restarts
            self._seen[study] = last
            if now - last[1] >= self._stable_after:
                due.append(study)
        built = 0
        for study in due:
            if not self.running:
                break
            if await self._build(study):
                built += 1
        if built:
            await self._sweep()
        self.count = await self._db.run(self._catalog.manifest_count)

    async def _build(self, study: str) -> bool:
        try:
            result = await self._db.run(self._builder.build, study, self._location)
        except _EXPECTED as e:
            self.failed += 1
            self.log.error(
                "cannot build the manifest of study {study_instance_uid}: {error}; retrying at the next poll",
                study_instance_uid=study, error=_describe(e),
            )
            return False
        except Exception:
            self.failed += 1
            self.log.failure("building the manifest of study {study_instance_uid} crashed", study_instance_uid=study)
            return False
        self._seen.pop(study, None)
        if result is None:
            return False
        self.built += 1
        self.log.info(
            "manifest {sop_instance_uid} of study {study_instance_uid}: {instances} instance(s) in {series} "
            "series{replacing}",
            sop_instance_uid=result.stored.record.sop_instance_uid,
            study_instance_uid=study,
            instances=result.instances,
            series=result.series,
            replacing=f", replacing {result.replaces}" if result.replaces else "",
        )
        if self._on_stored is not None:
            self._on_stored(result.stored)
        if self._on_built is not None:
            self._on_built(result)
        return True

    async def _sweep(self) -> None:
        removed = await self._db.run(self._builder.sweep)
        if removed:
            self.log.info("removed {count} superseded manifest(s)", count=removed)


def _describe(e: Exception) -> str:
    if isinstance(e, IngestError):
        return f"not stored: {e.comment}"
    return f"{type(e).__name__}: {e}"
