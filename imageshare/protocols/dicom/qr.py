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
contexts are those the SCU proposed with the SCP role; for C-MOVE we propose, per SOP
class, the original compressed syntax, Explicit/Implicit VR Little Endian, and .94 each in
a presentation context of its own so that the destination accepts or rejects them
independently (PS3.17 GG).

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
from typing import Any, Callable, Iterable, Iterator, Mapping

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from imageshare.config import DicomDestination
from imageshare.dicom import derived
from imageshare.endpoints import parse_dicom_endpoint
from imageshare.interfaces import ICatalog
from imageshare.logsafe import Logger
from imageshare.store import query
from imageshare.store.archive import Archive
from imageshare.store.query import QueryError
from imageshare.store.records import State

log = Logger(namespace="imageshare.dicom")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # one or more optional keys were not supported
CANCEL = 0xFE00
INTERNAL_ERROR = 0xC000

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


def move_contexts(matches: Iterable[query.Match]) -> list[PresentationContext]:
    """The storage contexts to propose to a C-MOVE destination, at most 128.

    Per SOP class: one per compressed original syntax, one native (Explicit and Implicit
    VR Little Endian), and one with JPIP Referenced alone when an instance can stream.
    """
    wanted: dict[str, list[UID]] = {}
    for m in matches:
        syntaxes = wanted.setdefault(m.sop_class_uid, [])
        ts = UID(m.transfer_syntax_uid)
        if ts not in _LITTLE_NATIVE and ts not in syntaxes:
            syntaxes.append(ts)
        if m.state is State.STREAMABLE and derived.JPIP_REFERENCED not in syntaxes:
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


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment
    return status


def _unsendable(match: query.Match) -> Dataset:
    # pynetdicom counts a sub-operation as failed, and lists its UID, when sending the
    # data set raises; without a SOP Class UID send_c_store raises before sending anything.
    ds = Dataset()
    ds.SOPInstanceUID = match.sop_instance_uid
    return ds


def _identifier(event: Any) -> Dataset:
    try:
        return event.identifier  # type: ignore[no-any-return]
    except Exception as e:  # pydicom raises many types for undecodable bytes
        raise QueryError(query.UNABLE_TO_PROCESS, f"cannot decode the identifier: {type(e).__name__}") from None


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
    ) -> None:
        self._catalog = catalog
        self._archive = archive
        self._ae_title = ae_title
        self._public_url = public_url
        self._destinations = {d.ae_title: d for d in destinations}
        self._max_find_results = max_find_results
        self._tls_context = tls_context or ssl.create_default_context

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The (event, handler) pairs to bind on the listener's AE."""
        return [(evt.EVT_C_FIND, self.find), (evt.EVT_C_GET, self.get), (evt.EVT_C_MOVE, self.move)]

    def _model(self, event: Any) -> str:
        model = query.information_model(event.request.AffectedSOPClassUID)
        if model is None:  # pynetdicom routes only the contexts we support; be safe anyway
            raise QueryError(query.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unsupported SOP class")
        return model

    # -- C-FIND ------------------------------------------------------------------------

    def find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        peer = _peer(event)
        sent = 0
        try:
            model = self._model(event)
            # The rows are fetched inside the block: the connection goes back to the pool
            # before the responses are sent.
            with self._catalog.reader() as conn:  # type: ignore[attr-defined]
                result = query.find(
                    conn,
                    model,
                    _identifier(event),
                    retrieve_ae_title=self._ae_title,
                    limit=self._max_find_results,
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
        log.info("C-FIND ({model} root) from {calling_aet} at {peer}: {count} match(es)",
                 model=model.lower(), count=sent, **peer)

    # -- C-GET and C-MOVE --------------------------------------------------------------

    def _resolve(self, event: Any) -> list[query.Match]:
        with self._catalog.reader() as conn:  # type: ignore[attr-defined]
            return query.resolve(conn, self._model(event), _identifier(event))

    def get(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
        try:
            matches = self._resolve(event)
        except QueryError as e:
            log.warn("refused C-GET from {calling_aet} at {peer}: {reason} (status {status:#06x})",
                     reason=e.comment, status=e.status, **peer)
            yield 1
            yield _status(e.status, e.comment), None
            return
        log.info("C-GET of {count} instance(s) for {calling_aet} at {peer}", count=len(matches), **peer)
        yield len(matches)
        accepted = storage_syntaxes(event.assoc.accepted_contexts)
        yield from self._sub_operations(event, matches, lambda: accepted)

    def move(self, event: Any) -> Iterator[Any]:
        peer = _peer(event)
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
            yield destination.host, destination.port, self._association_args(destination, [], {})
            yield 1
            yield _status(e.status, e.comment), None
            return
        # The destination's answer to our proposal, captured when the association is made.
        negotiated: dict[str, Any] = {}
        contexts = move_contexts(matches)
        yield destination.host, destination.port, self._association_args(destination, contexts, negotiated)
        log.info("C-MOVE of {count} instance(s) to {destination} for {calling_aet} at {peer}",
                 count=len(matches), destination=destination.ae_title, **peer)
        yield len(matches)
        yield from self._sub_operations(event, matches, lambda: storage_syntaxes(negotiated.get("contexts", ())))

    def _association_args(
        self, destination: DicomDestination, contexts: list[PresentationContext], negotiated: dict[str, Any]
    ) -> dict[str, Any]:
        def established(event: Any) -> None:
            negotiated["contexts"] = list(event.assoc.accepted_contexts)

        args: dict[str, Any] = {
            "contexts": contexts or [build_context("1.2.840.10008.1.1")],  # Verification
            "evt_handlers": [(evt.EVT_ESTABLISHED, established)],
        }
        if destination.tls:
            args["tls_args"] = (self._tls_context(), destination.host)
        return args

    def _sub_operations(
        self, event: Any, matches: list[query.Match], accepted: Callable[[], Mapping[str, set[str]]]
    ) -> Iterator[tuple[int, Dataset | None]]:
        for match in matches:
            if event.is_cancelled:
                log.info("retrieve for {calling_aet} cancelled", **_peer(event))
                yield CANCEL, None
                return
            yield PENDING, self._prepare(match, accepted().get(match.sop_class_uid, set()))

    def _prepare(self, match: query.Match, accepted: set[str]) -> Dataset:
        """The data set to send for ``match``, or one pynetdicom will count as failed."""
        uid = match.sop_instance_uid
        frames = self._catalog.frames(uid) if match.state is State.STREAMABLE else []
        form = choose_form(match.transfer_syntax_uid, bool(frames), accepted)
        if form is None:
            log.warn("cannot send {sop_instance_uid}: no accepted transfer syntax fits (accepted: {accepted})",
                     sop_instance_uid=uid, accepted=", ".join(sorted(accepted)) or "none")
            return _unsendable(match)
        try:
            original = derived.read_part10(self._archive.path(match.path).read_bytes())
        except (OSError, ValueError, InvalidDicomError) as e:
            log.warn("cannot read {sop_instance_uid} from the archive: {reason}", sop_instance_uid=uid, reason=e)
            return _unsendable(match)
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
            log.warn("cannot send {sop_instance_uid} decoded: {reason}", sop_instance_uid=uid, reason=e)
            return _unsendable(match)
        return original if form == ORIGINAL else _unsendable(match)
