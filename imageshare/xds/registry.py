"""
The embedded XDS.b Document Repository and Document Registry: the pure half.

Repository side (ITI-41, ITI TF-2 3.41.4.1.3): :func:`provide` pairs each ``xds:Document``
with its DocumentEntry, checks the ``hash``/``size`` a source sent against the bytes, and
adds ``repositoryUniqueId``, ``hash`` and ``size`` the way a repository does before it
sends ITI-42 to its registry.

Registry side (ITI-42, ITI TF-3 4.1-4.3; ``../shared/docs/xds-i.md`` section 9 C, D, E, G
and H): :func:`parse_submission` checks a ``lcm:SubmitObjectsRequest`` and turns it into
records (:class:`Submission`); every problem found is reported, not only the first. What
needs the registry's state (duplicate uniqueIds, the RPLC target) is checked by the store
in the transaction that registers.

Stored queries (ITI-18, ITI TF-2 3.18.4.1.2): :func:`parse_query` reads an
``query:AdhocQueryRequest``; :func:`entry_matches` applies the FindDocuments filters; the
``*_response`` functions build the ``query:AdhocQueryResponse`` for LeafClass or ObjectRef.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from copy import deepcopy
from typing import Callable, Iterable, Mapping, Sequence

import attrs
from lxml import etree

from imageshare.xds import metadata as md
from imageshare.xds import mtom
from imageshare.xds.affinity import KOS_FORMAT_CODE, is_oid
from imageshare.xds.responses import RegistryError, Severity, Status

__all__ = [
    "APPROVED",
    "DEPRECATED",
    "FIND_DOCUMENTS",
    "FIND_DOCUMENTS_BY_REFERENCE_ID",
    "GET_DOCUMENTS",
    "GET_SUBMISSION_SETS",
    "AssociationRecord",
    "EntryRecord",
    "Provided",
    "QueryError",
    "StoredQuery",
    "Submission",
    "SubmissionRejected",
    "SubmissionSetRecord",
    "entry_matches",
    "leaf_class",
    "parse_query",
    "parse_submission",
    "provide",
    "query_failure",
    "query_response",
]

QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
RIM = md.RIM
LCM = md.LCM
XDS = md.XDS
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
FIND_DOCUMENTS_BY_REFERENCE_ID = "urn:uuid:12941a89-e02e-4be5-967c-ce4bfc8fe492"
GET_DOCUMENTS = "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4"
GET_SUBMISSION_SETS = "urn:uuid:51224314-5390-4169-9b91-b1980040715a"

# Error codes used here (ITI TF-3 4.2.4).
METADATA_ERROR = "XDSRegistryMetadataError"
REPOSITORY_METADATA_ERROR = "XDSRepositoryMetadataError"

_SUPPORTED_ASSOCIATIONS = frozenset({md.HAS_MEMBER, md.RPLC})
_UUID = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_DTM = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2})?)?)?)?)?\Z")
_SHA1 = re.compile(r"[0-9a-fA-F]{40}\Z")
_CX = re.compile(r"[^^&]+\^\^\^&([0-2](?:\.(?:0|[1-9][0-9]*))+)&ISO\Z")
_EXTENSION = re.compile(r"[\x21-\x7e]{1,16}\Z")

# Legal DocumentEntry and SubmissionSet slots (xds-i.md 2.2); others must be extra metadata.
_DE_SLOTS = frozenset({
    "creationTime", "languageCode", "serviceStartTime", "serviceStopTime", "sourcePatientId",
    "sourcePatientInfo", "legalAuthenticator", "hash", "size", "repositoryUniqueId", "URI",
    "documentAvailability", md.REFERENCE_ID_LIST,
})
_DE_SINGLE = frozenset({
    "creationTime", "languageCode", "serviceStartTime", "serviceStopTime", "sourcePatientId",
    "legalAuthenticator", "hash", "size", "repositoryUniqueId", "documentAvailability",
})
_SS_SLOTS = frozenset({"submissionTime", "intendedRecipient"})
_TIME_SLOTS = ("creationTime", "serviceStartTime", "serviceStopTime", "submissionTime")
# Coded DocumentEntry attributes: scheme -> (name, required, single)
_DE_CODES = {
    md.DE_CLASS_CODE: ("classCode", True, True),
    md.DE_CONFIDENTIALITY_CODE: ("confidentialityCode", True, False),
    md.DE_EVENT_CODE_LIST: ("eventCodeList", False, False),
    md.DE_FORMAT_CODE: ("formatCode", True, True),
    md.DE_HEALTHCARE_FACILITY_TYPE_CODE: ("healthcareFacilityTypeCode", True, True),
    md.DE_PRACTICE_SETTING_CODE: ("practiceSettingCode", True, True),
    md.DE_TYPE_CODE: ("typeCode", True, True),
}
_AUTHOR_SLOTS = frozenset({"authorPerson", "authorInstitution", "authorRole", "authorSpecialty", "authorTelecommunication"})

# FindDocuments parameters holding coded values -> the classification scheme they filter.
_CODE_PARAMETERS = {
    "$XDSDocumentEntryClassCode": md.DE_CLASS_CODE,
    "$XDSDocumentEntryTypeCode": md.DE_TYPE_CODE,
    "$XDSDocumentEntryPracticeSettingCode": md.DE_PRACTICE_SETTING_CODE,
    "$XDSDocumentEntryHealthcareFacilityTypeCode": md.DE_HEALTHCARE_FACILITY_TYPE_CODE,
    "$XDSDocumentEntryFormatCode": md.DE_FORMAT_CODE,
    "$XDSDocumentEntryEventCodeList": md.DE_EVENT_CODE_LIST,
    "$XDSDocumentEntryConfidentialityCode": md.DE_CONFIDENTIALITY_CODE,
}
_TIME_PARAMETERS = {
    "$XDSDocumentEntryCreationTimeFrom": ("creation_time", False),
    "$XDSDocumentEntryCreationTimeTo": ("creation_time", True),
    "$XDSDocumentEntryServiceStartTimeFrom": ("service_start", False),
    "$XDSDocumentEntryServiceStartTimeTo": ("service_start", True),
    "$XDSDocumentEntryServiceStopTimeFrom": ("service_stop", False),
    "$XDSDocumentEntryServiceStopTimeTo": ("service_stop", True),
}


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _error(code: str, context: str, location: str = "") -> RegistryError:
    return RegistryError(code, context, location, Severity.ERROR)


class SubmissionRejected(ValueError):
    """The submission is refused; ``errors`` are the RegistryErrors to answer with."""

    def __init__(self, errors: Sequence[RegistryError]) -> None:
        super().__init__("; ".join(f"{e.code}: {e.context}" for e in errors))
        self.errors = tuple(errors)


# ------------------------------------------------------------------------- records


@attrs.frozen
class EntryRecord:
    """A DocumentEntry as registered: the values queries filter on, and its ebRIM XML."""

    entry_uuid: str
    unique_id: str
    patient_id: str
    mime_type: str
    hash: str
    size: int
    repository_unique_id: str
    creation_time: str
    service_start: str
    service_stop: str
    codes: Mapping[str, tuple[str, ...]]  # classification scheme -> ("code^^scheme", ...)
    reference_ids: tuple[str, ...]
    xml: bytes
    original_id: str = ""  # the id the submitter used (symbolic ids are replaced by UUIDs)


@attrs.frozen
class SubmissionSetRecord:
    """The SubmissionSet of a submission."""

    entry_uuid: str
    unique_id: str
    patient_id: str
    source_id: str
    submission_time: str
    xml: bytes


@attrs.frozen
class AssociationRecord:
    """An association of the submission (HasMember or RPLC)."""

    id: str
    type: str
    source: str
    target: str
    xml: bytes


@attrs.frozen
class Submission:
    """A checked SubmitObjectsRequest, with every id a ``urn:uuid:``."""

    submission_set: SubmissionSetRecord
    entries: tuple[EntryRecord, ...]
    associations: tuple[AssociationRecord, ...]

    @property
    def replaced(self) -> tuple[AssociationRecord, ...]:
        """The RPLC associations (new entry -> the entry it deprecates)."""
        return tuple(a for a in self.associations if a.type == md.RPLC)


@attrs.frozen
class Provided:
    """One document of an ITI-41 request, paired with its entry's uniqueId."""

    entry_id: str
    unique_id: str
    mime_type: str
    data: bytes
    sha1: str


# ------------------------------------------------------------------------- helpers


def _slots(element: etree._Element) -> dict[str, list[list[str]]]:
    """Slot name -> the value lists of each Slot of that name (direct children only)."""
    found: dict[str, list[list[str]]] = {}
    for slot in element.iterchildren(_q(RIM, "Slot")):
        values = [(v.text or "").strip() for v in slot.iter(_q(RIM, "Value"))]
        found.setdefault(slot.get("name", ""), []).append(values)
    return found


def _slot_values(element: etree._Element, name: str) -> list[str]:
    return [v for values in _slots(element).get(name, []) for v in values]


def _set_slot(element: etree._Element, name: str, value: str) -> None:
    """Replace or add a single-valued slot, keeping the schema's element order (slots first)."""
    for slot in list(element.iterchildren(_q(RIM, "Slot"))):
        if slot.get("name") == name:
            element.remove(slot)
    slot = etree.Element(_q(RIM, "Slot"), name=name)
    etree.SubElement(etree.SubElement(slot, _q(RIM, "ValueList")), _q(RIM, "Value")).text = value
    element.insert(0, slot)


def _identifiers(element: etree._Element, scheme: str) -> list[str]:
    return [
        (e.get("value") or "").strip()
        for e in element.iterchildren(_q(RIM, "ExternalIdentifier"))
        if e.get("identificationScheme") == scheme
    ]


def _classifications(element: etree._Element, scheme: str) -> list[etree._Element]:
    return [c for c in element.iterchildren(_q(RIM, "Classification")) if c.get("classificationScheme") == scheme]


def _code_key(classification: etree._Element) -> str:
    schemes = _slot_values(classification, "codingScheme")
    return f"{classification.get('nodeRepresentation', '')}^^{schemes[0] if schemes else ''}"


def _unique_id_ok(value: str) -> bool:
    root, sep, extension = value.partition("^")
    if not is_oid(root) or len(root) > 64:
        return False
    return not sep or bool(_EXTENSION.match(extension))


# ------------------------------------------------------------------------- repository side


def provide(
    request: etree._Element, attachments: Mapping[str, tuple[str, bytes]], repository_unique_id: str
) -> tuple[etree._Element, list[Provided]]:
    """
    The repository's part of ITI-41: pair documents with entries and complete the metadata.

    Parameters
    ----------
    request
        The ``xds:ProvideAndRegisterDocumentSetRequest`` (modified in place: each
        DocumentEntry gets ``repositoryUniqueId``, ``hash`` and ``size``).
    attachments
        The MTOM parts by Content-ID.
    repository_unique_id
        This repository's OID.

    Returns
    -------
    tuple
        The ``lcm:SubmitObjectsRequest`` to register (ITI-42), and the documents.

    Raises
    ------
    SubmissionRejected
        XDSMissingDocument, XDSMissingDocumentMetadata, XDSRepositoryMetadataError (hash or
        size mismatch, foreign repositoryUniqueId, unreadable document content).
    """
    submit = request.find(_q(LCM, "SubmitObjectsRequest"))
    if submit is None:
        raise SubmissionRejected([_error(REPOSITORY_METADATA_ERROR, "no lcm:SubmitObjectsRequest in the request")])
    entries = {e.get("id", ""): e for e in submit.iter(_q(RIM, "ExtrinsicObject"))}
    documents: dict[str, etree._Element] = {}
    errors: list[RegistryError] = []
    for document in request.iterchildren(_q(XDS, "Document")):
        doc_id = document.get("id", "")
        if doc_id in documents:
            errors.append(_error(REPOSITORY_METADATA_ERROR, f"document {doc_id} occurs more than once", doc_id))
        documents[doc_id] = document
    for doc_id in documents.keys() - entries.keys():
        errors.append(_error("XDSMissingDocumentMetadata", f"document {doc_id} has no DocumentEntry", doc_id))
    for entry_id in entries.keys() - documents.keys():
        errors.append(_error("XDSMissingDocument", f"DocumentEntry {entry_id} has no document", entry_id))
    provided: list[Provided] = []
    for entry_id, entry in entries.items():
        document = documents.get(entry_id)
        if document is None:
            continue
        unique_ids = _identifiers(entry, md.DE_UNIQUE_ID)
        unique_id = unique_ids[0] if len(unique_ids) == 1 else ""
        try:
            data = mtom.element_bytes(document, attachments)
        except (mtom.MtomError, KeyError) as e:
            errors.append(_error(REPOSITORY_METADATA_ERROR, f"document {entry_id}: {e}", unique_id or entry_id))
            continue
        sha1 = hashlib.sha1(data).hexdigest()
        sent_hash = _slot_values(entry, "hash")
        sent_size = _slot_values(entry, "size")
        sent_repository = _slot_values(entry, "repositoryUniqueId")
        if sent_hash and [h.lower() for h in sent_hash] != [sha1]:
            errors.append(_error(REPOSITORY_METADATA_ERROR, "hash does not match the document", unique_id or entry_id))
        if sent_size and sent_size != [str(len(data))]:
            errors.append(_error(REPOSITORY_METADATA_ERROR, "size does not match the document", unique_id or entry_id))
        if sent_repository and sent_repository != [repository_unique_id]:
            errors.append(
                _error(REPOSITORY_METADATA_ERROR, "repositoryUniqueId names another repository", unique_id or entry_id)
            )
        _set_slot(entry, "repositoryUniqueId", repository_unique_id)
        _set_slot(entry, "size", str(len(data)))
        _set_slot(entry, "hash", sha1)
        provided.append(Provided(entry_id, unique_id, entry.get("mimeType", ""), data, sha1))
    if errors:
        raise SubmissionRejected(errors)
    return submit, provided


# ------------------------------------------------------------------------- registry side


class _Checker:
    def __init__(self) -> None:
        self.errors: list[RegistryError] = []

    def __call__(self, code: str, context: str, location: str = "") -> None:
        self.errors.append(_error(code, context, location))


def parse_submission(
    submit: etree._Element,
    *,
    patient_authorities: frozenset[str] | None = None,
    new_uuid: Callable[[], uuid.UUID] = uuid.uuid4,
) -> Submission:
    """
    Check a ``lcm:SubmitObjectsRequest`` as the registry does and turn it into records.

    Parameters
    ----------
    submit
        The request (not modified: a copy is worked on).
    patient_authorities
        Assigning authority OIDs of the patient IDs this registry knows; ``None`` accepts
        any ``ID^^^&OID&ISO``.
    new_uuid
        Source of UUIDs for symbolic ids (tests pass a deterministic one).

    Raises
    ------
    SubmissionRejected
        With every error found (XDSRegistryMetadataError, XDSPatientIdDoesNotMatch,
        XDSUnknownPatientId, XDSRegistryDuplicateUniqueIdInMessage).
    """
    submit = deepcopy(submit)
    check = _Checker()
    if submit.tag != _q(LCM, "SubmitObjectsRequest"):
        raise SubmissionRejected([_error(METADATA_ERROR, "the payload is not a SubmitObjectsRequest")])
    objects = submit.find(_q(RIM, "RegistryObjectList"))
    if objects is None:
        raise SubmissionRejected([_error(METADATA_ERROR, "no rim:RegistryObjectList")])
    originals = _assign_uuids(objects, check, new_uuid)

    packages = list(objects.iterchildren(_q(RIM, "RegistryPackage")))
    marks = [c for c in objects.iter(_q(RIM, "Classification")) if c.get("classificationNode") == md.SUBMISSION_SET]
    marked = [c.get("classifiedObject") for c in marks]
    submission_sets = [p for p in packages if p.get("id") in marked]
    if len(submission_sets) != 1:
        raise SubmissionRejected(
            [*check.errors, _error(METADATA_ERROR, f"expected exactly one SubmissionSet, found {len(submission_sets)}")]
        )
    ss = submission_sets[0]
    ss_id = ss.get("id", "")
    if marked.count(ss_id) != 1:
        check(METADATA_ERROR, "the SubmissionSet is classified as such more than once", ss_id)
    for other in packages:
        if other is not ss:
            check(METADATA_ERROR, "Folders are not supported by this registry", other.get("id", ""))
    entries = list(objects.iterchildren(_q(RIM, "ExtrinsicObject")))
    associations = list(objects.iterchildren(_q(RIM, "Association")))

    ss_record = _submission_set(ss, check)
    entry_records = [_entry(e, check) for e in entries]
    association_records = _associations(associations, ss_id, {e.get("id", "") for e in entries}, check)

    # Patient (G): one patient per submission, known to this registry.
    patient = ss_record.patient_id
    for record in entry_records:
        if record.patient_id and patient and record.patient_id != patient:
            check("XDSPatientIdDoesNotMatch", "DocumentEntry and SubmissionSet patientId differ", record.unique_id)
    for pid in {patient, *(r.patient_id for r in entry_records)} - {""}:
        match = _CX.match(pid)
        if match is None:
            check(METADATA_ERROR, "patientId is not a CX value ID^^^&OID&ISO")
        elif patient_authorities is not None and match.group(1) not in patient_authorities:
            check("XDSUnknownPatientId", "the patient ID's assigning authority is not of this affinity domain")

    # Unique ids unique in the submission (E).
    seen: set[str] = set()
    for unique_id in [ss_record.unique_id, *(r.unique_id for r in entry_records)]:
        if unique_id and unique_id in seen:
            check("XDSRegistryDuplicateUniqueIdInMessage", "uniqueId used twice in the submission", unique_id)
        seen.add(unique_id)

    if check.errors:
        raise SubmissionRejected(check.errors)
    ss_xml = _leaf_xml(ss, marks=[m for m in marks if m.get("classifiedObject") == ss_id])
    return Submission(
        attrs.evolve(ss_record, xml=ss_xml),
        tuple(
            attrs.evolve(r, xml=_leaf_xml(e), original_id=originals.get(r.entry_uuid, r.entry_uuid))
            for r, e in zip(entry_records, entries)
        ),
        tuple(association_records),
    )


_IDENTIFIABLE = frozenset(
    _q(RIM, name) for name in ("ExtrinsicObject", "RegistryPackage", "Classification", "ExternalIdentifier", "Association")
)
_REFERENCE_ATTRIBUTES = ("classifiedObject", "registryObject", "sourceObject", "targetObject")


def _assign_uuids(objects: etree._Element, check: _Checker, new_uuid: Callable[[], uuid.UUID]) -> dict[str, str]:
    """Give symbolic ids a UUID and rewrite the references to them (ITI TF-3 4.2)."""
    renamed: dict[str, str] = {}
    for element in objects.iter():
        if element.tag not in _IDENTIFIABLE:
            continue
        ident = element.get("id")
        if ident is None or not ident.strip():
            check(METADATA_ERROR, f"rim:{etree.QName(element).localname} without an id")
            continue
        if ident.startswith("urn:uuid:"):
            if not _UUID.match(ident):
                check(METADATA_ERROR, f"malformed UUID id {ident!r}", ident)
            continue
        renamed.setdefault(ident, f"urn:uuid:{new_uuid()}")
    for element in objects.iter():
        if not isinstance(element.tag, str):
            continue
        for attribute in ("id", *_REFERENCE_ATTRIBUTES):
            value = element.get(attribute)
            if value in renamed:
                element.set(attribute, renamed[value])
    return {new: old for old, new in renamed.items()}


def _check_slots(element: etree._Element, legal: frozenset[str], single: frozenset[str], check: _Checker, where: str) -> None:
    for name, lists in _slots(element).items():
        if name not in legal and not (name.startswith("urn:") and not name.startswith("urn:ihe:")):
            check(METADATA_ERROR, f"{name!r} is not a legal slot name", where)
        if len(lists) > 1:
            check(METADATA_ERROR, f"slot {name} occurs more than once", where)
        if name in single and sum(len(v) for v in lists) != 1:
            check(METADATA_ERROR, f"slot {name} is required to have a single value", where)
        if name in _TIME_SLOTS and not all(_DTM.match(v) for values in lists for v in values):
            check(METADATA_ERROR, f"slot {name} is not a DTM time", where)


def _check_coded(element: etree._Element, check: _Checker, where: str) -> None:
    for classification in element.iterchildren(_q(RIM, "Classification")):
        scheme = classification.get("classificationScheme")
        if scheme in (md.DE_AUTHOR, md.SS_AUTHOR):
            slots = _slots(classification)
            if classification.get("nodeRepresentation") != "":
                check(METADATA_ERROR, "author classification needs nodeRepresentation=\"\"", where)
            if not {"authorPerson", "authorInstitution", "authorTelecommunication"} & slots.keys():
                check(METADATA_ERROR, "author needs a person, institution or telecommunication", where)
            for name in slots.keys() - _AUTHOR_SLOTS:
                check(METADATA_ERROR, f"{name!r} is not a legal author slot name", where)
            continue
        if scheme == md.DE_LIMITED_METADATA:
            check(METADATA_ERROR, "limitedMetadata is not allowed in XDS", where)
            continue
        if scheme is None:
            continue
        if not scheme.startswith("urn:uuid:") or not _UUID.match(scheme):
            check(METADATA_ERROR, f"classificationScheme {scheme!r} is not a UUID", where)
        if not classification.get("nodeRepresentation"):
            check(METADATA_ERROR, "coded classification without nodeRepresentation", where)
        if len(_slot_values(classification, "codingScheme")) != 1:
            check(METADATA_ERROR, "coded classification needs exactly one codingScheme value", where)
        if classification.find(f"{_q(RIM, 'Name')}/{_q(RIM, 'LocalizedString')}") is None:
            check(METADATA_ERROR, "coded classification without a Name", where)


def _one_identifier(element: etree._Element, scheme: str, name: str, check: _Checker, where: str) -> str:
    values = _identifiers(element, scheme)
    if len(values) != 1 or not values[0]:
        check(METADATA_ERROR, f"{name} is required exactly once", where)
        return values[0] if values else ""
    return values[0]


def _one_slot(element: etree._Element, name: str) -> str:
    values = _slot_values(element, name)
    return values[0] if len(values) == 1 else ""


def _submission_set(ss: etree._Element, check: _Checker) -> SubmissionSetRecord:
    where = ss.get("id", "")
    _check_slots(ss, _SS_SLOTS, frozenset({"submissionTime"}), check, where)
    _check_coded(ss, check, where)
    if not _slot_values(ss, "submissionTime"):
        check(METADATA_ERROR, "SubmissionSet submissionTime is missing", where)
    if len(_classifications(ss, md.SS_CONTENT_TYPE_CODE)) != 1:
        check(METADATA_ERROR, "SubmissionSet contentTypeCode is required exactly once", where)
    unique_id = _one_identifier(ss, md.SS_UNIQUE_ID, "SubmissionSet uniqueId", check, where)
    source_id = _one_identifier(ss, md.SS_SOURCE_ID, "SubmissionSet sourceId", check, where)
    patient_id = _one_identifier(ss, md.SS_PATIENT_ID, "SubmissionSet patientId", check, where)
    if unique_id and not is_oid(unique_id):
        check(METADATA_ERROR, "SubmissionSet uniqueId is not an OID", unique_id)
    if source_id and not is_oid(source_id):
        check(METADATA_ERROR, "SubmissionSet sourceId is not an OID", source_id)
    return SubmissionSetRecord(where, unique_id, patient_id, source_id, _one_slot(ss, "submissionTime"), b"")


def _entry(entry: etree._Element, check: _Checker) -> EntryRecord:
    where = entry.get("id", "")
    _check_slots(entry, _DE_SLOTS, _DE_SINGLE, check, where)
    _check_coded(entry, check, where)
    if entry.get("objectType") != md.DOCUMENT_ENTRY_STABLE:
        check(METADATA_ERROR, "DocumentEntry objectType must be the stable DocumentEntry UUID", where)
    mime_type = entry.get("mimeType", "")
    if "/" not in mime_type:
        check(METADATA_ERROR, "DocumentEntry mimeType is missing", where)
    for name in ("creationTime", "languageCode", "sourcePatientId", "hash", "size", "repositoryUniqueId"):
        if not _slot_values(entry, name):
            check(METADATA_ERROR, f"DocumentEntry {name} is missing", where)
    codes: dict[str, tuple[str, ...]] = {}
    for scheme, (name, required, single) in _DE_CODES.items():
        found = _classifications(entry, scheme)
        if required and not found:
            check(METADATA_ERROR, f"DocumentEntry {name} is missing", where)
        if single and len(found) > 1:
            check(METADATA_ERROR, f"DocumentEntry {name} is required to have a single value", where)
        codes[scheme] = tuple(_code_key(c) for c in found)
    unique_id = _one_identifier(entry, md.DE_UNIQUE_ID, "DocumentEntry uniqueId", check, where)
    patient_id = _one_identifier(entry, md.DE_PATIENT_ID, "DocumentEntry patientId", check, where)
    if unique_id and not _unique_id_ok(unique_id):
        check(METADATA_ERROR, "DocumentEntry uniqueId is not an OID of at most 64 characters", unique_id)
    source_patient = _one_slot(entry, "sourcePatientId")
    if source_patient and _CX.match(source_patient) is None and "^^^" not in source_patient:
        check(METADATA_ERROR, "sourcePatientId is not a CX value", where)
    hash_value, size_value = _one_slot(entry, "hash"), _one_slot(entry, "size")
    if hash_value and not _SHA1.match(hash_value):
        check(METADATA_ERROR, "hash is not a SHA-1 hex digest", unique_id or where)
    if size_value and not size_value.isdigit():
        check(METADATA_ERROR, "size is not an integer", unique_id or where)
    repository = _one_slot(entry, "repositoryUniqueId")
    if repository and not is_oid(repository):
        check(METADATA_ERROR, "repositoryUniqueId is not an OID", unique_id or where)
    # XDS-I.b (H): a KOS manifest is application/dicom with the DICOM UID registry scheme.
    if any(c.startswith(f"{KOS_FORMAT_CODE.code}^^") for c in codes[md.DE_FORMAT_CODE]):
        if mime_type != "application/dicom":
            check(METADATA_ERROR, "a KOS manifest must have mimeType application/dicom", unique_id or where)
        if codes[md.DE_FORMAT_CODE] != (f"{KOS_FORMAT_CODE.code}^^{KOS_FORMAT_CODE.scheme}",):
            check(METADATA_ERROR, "the KOS formatCode must use codingScheme 1.2.840.10008.2.6.1", unique_id or where)
    return EntryRecord(
        entry_uuid=where,
        unique_id=unique_id,
        patient_id=patient_id,
        mime_type=mime_type,
        hash=hash_value.lower(),
        size=int(size_value) if size_value.isdigit() else 0,
        repository_unique_id=repository,
        creation_time=_one_slot(entry, "creationTime"),
        service_start=_one_slot(entry, "serviceStartTime"),
        service_stop=_one_slot(entry, "serviceStopTime"),
        codes=codes,
        reference_ids=tuple(_slot_values(entry, md.REFERENCE_ID_LIST)),
        xml=b"",
    )


def _associations(
    associations: list[etree._Element], ss_id: str, entry_ids: set[str], check: _Checker
) -> list[AssociationRecord]:
    records = []
    members: dict[str, int] = {}
    for association in associations:
        where = association.get("id", "")
        kind = association.get("associationType", "")
        source, target = association.get("sourceObject", ""), association.get("targetObject", "")
        if not kind.startswith("urn:"):
            check(METADATA_ERROR, f"association type {kind!r} is not fully namespaced", where)
            continue
        if kind not in _SUPPORTED_ASSOCIATIONS:
            check(METADATA_ERROR, f"association type {kind} is not supported by this registry", where)
            continue
        if target == ss_id:
            check(METADATA_ERROR, "the SubmissionSet cannot be an association target", where)
            continue
        if kind == md.HAS_MEMBER:
            if source != ss_id or target not in entry_ids:
                check(METADATA_ERROR, "HasMember must link the SubmissionSet to a DocumentEntry of the submission", where)
                continue
            if _slot_values(association, "SubmissionSetStatus") != ["Original"]:
                check(METADATA_ERROR, "HasMember needs a single SubmissionSetStatus value Original", where)
            members[target] = members.get(target, 0) + 1
        else:  # RPLC: new entry of this submission -> an entry already registered
            if source not in entry_ids:
                check(METADATA_ERROR, "RPLC must start at a DocumentEntry of the submission", where)
                continue
            if target in entry_ids or not _UUID.match(target):
                check(METADATA_ERROR, "RPLC must point to a registered DocumentEntry by its UUID", where)
                continue
        records.append(AssociationRecord(where, kind, source, target, _leaf_xml(association)))
    for entry_id in entry_ids:
        if members.get(entry_id, 0) != 1:
            check(METADATA_ERROR, "every DocumentEntry needs exactly one HasMember association", entry_id)
    return records


def _leaf_xml(element: etree._Element, *, marks: Iterable[etree._Element] = ()) -> bytes:
    """The object as the registry keeps it: nested SubmissionSet mark, lid and VersionInfo."""
    copy = deepcopy(element)
    copy.attrib.pop("status", None)
    copy.set("lid", copy.get("id", ""))
    nested = [c.get("id") for c in copy.iterchildren(_q(RIM, "Classification"))]
    anchor = _version_position(copy)
    version = etree.Element(_q(RIM, "VersionInfo"), versionName="1")
    copy.insert(anchor, version)
    for mark in marks:
        if mark.get("id") not in nested:
            after = [c for c in copy.iterchildren(_q(RIM, "Classification"))]
            position = copy.index(after[-1]) + 1 if after else copy.index(version) + 1
            copy.insert(position, deepcopy(mark))
    return etree.tostring(copy, encoding="UTF-8")


def _version_position(element: etree._Element) -> int:
    """Where rim:VersionInfo goes: after Slot, Name and Description (ebRIM 3.0 order)."""
    position = 0
    for index, child in enumerate(element):
        if isinstance(child.tag, str) and child.tag in (
            _q(RIM, "Slot"), _q(RIM, "Name"), _q(RIM, "Description")
        ):
            position = index + 1
    return position


def leaf_class(xml: bytes, status: str) -> etree._Element:
    """A registered object's element for a LeafClass answer, with its current status."""
    element = etree.fromstring(xml)
    element.set("status", status)
    return element


# ------------------------------------------------------------------------- stored queries


class QueryError(ValueError):
    """A stored query cannot be run; ``code`` is the RegistryError code."""

    def __init__(self, code: str, context: str) -> None:
        super().__init__(f"{code}: {context}")
        self.code = code
        self.context = context


@attrs.frozen
class StoredQuery:
    """A parsed ITI-18 request."""

    query_id: str
    parameters: Mapping[str, tuple[tuple[str, ...], ...]]  # name -> the value list of each Slot
    return_type: str  # "LeafClass" or "ObjectRef"

    def single(self, name: str) -> str | None:
        """A single-valued parameter, or ``None``."""
        lists = self.parameters.get(name)
        if not lists:
            return None
        values = [v for values in lists for v in values]
        if len(values) != 1:
            raise QueryError("XDSStoredQueryParamNumber", f"{name} takes a single value")
        return values[0]

    def values(self, name: str) -> list[str]:
        """All values of a multi-valued parameter (OR within and across Slots)."""
        return [v for values in self.parameters.get(name, ()) for v in values]


def _parse_values(text: str) -> tuple[str, ...]:
    """``'a'``, ``('a','b')`` or a bare number into values (ITI TF-2 3.18.4.1.2.3.5)."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    values = []
    for match in re.finditer(r"'((?:[^']|'')*)'|([^,\s]+)", text):
        quoted, bare = match.groups()
        values.append(quoted.replace("''", "'") if quoted is not None else bare)
    return tuple(values)


def parse_query(request: etree._Element) -> StoredQuery:
    """
    Read a ``query:AdhocQueryRequest`` holding a stored query.

    Raises
    ------
    QueryError
        Not an AdhocQueryRequest, or an unknown stored query (XDSUnknownStoredQuery), or a
        bad ``returnType`` (XDSRegistryError).
    """
    if request.tag != _q(QUERY, "AdhocQueryRequest"):
        raise QueryError("XDSRegistryError", "the payload is not an AdhocQueryRequest")
    option = request.find(_q(QUERY, "ResponseOption"))
    return_type = option.get("returnType", "") if option is not None else ""
    if return_type not in ("LeafClass", "ObjectRef"):
        raise QueryError("XDSRegistryError", f"returnType {return_type!r}: use LeafClass or ObjectRef")
    query = request.find(_q(RIM, "AdhocQuery"))
    if query is None:
        raise QueryError("XDSRegistryError", "no rim:AdhocQuery")
    query_id = query.get("id", "")
    if query_id not in (FIND_DOCUMENTS, FIND_DOCUMENTS_BY_REFERENCE_ID, GET_DOCUMENTS, GET_SUBMISSION_SETS):
        raise QueryError("XDSUnknownStoredQuery", f"stored query {query_id} is not supported")
    parameters: dict[str, list[tuple[str, ...]]] = {}
    for slot in query.iterchildren(_q(RIM, "Slot")):
        values: list[str] = []
        for value in slot.iter(_q(RIM, "Value")):
            values.extend(_parse_values(value.text or ""))
        parameters.setdefault(slot.get("name", ""), []).append(tuple(values))
    return StoredQuery(query_id, {k: tuple(v) for k, v in parameters.items()}, return_type)


def _pad(dtm: str) -> str:
    return (dtm + "00000000000000")[:14]


def _code_matches(have: Sequence[str], wanted: Sequence[str]) -> bool:
    for want in wanted:
        code, sep, scheme = want.partition("^^")
        for key in have:
            have_code, _, have_scheme = key.partition("^^")
            if have_code == code and (not sep or not scheme or have_scheme == scheme):
                return True
    return False


def find_documents_filters(query: StoredQuery) -> tuple[str, list[str]]:
    """The patient ID and statuses FindDocuments needs (checked), for the store to select on.

    Raises
    ------
    QueryError
        XDSStoredQueryMissingParam if either is missing.
    """
    patient = query.single("$XDSDocumentEntryPatientId")
    statuses = query.values("$XDSDocumentEntryStatus")
    if not patient:
        raise QueryError("XDSStoredQueryMissingParam", "$XDSDocumentEntryPatientId is required")
    if not statuses:
        raise QueryError("XDSStoredQueryMissingParam", "$XDSDocumentEntryStatus is required")
    if query.query_id == FIND_DOCUMENTS_BY_REFERENCE_ID and not query.values("$XDSDocumentEntryReferenceIdList"):
        raise QueryError("XDSStoredQueryMissingParam", "$XDSDocumentEntryReferenceIdList is required")
    for name in _TIME_PARAMETERS:
        value = query.single(name)
        if value is not None and not _DTM.match(value):
            raise QueryError("XDSRegistryError", f"{name} is not a DTM time")
    return patient, statuses


def entry_matches(entry: EntryRecord, query: StoredQuery) -> bool:
    """Whether an entry of the right patient and status passes the other FindDocuments filters.

    A parameter given as several Slots (eventCodeList, confidentialityCode) is an AND of
    the Slots, each an OR of its values; time ranges are from-inclusive, to-exclusive.
    """
    for name, scheme in _CODE_PARAMETERS.items():
        for values in query.parameters.get(name, ()):
            if not _code_matches(entry.codes.get(scheme, ()), values):
                return False
    for name, (field, upper) in _TIME_PARAMETERS.items():
        bound = query.single(name)
        if bound is None:
            continue
        value = getattr(entry, field)
        if not value:
            return False
        if upper and not _pad(value) < _pad(bound):
            return False
        if not upper and not _pad(value) >= _pad(bound):
            return False
    wanted = query.values("$XDSDocumentEntryReferenceIdList")
    if wanted and not set(wanted) & set(entry.reference_ids):
        return False
    return True


def query_response(elements: Sequence[etree._Element], return_type: str) -> etree._Element:
    """A Success ``query:AdhocQueryResponse`` holding ``elements`` (LeafClass) or their refs."""
    response = etree.Element(
        _q(QUERY, "AdhocQueryResponse"), nsmap={"query": QUERY, "rim": RIM, "rs": md.RS}, status=Status.SUCCESS.value
    )
    objects = etree.SubElement(response, _q(RIM, "RegistryObjectList"))
    for element in elements:
        if return_type == "ObjectRef":
            etree.SubElement(objects, _q(RIM, "ObjectRef"), id=element.get("id", ""))
        else:
            objects.append(element)
    return response


def query_failure(errors: Sequence[RegistryError]) -> etree._Element:
    """A Failure ``query:AdhocQueryResponse`` with its errors and an empty object list."""
    response = etree.Element(
        _q(QUERY, "AdhocQueryResponse"), nsmap={"query": QUERY, "rim": RIM, "rs": md.RS}, status=Status.FAILURE.value
    )
    error_list = etree.SubElement(
        response, _q(md.RS, "RegistryErrorList"), highestSeverity=Severity.ERROR.value
    )
    for error in errors:
        item = etree.SubElement(
            error_list, _q(md.RS, "RegistryError"), codeContext=error.context, errorCode=error.code,
            severity=error.severity.value,
        )
        if error.location:
            item.set("location", error.location)
    etree.SubElement(response, _q(RIM, "RegistryObjectList"))
    return response
