"""imageshare.xds.mtom: MTOM/XOP packages built, split, checked and refused."""

from __future__ import annotations

import base64
import os

import pytest
from lxml import etree

from imageshare.xds import mtom, soap
from imageshare.xds.safexml import parse
from tests.xds.validator import SAMPLES, XDS, split_http, validate_message

KOS = "application/dicom"


def _sample() -> tuple[str, bytes]:
    content_type, body = split_http((SAMPLES / "rad68-pnr-kos-mtom.http").read_bytes())
    assert content_type is not None
    return content_type, body


def _pnr_with_include() -> tuple[bytes, mtom.Attachments]:
    """The sample RAD-68 envelope and its KOS part, as mtom.parse gives them."""
    return mtom.parse(*_sample())


def test_parse_sample() -> None:
    """The RAD-68 sample splits into the envelope and one DICOM part whose include resolves."""
    xml, parts = _pnr_with_include()
    assert xml.lstrip().startswith(b"<?xml")
    ((cid, (content_type, data)),) = parts.items()
    assert content_type == KOS and data[128:132] == b"DICM"
    document = parse(xml).find(f".//{{{XDS}}}Document")
    assert mtom.element_bytes(document, parts) == data


def test_build_round_trip_and_validator() -> None:
    """build() then parse() gives the same XML and parts; the package is valid with require_mtom."""
    xml, parts = _pnr_with_include()
    content_type, body = mtom.build(xml, parts)
    assert mtom.is_mtom(content_type)
    for fragment in ('type="application/xop+xml"', 'start="<', 'start-info="application/soap+xml"'):
        assert fragment in content_type
    assert b'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n' in body
    assert b"Content-Transfer-Encoding: binary\r\n" in body
    assert mtom.parse(content_type, body) == (xml, parts)
    assert validate_message(content_type, body, require_mtom=True) == []


def test_boundary_unique_and_absent_from_parts() -> None:
    """Each build gets a fresh boundary that occurs in no part."""
    xml, parts = _pnr_with_include()
    first, body = mtom.build(xml, parts)
    second, _ = mtom.build(xml, parts)
    boundary = mtom._media_type(first)[1]["boundary"]
    assert boundary != mtom._media_type(second)[1]["boundary"]
    assert all(boundary.encode() not in data for _, data in parts.values())
    assert body.count(boundary.encode()) == 3  # two parts and the closing delimiter


def test_binary_with_crlf_and_boundary_like_bytes() -> None:
    """Arbitrary binary (CRLF, dashes, NULs) survives a round trip byte for byte."""
    payload = b"\r\n--\r\n\x00" + os.urandom(5000) + b"\r\n--MIMEBoundary_x--\r\n"
    envelope = soap.build_response(
        soap.ITI43_RESPONSE, "urn:uuid:1", _document_response(payload, "doc1@imageshare")
    )
    content_type, body = mtom.build(envelope, {"doc1@imageshare": (KOS, payload)})
    xml, parts = mtom.parse(content_type, body)
    assert parts["doc1@imageshare"] == (KOS, payload)
    assert validate_message(content_type, body, require_mtom=True) == []


def _document_response(payload: bytes, cid: str) -> etree._Element:
    response = etree.Element(f"{{{XDS}}}RetrieveDocumentSetResponse", nsmap={"xds": XDS})
    rs = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
    etree.SubElement(response, f"{{{rs}}}RegistryResponse", nsmap={"rs": rs}).set(
        "status", "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    )
    entry = etree.SubElement(response, f"{{{XDS}}}DocumentResponse")
    etree.SubElement(entry, f"{{{XDS}}}RepositoryUniqueId").text = "1.2.3"
    etree.SubElement(entry, f"{{{XDS}}}DocumentUniqueId").text = "1.2.3.4"
    etree.SubElement(entry, f"{{{XDS}}}mimeType").text = KOS
    document = etree.SubElement(entry, f"{{{XDS}}}Document")
    document.text = base64.b64encode(payload).decode()
    assert mtom.optimize(document, cid) == payload
    return response


def test_optimize_include_resolve() -> None:
    """optimize() swaps base64 for xop:Include; resolve_includes() restores the same text."""
    element = etree.Element("d")
    element.text = base64.b64encode(b"hello world").decode()
    original = element.text
    data = mtom.optimize(element, "a%b@x")
    assert data == b"hello world"
    assert element[0].get("href") == "cid:a%25b@x" and not element.text
    assert mtom.resolve_includes(element, {"a%b@x": ("x/y", data)}) == {"a%b@x"}
    assert element.text == original and len(element) == 0
    element.text = "aGVsbG8="
    assert mtom.element_bytes(element, {}) == b"hello"


def test_optimize_refuses_bad_base64() -> None:
    """Invalid or non-canonical base64 is not optimized."""
    for text in ("not base64!", "aGVsbG9="):  # second: non-zero padding bits
        element = etree.Element("d")
        element.text = text
        with pytest.raises(mtom.MtomError):
            mtom.optimize(element, "c@x")


def test_plain_soap_accepted() -> None:
    """A plain application/soap+xml body is returned as is, without parts."""
    envelope = (SAMPLES / "rad69-request-soap.xml").read_bytes()
    assert mtom.parse('application/soap+xml; charset=UTF-8; action="x"', envelope) == (envelope, {})
    assert not mtom.is_mtom("application/soap+xml")


def test_build_refuses_dangling_include() -> None:
    """build() refuses an envelope whose xop:Include has no attachment, and bad Content-IDs."""
    xml, _parts = _pnr_with_include()
    with pytest.raises(mtom.MtomError, match="matches no MIME part"):
        mtom.build(xml, {})
    with pytest.raises(mtom.MtomError):
        mtom.build(xml, {"bad id": (KOS, b"")})


def _replace(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new)


CASES = {
    "no boundary": lambda ct, b: (ct.replace("boundary=MIMEBoundary_sample_rad68;", ""), b),
    "wrong type": lambda ct, b: (ct.replace('type="application/xop+xml"', 'type="text/xml"'), b),
    "SOAP 1.1 start-info": lambda ct, b: (ct.replace('start-info="application/soap+xml"', 'start-info="text/xml"'), b),
    "text/xml": lambda ct, b: ("text/xml; charset=UTF-8", b),
    "unknown start": lambda ct, b: (ct.replace("root.0000", "nosuch.0000"), b),
    "no closing delimiter": lambda ct, b: (ct, b.rstrip()[: -len("--")]),
    "dangling include": lambda ct, b: (ct, _replace(b, b'href="cid:kos.', b'href="cid:other.')),
    "non-cid include": lambda ct, b: (ct, _replace(b, b'href="cid:kos.', b'href="http://x/kos.')),
    "duplicate Content-ID": lambda ct, b: (
        ct,
        _replace(b, b"Content-ID: <kos.", b"Content-ID: <root.").replace(
            b'href="cid:kos.00000000-0000-0000-0000-000000000002', b'href="cid:root.00000000-0000-0000-0000-000000000001'
        ),
    ),
    "root not xop+xml": lambda ct, b: (ct, _replace(b, b"Content-Type: application/xop+xml;", b"Content-Type: text/xml;")),
    "hostile root XML": lambda ct, b: (ct, _replace(b, b'<?xml version="1.0" encoding="UTF-8"?>', b"<!DOCTYPE x SYSTEM 'http://x/'>")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_packages_refused(case: str) -> None:
    """Each broken variant of the sample raises MtomError (or UnsafeXml for the root XML)."""
    content_type, body = CASES[case](*_sample())
    with pytest.raises(ValueError):
        mtom.parse(content_type, body)


def test_limits() -> None:
    """max_bytes and max_parts are enforced."""
    content_type, body = _sample()
    with pytest.raises(mtom.MtomError, match="exceeds"):
        mtom.parse(content_type, body, max_bytes=len(body) - 1)
    with pytest.raises(mtom.MtomError, match="more than 1 MIME parts"):
        mtom.parse(content_type, body, max_parts=1)


# ---------------------------------------------------------------- tests/xds/validator.py


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.xml")))
def test_validator_accepts_samples(name: str) -> None:
    """Every copied XML sample is valid (plain SOAP, so without require_mtom)."""
    assert validate_message(None, (SAMPLES / name).read_bytes()) == []


def test_validator_require_mtom_flags_plain_iti41_iti43_rad69() -> None:
    """With require_mtom, plain ITI-41/ITI-43/RAD-69 samples are flagged; ITI-18/ITI-42 are not."""
    flagged = {p.name for p in SAMPLES.glob("*.xml") if validate_message(None, p.read_bytes(), require_mtom=True)}
    assert flagged == {
        "ProvideAndRegisterDocumentSet-bRequest.xml",
        "ProvideAndRegisterDocumentSet-bRequest_SOAP.xml",
        "ProvideAndRegisterDocumentSet-bResponse_SOAP.xml",
        "RetrieveDocumentSetRequest_SOAP.xml",
        "RetrieveDocumentSetResponse_SOAP.xml",
        "rad69-request-soap.xml",
    }
    assert validate_message(*_sample(), require_mtom=True) == []


BROKEN_XML = {
    "schema": (b'<xds:DocumentUniqueId>2.25.1005</xds:DocumentUniqueId>', b"<xds:Bogus>1</xds:Bogus>", "schema"),
    "empty uid": (b'studyInstanceUID="2.25.1001"', b'studyInstanceUID=""', "empty studyInstanceUID"),
    "no mustUnderstand": (b'<a:Action s:mustUnderstand="1">', b"<a:Action>", "mustUnderstand"),
    "wrong action": (b">urn:ihe:rad:2009:RetrieveImagingDocumentSet<", b">urn:ihe:iti:2007:RetrieveDocumentSet<", "does not match"),
    "no ReplyTo": (
        b"<a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo>",
        b"",
        "ReplyTo",
    ),
    "soap 1.1": (b"http://www.w3.org/2003/05/soap-envelope", b"http://schemas.xmlsoap.org/soap/envelope/", "SOAP 1.2"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_XML))
def test_validator_reports_broken_rad69(case: str) -> None:
    """Breaking the RAD-69 sample in one way gives an error naming the problem."""
    old, new, expected = BROKEN_XML[case]
    data = _replace((SAMPLES / "rad69-request-soap.xml").read_bytes(), old, new)
    errors = validate_message(soap.SOAP12_CONTENT_TYPE, data)
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize("case", ["wrong type", "SOAP 1.1 start-info", "unknown start", "dangling include", "root not xop+xml"])
def test_validator_reports_broken_mtom(case: str) -> None:
    """The validator reports the broken MTOM packages mtom.parse refuses."""
    assert validate_message(*CASES[case](*_sample()), require_mtom=True) != []


def test_validator_reports_missing_document() -> None:
    """A Provide and Register with an ExtrinsicObject but no Document is XDSMissingDocument."""
    xml, _parts = _pnr_with_include()
    root = parse(xml)
    for document in root.iter(f"{{{XDS}}}Document"):
        document.getparent().remove(document)
    data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    errors = validate_message(soap.SOAP12_CONTENT_TYPE, data)
    assert any("XDSMissingDocument" in e for e in errors), errors
    assert any("MTOM" in e for e in validate_message(soap.SOAP12_CONTENT_TYPE, data, require_mtom=True))
