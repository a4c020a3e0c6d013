"""
The Query/Retrieve SCP: pynetdicom handlers for C-FIND, C-GET and C-MOVE.

They run in pynetdicom's association threads (already off the reactor) and read the
catalog there through the thread's own connection. pynetdicom drives the retrieves: a
handler yields the number of sub-operations, then one (status, data set) pair per
instance, and pynetdicom sends each data set in a C-STORE sub-operation, counts the
outcomes and lists the failed instances in the final response.

Which form of an instance goes out depends on what the storage SCP accepted for its SOP
class: the JPIP Referenced header (1.2.840.10008.1.2.4.94, built by
:mod:`imageshare.dicom.derived`) when .94 was accepted and the instance is streamable,
else the archived original when its syntax (or a native one pynetdicom can convert it to)
was accepted, else the pixels decoded to Explicit VR Little Endian. For C-GET the
contexts are those the SCU proposed with the SCP role (the listener accepts .94 only in a
context that proposes it alone); for C-MOVE we propose, per SOP class, the original
compressed syntax, Explicit/Implicit VR Little Endian, and, only to a destination
configured with ``:jpip``, .94, each in a presentation context of its own so that the
destination accepts or rejects them independently (PS3.17 GG). Accepting .94 in
negotiation proves nothing: Orthanc and dcmtk accept it and then abort the association
when such an object arrives.

Every C-STORE sub-operation goes through a :class:`StoreSender`, which logs each failed
one (SOP Instance UID, transfer syntax, destination, the peer's status) and makes sure
pynetdicom counts it as what it was. For C-MOVE, pynetdicom opens the association to the
destination with the listener AE's ``associate``; :class:`RetrieveAE` hands it to a
:class:`DestinationLink`, which re-associates once when the destination aborts
mid-retrieve. The sub-operation in flight then counts as failed (the destination may
have aborted because of that very object, so it is not sent again; if it was a JPIP
header, the new association does not propose .94); if the second association is lost
too, the retrieve ends with the rest counted as failed.

C-FIND answers relational queries (PS3.4 C.4.1.2.2.2: no unique keys required above the
level) when the requestor negotiated them for its FIND SOP class (SOP Class Extended
Negotiation, relational-queries byte 1, PS3.4 C.5.1.1); otherwise the hierarchical
rules apply.

Bad identifiers get the information model's failure statuses with an Error Comment.
pynetdicom asks a retrieve handler for its sub-operation count before any status, so a
refused C-GET or C-MOVE reports one failed sub-operation; and a refused C-MOVE opens (and
releases) the association to its destination first, because pynetdicom associates before
asking for the first status. An unknown Move Destination is refused (0xA801) without that.

TLS destinations (``host:port:tls``) are reached with the context ``tls_context`` gives:
by default the system's trust store and no client certificate; the service passes one
built from the listener's own certificate and CA (see :func:`client_tls_context`).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Mapping

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from imageshare.audit.trail import NO_AUDIT, AuditTrail
from imageshare.config import DicomDestination
from imageshare.dicom import derived
from imageshare.endpoints import parse_dicom_endpoint
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.protocols.dicom.access import (
    NOT_AUTHORIZED,
    QUERY,
    RETRIEVE,
    AccessPolicy,
    peer_certificate,
    spki_sha256,
)
from imageshare.store import query
from imageshare.store.archive import Archive
from imageshare.store.query import QueryError
from imageshare.store.records import State

log = Logger(namespace="imageshare.dicom")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # one or more optional keys were not supported
CANCEL = 0xFE00
INTERNAL_ERROR = 0xC000
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702
SUB_OPERATIONS_WITH_FAILURES = 0xB000  # Warning: one or more sub-operations failed
_STORE_WARNING = 0xB000  # what pynetdicom must count as a warning sub-operation
_STORE_FAILURE = 0x0110  # ... as a failed one (Processing failure)

# The FIND SOP classes whose extended negotiation can ask for relational queries.
_FIND_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"})
_MAX_APP_INFO = 8  # bytes of Service Class Application Information we answer (5 defined)

JPIP = "jpip"
ORIGINAL = "original"
NATIVE = "native"

_LITTLE_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255


def choose_form(original_syntax: str, streamable: bool, accepted: Iterable[str]) -> str | None:
    """
    How to send an instance, given the transfer syntaxes accepted for its SOP class.

    Returns :data:`JPIP`, :data:`ORIGINAL`, :data:`NATIVE` or ``None`` (nothing fits).
    """
    accepted = {UID(ts) for ts in accepted}
    original = UID(original_syntax)
    if streamable and derived.JPIP_REFERENCED in accepted:
        return JPIP
    if original in accepted or (original in _LITTLE_NATIVE and accepted & _LITTLE_NATIVE):
        return ORIGINAL  # as is, or converted between native syntaxes by pynetdicom
    if accepted & {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
        return NATIVE
    return None


def move_contexts(matches: Iterable[query.Match], *, jpip: bool = False) -> list[PresentationContext]:
    """The storage contexts to propose to a C-MOVE destination, at most 128.

    Per SOP class: one per compressed original syntax, one native (Explicit and Implicit
    VR Little Endian), and, if ``jpip`` (the destination is configured to want headers),
    one with JPIP Referenced alone when an instance can stream.
    """
    wanted: dict[str, list[UID]] = {}
    for m in matches:
        syntaxes = wanted.setdefault(m.sop_class_uid, [])
        ts = UID(m.transfer_syntax_uid)
        if ts not in _LITTLE_NATIVE and ts not in syntaxes:
            syntaxes.append(ts)
        if jpip and m.state is State.STREAMABLE and derived.JPIP_REFERENCED not in syntaxes:
            syntaxes.append(derived.JPIP_REFERENCED)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        contexts.extend(build_context(sop_class, [ts]) for ts in syntaxes)
    return contexts[:_MAX_CONTEXTS]


def storage_syntaxes(contexts: Iterable[Any]) -> dict[str, set[str]]:
    """Transfer syntaxes accepted per SOP class, over the contexts where we are the SCU."""
    accepted: dict[str, set[str]] = {}
    for cx in contexts:
        if cx.as_scu:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


def client_tls_context(listen: str, config_dir: Path | None) -> ssl.SSLContext:
    """TLS for C-MOVE destinations: verify the peer with the system's CAs and the listener's
    ``caCerts`` if any; present the listener's certificate if it has one."""
    endpoint = parse_dicom_endpoint(listen)

    def resolve(name: str) -> str:
        p = Path(name)
        return str(p if p.is_absolute() or config_dir is None else config_dir / p)

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if endpoint.ca_certs:
        context.load_verify_locations(resolve(endpoint.ca_certs))
    if endpoint.private_key:
        context.load_cert_chain(resolve(endpoint.cert_key or endpoint.private_key), resolve(endpoint.private_key))
    return context


def relational_reply(app_info: Mapping[str, bytes]) -> dict[str, bytes]:
    """The SOP Class Extended Negotiation answer (PS3.4 C.5.1.1.2): relational queries for
    the Q/R FIND SOP classes when asked for; no other extended behaviour (combined
    date-time, fuzzy matching, time zones) is offered."""
    reply: dict[str, bytes] = {}
    for sop_class, info in app_info.items():
        if str(sop_class) in _FIND_CLASSES and info:
            size = min(len(info), _MAX_APP_INFO)
            reply[sop_class] = bytes([1 if info[0] == 1 else 0]) + bytes(size - 1)
    return reply


def relational_negotiated(event: Any) -> bool:
    """Whether the association accepted relational queries for the request's SOP class."""
    try:
        info = event.assoc.acceptor.sop_class_extended.get(str(event.request.AffectedSOPClassUID))
    except AttributeError:
        return False
    return bool(info) and info[0] == 1


def _outcome(status: int) -> str:
    """The outcome of a C-STORE status: success, warning or failure (PS3.4 B.2.3, PS3.7 C)."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"  # Cancel (0xFE00) included: the instance was not stored


class SubOperationFailed(Exception):
    """A C-STORE sub-operation not sent, or that got no status; pynetdicom counts it as failed."""


class NoResponse(SubOperationFailed):
    """No C-STORE response: the association is over (aborted, closed, or timed out)."""


def _no_response(assoc: Association) -> str:
    # peek_next_pdu: the association's thread may already have taken the abort off the queue.
    try:
        if assoc.acse.is_aborted("a-abort"):
            return "no response: A-ABORT from the destination"
        if assoc.acse.is_aborted("a-p-abort"):
            return "no response: the connection closed"
    except Exception:  # only a better message is at stake
        pass
    return "no response: the association ended" if not assoc.is_established else "no response"


class StoreSender:
    """
    Sends the C-STORE sub-operations of one C-GET or C-MOVE as pynetdicom asks for them.

    Logs every sub-operation that fails (warn) or ends with a warning (info) with the SOP
    Instance UID, the transfer syntax, the destination AE and the peer's status, and keeps
    pynetdicom's counts true: a status it does not know, or files under another category
    (0xFE00, 0x0001, 0xB0xx other than B000/B006/B007), is replaced by one of the same
    outcome; a missing response (an abort) is raised as :class:`NoResponse`, and an
    instance that cannot be sent (:func:`_unsendable`) as :class:`SubOperationFailed`.
    Runs in the association's thread, like pynetdicom.
    """

    def __init__(self, operation: str, destination: str, peer: Mapping[str, Any]) -> None:
        self.operation = operation  # "C-GET" or "C-MOVE"
        self.destination = destination
        self.peer = dict(peer)  # calling_aet and peer of the retrieve's requestor
        self.completed = 0
        self.warnings = 0
        self.failed: list[str] = []  # SOP Instance UIDs, as pynetdicom lists them

    def send(self, assoc: Association, dataset: Dataset, **kwargs: Any) -> Dataset:
        uid = str(dataset.get("SOPInstanceUID", ""))
        syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "") or "")
        if isinstance(dataset, _Unsendable):
            self._failed(uid, dataset.archived_syntax, None, f"not sent: {dataset.reason}")
            raise SubOperationFailed(f"{uid} not sent")
        try:
            # The class's method: for a C-GET, the instance's is this sender.
            rsp = Association.send_c_store(assoc, dataset, **kwargs)
        except Exception as e:  # pynetdicom raises several types (no context, encoding, no association)
            self._failed(uid, syntax, None, f"not sent: {type(e).__name__}: {e}")
            raise
        if "Status" not in rsp:
            why = _no_response(assoc)
            self._failed(uid, syntax, None, why)
            raise NoResponse(f"{uid}: {why}")
        status = int(rsp.Status)
        outcome = _outcome(status)
        known = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
        if known[0].lower() != outcome:
            rsp.Status = {"warning": _STORE_WARNING, "failure": _STORE_FAILURE}.get(outcome, status)
        if outcome == "failure":
            self._failed(uid, syntax, status, f"status {status:#06x} {known[1] or '(unknown)'}".rstrip())
            log.debug("{operation} sub-operation {sop_instance_uid}: error comment {comment}",
                      operation=self.operation, sop_instance_uid=uid, comment=str(rsp.get("ErrorComment", "")))
        elif outcome == "warning":
            self.warnings += 1
            log.info("{operation} sub-operation for {calling_aet}: {destination} stored {sop_instance_uid}"
                     " ({transfer_syntax}) with warning status {status:#06x}",
                     operation=self.operation, destination=self.destination, sop_instance_uid=uid,
                     transfer_syntax=syntax, status=status, **self.peer)
        else:
            self.completed += 1
        return rsp

    def _failed(self, uid: str, syntax: str, status: int | None, reason: str) -> None:
        self.failed.append(uid)
        log.warn("{operation} sub-operation for {calling_aet} failed: {sop_instance_uid} ({transfer_syntax})"
                 " to {destination}: {reason}",
                 operation=self.operation, sop_instance_uid=uid, transfer_syntax=syntax or "unknown",
                 destination=self.destination, status=status, reason=reason, **self.peer)


class DestinationLink:
    """
    The association to a C-MOVE destination, in the shape pynetdicom uses it
    (``is_established``, ``send_c_store``, ``release``), made again once when the
    destination aborts (or otherwise ends) it mid-retrieve. If it ended while a JPIP
    Referenced header was in flight, the new association does not propose .94: that is
    how Orthanc and dcmtk answer such an object, and an original is always storable.
    """

    def __init__(self, sender: StoreSender, *, reassociations: int = 1) -> None:
        self.sender = sender
        self._left = reassociations
        self._connect: Callable[[bool], Association] | None = None
        self._assoc: Association | None = None
        # The association that left a C-STORE unanswered: over, even while its thread has
        # not yet caught up with the abort and it still says it is established.
        self._spent: Association | None = None
        self._without_jpip = False

    def open(self, connect: Callable[[bool], Association]) -> Any:
        """Associate (``connect(without_jpip)``); what pynetdicom gets back from
        ``ae.associate``: this link, or the failed association (pynetdicom then reports
        0xA801 and closes its socket)."""
        self._connect = connect
        self._assoc = connect(False)
        return self if self._assoc.is_established else self._assoc

    @property
    def is_established(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    @property
    def lost(self) -> bool:
        """The association is gone and may not be made again (re-associates if it may)."""
        return self.current() is None

    def current(self) -> Association | None:
        """The established association, re-associating if it was lost and may be."""
        if self._assoc is None or (self._assoc.is_established and self._assoc is not self._spent):
            return self._assoc
        if self._left <= 0 or self._connect is None:
            return None
        self._left -= 1
        log.warn("the C-MOVE association to {destination} for {calling_aet} ended; associating again{without}",
                 destination=self.sender.destination, without=" without JPIP Referenced" if self._without_jpip else "",
                 **self.sender.peer)
        self._assoc = self._connect(self._without_jpip)
        if not self._assoc.is_established:
            log.warn("cannot associate again with {destination} for {calling_aet}",
                     destination=self.sender.destination, **self.sender.peer)
            return None
        return self._assoc

    def accepted(self) -> dict[str, set[str]]:
        """Syntaxes the destination accepted per SOP class, on the current association."""
        assoc = self.current()
        return storage_syntaxes(assoc.accepted_contexts) if assoc is not None else {}

    def send_c_store(self, dataset: Dataset, **kwargs: Any) -> Dataset:
        assoc = self.current()
        if assoc is None:
            uid = str(dataset.get("SOPInstanceUID", ""))
            self.sender.failed.append(uid)
            raise SubOperationFailed(f"{uid}: no association with {self.sender.destination}")
        try:
            return self.sender.send(assoc, dataset, **kwargs)
        except NoResponse:
            self._spent = assoc
            meta = getattr(dataset, "file_meta", None)
            self._without_jpip |= getattr(meta, "TransferSyntaxUID", None) == derived.JPIP_REFERENCED
            raise

    def release(self) -> None:
        if self._assoc is not None and self._assoc.is_established and self._assoc is not self._spent:
            self._assoc.release()


class RetrieveAE(AE):
    """
    The listener's AE. pynetdicom opens a C-MOVE's association to the destination with
    ``ae.associate(host, port, **kwargs)``, the kwargs being those the C-MOVE handler
    yielded; given a ``link``, the association is made (and remade) through it.
    """

    def associate(self, addr: Any, port: int, *args: Any, link: DestinationLink | None = None,
                  pins: tuple[bytes, ...] = (), **kwargs: Any) -> Any:
        if link is None:
            return super().associate(addr, port, *args, **kwargs)

        def connect(without_jpip: bool) -> Association:
            kw = dict(kwargs)
            if without_jpip and kw.get("contexts"):
                kw["contexts"] = [cx for cx in kw["contexts"] if derived.JPIP_REFERENCED not in cx.transfer_syntax]
            assoc = AE.associate(self, addr, port, *args, **kw)
            if pins and assoc.is_established and not _pinned(assoc, pins):
                # Nothing has been sent yet: abort, and pynetdicom answers 0xA801.
                log.warn("C-MOVE destination {destination} at {address}:{port}: its certificate does not"
                         " match its pin in [dicom_peers]; association aborted",
                         destination=str(kw.get("ae_title", "")), address=str(addr), port=port)
                assoc.abort()
            return assoc

        return link.open(connect)


def _pinned(assoc: Association, pins: tuple[bytes, ...]) -> bool:
    """Whether the peer of ``assoc`` presented a certificate whose SPKI SHA-256 is pinned."""
    der = peer_certificate(assoc)
    return der is not None and spki_sha256(der) in pins


class _NotConnected:
    """Stands for the destination association of a C-MOVE refused before any connection:
    pynetdicom only asks it ``is_established`` and ``release()`` before sending our status."""

    is_established = True

    def release(self) -> None:
        pass


class RefusedLink:
    """A link that never connects: a C-MOVE refused with a status of ours (pynetdicom
    associates before it asks for one) costs the destination nothing."""

    def open(self, connect: Callable[[bool], Association]) -> Any:
        return _NotConnected()


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment
    return status


class _Unsendable(Dataset):
    """Stands for an instance that cannot be sent: :class:`StoreSender` logs ``reason`` and
    raises, and pynetdicom counts the sub-operation as failed and lists the UID."""

    def __init__(self, match: query.Match, reason: str) -> None:
        super().__init__()
        self.SOPInstanceUID = match.sop_instance_uid
        self.reason = reason
        self.archived_syntax = match.transfer_syntax_uid


def _unsendable(match: query.Match, reason: str) -> Dataset:
    return _Unsendable(match, reason)


def _identifier(event: Any) -> Dataset:
    try:
        return event.identifier  # type: ignore[no-any-return]
    except Exception as e:  # pydicom raises many types for undecodable bytes
        raise QueryError(query.UNABLE_TO_PROCESS, f"cannot decode the identifier: {type(e).__name__}") from None


def _query_of(event: Any) -> tuple[str, bytes]:
    # The C-FIND identifier exactly as received, for the audit trail (PS3.15 A.5.3.10).
    identifier = event.request.Identifier
    return str(event.request.AffectedSOPClassUID or ""), identifier.getvalue() if identifier is not None else b""


def _audit_records(event: Any, matches: Iterable[query.Match]) -> list[Any]:
    # Study and patient as the request named them; the SOP classes from what matched.
    try:
        identifier = event.identifier
        base = {"study_instance_uid": str(identifier.get("StudyInstanceUID", "") or ""),
                "patient_id": str(identifier.get("PatientID", "") or "")}
    except Exception:
        base = {"study_instance_uid": "", "patient_id": ""}
    return [SimpleNamespace(sop_class_uid=m.sop_class_uid, **base) for m in matches]


def _peer(event: Any) -> dict[str, Any]:
    requestor = event.assoc.requestor
    return {"calling_aet": requestor.ae_title, "peer": f"{requestor.address}:{requestor.port}"}


class QueryRetrieveSCP:
    """EVT_C_FIND, EVT_C_GET and EVT_C_MOVE handlers over the catalog and the archive."""

    def __init__(
        self,
        catalog: ICatalog,
        archive: Archive,
        *,
        ae_title: str,
        public_url: str,
        destinations: Iterable[DicomDestination] = (),
        max_find_results: int = 10_000,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
        access: AccessPolicy | None = None,
        audit: AuditTrail = NO_AUDIT,
    ) -> None:
        self._audit = audit  # the ATNA trail: 110112 per C-FIND, 110102 and 110104 per C-GET/C-MOVE
        self._catalog = catalog
        self._archive = archive
        self._ae_title = ae_title
        self._public_url = public_url
        self._destinations = {d.ae_title: d for d in destinations}
        self._max_find_results = max_find_results
        self._tls_context = tls_context or ssl.create_default_context
        self._access = access  # None: any associated AE may query and retrieve

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The (event, handler) pairs to bind on the listener's AE (a :class:`RetrieveAE`)."""
        return [(evt.EVT_C_FIND, self.find), (evt.EVT_C_GET, self.get), (evt.EVT_C_MOVE, self.move),
                (evt.EVT_SOP_EXTENDED, self.sop_extended)]

    def sop_extended(self, event: Any) -> dict[str, bytes]:
        """EVT_SOP_EXTENDED, during negotiation: see :func:`relational_reply`."""
        return relational_reply(event.app_info)

    def _model(self, event: Any) -> str:
        model = query.information_model(event.request.AffectedSOPClassUID)
        if model is None:  # pynetdicom routes only the contexts we support; be safe anyway
            raise QueryError(query.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unsupported SOP class")
        return model

    # -- C-FIND ------------------------------------------------------------------------

    def find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        peer = _peer(event)
        sent = 0
        relational = False
        if self._access is not None and not self._access.permits(QUERY, event):
            yield _status(NOT_AUTHORIZED, "calling AE title not allowed to query"), None
            return
        try:
            model = self._model(event)
            relational = relational_negotiated(event)
            # The rows are fetched inside the block: the connection goes back to the pool
            # before the responses are sent.
            with self._catalog.reader() as conn:  # type: ignore[attr-defined]
                result = query.find(
                    conn,
                    model,
                    _identifier(event),
                    retrieve_ae_title=self._ae_title,
                    limit=self._max_find_results,
                    relational=relational,
                )
            pending = PENDING_WARNING if result.unsupported else PENDING
            for response in result.responses:
                if event.is_cancelled:
                    log.info("C-FIND from {calling_aet} at {peer} cancelled after {count} match(es)",
                             count=sent, **peer)
                    yield CANCEL, None
                    return
                sent += 1
                yield pending, response
        except QueryError as e:
            log.warn("refused C-FIND from {calling_aet} at {peer}: {reason} (status {status:#06x})",
                     reason=e.comment, status=e.status, **peer)
            yield _status(e.status, e.comment), None
            return
        except Exception:
            log.failure("C-FIND from {calling_aet} at {peer} failed unexpectedly", **peer)
            yield _status(INTERNAL_ERROR, "internal error, see the server log"), None
            return
        log.info("C-FIND ({model} root{relational}) from {calling_aet} at {peer}: {count} match(es)",
                 model=model.lower(), relational=", relational" if relational else "", count=sent, **peer)
        self._audit.query(peer["calling_aet"], event.assoc.requestor.address, *_query_of(event))

    # -- C-GET and C-MOVE --------------------------------------------------------------

    def _resolve(self, event: Any) -> list[query.Match]:
        with self._catalog.reader() as conn:  # type: ignore[attr-defined]
            return query.resolve(conn, self._model(event), _identifier(event))

    def get(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
        if self._access is not None and not self._access.permits(RETRIEVE, event):
            yield 1
            yield _status(NOT_AUTHORIZED, "calling AE title not allowed to retrieve"), None
            return
        try:
            matches = self._resolve(event)
        except QueryError as e:
            log.warn("refused C-GET from {calling_aet} at {peer}: {reason} (status {status:#06x})",
                     reason=e.comment, status=e.status, **peer)
            yield 1
            yield _status(e.status, e.comment), None
            return
        log.info("C-GET of {count} instance(s) for {calling_aet} at {peer}", count=len(matches), **peer)
        requestor = event.assoc.requestor
        audit_args = (requestor.ae_title, requestor.address, requestor.ae_title, requestor.address,
                      _audit_records(event, matches))
        self._audit.transfer_started(*audit_args)
        yield len(matches)
        accepted = storage_syntaxes(event.assoc.accepted_contexts)
        # pynetdicom sends the sub-operations itself with assoc.send_c_store and shows this
        # handler none of their outcomes: route them through a sender while this C-GET runs.
        assoc = event.assoc
        sender = StoreSender("C-GET", str(peer["calling_aet"]), peer)
        assoc.send_c_store = lambda dataset, **kw: sender.send(assoc, dataset, **kw)  # type: ignore[method-assign]
        try:
            yield from self._sub_operations(event, matches, lambda: accepted)
        finally:
            del assoc.send_c_store  # back to the class's method
        self._audit.instances_sent(*audit_args)

    def move(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
        if self._access is not None and not self._access.permits(RETRIEVE, event):
            yield "0.0.0.0", 0, {"link": RefusedLink()}  # nothing is connected to
            yield 1
            yield _status(NOT_AUTHORIZED, "calling AE title not allowed to retrieve"), None
            return
        destination = self._destinations.get(str(event.move_destination or "").strip())
        if destination is None:
            log.warn("refused C-MOVE from {calling_aet} at {peer}: unknown destination {destination}",
                     destination=str(event.move_destination or ""), **peer)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            matches = self._resolve(event)
        except QueryError as e:
            log.warn("refused C-MOVE from {calling_aet} at {peer}: {reason} (status {status:#06x})",
                     reason=e.comment, status=e.status, **peer)
            yield destination.host, destination.port, self._association_args(destination, [])
            yield 1
            yield _status(e.status, e.comment), None
            return
        link = DestinationLink(StoreSender("C-MOVE", destination.ae_title, peer))
        args = self._association_args(destination, move_contexts(matches, jpip=destination.jpip))
        pins = self._access.pins.get(destination.ae_title, ()) if self._access is not None else ()
        yield destination.host, destination.port, {**args, "link": link, "pins": pins}
        log.info("C-MOVE of {count} instance(s) to {destination} for {calling_aet} at {peer}",
                 count=len(matches), destination=destination.ae_title, **peer)
        requestor = event.assoc.requestor
        audit_args = (requestor.ae_title, requestor.address, destination.ae_title, destination.host,
                      _audit_records(event, matches))
        self._audit.transfer_started(*audit_args)
        yield len(matches)
        yield from self._sub_operations(event, matches, link.accepted, link)
        self._audit.instances_sent(*audit_args)

    def _association_args(self, destination: DicomDestination, contexts: list[PresentationContext]) -> dict[str, Any]:
        args: dict[str, Any] = {"contexts": contexts or [build_context("1.2.840.10008.1.1")]}  # Verification
        if destination.tls:
            args["tls_args"] = (self._tls_context(), destination.host)
        return args

    def _sub_operations(
        self,
        event: Any,
        matches: list[query.Match],
        accepted: Callable[[], Mapping[str, set[str]]],
        link: DestinationLink | None = None,
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        for index, match in enumerate(matches):
            if event.is_cancelled:
                log.info("retrieve for {calling_aet} cancelled", **_peer(event))
                yield CANCEL, None
                return
            syntaxes = accepted().get(match.sop_class_uid, set())  # may associate again (C-MOVE)
            if link is not None and link.lost:
                yield self._give_up(event, link, matches[index:])
                return
            yield PENDING, self._prepare(match, syntaxes)

    def _give_up(self, event: Any, link: DestinationLink, rest: list[query.Match]) -> tuple[Dataset, Dataset]:
        """The final response once the destination is gone for good: pynetdicom adds the
        sub-operations not attempted to the failed ones."""
        sender = link.sender
        log.warn("C-MOVE to {destination} for {calling_aet} at {peer} ends: the association was lost again;"
                 " {count} sub-operation(s) not attempted", destination=sender.destination, count=len(rest),
                 **_peer(event))
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = sender.failed + [m.sop_instance_uid for m in rest]
        done = sender.completed + sender.warnings
        return _status(SUB_OPERATIONS_WITH_FAILURES if done else UNABLE_TO_PERFORM_SUB_OPERATIONS), identifier

    def _prepare(self, match: query.Match, accepted: set[str]) -> Dataset:
        """The data set to send for ``match``, or one pynetdicom will count as failed."""
        uid = match.sop_instance_uid
        frames = self._catalog.frames(uid) if match.state is State.STREAMABLE else []
        form = choose_form(match.transfer_syntax_uid, bool(frames), accepted)
        if form is None:
            fits = ", ".join(sorted(accepted)) or "none"
            return _unsendable(match, f"no accepted transfer syntax fits (accepted: {fits})")
        try:
            original = derived.read_part10(self._archive.path(match.path).read_bytes())
        except (OSError, ValueError, InvalidDicomError) as e:
            return _unsendable(match, f"cannot read it from the archive: {e}")
        try:
            if form == JPIP:
                try:
                    return derived.jpip_referenced(original, frames, derived.jpip_url(self._public_url, uid))
                except derived.DerivationError as e:
                    log.warn("cannot send {sop_instance_uid} as JPIP Referenced: {reason}",
                             sop_instance_uid=uid, reason=e)
                    form = choose_form(match.transfer_syntax_uid, False, accepted)
            if form == NATIVE:
                return derived.native(original)
        except derived.DerivationError as e:
            return _unsendable(match, f"cannot decode it: {e}")
        return original if form == ORIGINAL else _unsendable(match, "no accepted transfer syntax fits")
