"""Schema validation of received payloads (imageshare.xds.schemas) and its packaged schemas."""

from __future__ import annotations

import configparser
import uuid
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

import pytest
from lxml import etree

from imageshare.web.rad69 import Rad69Handler
from imageshare.web.xds import SCHEMA_CONTEXT_LENGTH, XdsEndpoint, schema_error
from imageshare.xds import metadata as md
from imageshare.xds import mtom, registry, safexml, schemas, soap
from imageshare.xds import rad69 as rad69_module
from imageshare.xds.responses import Status, parse_registry_response
from imageshare.xds.store import XdsStore
from tests.xds.test_registry import DOMAIN, kos_bytes, manifest, query
from tests.xds.validator import SAMPLES, SCHEMAS, split_http, validate_message

ROOT = Path(__file__).resolve().parents[2]
RIM = md.RIM
XDSI = "urn:ihe:rad:xdsi-b:2009"


def body_of(root: etree._Element) -> etree._Element:
    """The SOAP Body payload of an envelope, or the element itself."""
    body = root.find(f"{{{soap.SOAP12_NS}}}Body") if etree.QName(root).localname == "Envelope" else None
    return body[0] if body is not None else root


def sample(name: str) -> etree._Element:
    return body_of(etree.parse(str(SAMPLES / name)).getroot())


def test_packaged_schemas_are_the_tests_copy() -> None:
    """importlib.resources finds the schemas in the package; they are byte-identical to tests/xds/schemas/schema."""
    packaged = files("imageshare.xds") / "xsd"
    assert (packaged / "README.md").is_file()
    ours = sorted(p.relative_to(SCHEMAS / "schema") for p in (SCHEMAS / "schema").rglob("*.xsd"))
    assert len(ours) == 8
    for relative in ours:
        copy = packaged / "schema"
        for part in relative.parts:
            copy = copy / part
        assert copy.read_bytes() == (SCHEMAS / "schema" / relative).read_bytes(), relative


def test_setup_cfg_ships_the_schemas_as_package_data() -> None:
    """setup.cfg lists the README and every schema folder's .xsd files as imageshare.xds package data."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["imageshare.xds"].split()
    package = ROOT / "imageshare" / "xds"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert package / "xsd" / "README.md" in shipped
    assert set((package / "xsd" / "schema").rglob("*.xsd")) <= shipped


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.xml")))
def test_samples_are_valid(name: str) -> None:
    """Every sample payload (requests and responses, IHE's and ours) passes validate_payload."""
    assert schemas.validate_payload(sample(name)) == []


def test_mtom_payload_with_xop_include_is_valid_and_untouched() -> None:
    """An MTOM PnR payload is valid with its xop:Include in place, and validation leaves the element as it was."""
    content_type, body = split_http((SAMPLES / "rad68-pnr-kos-mtom.http").read_bytes())
    assert content_type is not None
    xml, _parts = mtom.parse(content_type, body)
    payload = body_of(etree.fromstring(xml))
    before = etree.tostring(payload)
    assert next(payload.iter(mtom.XOP_INCLUDE), None) is not None
    assert schemas.validate_payload(payload) == []
    assert etree.tostring(payload) == before


def test_our_own_requests_are_valid() -> None:
    """The PnR our metadata builder sends (with xop:Include) and the ITI-18 query the tests send are valid."""
    data = kos_bytes()
    request = provide_and_register(data)
    assert schemas.validate_payload(request) == []
    assert schemas.validate_payload(query(registry.FIND_DOCUMENTS, **{"$XDSDocumentEntryPatientId": "'x'"})) == []


def provide_and_register(data: bytes) -> etree._Element:
    request = md.provide_and_register(
        manifest(data), DOMAIN, entry_uuid=uuid.uuid4(), submission_uuid=uuid.uuid4(),
        now=datetime(2024, 1, 2, tzinfo=timezone.utc), document_id="kos@test",
    )
    return request


def test_extrinsic_object_without_id_is_reported() -> None:
    """A DocumentEntry without its required id attribute is a schema error naming the attribute."""
    request = provide_and_register(kos_bytes())
    del next(request.iter(f"{{{RIM}}}ExtrinsicObject")).attrib["id"]
    errors = schemas.validate_payload(request)
    assert errors and "ExtrinsicObject" in errors[0] and "'id'" in errors[0]


def test_slot_without_value_list_is_reported() -> None:
    """A rim:Slot lacking its ValueList is reported (SubmitObjectsRequest, ITI-42)."""
    submit = sample("RegisterDocumentSet-bRequest_SOAP.xml")
    slot = next(submit.iter(f"{{{RIM}}}Slot"))
    slot.remove(slot.find(f"{{{RIM}}}ValueList"))
    errors = schemas.validate_payload(submit)
    assert errors and "Slot" in errors[0] and "ValueList" in errors[0]


def test_wrong_element_order_is_reported() -> None:
    """DocumentUniqueId before RepositoryUniqueId in an ITI-43 DocumentRequest is out of order."""
    request = sample("RetrieveDocumentSetRequest_SOAP.xml")
    item = request.find(f"{{{md.XDS}}}DocumentRequest")
    item.insert(0, item.find(f"{{{md.XDS}}}DocumentUniqueId"))
    errors = schemas.validate_payload(request)
    assert errors and "DocumentUniqueId" in errors[0]


def test_rad69_and_query_errors_are_reported() -> None:
    """A RAD-69 request without TransferSyntaxUIDList and an AdhocQueryRequest without AdhocQuery are invalid."""
    rad69 = sample("rad69-request-soap.xml")
    rad69.remove(rad69.find(f"{{{XDSI}}}TransferSyntaxUIDList"))
    assert any("TransferSyntaxUIDList" in e for e in schemas.validate_payload(rad69))
    adhoc = query(registry.FIND_DOCUMENTS)
    adhoc.remove(adhoc.find(f"{{{RIM}}}AdhocQuery"))
    assert schemas.validate_payload(adhoc)


def test_errors_are_bounded() -> None:
    """A payload with more errors than MAX_ERRORS (every Slot emptied) reports MAX_ERRORS of them."""
    submit = sample("RegisterDocumentSet-bRequest_SOAP.xml")
    slots = list(submit.iter(f"{{{RIM}}}Slot"))
    assert len(slots) > schemas.MAX_ERRORS
    for slot in slots:
        for child in list(slot):
            slot.remove(child)
    assert len(schemas.validate_payload(submit)) == schemas.MAX_ERRORS


def test_schema_error_names_the_first_error_briefly() -> None:
    """The endpoints' RegistryError carries the given code and a codeContext naming the first error, bounded."""
    request = provide_and_register(kos_bytes())
    assert schema_error(request, registry.REPOSITORY_METADATA_ERROR) is None
    entry = next(request.iter(f"{{{RIM}}}ExtrinsicObject"))
    del entry.attrib["id"]
    entry.set("x" * 300, "y")
    error = schema_error(request, registry.REPOSITORY_METADATA_ERROR)
    assert error is not None and error.code == "XDSRepositoryMetadataError"
    assert error.context.startswith("schema-invalid ProvideAndRegisterDocumentSetRequest: ")
    assert len(error.context) <= SCHEMA_CONTEXT_LENGTH


# --- the endpoints refuse schema-invalid payloads before their own checks -----------------


class _NeverCalled:
    """A RAD-69 retriever that must not be reached."""

    def __call__(self, request: object) -> list[object]:
        raise AssertionError("a schema-invalid request reached the retriever")


def _answer_payload(content_type: str, body: bytes) -> etree._Element:
    assert validate_message(content_type, body) == []
    xml, _parts = mtom.parse(content_type, body) if mtom.is_mtom(content_type) else (body, {})
    return soap.parse_envelope(safexml.parse(xml)).body


def test_rad69_handler_refuses_schema_invalid_request() -> None:
    """A RAD-69 request with a foreign element in its StudyRequest is a Failure with XDSIRequestError naming it."""
    payload = rad69_module.build_request(
        [rad69_module.DocumentRequest("2.25.1", "2.25.2", "2.25.3", "2.25.4", None)], ["1.2.840.10008.1.2.1"]
    )
    etree.SubElement(payload.find(f"{{{XDSI}}}StudyRequest"), f"{{{XDSI}}}Surprise")
    envelope = soap.build_request(soap.RAD69, "http://imageshare.example/xds/imaging-source", payload)
    answer = Rad69Handler(_NeverCalled())(*mtom.build(envelope, {}))
    assert answer.status == 200
    result = parse_registry_response(_answer_payload(answer.content_type, answer.body)[0])
    assert result.status is Status.FAILURE and result.error_codes == ("XDSIRequestError",)
    assert "schema-invalid" in result.errors[0].context and "Surprise" in result.errors[0].context


def test_xds_endpoint_refuses_schema_invalid_iti42_and_iti43(tmp_path: Path) -> None:
    """ITI-42 with a Slot lacking its ValueList gets XDSRegistryMetadataError; ITI-43 with its DocumentRequest
    children out of order gets XDSRepositoryError; both Failure, nothing registered or looked up."""
    store = XdsStore(tmp_path / "xds.sqlite3")
    try:
        endpoint = XdsEndpoint(store, lambda: "2.25.3")
        submit = sample("RegisterDocumentSet-bRequest_SOAP.xml")
        slot = next(submit.iter(f"{{{RIM}}}Slot"))
        slot.remove(slot.find(f"{{{RIM}}}ValueList"))
        answer = endpoint.registry(soap.SOAP12_CONTENT_TYPE, soap.build_request(soap.ITI42, "http://x/xds/registry", submit))
        result = parse_registry_response(_answer_payload(answer.content_type, answer.body))
        assert result.status is Status.FAILURE and result.error_codes == ("XDSRegistryMetadataError",)
        assert "ValueList" in result.errors[0].context

        retrieve = sample("RetrieveDocumentSetRequest_SOAP.xml")
        item = retrieve.find(f"{{{md.XDS}}}DocumentRequest")
        item.insert(0, item.find(f"{{{md.XDS}}}DocumentUniqueId"))
        envelope = soap.build_request(soap.ITI43, "http://x/xds/repository", retrieve)
        answer = endpoint.repository(*mtom.build(envelope, {}))
        response = _answer_payload(answer.content_type, answer.body)
        result = parse_registry_response(response.find(f"{{{md.RS}}}RegistryResponse"))
        assert result.status is Status.FAILURE and result.error_codes == ("XDSRepositoryError",)
        assert response.find(f"{{{md.XDS}}}DocumentResponse") is None
    finally:
        store.close()
