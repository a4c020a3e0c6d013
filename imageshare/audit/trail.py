"""
The audit trail as the rest of the server sees it: one method per event, each a one-line
hook at the place the event happens.

:class:`AuditTrail` is pure: it builds the message (:mod:`imageshare.audit.messages`) with
the server's identity and the time from its clock, and hands it to :meth:`record`, which a
subclass implements (:class:`imageshare.audit.service.Audit` writes and forwards;
:class:`MemoryAuditTrail` keeps them, for tests). Every method may be called from any
thread (pynetdicom's association threads included) and never raises: an audit failure is
logged, the served request goes on.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any, Callable, Iterable, Sequence, TypeVar

from imageshare.audit import messages as m
from imageshare.audit.messages import AuditMessage, Node, Patient, Principal, Study
from imageshare.logsafe import Logger

__all__ = ["AuditTrail", "MemoryAuditTrail", "NO_AUDIT", "Node", "Patient", "Principal", "Study", "as_principal",
           "study_of"]

log = Logger(namespace="imageshare.audit")

F = TypeVar("F", bound=Callable[..., Any])


def _never_raises(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: "AuditTrail", *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            log.failure("audit event {event} could not be recorded", event=method.__name__)

    return wrapper  # type: ignore[return-value]


def study_of(record: Any, count: int = 1) -> Study:
    """A :class:`Study` (with its patient) from a catalog ``InstanceRecord`` or ``Match``-like object."""
    patient_id = getattr(record, "patient_id", "")
    patient = Patient(patient_id, getattr(record, "issuer_of_patient_id", ""),
                      getattr(record, "patient_name", "")) if patient_id else None
    sop_class = getattr(record, "sop_class_uid", "")
    instance = getattr(record, "sop_instance_uid", "")
    return Study(getattr(record, "study_instance_uid", ""), ((sop_class, count),) if sop_class else (),
                 accession=getattr(record, "accession_number", ""), patient=patient,
                 instances=((sop_class, instance),) if sop_class and instance and count == 1 else ())


def as_principal(principal: Any) -> Principal | None:
    """
    The audit :class:`Principal` of a token's principal (``imageshare.auth.tokens.Principal``:
    ``subject``, ``issuer``, ``jti``), or ``None``; an audit ``Principal`` is kept as it is.
    """
    if principal is None or isinstance(principal, Principal):
        return principal
    return Principal(str(principal.subject), str(principal.issuer), str(getattr(principal, "jti", None) or ""))


def merge_studies(studies: Iterable[Study]) -> list[Study]:
    """One :class:`Study` per UID, the SOP class counts added up."""
    merged: dict[str, Study] = {}
    for s in studies:
        old = merged.get(s.uid)
        if old is None:
            merged[s.uid] = s
            continue
        counts = dict(old.sop_classes)
        for uid, n in s.sop_classes:
            counts[uid] = counts.get(uid, 0) + n
        instances = old.instances + tuple(i for i in s.instances if i not in old.instances)
        merged[s.uid] = Study(s.uid, tuple(counts.items()), old.accession or s.accession, old.patient or s.patient,
                              instances)
    return list(merged.values())


class AuditTrail:
    """
    Builds and records the audit events of this server.

    Parameters
    ----------
    source_id
        AuditSourceID (``[audit] source_id``, the AE title by default).
    app
        This application as a participant (its AE title and host).
    now
        Seconds since the epoch (the reactor's ``seconds``; any thread may call it).
    site_id
        AuditEnterpriseSiteID, or empty.
    """

    def __init__(self, source_id: str, app: Node, now: Callable[[], float], site_id: str = "") -> None:
        self.source_id = source_id
        self.app = app
        self._now = now
        self._site_id = site_id

    def record(self, message: AuditMessage) -> None:
        """Keep a message (see the subclasses)."""
        raise NotImplementedError

    def _common(self) -> dict[str, Any]:
        when = datetime.datetime.fromtimestamp(self._now(), datetime.timezone.utc)
        return {"when": when, "source_id": self.source_id, "site_id": self._site_id}

    # -- events ------------------------------------------------------------------------------

    @_never_raises
    def application_started(self) -> None:
        self.record(m.application_activity(self.app, started=True, **self._common()))

    @_never_raises
    def application_stopped(self) -> None:
        self.record(m.application_activity(self.app, started=False, **self._common()))

    @_never_raises
    def instance_stored(self, calling_aet: str, address: str, record: Any, *, replaced: bool) -> None:
        """C-STORE received (110104 C, or U when an older version was replaced)."""
        self.record(m.instances_stored(Node(calling_aet, address), self.app, study_of(record), replaced=replaced,
                                       **self._common()))

    @_never_raises
    def identity_changed(self, change: Any) -> None:
        """A store changed patient identity (``imageshare.store.ingest.IdentityChange``):
        110110 Patient Record, U, naming the instance's patient now and what changed."""
        self.record(m.patient_record_changed(Node(change.calling_aet, ""), self.app, study_of(change.record),
                                             changes=", ".join(change.changes), **self._common()))

    @_never_raises
    def query(self, calling_aet: str, address: str, sop_class_uid: str, identifier: bytes, *,
              transfer_syntax: str = "", outcome: int = m.SUCCESS) -> None:
        """C-FIND served (110112), the identifier as received."""
        self.record(m.query(Node(calling_aet, address), self.app, sop_class_uid=sop_class_uid,
                            query_bytes=identifier, transfer_syntax=transfer_syntax, outcome=outcome,
                            transaction=m.DICOM_TRANSACTIONS["C-FIND"], **self._common()))

    @_never_raises
    def transfer_started(self, calling_aet: str, address: str, destination_aet: str, destination_host: str,
                         records: Sequence[Any]) -> None:
        """C-MOVE/C-GET accepted (110102); for a C-GET the destination is the requestor."""
        self.record(m.begin_transferring(Node(calling_aet, address), self.app,
                                         Node(destination_aet, destination_host),
                                         merge_studies(study_of(r) for r in records), **self._common()))

    @_never_raises
    def instances_sent(self, calling_aet: str, address: str, destination_aet: str, destination_host: str,
                       records: Sequence[Any], *, outcome: int = m.SUCCESS, description: str = "") -> None:
        """C-MOVE/C-GET sub-operations done (110104 R), the instances actually sent."""
        self.record(m.instances_transferred(Node(calling_aet, address), self.app,
                                            Node(destination_aet, destination_host),
                                            merge_studies(study_of(r) for r in records), outcome=outcome,
                                            description=description, **self._common()))

    @_never_raises
    def instances_served(self, service: str, address: str, records: Sequence[Any],
                         principal: Any = None, *, user: str = "") -> None:
        """
        WADO, RAD-69 or JPIP served (110104 R); ``service`` is ``WADO``, ``RAD-69`` or ``JPIP``.

        ``records`` are catalog rows (study, SOP class and instance UIDs) with the patient's
        ``patient_id``, ``issuer_of_patient_id`` and ``patient_name`` when the caller looked
        them up; ``principal`` is the request's token principal (see :func:`as_principal`).
        """
        transaction = m.RAD_69 if service == "RAD-69" else m.DICOM_TRANSACTIONS[service]
        client = Node(user or address or "anonymous", address, as_principal(principal))
        self.record(m.instances_served(client, self.app, merge_studies(study_of(r) for r in records),
                                       transaction=transaction, **self._common()))

    @_never_raises
    def submission_sent(self, repository_url: str, patient: Patient | None, submission_set: str, *,
                        rad68: bool = False, outcome: int = m.SUCCESS, description: str = "") -> None:
        """ITI-41 (or RAD-68) submission made (110106)."""
        self.record(m.export(self.app, self.app, Node(repository_url), transaction=m.RAD_68 if rad68 else m.ITI_41,
                             patient=patient, submission_set=submission_set, outcome=outcome,
                             description=description, **self._common()))

    @_never_raises
    def documents_served(self, address: str, documents: Sequence[tuple[str, str]],
                         principal: Any = None, *, outcome: int = m.SUCCESS) -> None:
        """ITI-43 served (110106): (document uniqueId, repository uniqueId) pairs."""
        client = Node(address or "anonymous", address, as_principal(principal))
        self.record(m.export(client, self.app, client, transaction=m.ITI_43, documents=documents, outcome=outcome,
                             **self._common()))

    @_never_raises
    def authentication_failed(self, address: str, reason: str, *, user: str = "unknown") -> None:
        """
        A request without a valid token (401): 110114 Login, outcome 4. ``reason`` says why
        (``missing``, ``expired``...), never with the token; ``user`` is the token's
        subject if one could be read.
        """
        self.record(m.user_authentication_failed(Node(user, address), self.app, reason=reason, **self._common()))

    @_never_raises
    def http_refused(self, address: str, path: str, status: int, reason: str, principal: Any = None) -> None:
        """A request refused by access control: 401 as a failed login (110114), 403 as a
        refused authorization (110113) of the token's principal."""
        if status == 401:
            self.authentication_failed(address, reason)
        else:
            self.authorization_refused(address, path, reason, as_principal(principal))

    @_never_raises
    def authorization_refused(self, address: str, what: str, reason: str, principal: Principal | None = None,
                              *, user: str = "") -> None:
        """A refused request (403) or association: 110113, 110132; ``what`` is the URL path or ``AE@address``."""
        offender = Node(user or address or "unknown", address, principal)
        self.record(m.security_alert(self.app, offender, node_authentication=False, reason=reason, subject=what,
                                     **self._common()))

    @_never_raises
    def dicom_refused(self, refusal: Any) -> None:
        """
        An association or operation refused by the ``[dicom]`` access rules (an
        ``AccessRefusal``, see protocols/dicom/access.py): 110113 with 110132, or 110126
        when a client certificate failed its AE title's pin.
        """
        operation = getattr(refusal, "operation", None)
        what = f"{refusal.calling_aet}@{refusal.address}" + (f" {operation}" if operation else "")
        if "certificate" in refusal.reason:
            self.node_authentication_failed(refusal.address, what, refusal.reason)
        else:
            self.authorization_refused(refusal.address, what, refusal.reason, user=refusal.calling_aet)

    @_never_raises
    def node_authentication_failed(self, address: str, what: str, reason: str) -> None:
        """A TLS peer that failed node authentication: 110113, 110126."""
        self.record(m.security_alert(self.app, Node(address or "unknown", address), node_authentication=True,
                                     reason=reason, subject=what, **self._common()))


class MemoryAuditTrail(AuditTrail):
    """Keeps the messages in :attr:`messages` (tests), or drops them (``keep=False``)."""

    def __init__(self, source_id: str = "IMAGESHARE", app: Node | None = None,
                 now: Callable[[], float] = lambda: 0.0, *, keep: bool = True) -> None:
        super().__init__(source_id, app or Node(source_id), now)
        self.messages: list[AuditMessage] = []
        self._keep = keep

    def record(self, message: AuditMessage) -> None:
        if self._keep:
            self.messages.append(message)


#: The trail of parts built without one: records nothing.
NO_AUDIT: AuditTrail = MemoryAuditTrail(keep=False)
