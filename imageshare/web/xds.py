"""
``/xds/repository`` (ITI-41, ITI-43) and ``/xds/registry`` (ITI-42, ITI-18): the embedded
XDS.b Document Repository and Document Registry.

:class:`XdsEndpoint` is the blocking core (parse, check, store, answer); it runs on a
worker pool. :class:`SoapResource` is the thin Twisted adapter: it bounds the body, hands
it to the pool and writes the answer.

Errors are answered at the level they belong to (``../shared/docs/xds-i.md`` sections 1, 7,
8): what breaks the transport (not MTOM where MTOM is required, malformed or hostile XML,
SOAP 1.1, an action this endpoint does not serve) is a SOAP 1.2 fault; what is wrong in
the metadata is a ``RegistryResponse`` with status Failure and the XDS error codes. A payload
that is not valid against the XDS.b / ebRS schemas (:mod:`imageshare.xds.schemas`, section
9 B) is refused before the section 9 checks: ITI-41 ``XDSRepositoryMetadataError``, ITI-42
and ITI-18 ``XDSRegistryMetadataError``, ITI-43 ``XDSRepositoryError``.

A token restricted to one patient (``patient``: its CX ``ID^^^&OID&ISO``, passed to
:meth:`XdsEndpoint.repository` and :meth:`XdsEndpoint.registry` by :class:`SoapResource`)
reads that patient's objects only, matched on the stored ``patientId``: another patient's
registry objects are left out of ITI-18 answers as if they did not exist, and another
patient's document is answered by ITI-43 exactly as an unknown one
(``XDSDocumentUniqueIdError``). Such a token never writes: the guard refuses ITI-41/42 with
403 before they get here, and these handlers refuse them again (HTTP 403) should one slip
through (a Content-Type action that disagrees with the envelope's).

A submission sent again (its answer was lost) is not registered twice: it gets Failure with
``XDSDuplicateUniqueIdInRegistry`` only, which is what a standard registry answers (ITI TF-3
4.2.4) and what the outbox reads as "already registered".
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import attrs
from lxml import etree
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from imageshare.audit.messages import MINOR_FAILURE, SUCCESS
from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.auth import authorised_as_read
from imageshare.auth.guard import principal_of
from imageshare.logsafe import Logger
from imageshare.web.clients import peer_address
from imageshare.xds import metadata as md
from imageshare.xds import mtom, registry, safexml, schemas, soap
from imageshare.xds.responses import RegistryError, Severity, Status, registry_response
from imageshare.xds.store import XdsStore
from imageshare.workers import WorkerPoolService

__all__ = [
    "Answer", "SoapResource", "XdsEndpoint", "DEFAULT_MAX_BODY", "SCHEMA_CONTEXT_LENGTH",
    "domain_authorities", "schema_error",
]

DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: Longest codeContext of a schema error.
SCHEMA_CONTEXT_LENGTH = 200
_FAULT_TYPE = soap.SOAP12_CONTENT_TYPE
_ACTION_NOT_SUPPORTED = f"{{{soap.WSA_NS}}}ActionNotSupported"


@attrs.frozen
class Answer:
    """An HTTP answer: status, Content-Type and body."""

    status: int
    content_type: str
    body: bytes
    #: ITI-43: the (document uniqueId, repository uniqueId) pairs returned, for the audit trail.
    documents: tuple[tuple[str, str], ...] = attrs.field(default=(), eq=False, repr=False)
    #: Its audit outcome: 0, or 4 when some requested documents were not returned.
    outcome: int = attrs.field(default=SUCCESS, eq=False, repr=False)


#: ITI-41/42 with a token restricted to one patient (the guard refuses them first).
_PATIENT_WRITE_REFUSED = Answer(403, "text/plain; charset=utf-8",
                                b"a token restricted to one patient cannot submit documents\n")
_ACTION_NOT_AUTHORISED = Answer(403, "text/plain; charset=utf-8",
                                b"the envelope's action is not the one the request was authorised for\n")


def domain_authorities(xds_config: Any, location_uid: Callable[[], str]) -> Callable[[], frozenset[str]]:
    """
    The patient ID assigning authorities the embedded registry knows: the configured Affinity
    Domain's (``[xds] patient_authority`` or its standalone default, and the OIDs issuers are
    mapped to). There is no Patient Identity Feed here: any patient of these is "known".
    Blocking the first time (the Retrieve Location UID may come from the catalog).
    """
    cached: list[frozenset[str]] = []

    def authorities() -> frozenset[str]:
        if not cached:
            domain = xds_config.domain(location_uid())
            cached.append(frozenset({domain.patient_authority, *(oid for _issuer, oid in domain.issuer_authorities)}))
        return cached[0]

    return authorities


def _fault(fault: soap.SoapFault, relates_to: str | None = None) -> Answer:
    return Answer(fault.http_status, _FAULT_TYPE, fault.to_bytes(relates_to=relates_to))


def schema_error(payload: etree._Element, code: str) -> RegistryError | None:
    """
    The RegistryError for a schema-invalid payload (xds-i.md 9 B), or ``None`` if valid.

    Its codeContext is :func:`imageshare.xds.schemas.summary` (the first error, at most
    :data:`SCHEMA_CONTEXT_LENGTH` characters).
    """
    errors = schemas.validate_payload(payload)
    if not errors:
        return None
    context = schemas.summary(payload, errors, SCHEMA_CONTEXT_LENGTH)
    return RegistryError(code, context)


def _text(element: etree._Element, tag: str) -> str:
    found = element.find(f"{{{md.XDS}}}{tag}")
    return (found.text or "").strip() if found is not None else ""


class XdsEndpoint:
    """
    The repository and the registry, as blocking request handlers.

    Parameters
    ----------
    store
        Where documents and registry objects are kept.
    repository_uid
        Returns this repository's uniqueId (may block the first time).
    patient_authorities
        Returns the assigning authorities of the patient IDs the registry accepts (``None``:
        any ``ID^^^&OID&ISO``); may block.
    max_body
        Largest SOAP message (MTOM package or plain XML) parsed, as ``[xds] max_body``.
    """

    log = Logger(namespace="imageshare.xds")

    def __init__(
        self,
        store: XdsStore,
        repository_uid: Callable[[], str],
        *,
        patient_authorities: Callable[[], frozenset[str] | None] = lambda: None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self._store = store
        self._max_body = max_body
        self._repository_uid = repository_uid
        self._authorities = patient_authorities

    # ------------------------------------------------------------------ envelope

    def _receive(self, content_type: str, body: bytes) -> tuple[soap.Envelope, mtom.Attachments, bool]:
        is_mtom = mtom.is_mtom(content_type)
        if is_mtom:
            try:
                xml, attachments = mtom.parse(content_type, body, max_bytes=self._max_body)
            except mtom.MtomError as e:
                raise soap.SoapFault("Sender", f"malformed MTOM/XOP package: {e}") from None
        else:
            xml, attachments = body, {}
        try:
            root = safexml.parse(xml, max_bytes=self._max_body)
        except safexml.UnsafeXml as e:
            raise soap.SoapFault("Sender", f"XML refused ({e.reason}): {e}") from None
        return soap.parse_envelope(root, request=True), attachments, is_mtom

    def _dispatch(self, content_type: str, body: bytes, handlers: dict[str, Callable[..., Answer]],
                  patient: str | None, read: str | None = None) -> Answer:
        try:
            envelope, attachments, is_mtom = self._receive(content_type, body)
        except soap.SoapFault as fault:
            self.log.info("SOAP fault {code}: {reason}", code=fault.code, reason=fault.reason)
            return _fault(fault)
        if read is not None and envelope.action != read:
            # Let in with the read scope for the action its Content-Type or first bytes named:
            # an envelope asking for anything else (a write) is refused.
            self.log.info("SOAP request let in for {read} asks for {action}: refused", read=read,
                          action=envelope.action)
            return _ACTION_NOT_AUTHORISED
        handler = handlers.get(envelope.action or "")
        if handler is None:
            fault = soap.SoapFault(
                "Sender", f"action {envelope.action!r} is not served here", subcode=_ACTION_NOT_SUPPORTED
            )
            self.log.info("SOAP fault: action {action} not served here", action=envelope.action)
            return _fault(fault, envelope.message_id)
        try:
            return handler(envelope, attachments, is_mtom, patient)
        except soap.SoapFault as fault:
            self.log.info("SOAP fault {code}: {reason}", code=fault.code, reason=fault.reason)
            return _fault(fault, envelope.message_id)

    @staticmethod
    def _expect(envelope: soap.Envelope, tag: str, *, mtom_required: bool = False, is_mtom: bool = True) -> None:
        if mtom_required and not is_mtom:
            raise soap.SoapFault("Sender", "this transaction must be sent as an MTOM/XOP package")
        if envelope.body.tag != tag:
            raise soap.SoapFault(
                "Sender", f"the body {etree.QName(envelope.body).localname} does not match the action {envelope.action}"
            )

    # ------------------------------------------------------------------ repository

    def repository(self, content_type: str, body: bytes, *, patient: str | None = None,
                   read: str | None = None) -> Answer:
        """Answer a POST to ``/xds/repository`` (ITI-41 or ITI-43); ``patient``: the token's, if it names one."""
        return self._dispatch(content_type, body, {soap.ITI41: self._provide, soap.ITI43: self._retrieve}, patient,
                              read)

    def _provide(self, envelope: soap.Envelope, attachments: mtom.Attachments, is_mtom: bool,
                 patient: str | None) -> Answer:
        if patient is not None:
            return _PATIENT_WRITE_REFUSED
        self._expect(envelope, f"{{{md.XDS}}}ProvideAndRegisterDocumentSetRequest", mtom_required=True, is_mtom=is_mtom)
        invalid = schema_error(envelope.body, registry.REPOSITORY_METADATA_ERROR)
        documents: list[registry.Provided] = []
        if invalid is not None:
            errors = [invalid]
        else:
            uid = self._repository_uid()
            try:
                submit, documents = registry.provide(envelope.body, attachments, uid)
                submission = registry.parse_submission(submit, patient_authorities=self._authorities())
                errors = self._store.provide_and_register(documents, uid, submission)
            except registry.SubmissionRejected as rejected:
                errors = list(rejected.errors)
        if errors:
            response = registry_response(Status.FAILURE, errors)
            self.log.info("ITI-41 refused: {codes}", codes=", ".join(e.code for e in errors))
        else:
            response = registry_response(Status.SUCCESS)
            self.log.info("ITI-41: {count} document(s) stored and registered", count=len(documents))
        envelope_bytes = soap.build_response(soap.ITI41_RESPONSE, envelope.message_id, response)
        content_type, packaged = mtom.build(envelope_bytes, {})
        return Answer(200, content_type, packaged)

    def _retrieve(self, envelope: soap.Envelope, attachments: mtom.Attachments, is_mtom: bool,
                  patient: str | None) -> Answer:
        self._expect(envelope, f"{{{md.XDS}}}RetrieveDocumentSetRequest", mtom_required=True, is_mtom=is_mtom)
        uid = self._repository_uid()
        errors: list[RegistryError] = []
        found: list[tuple[etree._Element, str, bytes]] = []
        invalid = schema_error(envelope.body, "XDSRepositoryError")
        requests = [] if invalid is not None else list(envelope.body.iterchildren(f"{{{md.XDS}}}DocumentRequest"))
        if invalid is not None:
            errors.append(invalid)
        elif not requests:
            errors.append(RegistryError("XDSRepositoryError", "no DocumentRequest"))
        for request in requests:
            repository, document = _text(request, "RepositoryUniqueId"), _text(request, "DocumentUniqueId")
            if repository != uid:
                errors.append(RegistryError("XDSUnknownRepositoryId", "unknown repositoryUniqueId", repository))
                continue
            stored = self._store.document(document, patient=patient)
            if stored is None:  # or another patient's: the same answer
                errors.append(RegistryError("XDSDocumentUniqueIdError", "no such document", document))
                continue
            found.append((request, stored[1], stored[2]))
        status = Status.SUCCESS if not errors else Status.PARTIAL_SUCCESS if found else Status.FAILURE
        response = etree.Element(f"{{{md.XDS}}}RetrieveDocumentSetResponse", nsmap={"xds": md.XDS})
        response.append(registry_response(status, errors))
        parts: mtom.Attachments = {}
        for n, (request, mime_type, data) in enumerate(found):
            item = etree.SubElement(response, f"{{{md.XDS}}}DocumentResponse")
            for tag in ("HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId"):
                value = _text(request, tag)
                if value:
                    etree.SubElement(item, f"{{{md.XDS}}}{tag}").text = value
            etree.SubElement(item, f"{{{md.XDS}}}mimeType").text = mime_type
            cid = f"doc{n}.{uuid.uuid4()}@imageshare"
            mtom.include(etree.SubElement(item, f"{{{md.XDS}}}Document"), cid)
            parts[cid] = (mime_type, data)
        self.log.info("ITI-43: {returned} of {requested} document(s) returned", returned=len(found), requested=len(requests))
        envelope_bytes = soap.build_response(soap.ITI43_RESPONSE, envelope.message_id, response)
        content_type, packaged = mtom.build(envelope_bytes, parts)
        served = tuple((_text(request, "DocumentUniqueId"), uid) for request, _, _ in found)
        return Answer(200, content_type, packaged, served, MINOR_FAILURE if errors else SUCCESS)

    # ------------------------------------------------------------------ registry

    def registry(self, content_type: str, body: bytes, *, patient: str | None = None,
                 read: str | None = None) -> Answer:
        """Answer a POST to ``/xds/registry`` (ITI-42 or ITI-18); ``patient``: the token's, if it names one."""
        return self._dispatch(content_type, body, {soap.ITI42: self._register, soap.ITI18: self._query}, patient,
                              read)

    def _register(self, envelope: soap.Envelope, attachments: mtom.Attachments, is_mtom: bool,
                  patient: str | None) -> Answer:
        if patient is not None:
            return _PATIENT_WRITE_REFUSED
        self._expect(envelope, f"{{{md.LCM}}}SubmitObjectsRequest")
        invalid = schema_error(envelope.body, registry.METADATA_ERROR)
        try:
            if invalid is not None:
                raise registry.SubmissionRejected([invalid])
            submission = registry.parse_submission(envelope.body, patient_authorities=self._authorities())
            errors = self._store.register(submission)
        except registry.SubmissionRejected as rejected:
            errors = list(rejected.errors)
        response = registry_response(Status.FAILURE, errors) if errors else registry_response(Status.SUCCESS)
        self.log.info("ITI-42: {outcome}", outcome=", ".join(e.code for e in errors) or "registered")
        return Answer(200, soap.SOAP12_CONTENT_TYPE, soap.build_response(soap.ITI42_RESPONSE, envelope.message_id, response))

    def _query(self, envelope: soap.Envelope, attachments: mtom.Attachments, is_mtom: bool,
               patient: str | None) -> Answer:
        self._expect(envelope, f"{{{registry.QUERY}}}AdhocQueryRequest")
        invalid = schema_error(envelope.body, registry.METADATA_ERROR)
        if invalid is not None:
            self.log.info("ITI-18 refused: {code} (schema)", code=invalid.code)
            response = registry.query_failure([invalid])
            return Answer(
                200, soap.SOAP12_CONTENT_TYPE, soap.build_response(soap.ITI18_RESPONSE, envelope.message_id, response)
            )
        try:
            query = registry.parse_query(envelope.body)
            response = registry.query_response(self._run(query, patient), query.return_type)
            self.log.info("ITI-18 {query_id}: {count} object(s)", query_id=query.query_id, count=len(response[0]))
        except registry.QueryError as e:
            response = registry.query_failure([RegistryError(e.code, e.context, "", Severity.ERROR)])
            self.log.info("ITI-18 refused: {code}", code=e.code)
        return Answer(200, soap.SOAP12_CONTENT_TYPE, soap.build_response(soap.ITI18_RESPONSE, envelope.message_id, response))

    def _run(self, query: registry.StoredQuery, token_patient: str | None = None) -> list[etree._Element]:
        """The objects a stored query finds; with ``token_patient``, that patient's only."""
        if query.query_id in (registry.FIND_DOCUMENTS, registry.FIND_DOCUMENTS_BY_REFERENCE_ID):
            patient, statuses = registry.find_documents_filters(query)
            if token_patient is not None and patient != token_patient:
                return []  # another patient's: as for a patient with no documents
            rows = [(e, s) for e, s in self._store.find_entries(patient, statuses) if registry.entry_matches(e, query)]
            return [registry.leaf_class(e.xml, s) for e, s in rows]
        if query.query_id == registry.GET_DOCUMENTS:
            uuids = query.values("$XDSDocumentEntryEntryUUID")
            unique_ids = query.values("$XDSDocumentEntryUniqueId")
            if bool(uuids) == bool(unique_ids):
                raise registry.QueryError(
                    "XDSStoredQueryParamNumber", "give $XDSDocumentEntryEntryUUID or $XDSDocumentEntryUniqueId"
                )
            rows = self._store.entries(uuids=uuids, unique_ids=unique_ids)
            return [registry.leaf_class(e.xml, s) for e, s in rows
                    if token_patient is None or e.patient_id == token_patient]
        uuids = query.values("$uuid")  # GetSubmissionSets
        if not uuids:
            raise registry.QueryError("XDSStoredQueryMissingParam", "$uuid is required")
        if token_patient is not None:
            # A submission set holds one patient's entries (checked on registration): keep the
            # entries of the token's patient, and so only that patient's sets and associations.
            uuids = [e.entry_uuid for e, _ in self._store.entries(uuids=uuids) if e.patient_id == token_patient]
        sets, associations = self._store.submission_sets_of(uuids)
        return [registry.leaf_class(xml, status) for xml, status in sets + associations]


class SoapResource(Resource):
    """
    POST-only SOAP endpoint: the body (bounded) is answered by ``handler`` on ``pool``.

    Parameters
    ----------
    handler
        ``(content_type, body, *, patient) -> Answer``; blocking. ``patient`` is the CX patient
        ID the request's token is restricted to (``None``: not restricted, or access control
        off): the handler must show that patient's objects only.
    pool
        Where ``handler`` runs.
    max_body
        Larger bodies get HTTP 413.
    audit
        Where an ITI-43 answer that returned documents is recorded (110106 R, ITI-43).
    """

    isLeaf = True
    log = Logger(namespace="imageshare.xds")

    def __init__(self, handler: Callable[..., Answer], pool: WorkerPoolService, *, max_body: int = DEFAULT_MAX_BODY,
                 audit: AuditTrail = NO_AUDIT) -> None:
        super().__init__()
        self._audit = audit
        self._handler = handler
        self._pool = pool
        self._max_body = max_body

    def render_POST(self, request: Request) -> int | bytes:
        length = request.getHeader(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self._max_body):
            request.setResponseCode(413, b"Request Entity Too Large")
            request.setHeader(b"content-type", b"text/plain")
            return b"request body exceeds the limit\n"
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)
        principal = principal_of(request)
        patient = principal.patient if principal is not None else None
        d = self._pool.run(self._handle, request.content, content_type, patient, authorised_as_read(request))

        def respond(answer: Answer) -> None:
            if finished:
                return
            request.setResponseCode(answer.status)
            request.setHeader(b"content-type", answer.content_type.encode("latin-1"))
            request.write(answer.body)
            request.finish()
            if answer.documents:  # ITI-43 returned documents
                self._audit.documents_served(peer_address(request), answer.documents, principal_of(request),
                                             outcome=answer.outcome)

        def fail(failure: Any) -> None:
            self.log.failure("XDS request failed", failure)
            if finished:
                return
            fault = soap.SoapFault("Receiver", "internal error")
            request.setResponseCode(500)
            request.setHeader(b"content-type", _FAULT_TYPE.encode())
            request.write(fault.to_bytes())
            request.finish()

        d.addCallbacks(respond, fail)
        return NOT_DONE_YET

    def _handle(self, content: Any, content_type: str, patient: str | None, read: str | None) -> Answer:
        content.seek(0)
        body = content.read(self._max_body + 1)
        if len(body) > self._max_body:
            return Answer(413, "text/plain", b"request body exceeds the limit\n")
        return self._handler(content_type, body, patient=patient, read=read)
