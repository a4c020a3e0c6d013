"""imageshare.xds.rad69 and the RAD-69 handler: requests read, syntaxes chosen, responses
built and faults answered, every message checked with the project's validator."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from imageshare.web.rad69 import Rad69Handler
from imageshare.xds import mtom, rad69, soap
from imageshare.xds.responses import Severity, Status, parse_registry_response
from imageshare.xds.safexml import parse
from tests.xds.validator import SAMPLES, XDS, validate_message

REPO = "1.3.6.1.4.1.21367.13.80.110"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
URL = "http://imageshare.example/xds/imaging-source"


def _doc(uid: str, *, study: str = "2.25.1", series: str = "2.25.2", repo: str = REPO,
         home: str | None = None) -> rad69.DocumentRequest:
    return rad69.DocumentRequest(study, series, repo, uid, home)


def _request_body(documents: list[rad69.DocumentRequest], syntaxes: list[str],
                  action: str = soap.RAD69) -> tuple[str, bytes]:
    envelope = soap.build_request(action, URL, rad69.build_request(documents, syntaxes))
    return mtom.build(envelope, {})


def _response(content_type: str, body: bytes) -> tuple[etree._Element, mtom.Attachments]:
    """(the RetrieveDocumentSetResponse, the attachments) of a valid MTOM answer."""
    assert validate_message(content_type, body, require_mtom=True) == []
    xml, parts = mtom.parse(content_type, body)
    envelope = soap.parse_envelope(parse(xml))
    assert envelope.action == soap.RAD69_RESPONSE
    return envelope.body, parts


def _fault(answer: Any) -> soap.SoapFault:
    assert answer.content_type.startswith("application/soap+xml")
    fault = soap.parse_envelope(parse(answer.body)).fault
    assert fault is not None
    return fault


# --- the request ---------------------------------------------------------------------------


def test_parse_sample_request() -> None:
    """The stored RAD-69 sample (schema-valid) gives its two documents under their study and
    series, and the transfer syntaxes in the consumer's order."""
    text = (SAMPLES / "rad69-request-soap.xml").read_bytes()
    assert validate_message(None, text) == []
    request = rad69.parse_request(soap.parse_envelope(parse(text), request=True).body)
    assert request.documents == (_doc("2.25.1005", study="2.25.1001", series="2.25.1002"),
                                 _doc("2.25.1006", study="2.25.1001", series="2.25.1002"))
    assert request.transfer_syntaxes == (EXPLICIT, IMPLICIT)


def test_build_request_round_trip() -> None:
    """build_request groups documents by study and series and keeps HomeCommunityId; the MTOM
    request it makes is valid, and parse_request reads back the same documents, with
    repeated syntaxes dropped."""
    documents = [_doc("2.25.10", home="urn:oid:1.2.3"), _doc("2.25.11", series="2.25.3"), _doc("2.25.12")]
    content_type, body = _request_body(documents, [rad69.JPIP_REFERENCED, EXPLICIT, EXPLICIT])
    assert validate_message(content_type, body, require_mtom=True) == []
    payload = rad69.build_request(documents, [rad69.JPIP_REFERENCED, EXPLICIT, EXPLICIT])
    assert len(payload.findall(f"{{{rad69.IHERAD_NS}}}StudyRequest")) == 1
    parsed = rad69.parse_request(payload)
    assert sorted(parsed.documents, key=str) == sorted(documents, key=str)
    assert parsed.transfer_syntaxes == (rad69.JPIP_REFERENCED, EXPLICIT)


def test_missing_syntax_list_is_not_a_request_error() -> None:
    """Without a TransferSyntaxUIDList the request parses with no syntaxes: each document then
    fails alone with XDSRepositoryError (as the NIST tests expect)."""
    payload = rad69.build_request([_doc("2.25.10")], [])
    payload.remove(payload.find(f"{{{rad69.IHERAD_NS}}}TransferSyntaxUIDList"))
    assert rad69.parse_request(payload).transfer_syntaxes == ()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: [p.remove(s) for s in p.findall(f"{{{rad69.IHERAD_NS}}}StudyRequest")], "no StudyRequest"),
        (lambda p: p[0].set("studyInstanceUID", " "), "no studyInstanceUID"),
        (lambda p: p[0][0].attrib.pop("seriesInstanceUID"), "no seriesInstanceUID"),
        (lambda p: p[0][0].remove(p[0][0][0]), "no DocumentRequest"),
        (lambda p: p[0][0][0].remove(p[0][0][0][1]), "DocumentUniqueId is missing"),
        (lambda p: setattr(p[0][0][0][0], "text", ""), "RepositoryUniqueId is empty"),
        (lambda p: etree.SubElement(p[0][0][0][1], "x"), "DocumentUniqueId must hold text only"),
        (lambda p: setattr(p[0][0][0][1], "text", "1." * 200), "longer than 256"),
        (lambda p: etree.SubElement(p[0][0][0], f"{{{rad69.XDS_NS}}}DocumentUniqueId").__setattr__("text", "1"),
         "more than once"),
    ],
)
def test_request_errors(mutate: Any, message: str) -> None:
    """A request with no study, series or document, an empty or over-long UID, an identifier
    that is not text, or a repeated identifier is a RequestError saying what is wrong."""
    payload = rad69.build_request([_doc("2.25.10")], [EXPLICIT])
    mutate(payload)
    with pytest.raises(rad69.RequestError, match=message):
        rad69.parse_request(payload)


def test_too_many_documents_and_wrong_payload() -> None:
    """More documents than max_documents, or another payload element, is a RequestError."""
    payload = rad69.build_request([_doc(f"2.25.{i}") for i in range(5)], [EXPLICIT])
    assert len(rad69.parse_request(payload, max_documents=5).documents) == 5
    with pytest.raises(rad69.RequestError, match="more than 4 documents"):
        rad69.parse_request(payload, max_documents=4)
    with pytest.raises(rad69.RequestError, match="RetrieveImagingDocumentSetRequest"):
        rad69.parse_request(etree.Element(f"{{{XDS}}}RetrieveDocumentSetRequest"))


# --- the choice of transfer syntax -----------------------------------------------------------


def test_candidates() -> None:
    """JPIP Referenced and JPEG 2000 lossless only for streamable instances; Explicit VR LE
    and the archived syntax always; unknown syntaxes never; in the consumer's order."""
    wanted = ["1.2.840.10008.1.2.4.50", rad69.JPIP_REFERENCED, rad69.JPEG2000_LOSSLESS, IMPLICIT, EXPLICIT,
              rad69.JPIP_REFERENCED_DEFLATE]
    assert rad69.candidates(wanted, streamable=True, original="1.2.840.10008.1.2.5") == [
        rad69.JPIP_REFERENCED, rad69.JPEG2000_LOSSLESS, EXPLICIT, rad69.JPIP_REFERENCED_DEFLATE]
    assert rad69.candidates(wanted, streamable=False, original=IMPLICIT) == [IMPLICIT, EXPLICIT]
    assert rad69.candidates([rad69.JPIP_REFERENCED], streamable=False, original=EXPLICIT) == []


# --- the response ------------------------------------------------------------------------------


def _package(outcomes: list[rad69.Outcome], **kw: Any) -> tuple[str, bytes]:
    payload, attachments = rad69.build_response(outcomes, **kw)
    return mtom.build(soap.build_response(soap.RAD69_RESPONSE, "urn:uuid:1", payload), attachments)


def test_success_response() -> None:
    """Every document found: Success, no error list, one DocumentResponse per document in
    order, echoing HomeCommunityId, repository and UID, mimeType application/dicom, and the
    bytes as an MTOM part (the same UID twice gets two parts)."""
    outcomes: list[rad69.Outcome] = [
        rad69.Retrieved(_doc("2.25.10", home="urn:oid:1.2.3"), EXPLICIT, b"first"),
        rad69.Retrieved(_doc("2.25.11"), rad69.JPIP_REFERENCED, b"second"),
        rad69.Retrieved(_doc("2.25.11"), rad69.JPIP_REFERENCED, b"second"),
    ]
    response, parts = _response(*_package(outcomes))
    registry = parse_registry_response(response[0])
    assert registry.status is Status.SUCCESS and registry.errors == ()
    documents = response.findall(f"{{{XDS}}}DocumentResponse")
    assert [d.findtext(f"{{{XDS}}}DocumentUniqueId") for d in documents] == ["2.25.10", "2.25.11", "2.25.11"]
    assert documents[0].findtext(f"{{{XDS}}}HomeCommunityId") == "urn:oid:1.2.3"
    assert documents[1].find(f"{{{XDS}}}HomeCommunityId") is None
    assert {d.findtext(f"{{{XDS}}}RepositoryUniqueId") for d in documents} == {REPO}
    assert {d.findtext(f"{{{XDS}}}mimeType") for d in documents} == {"application/dicom"}
    data = [mtom.element_bytes(d.find(f"{{{XDS}}}Document"), parts) for d in documents]
    assert data == [b"first", b"second", b"second"]
    assert {t for t, _ in parts.values()} == {"application/dicom"}


def test_partial_and_failure_responses() -> None:
    """Some refused: PartialSuccess with one error per refused document (its UID as the
    location) and the found documents; all refused: Failure and no DocumentResponse; a
    request error: Failure with XDSIRequestError. All are valid MTOM answers."""
    found = rad69.Retrieved(_doc("2.25.10"), EXPLICIT, b"x")
    unknown = rad69.Refused(_doc("2.25.11"), "XDSDocumentUniqueIdError", "no such instance")
    elsewhere = rad69.Refused(_doc("2.25.12", repo="1.2.3"), "XDSUnknownRepositoryId", "not ours")
    response, parts = _response(*_package([found, unknown, elsewhere]))
    registry = parse_registry_response(response[0])
    assert registry.status is Status.PARTIAL_SUCCESS
    assert [(e.code, e.location, e.severity) for e in registry.errors] == [
        ("XDSDocumentUniqueIdError", "2.25.11", Severity.ERROR), ("XDSUnknownRepositoryId", "2.25.12", Severity.ERROR)]
    assert len(response.findall(f"{{{XDS}}}DocumentResponse")) == 1 and len(parts) == 1

    response, parts = _response(*_package([unknown]))
    registry = parse_registry_response(response[0])
    assert registry.status is Status.FAILURE and registry.error_codes == ("XDSDocumentUniqueIdError",)
    assert response.find(f"{{{XDS}}}DocumentResponse") is None and parts == {}

    response, _ = _response(*_package([], request_error="the request has no StudyRequest"))
    registry = parse_registry_response(response[0])
    assert registry.status is Status.FAILURE and registry.error_codes == ("XDSIRequestError",)
    assert registry.errors[0].context == "the request has no StudyRequest"
    with pytest.raises(ValueError):
        rad69.build_response([found], request_error="x")


# --- the handler: transport and faults ---------------------------------------------------------


class _Retriever:
    """Answers every document with its UID as bytes, in the first syntax asked for."""

    def __init__(self) -> None:
        self.calls: list[rad69.RetrieveRequest] = []

    def __call__(self, request: rad69.RetrieveRequest) -> list[rad69.Outcome]:
        self.calls.append(request)
        return [rad69.Retrieved(d, request.transfer_syntaxes[0], d.document_unique_id.encode())
                for d in request.documents]


def test_handler_answers_mtom() -> None:
    """An MTOM request and a plain application/soap+xml one both get a valid MTOM answer
    relating to the request's MessageID; a request error is a Failure answer, not a fault."""
    retriever = _Retriever()
    handler = Rad69Handler(retriever)
    answer = handler(*_request_body([_doc("2.25.10")], [EXPLICIT]))
    assert answer.status == 200 and answer.content_type.startswith("multipart/related")
    response, parts = _response(answer.content_type, answer.body)
    assert list(parts.values()) == [("application/dicom", b"2.25.10")]

    envelope = soap.build_request(soap.RAD69_LEGACY, URL, rad69.build_request([_doc("2.25.11")], [EXPLICIT]),
                                  message_id="urn:uuid:42")
    answer = handler(soap.SOAP12_CONTENT_TYPE, envelope)
    xml, parts = mtom.parse(answer.content_type, answer.body)
    assert soap.parse_envelope(parse(xml)).relates_to == "urn:uuid:42"
    assert list(parts.values()) == [("application/dicom", b"2.25.11")]

    empty = rad69.build_request([_doc("2.25.10")], [EXPLICIT])
    empty.remove(empty[0])
    answer = handler(*mtom.build(soap.build_request(soap.RAD69, URL, empty), {}))
    response, _ = _response(answer.content_type, answer.body)
    assert parse_registry_response(response[0]).error_codes == ("XDSIRequestError",)
    assert len(retriever.calls) == 2


SOAP11 = b"""<?xml version="1.0"?>
<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><x/></e:Body></e:Envelope>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body><a>&x;</a></e:Body></e:Envelope>"""
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
          + b"".join(b'<!ENTITY %c "%s">' % (98 + i, b"&%c;" % (97 + i) * 10) for i in range(8))
          + b']><l>&i;</l>')


@pytest.mark.parametrize(
    "content_type, body, code, status, says",
    [
        ("text/xml; charset=utf-8", SOAP11, "VersionMismatch", 500, "SOAP 1.1"),
        (soap.SOAP12_CONTENT_TYPE, SOAP11, "VersionMismatch", 500, "SOAP 1.1"),
        (soap.SOAP12_CONTENT_TYPE, XXE, "Sender", 400, "doctype"),
        (soap.SOAP12_CONTENT_TYPE, LAUGHS, "Sender", 400, "doctype"),
        (soap.SOAP12_CONTENT_TYPE, b"<not xml", "Sender", 400, "malformed"),
        (soap.SOAP12_CONTENT_TYPE, b"\xff\xfe<\x00", "Sender", 400, "encoding"),
        (soap.SOAP12_CONTENT_TYPE, b"<a>" * 150 + b"</a>" * 150, "Sender", 400, "too-deep"),
        ('multipart/related; boundary="b"; type="application/xop+xml"', b"--b\r\n\r\nx\r\n", "Sender", 400, "MTOM"),
        ("application/json", b"{}", "Sender", 400, "MTOM"),
        (None, b"x", "Sender", 400, "no Content-Type"),
    ],
)
def test_handler_faults(content_type: str | None, body: bytes, code: str, status: int, says: str) -> None:
    """Hostile or broken bodies (SOAP 1.1, XXE, entity expansion, malformed, not UTF-8, too
    deep, a broken MTOM package, a wrong or missing media type) get a SOAP 1.2 fault with the
    right code and HTTP status, and never reach the retriever."""
    retriever = _Retriever()
    answer = Rad69Handler(retriever)(content_type, body)
    fault = _fault(answer)
    assert (fault.code, answer.status) == (code, status) and says in fault.reason
    assert retriever.calls == []


def test_handler_addressing_faults() -> None:
    """Another action is Sender + wsa:ActionNotSupported; a missing MessageID is Sender +
    MessageAddressingHeaderRequired; an unknown mustUnderstand header is MustUnderstand; an
    over-limit body is Sender; another payload is Sender."""
    handler = Rad69Handler(_Retriever(), max_body=4096)
    answer = handler(*_request_body([_doc("2.25.10")], [EXPLICIT], action=soap.ITI43))
    fault = _fault(answer)
    assert (fault.code, fault.subcode, answer.status) == ("Sender", f"{{{soap.WSA_NS}}}ActionNotSupported", 400)

    envelope = parse(soap.build_request(soap.RAD69, URL, rad69.build_request([_doc("2.25.10")], [EXPLICIT])))
    header = envelope[0]
    header.remove(header.find(f"{{{soap.WSA_NS}}}MessageID"))
    fault = _fault(handler(soap.SOAP12_CONTENT_TYPE, etree.tostring(envelope)))
    assert fault.subcode == f"{{{soap.WSA_NS}}}MessageAddressingHeaderRequired"

    envelope = parse(soap.build_request(soap.RAD69, URL, rad69.build_request([_doc("2.25.10")], [EXPLICIT])))
    etree.SubElement(envelope[0], "{urn:x}Secret").set(f"{{{soap.SOAP12_NS}}}mustUnderstand", "1")
    answer = handler(soap.SOAP12_CONTENT_TYPE, etree.tostring(envelope))
    assert (_fault(answer).code, answer.status) == ("MustUnderstand", 500)

    fault = _fault(handler(*_request_body([_doc(f"2.25.{i}") for i in range(100)], [EXPLICIT])))
    assert fault.code == "Sender" and "exceeds 4096 bytes" in fault.reason

    other = soap.build_request(soap.RAD69, URL, etree.Element(f"{{{XDS}}}RetrieveDocumentSetRequest"))
    fault = _fault(handler(soap.SOAP12_CONTENT_TYPE, other))
    assert fault.code == "Sender" and "RetrieveImagingDocumentSetRequest" in fault.reason
