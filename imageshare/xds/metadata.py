"""
Document Source metadata for RAD-68 / ITI-41: the ProvideAndRegisterDocumentSetRequest (pure).

:func:`provide_and_register` turns a study manifest (:class:`ManifestInfo`) and the Affinity
Domain settings into the request body: one SubmissionSet, one DocumentEntry for the KOS
(``application/dicom``), the HasMember association and, for a rebuilt manifest, an RPLC
association to the DocumentEntry it replaces (``../shared/docs/xds-i.md`` sections 2 and 3).
The ``xds:Document`` element is left for the MTOM packaging to fill (an ``xop:Include`` of
the given Content-ID, or empty).

Every id is a ``urn:uuid:`` URN. The entry and submission UUIDs come from the caller (the
outbox records them before sending); the other ids (classifications, identifiers,
associations) and the SubmissionSet uniqueId are derived from them, so building the same
submission again yields the same document, byte for byte: a retry is the same submission.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from datetime import date, datetime, time, timezone, tzinfo
from typing import Iterable, Sequence

import attrs
from lxml import etree
from pydicom.sr.codedict import codes as _dicom_codes

from imageshare.xds import mtom
from imageshare.xds.affinity import AffinityDomain, Code, hl7_escape, is_oid

__all__ = [
    "ManifestInfo",
    "MetadataError",
    "provide_and_register",
    "event_codes",
    "anatomic_region",
    "modality_code",
    "reference_ids",
    "dtm",
    "study_dtm",
    "submission_unique_id",
    "urn_uuid",
]

# Namespaces (xds-i.md section 1).
XDS = "urn:ihe:iti:xds-b:2007"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XOP = "http://www.w3.org/2004/08/xop/include"
NSMAP = {"xds": XDS, "lcm": LCM, "rim": RIM}

# Object types and attribute schemes (xds-i.md section 2.2; dcm4che XDSConstants, NIST MetadataSupport).
DOCUMENT_ENTRY_STABLE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
DOCUMENT_ENTRY_ON_DEMAND = "urn:uuid:34268e47-fdf5-41a6-ba33-82133c465248"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY_CODE = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_EVENT_CODE_LIST = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_HEALTHCARE_FACILITY_TYPE_CODE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE_SETTING_CODE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_LIMITED_METADATA = "urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"  # prohibited in XDS
SUBMISSION_SET = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE_CODE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
FOLDER = "urn:uuid:d9d542f3-6cc4-48b6-8870-ea235fbc94c2"
FOLDER_CODE_LIST = "urn:uuid:1ba97051-7806-41a8-a48b-8fce7af683c5"
FOLDER_PATIENT_ID = "urn:uuid:f64ffdf0-4b97-4e06-b79f-a52b38ec2f8a"
FOLDER_UNIQUE_ID = "urn:uuid:75df8f67-9973-4fbe-a900-df66cefecc5a"

CLASSIFICATION_OBJECT = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
APND = "urn:ihe:iti:2007:AssociationType:APND"
XFRM = "urn:ihe:iti:2007:AssociationType:XFRM"
XFRM_RPLC = "urn:ihe:iti:2007:AssociationType:XFRM_RPLC"

# referenceIdList (CXi) and its identifier types (MADO Table A-2; xds-i.md section 3).
REFERENCE_ID_LIST = "urn:ihe:iti:xds:2013:referenceIdList"
STUDY_INSTANCE_UID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
ACCESSION_TYPE = "urn:ihe:iti:xds:2013:accession"

# Fixed, ours: the namespace of the ids derived from a submission's UUIDs.
_ID_NAMESPACE = uuid.UUID("3d0b7a52-8e0f-4f5e-b6a1-1c9e2f6d4a70")
_SHA1 = re.compile(r"[0-9a-f]{40}\Z")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})\Z")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?\Z")

# DICOM Body Part Examined defined terms -> CID 4 concept keyword (pydicom's dictionary holds
# the code and its meaning); terms that equal a CID 4 keyword in upper case need no entry.
_BODY_PARTS = {
    "CHEST": "Thorax",
    "THORAX": "Thorax",
    "CSPINE": "CervicalSpine",
    "TSPINE": "ThoracicSpine",
    "LSPINE": "LumbarSpine",
    "SSPINE": "SacroCoccygealSpine",
    "HEADNECK": "HeadAndNeck",
    "WHOLEBODY": "EntireBody",
    "CHESTABDOMEN": "ChestAndAbdomen",
    "ABDOMENPELVIS": "AbdomenAndPelvis",
    "ABDPELVIS": "AbdomenAndPelvis",
    "CHESTABDPELVIS": "ChestAbdomenAndPelvis",
    "ELBOW": "ElbowJoint",
    "ANKLE": "AnkleJoint",
    "WRIST": "WristJoint",
    "TMJ": "TemporomandibularJoint",
    "ARM": "UpperArm",
    "LEG": "LowerLeg",
    "IAC": "InternalAuditoryCanal",
}


class MetadataError(ValueError):
    """The manifest cannot be described as XDS metadata (missing or malformed value)."""


def _sha1(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _SHA1.match(value):
        raise MetadataError(f"{attribute.name} {value!r} is not a lowercase SHA-1 hex digest")


@attrs.frozen(kw_only=True)
class ManifestInfo:
    """
    What the XDS metadata of a study manifest is made of.

    DICOM values keep their DICOM form (DA, TM, PN, CS); :func:`provide_and_register` converts
    them. ``study_date``/``study_time`` are in ``timezone`` (the acquisition site's; ``None``
    means this server's local zone) and become serviceStartTime in UTC.

    Parameters
    ----------
    sop_instance_uid
        The KOS SOP Instance UID: the DocumentEntry uniqueId.
    study_instance_uid, accession_number, accession_issuer
        For referenceIdList; the accession issuer is an OID (Issuer of Accession Number
        Sequence, Universal Entity ID) or empty.
    patient_id, issuer_of_patient_id
        The DICOM Patient ID and Issuer of Patient ID.
    patient_name, patient_birth_date, patient_sex
        DICOM PN, DA and CS, for sourcePatientInfo PID-5, PID-7, PID-8.
    study_date, study_time
        DICOM DA and TM of the study (serviceStartTime).
    modalities, body_parts
        The study's Modality values and Body Part Examined defined terms (eventCodeList).
    title
        The DocumentEntry title (empty: none).
    size, sha1
        Octet count and lowercase SHA-1 hex digest of the KOS Part 10 bytes.
    creation_time
        When the KOS was made (its Content Date/Time); naive means server local time.
    """

    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    size: int
    sha1: str = attrs.field(validator=_sha1)
    creation_time: datetime
    issuer_of_patient_id: str = ""
    accession_number: str = ""
    accession_issuer: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    modalities: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    body_parts: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    title: str = ""
    timezone: tzinfo | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("sop_instance_uid", "study_instance_uid"):
            if not is_oid(getattr(self, name)):
                raise MetadataError(f"{name} {getattr(self, name)!r} is not a UID")
        if self.accession_issuer and not is_oid(self.accession_issuer):
            raise MetadataError(f"accession_issuer {self.accession_issuer!r} is not an OID")
        if self.size < 0:
            raise MetadataError(f"size {self.size} is negative")

    @classmethod
    def from_part10(
        cls,
        data: bytes,
        *,
        modalities: Iterable[str] = (),
        body_parts: Iterable[str] = (),
        title: str = "",
        timezone: tzinfo | None = None,
    ) -> ManifestInfo:
        """
        Describe a KOS manifest from its Part 10 bytes (what is sent is what is described).

        Modalities and body parts are not in the KOS; the caller gives the study's.
        """
        from io import BytesIO

        from pydicom import dcmread

        try:
            ds = dcmread(BytesIO(data), stop_before_pixels=True)
            sop_instance_uid, study_instance_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        except Exception as e:  # pydicom raises many kinds on a broken file
            raise MetadataError(f"the manifest is not a readable Part 10 KOS: {e}") from e
        created = _dicom_datetime(
            str(ds.get("ContentDate", "") or ds.get("InstanceCreationDate", "")),
            str(ds.get("ContentTime", "") or ds.get("InstanceCreationTime", "")),
            timezone,
        )
        if created is None:
            raise MetadataError("the manifest has no Content Date/Time")
        issuer_seq = ds.get("IssuerOfAccessionNumberSequence") or []
        accession_issuer = str(issuer_seq[0].get("UniversalEntityID", "")) if issuer_seq else ""
        return cls(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            patient_id=str(ds.get("PatientID", "")),
            issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "")),
            accession_number=str(ds.get("AccessionNumber", "")),
            accession_issuer=accession_issuer if is_oid(accession_issuer) else "",
            patient_name=str(ds.get("PatientName", "")),
            patient_birth_date=str(ds.get("PatientBirthDate", "")),
            patient_sex=str(ds.get("PatientSex", "")),
            study_date=str(ds.get("StudyDate", "")),
            study_time=str(ds.get("StudyTime", "")),
            modalities=tuple(modalities),
            body_parts=tuple(body_parts),
            title=title,
            size=len(data),
            sha1=hashlib.sha1(data).hexdigest(),
            creation_time=created,
            timezone=timezone,
        )


# ------------------------------------------------------------------------- value formats


def urn_uuid(value: uuid.UUID | str) -> str:
    """A UUID as a full ``urn:uuid:`` URN (lowercase); accepts a UUID, a URN or bare text."""
    text = str(value)
    if text.lower().startswith("urn:uuid:"):
        text = text[len("urn:uuid:"):]
    try:
        return f"urn:uuid:{uuid.UUID(text)}"
    except ValueError:
        raise MetadataError(f"{value!r} is not a UUID") from None


def submission_unique_id(submission_uuid: uuid.UUID | str) -> str:
    """The SubmissionSet uniqueId (an OID) of a submission: ``2.25.<UUID as integer>``."""
    return f"2.25.{uuid.UUID(urn_uuid(submission_uuid)[9:]).int}"


def dtm(moment: datetime) -> str:
    """An XDS DTM in UTC to the second (naive times are server local time)."""
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")


def _dicom_datetime(da: str, tm: str, zone: tzinfo | None) -> datetime | None:
    """A DICOM DA + TM as an aware datetime (``None`` zone: server local), None without a date."""
    day = _parse_da(da)
    if day is None:
        return None
    clock, _ = _parse_tm(tm) if tm.strip() else (time(), 0)
    moment = datetime.combine(day, clock)
    return moment.replace(tzinfo=zone) if zone is not None else moment.astimezone()


def _parse_da(da: str) -> date | None:
    match = _DA.match(da.strip())
    if not match:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def _parse_tm(tm: str) -> tuple[time, int]:
    """A DICOM TM as a time and how many components it had (1 hour .. 3 seconds)."""
    match = _TM.match(tm.strip().replace(":", ""))
    if not match:
        raise MetadataError(f"study time {tm!r} is not a DICOM TM")
    hour, minute, second = (int(part) if part else 0 for part in match.groups()[:3])
    precision = 1 + (match.group(2) is not None) + (match.group(3) is not None)
    try:
        return time(hour, minute, min(second, 59)), precision
    except ValueError:
        raise MetadataError(f"study time {tm!r} is out of range") from None


def study_dtm(da: str, tm: str, zone: tzinfo | None = None) -> str | None:
    """
    The serviceStartTime of a study: DICOM DA/TM in ``zone`` as an XDS DTM in UTC.

    A date alone stays a date (it cannot be moved to UTC); a time keeps its precision
    (hours, minutes or seconds). No valid date: ``None``, the attribute is left out.
    """
    day = _parse_da(da)
    if day is None:
        return None
    if not tm.strip():
        return day.strftime("%Y%m%d")
    clock, precision = _parse_tm(tm)
    moment = datetime.combine(day, clock)
    moment = moment.replace(tzinfo=zone) if zone is not None else moment.astimezone()
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S")[: 8 + 2 * precision]


def _xpn(pn: str) -> str:
    """A DICOM PN (alphabetic group) as an HL7 XPN: family^given^middle^suffix^prefix."""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (hl7_escape(p.strip()) for p in parts)
    return f"{family}^{given}^{middle}^{suffix}^{prefix}"


def source_patient_info(manifest: ManifestInfo, source_patient_id: str) -> list[str]:
    """The sourcePatientInfo values (``PID-3|``, ``PID-5|``, ``PID-7|``, ``PID-8|``) that are known."""
    values = [f"PID-3|{source_patient_id}"]
    if manifest.patient_name.strip():
        values.append(f"PID-5|{_xpn(manifest.patient_name)}")
    if _parse_da(manifest.patient_birth_date) is not None:
        values.append(f"PID-7|{manifest.patient_birth_date.strip()}")
    sex = manifest.patient_sex.strip().upper()
    if sex in ("M", "F", "O"):
        values.append(f"PID-8|{sex}")
    return values


def reference_ids(manifest: ManifestInfo) -> list[str]:
    """The referenceIdList (CXi) values: the study and, if known, its accession number."""
    values = [f"{manifest.study_instance_uid}^^^^{STUDY_INSTANCE_UID_TYPE}"]
    accession = manifest.accession_number.strip()
    if accession:
        authority = f"&{manifest.accession_issuer}&ISO" if manifest.accession_issuer else ""
        values.append(f"{hl7_escape(accession)}^^^{authority}^{ACCESSION_TYPE}")
    return values


@functools.cache
def _cid(cid: int) -> dict[str, Code]:
    """A DICOM context group as {keyword: Code}, from pydicom's copy of PS3.16."""
    collection = getattr(_dicom_codes, f"CID{cid}")
    return {
        keyword: Code(code.value, code.scheme_designator, code.meaning)
        for keyword, code in collection.concepts.items()
    }


def modality_code(modality: str) -> Code | None:
    """The CID 29 (Acquisition Modality) code of a DICOM Modality value, or None if not in it."""
    modality = modality.strip().upper()
    return next((code for code in _cid(29).values() if code.code == modality), None)


def anatomic_region(body_part: str) -> Code | None:
    """The CID 4 (Anatomic Region) code of a Body Part Examined defined term, or None."""
    term = body_part.strip().upper()
    regions = _cid(4)
    keyword = _BODY_PARTS.get(term)
    if keyword is not None:
        return regions.get(keyword)
    return next((code for kw, code in regions.items() if kw.upper() == term), None)


def event_codes(manifest: ManifestInfo, domain: AffinityDomain) -> list[Code]:
    """
    The eventCodeList: the study's acquisition modalities (CID 29), then its anatomic regions
    (CID 4), each once, in the study's order (RAD-68 RAD68-019/-021); unknown values are skipped.
    """
    found: list[Code] = []
    for code in [modality_code(m) for m in manifest.modalities] + [anatomic_region(b) for b in manifest.body_parts]:
        if code is not None:
            coded = Code(code.code, domain.event_scheme(code.scheme), code.display)
            if coded not in found:
                found.append(coded)
    return found


# ------------------------------------------------------------------------- ebRIM builders


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


class _Ids:
    """Derived ids: stable for a given submission, distinct per role."""

    def __init__(self, submission: str, entry: str) -> None:
        self._seed = f"{submission}/{entry}"

    def __call__(self, role: str) -> str:
        return f"urn:uuid:{uuid.uuid5(_ID_NAMESPACE, f'{self._seed}/{role}')}"


def _slot(parent: etree._Element, name: str, values: Sequence[str]) -> None:
    slot = etree.SubElement(parent, _q(RIM, "Slot"), name=name)
    value_list = etree.SubElement(slot, _q(RIM, "ValueList"))
    for value in values:
        etree.SubElement(value_list, _q(RIM, "Value")).text = value


def _name(parent: etree._Element, text: str) -> None:
    name = etree.SubElement(parent, _q(RIM, "Name"))
    etree.SubElement(name, _q(RIM, "LocalizedString"), value=text)


def _classification(parent: etree._Element, scheme: str, owner: str, code: Code, id_: str) -> None:
    element = etree.SubElement(
        parent,
        _q(RIM, "Classification"),
        id=id_,
        classificationScheme=scheme,
        classifiedObject=owner,
        nodeRepresentation=code.code,
        objectType=CLASSIFICATION_OBJECT,
    )
    _slot(element, "codingScheme", [code.scheme])
    _name(element, code.display)


def _author(parent: etree._Element, scheme: str, owner: str, domain: AffinityDomain, id_: str) -> None:
    if domain.author is None:
        return
    element = etree.SubElement(
        parent,
        _q(RIM, "Classification"),
        id=id_,
        classificationScheme=scheme,
        classifiedObject=owner,
        nodeRepresentation="",
        objectType=CLASSIFICATION_OBJECT,
    )
    for name, value in domain.author.slots():
        _slot(element, name, [value])


def _identifier(parent: etree._Element, scheme: str, owner: str, value: str, name: str, id_: str) -> None:
    element = etree.SubElement(
        parent,
        _q(RIM, "ExternalIdentifier"),
        id=id_,
        identificationScheme=scheme,
        registryObject=owner,
        value=value,
        objectType="urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier",
    )
    _name(element, name)


def _document_entry(
    objects: etree._Element,
    manifest: ManifestInfo,
    domain: AffinityDomain,
    entry: str,
    patient_id: str,
    ids: _Ids,
) -> None:
    source_patient_id = domain.source_patient_id(manifest.patient_id, manifest.issuer_of_patient_id)
    extrinsic = etree.SubElement(
        objects, _q(RIM, "ExtrinsicObject"), id=entry, mimeType=domain.mime_type, objectType=DOCUMENT_ENTRY_STABLE
    )
    _slot(extrinsic, "creationTime", [dtm(manifest.creation_time)])
    _slot(extrinsic, "languageCode", [domain.language_code])
    start = study_dtm(manifest.study_date, manifest.study_time, manifest.timezone)
    if start is not None:
        _slot(extrinsic, "serviceStartTime", [start])
    _slot(extrinsic, "sourcePatientId", [source_patient_id])
    _slot(extrinsic, "sourcePatientInfo", source_patient_info(manifest, source_patient_id))
    _slot(extrinsic, "hash", [manifest.sha1])
    _slot(extrinsic, "size", [str(manifest.size)])
    _slot(extrinsic, REFERENCE_ID_LIST, reference_ids(manifest))
    if manifest.title.strip():
        _name(extrinsic, manifest.title.strip())
    _author(extrinsic, DE_AUTHOR, entry, domain, ids("de-author"))
    _classification(extrinsic, DE_CLASS_CODE, entry, domain.class_code, ids("de-class"))
    _classification(extrinsic, DE_CONFIDENTIALITY_CODE, entry, domain.confidentiality_code, ids("de-confidentiality"))
    for n, code in enumerate(event_codes(manifest, domain)):
        _classification(extrinsic, DE_EVENT_CODE_LIST, entry, code, ids(f"de-event-{n}"))
    _classification(extrinsic, DE_FORMAT_CODE, entry, domain.format_code, ids("de-format"))
    _classification(
        extrinsic, DE_HEALTHCARE_FACILITY_TYPE_CODE, entry, domain.healthcare_facility_type_code, ids("de-facility")
    )
    _classification(extrinsic, DE_PRACTICE_SETTING_CODE, entry, domain.practice_setting_code, ids("de-practice"))
    _classification(extrinsic, DE_TYPE_CODE, entry, domain.type_code, ids("de-type"))
    _identifier(extrinsic, DE_PATIENT_ID, entry, patient_id, "XDSDocumentEntry.patientId", ids("de-patient"))
    _identifier(
        extrinsic, DE_UNIQUE_ID, entry, manifest.sop_instance_uid, "XDSDocumentEntry.uniqueId", ids("de-unique")
    )


def _submission_set(
    objects: etree._Element,
    domain: AffinityDomain,
    submission: str,
    unique_id: str,
    patient_id: str,
    now: datetime,
    ids: _Ids,
) -> None:
    package = etree.SubElement(objects, _q(RIM, "RegistryPackage"), id=submission)
    _slot(package, "submissionTime", [dtm(now)])
    _author(package, SS_AUTHOR, submission, domain, ids("ss-author"))
    _classification(package, SS_CONTENT_TYPE_CODE, submission, domain.content_type_code, ids("ss-content"))
    _identifier(package, SS_UNIQUE_ID, submission, unique_id, "XDSSubmissionSet.uniqueId", ids("ss-unique"))
    _identifier(package, SS_SOURCE_ID, submission, domain.source_id, "XDSSubmissionSet.sourceId", ids("ss-source"))
    _identifier(package, SS_PATIENT_ID, submission, patient_id, "XDSSubmissionSet.patientId", ids("ss-patient"))
    etree.SubElement(
        objects,
        _q(RIM, "Classification"),
        id=ids("ss-node"),
        classifiedObject=submission,
        classificationNode=SUBMISSION_SET,
        objectType=CLASSIFICATION_OBJECT,
    )


def _association(objects: etree._Element, kind: str, source: str, target: str, id_: str) -> etree._Element:
    return etree.SubElement(
        objects,
        _q(RIM, "Association"),
        id=id_,
        associationType=kind,
        sourceObject=source,
        targetObject=target,
        objectType="urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association",
    )


def provide_and_register(
    manifest: ManifestInfo,
    domain: AffinityDomain,
    *,
    entry_uuid: uuid.UUID | str,
    submission_uuid: uuid.UUID | str,
    now: datetime,
    document_id: str | None = None,
    replaces: uuid.UUID | str | None = None,
    submission_uid: str | None = None,
) -> etree._Element:
    """
    Build the ``xds:ProvideAndRegisterDocumentSetRequest`` registering one study manifest.

    Parameters
    ----------
    manifest
        The manifest to register.
    domain
        The Affinity Domain's identifiers and codes.
    entry_uuid, submission_uuid
        The entryUUIDs of the DocumentEntry and the SubmissionSet (UUID, URN or text).
    now
        The submissionTime (naive: server local time).
    document_id
        The MIME Content-ID (without ``<>``) of the KOS part: ``xds:Document`` then holds
        ``<xop:Include href="cid:...">``. ``None`` leaves it empty for the caller to fill.
    replaces
        The entryUUID of the DocumentEntry this manifest replaces: adds the RPLC association.
    submission_uid
        The SubmissionSet uniqueId; default :func:`submission_unique_id` of ``submission_uuid``.

    Raises
    ------
    MetadataError
        A UUID or UID is malformed, or the replaced entry is this entry.
    imageshare.xds.affinity.PatientIdError
        The patient ID is missing or cannot be mapped to the domain.
    imageshare.xds.mtom.MtomError
        ``document_id`` is not a valid Content-ID.
    """
    entry = urn_uuid(entry_uuid)
    submission = urn_uuid(submission_uuid)
    if entry == submission:
        raise MetadataError("the DocumentEntry and the SubmissionSet need different UUIDs")
    unique_id = submission_uid or submission_unique_id(submission)
    if not is_oid(unique_id):
        raise MetadataError(f"submission uniqueId {unique_id!r} is not an OID")
    patient_id = domain.patient_id(manifest.patient_id, manifest.issuer_of_patient_id)
    ids = _Ids(submission, entry)

    request = etree.Element(_q(XDS, "ProvideAndRegisterDocumentSetRequest"), nsmap=NSMAP)
    submit = etree.SubElement(request, _q(LCM, "SubmitObjectsRequest"))
    objects = etree.SubElement(submit, _q(RIM, "RegistryObjectList"))
    _document_entry(objects, manifest, domain, entry, patient_id, ids)
    _submission_set(objects, domain, submission, unique_id, patient_id, now, ids)
    member = _association(objects, HAS_MEMBER, submission, entry, ids("has-member"))
    _slot(member, "SubmissionSetStatus", ["Original"])
    if replaces is not None:
        old = urn_uuid(replaces)
        if old == entry:
            raise MetadataError("a DocumentEntry cannot replace itself")
        _association(objects, RPLC, entry, old, ids("rplc"))

    document = etree.SubElement(request, _q(XDS, "Document"), id=entry)
    if document_id is not None:
        mtom.include(document, document_id)
    return request
