"""
The XDS Affinity Domain this server publishes into: identifiers, codes and patient ID mapping (pure).

An Affinity Domain fixes the values every Document Source must agree on: the assigning
authority of the domain's patient identifiers, the code lists (class, type, practice setting,
healthcare facility type, confidentiality, content type, event codes) that the registry
validates, and the OIDs that name this source and its repository (``../shared/docs/xds-i.md``
sections 2.3, 3 and 9.F). This module holds them as one frozen, validated value; reading them
from the configuration file is the configuration's job.

Defaults
--------
The OIDs have no meaningful default: the caller passes them, or uses
:meth:`AffinityDomain.standalone` with the server's own OID (for instance the manifests'
Retrieve Location UID, which *is* the repositoryUniqueId of XDS-I.b). The codes default to a
connectathon-style set (LOINC class/type codes, SNOMED CT practice setting and facility type,
HL7 confidentiality ``N``) — the same values as the RAD-68 sample in the shared schemas.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping

import attrs

__all__ = [
    "AffinityDomain",
    "AffinityDomainError",
    "Author",
    "Code",
    "PatientIdError",
    "KOS_FORMAT_CODE",
    "DICOM_MIME_TYPE",
    "hl7_escape",
    "is_oid",
]

# ITI TF-3 4.2.3.1.7 (uniqueId): an OID of at most 64 characters, no leading zeros in arcs.
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+\Z")
# RFC 3066 language tag (languageCode).
_LANGUAGE = re.compile(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*\Z")

DICOM_MIME_TYPE = "application/dicom"


def is_oid(value: str) -> bool:
    """Whether ``value`` is an ISO OID usable as an XDS uniqueId or assigning authority."""
    return len(value) <= 64 and _OID.match(value) is not None


def hl7_escape(value: str) -> str:
    """Escape the HL7 v2 delimiters (``| ^ & ~ \\``) inside one component value."""
    out = value.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, escape)
    return out


class AffinityDomainError(ValueError):
    """An Affinity Domain setting is invalid (bad OID, empty code, ...)."""


class PatientIdError(ValueError):
    """A local patient ID cannot be mapped to the Affinity Domain."""


@attrs.frozen
class Code:
    """
    A coded value as XDS carries it: ``nodeRepresentation``, ``codingScheme`` slot, Name.

    Parameters
    ----------
    code
        The code value (``nodeRepresentation``).
    scheme
        The coding scheme (the ``codingScheme`` slot): an OID or a designator the Affinity
        Domain uses (``DCM``, ``LOINC``...).
    display
        The display name (``rim:Name/rim:LocalizedString/@value``).
    """

    code: str
    scheme: str
    display: str

    def __attrs_post_init__(self) -> None:
        for name in ("code", "scheme", "display"):
            if not getattr(self, name).strip():
                raise AffinityDomainError(f"code {self!r}: {name} is empty")


# formatCode of an XDS-I.b manifest: the KOS SOP Class UID in the DICOM UID registry
# (RAD TF-3 4.68.4.1.2.3.2; xds-i.md section 3).
KOS_FORMAT_CODE = Code("1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection Document")


@attrs.frozen
class Author:
    """
    The author of the submission and of the manifest (XDS ``author``, R2 for a Document Source).

    Values are already HL7 v2 encoded: ``person`` XCN (``^Smith^John``), ``institution`` XON
    (``Hospital^^^^^&1.2.3&ISO^^^^1.2.3``), ``telecom`` XTN. The registry needs at least one
    of person, institution or telecom (xds-i.md 2.1).
    """

    person: str = ""
    institution: str = ""
    role: str = ""
    specialty: str = ""
    telecom: str = ""

    def __attrs_post_init__(self) -> None:
        if not (self.person or self.institution or self.telecom):
            raise AffinityDomainError("an author needs a person, an institution or a telecom address")

    def slots(self) -> list[tuple[str, str]]:
        """The author slots (name, value) that are set, in the order of the ebRIM examples."""
        pairs = [
            ("authorPerson", self.person),
            ("authorInstitution", self.institution),
            ("authorRole", self.role),
            ("authorSpecialty", self.specialty),
            ("authorTelecommunication", self.telecom),
        ]
        return [(name, value) for name, value in pairs if value]


def _pairs(value: Mapping[str, str] | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


def _oid(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not is_oid(value):
        raise AffinityDomainError(f"{attribute.name} {value!r} is not an OID of at most 64 characters")


def _optional_oid(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        _oid(instance, attribute, value)


_DEFAULT_EVENT_SCHEMES = (
    ("DCM", "1.2.840.10008.2.16.4"),  # DICOM controlled terminology: CID 29 modalities
    ("SCT", "2.16.840.1.113883.6.96"),  # SNOMED CT: CID 4 anatomic regions
)


@attrs.frozen
class AffinityDomain:
    """
    What an XDS Affinity Domain fixes for our submissions.

    Parameters
    ----------
    patient_authority
        OID of the assigning authority of the domain's patient IDs (``&OID&ISO`` in CX).
    source_id
        OID of this Document Source (SubmissionSet ``sourceId``).
    repository_unique_id
        OID of the repository that holds our manifests. For XDS-I.b this is also the Retrieve
        Location UID written in the manifests (RAD-69 consumers take it from there).
    issuer_authorities
        DICOM Issuer of Patient ID -> domain assigning authority OID, for issuers whose patient
        IDs *are* domain IDs (a shared MPI number, a national ID). Patients of other issuers
        follow ``unmapped_issuers``.
    unmapped_issuers
        ``"domain"``: use the local Patient ID as is under ``patient_authority`` (right for a
        standalone server that is its own domain, or a single-hospital domain);
        ``"reject"``: refuse to register (a multi-source domain where a PIX lookup would be needed).
    source_authority
        OID for ``sourcePatientId`` when the DICOM Issuer of Patient ID is empty or not an OID;
        empty means ``patient_authority``.
    class_code, type_code, practice_setting_code, healthcare_facility_type_code, confidentiality_code, content_type_code
        The configured codes (XDS R attributes; the registry checks them against its code list).
    format_code, mime_type
        What the document is: the KOS format code and ``application/dicom`` for XDS-I.b.
    language_code
        RFC 3066 ``languageCode`` of the manifest.
    event_code_schemes
        DICOM Coding Scheme Designator -> the ``codingScheme`` value the domain expects for
        event codes (modalities ``DCM``, anatomic regions ``SCT``). The NIST connectathon code
        set uses the designators themselves (``DCM``/``SRT``); OIDs are the default.
    author
        The author of manifests and submissions, if the domain wants one.
    """

    patient_authority: str = attrs.field(validator=_oid)
    source_id: str = attrs.field(validator=_oid)
    repository_unique_id: str = attrs.field(validator=_oid)
    issuer_authorities: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    unmapped_issuers: Literal["domain", "reject"] = "domain"
    source_authority: str = attrs.field(default="", validator=_optional_oid)
    class_code: Code = Code("18726-0", "2.16.840.1.113883.6.1", "Radiology studies (set)")
    type_code: Code = Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    practice_setting_code: Code = Code("394914008", "2.16.840.1.113883.6.96", "Radiology")
    healthcare_facility_type_code: Code = Code("22232009", "2.16.840.1.113883.6.96", "Hospital")
    confidentiality_code: Code = Code("N", "2.16.840.1.113883.5.25", "Normal")
    content_type_code: Code = Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    format_code: Code = KOS_FORMAT_CODE
    mime_type: str = DICOM_MIME_TYPE
    language_code: str = "en-US"
    event_code_schemes: tuple[tuple[str, str], ...] = attrs.field(
        default=_DEFAULT_EVENT_SCHEMES, converter=_pairs
    )
    author: Author | None = None

    def __attrs_post_init__(self) -> None:
        for issuer, authority in self.issuer_authorities:
            if not issuer or not is_oid(authority):
                raise AffinityDomainError(
                    f"issuer_authorities: {issuer!r} -> {authority!r} needs an issuer and an OID"
                )
        if self.unmapped_issuers not in ("domain", "reject"):
            raise AffinityDomainError(f"unmapped_issuers {self.unmapped_issuers!r}: use 'domain' or 'reject'")
        if not _LANGUAGE.match(self.language_code):
            raise AffinityDomainError(f"language_code {self.language_code!r} is not an RFC 3066 tag")
        if not self.mime_type or "/" not in self.mime_type:
            raise AffinityDomainError(f"mime_type {self.mime_type!r} is not a media type")
        for designator, scheme in self.event_code_schemes:
            if not designator or not scheme:
                raise AffinityDomainError("event_code_schemes entries need a designator and a scheme")

    @classmethod
    def standalone(cls, server_oid: str, **overrides: object) -> AffinityDomain:
        """
        The domain of a server that is its own XDS.b repository and registry.

        ``server_oid`` (the Retrieve Location UID of the manifests, say) is the
        repositoryUniqueId; the patient ID authority is ``<server_oid>.1`` and the source ID
        ``<server_oid>.2``, so all three are distinct and stable for the server's lifetime.
        """
        if not is_oid(server_oid) or len(server_oid) > 62:
            raise AffinityDomainError(f"server OID {server_oid!r} must be an OID of at most 62 characters")
        values: dict[str, object] = {
            "patient_authority": f"{server_oid}.1",
            "source_id": f"{server_oid}.2",
            "repository_unique_id": server_oid,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def event_scheme(self, designator: str) -> str:
        """The ``codingScheme`` for event codes of a DICOM coding scheme designator."""
        return dict(self.event_code_schemes).get(designator, designator)

    def patient_id(self, local_id: str, issuer: str = "") -> str:
        """
        The domain patient ID (CX ``ID^^^&OID&ISO``) of a local Patient ID.

        Raises
        ------
        PatientIdError
            The ID is empty, or its issuer is not mapped and ``unmapped_issuers`` is ``reject``.
        """
        if not local_id.strip():
            raise PatientIdError("the study has no Patient ID")
        authority = dict(self.issuer_authorities).get(issuer)
        if authority is None:
            if self.unmapped_issuers == "reject":
                raise PatientIdError(f"no domain assigning authority for issuer {issuer!r}")
            authority = self.patient_authority
        return f"{hl7_escape(local_id)}^^^&{authority}&ISO"

    def source_patient_id(self, local_id: str, issuer: str = "") -> str:
        """
        The ``sourcePatientId`` (CX) of a local Patient ID: the patient as the source knows it.

        An OID issuer is the assigning authority; another issuer is kept as the HD namespace
        with ``source_authority`` (or ``patient_authority``) as its universal ID.
        """
        if not local_id.strip():
            raise PatientIdError("the study has no Patient ID")
        if issuer and is_oid(issuer):
            return f"{hl7_escape(local_id)}^^^&{issuer}&ISO"
        authority = self.source_authority or self.patient_authority
        return f"{hl7_escape(local_id)}^^^{hl7_escape(issuer)}&{authority}&ISO"
