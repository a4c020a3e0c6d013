"""
The Document Source: registers study manifests with ITI-41/RAD-68, from the durable outbox.

:class:`SubmitterService` sends the due outbox rows one at a time (so a study's manifests
reach the registry in order and an RPLC always points to an entry the registry has). The
request is built once, on a worker pool, and kept in the outbox; the answer decides:

* Success RegistryResponse, or a Failure whose only error is
  ``XDSDuplicateUniqueIdInRegistry`` (a re-send of what the registry already took): registered;
* a transient answer (connection error, timeout, HTTP 5xx, a SOAP ``Receiver`` fault, a
  malformed answer, a busy or generic registry error): retried after an exponential
  backoff on the injected clock, ``failed`` after ``max_attempts``;
* a permanent answer (SOAP ``Sender`` fault, another registry error, a request we cannot
  build): ``failed`` at once, kept in the outbox and counted in ``/status``.

Log events carry UIDs and outcomes only, never patient data.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.web.client import ResponseFailed

from imageshare.audit.identity import patient_of_study
from imageshare.audit.messages import SERIOUS_FAILURE
from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.config import XdsConfig
from imageshare.endpoints import client_tls_material
from imageshare.logsafe import Logger
from imageshare.xds import mtom, safexml, soap
from imageshare.xds.affinity import DICOM_MIME_TYPE, AffinityDomainError, PatientIdError
from imageshare.xds.metadata import ManifestInfo, MetadataError, provide_and_register
from imageshare.xds.outbox import Outbox, State, Submission
from imageshare.xds.responses import Outcome, ResponseError, classify, parse_registry_response

__all__ = ["Answer", "SubmitterService", "judge", "make_http_client"]

_MAX_ANSWER = 4 * 1024 * 1024  # an ITI-41 answer is a RegistryResponse: small


@attrs.frozen
class Answer:
    """What one attempt came to."""

    outcome: Outcome
    reason: str


def judge(code: int, content_type: str | None, body: bytes) -> Answer:
    """
    Classify an HTTP answer to an ITI-41 request (pure: bytes in, verdict out).

    A registry that already holds the submission (``duplicate_only``) counts as success.
    """
    try:
        xml = mtom.parse(content_type, body)[0] if content_type and mtom.is_mtom(content_type) else body
        root = safexml.parse(xml)
        envelope = soap.parse_envelope(root)
    except (ValueError, soap.SoapFault) as e:  # MtomError, XmlError and a broken envelope
        if code >= 500 or code in (404, 408, 429):
            return Answer(Outcome.TRANSIENT, f"HTTP {code}")
        if code >= 400:
            return Answer(Outcome.PERMANENT, f"HTTP {code}")
        return Answer(Outcome.TRANSIENT, f"malformed answer (HTTP {code}): {_short(e)}")
    fault = envelope.fault
    if fault is not None:
        outcome = Outcome.TRANSIENT if fault.code == "Receiver" else Outcome.PERMANENT
        return Answer(outcome, f"SOAP fault {fault.code}: {_short(fault.reason)}")
    try:
        verdict = classify(parse_registry_response(envelope.body))
    except ResponseError as e:
        return Answer(Outcome.TRANSIENT, f"malformed RegistryResponse (HTTP {code}): {_short(e)}")
    if verdict.duplicate_only:
        return Answer(Outcome.SUCCESS, "already registered")
    return Answer(verdict.outcome, verdict.reason)


def _short(e: object, limit: int = 300) -> str:
    text = str(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Superseded(Exception):
    """The manifest is gone before its first attempt: nothing to register."""


class _Unbuildable(Exception):
    """The request cannot be built (bad metadata, unmappable patient): permanent."""


class RequestBuilder:
    """
    The blocking half: builds the ITI-41 MTOM message of an outbox row and keeps it there.

    Parameters
    ----------
    outbox
        The outbox.
    archive_root
        Where the archived manifests are (``<data_dir>/archive``).
    catalog
        The catalog, for the study's modalities and body parts (``reader()``).
    config
        ``[xds]``: the URL and the Affinity Domain.
    """

    def __init__(self, outbox: Outbox, archive_root: Path, catalog: Any, config: XdsConfig,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self._outbox = outbox
        self._archive_root = archive_root
        self._catalog = catalog
        self._config = config
        self._now = now

    def prepare(self, row: Submission, clock_now: float) -> tuple[str, bytes]:
        """The message of a row: built and stored on its first attempt, then always the same."""
        if row.prepared:
            return str(row.content_type), bytes(row.body or b"")
        try:
            data = (self._archive_root / row.path).read_bytes()
        except FileNotFoundError:
            raise _Superseded("the manifest no longer exists") from None
        replaces = self._outbox.replaced_entry(row.replaces_uid) if row.replaces_uid else None
        try:
            modalities, body_parts = self._study_codes(row.study_uid)
            info = ManifestInfo.from_part10(data, modalities=modalities, body_parts=body_parts)
            domain = self._config.domain(_location_uid(data))
            cid = f"{uuid.uuid5(uuid.NAMESPACE_OID, row.manifest_uid)}@imageshare"
            request = provide_and_register(
                info, domain, entry_uuid=row.entry_uuid, submission_uuid=row.submission_uuid,
                now=self._now(), document_id=cid, replaces=replaces,
            )
            envelope = soap.build_request(soap.ITI41, self._config.repository_url, request,
                                          message_id=row.message_id)
            content_type, body = mtom.build(envelope, {cid: (DICOM_MIME_TYPE, data)})
        except (MetadataError, PatientIdError, AffinityDomainError, mtom.MtomError) as e:
            raise _Unbuildable(str(e)) from e
        self._outbox.prepare(row.id, replaces=replaces, content_type=content_type, body=body, now=clock_now)
        return content_type, body

    def _study_codes(self, study_uid: str) -> tuple[list[str], list[str]]:
        with self._catalog.reader() as conn:
            rows = conn.execute(
                "SELECT DISTINCT modality, body_part_examined FROM series WHERE study_instance_uid=?", (study_uid,)
            ).fetchall()
        modalities = sorted({str(m) for m, _ in rows if m and m not in ("KO", "SR", "PR")})
        body_parts = sorted({str(b) for _, b in rows if b})
        return modalities, body_parts


def _location_uid(data: bytes) -> str:
    from io import BytesIO

    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        return str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].RetrieveLocationUID)
    except Exception as e:  # pydicom raises many kinds on a broken file
        raise MetadataError(f"the manifest has no Retrieve Location UID: {e}") from e


class SubmitterService(Service):
    """
    Sends the outbox to ``[xds] repository_url``.

    Parameters
    ----------
    outbox, builder
        The outbox and the request builder (both blocking: used on ``pool``).
    pool
        A worker pool (``run(f, *args) -> Deferred``).
    http
        A treq-compatible client (``post(url, data=, headers=)`` -> response with ``code``,
        ``headers`` and ``content()``).
    clock
        The reactor, or a ``task.Clock`` in tests.
    config
        ``[xds]``: URL, timeout, retry settings.
    catalog
        The catalog (``current_manifests()``, blocking): at start, every manifest in force
        that the outbox does not know yet is queued (a crash between a manifest becoming
        current and its ``enqueue``, or manifests built while ``[xds]`` was off).
    audit
        Records each submission (110106 R, RAD-68: the manifests are imaging document
        sets) when it is registered, and with a failure outcome when it finally fails
        (refused, or out of attempts); not per retried attempt.
    """

    log = Logger(namespace="imageshare.xds")

    def __init__(self, outbox: Outbox, builder: RequestBuilder, pool: Any, http: Any, clock: Any,
                 config: XdsConfig, *, catalog: Any = None, audit: AuditTrail = NO_AUDIT) -> None:
        self._audit = audit
        #: Where requests are POSTed: the configured URL, or for the embedded repository the
        #: server's own listening address (set by the service once HTTP listens), since the
        #: public URL may name a proxy or a port this process does not listen on.
        self.post_url = config.repository_url
        self.setName("xds-submitter")
        self._outbox = outbox
        self._builder = builder
        self._pool = pool
        self._http = http
        self._clock = clock
        self._config = config
        self._catalog = catalog
        self._reconciling: Deferred[None] | None = None
        self._wakeup: Any = None
        self._pass: Deferred[None] | None = None
        self._again = False
        self._busy = False
        self._request: Deferred[Any] | None = None
        self.counts: dict[State, int] = {state: 0 for state in State}

    # -- lifetime ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info("registering manifests with {url}", url=self._config.repository_url)
        if self._catalog is not None:
            d = ensureDeferred(self._reconcile())
            self._reconciling = None if d.called else d  # a synchronous pool finishes it at once
        self.kick()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        if self._request is not None:
            self._request.cancel()  # not counted as an attempt: resent after the restart
        waits = [d for d in (self._reconciling, self._pass) if d is not None]
        if not waits:
            return None
        return gatherResults(waits).addCallback(lambda _: None)

    def enqueue(self, manifest_uid: str, study_uid: str, path: str, replaces_uid: str | None) -> Deferred[Submission]:
        """Record a manifest to register (durably), then send it."""
        async def add() -> Submission:
            row: Submission = await self._pool.run(
                self._outbox.add, manifest_uid, study_uid, path, replaces_uid=replaces_uid, now=self._clock.seconds()
            )
            self.log.info("manifest {manifest_uid} queued for registration{replacing}", manifest_uid=manifest_uid,
                          replacing=f", replacing {replaces_uid}" if replaces_uid else "")
            self.kick()
            return row

        return ensureDeferred(add())

    async def _reconcile(self) -> None:
        """Queue the manifests in force that have no outbox row (at start, on the pool)."""
        now = self._clock.seconds()
        try:
            added = await self._pool.run(lambda: self._outbox.reconcile(self._catalog.current_manifests, now=now))
        except (OSError, sqlite3.Error) as e:
            self.log.error("cannot look for unqueued manifests: {error}; trying again at the next start",
                           error=f"{type(e).__name__}: {e}")
            return
        except Exception:
            self.log.failure("looking for unqueued manifests crashed")
            return
        finally:
            self._reconciling = None
        self.log.info("{count} manifest(s) in force queued for registration at start", count=len(added))
        if added:
            self.kick()

    def manifest_built(self, built: Any) -> None:
        """``ManifestService`` ``on_built`` hook: queue the manifest made current."""
        record = built.stored.record
        d = self.enqueue(record.sop_instance_uid, record.study_instance_uid, built.stored.path, built.replaces)
        d.addErrback(lambda f: self.log.failure("cannot queue manifest {manifest_uid} for registration", f,
                                                manifest_uid=record.sop_instance_uid))

    def kick(self) -> None:
        """Look for due rows now (or right after the pass in progress)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        self._busy = True
        d = ensureDeferred(self._run())
        self._pass = d if self._busy else None  # a pass may end before ensureDeferred returns

    def when_idle(self) -> Deferred[None]:
        """Fires once no pass is in progress (tests)."""
        d: Deferred[None] = Deferred()
        if self._pass is None:
            d.callback(None)
        else:
            self._pass.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    # -- passes -----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while self.running:
                self._again = False
                rows = await self._pool.run(self._outbox.due, self._clock.seconds(), 10)
                for row in rows:
                    if not self.running:
                        break
                    await self._attempt(row)
                if not rows and not self._again:
                    break
            if self.running:
                await self._refresh()
                next_at = await self._pool.run(self._outbox.next_due_at)
                if next_at is not None:
                    delay = max(0.0, next_at - self._clock.seconds())
                    self._wakeup = self._clock.callLater(delay, self._wake)
        except Exception:
            self.log.failure("the XDS submitter pass crashed; retrying in {delay} s", delay=self._config.retry_initial)
            if self.running:
                self._wakeup = self._clock.callLater(self._config.retry_initial, self._wake)
        finally:
            self._busy = False
            self._pass = None

    def _wake(self) -> None:
        self._wakeup = None
        self.kick()

    async def _refresh(self) -> None:
        self.counts = await self._pool.run(self._outbox.counts)

    async def _attempt(self, row: Submission) -> None:
        now = self._clock.seconds()
        try:
            content_type, body = await self._pool.run(self._builder.prepare, row, now)
        except _Superseded as e:
            await self._pool.run(lambda: self._outbox.supersede(row.id, str(e), now=now))
            self.log.info("manifest {manifest_uid} not registered: {reason}", manifest_uid=row.manifest_uid,
                          reason=str(e))
            return
        except _Unbuildable as e:
            await self._settle(row, Answer(Outcome.PERMANENT, f"cannot build the request: {e}"), count=False)
            return
        except OSError as e:
            await self._settle(row, Answer(Outcome.TRANSIENT, f"cannot read the manifest: {e.strerror}"))
            return
        try:
            answer = await self._exchange(content_type, body)
        except CancelledError:
            if not self.running:
                return  # stopping: the row stays pending as it was
            raise
        await self._settle(row, answer)

    async def _exchange(self, content_type: str, body: bytes) -> Answer:
        request = ensureDeferred(self._post(content_type, body))
        request.addTimeout(self._config.timeout, self._clock)
        self._request = request
        try:
            return await request
        except DeferredTimeout:
            return Answer(Outcome.TRANSIENT, f"no answer within {self._config.timeout:g} s")
        except (ConnectError, ConnectionClosed, ResponseFailed, TimeoutError, OSError) as e:
            return Answer(Outcome.TRANSIENT, f"connection failed: {_short(type(e).__name__ + ': ' + str(e))}")
        finally:
            self._request = None

    async def _post(self, content_type: str, body: bytes) -> Answer:
        response = await self._http.post(
            self.post_url,
            data=body,
            headers={b"Content-Type": [content_type.encode("ascii")]},
        )
        data = await response.content()
        if len(data) > _MAX_ANSWER:
            return Answer(Outcome.TRANSIENT, f"answer of {len(data)} bytes refused")
        found = response.headers.getRawHeaders(b"content-type") or []
        answer_type = found[0].decode("latin-1") if found else None
        return judge(response.code, answer_type, data)

    async def _settle(self, row: Submission, answer: Answer, *, count: bool = True) -> None:
        now = self._clock.seconds()
        c = self._config
        if answer.outcome is Outcome.SUCCESS:
            await self._pool.run(lambda: self._outbox.registered(row.id, now=now))
            await self._audited(row)
            self.log.info("manifest {manifest_uid} registered ({reason}, entry {entry_uuid}{replacing})",
                          manifest_uid=row.manifest_uid, reason=answer.reason, entry_uuid=row.entry_uuid,
                          replacing=", RPLC" if (row.replaces or row.replaces_uid) else "")
        elif answer.outcome is Outcome.PERMANENT:
            await self._pool.run(lambda: self._outbox.fail(row.id, answer.reason, now=now, count=count))
            await self._audited(row, SERIOUS_FAILURE, answer.reason)
            self.log.error("manifest {manifest_uid} not registered: {reason}", manifest_uid=row.manifest_uid,
                           reason=answer.reason)
        else:
            state = await self._pool.run(lambda: self._outbox.retry(
                row.id, answer.reason, now=now, initial=c.retry_initial, maximum=c.retry_max,
                max_attempts=c.max_attempts))
            if state is State.FAILED:
                await self._audited(row, SERIOUS_FAILURE, answer.reason)
                self.log.error("manifest {manifest_uid} not registered after {attempts} attempts: {reason}",
                               manifest_uid=row.manifest_uid, attempts=c.max_attempts, reason=answer.reason)
            else:
                self.log.warn("manifest {manifest_uid}: {reason}; will retry", manifest_uid=row.manifest_uid,
                              reason=answer.reason)
        await self._refresh()

    async def _audited(self, row: Submission, outcome: int = 0, reason: str = "") -> None:
        """The ATNA record of a settled submission; its patient is read on the pool. Never raises."""
        try:
            patient = (await self._pool.run(patient_of_study, self._catalog, row.study_uid)
                       if self._catalog is not None else None)
        except Exception:
            patient = None  # the pool is stopping: recorded without the patient
        self._audit.submission_sent(self._config.repository_url, patient, row.submission_uuid, rad68=True,
                                    outcome=outcome, description=reason)


def make_http_client(reactor: Any, config: XdsConfig) -> Any:
    """
    A treq client for the repository: TLS trusting ``ca_file`` (the platform's roots if
    empty), with the client certificate and key if given; no persistent connections.
    """
    import treq
    from twisted.internet import ssl
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    trust, client_cert = client_tls_material(config.ca_file, config.client_cert, config.client_key)

    @implementer(IPolicyForHTTPS)
    class _Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=trust, clientCertificate=client_cert)

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=_Policy(), connectTimeout=config.timeout, pool=pool)
    return treq.client.HTTPClient(agent)
