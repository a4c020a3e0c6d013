"""The embedded XDS.b repository and registry on the running server: ITI-41, ITI-18, ITI-43, ITI-42
and hostile bodies. Every request sent and every answer received is checked by tests/xds/validator.py."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from lxml import etree
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet import task, threads

from imageshare.dicom.manifest import KOS_SOP_CLASS, InstanceRef, StudySummary, build_manifest, encode_manifest
from imageshare.manifests import LocationUid
from imageshare.xds import metadata as md
from imageshare.jpip_cli import JpipClient
from imageshare.xds import mtom, rad69, registry, safexml, soap
from imageshare.xds.metadata import ManifestInfo, provide_and_register
from imageshare.xds.responses import Status, classify, parse_registry_response
from tests.helpers import make_instances, part10_file
from tests.integration.test_manifest_e2e import get_status, storescu
from tests.xds.test_registry import query
from tests.xds.validator import validate_message

pytestmark = [pytest.mark.integration]

APPROVED = "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"
DEPRECATED = "('urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated')"
RIM = md.RIM


def post(url: str, content_type: str, body: bytes) -> tuple[int, str, bytes]:
    """POST (blocking; run in a thread) and return status, Content-Type and body, errors included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


class Client:
    """A Document Source / Consumer talking to the embedded endpoints, validating both ways."""

    def __init__(self, server: Any, repository_uid: str) -> None:
        self.base = server.url
        self.repository_uid = repository_uid

    async def send(self, path: str, content_type: str, body: bytes, *, mtom_required: bool) -> tuple[int, str, bytes]:
        assert validate_message(content_type, body, require_mtom=mtom_required) == []
        status, answer_type, answer = await threads.deferToThread(post, f"{self.base}{path}", content_type, body)
        assert validate_message(answer_type, answer, require_mtom=mtom_required) == [], answer[:2000]
        return status, answer_type, answer

    @staticmethod
    def payload(content_type: str, body: bytes) -> tuple[etree._Element, mtom.Attachments]:
        xml, parts = mtom.parse(content_type, body)
        return soap.parse_envelope(safexml.parse(xml)).body, parts

    async def provide(self, request: etree._Element, kos: bytes) -> etree._Element:
        envelope = soap.build_request(soap.ITI41, f"{self.base}/xds/repository", request)
        content_type, body = mtom.build(envelope, {"kos@imageshare.test": ("application/dicom", kos)})
        status, answer_type, answer = await self.send("/xds/repository", content_type, body, mtom_required=True)
        assert status == 200 and mtom.is_mtom(answer_type)
        return self.payload(answer_type, answer)[0]

    async def find(self, patient_id: str, status: str = APPROVED, **params: str) -> list[etree._Element]:
        return await self.query(
            registry.FIND_DOCUMENTS,
            **{"$XDSDocumentEntryPatientId": f"'{patient_id}'", "$XDSDocumentEntryStatus": status, **params},
        )

    async def query(self, query_id: str, return_type: str = "LeafClass", **params: str) -> list[etree._Element]:
        envelope = soap.build_request(soap.ITI18, f"{self.base}/xds/registry", query(query_id, return_type, **params))
        status, answer_type, answer = await self.send("/xds/registry", soap.SOAP12_CONTENT_TYPE, envelope, mtom_required=False)
        response = self.payload(answer_type, answer)[0]
        assert status == 200 and response.get("status") == Status.SUCCESS.value, etree.tostring(response)
        return list(response.find(f"{{{RIM}}}RegistryObjectList"))

    async def retrieve(self, *requests: tuple[str, str]) -> tuple[etree._Element, mtom.Attachments]:
        body = etree.Element(f"{{{md.XDS}}}RetrieveDocumentSetRequest", nsmap={"xds": md.XDS})
        for repository, document in requests:
            item = etree.SubElement(body, f"{{{md.XDS}}}DocumentRequest")
            etree.SubElement(item, f"{{{md.XDS}}}RepositoryUniqueId").text = repository
            etree.SubElement(item, f"{{{md.XDS}}}DocumentUniqueId").text = document
        envelope = soap.build_request(soap.ITI43, f"{self.base}/xds/repository", body)
        content_type, packaged = mtom.build(envelope, {})
        status, answer_type, answer = await self.send("/xds/repository", content_type, packaged, mtom_required=True)
        assert status == 200
        return self.payload(answer_type, answer)

    async def fault(self, path: str, content_type: str, body: bytes) -> soap.SoapFault:
        status, answer_type, answer = await threads.deferToThread(post, f"{self.base}{path}", content_type, body)
        assert answer_type.startswith("application/soap+xml"), (status, answer_type, answer[:500])
        fault = soap.parse_envelope(safexml.parse(answer)).fault
        assert fault is not None, answer[:500]
        assert status == fault.http_status
        return fault


def make_kos(tmp_path: Path, location_uid: str, sop_uid: str, study_uid: str) -> bytes:
    """A real KOS manifest Part 10 file built by imageshare.dicom.manifest."""
    study = StudySummary(
        study_instance_uid=study_uid, patient_id="XDS-PAT-1", patient_name="Doe^Jane", patient_birth_date="19700101",
        patient_sex="F", study_date="20240102", study_time="101500", accession_number="ACC-XDS-1",
    )
    ds = build_manifest(
        study,
        [InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"{study_uid}.3.1", f"{study_uid}.2")],
        retrieve_ae_title="IMAGESHARE", retrieve_location_uid=location_uid, retrieve_url="http://127.0.0.1/wado",
        sop_instance_uid=sop_uid, series_instance_uid=f"{sop_uid}.9", now=datetime(2024, 1, 2, 10, 30),
    )
    path = part10_file(tmp_path / f"{sop_uid}.dcm", encode_manifest(ds), transfer_syntax=ExplicitVRLittleEndian,
                       sop_class_uid=KOS_SOP_CLASS, sop_instance_uid=sop_uid)
    return path.read_bytes()


def unique_id_of(element: etree._Element) -> str:
    return next(e.get("value") for e in element.iter(f"{{{RIM}}}ExternalIdentifier")
                if e.get("identificationScheme") == md.DE_UNIQUE_ID)


@pytest_twisted.ensureDeferred
async def test_provide_find_retrieve_replace(start_server, tmp_path: Path) -> None:
    """A real KOS sent with ITI-41 (MTOM) is registered; FindDocuments finds it; ITI-43 returns the exact
    bytes; sending it again registers nothing twice (duplicate only); an RPLC submission deprecates the old
    entry; GetDocuments and GetSubmissionSets answer; an unknown repository gives XDSUnknownRepositoryId."""
    server = await start_server(manifest={"enabled": "no"})
    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog, config.manifest.retrieve_location_uid))
    domain = config.xds.domain(location)
    client = Client(server, domain.repository_unique_id)
    assert domain.repository_unique_id == location

    kos = make_kos(tmp_path, location, "2.25.7001", "2.25.7000")
    info = ManifestInfo.from_part10(kos, modalities=["CT"], body_parts=["CHEST"], timezone=timezone.utc)
    entry, submission = uuid.uuid4(), uuid.uuid4()
    now = datetime(2024, 1, 2, 11, 0, tzinfo=timezone.utc)
    request = provide_and_register(info, domain, entry_uuid=entry, submission_uuid=submission, now=now,
                                   document_id="kos@imageshare.test")
    answer = parse_registry_response(await client.provide(request, kos))
    assert answer.status is Status.SUCCESS, answer

    patient = domain.patient_id("XDS-PAT-1")
    found = await client.find(patient)
    assert [unique_id_of(e) for e in found] == ["2.25.7001"]
    assert found[0].get("id") == f"urn:uuid:{entry}"
    slots = {s.get("name"): [v.text for v in s.iter(f"{{{RIM}}}Value")] for s in found[0].iter(f"{{{RIM}}}Slot")}
    assert slots["repositoryUniqueId"] == [location] and slots["size"] == [str(len(kos))]
    refs = await client.find(patient, **{"$XDSDocumentEntryClassCode": f"('{domain.class_code.code}^^{domain.class_code.scheme}')",
                                         "$XDSDocumentEntryCreationTimeFrom": "2024", "$XDSDocumentEntryCreationTimeTo": "2025"})
    assert len(refs) == 1
    assert await client.find(patient, **{"$XDSDocumentEntryFormatCode": "('1.2.3^^1.2.3')"}) == []

    response, parts = await client.retrieve((location, "2.25.7001"))
    assert parse_registry_response(response.find(f"{{{md.RS}}}RegistryResponse")).status is Status.SUCCESS
    document = response.find(f"{{{md.XDS}}}DocumentResponse/{{{md.XDS}}}Document")
    assert mtom.element_bytes(document, parts) == kos
    assert response.findtext(f"{{{md.XDS}}}DocumentResponse/{{{md.XDS}}}mimeType") == "application/dicom"

    # The same submission again (an outbox retry after a lost answer).
    again = parse_registry_response(await client.provide(request, kos))
    assert classify(again).duplicate_only, again
    assert len(await client.find(patient)) == 1

    # Replacement.
    new_kos = make_kos(tmp_path, location, "2.25.7002", "2.25.7000")
    new_info = ManifestInfo.from_part10(new_kos, modalities=["CT"], timezone=timezone.utc)
    new_entry = uuid.uuid4()
    replacing = provide_and_register(new_info, domain, entry_uuid=new_entry, submission_uuid=uuid.uuid4(), now=now,
                                     document_id="kos@imageshare.test", replaces=entry)
    assert parse_registry_response(await client.provide(replacing, new_kos)).status is Status.SUCCESS
    assert [unique_id_of(e) for e in await client.find(patient)] == ["2.25.7002"]
    assert [unique_id_of(e) for e in await client.find(patient, DEPRECATED)] == ["2.25.7001"]
    by_uid = await client.query(registry.GET_DOCUMENTS, **{"$XDSDocumentEntryUniqueId": "('2.25.7001')"})
    assert by_uid[0].get("status") == registry.DEPRECATED
    refs = await client.query(registry.GET_DOCUMENTS, "ObjectRef", **{"$XDSDocumentEntryEntryUUID": f"('urn:uuid:{new_entry}')"})
    assert [r.get("id") for r in refs] == [f"urn:uuid:{new_entry}"]
    sets = await client.query(registry.GET_SUBMISSION_SETS, **{"$uuid": f"('urn:uuid:{entry}')"})
    assert sorted(etree.QName(e).localname for e in sets) == ["Association", "RegistryPackage"]

    # ITI-43 error matrix: one good, one unknown document, one unknown repository -> PartialSuccess.
    response, parts = await client.retrieve((location, "2.25.7002"), (location, "2.25.404"), ("2.25.1", "2.25.7001"))
    result = parse_registry_response(response.find(f"{{{md.RS}}}RegistryResponse"))
    assert result.status is Status.PARTIAL_SUCCESS
    assert sorted(result.error_codes) == ["XDSDocumentUniqueIdError", "XDSUnknownRepositoryId"]
    assert len(response.findall(f"{{{md.XDS}}}DocumentResponse")) == 1
    response, _ = await client.retrieve(("2.25.1", "2.25.7001"))
    assert parse_registry_response(response.find(f"{{{md.RS}}}RegistryResponse")).status is Status.FAILURE

    # ITI-42 straight to the registry: a metadata error is a Failure RegistryResponse.
    bad = provide_and_register(make_info(tmp_path, location, "2.25.7003"), domain, entry_uuid=uuid.uuid4(),
                               submission_uuid=uuid.uuid4(), now=now)
    submit = bad.find(f"{{{md.LCM}}}SubmitObjectsRequest")  # no hash/size/repositoryUniqueId: the registry needs them
    envelope = soap.build_request(soap.ITI42, f"{client.base}/xds/registry", submit)
    status, answer_type, answer = await client.send("/xds/registry", soap.SOAP12_CONTENT_TYPE, envelope, mtom_required=False)
    result = parse_registry_response(client.payload(answer_type, answer)[0])
    assert status == 200 and result.status is Status.FAILURE and "XDSRegistryMetadataError" in result.error_codes


def make_info(tmp_path: Path, location: str, sop_uid: str) -> ManifestInfo:
    return ManifestInfo.from_part10(make_kos(tmp_path, location, sop_uid, "2.25.7000"), timezone=timezone.utc)


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope"><soap:Body><a>&x;</a></soap:Body></soap:Envelope>"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE l [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>
<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope"><soap:Body><a>&c;</a></soap:Body></soap:Envelope>"""
SOAP11 = b"""<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><a/></s:Body></s:Envelope>"""


@pytest_twisted.ensureDeferred
async def test_hostile_bodies(start_server, tmp_path: Path) -> None:
    """XXE, billion laughs, malformed XML, broken MTOM, SOAP 1.1, a wrong action, ITI-41 without MTOM and a body
    over the limit get clean SOAP faults (or 413); the server keeps answering queries afterwards."""
    server = await start_server(manifest={"enabled": "no"})
    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog, config.manifest.retrieve_location_uid))
    domain = config.xds.domain(location)
    client = Client(server, location)
    xml = soap.SOAP12_CONTENT_TYPE

    for path in ("/xds/repository", "/xds/registry"):
        for body in (XXE, LAUGHS, b"<soap:Envelope", b"\x00\xff garbage"):
            fault = await client.fault(path, xml, body)
            assert fault.code == "Sender"
        assert (await client.fault(path, "text/xml", SOAP11)).code == "VersionMismatch"
        fault = await client.fault(path, 'multipart/related; boundary="b"; type="application/xop+xml"', b"--b\r\nnot mime")
        assert fault.code == "Sender"

    # An action the endpoint does not serve.
    envelope = soap.build_request(soap.ITI18, f"{client.base}/xds/repository", query(registry.FIND_DOCUMENTS))
    fault = await client.fault("/xds/repository", xml, envelope)
    assert fault.code == "Sender" and fault.subcode == f"{{{soap.WSA_NS}}}ActionNotSupported"

    # ITI-41 as plain SOAP with inline base64: refused, MTOM is required.
    kos = make_kos(tmp_path, location, "2.25.8001", "2.25.8000")
    request = provide_and_register(make_info(tmp_path, location, "2.25.8001"), domain, entry_uuid=uuid.uuid4(),
                                   submission_uuid=uuid.uuid4(), now=datetime(2024, 1, 2, tzinfo=timezone.utc))
    request.find(f"{{{md.XDS}}}Document").text = base64.b64encode(kos).decode()
    envelope = soap.build_request(soap.ITI41, f"{client.base}/xds/repository", request)
    fault = await client.fault("/xds/repository", xml, envelope)
    assert fault.code == "Sender" and "MTOM" in fault.reason

    # Over the body limit.
    status, _type, _body = await threads.deferToThread(
        post, f"{client.base}/xds/registry", xml, b" " * (64 * 1024 * 1024 + 1)
    )
    assert status == 413

    # Still answering.
    assert await client.find(domain.patient_id("NOBODY")) == []


@pytest_twisted.ensureDeferred
async def test_schema_invalid_payloads(start_server, tmp_path: Path) -> None:
    """A well-formed MTOM ITI-41 whose DocumentEntry lacks its id, and an ITI-18 without AdhocQuery, are refused
    by schema validation with Failure and the metadata error naming the problem; nothing is registered and the
    server keeps answering."""
    server = await start_server(manifest={"enabled": "no"})
    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog, config.manifest.retrieve_location_uid))
    domain = config.xds.domain(location)
    client = Client(server, location)

    async def refused(path: str, content_type: str, body: bytes) -> etree._Element:
        assert any(e.startswith("schema:") for e in validate_message(content_type, body))  # really invalid
        status, answer_type, answer = await threads.deferToThread(post, f"{client.base}{path}", content_type, body)
        assert status == 200 and validate_message(answer_type, answer) == [], answer[:2000]
        return client.payload(answer_type, answer)[0]

    kos = make_kos(tmp_path, location, "2.25.9001", "2.25.9000")
    request = provide_and_register(make_info(tmp_path, location, "2.25.9001"), domain, entry_uuid=uuid.uuid4(),
                                   submission_uuid=uuid.uuid4(), now=datetime(2024, 1, 2, tzinfo=timezone.utc),
                                   document_id="kos@imageshare.test")
    entry = next(request.iter(f"{{{RIM}}}ExtrinsicObject"))
    del entry.attrib["id"]
    envelope = soap.build_request(soap.ITI41, f"{client.base}/xds/repository", request)
    content_type, body = mtom.build(envelope, {"kos@imageshare.test": ("application/dicom", kos)})
    result = parse_registry_response(await refused("/xds/repository", content_type, body))
    assert result.status is Status.FAILURE and result.error_codes == ("XDSRepositoryMetadataError",)
    assert "ExtrinsicObject" in result.errors[0].context and "'id'" in result.errors[0].context
    assert len(result.errors[0].context) <= 200

    adhoc = query(registry.FIND_DOCUMENTS)
    adhoc.remove(adhoc.find(f"{{{RIM}}}AdhocQuery"))
    envelope = soap.build_request(soap.ITI18, f"{client.base}/xds/registry", adhoc)
    response = await refused("/xds/registry", soap.SOAP12_CONTENT_TYPE, envelope)
    assert etree.QName(response).localname == "AdhocQueryResponse"
    assert response.get("status") == Status.FAILURE.value
    errors = response.findall(f".//{{{md.RS}}}RegistryError")
    assert [e.get("errorCode") for e in errors] == ["XDSRegistryMetadataError"]
    assert "AdhocQuery" in errors[0].get("codeContext")

    # Nothing registered; still answering.
    assert await client.find(domain.patient_id("XDS-PAT-1")) == []


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
@pytest_twisted.ensureDeferred
async def test_out_of_the_box_chain(start_server, tmp_path: Path) -> None:
    """The whole chain with the default [xds] repository_url = embedded: storescu sends a study,
    its manifest is built and registered by the outbox into the embedded repository,
    FindDocuments (ITI-18) finds it, ITI-43 returns the archived KOS byte for byte, RAD-69
    returns the instances the KOS lists as JPIP-referenced headers, and JPIP at their Pixel
    Data Provider URLs returns the exact pixels."""
    from twisted.internet import reactor

    # "embedded" means <public_url>/xds/repository: the public URL must name the real port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await start_server(
        http={"listen": f"tcp:{port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{port}"},
        manifest={"stable_after": "0.5"},
        xds={"retry_initial": "0.5", "retry_max": "1"},
    )
    files = make_instances(tmp_path / "study", 2, seed="xds-embedded-chain")
    await storescu(server, tmp_path / "study")
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await threads.deferToThread(get_status, server.url)
        if status.get("xds_registered", 0) >= 1:
            break
        await task.deferLater(reactor, 0.2, lambda: None)
    assert status.get("xds_registered") == 1 and status.get("xds_failed") == 0, status

    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog, config.manifest.retrieve_location_uid))
    domain = config.xds.domain(location)
    client = Client(server, location)
    first = dcmread(files[0], stop_before_pixels=True)
    found = await client.find(domain.patient_id(str(first.PatientID), str(first.get("IssuerOfPatientID", ""))))
    assert len(found) == 1
    kos_uid = unique_id_of(found[0])
    study = str(first.StudyInstanceUID)
    sources = await threads.deferToThread(server.service.catalog.manifest_sources, study)
    assert kos_uid == sources.current_uid
    response, parts = await client.retrieve((location, kos_uid))
    kos = mtom.element_bytes(response.find(f"{{{md.XDS}}}DocumentResponse/{{{md.XDS}}}Document"), parts)
    assert dcmread(io.BytesIO(kos)).SOPInstanceUID == kos_uid
    archived = [p for p in server.data_dir.rglob("*") if p.is_file() and p.read_bytes() == kos]
    assert archived, "the retrieved KOS is not byte-identical to an archived file"

    # The imaging document consumer's next step: RAD-69 for what the manifest lists.
    # Streamable ones only come back as .94 headers: the manifest does not wait for the
    # transcoder (it may be registered first on a busy machine), so this test does.
    await server.service.transcoder.when_idle()
    manifest = dcmread(io.BytesIO(kos))
    evidence = manifest.CurrentRequestedProcedureEvidenceSequence[0]
    wanted = [
        rad69.DocumentRequest(str(evidence.StudyInstanceUID), str(series.SeriesInstanceUID),
                              str(series.RetrieveLocationUID), str(ref.ReferencedSOPInstanceUID))
        for series in evidence.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence
    ]
    assert {d.document_unique_id for d in wanted} == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    endpoint = f"{server.url}/xds/imaging-source"
    envelope = soap.build_request(soap.RAD69, endpoint,
                                  rad69.build_request(wanted, [rad69.JPIP_REFERENCED, "1.2.840.10008.1.2.1"]))
    content_type, body = mtom.build(envelope, {})
    assert validate_message(content_type, body, require_mtom=True) == []

    def post_and_stream() -> dict[str, np.ndarray]:
        request = urllib.request.Request(endpoint, data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as r:
            answer_type, answer = r.headers["Content-Type"], r.read()
        assert validate_message(answer_type, answer, require_mtom=True) == []
        xml, attachments = mtom.parse(answer_type, answer)
        payload = soap.parse_envelope(safexml.parse(xml)).body
        assert parse_registry_response(payload[0]).status is Status.SUCCESS
        pixels = {}
        for document in payload.findall(f"{{{md.XDS}}}DocumentResponse"):
            header = dcmread(io.BytesIO(mtom.element_bytes(document.find(f"{{{md.XDS}}}Document"), attachments)))
            assert header.file_meta.TransferSyntaxUID == rad69.JPIP_REFERENCED and "PixelData" not in header
            url = urllib.parse.urlsplit(str(header[0x00287FE0].value))
            client = JpipClient(f"{server.url}{url.path}?{url.query}", timeout=30)
            client.fetch(fsiz=f"{header.Columns},{header.Rows}")
            pixels[str(header.SOPInstanceUID)] = client.view()[0]
        return pixels

    streamed = await threads.deferToThread(post_and_stream)
    for f in files:
        original = dcmread(f)
        np.testing.assert_array_equal(streamed[str(original.SOPInstanceUID)], original.pixel_array)


@pytest_twisted.ensureDeferred
async def test_embedded_registration_reaches_the_real_port(start_server, tmp_path: Path) -> None:
    """With the default repository_url (embedded) and a public_url that names another port
    (the test server listens on port 0), the manifest is still registered: the submitter
    posts to where HTTP really listens."""
    from twisted.internet import reactor

    server = await start_server(manifest={"stable_after": "0.3"})
    assert server.service.config.http.public_url.endswith(":8080")
    folder = tmp_path / "study"
    make_instances(folder, 2, seed="embedded-port")
    await storescu(server, folder)
    status: dict[str, Any] = {}
    for _ in range(300):
        status = await threads.deferToThread(get_status, server.url)
        if status.get("xds_registered") or status.get("xds_failed"):
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    assert status["xds_registered"] == 1 and status["xds_failed"] == 0, status
