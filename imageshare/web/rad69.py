"""``/xds/imaging-source``: RAD-69 Retrieve Imaging Document Set over SOAP 1.2 and MTOM.

:class:`Rad69Retriever` finds and produces the instances (blocking: catalog, files,
decoding); :class:`Rad69Handler` turns one HTTP body into one HTTP answer (transport checks,
SOAP faults, the RegistryResponse), also blocking; :class:`Rad69Resource` is the thin
Twisted adapter that runs the handler on a worker pool.

Transport problems are SOAP 1.2 faults (``../shared/docs/xds-i.md`` section 1): a body that
is not XML, refused by :mod:`imageshare.xds.safexml` (DOCTYPE, XXE, too deep...), a broken
MTOM package or a wrong media type -> ``Sender`` (400); a SOAP 1.1 envelope ->
``VersionMismatch`` (500); another action -> ``Sender`` with ``wsa:ActionNotSupported``;
a body over the limit -> 413 with a ``Sender`` fault. Everything about the documents is in
the RegistryResponse of a normal (200) MTOM answer, as is a request that is not valid
against the XDS-I.b schema (:mod:`imageshare.xds.schemas`): Failure with ``XDSIRequestError``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imageshare.audit.identity import served_record
from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.auth.guard import grant_for, principal_of
from imageshare.dicom import derived
from imageshare.fairqueue import FairQueue, QueueFull
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.logthrottle import RefusalLog
from imageshare.store.archive import Archive
from imageshare.store.records import InstanceRow, State
from imageshare.web.clients import ClientKey, peer_address
from imageshare.xds import mtom, rad69, safexml, schemas, soap
from imageshare.xds.responses import XDS_DOCUMENT_UNIQUE_ID_ERROR, XDS_REPOSITORY_ERROR, XDS_UNKNOWN_REPOSITORY_ID

__all__ = ["Answer", "Rad69Retriever", "Rad69Handler", "Rad69Resource", "DEFAULT_MAX_BODY"]

log = Logger(namespace="imageshare.xds.rad69")
# A client can provoke refusals as fast as it can send: one line per client (or fault) and status.
refusals = RefusalLog(log)

#: Largest request body accepted: a RAD-69 request is a list of UIDs, never large.
DEFAULT_MAX_BODY = 1024 * 1024
# Tries when an instance is replaced (re-received, transcoded) while it is being read.
_ATTEMPTS = 3
_FAULT_TYPE = soap.SOAP12_CONTENT_TYPE
_SOAP11_TYPES = ("text/xml", "application/xml")


@attrs.frozen
class Answer:
    """An HTTP answer: status, Content-Type and body."""

    status: int
    content_type: str
    body: bytes
    #: The instances returned, for the audit trail (``ServedRecord`` values).
    records: tuple[Any, ...] = attrs.field(default=(), eq=False, repr=False)


def _fault_answer(fault: soap.SoapFault, *, status: int | None = None, relates_to: str | None = None) -> Answer:
    return Answer(status or fault.http_status, _FAULT_TYPE, fault.to_bytes(relates_to=relates_to))


class Rad69Retriever:
    """Finds each requested instance and produces it in the first acceptable syntax.

    Blocking: call it on a worker pool.

    Parameters
    ----------
    catalog
        Where instances are found.
    archive
        Where their archived Part 10 files are.
    data_dir
        Root of the frames' codestream paths.
    public_url
        Base of the Pixel Data Provider URL of JPIP Referenced objects.
    repository_uid
        Our RepositoryUniqueId, the Retrieve Location UID our manifests carry
        (:class:`~imageshare.manifests.LocationUid`; blocking on first call).
    """

    def __init__(self, catalog: ICatalog, archive: Archive, data_dir: Path, *, public_url: str,
                 repository_uid: Callable[[], str], patients: Any = None) -> None:
        self._catalog = catalog
        # An imageshare.auth.patients.PatientAccess: tokens naming a patient see only theirs.
        self._patients = patients
        self._archive = archive
        self._data_dir = data_dir
        self._public_url = public_url
        self._repository_uid = repository_uid

    def __call__(self, request: rad69.RetrieveRequest, patient: str | None = None,
                 grants: Callable[[str], str | None] | None = None) -> list[rad69.Outcome]:
        """``grants``: ``study_uid -> URL grant`` for JPIP-referenced headers' Pixel Data Provider URLs."""
        ours = self._repository_uid()
        return [self._one(document, request.transfer_syntaxes, ours, patient, grants)
                for document in request.documents]

    def _one(self, document: rad69.DocumentRequest, syntaxes: tuple[str, ...], ours: str,
             patient: str | None = None, grants: Callable[[str], str | None] | None = None) -> rad69.Outcome:
        if document.repository_unique_id != ours:
            return rad69.Refused(document, XDS_UNKNOWN_REPOSITORY_ID,
                                 f"repository {document.repository_unique_id} is not this Imaging Document Source")
        for _ in range(_ATTEMPTS):
            row = self._catalog.get_instance(document.document_unique_id)
            if row is None or (row.study_instance_uid, row.series_instance_uid) != (
                document.study_instance_uid, document.series_instance_uid
            ):
                return rad69.Refused(document, XDS_DOCUMENT_UNIQUE_ID_ERROR,
                                     "no such instance in the requested study and series")
            if patient is not None and (self._patients is None
                                        or not self._patients.study_allowed(patient, row.study_instance_uid)):
                # Another patient's instance answers exactly as a missing one.
                return rad69.Refused(document, XDS_DOCUMENT_UNIQUE_ID_ERROR,
                                     "no such instance in the requested study and series")
            try:
                produced = self._produce(row, syntaxes, grants)
            except FileNotFoundError:
                continue  # replaced meanwhile: the files read are gone, read the new ones
            if self._catalog.get_instance(row.sop_instance_uid) != row:
                continue
            if produced is None:
                offered = "the archived syntax and Explicit VR Little Endian"
                if row.state is State.STREAMABLE:
                    offered += ", JPEG 2000 lossless and JPIP Referenced"
                return rad69.Refused(document, XDS_REPOSITORY_ERROR,
                                     f"DICOM transfer syntax not supported: none of the requested transfer "
                                     f"syntaxes can be produced for this instance (offered: {offered})")
            syntax, data = produced
            return rad69.Retrieved(document, syntax, data, served_record(self._catalog, row))
        return rad69.Refused(document, XDS_REPOSITORY_ERROR, "the instance changed while it was read; try again")

    def _produce(self, row: InstanceRow, syntaxes: tuple[str, ...],
                 grants: Callable[[str], str | None] | None = None) -> tuple[str, bytes] | None:
        wanted = rad69.candidates(syntaxes, streamable=row.state is State.STREAMABLE,
                                  original=row.transfer_syntax_uid)
        if not wanted:
            return None
        data = self._archive.path(row.path).read_bytes()
        original = None
        for syntax in wanted:
            if syntax == row.transfer_syntax_uid:
                return syntax, data  # the archived object, byte for byte
            if original is None:
                try:
                    original = derived.read_part10(data)
                except ValueError:  # InvalidDicomError is one too: only the original can go
                    continue
            try:
                return syntax, self._derive(row, original, syntax, grants)
            except derived.DerivationError as e:
                log.debug("{sop_instance_uid} cannot be produced in {syntax}: {reason}",
                          sop_instance_uid=row.sop_instance_uid, syntax=syntax, reason=str(e))
        return None

    def _derive(self, row: InstanceRow, original: Any, syntax: str,
                grants: Callable[[str], str | None] | None = None) -> bytes:
        if syntax in (rad69.JPIP_REFERENCED, rad69.JPIP_REFERENCED_DEFLATE):
            grant = grants(row.study_instance_uid) if grants is not None else None
            url = derived.jpip_url(self._public_url, row.sop_instance_uid, grant)
            ds = derived.jpip_referenced(original, self._catalog.frames(row.sop_instance_uid), url)
        elif syntax == rad69.JPEG2000_LOSSLESS:
            codestreams = [(self._data_dir / f.codestream_path).read_bytes()
                           for f in self._catalog.frames(row.sop_instance_uid)]
            ds = derived.jpeg2000_lossless(original, codestreams)
        else:
            ds = derived.native(original)
        return derived.encode(ds, syntax)


class Rad69Handler:
    """One HTTP request body in, one HTTP answer out. Blocking: call it on a worker pool.

    Parameters
    ----------
    retriever
        ``retriever(RetrieveRequest) -> list[Outcome]`` (a :class:`Rad69Retriever`).
    max_body
        Largest request body, in bytes.
    max_documents
        Most DocumentRequests in one request.
    """

    def __init__(self, retriever: Any, *, max_body: int = DEFAULT_MAX_BODY, max_documents: int = 1000) -> None:
        self._retriever = retriever
        self.max_body = max_body
        self._max_documents = max_documents

    def __call__(self, content_type: str | None, body: bytes, patient: str | None = None,
                 grants: Callable[[str], str | None] | None = None) -> Answer:
        try:
            envelope = self._envelope(content_type, body)
        except soap.SoapFault as fault:
            refusals.info(("fault", fault.code), "RAD-69 request refused: {code} {reason}",
                          code=fault.code, reason=fault.reason)
            return _fault_answer(fault)
        if envelope.action not in soap.RAD69_ACTIONS:
            fault = soap.SoapFault("Sender", f"action {envelope.action!r} is not supported at this endpoint "
                                             f"(expected {soap.RAD69})",
                                   subcode=f"{{{soap.WSA_NS}}}ActionNotSupported")
            refusals.info(("fault", fault.code), "RAD-69 request refused: {code} {reason}",
                          code=fault.code, reason=fault.reason)
            return _fault_answer(fault, relates_to=envelope.message_id)
        if envelope.body.tag != rad69.REQUEST_TAG:
            fault = soap.SoapFault("Sender", "the SOAP Body does not hold a RetrieveImagingDocumentSetRequest")
            return _fault_answer(fault, relates_to=envelope.message_id)
        outcomes: list[rad69.Outcome] = []
        try:
            invalid = schemas.validate_payload(envelope.body)
            if invalid:
                raise rad69.RequestError(schemas.summary(envelope.body, invalid))
            request = rad69.parse_request(envelope.body, max_documents=self._max_documents)
        except rad69.RequestError as e:
            refusals.info(("error",), "RAD-69 request error: {reason}", reason=str(e))
            payload, attachments = rad69.build_response([], request_error=str(e))
        else:
            restrictions: dict[str, Any] = {}
            if patient is not None:
                restrictions["patient"] = patient
            if grants is not None:
                restrictions["grants"] = grants
            outcomes = self._retriever(request, **restrictions)
            payload, attachments = rad69.build_response(outcomes)
            log.info("RAD-69: {found} of {requested} document(s) returned",
                     found=len(attachments), requested=len(outcomes))
        xml = soap.build_response(soap.RAD69_RESPONSE, envelope.message_id, payload)
        media, packaged = mtom.build(xml, attachments)
        served = tuple(o.record for o in outcomes if isinstance(o, rad69.Retrieved) and o.record is not None)
        return Answer(200, media, packaged, served)

    def _envelope(self, content_type: str | None, body: bytes) -> soap.Envelope:
        """The checked envelope of the request, or the SoapFault to answer."""
        if len(body) > self.max_body:
            raise soap.SoapFault("Sender", f"the request body exceeds {self.max_body} bytes")
        if not content_type:
            raise soap.SoapFault("Sender", "the request has no Content-Type")
        media = content_type.split(";", 1)[0].strip().lower()
        try:
            if media in _SOAP11_TYPES:
                # A SOAP 1.1 client: say VersionMismatch if it is a 1.1 envelope indeed.
                root = safexml.parse(body, max_bytes=self.max_body)
                soap.parse_envelope(root, request=True)
                raise soap.SoapFault("Sender", f"SOAP 1.2 is sent as application/soap+xml or MTOM, not {media}")
            xml, _attachments = mtom.parse(content_type, body, max_bytes=self.max_body)
            root = safexml.parse(xml, max_bytes=self.max_body)
        except safexml.UnsafeXml as e:
            raise soap.SoapFault("Sender", f"XML refused ({e.reason}): {e}") from None
        except mtom.MtomError as e:
            raise soap.SoapFault("Sender", f"bad MTOM/XOP package: {e}") from None
        return soap.parse_envelope(root, request=True)


class Rad69Resource(Resource):
    """``/xds/imaging-source``: POST only; the handler runs on the queue's pool.

    Parameters
    ----------
    handler
        ``handler(content_type, body) -> Answer``, blocking (a :class:`Rad69Handler`); its
        ``max_body`` attribute, if any, bounds the request body (413 beyond).
    queue
        Where it runs (the WADO pool's queue, shared with WADO-URI): clients take turns,
        and a client with too many requests waiting gets 503 at once.
    client_key
        Names the client of a request (the peer address).
    audit
        Where each answer that returned instances is recorded (110104 R, EventTypeCode
        RAD-69): one message per request, its instances by study, with their patient.
    """

    isLeaf = True

    def __init__(self, handler: Any, queue: FairQueue, *, client_key: ClientKey = peer_address,
                 audit: AuditTrail = NO_AUDIT) -> None:
        super().__init__()
        self._audit = audit
        self._handler = handler
        self._queue = queue
        self._client_key = client_key
        self._max_body = int(getattr(handler, "max_body", DEFAULT_MAX_BODY))

    def render(self, request: Request) -> int | bytes:
        if request.postpath and request.postpath != [b""]:
            return self._plain(request, 404, "RAD-69 is served at /xds/imaging-source only")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return self._plain(request, 405, "RAD-69 is a SOAP 1.2 POST")
        return super().render(request)  # type: ignore[no-any-return]

    def render_POST(self, request: Request) -> int | bytes:
        body = self._body(request)
        if body is None:
            fault = soap.SoapFault("Sender", f"the request body exceeds {self._max_body} bytes")
            client = self._client_key(request)
            refusals.info((client, 413), "RAD-69 request from {client} refused: body over {limit} bytes",
                          client=client, limit=self._max_body)
            return self._send(request, _fault_answer(fault, status=413))
        header = request.getHeader(b"content-type")
        content_type = header.decode("latin-1") if header is not None else None
        principal = principal_of(request)
        handler = self._handler
        if principal is not None and principal.patient is not None:
            handler = functools.partial(handler, patient=principal.patient)
        issue = grant_for(request)
        if issue is not None:  # JPIP-referenced headers' URLs carry a grant for their study
            handler = functools.partial(handler, grants=issue)
        try:
            d = self._queue.submit(self._client_key(request), handler, content_type, body)
        except QueueFull as e:
            client = self._client_key(request)
            refusals.info((client, 503), "RAD-69 request from {client} refused: {reason}",
                          client=client, reason=e.reason)
            request.setHeader(b"retry-after", str(e.retry_after).encode("ascii"))
            fault = soap.SoapFault("Receiver", e.reason)
            return self._send(request, _fault_answer(fault, status=503))
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)
        # A client that goes away takes its waiting request out of the queue.
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(result: Answer | Failure) -> None:
            if finished or (isinstance(result, Failure) and result.check(CancelledError)):
                return  # the client went away: its job was dropped, or its answer is not wanted
            if not isinstance(result, Answer):
                log.failure("RAD-69 request failed", result)
                result = _fault_answer(soap.SoapFault("Receiver", "internal error"))
            request.write(self._send(request, result))
            request.finish()
            if result.records:
                self._audit.instances_served("RAD-69", peer_address(request), result.records, principal)

        d.addBoth(done)
        return NOT_DONE_YET

    def _body(self, request: Request) -> bytes | None:
        """The body, or ``None`` if it is over the limit (announced or actual)."""
        length = request.getHeader(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self._max_body:
            return None
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read(self._max_body + 1)
        return None if len(data) > self._max_body else data

    @staticmethod
    def _send(request: Request, answer: Answer) -> bytes:
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return answer.body

    @staticmethod
    def _plain(request: Request, status: int, reason: str) -> bytes:
        client = peer_address(request)
        refusals.info((client, status), "RAD-69 request from {client} refused: {status} {reason}",
                      client=client, status=status, reason=reason)
        body = reason.encode("ascii") + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        return body
