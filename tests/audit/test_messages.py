"""Audit messages (PS3.15 A.5.3): every builder's output validates against the DICOM schema."""

from __future__ import annotations

import base64
import datetime

import pytest

from imageshare.audit import messages as m
from imageshare.audit.syslog import format_message, frame, parse_frames, split_message
from tests.audit.schema import assert_valid

WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc)
APP = m.Node("IMAGESHARE", "10.0.0.1")
PEER = m.Node("MODALITY", "192.0.2.7")
PATIENT = m.Patient("PID-1", "1.2.3.4", "Doe^Jane")
STUDY = m.Study("1.2.3.100", (("1.2.840.10008.5.1.4.1.1.2", 3),), accession="ACC1", patient=PATIENT)
USER = m.Node("", "198.51.100.9", m.Principal("u-42", "https://idp.example.org", "jti-123", "jdoe"))


def _all() -> list[m.AuditMessage]:
    common = {"when": WHEN, "source_id": "IMAGESHARE"}
    return [
        m.application_activity(APP, started=True, **common),
        m.application_activity(APP, started=False, site_id="Hospital", **common),
        m.instances_stored(PEER, APP, STUDY, replaced=False, **common),
        m.instances_stored(PEER, APP, STUDY, replaced=True, outcome=4, description="line 1\nline 2", **common),
        m.query(PEER, APP, sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1", query_bytes=b"\x08\x00\x52\x00",
                transaction=m.DICOM_TRANSACTIONS["C-FIND"], transfer_syntax="1.2.840.10008.1.2.1", **common),
        m.begin_transferring(PEER, APP, m.Node("ORTHANC", "192.0.2.8"), [STUDY], **common),
        m.instances_transferred(PEER, APP, m.Node("ORTHANC", "192.0.2.8"), [STUDY], **common),
        m.instances_transferred(PEER, APP, PEER, [STUDY, m.Study("1.2.3.101")], **common),
        m.instances_served(USER, APP, [STUDY], transaction=m.DICOM_TRANSACTIONS["WADO"], **common),
        m.instances_served(m.Node("anonymous", "::1"), APP, [STUDY], transaction=m.RAD_69, **common),
        m.instances_served(USER, APP, [STUDY], transaction=m.DICOM_TRANSACTIONS["JPIP"], **common),
        m.export(APP, APP, m.Node("https://registry.example.org/xds"), transaction=m.ITI_41, patient=PATIENT,
                 submission_set="urn:uuid:0b5d8a9c-1f7e-4b9e-9d43-2c1a6f0e5b11", **common),
        m.export(USER, APP, USER, transaction=m.ITI_43, documents=[("1.2.3.5", "1.2.3.6")], **common),
        m.user_authentication_failed(m.Node("unknown", "203.0.113.5"), APP, reason="expired token", **common),
        m.security_alert(APP, PEER, node_authentication=False, reason="calling AE not allowed",
                         subject="MODALITY@192.0.2.7", **common),
        m.security_alert(APP, m.Node("unknown", "192.0.2.99"), node_authentication=True,
                         reason="certificate verify failed", subject="dicom-tls", outcome=8, **common),
    ]


@pytest.mark.parametrize("message", _all(), ids=lambda msg: f"{msg.event_id.code}-{msg.action}")
def test_every_message_validates(message: m.AuditMessage) -> None:
    """Each event's message is valid against the DICOM audit message schema and is one line."""
    xml = message.to_xml()
    assert b"\n" not in xml and b"\r" not in xml
    assert_valid(xml)


def test_store_event_codes() -> None:
    """A C-STORE is 110104 Create (Update when it replaces), source the calling AE with its address."""
    root = assert_valid(m.instances_stored(PEER, APP, STUDY, replaced=True, when=WHEN, source_id="X").to_xml())
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") == "U"
    assert ev.get("EventDateTime") == "2026-01-02T03:04:05.678Z"
    assert ev.find("EventID").get("csd-code") == "110104"
    source = root.findall("ActiveParticipant")[0]
    assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID"),
            source.get("NetworkAccessPointTypeCode")) == ("MODALITY", "true", "192.0.2.7", "2")
    objs = root.findall("ParticipantObjectIdentification")
    assert objs[0].get("ParticipantObjectID") == "1.2.3.100"
    assert objs[0].find("ParticipantObjectDescription/SOPClass").get("NumberOfInstances") == "3"
    assert objs[1].get("ParticipantObjectID") == "PID-1^^^&1.2.3.4&ISO"


def test_query_carries_the_identifier_base64() -> None:
    """C-FIND: the identifier as received, base64, in ParticipantObjectQuery."""
    root = assert_valid(m.query(PEER, APP, sop_class_uid="1.2", query_bytes=b"\x00\x01<x>", when=WHEN,
                                source_id="X").to_xml())
    assert base64.b64decode(root.find("ParticipantObjectIdentification/ParticipantObjectQuery").text) == b"\x00\x01<x>"


def test_token_user_as_iua_says() -> None:
    """A token's user: UserName alias<sub@iss>, AlternativeUserID the jti; nothing else of the token."""
    root = assert_valid(m.instances_served(USER, APP, [STUDY], transaction=m.RAD_69, when=WHEN,
                                           source_id="X").to_xml())
    user = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"][0]
    assert user.get("UserName") == "jdoe<u-42@https://idp.example.org>"
    assert user.get("AlternativeUserID") == "jti-123"
    assert user.get("UserID") == "u-42"
    assert user.get("NetworkAccessPointID") == "198.51.100.9"


def test_security_alert_codes() -> None:
    """Refused association: 110113 with 110132; TLS failure: 110126."""
    for node_auth, code in ((False, "110132"), (True, "110126")):
        root = assert_valid(m.security_alert(APP, PEER, node_authentication=node_auth, reason="r", subject="s",
                                             when=WHEN, source_id="X").to_xml())
        assert root.find("EventIdentification/EventID").get("csd-code") == "110113"
        assert root.find("EventIdentification/EventTypeCode").get("csd-code") == code


def test_control_characters_cannot_break_the_xml() -> None:
    """Values a peer chose (AE titles, reasons) with control characters still give valid one-line XML."""
    msg = m.security_alert(APP, m.Node("EVIL\x00\x1b\n", "x"), node_authentication=False,
                           reason="a\x07b\nc", subject="\x01", when=WHEN, source_id="X")
    assert_valid(msg.to_xml())


def test_rfc5424_framing() -> None:
    """PRI <85>, version 1, MSGID IHE+RFC-3881, BOM then the XML; octet counting round-trips."""
    xml = m.application_activity(APP, started=True, when=WHEN, source_id="X").to_xml()
    msg = format_message(xml, when=WHEN, hostname="host", app_name="imageshare", procid="12")
    assert msg.startswith(b"<85>1 2026-01-02T03:04:05.678Z host imageshare 12 IHE+RFC-3881 - \xef\xbb\xbf<Audit")
    header, body = split_message(msg)
    assert header[5] == "IHE+RFC-3881" and body == xml
    frames, rest = parse_frames(frame(msg) + frame(b"x") + b"12 abc")
    assert frames == [msg, b"x"] and rest == b"12 abc"
