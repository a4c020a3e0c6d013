"""RAD-69 Retrieve Imaging Document Set: the request, the choice of syntax, the response (pure).

The request (``../shared/docs/xds-i.md`` section 5) names instances by study, series,
repository and SOP Instance UID, and lists the transfer syntaxes the consumer accepts in
its order of preference. Each instance is answered in the first of them we can produce
(:func:`candidates`), or with an error for that instance alone; the response is an ITI-43
``xds:RetrieveDocumentSetResponse`` whose documents are MTOM/XOP attachments.

Error codes (xds-i.md section 5, as the NIST IDS tests expect them):

``XDSUnknownRepositoryId``
    The RepositoryUniqueId is not ours (not the Retrieve Location UID of our manifests).
``XDSDocumentUniqueIdError``
    No such instance, or it is not in the requested study and series.
``XDSRepositoryError``
    None of the requested transfer syntaxes can be produced for it (RAD69-005).
``XDSIRequestError``
    The request itself is unusable (no study, an empty UID...): the whole request fails.

Values in, values out: nothing here reads the catalog or touches Twisted.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import attrs
from lxml import etree

from imageshare.xds import mtom
from imageshare.xds.responses import RegistryError, Status, registry_response

__all__ = [
    "IHERAD_NS",
    "XDS_NS",
    "DICOM_MIME",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "JPIP_REFERENCED",
    "JPIP_REFERENCED_DEFLATE",
    "JPEG2000_LOSSLESS",
    "REQUEST_TAG",
    "XDSI_REQUEST_ERROR",
    "DocumentRequest",
    "RetrieveRequest",
    "RequestError",
    "Retrieved",
    "Refused",
    "Outcome",
    "parse_request",
    "build_request",
    "candidates",
    "build_response",
    "overall_status",
]

IHERAD_NS = "urn:ihe:rad:xdsi-b:2009"
XDS_NS = "urn:ihe:iti:xds-b:2007"
DICOM_MIME = "application/dicom"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
# Syntaxes made from our codestreams: only for instances the transcoder made streamable.
_FROM_CODESTREAMS = frozenset({JPIP_REFERENCED, JPIP_REFERENCED_DEFLATE, JPEG2000_LOSSLESS})

#: NIST XDS Toolkit's code for an unusable RAD-69 request (xds-i.md section 5).
XDSI_REQUEST_ERROR = "XDSIRequestError"

REQUEST_TAG = f"{{{IHERAD_NS}}}RetrieveImagingDocumentSetRequest"
_STUDY = f"{{{IHERAD_NS}}}StudyRequest"
_SERIES = f"{{{IHERAD_NS}}}SeriesRequest"
_SYNTAX_LIST = f"{{{IHERAD_NS}}}TransferSyntaxUIDList"
_SYNTAX = f"{{{IHERAD_NS}}}TransferSyntaxUID"
_DOCUMENT_REQUEST = f"{{{XDS_NS}}}DocumentRequest"
_HOME = f"{{{XDS_NS}}}HomeCommunityId"
_REPOSITORY = f"{{{XDS_NS}}}RepositoryUniqueId"
_DOCUMENT = f"{{{XDS_NS}}}DocumentUniqueId"
_RESPONSE = f"{{{XDS_NS}}}RetrieveDocumentSetResponse"
_DOCUMENT_RESPONSE = f"{{{XDS_NS}}}DocumentResponse"
_MIME = f"{{{XDS_NS}}}mimeType"
_DOCUMENT_CONTENT = f"{{{XDS_NS}}}Document"
# rim:LongName, the type of every identifier in the request.
_MAX_ID = 256


class RequestError(ValueError):
    """The RAD-69 request cannot be served at all; the message says why (safe to return)."""


@attrs.frozen
class DocumentRequest:
    """One requested instance, with the study and series it was asked under."""

    study_instance_uid: str
    series_instance_uid: str
    repository_unique_id: str
    document_unique_id: str  # the SOP Instance UID
    home_community_id: str | None = None


@attrs.frozen
class RetrieveRequest:
    """A parsed RetrieveImagingDocumentSetRequest: documents in request order, and the
    acceptable transfer syntaxes in the consumer's order of preference (duplicates dropped)."""

    documents: tuple[DocumentRequest, ...]
    transfer_syntaxes: tuple[str, ...]


@attrs.frozen
class Retrieved:
    """A document found and produced: its Part 10 bytes in ``transfer_syntax``."""

    request: DocumentRequest
    transfer_syntax: str
    data: bytes
    #: What the audit trail records of it (the producer's catalog row and patient), if given.
    record: object = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Refused:
    """A document not returned, and the error that says why."""

    request: DocumentRequest
    code: str
    context: str


Outcome = Retrieved | Refused


def _identifier(element: etree._Element | None, what: str) -> str:
    if element is None:
        raise RequestError(f"{what} is missing")
    if len(element):
        raise RequestError(f"{what} must hold text only")
    value = (element.text or "").strip()
    if not value:
        raise RequestError(f"{what} is empty")
    if len(value) > _MAX_ID:
        raise RequestError(f"{what} is longer than {_MAX_ID} characters")
    return value


def _attribute(element: etree._Element, name: str, what: str) -> str:
    value = (element.get(name) or "").strip()
    if not value:
        raise RequestError(f"{what} has no {name}")
    if len(value) > _MAX_ID:
        raise RequestError(f"{what} {name} is longer than {_MAX_ID} characters")
    return value


def _only(parent: etree._Element, tag: str, what: str) -> etree._Element | None:
    found = parent.findall(tag)
    if len(found) > 1:
        raise RequestError(f"{what} occurs more than once")
    return found[0] if found else None


def parse_request(payload: etree._Element, *, max_documents: int = 1000) -> RetrieveRequest:
    """Read a ``iherad:RetrieveImagingDocumentSetRequest`` (the SOAP body's payload).

    An empty or missing TransferSyntaxUIDList is not a request error: every document then
    fails on its own with ``XDSRepositoryError``, as the NIST tests expect.

    Parameters
    ----------
    payload
        The payload element.
    max_documents
        More DocumentRequests than this are refused (the response is held in memory).

    Raises
    ------
    RequestError
        Wrong element, no StudyRequest / SeriesRequest / DocumentRequest, an empty or
        missing UID, an identifier that is not plain text, or too many documents.
    """
    if payload.tag != REQUEST_TAG:
        raise RequestError(f"expected iherad:RetrieveImagingDocumentSetRequest, got {etree.QName(payload).localname}")
    studies = payload.findall(_STUDY)
    if not studies:
        raise RequestError("the request has no StudyRequest")
    documents: list[DocumentRequest] = []
    for study in studies:
        study_uid = _attribute(study, "studyInstanceUID", "a StudyRequest")
        series_list = study.findall(_SERIES)
        if not series_list:
            raise RequestError("a StudyRequest has no SeriesRequest")
        for series in series_list:
            series_uid = _attribute(series, "seriesInstanceUID", "a SeriesRequest")
            requests = series.findall(_DOCUMENT_REQUEST)
            if not requests:
                raise RequestError("a SeriesRequest has no DocumentRequest")
            for request in requests:
                if len(documents) >= max_documents:
                    raise RequestError(f"more than {max_documents} documents in one request")
                home = _only(request, _HOME, "HomeCommunityId")
                documents.append(
                    DocumentRequest(
                        study_instance_uid=study_uid,
                        series_instance_uid=series_uid,
                        repository_unique_id=_identifier(_only(request, _REPOSITORY, "RepositoryUniqueId"),
                                                         "RepositoryUniqueId"),
                        document_unique_id=_identifier(_only(request, _DOCUMENT, "DocumentUniqueId"),
                                                       "DocumentUniqueId"),
                        home_community_id=_identifier(home, "HomeCommunityId") if home is not None else None,
                    )
                )
    syntaxes: list[str] = []
    syntax_list = _only(payload, _SYNTAX_LIST, "TransferSyntaxUIDList")
    if syntax_list is not None:
        for element in syntax_list.findall(_SYNTAX):
            value = _identifier(element, "TransferSyntaxUID")
            if value not in syntaxes:
                syntaxes.append(value)
    return RetrieveRequest(tuple(documents), tuple(syntaxes))


def build_request(documents: Iterable[DocumentRequest], transfer_syntaxes: Sequence[str]) -> etree._Element:
    """Build a RetrieveImagingDocumentSetRequest payload (the consumer side; used in tests).

    Documents are grouped by study, then series, keeping their first-seen order.
    """
    root = etree.Element(REQUEST_TAG, nsmap={"iherad": IHERAD_NS, "xds": XDS_NS})
    studies: dict[str, tuple[etree._Element, dict[str, etree._Element]]] = {}
    for document in documents:
        if document.study_instance_uid not in studies:
            element = etree.SubElement(root, _STUDY, studyInstanceUID=document.study_instance_uid)
            studies[document.study_instance_uid] = (element, {})
        study, series_elements = studies[document.study_instance_uid]
        if document.series_instance_uid not in series_elements:
            series_elements[document.series_instance_uid] = etree.SubElement(
                study, _SERIES, seriesInstanceUID=document.series_instance_uid
            )
        request = etree.SubElement(series_elements[document.series_instance_uid], _DOCUMENT_REQUEST)
        if document.home_community_id is not None:
            etree.SubElement(request, _HOME).text = document.home_community_id
        etree.SubElement(request, _REPOSITORY).text = document.repository_unique_id
        etree.SubElement(request, _DOCUMENT).text = document.document_unique_id
    syntax_list = etree.SubElement(root, _SYNTAX_LIST)
    for syntax in transfer_syntaxes:
        etree.SubElement(syntax_list, _SYNTAX).text = syntax
    return root


def candidates(requested: Sequence[str], *, streamable: bool, original: str) -> list[str]:
    """The requested syntaxes we may produce for an instance, in the consumer's order.

    Parameters
    ----------
    requested
        The TransferSyntaxUIDList.
    streamable
        Whether the instance has our JPEG 2000 codestreams (needed by .94, .95 and .90).
    original
        The syntax it is archived in (sent byte for byte).

    Returns
    -------
    list[str]
        Try them in order: producing one may still fail (a derivation the object does not
        allow), and the next one is then tried.
    """
    out = []
    for syntax in requested:
        if syntax in _FROM_CODESTREAMS:
            if streamable:
                out.append(syntax)
        elif syntax in (EXPLICIT_VR_LITTLE_ENDIAN, original):
            out.append(syntax)
    return out


def overall_status(outcomes: Sequence[Outcome]) -> Status:
    """Success if every document came back, Failure if none did, else PartialSuccess."""
    found = sum(isinstance(o, Retrieved) for o in outcomes)
    if outcomes and found == len(outcomes):
        return Status.SUCCESS
    return Status.PARTIAL_SUCCESS if found else Status.FAILURE


def build_response(
    outcomes: Sequence[Outcome],
    *,
    request_error: str | None = None,
) -> tuple[etree._Element, mtom.Attachments]:
    """Build the ``xds:RetrieveDocumentSetResponse`` payload and its MTOM attachments.

    Parameters
    ----------
    outcomes
        One per requested document, in request order.
    request_error
        If the request could not be served at all (a :class:`RequestError` message): a
        Failure with one ``XDSIRequestError``; ``outcomes`` must then be empty.

    Returns
    -------
    tuple
        The payload (each ``xds:Document`` an ``xop:Include``) and the attachments by
        Content-ID, for :func:`imageshare.xds.mtom.build`.
    """
    if request_error is not None:
        if outcomes:
            raise ValueError("a request error comes without per-document outcomes")
        errors = [RegistryError(XDSI_REQUEST_ERROR, request_error)]
        status = Status.FAILURE
    else:
        errors = [RegistryError(o.code, o.context, location=o.request.document_unique_id)
                  for o in outcomes if isinstance(o, Refused)]
        status = overall_status(outcomes)
        if status is Status.FAILURE and not errors:
            errors = [RegistryError(XDSI_REQUEST_ERROR, "the request names no document")]
    response = etree.Element(_RESPONSE, nsmap={"xds": XDS_NS})
    response.append(registry_response(status, errors))
    attachments: mtom.Attachments = {}
    for number, outcome in enumerate(outcomes, 1):
        if not isinstance(outcome, Retrieved):
            continue
        request = outcome.request
        element = etree.SubElement(response, _DOCUMENT_RESPONSE)
        if request.home_community_id is not None:
            etree.SubElement(element, _HOME).text = request.home_community_id
        etree.SubElement(element, _REPOSITORY).text = request.repository_unique_id
        etree.SubElement(element, _DOCUMENT).text = request.document_unique_id
        etree.SubElement(element, _MIME).text = DICOM_MIME
        # Numbered, not named by UID: a UID may be requested twice, and Content-IDs are unique.
        cid = f"document{number}@imageshare"
        mtom.include(etree.SubElement(element, _DOCUMENT_CONTENT), cid)
        attachments[cid] = (DICOM_MIME, outcome.data)
    return response, attachments
