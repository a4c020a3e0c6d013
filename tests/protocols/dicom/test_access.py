"""AccessPolicy: calling-AE lists per operation and certificate pins, without sockets."""

from __future__ import annotations

import datetime
import hashlib
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imageshare.config import DicomConfig, DicomPeer, load
from imageshare.protocols.dicom.access import AccessPolicy, AccessRefusal, spki_sha256


def _config(**lists: tuple[str, ...]) -> DicomConfig:
    import attrs

    return attrs.evolve(load(None).dicom, **lists)


def _certificate() -> tuple[bytes, bytes]:
    """A self-signed DER certificate and the SHA-256 of its SubjectPublicKeyInfo."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_bytes(serialization.Encoding.DER), hashlib.sha256(spki).digest()


def test_lists_fall_back_to_allowed_calling_aets() -> None:
    """An operation's own list replaces allowed_calling_aets; an empty one allows any AE; an
    AE is admitted when it is allowed at least one operation."""
    policy = AccessPolicy(_config(allowed_calling_aets=("WS",), store_calling_aets=("CT",)))
    assert policy.allows("store", "CT") and not policy.allows("store", "WS")
    assert policy.allows("query", "WS") and policy.allows("retrieve", "WS") and not policy.allows("query", "CT")
    assert policy.admits("CT") and policy.admits("WS") and not policy.admits("OTHER")
    open_retrieve = AccessPolicy(_config(store_calling_aets=("CT",), query_calling_aets=("WS",)))
    assert open_retrieve.admits("ANYONE")  # retrieve has no list: open to any AE


def test_pins() -> None:
    """A pinned AE title needs a certificate whose SPKI SHA-256 is pinned; others do not."""
    der, digest = _certificate()
    other, _ = _certificate()
    assert spki_sha256(der) == digest
    policy = AccessPolicy(_config(), [DicomPeer("PACS", (digest,))])
    assert policy.check_association("PACS", der) is None
    assert policy.check_association("PACS", other) == "client certificate does not match the pin of this AE title"
    assert policy.check_association("PACS", None) == "no client certificate (this AE title is pinned)"
    assert policy.check_association("VIEWER", None) is None


def test_refusals_are_reported_and_logged_throttled() -> None:
    """permits() refuses an AE not on the operation's list: every refusal reaches the
    on_refused callbacks, the log gets one line per AE, address and kind per interval."""
    from twisted.logger import globalLogPublisher

    now = [0.0]
    seen: list[AccessRefusal] = []
    policy = AccessPolicy(_config(store_calling_aets=("CT",)), on_refused=[seen.append], clock=lambda: now[0])
    event: Any = SimpleNamespace(assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="WS", address="10.0.0.9")))
    lines: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(lines.append)
    try:
        assert not policy.permits("store", event)
        assert not policy.permits("store", event)
        now[0] = 11.0
        assert not policy.permits("store", event)
        assert policy.permits("query", event)
    finally:
        globalLogPublisher.removeObserver(lines.append)
    assert seen == [AccessRefusal("WS", "10.0.0.9", "not allowed to store", "store")] * 3
    logged = [e for e in lines if "refused DICOM" in str(e.get("log_format", ""))]
    assert [e["count"] for e in logged] == [1, 2]
