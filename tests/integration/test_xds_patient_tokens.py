"""Per-patient tokens at the embedded XDS registry (ITI-18) and repository (ITI-43)."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
import pytest
import pytest_twisted
from lxml import etree
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet import threads

from imageshare.dicom.manifest import KOS_SOP_CLASS, InstanceRef, StudySummary, build_manifest, encode_manifest
from imageshare.manifests import LocationUid
from imageshare.xds import metadata as md
from imageshare.xds import mtom, registry, safexml, soap
from imageshare.xds.metadata import ManifestInfo, provide_and_register
from imageshare.xds.responses import Status, parse_registry_response
from tests.auth.keys import AUDIENCE, ISSUER, Keys
from tests.helpers import part10_file
from tests.integration.test_xds_embedded import APPROVED, unique_id_of
from tests.xds.test_registry import query

pytestmark = [pytest.mark.integration]

AUTHORITY = "1.2.3.4.5"


def post(url: str, token: str, content_type: str, body: bytes) -> tuple[int, str, bytes]:
    """POST with a bearer token (blocking; run in a thread): status, Content-Type, body."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def kos_for(tmp_path: Path, location: str, patient_id: str, sop_uid: str, study_uid: str) -> bytes:
    """A KOS manifest (Part 10) of one study of ``patient_id``."""
    study = StudySummary(
        study_instance_uid=study_uid, patient_id=patient_id, patient_name="Doe^Jane", patient_birth_date="19700101",
        patient_sex="F", study_date="20240102", study_time="101500", accession_number=f"ACC-{patient_id}",
    )
    ds = build_manifest(
        study, [InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"{study_uid}.3.1", f"{study_uid}.2")],
        retrieve_ae_title="IMAGESHARE", retrieve_location_uid=location, retrieve_url="http://127.0.0.1/wado",
        sop_instance_uid=sop_uid, series_instance_uid=f"{sop_uid}.9", now=datetime(2024, 1, 2, 10, 30),
    )
    path = part10_file(tmp_path / f"{sop_uid}.dcm", encode_manifest(ds), transfer_syntax=ExplicitVRLittleEndian,
                       sop_class_uid=KOS_SOP_CLASS, sop_instance_uid=sop_uid)
    return path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_a_patient_token_sees_only_its_patient_in_xds(start_server, tmp_path: Path) -> None:
    """Two patients' manifests are registered. A token for patient A finds A's document with ITI-18
    (FindDocuments, GetDocuments, GetSubmissionSets) and retrieves it with ITI-43; for B it finds
    nothing (Success, no objects), and ITI-43 of B's document answers exactly as an unknown document
    (XDSDocumentUniqueIdError). Such a token cannot submit (403). A token naming no patient sees both."""
    keys = Keys()
    server = await start_server(
        auth={"mode": "bearer", "issuer": ISSUER, "audience": AUDIENCE,
              "jwks": str(keys.write_jwks(tmp_path / "jwks.json"))},
        manifest={"enabled": "no"}, xds={"patient_authority": AUTHORITY},
    )
    config = server.service.config
    location = await server.service.db_pool.run(LocationUid(server.service.catalog, config.manifest.retrieve_location_uid))
    domain = config.xds.domain(location)
    pa, pb = domain.patient_id("PAT-A"), domain.patient_id("PAT-B")
    assert pa == f"PAT-A^^^&{AUTHORITY}&ISO"
    writer = keys.token(sub="source", scope="xds.write")
    everyone = keys.token(sub="consumer", scope="xds.read")
    only_a = keys.token(sub="patient-a", scope="xds.read xds.write", extensions={"ihe_bppc": {"patient_id": pa}})

    async def send(path: str, token: str, content_type: str, body: bytes) -> tuple[int, str, bytes]:
        return await threads.deferToThread(post, f"{server.url}{path}", token, content_type, body)

    submitted: dict[str, tuple[bytes, bytes]] = {}  # patient -> (ITI-41 request, KOS)
    entries: dict[str, str] = {}
    for name, patient_id, sop, study in (("a", "PAT-A", "2.25.8101", "2.25.8100"),
                                         ("b", "PAT-B", "2.25.8201", "2.25.8200")):
        kos = kos_for(tmp_path, location, patient_id, sop, study)
        info = ManifestInfo.from_part10(kos, modalities=["CT"], body_parts=["CHEST"], timezone=timezone.utc)
        entry = uuid.uuid4()
        entries[name] = f"urn:uuid:{entry}"
        request = provide_and_register(info, domain, entry_uuid=entry, submission_uuid=uuid.uuid4(),
                                       now=datetime(2024, 1, 2, 11, 0, tzinfo=timezone.utc),
                                       document_id="kos@imageshare.test")
        envelope = soap.build_request(soap.ITI41, f"{server.url}/xds/repository", request)
        content_type, body = mtom.build(envelope, {"kos@imageshare.test": ("application/dicom", kos)})
        submitted[name] = (content_type.encode(), body)
        if name == "a":
            # A token restricted to a patient never submits, not even for its own patient.
            code, _, answer = await send("/xds/repository", only_a, content_type, body)
            assert code == 403, answer
        code, answer_type, answer = await send("/xds/repository", writer, content_type, body)
        xml, _ = mtom.parse(answer_type, answer)
        assert code == 200
        assert parse_registry_response(soap.parse_envelope(safexml.parse(xml)).body).status is Status.SUCCESS

    async def stored_query(token: str, query_id: str, **params: str) -> list[str]:
        envelope = soap.build_request(soap.ITI18, f"{server.url}/xds/registry", query(query_id, "LeafClass", **params))
        code, _, answer = await send("/xds/registry", token, soap.SOAP12_CONTENT_TYPE, envelope)
        assert code == 200, answer
        response = soap.parse_envelope(safexml.parse(answer)).body
        assert response.get("status") == Status.SUCCESS.value
        return [e.get("id") for e in response.find(f"{{{md.RIM}}}RegistryObjectList")]

    async def find(token: str, patient: str) -> list[str]:
        return await stored_query(token, registry.FIND_DOCUMENTS, **{
            "$XDSDocumentEntryPatientId": f"'{patient}'", "$XDSDocumentEntryStatus": APPROVED})

    async def retrieve(token: str, document: str) -> tuple[int, list[str]]:
        body = etree.Element(f"{{{md.XDS}}}RetrieveDocumentSetRequest", nsmap={"xds": md.XDS})
        item = etree.SubElement(body, f"{{{md.XDS}}}DocumentRequest")
        etree.SubElement(item, f"{{{md.XDS}}}RepositoryUniqueId").text = domain.repository_unique_id
        etree.SubElement(item, f"{{{md.XDS}}}DocumentUniqueId").text = document
        content_type, packaged = mtom.build(soap.build_request(soap.ITI43, f"{server.url}/xds/repository", body), {})
        code, answer_type, answer = await send("/xds/repository", token, content_type, packaged)
        assert code == 200, answer
        xml, _ = mtom.parse(answer_type, answer)
        reply = soap.parse_envelope(safexml.parse(xml)).body
        errors = [e.get("errorCode") for e in reply.iter(f"{{{md.RS}}}RegistryError")]
        return len(reply.findall(f"{{{md.XDS}}}DocumentResponse")), errors

    # ITI-18 FindDocuments.
    assert await find(only_a, pa) == [entries["a"]]
    assert await find(only_a, pb) == []
    assert await find(everyone, pa) == [entries["a"]] and await find(everyone, pb) == [entries["b"]]
    # GetDocuments by entryUUID and by uniqueId; GetSubmissionSets.
    both = f"('{entries['a']}','{entries['b']}')"
    assert await stored_query(only_a, registry.GET_DOCUMENTS, **{"$XDSDocumentEntryEntryUUID": both}) == [entries["a"]]
    assert await stored_query(everyone, registry.GET_DOCUMENTS, **{"$XDSDocumentEntryEntryUUID": both}) \
        == [entries["a"], entries["b"]]
    assert await stored_query(only_a, registry.GET_DOCUMENTS,
                              **{"$XDSDocumentEntryUniqueId": "('2.25.8201')"}) == []
    assert await stored_query(everyone, registry.GET_DOCUMENTS,
                              **{"$XDSDocumentEntryUniqueId": "('2.25.8201')"}) == [entries["b"]]
    assert await stored_query(only_a, registry.GET_SUBMISSION_SETS,
                              **{"$uuid": f"('{entries['b']}')"}) == []
    assert len(await stored_query(only_a, registry.GET_SUBMISSION_SETS,
                                  **{"$uuid": f"('{entries['a']}')"})) == 2  # the set and its HasMember
    assert len(await stored_query(everyone, registry.GET_SUBMISSION_SETS,
                                  **{"$uuid": f"('{entries['b']}')"})) == 2

    # ITI-43: B's document is answered as an unknown one.
    assert await retrieve(only_a, "2.25.8101") == (1, [])
    hidden = await retrieve(only_a, "2.25.8201")
    assert hidden == await retrieve(only_a, "2.25.9999") == (0, ["XDSDocumentUniqueIdError"])
    assert await retrieve(everyone, "2.25.8201") == (1, [])

    # ITI-42 with the patient's token: 403 as well.
    code, _, _ = await send("/xds/registry", only_a,
                            f'application/soap+xml; action="{soap.ITI42}"', b"<x/>")
    assert code == 403
