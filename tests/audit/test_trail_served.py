"""The served-image hooks of the audit trail: principals, instances, TLS refusals (pure)."""

from __future__ import annotations

import ssl

from imageshare.audit.identity import ServedRecord, served_record
from imageshare.audit.trail import MemoryAuditTrail, as_principal
from imageshare.auth.tokens import Principal as TokenPrincipal
from imageshare.protocols.dicom.server import _refused_by_tls
from tests.audit.schema import assert_valid

RECORD = ServedRecord("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "PAT-1", "", "Doe^Jane", "ACC1")


def test_token_principal_is_recorded_as_iua_says() -> None:
    """A token's principal is recorded as sub, alias<sub@iss> and its jti; never anything else."""
    trail = MemoryAuditTrail()
    token = TokenPrincipal(issuer="https://idp", subject="alice", jti="j-1", client_id=None,
                           scopes=frozenset(), patient=None, expires=0.0)
    assert as_principal(token) is not None and as_principal(None) is None
    trail.instances_served("WADO", "192.0.2.7", [RECORD], token)
    root = assert_valid(trail.messages[0].to_xml())
    (requestor,) = [p for p in root.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert (requestor.get("UserID"), requestor.get("UserName"), requestor.get("AlternativeUserID"),
            requestor.get("NetworkAccessPointID")) == ("alice", "<alice@https://idp>", "j-1", "192.0.2.7")


def test_served_instance_study_and_patient_are_objects() -> None:
    """A served instance names its study (with the instance in its SOP class), and its patient."""
    trail = MemoryAuditTrail()
    trail.instances_served("JPIP", "192.0.2.7", [RECORD])
    root = assert_valid(trail.messages[0].to_xml())
    assert [i.get("UID") for i in root.iter("Instance")] == ["1.2.3.4"]
    ids = [o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")]
    assert ids == ["1.2.3", "PAT-1"]
    assert root.find("ParticipantObjectIdentification/ParticipantObjectDescription/Accession").get("Number") == "ACC1"


def test_served_record_without_a_catalog_reader_names_the_instance_only() -> None:
    """Without a SQL catalog (a fake), the record still names the instance and its study."""
    row = type("Row", (), {"sop_instance_uid": "1.2.3.4", "sop_class_uid": "1.2", "study_instance_uid": "1.2.3"})()
    assert served_record(object(), row) == ServedRecord("1.2.3.4", "1.2", "1.2.3")


def test_only_tls_refusals_are_node_authentication_failures() -> None:
    """Certificate and protocol errors are audited; timeouts, resets and a peer's EOF are not."""
    assert _refused_by_tls(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert _refused_by_tls(ssl.SSLError(1, "tlsv1 alert unknown ca"))
    assert not _refused_by_tls(ssl.SSLEOFError(8, "EOF"))
    assert not _refused_by_tls(TimeoutError())
    assert not _refused_by_tls(ConnectionResetError())
