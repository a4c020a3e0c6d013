"""The embedded repository and registry, pure half (imageshare.xds.registry) and its store."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from lxml import etree

from imageshare.xds import metadata as md
from imageshare.xds import registry, soap
from imageshare.xds.affinity import AffinityDomain, Author
from imageshare.xds.metadata import ManifestInfo, provide_and_register
from imageshare.xds.store import XdsStore
from tests.xds.validator import validate_message

SERVER_OID = "2.25.31337000111222333444"
NOW = datetime(2024, 1, 2, 10, 31, 5, tzinfo=timezone.utc)
RIM = md.RIM
DOMAIN = AffinityDomain.standalone(SERVER_OID, author=Author(institution=f"ImageShare^^^^^&{SERVER_OID}&ISO^^^^{SERVER_OID}"))
PATIENT = f"PID123^^^&{SERVER_OID}.1&ISO"


def kos_bytes(tag: str = "a") -> bytes:
    return b"DICM-not-really-" + tag.encode() * 50


def manifest(data: bytes, uid: str = "2.25.1004", **changes: object) -> ManifestInfo:
    values: dict[str, object] = dict(
        sop_instance_uid=uid, study_instance_uid="2.25.1001", patient_id="PID123", accession_number="ACC1",
        study_date="20240102", study_time="101500", modalities=("CT",), body_parts=("CHEST",),
        size=len(data), sha1=hashlib.sha1(data).hexdigest(), creation_time=NOW,
    )
    values.update(changes)
    return ManifestInfo(**values)  # type: ignore[arg-type]


def pnr(data: bytes, uid: str = "2.25.1004", *, entry: str | None = None, submission: str | None = None,
        replaces: str | None = None, **changes: object) -> tuple[etree._Element, dict[str, tuple[str, bytes]]]:
    request = provide_and_register(
        manifest(data, uid, **changes), DOMAIN, entry_uuid=entry or uuid.uuid4(),
        submission_uuid=submission or uuid.uuid4(), now=NOW, document_id="kos@test", replaces=replaces,
    )
    return request, {"kos@test": ("application/dicom", data)}


def submit_of(request: etree._Element, data: bytes) -> registry.Submission:
    submit, _docs = registry.provide(request, {"kos@test": ("application/dicom", data)}, SERVER_OID)
    return registry.parse_submission(submit, patient_authorities=frozenset({f"{SERVER_OID}.1"}))


def codes(exc: registry.SubmissionRejected) -> set[str]:
    return {e.code for e in exc.errors}


def test_provide_completes_metadata_and_parses() -> None:
    """provide() pairs the document, sets repositoryUniqueId/hash/size; parse_submission yields the records."""
    data = kos_bytes()
    request, parts = pnr(data)
    submit, docs = registry.provide(request, parts, SERVER_OID)
    assert [d.unique_id for d in docs] == ["2.25.1004"] and docs[0].data == data
    submission = registry.parse_submission(submit, patient_authorities=frozenset({f"{SERVER_OID}.1"}))
    entry = submission.entries[0]
    assert entry.repository_unique_id == SERVER_OID and entry.hash == hashlib.sha1(data).hexdigest()
    assert entry.size == len(data) and entry.patient_id == PATIENT
    assert entry.codes[md.DE_FORMAT_CODE] == ("1.2.840.10008.5.1.4.1.1.88.59^^1.2.840.10008.2.6.1",)
    assert submission.submission_set.patient_id == PATIENT
    assert [a.type for a in submission.associations] == [md.HAS_MEMBER]
    leaf = registry.leaf_class(entry.xml, registry.APPROVED)
    assert leaf.get("lid") == leaf.get("id") and leaf.find(f"{{{RIM}}}VersionInfo") is not None


def test_registry_submission_is_schema_valid_as_iti42() -> None:
    """The SubmitObjectsRequest a repository forwards (completed metadata) is a schema-valid ITI-42 message."""
    request, parts = pnr(kos_bytes())
    submit, _ = registry.provide(request, parts, SERVER_OID)
    envelope = soap.build_request(soap.ITI42, "http://127.0.0.1/xds/registry", submit)
    assert validate_message(soap.SOAP12_CONTENT_TYPE, envelope) == []


def test_hash_and_size_mismatch_are_repository_metadata_errors() -> None:
    """A document whose bytes do not match the hash/size the source sent is refused (XDSRepositoryMetadataError)."""
    request, _ = pnr(kos_bytes("a"))
    with pytest.raises(registry.SubmissionRejected) as caught:
        registry.provide(request, {"kos@test": ("application/dicom", kos_bytes("b"))}, SERVER_OID)
    assert codes(caught.value) == {"XDSRepositoryMetadataError"}


def test_missing_document_and_missing_metadata() -> None:
    """An entry without xds:Document is XDSMissingDocument; a Document without entry is XDSMissingDocumentMetadata."""
    request, parts = pnr(kos_bytes())
    document = request.find(f"{{{md.XDS}}}Document")
    document.set("id", "urn:uuid:" + str(uuid.uuid4()))
    with pytest.raises(registry.SubmissionRejected) as caught:
        registry.provide(request, parts, SERVER_OID)
    assert codes(caught.value) == {"XDSMissingDocument", "XDSMissingDocumentMetadata"}


def _entry_element(request: etree._Element) -> etree._Element:
    return request.find(f".//{{{RIM}}}ExtrinsicObject")


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda r: _entry_element(r).remove(registry._classifications(_entry_element(r), md.DE_CLASS_CODE)[0]),
         "XDSRegistryMetadataError"),
        (lambda r: [s.set("name", "notALegalSlot") for s in _entry_element(r).iterchildren(f"{{{RIM}}}Slot")
                    if s.get("name") == "languageCode"], "XDSRegistryMetadataError"),
        (lambda r: [a.set("associationType", "HasMember") for a in r.iter(f"{{{RIM}}}Association")],
         "XDSRegistryMetadataError"),
        (lambda r: [e.set("value", "OTHER^^^&2.25.9&ISO") for e in _entry_element(r).iter(f"{{{RIM}}}ExternalIdentifier")
                    if e.get("identificationScheme") == md.DE_PATIENT_ID], "XDSPatientIdDoesNotMatch"),
        (lambda r: [v.__setattr__("text", "2024-01-02") for s in _entry_element(r).iterchildren(f"{{{RIM}}}Slot")
                    if s.get("name") == "creationTime" for v in s.iter(f"{{{RIM}}}Value")], "XDSRegistryMetadataError"),
        (lambda r: _entry_element(r).set("mimeType", "text/plain"), "XDSRegistryMetadataError"),
        (lambda r: [c.getparent().remove(c) for c in r.iter(f"{{{RIM}}}Classification")
                    if c.get("classificationNode") == md.SUBMISSION_SET], "XDSRegistryMetadataError"),
    ],
    ids=["no-classCode", "illegal-slot", "short-association-type", "two-patients", "bad-dtm", "kos-mime", "no-ss-mark"],
)
def test_metadata_errors(mutate, code) -> None:  # type: ignore[no-untyped-def]
    """Section 9 C/D/E/G/H violations are refused with the registry's error code."""
    data = kos_bytes()
    request, _ = pnr(data)
    mutate(request)
    with pytest.raises(registry.SubmissionRejected) as caught:
        submit_of(request, data)
    assert code in codes(caught.value)


def test_unknown_patient_authority() -> None:
    """A patient ID of another assigning authority than the domain's is XDSUnknownPatientId."""
    data = kos_bytes()
    request, parts = pnr(data)
    submit, _ = registry.provide(request, parts, SERVER_OID)
    with pytest.raises(registry.SubmissionRejected) as caught:
        registry.parse_submission(submit, patient_authorities=frozenset({"2.25.999"}))
    assert codes(caught.value) == {"XDSUnknownPatientId"}


def test_symbolic_ids_get_uuids() -> None:
    """Symbolic ids (Document01, SubmissionSet01) are replaced by UUIDs and references follow them."""
    data = kos_bytes()
    request, parts = pnr(data)
    text = etree.tostring(request).decode()
    entry_id = _entry_element(request).get("id")
    request = etree.fromstring(text.replace(entry_id, "Document01"))
    submit, docs = registry.provide(request, parts, SERVER_OID)
    submission = registry.parse_submission(submit)
    entry = submission.entries[0]
    assert entry.entry_uuid.startswith("urn:uuid:") and entry.original_id == "Document01"
    assert submission.associations[0].target == entry.entry_uuid


def query(query_id: str, return_type: str = "LeafClass", **params: str) -> etree._Element:
    request = etree.Element(f"{{{registry.QUERY}}}AdhocQueryRequest", nsmap={"query": registry.QUERY, "rim": RIM})
    etree.SubElement(request, f"{{{registry.QUERY}}}ResponseOption", returnType=return_type, returnComposedObjects="true")
    adhoc = etree.SubElement(request, f"{{{RIM}}}AdhocQuery", id=query_id)
    for name, value in params.items():
        slot = etree.SubElement(adhoc, f"{{{RIM}}}Slot", name=name)
        etree.SubElement(etree.SubElement(slot, f"{{{RIM}}}ValueList"), f"{{{RIM}}}Value").text = value
    return request


def find(store: XdsStore, **params: str) -> list[str]:
    q = registry.parse_query(query(registry.FIND_DOCUMENTS, **params))
    patient, statuses = registry.find_documents_filters(q)
    return [e.unique_id for e, _s in store.find_entries(patient, statuses) if registry.entry_matches(e, q)]


def test_store_register_query_replace_and_duplicates(tmp_path: Path) -> None:
    """Registering, FindDocuments filters, idempotent re-send, non-identical hash and RPLC deprecation."""
    store = XdsStore(tmp_path / "xds.sqlite3")
    try:
        data = kos_bytes("a")
        entry, submission_uuid = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
        request, parts = pnr(data, entry=entry, submission=submission_uuid)
        submit, docs = registry.provide(request, parts, SERVER_OID)
        sub = registry.parse_submission(submit)
        assert store.provide_and_register(docs, SERVER_OID, sub) == []
        assert store.document("2.25.1004") == (SERVER_OID, "application/dicom", data)
        approved = "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"
        base = {"$XDSDocumentEntryPatientId": f"'{PATIENT}'", "$XDSDocumentEntryStatus": approved}
        assert find(store, **base) == ["2.25.1004"]
        assert find(store, **base, **{"$XDSDocumentEntryClassCode": "('18726-0^^2.16.840.1.113883.6.1')"}) == ["2.25.1004"]
        assert find(store, **base, **{"$XDSDocumentEntryClassCode": "('11488-4^^2.16.840.1.113883.6.1')"}) == []
        assert find(store, **base, **{"$XDSDocumentEntryFormatCode": "('1.2.840.10008.5.1.4.1.1.88.59^^1.2.840.10008.2.6.1')"}) == ["2.25.1004"]
        assert find(store, **base, **{"$XDSDocumentEntryCreationTimeFrom": "20240102", "$XDSDocumentEntryCreationTimeTo": "20240103"}) == ["2.25.1004"]
        assert find(store, **base, **{"$XDSDocumentEntryCreationTimeFrom": "20240103"}) == []
        assert find(store, **{**base, "$XDSDocumentEntryPatientId": "'OTHER^^^&2.25.9&ISO'"}) == []

        # The same submission again: only the duplicate error, nothing registered twice.
        again = submit_of(pnr(data, entry=entry, submission=submission_uuid)[0], data)
        errors = store.provide_and_register(docs, SERVER_OID, again)
        assert {e.code for e in errors} == {"XDSDuplicateUniqueIdInRegistry"}
        assert store.counts()["entries"] == 1

        # Same uniqueId, other content.
        other = kos_bytes("b")
        request, parts = pnr(other)
        submit, docs2 = registry.provide(request, {"kos@test": ("application/dicom", other)}, SERVER_OID)
        assert {e.code for e in store.provide_and_register(docs2, SERVER_OID, registry.parse_submission(submit))} \
            == {"XDSNonIdenticalHash"}

        # Replacement deprecates the old entry.
        new_data = kos_bytes("c")
        request, parts = pnr(new_data, "2.25.2004", replaces=entry)
        submit, docs3 = registry.provide(request, {"kos@test": ("application/dicom", new_data)}, SERVER_OID)
        assert store.provide_and_register(docs3, SERVER_OID, registry.parse_submission(submit)) == []
        assert find(store, **base) == ["2.25.2004"]
        deprecated = "('urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated')"
        assert find(store, **{**base, "$XDSDocumentEntryStatus": deprecated}) == ["2.25.1004"]
        # Replacing a deprecated entry is refused.
        request, parts = pnr(kos_bytes("d"), "2.25.3004", replaces=entry)
        submit, docs4 = registry.provide(request, {"kos@test": ("application/dicom", kos_bytes("d"))}, SERVER_OID)
        errors = store.provide_and_register(docs4, SERVER_OID, registry.parse_submission(submit))
        assert {e.code for e in errors} == {"XDSRegistryDeprecatedDocumentError"}
        assert store.document("2.25.3004") is None  # rolled back with the registration

        sets, associations = store.submission_sets_of([entry])
        assert len(sets) == 1 and len(associations) == 1
        entries = store.entries(unique_ids=["2.25.1004"])
        assert entries[0][1] == registry.DEPRECATED
    finally:
        store.close()


def test_query_parsing_errors() -> None:
    """Unknown stored query, missing required parameters and bad returnType give the ITI-18 error codes."""
    with pytest.raises(registry.QueryError) as caught:
        registry.parse_query(query("urn:uuid:00000000-0000-0000-0000-000000000000"))
    assert caught.value.code == "XDSUnknownStoredQuery"
    q = registry.parse_query(query(registry.FIND_DOCUMENTS, **{"$XDSDocumentEntryPatientId": "'X^^^&1.2&ISO'"}))
    with pytest.raises(registry.QueryError) as caught:
        registry.find_documents_filters(q)
    assert caught.value.code == "XDSStoredQueryMissingParam"
    with pytest.raises(registry.QueryError):
        registry.parse_query(query(registry.FIND_DOCUMENTS, return_type="Everything"))
    assert registry._parse_values("('a','b''c', 'd')") == ("a", "b'c", "d")


def test_query_responses_are_schema_valid() -> None:
    """LeafClass, ObjectRef and failure AdhocQueryResponses validate against the ebRS schema."""
    data = kos_bytes()
    request, parts = pnr(data)
    sub = submit_of(request, data)
    elements = [registry.leaf_class(sub.entries[0].xml, registry.APPROVED), registry.leaf_class(sub.submission_set.xml, registry.APPROVED),
                registry.leaf_class(sub.associations[0].xml, registry.APPROVED)]
    from imageshare.xds.responses import RegistryError

    for response in (
        registry.query_response(elements, "LeafClass"),
        registry.query_response(elements, "ObjectRef"),
        registry.query_failure([RegistryError("XDSUnknownStoredQuery", "no")]),
    ):
        envelope = soap.build_response(soap.ITI18_RESPONSE, "urn:uuid:1", response)
        assert validate_message(soap.SOAP12_CONTENT_TYPE, envelope) == []
