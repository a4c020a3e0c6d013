"""
DICOM audit messages (PS3.15 A.5), built as values and serialised to one line of XML.

Pure: no Twisted, no I/O, no clock (every builder takes ``when``). Each builder follows the
event's table in PS3.15 A.5.3 (or the IHE transaction's audit section) and returns an
:class:`AuditMessage`; :meth:`AuditMessage.to_xml` gives the UTF-8 XML (no declaration,
no raw line break: a message is always one line, so the local audit log is line-based).

The schema (PS3.15 A.5.1) wants a ``ParticipantObjectName`` or a ``ParticipantObjectQuery``
in every participant object: patients carry their name when it is known (their ID
otherwise), studies and documents their UID, queries the query.

Who the user is: a DICOM peer is its calling AE title and address; a token-authenticated
HTTP request is a :class:`Principal`, recorded as IUA asks (``UserName`` is
``alias<sub@iss>``, ``AlternativeUserID`` the token's ``jti``). The token itself never
appears anywhere.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from typing import Iterable, Sequence

import attrs
from lxml import etree

__all__ = [
    "AuditMessage", "Code", "Participant", "ParticipantObject", "Patient", "Principal", "Study", "Node",
    "application_activity", "instances_stored", "query", "begin_transferring", "instances_transferred",
    "instances_served", "export", "user_authentication_failed", "security_alert",
    "SUCCESS", "MINOR_FAILURE", "SERIOUS_FAILURE", "MAJOR_FAILURE",
]

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


@attrs.frozen
class Code:
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText`` (the code meaning)."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


def _ihe(transaction: str, meaning: str) -> Code:
    return Code(transaction, "IHE Transactions", meaning)


def _rfc3881(code: str, meaning: str) -> Code:
    return Code(code, "RFC-3881", meaning)


# PS3.16 CID 400-403 and the IHE transactions used here.
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
PATIENT_RECORD = _dcm("110110", "Patient Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
RESTRICTED_FUNCTION = _dcm("110132", "Use of a restricted function")
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")
STUDY_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
PATIENT_NUMBER = _rfc3881("2", "Patient Number")
REPORT_NUMBER = _rfc3881("9", "Report Number")
URI = _rfc3881("12", "URI")
SUBMISSION_SET = Code("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", "IHE XDS Metadata",
                      "submission set classificationNode")
ITI_41 = _ihe("ITI-41", "Provide and Register Document Set-b")
ITI_43 = _ihe("ITI-43", "Retrieve Document Set")
RAD_68 = _ihe("RAD-68", "Provide and Register Imaging Document Set - MTOM/XOP")
RAD_69 = _ihe("RAD-69", "Retrieve Imaging Document Set")
DICOM_TRANSACTIONS = {
    "C-FIND": _ihe("RAD-14", "Query Images"),
    "WADO": _ihe("RAD-55", "WADO Retrieve"),
    "JPIP": Code("JPIP", "DCM", "JPIP Referenced Pixel Data"),
}


@attrs.frozen
class Principal:
    """
    The user of a token-authenticated request (IUA).

    ``sub`` and ``iss`` are the token's claims, ``alias`` an optional display name (e.g.
    the ``name`` or ``preferred_username`` claim), ``jti`` the token's identifier. Never
    the token.
    """

    sub: str
    iss: str
    jti: str = ""
    alias: str = ""

    @property
    def user_name(self) -> str:
        return f"{self.alias}<{self.sub}@{self.iss}>"


@attrs.frozen
class Node:
    """A network peer: an AE title or a URL, and the address it came from or went to."""

    user_id: str
    address: str = ""  # IP address or host name (the network access point)
    principal: Principal | None = None


@attrs.frozen
class Participant:
    user_id: str
    requestor: bool
    role: Code | None = None
    address: str = ""
    user_name: str = ""
    alternative_user_id: str = ""


@attrs.frozen
class ParticipantObject:
    object_id: str
    id_type: Code
    type_code: str  # 1 person, 2 system object, 3 organization, 4 other
    role: str | None = None  # ParticipantObjectTypeCodeRole
    name: str | None = None
    query: bytes | None = None
    details: tuple[tuple[str, bytes], ...] = ()
    sop_classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    accession: str = ""
    life_cycle: str | None = None
    instances: tuple[tuple[str, str], ...] = ()  # (SOP Class UID, SOP Instance UID)


@attrs.frozen
class Patient:
    """A patient: ``id`` and ``issuer`` as in Patient ID / Issuer of Patient ID; ``name`` if known."""

    id: str
    issuer: str = ""
    name: str = ""


@attrs.frozen
class Study:
    """A study touched by the event, with the SOP classes and how many instances of each."""

    uid: str
    sop_classes: tuple[tuple[str, int], ...] = ()
    accession: str = ""
    patient: Patient | None = None
    #: (SOP Class UID, SOP Instance UID) of the instances named, when the event names them
    #: (a WADO or JPIP object); written as ``Instance`` in their ``SOPClass``.
    instances: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class AuditMessage:
    """One audit message: event, participants, source, objects."""

    event_id: Code
    action: str
    when: datetime.datetime
    outcome: int
    participants: tuple[Participant, ...]
    source_id: str
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    objects: tuple[ParticipantObject, ...] = ()
    site_id: str = ""

    def to_xml(self) -> bytes:
        """The message as UTF-8 XML on one line (line breaks in values written as references)."""
        root = etree.Element("AuditMessage")
        ev = etree.SubElement(root, "EventIdentification", EventActionCode=self.action,
                              EventDateTime=_datetime(self.when), EventOutcomeIndicator=str(self.outcome))
        _code(ev, "EventID", self.event_id)
        for code in self.event_types:
            _code(ev, "EventTypeCode", code)
        if self.outcome_description:
            etree.SubElement(ev, "EventOutcomeDescription").text = _text(self.outcome_description)
        for p in self.participants:
            ap = etree.SubElement(root, "ActiveParticipant", UserID=_text(p.user_id) or "-",
                                  UserIsRequestor="true" if p.requestor else "false")
            if p.alternative_user_id:
                ap.set("AlternativeUserID", _text(p.alternative_user_id))
            if p.user_name:
                ap.set("UserName", _text(p.user_name))
            if p.address:
                ap.set("NetworkAccessPointID", _token(p.address))
                ap.set("NetworkAccessPointTypeCode", "2" if _is_ip(p.address) else "1")
            if p.role is not None:
                _code(ap, "RoleIDCode", p.role)
        source = etree.SubElement(root, "AuditSourceIdentification")
        if self.site_id:
            source.set("AuditEnterpriseSiteID", _token(self.site_id))
        source.set("AuditSourceID", _token(self.source_id))
        etree.SubElement(source, "AuditSourceTypeCode").set("csd-code", "4")  # application server
        for o in self.objects:
            po = etree.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=_token(o.object_id),
                                  ParticipantObjectTypeCode=o.type_code)
            if o.role is not None:
                po.set("ParticipantObjectTypeCodeRole", o.role)
            if o.life_cycle is not None:
                po.set("ParticipantObjectDataLifeCycle", o.life_cycle)
            _code(po, "ParticipantObjectIDTypeCode", o.id_type)
            if o.query is not None:
                etree.SubElement(po, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode("ascii")
            else:
                etree.SubElement(po, "ParticipantObjectName").text = _token(o.name or o.object_id)
            for kind, value in o.details:
                etree.SubElement(po, "ParticipantObjectDetail", type=_token(kind),
                                 value=base64.b64encode(value).decode("ascii"))
            if o.sop_classes or o.accession:
                description = etree.SubElement(po, "ParticipantObjectDescription")
                if o.accession:
                    etree.SubElement(description, "Accession", Number=_token(o.accession))
                for uid, count in o.sop_classes:
                    sop_class = etree.SubElement(description, "SOPClass", UID=_token(uid),
                                                 NumberOfInstances=str(count))
                    for _, instance in (i for i in o.instances if i[0] == uid):
                        etree.SubElement(sop_class, "Instance", UID=_token(instance))
        xml: bytes = etree.tostring(root, encoding="utf-8", xml_declaration=False)
        # Text content may hold line breaks (an error message): as references, the same XML.
        return xml.replace(b"\r", b"&#13;").replace(b"\n", b"&#10;")


_CONTROL = {c: None for c in range(32) if c not in (9, 10, 13)}


def _text(value: str) -> str:
    # XML 1.0 cannot carry other control characters at all: drop them.
    return str(value).translate(_CONTROL)


def _token(value: str) -> str:
    return " ".join(_text(value).split())


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


def _datetime(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _code(parent: etree._Element, tag: str, code: Code) -> None:
    etree.SubElement(parent, tag, {"csd-code": _token(code.code), "codeSystemName": _token(code.system),
                                   "originalText": _token(code.meaning)})


# -- participants and objects ------------------------------------------------------------------


def _node(node: Node, requestor: bool, role: Code | None) -> Participant:
    principal = node.principal
    if principal is not None:
        return Participant(principal.sub, requestor, role, node.address, user_name=principal.user_name,
                           alternative_user_id=principal.jti)
    return Participant(node.user_id, requestor, role, node.address)


def _application(app: Node, requestor: bool, role: Code | None) -> Participant:
    return Participant(app.user_id, requestor, role, app.address)


def _patient(patient: Patient) -> ParticipantObject:
    # HL7 CX: ID^^^&issuer (IHE's convention for ParticipantObjectID of a patient).
    object_id = f"{patient.id}^^^&{patient.issuer}&ISO" if patient.issuer else patient.id
    return ParticipantObject(object_id or "unknown", PATIENT_NUMBER, "1", "1", name=patient.name or patient.id or None)


def _study(study: Study) -> ParticipantObject:
    return ParticipantObject(study.uid, STUDY_UID, "2", "3", sop_classes=study.sop_classes, accession=study.accession,
                             instances=study.instances)


def _objects(studies: Iterable[Study]) -> tuple[ParticipantObject, ...]:
    out: list[ParticipantObject] = []
    patients: list[Patient] = []
    for study in studies:
        out.append(_study(study))
        if study.patient is not None and study.patient not in patients:
            patients.append(study.patient)
    return (*out, *(_patient(p) for p in patients))


def _outcome(outcome: int) -> int:
    if outcome not in (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE):
        raise ValueError(f"outcome must be 0, 4, 8 or 12, got {outcome}")
    return outcome


# -- events (PS3.15 A.5.3) ---------------------------------------------------------------------


def application_activity(app: Node, *, started: bool, when: datetime.datetime, source_id: str,
                         outcome: int = SUCCESS, site_id: str = "") -> AuditMessage:
    """A.5.3.1 Application Activity: start (110120) or stop (110121)."""
    return AuditMessage(APPLICATION_ACTIVITY, "E", when, _outcome(outcome),
                        (_application(app, False, ROLE_APPLICATION),), source_id,
                        event_types=(APPLICATION_START if started else APPLICATION_STOP,), site_id=site_id)


def instances_stored(source: Node, app: Node, study: Study, *, replaced: bool, when: datetime.datetime,
                     source_id: str, outcome: int = SUCCESS, description: str = "",
                     site_id: str = "") -> AuditMessage:
    """A.5.3.3 DICOM Instances Transferred, received here by C-STORE: Create, Update when it replaced one."""
    return AuditMessage(INSTANCES_TRANSFERRED, "U" if replaced else "C", when, _outcome(outcome),
                        (_node(source, True, ROLE_SOURCE), _application(app, False, ROLE_DESTINATION)),
                        source_id, outcome_description=description, objects=_objects([study]), site_id=site_id)


def patient_record_changed(source: Node, app: Node, study: Study, *, changes: str, when: datetime.datetime,
                           source_id: str, site_id: str = "") -> AuditMessage:
    """A.5.3.9 Patient Record, Update: a stored instance or study now belongs to the patient
    of ``study`` (identified as audit messages identify patients); ``changes`` names which
    identifiers changed, never their old values."""
    return AuditMessage(PATIENT_RECORD, "U", when, SUCCESS,
                        (_node(source, True, ROLE_SOURCE), _application(app, False, ROLE_DESTINATION)),
                        source_id, outcome_description=changes, objects=_objects([study]), site_id=site_id)


def query(requestor: Node, app: Node, *, sop_class_uid: str, query_bytes: bytes, when: datetime.datetime,
          source_id: str, transaction: Code | None = None, transfer_syntax: str = "", outcome: int = SUCCESS,
          description: str = "", site_id: str = "") -> AuditMessage:
    """A.5.3.10 Query: the query (e.g. the C-FIND identifier as received) base64 in ParticipantObjectQuery."""
    details = (("TransferSyntax", transfer_syntax.encode("ascii", "replace")),) if transfer_syntax else ()
    obj = ParticipantObject(sop_class_uid, SOP_CLASS_UID, "2", "3", query=query_bytes, details=details)
    return AuditMessage(QUERY, "E", when, _outcome(outcome),
                        (_node(requestor, True, ROLE_SOURCE), _application(app, False, ROLE_DESTINATION)),
                        source_id, event_types=(transaction,) if transaction else (),
                        outcome_description=description, objects=(obj,), site_id=site_id)


def _transfer(event: Code, requestor: Node, app: Node, destination: Node, studies: Sequence[Study],
              when: datetime.datetime, source_id: str, outcome: int, description: str,
              event_types: tuple[Code, ...], site_id: str) -> AuditMessage:
    participants = [_application(app, False, ROLE_SOURCE)]
    if destination == requestor:
        participants.append(_node(destination, True, ROLE_DESTINATION))
    else:
        participants += [_node(destination, False, ROLE_DESTINATION), _node(requestor, True, None)]
    return AuditMessage(event, "R" if event == INSTANCES_TRANSFERRED else "E", when, _outcome(outcome),
                        tuple(participants), source_id, event_types=event_types, outcome_description=description,
                        objects=_objects(studies), site_id=site_id)


def begin_transferring(requestor: Node, app: Node, destination: Node, studies: Sequence[Study], *,
                       when: datetime.datetime, source_id: str, outcome: int = SUCCESS,
                       site_id: str = "") -> AuditMessage:
    """A.5.3.2 Begin Transferring DICOM Instances (C-MOVE, C-GET)."""
    return _transfer(BEGIN_TRANSFERRING, requestor, app, destination, studies, when, source_id, outcome, "", (),
                     site_id)


def instances_transferred(requestor: Node, app: Node, destination: Node, studies: Sequence[Study], *,
                          when: datetime.datetime, source_id: str, outcome: int = SUCCESS, description: str = "",
                          transaction: Code | None = None, site_id: str = "") -> AuditMessage:
    """A.5.3.3 DICOM Instances Transferred, sent from here (C-MOVE/C-GET): Read."""
    return _transfer(INSTANCES_TRANSFERRED, requestor, app, destination, studies, when, source_id, outcome,
                     description, (transaction,) if transaction else (), site_id)


def instances_served(client: Node, app: Node, studies: Sequence[Study], *, transaction: Code,
                     when: datetime.datetime, source_id: str, outcome: int = SUCCESS, description: str = "",
                     site_id: str = "") -> AuditMessage:
    """110104 Read to a web client (WADO, RAD-69, JPIP): the client requested and received."""
    return instances_transferred(client, app, client, studies, when=when, source_id=source_id, outcome=outcome,
                                 description=description, transaction=transaction, site_id=site_id)


def export(requestor: Node, app: Node, destination: Node, *, transaction: Code, when: datetime.datetime,
           source_id: str, patient: Patient | None = None, submission_set: str = "",
           documents: Sequence[tuple[str, str]] = (), outcome: int = SUCCESS, description: str = "",
           site_id: str = "") -> AuditMessage:
    """
    A.5.3.6 Export (110106): an ITI-41/RAD-68 submission made, or an ITI-43 retrieval served.

    ``documents`` are (document uniqueId, repository uniqueId) pairs.
    """
    participants = [_application(app, requestor == app, ROLE_SOURCE)]
    if destination == requestor or requestor == app:
        participants.append(_node(destination, destination == requestor, ROLE_DESTINATION))
    else:
        participants += [_node(destination, False, ROLE_DESTINATION), _node(requestor, True, None)]
    objects: list[ParticipantObject] = []
    if patient is not None:
        objects.append(_patient(patient))
    if submission_set:
        objects.append(ParticipantObject(submission_set, SUBMISSION_SET, "2", "20"))
    for document, repository in documents:
        objects.append(ParticipantObject(document, REPORT_NUMBER, "2", "3",
                                         details=(("Repository Unique Id", repository.encode()),) if repository
                                         else ()))
    return AuditMessage(EXPORT, "R", when, _outcome(outcome), tuple(participants), source_id,
                        event_types=(transaction,), outcome_description=description, objects=tuple(objects),
                        site_id=site_id)


def user_authentication_failed(user: Node, app: Node, *, reason: str, when: datetime.datetime, source_id: str,
                               site_id: str = "") -> AuditMessage:
    """A.5.3.13 User Authentication, Login failed (outcome 4): a missing or bad token. Never the token."""
    return AuditMessage(USER_AUTHENTICATION, "E", when, MINOR_FAILURE,
                        (_node(user, True, None), _application(app, False, ROLE_APPLICATION)), source_id,
                        event_types=(LOGIN,), outcome_description=reason, site_id=site_id)


def security_alert(reporter: Node, offender: Node, *, node_authentication: bool, reason: str, subject: str,
                   when: datetime.datetime, source_id: str, outcome: int = MINOR_FAILURE,
                   site_id: str = "") -> AuditMessage:
    """
    A.5.3.11 Security Alert: a refused authorization or association (110132), or a TLS
    peer that failed node authentication (110126). ``subject`` names what was refused (a
    URL path, ``AE@address``).
    """
    alert = ParticipantObject(subject or "-", URI, "2", None, details=(("Alert Description", reason.encode()),))
    return AuditMessage(SECURITY_ALERT, "E", when, _outcome(outcome),
                        (_application(reporter, False, ROLE_APPLICATION), _node(offender, True, None)), source_id,
                        event_types=(NODE_AUTHENTICATION if node_authentication else RESTRICTED_FUNCTION,),
                        outcome_description=reason, objects=(alert,), site_id=site_id)
