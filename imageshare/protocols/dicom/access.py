"""
Who may do what over DICOM: calling-AE allow-lists per operation and certificate pins.

:class:`AccessPolicy` holds the rules of ``[dicom]`` (``allowed_calling_aets`` and the
``store_``/``query_``/``retrieve_calling_aets`` lists) and ``[dicom_peers]`` (SHA-256 pins
of the SubjectPublicKeyInfo a peer's certificate must carry). It is used twice:

* at association time (:meth:`AccessPolicy.on_requested`, an ``EVT_REQUESTED`` handler,
  before pynetdicom negotiates): a calling AE allowed for no operation, or a pinned peer
  whose client certificate does not match, gets an A-ASSOCIATE-RJ (rejected-permanent,
  service-user, calling AE title not recognised, PS3.8 9.3.4);
* per operation (:meth:`AccessPolicy.permits`, from the C-STORE and Q/R handlers): an AE
  allowed to associate but not to this operation gets ``0x0124`` Refused: Not Authorized
  (PS3.7 C.5.x general status, listed for C-STORE, C-FIND, C-GET and C-MOVE).

Every refusal is logged at warning level, at most one line per calling AE, address and
kind every :data:`LOG_INTERVAL` seconds (:class:`~imageshare.logthrottle.RefusalLog`), and
passed, unthrottled, to the ``on_refused`` callbacks (the audit trail hooks in there).
Handlers run in pynetdicom's threads: so do the callbacks.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any, Callable, Iterable, Mapping

import attrs

from imageshare.config import DicomConfig, DicomPeer
from imageshare.logsafe import Logger
from imageshare.logthrottle import RefusalLog

log = Logger(namespace="imageshare.dicom")

#: PS3.7 C.5.x "Refused: Not Authorized", in C-STORE, C-FIND, C-GET and C-MOVE responses.
NOT_AUTHORIZED = 0x0124
#: Seconds between two log lines about refusals of one kind for one calling AE and address.
LOG_INTERVAL = 10.0

STORE = "store"
QUERY = "query"
RETRIEVE = "retrieve"
OPERATIONS = (STORE, QUERY, RETRIEVE)


@attrs.frozen
class AccessRefusal:
    """A refused association (``operation`` is ``None``) or operation, for the audit trail."""

    calling_aet: str
    address: str
    reason: str
    operation: str | None = None  # store, query, retrieve; None: the association


def spki_sha256(der_certificate: bytes) -> bytes:
    """The SHA-256 of a DER certificate's SubjectPublicKeyInfo (what ``[dicom_peers]`` pins)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_der_x509_certificate(der_certificate).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def peer_certificate(assoc: Any) -> bytes | None:
    """The DER certificate the peer of ``assoc`` presented over TLS, or ``None``."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        der = getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    return bytes(der) if der else None


def certificate_source(assoc: Any) -> str:
    """``sha256:<hex>`` of the peer certificate's SPKI, or ``""`` without TLS."""
    der = peer_certificate(assoc)
    return f"sha256:{spki_sha256(der).hex()}" if der else ""


class AccessPolicy:
    """
    The calling-AE and certificate rules of one listener.

    Parameters
    ----------
    config
        ``[dicom]``: the allow-lists.
    peers
        ``[dicom_peers]``: pins per AE title.
    on_refused
        Called with an :class:`AccessRefusal` for every refusal (in pynetdicom's thread).
    clock
        Seconds, for the log throttle.
    """

    def __init__(
        self,
        config: DicomConfig,
        peers: Iterable[DicomPeer] = (),
        *,
        on_refused: Iterable[Callable[[AccessRefusal], Any]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowed = {op: frozenset(config.calling_aets(op)) for op in OPERATIONS}
        self.pins: Mapping[str, tuple[bytes, ...]] = {p.ae_title: p.pins for p in peers}
        self.on_refused: list[Callable[[AccessRefusal], Any]] = list(on_refused)
        self._log = RefusalLog(log, LOG_INTERVAL, clock=clock)

    def allows(self, operation: str, calling_aet: str) -> bool:
        """Whether ``calling_aet`` may ``operation`` (an empty list allows any AE)."""
        allowed = self._allowed[operation]
        return not allowed or calling_aet.strip() in allowed

    def admits(self, calling_aet: str) -> bool:
        """Whether ``calling_aet`` may associate: it is allowed at least one operation."""
        return any(self.allows(op, calling_aet) for op in OPERATIONS)

    def check_association(self, calling_aet: str, certificate: bytes | None) -> str | None:
        """Why an association from ``calling_aet`` presenting ``certificate`` (DER) is
        refused, or ``None``."""
        aet = calling_aet.strip()
        if not self.admits(aet):
            return "calling AE title not allowed"
        pins = self.pins.get(aet)
        if pins:
            if certificate is None:
                return "no client certificate (this AE title is pinned)"
            digest = spki_sha256(certificate)
            if not any(hmac.compare_digest(digest, pin) for pin in pins):
                return "client certificate does not match the pin of this AE title"
        return None

    # -- pynetdicom adapters -----------------------------------------------------------

    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: reject the association before negotiation if it is refused."""
        assoc = event.assoc
        calling_aet = str(assoc.requestor.primitive.calling_ae_title or "")
        reason = self.check_association(calling_aet, peer_certificate(assoc))
        if reason is None:
            return
        # As pynetdicom rejects an AE title of require_calling_aet: rejected-permanent,
        # service-user, calling AE title not recognised (PS3.8 Table 9-21).
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        self.refused(AccessRefusal(calling_aet.strip(), _address(assoc), reason))
        assoc.kill()

    def permits(self, operation: str, event: Any) -> bool:
        """For a DIMSE handler: whether the requestor may ``operation``; a refusal is logged
        and reported, and the handler answers :data:`NOT_AUTHORIZED`."""
        calling_aet = str(event.assoc.requestor.ae_title or "").strip()
        if self.allows(operation, calling_aet):
            return True
        self.refused(AccessRefusal(calling_aet, _address(event.assoc), f"not allowed to {operation}", operation))
        return False

    def refused(self, refusal: AccessRefusal) -> None:
        """Log (throttled) and report a refusal to every ``on_refused`` callback."""
        what = f"{refusal.operation}" if refusal.operation else "association"
        self._log.warn(
            (refusal.calling_aet, refusal.address, what),
            "refused DICOM {what} from {calling_aet} at {address}: {reason}",
            what=what,
            calling_aet=refusal.calling_aet,
            address=refusal.address,
            reason=refusal.reason,
        )
        for callback in self.on_refused:
            try:
                callback(refusal)
            except Exception:
                log.failure("on_refused callback failed")


def _address(assoc: Any) -> str:
    return str(getattr(assoc.requestor, "address", "") or "")
