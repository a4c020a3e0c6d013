"""
pynetdicom event handlers. They run in association threads, never on the reactor.

The C-STORE handler does the blocking work (check, write, fsync, commit) right in the
association thread and answers only when the instance is durable; the reactor hears about
it afterwards through the bridge. Patient data never reaches the logs at info level: only
UIDs, AE titles and addresses do.
"""

from __future__ import annotations

from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import evt

from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.logsafe import Logger
from imageshare.protocols.dicom.access import NOT_AUTHORIZED, STORE, AccessPolicy, certificate_source
from imageshare.protocols.dicom.bridge import ReactorBridge
from imageshare.store.ingest import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, IngestError, Ingestor, Stored

log = Logger(namespace="imageshare.dicom")

SUCCESS = 0x0000
# JPIP Referenced (Deflate): the pixels are elsewhere (PS3.5 A.6, A.7).
_HEADER_ONLY = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment
    return status


def _peer(event: Any) -> dict[str, Any]:
    assoc = event.assoc
    return {
        "calling_aet": assoc.requestor.ae_title,
        "peer": f"{assoc.requestor.address}:{assoc.requestor.port}",
    }


def handle_echo(event: Any) -> int:
    log.debug("C-ECHO from {calling_aet} at {peer}", **_peer(event))
    return SUCCESS


class StoreHandler:
    """EVT_C_STORE: store durably, then tell the reactor."""

    def __init__(self, ingestor: Ingestor, bridge: ReactorBridge, on_stored: Callable[[Stored], Any],
                 *, access: AccessPolicy | None = None, audit: AuditTrail = NO_AUDIT) -> None:
        self.audit = audit  # the ATNA trail: 110104 for each stored instance, 110113 for refused associations
        self._ingestor = ingestor
        self._bridge = bridge
        self._on_stored = on_stored
        self._access = access  # None: any associated AE may store

    def __call__(self, event: Any) -> Dataset | int:
        request = event.request
        context = event.context
        peer = _peer(event)
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        if self._access is not None and not self._access.permits(STORE, event):
            return _status(NOT_AUTHORIZED, "calling AE title not allowed to store")  # logged by permits
        try:
            if self._bridge.stopped:
                raise IngestError(OUT_OF_RESOURCES, "the server is shutting down")
            if str(context.transfer_syntax) in _HEADER_ONLY:
                # Only a C-GET context can accept these (listener.offer_retrieve_syntaxes):
                # a header-only object must never land in the archive.
                raise IngestError(CANNOT_UNDERSTAND, "JPIP Referenced objects are not stored")
            # A view of pynetdicom's buffer, not a copy: it is only read and written out.
            raw = request.DataSet.getbuffer() if request.DataSet is not None else memoryview(b"")
            stored = self._ingestor.store(
                raw,
                transfer_syntax=str(context.transfer_syntax),
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=sop_instance_uid,
                calling_aet=peer["calling_aet"],
                source_cert=certificate_source(event.assoc),  # "" without TLS
            )
        except IngestError as e:
            log.warn(
                "refused C-STORE of {sop_instance_uid} from {calling_aet} at {peer}: {reason} (status {status:#06x})",
                sop_instance_uid=sop_instance_uid,
                reason=e.comment,
                status=e.status,
                **peer,
            )
            return _status(e.status, e.comment)
        except Exception:
            log.failure("C-STORE of {sop_instance_uid} failed unexpectedly", sop_instance_uid=sop_instance_uid, **peer)
            return _status(CANNOT_UNDERSTAND, "internal error, see the server log")
        log.info(
            "stored {sop_instance_uid} ({size} bytes, generation {generation}) from {calling_aet} at {peer}",
            sop_instance_uid=stored.record.sop_instance_uid,
            size=stored.size,
            generation=stored.generation,
            **peer,
        )
        self.audit.instance_stored(peer["calling_aet"], event.assoc.requestor.address, stored.record,
                                   replaced=stored.generation > 1)
        self._bridge.notify(self._on_stored, stored)
        return SUCCESS


def handle_rejected(event: Any, audit: AuditTrail = NO_AUDIT) -> None:
    log.warn("association from {calling_aet} at {peer} rejected", **_peer(event))
    requestor = event.assoc.requestor
    audit.authorization_refused(requestor.address, f"{requestor.ae_title}@{requestor.address}", "association rejected",
                                user=requestor.ae_title)


def handle_aborted(event: Any) -> None:
    log.warn("association from {calling_aet} at {peer} aborted", **_peer(event))


def handle_established(event: Any) -> None:
    log.debug("association from {calling_aet} at {peer} established", **_peer(event))


def event_handlers(store: StoreHandler) -> list[tuple[Any, Callable[..., Any]]]:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store),
        (evt.EVT_REJECTED, handle_rejected, [store.audit]),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_ESTABLISHED, handle_established),
    ]
