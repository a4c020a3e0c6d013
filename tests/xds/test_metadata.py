"""
RAD-68 / ITI-41 Document Source metadata (imageshare.xds.metadata) and the Affinity Domain
(imageshare.xds.affinity).

Every request built here is validated against the IHE schema copy in tests/xds/schemas and
checked against the acceptance checks of xds-i.md section 9 (B to H), one assertion per rule.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree

from pydicom.uid import ExplicitVRLittleEndian

from imageshare.dicom.manifest import KOS_SOP_CLASS, InstanceRef, StudySummary, build_manifest, encode_manifest
from imageshare.xds.affinity import (
    AffinityDomain,
    AffinityDomainError,
    Author,
    Code,
    PatientIdError,
    hl7_escape,
    is_oid,
)
from imageshare.xds.metadata import (
    ACCESSION_TYPE,
    DE_AUTHOR,
    DE_CLASS_CODE,
    DE_CONFIDENTIALITY_CODE,
    DE_EVENT_CODE_LIST,
    DE_FORMAT_CODE,
    DE_HEALTHCARE_FACILITY_TYPE_CODE,
    DE_PATIENT_ID,
    DE_PRACTICE_SETTING_CODE,
    DE_TYPE_CODE,
    DE_UNIQUE_ID,
    DOCUMENT_ENTRY_STABLE,
    HAS_MEMBER,
    REFERENCE_ID_LIST,
    RPLC,
    SS_AUTHOR,
    SS_CONTENT_TYPE_CODE,
    SS_PATIENT_ID,
    SS_SOURCE_ID,
    SS_UNIQUE_ID,
    STUDY_INSTANCE_UID_TYPE,
    SUBMISSION_SET,
    ManifestInfo,
    MetadataError,
    anatomic_region,
    event_codes,
    modality_code,
    provide_and_register,
    study_dtm,
    submission_unique_id,
)
from imageshare.xds import mtom, soap
from imageshare.xds.mtom import MtomError
from tests.helpers import part10_file
from tests.xds import validator

SCHEMAS = Path(__file__).parent / "schemas" / "schema"
NS = {
    "xds": "urn:ihe:iti:xds-b:2007",
    "lcm": "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0",
    "rim": "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0",
    "xop": "http://www.w3.org/2004/08/xop/include",
}
URN_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
DTM = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2})?)?)?)?)?\Z")
CX_ISO = re.compile(r"[^^&]+\^\^\^[^&^]*&[0-2](\.\d+)+&ISO\Z")

ENTRY = "urn:uuid:0b6ae1d2-7d0b-4f6c-8b7e-3c1f55b1a001"
SUBMISSION = "urn:uuid:0b6ae1d2-7d0b-4f6c-8b7e-3c1f55b1a002"
OLD_ENTRY = "urn:uuid:0b6ae1d2-7d0b-4f6c-8b7e-3c1f55b1a003"
NOW = datetime(2024, 1, 2, 10, 31, 5, tzinfo=timezone.utc)
SERVER_OID = "2.25.203254238431958240513424123398110723341"

# Slot names a Document Source may send (xds-i.md 2.2).
LEGAL_DE_SLOTS = {
    "creationTime", "languageCode", "serviceStartTime", "serviceStopTime", "sourcePatientId",
    "sourcePatientInfo", "legalAuthenticator", "hash", "size", "repositoryUniqueId", "URI",
    "documentAvailability", REFERENCE_ID_LIST,
}
SINGLE_VALUED = {
    "creationTime", "languageCode", "serviceStartTime", "serviceStopTime", "sourcePatientId",
    "legalAuthenticator", "hash", "size", "repositoryUniqueId", "submissionTime",
    "SubmissionSetStatus", "codingScheme",
}


class _Resolver(etree.Resolver):
    """Maps the absolute xml.xsd URL of rim.xsd to the local copy: no network."""

    def resolve(self, url, pubid, context):  # type: ignore[no-untyped-def]
        if url == "http://www.w3.org/2001/xml.xsd":
            return self.resolve_filename(str(SCHEMAS / "w3c" / "xml.xsd"), context)
        return None


@pytest.fixture(scope="module")
def repository_schema() -> etree.XMLSchema:
    """The XDS.b Document Repository schema (ITI-41/43 payloads and all of ebRS 3.0)."""
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(_Resolver())
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "IHE" / "XDS.b_DocumentRepository.xsd"), parser))


def make_manifest(**changes: object) -> ManifestInfo:
    values: dict[str, object] = dict(
        sop_instance_uid="2.25.1004",
        study_instance_uid="2.25.1001",
        patient_id="PID123",
        issuer_of_patient_id="HOSP",
        accession_number="ACC123",
        accession_issuer="1.2.3.4.5.6",
        patient_name="Doe^Jane^Q^Dr^Jr",
        patient_birth_date="19700101",
        patient_sex="F",
        study_date="20240102",
        study_time="101500",
        modalities=("CT", "KO", "CT", "PT"),
        body_parts=("CHEST", "ABDOMEN", "NOT_A_TERM"),
        title="CT chest imaging study manifest",
        size=1234,
        sha1="a9993e364706816aba3e25717850c26c9cd0d89d",
        creation_time=datetime(2024, 1, 2, 10, 30, tzinfo=timezone.utc),
        timezone=timezone.utc,
    )
    values.update(changes)
    return ManifestInfo(**values)  # type: ignore[arg-type]


def make_domain(**changes: object) -> AffinityDomain:
    return AffinityDomain.standalone(
        SERVER_OID, author=Author(institution=f"ImageShare^^^^^&{SERVER_OID}&ISO^^^^{SERVER_OID}"), **changes
    )


def build(manifest: ManifestInfo | None = None, domain: AffinityDomain | None = None, **kwargs: object) -> etree._Element:
    return provide_and_register(
        manifest or make_manifest(),
        domain or make_domain(),
        entry_uuid=kwargs.pop("entry_uuid", ENTRY),  # type: ignore[arg-type]
        submission_uuid=kwargs.pop("submission_uuid", SUBMISSION),  # type: ignore[arg-type]
        now=kwargs.pop("now", NOW),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def inline_xop(request: etree._Element, parts: dict[str, bytes]) -> etree._Element:
    """XOP reconstruction: replace each xop:Include by the base64 of its part (as MTOM receivers do)."""
    request = copy.deepcopy(request)
    for include in request.iterfind(".//xop:Include", NS):
        parent = include.getparent()
        parent.remove(include)
        parent.text = base64.b64encode(parts[include.get("href")]).decode()
    return request


def assert_valid(schema: etree.XMLSchema, element: etree._Element) -> None:
    reparsed = etree.fromstring(etree.tostring(element))  # what the receiver parses
    assert schema.validate(reparsed), schema.error_log


def the(element: etree._Element, path: str) -> etree._Element:
    found = element.findall(path, NS)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]


def slots(owner: etree._Element) -> dict[str, list[str]]:
    return {
        slot.get("name"): [v.text or "" for v in slot.iterfind("rim:ValueList/rim:Value", NS)]
        for slot in owner.iterfind("rim:Slot", NS)
    }


def classifications(owner: etree._Element, scheme: str) -> list[etree._Element]:
    return owner.findall(f"rim:Classification[@classificationScheme='{scheme}']", NS)


def identifier(owner: etree._Element, scheme: str) -> str:
    return the(owner, f"rim:ExternalIdentifier[@identificationScheme='{scheme}']").get("value")


def coded(element: etree._Element) -> tuple[str, str, str]:
    return (
        element.get("nodeRepresentation"),
        slots(element)["codingScheme"][0],
        the(element, "rim:Name/rim:LocalizedString").get("value"),
    )


@pytest.fixture
def request_() -> etree._Element:
    return build(document_id="kos.1@imageshare")


# ------------------------------------------------------------------------------ B. schema


def test_request_validates_with_empty_document(repository_schema: etree.XMLSchema) -> None:
    """The request with an empty xds:Document (to be filled by the MTOM packager) is schema-valid."""
    assert_valid(repository_schema, build())


def test_request_validates_after_xop_reconstruction(
    repository_schema: etree.XMLSchema, request_: etree._Element
) -> None:
    """With an xop:Include of the KOS part, the reconstructed infoset (base64 inlined) is schema-valid."""
    include = the(request_, "xds:Document/xop:Include")
    assert include.get("href") == "cid:kos.1@imageshare"
    assert_valid(repository_schema, inline_xop(request_, {"cid:kos.1@imageshare": b"DICM" * 40}))


def test_rplc_request_validates(repository_schema: etree.XMLSchema) -> None:
    """A replacement submission (with the RPLC association) is schema-valid."""
    assert_valid(repository_schema, build(replaces=OLD_ENTRY))


def test_minimal_manifest_validates(repository_schema: etree.XMLSchema) -> None:
    """A manifest knowing only the required values, in a domain without author, is schema-valid."""
    manifest = ManifestInfo(
        sop_instance_uid="2.25.9",
        study_instance_uid="2.25.8",
        patient_id="P",
        size=10,
        sha1=hashlib.sha1(b"x").hexdigest(),
        creation_time=NOW,
    )
    request = build(manifest, AffinityDomain.standalone(SERVER_OID))
    assert_valid(repository_schema, request)
    entry = the(request, ".//rim:ExtrinsicObject")
    assert "serviceStartTime" not in slots(entry)
    assert slots(entry)[REFERENCE_ID_LIST] == [f"2.25.8^^^^{STUDY_INSTANCE_UID_TYPE}"]
    assert classifications(entry, DE_EVENT_CODE_LIST) == []
    assert classifications(entry, DE_AUTHOR) == []
    assert entry.find("rim:Name", NS) is None


def test_request_is_deterministic() -> None:
    """Building the same submission twice gives the same bytes, so a retry re-sends the same thing."""
    assert etree.tostring(build(replaces=OLD_ENTRY)) == etree.tostring(build(replaces=OLD_ENTRY))
    other = build(submission_uuid=uuid.uuid4())
    assert etree.tostring(other) != etree.tostring(build())


# ------------------------------------------------------------------------------ C. structure


def test_exactly_one_submission_set_classified_once(request_: etree._Element) -> None:
    """One RegistryPackage, and one Classification marking it as the SubmissionSet."""
    package = the(request_, ".//rim:RegistryPackage")
    assert package.get("id") == SUBMISSION
    marks = request_.findall(f".//rim:Classification[@classificationNode='{SUBMISSION_SET}']", NS)
    assert len(marks) == 1
    assert marks[0].get("classifiedObject") == SUBMISSION


def test_has_member_association(request_: etree._Element) -> None:
    """The DocumentEntry is linked by one HasMember association with a single SubmissionSetStatus Original."""
    objects = the(request_, "lcm:SubmitObjectsRequest/rim:RegistryObjectList")
    members = objects.findall(f"rim:Association[@associationType='{HAS_MEMBER}']", NS)
    assert len(members) == 1
    assert (members[0].get("sourceObject"), members[0].get("targetObject")) == (SUBMISSION, ENTRY)
    assert slots(members[0]) == {"SubmissionSetStatus": ["Original"]}


def test_association_types_are_namespaced_and_never_target_the_submission_set(request_: etree._Element) -> None:
    """Association types are full URNs (not the XDS.a 'HasMember'), and no association targets the SubmissionSet."""
    for association in request_.iterfind(".//rim:Association", NS):
        assert association.get("associationType").startswith("urn:")
        assert association.get("targetObject") != SUBMISSION


def test_no_rplc_without_replaces(request_: etree._Element) -> None:
    """A first submission has no RPLC association."""
    assert request_.findall(f".//rim:Association[@associationType='{RPLC}']", NS) == []


def test_rplc_association_from_new_to_old_entry() -> None:
    """A replacement carries one RPLC association from the new DocumentEntry to the replaced one."""
    request = build(replaces=OLD_ENTRY.upper().replace("URN:UUID:", ""))
    rplc = request.findall(f".//rim:Association[@associationType='{RPLC}']", NS)
    assert len(rplc) == 1
    assert (rplc[0].get("sourceObject"), rplc[0].get("targetObject")) == (ENTRY, OLD_ENTRY)
    assert URN_UUID.match(rplc[0].get("id"))
    # the HasMember association is still there
    assert len(request.findall(f".//rim:Association[@associationType='{HAS_MEMBER}']", NS)) == 1


def test_every_id_is_a_full_urn_uuid_and_unique(request_: etree._Element) -> None:
    """Every object has an id, each a distinct urn:uuid URN; references point at these URNs."""
    ids = [element.get("id") for element in request_.iter() if element.get("id") is not None]
    objects = the(request_, ".//rim:RegistryObjectList")
    for element in objects.iter(f"{{{NS['rim']}}}ExtrinsicObject", f"{{{NS['rim']}}}RegistryPackage",
                                f"{{{NS['rim']}}}Classification", f"{{{NS['rim']}}}ExternalIdentifier",
                                f"{{{NS['rim']}}}Association"):
        assert element.get("id"), etree.tostring(element)
    registry_ids = [i for i in ids if i is not None]
    # the Document element repeats its ExtrinsicObject's id; everything else is distinct
    assert len(set(registry_ids)) == len(registry_ids) - 1
    for value in registry_ids:
        assert URN_UUID.match(value), value
    for attribute in ("classifiedObject", "registryObject", "sourceObject", "targetObject"):
        for element in request_.iterfind(f".//*[@{attribute}]"):
            assert URN_UUID.match(element.get(attribute))


def test_one_document_per_document_entry(request_: etree._Element) -> None:
    """Exactly one xds:Document, whose id equals the ExtrinsicObject id."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    document = the(request_, "xds:Document")
    assert document.get("id") == entry.get("id") == ENTRY


def test_document_cid_is_url_escaped() -> None:
    """The xop:Include href is 'cid:' plus the Content-ID, percent-escaped where needed; bad ids are refused."""
    include = the(build(document_id="kos/1@host"), "xds:Document/xop:Include")
    assert include.get("href") == "cid:kos%2F1@host"
    with pytest.raises(MtomError):
        build(document_id="<kos@host>")


def test_mtom_package_passes_the_project_validator(tmp_path: Path) -> None:
    """The request wrapped by soap.build_request and packaged by mtom.build passes tests/xds/validator.py with MTOM required."""
    kos = b"\0" * 128 + b"DICM" + b"payload"
    request = build(document_id="kos.1@imageshare", replaces=OLD_ENTRY)
    envelope = soap.build_request(
        "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b", "http://127.0.0.1/xds/repository", request
    )
    content_type, body = mtom.build(envelope, {"kos.1@imageshare": ("application/dicom", kos)})
    assert validator.validate_message(content_type, body, require_mtom=True) == []


# ------------------------------------------------------------------------------ D. presence / multiplicity


def test_document_entry_required_attributes(request_: etree._Element) -> None:
    """Every R attribute of the DocumentEntry (xds-i.md 2.3) is present, with the R2 ones we know."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert entry.get("mimeType") == "application/dicom"
    assert entry.get("objectType") == DOCUMENT_ENTRY_STABLE
    values = slots(entry)
    for name in ("creationTime", "languageCode", "sourcePatientId", "serviceStartTime"):
        assert len(values[name]) == 1, name
    for scheme in (DE_CLASS_CODE, DE_CONFIDENTIALITY_CODE, DE_FORMAT_CODE, DE_HEALTHCARE_FACILITY_TYPE_CODE,
                   DE_PRACTICE_SETTING_CODE, DE_TYPE_CODE):
        assert len(classifications(entry, scheme)) == 1, scheme
    identifier(entry, DE_PATIENT_ID)
    identifier(entry, DE_UNIQUE_ID)
    assert len(classifications(entry, DE_AUTHOR)) == 1


def test_submission_set_required_attributes(request_: etree._Element) -> None:
    """Every R attribute of the SubmissionSet is present (contentTypeCode, ids, submissionTime), author R2 too."""
    package = the(request_, ".//rim:RegistryPackage")
    assert slots(package)["submissionTime"] == ["20240102103105"]
    assert len(classifications(package, SS_CONTENT_TYPE_CODE)) == 1
    assert len(classifications(package, SS_AUTHOR)) == 1
    identifier(package, SS_UNIQUE_ID)
    identifier(package, SS_SOURCE_ID)
    identifier(package, SS_PATIENT_ID)


def test_single_valued_slots_and_legal_slot_names(request_: etree._Element) -> None:
    """Single-valued slots hold one value; the DocumentEntry uses only legal slot names."""
    for slot in request_.iterfind(".//rim:Slot", NS):
        if slot.get("name") in SINGLE_VALUED:
            assert len(slot.findall("rim:ValueList/rim:Value", NS)) == 1, slot.get("name")
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert set(slots(entry)) <= LEGAL_DE_SLOTS
    assert set(slots(the(request_, ".//rim:RegistryPackage"))) <= {"submissionTime", "intendedRecipient"}


def test_author_classifications(request_: etree._Element) -> None:
    """Author classifications have nodeRepresentation='' and a person, institution or telecom slot."""
    for scheme in (DE_AUTHOR, SS_AUTHOR):
        (author,) = request_.findall(f".//rim:Classification[@classificationScheme='{scheme}']", NS)
        assert author.get("nodeRepresentation") == ""
        assert {"authorPerson", "authorInstitution", "authorTelecommunication"} & set(slots(author))


def test_coded_classifications_have_one_coding_scheme_and_a_name(request_: etree._Element) -> None:
    """Every coded Classification has exactly one codingScheme value and a display Name."""
    for classification in request_.iterfind(".//rim:Classification[@classificationScheme]", NS):
        if classification.get("classificationScheme") in (DE_AUTHOR, SS_AUTHOR):
            continue
        assert classification.get("nodeRepresentation")
        assert len(slots(classification)["codingScheme"]) == 1
        assert the(classification, "rim:Name/rim:LocalizedString").get("value")


# ------------------------------------------------------------------------------ E. formats


def test_uuid_syntax_of_schemes(request_: etree._Element) -> None:
    """Every classification and identification scheme is a urn:uuid URN."""
    for attribute in ("classificationScheme", "identificationScheme", "classificationNode"):
        for element in request_.iterfind(f".//*[@{attribute}]"):
            assert URN_UUID.match(element.get(attribute))


def test_unique_ids_are_oids_and_distinct(request_: etree._Element) -> None:
    """DocumentEntry and SubmissionSet uniqueIds are OIDs of at most 64 characters, different from each other."""
    entry_uid = identifier(the(request_, ".//rim:ExtrinsicObject"), DE_UNIQUE_ID)
    set_uid = identifier(the(request_, ".//rim:RegistryPackage"), SS_UNIQUE_ID)
    assert is_oid(entry_uid) and is_oid(set_uid) and entry_uid != set_uid
    assert set_uid == submission_unique_id(SUBMISSION) == f"2.25.{uuid.UUID(SUBMISSION[9:]).int}"


def test_times_are_utc_dtm(request_: etree._Element) -> None:
    """creationTime, serviceStartTime and submissionTime are DTM values."""
    entry = slots(the(request_, ".//rim:ExtrinsicObject"))
    assert entry["creationTime"] == ["20240102103000"]
    assert entry["serviceStartTime"] == ["20240102101500"]
    for name in ("creationTime", "serviceStartTime"):
        assert DTM.match(entry[name][0])


def test_patient_ids_are_cx_with_iso_authority(request_: etree._Element) -> None:
    """patientId and sourcePatientId are CX with an &OID&ISO assigning authority."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert CX_ISO.match(identifier(entry, DE_PATIENT_ID))
    assert CX_ISO.match(slots(entry)["sourcePatientId"][0])


def test_source_patient_info(request_: etree._Element) -> None:
    """sourcePatientInfo holds PID-3, PID-5 (XPN: suffix before prefix), PID-7 and PID-8."""
    entry = slots(the(request_, ".//rim:ExtrinsicObject"))
    source_id = entry["sourcePatientId"][0]
    assert entry["sourcePatientInfo"] == [
        f"PID-3|{source_id}",
        "PID-5|Doe^Jane^Q^Jr^Dr",
        "PID-7|19700101",
        "PID-8|F",
    ]


def test_hash_and_size(request_: etree._Element) -> None:
    """hash is the SHA-1 hex digest and size an integer octet count."""
    entry = slots(the(request_, ".//rim:ExtrinsicObject"))
    assert re.fullmatch(r"[0-9a-f]{40}", entry["hash"][0])
    assert entry["size"] == ["1234"]


# ------------------------------------------------------------------------------ F. codes


def test_codes_come_from_the_affinity_domain() -> None:
    """Configured codes are the ones sent, for every coded attribute."""
    domain = make_domain(
        class_code=Code("IMG", "1.3.6.1.4.1.21367.100.1", "Images"),
        type_code=Code("T1", "1.3.6.1.4.1.21367.100.2", "Type one"),
        practice_setting_code=Code("P1", "1.3.6.1.4.1.21367.100.3", "Practice"),
        healthcare_facility_type_code=Code("F1", "1.3.6.1.4.1.21367.100.4", "Facility"),
        confidentiality_code=Code("R", "2.16.840.1.113883.5.25", "Restricted"),
        content_type_code=Code("C1", "1.3.6.1.4.1.21367.100.5", "Content"),
        event_code_schemes={"DCM": "DCM", "SCT": "SRT"},
    )
    request = build(domain=domain)
    entry = the(request, ".//rim:ExtrinsicObject")
    package = the(request, ".//rim:RegistryPackage")
    assert coded(classifications(entry, DE_CLASS_CODE)[0]) == ("IMG", "1.3.6.1.4.1.21367.100.1", "Images")
    assert coded(classifications(entry, DE_TYPE_CODE)[0]) == ("T1", "1.3.6.1.4.1.21367.100.2", "Type one")
    assert coded(classifications(entry, DE_PRACTICE_SETTING_CODE)[0])[0] == "P1"
    assert coded(classifications(entry, DE_HEALTHCARE_FACILITY_TYPE_CODE)[0])[0] == "F1"
    assert coded(classifications(entry, DE_CONFIDENTIALITY_CODE)[0]) == ("R", "2.16.840.1.113883.5.25", "Restricted")
    assert coded(classifications(package, SS_CONTENT_TYPE_CODE)[0])[0] == "C1"
    schemes = {coded(c)[1] for c in classifications(entry, DE_EVENT_CODE_LIST)}
    assert schemes == {"DCM", "SRT"}


def test_default_confidentiality_code(request_: etree._Element) -> None:
    """The default confidentiality code is HL7 N (normal)."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert coded(classifications(entry, DE_CONFIDENTIALITY_CODE)[0]) == ("N", "2.16.840.1.113883.5.25", "Normal")


# ------------------------------------------------------------------------------ G. patient


def test_patient_id_is_the_domain_id_in_both_objects(request_: etree._Element) -> None:
    """DocumentEntry and SubmissionSet patientId are identical and carry the domain's authority."""
    entry_pid = identifier(the(request_, ".//rim:ExtrinsicObject"), DE_PATIENT_ID)
    set_pid = identifier(the(request_, ".//rim:RegistryPackage"), SS_PATIENT_ID)
    assert entry_pid == set_pid == f"PID123^^^&{SERVER_OID}.1&ISO"


def test_mapped_issuer_gives_its_domain_authority() -> None:
    """A patient of a mapped issuer is registered under that issuer's domain authority."""
    domain = make_domain(issuer_authorities={"HOSP": "1.3.6.1.4.1.21367.2005.13.20.1000"})
    request = build(domain=domain)
    assert identifier(the(request, ".//rim:ExtrinsicObject"), DE_PATIENT_ID) == (
        "PID123^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"
    )


def test_unmapped_issuer_rejected_when_configured() -> None:
    """With unmapped_issuers='reject', a patient of an unmapped issuer cannot be registered."""
    domain = make_domain(issuer_authorities={"OTHER": "1.2.3"}, unmapped_issuers="reject")
    with pytest.raises(PatientIdError):
        build(domain=domain)


# ------------------------------------------------------------------------------ H. XDS-I.b values


def test_xds_i_format_code_mime_type_and_unique_id(request_: etree._Element) -> None:
    """formatCode is the KOS SOP Class in the DICOM UID registry; mimeType application/dicom; uniqueId the KOS UID."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert entry.get("mimeType") == "application/dicom"
    assert coded(classifications(entry, DE_FORMAT_CODE)[0]) == (
        "1.2.840.10008.5.1.4.1.1.88.59",
        "1.2.840.10008.2.6.1",
        "Key Object Selection Document",
    )
    assert identifier(entry, DE_UNIQUE_ID) == "2.25.1004"


def test_xds_i_event_code_list(request_: etree._Element) -> None:
    """eventCodeList: each acquisition modality once (CID 29, KO left out), then the anatomic regions (CID 4)."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert [coded(c) for c in classifications(entry, DE_EVENT_CODE_LIST)] == [
        ("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),
        ("PT", "1.2.840.10008.2.16.4", "Positron emission tomography"),
        ("816094009", "2.16.840.1.113883.6.96", "Thorax"),
        ("818981001", "2.16.840.1.113883.6.96", "Abdomen"),
    ]


def test_xds_i_reference_id_list(request_: etree._Element) -> None:
    """referenceIdList holds the Study Instance UID and the accession number with its issuer (CXi)."""
    entry = slots(the(request_, ".//rim:ExtrinsicObject"))
    assert entry[REFERENCE_ID_LIST] == [
        f"2.25.1001^^^^{STUDY_INSTANCE_UID_TYPE}",
        f"ACC123^^^&1.2.3.4.5.6&ISO^{ACCESSION_TYPE}",
    ]
    without_issuer = slots(the(build(make_manifest(accession_issuer="")), ".//rim:ExtrinsicObject"))
    assert without_issuer[REFERENCE_ID_LIST][1] == f"ACC123^^^^{ACCESSION_TYPE}"


def test_document_entry_title(request_: etree._Element) -> None:
    """The manifest title is the DocumentEntry Name."""
    entry = the(request_, ".//rim:ExtrinsicObject")
    assert the(entry, "rim:Name/rim:LocalizedString").get("value") == "CT chest imaging study manifest"


# ------------------------------------------------------------------------------ value helpers


def test_study_dtm_converts_to_utc_keeping_precision() -> None:
    """serviceStartTime: local study date/time moved to UTC, precision kept, date alone stays a date."""
    plus2 = timezone(timedelta(hours=2))
    assert study_dtm("20240102", "010203", plus2) == "20240101230203"
    assert study_dtm("20240102", "0102", plus2) == "202401012302"
    assert study_dtm("20240102", "01", plus2) == "2024010123"
    assert study_dtm("20240102", "10:15:00.123456", timezone.utc) == "20240102101500"
    assert study_dtm("20240102", "", plus2) == "20240102"
    assert study_dtm("", "101500", plus2) is None
    assert study_dtm("2024013", "", plus2) is None
    with pytest.raises(MetadataError):
        study_dtm("20240102", "25x")


def test_modality_and_anatomy_lookup() -> None:
    """Modalities map through CID 29, Body Part Examined terms through CID 4; others give None."""
    assert modality_code("mr") == Code("MR", "DCM", "Magnetic Resonance")
    assert modality_code("SR") is None
    assert anatomic_region("HEAD") == Code("69536005", "SCT", "Head")
    assert anatomic_region("LSPINE") == Code("122496007", "SCT", "Lumbar spine")
    assert anatomic_region("") is None
    assert anatomic_region("NOT_A_TERM") is None
    domain = make_domain()
    assert event_codes(make_manifest(modalities=(), body_parts=()), domain) == []


def test_manifest_info_from_part10(tmp_path: Path) -> None:
    """ManifestInfo.from_part10 reads a real KOS built by imageshare.dicom.manifest: identity, patient, study, hash."""
    study = StudySummary(
        study_instance_uid="2.25.1001",
        patient_id="PID123",
        issuer_of_patient_id="HOSP",
        patient_name="Doe^Jane",
        patient_birth_date="19700101",
        patient_sex="F",
        study_date="20240102",
        study_time="101500",
        accession_number="ACC123",
    )
    ds = build_manifest(
        study,
        [InstanceRef("1.2.840.10008.5.1.4.1.1.2", "2.25.1005", "2.25.1002")],
        retrieve_ae_title="IMAGESHARE",
        retrieve_location_uid=SERVER_OID,
        retrieve_url="http://127.0.0.1/wado",
        sop_instance_uid="2.25.1004",
        series_instance_uid="2.25.1003",
        now=datetime(2024, 1, 2, 10, 30),
    )
    path = part10_file(
        tmp_path / "kos.dcm",
        encode_manifest(ds),
        transfer_syntax=ExplicitVRLittleEndian,
        sop_class_uid=KOS_SOP_CLASS,
        sop_instance_uid="2.25.1004",
    )
    data = path.read_bytes()
    info = ManifestInfo.from_part10(data, modalities=["CT"], body_parts=["CHEST"], timezone=timezone.utc)
    assert info.sop_instance_uid == "2.25.1004"
    assert info.study_instance_uid == "2.25.1001"
    assert (info.patient_id, info.issuer_of_patient_id) == ("PID123", "HOSP")
    assert (info.patient_name, info.patient_birth_date, info.patient_sex) == ("Doe^Jane", "19700101", "F")
    assert (info.study_date, info.study_time, info.accession_number) == ("20240102", "101500", "ACC123")
    assert info.size == len(data) and info.sha1 == hashlib.sha1(data).hexdigest()
    assert info.creation_time == datetime(2024, 1, 2, 10, 30, tzinfo=timezone.utc)
    assert info.modalities == ("CT",) and info.body_parts == ("CHEST",)
    with pytest.raises(MetadataError):
        ManifestInfo.from_part10(encode_manifest(ds))  # no file meta: not what is archived


def test_bad_inputs_raise_metadata_errors() -> None:
    """Malformed UUIDs/UIDs/digests, equal entry and submission UUIDs and self-replacement are refused."""
    with pytest.raises(MetadataError):
        build(entry_uuid="not-a-uuid")
    with pytest.raises(MetadataError):
        build(entry_uuid=ENTRY, submission_uuid=ENTRY)
    with pytest.raises(MetadataError):
        build(replaces=ENTRY)
    with pytest.raises(MetadataError):
        build(submission_uid="not.an.oid")
    with pytest.raises(MetadataError):
        make_manifest(sha1="XYZ")
    with pytest.raises(MetadataError):
        make_manifest(sop_instance_uid="1.2.03")
    with pytest.raises(PatientIdError):
        build(make_manifest(patient_id=" "))


# ------------------------------------------------------------------------------ Affinity Domain


def test_standalone_domain_oids() -> None:
    """The standalone domain derives distinct patient authority and source ID from the server OID."""
    domain = AffinityDomain.standalone(SERVER_OID)
    assert domain.repository_unique_id == SERVER_OID
    assert domain.patient_authority == f"{SERVER_OID}.1"
    assert domain.source_id == f"{SERVER_OID}.2"
    assert domain.format_code == Code("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1",
                                      "Key Object Selection Document")
    assert domain.mime_type == "application/dicom"
    with pytest.raises(AffinityDomainError):
        AffinityDomain.standalone("2." + "1" * 61)


@pytest.mark.parametrize(
    "changes",
    [
        {"patient_authority": "1.2.03"},
        {"source_id": "abc"},
        {"repository_unique_id": "1." + "2" * 70},
        {"source_authority": "x"},
        {"issuer_authorities": {"HOSP": "not-an-oid"}},
        {"unmapped_issuers": "maybe"},
        {"language_code": "en_US!"},
        {"mime_type": "dicom"},
    ],
)
def test_domain_validation(changes: dict[str, object]) -> None:
    """Invalid OIDs, mappings, policies, language tags and media types are refused."""
    values: dict[str, object] = {"patient_authority": "1.2.3", "source_id": "1.2.4", "repository_unique_id": "1.2.5"}
    values.update(changes)
    with pytest.raises(AffinityDomainError):
        AffinityDomain(**values)  # type: ignore[arg-type]


def test_codes_and_authors_are_validated() -> None:
    """An empty code part and an author with neither person, institution nor telecom are refused."""
    with pytest.raises(AffinityDomainError):
        Code("", "1.2", "x")
    with pytest.raises(AffinityDomainError):
        Author(role="Radiologist")


def test_patient_id_mapping_and_escaping() -> None:
    """patient_id/source_patient_id: CX forms for OID, namespace and missing issuers; HL7 delimiters escaped."""
    domain = AffinityDomain("1.2.3", "1.2.4", "1.2.5", source_authority="1.2.6")
    assert domain.patient_id("A^B", "") == "A\\S\\B^^^&1.2.3&ISO"
    assert domain.source_patient_id("P1", "1.9.8") == "P1^^^&1.9.8&ISO"
    assert domain.source_patient_id("P1", "HOSP") == "P1^^^HOSP&1.2.6&ISO"
    assert domain.source_patient_id("P1", "") == "P1^^^&1.2.6&ISO"
    assert hl7_escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
