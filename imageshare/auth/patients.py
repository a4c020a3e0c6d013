"""
Per-patient authorization: a token that names a patient reaches only that patient's studies.

The token names the patient in the XDS affinity domain's CX form (``ID^^^&OID&ISO``, IUA's
``extensions.ihe_bppc.patient_id``); a study's patient is a DICOM Patient ID and Issuer,
mapped to that form exactly as the manifests map it (:meth:`AffinityDomain.patient_id`).
Anything that does not match answers as if it did not exist: the callers turn ``False``
into their own "not found".

:func:`same_patient` is pure; :class:`PatientAccess` queries the catalog and blocks: call
it on a worker pool only.
"""

from __future__ import annotations

from typing import Any, Callable

from imageshare.xds.affinity import AffinityDomain, AffinityDomainError

__all__ = ["PatientAccess", "same_patient"]


def same_patient(token_patient: str, domain: AffinityDomain, patient_id: str, issuer: str) -> bool:
    """Whether the DICOM ``patient_id``/``issuer`` is the domain patient ``token_patient``."""
    try:
        return domain.patient_id(patient_id, issuer) == token_patient
    except (AffinityDomainError, ValueError):
        return False  # no domain ID (empty, or an unmapped issuer with reject): never a match


class PatientAccess:
    """
    Parameters
    ----------
    catalog
        The SQLite catalog (``reader()``).
    domain
        The affinity domain (may read the catalog the first time: blocking).
    """

    def __init__(self, catalog: Any, domain: Callable[[], AffinityDomain]) -> None:
        self._catalog = catalog
        self._domain = domain

    def _patient_of(self, sql: str, uid: str) -> tuple[str, str] | None:
        with self._catalog.reader() as c:
            row = c.execute(sql, (uid,)).fetchone()
        return (row[0], row[1]) if row is not None else None

    def study_allowed(self, token_patient: str, study_instance_uid: str) -> bool:
        """Whether the study belongs to ``token_patient`` (``False`` for an unknown study)."""
        found = self._patient_of(
            "SELECT p.patient_id, p.issuer_of_patient_id FROM studies s JOIN patients p ON p.pk = s.patient_pk"
            " WHERE s.study_instance_uid=?", study_instance_uid)
        return found is not None and same_patient(token_patient, self._domain(), *found)

    def instance_allowed(self, token_patient: str, sop_instance_uid: str) -> bool:
        """
        Whether the instance belongs to ``token_patient``. An instance that does not exist is
        "allowed": the caller's own lookup then answers not found, exactly as for anyone.
        """
        found = self._patient_of(
            "SELECT p.patient_id, p.issuer_of_patient_id FROM instances i"
            " JOIN studies s ON s.study_instance_uid = i.study_instance_uid"
            " JOIN patients p ON p.pk = s.patient_pk WHERE i.sop_instance_uid=?", sop_instance_uid)
        return found is None or same_patient(token_patient, self._domain(), *found)

    def instance_in_study(self, study_instance_uid: str, sop_instance_uid: str) -> bool:
        """Whether the instance is in the study (a URL grant's one study); ``False`` if unknown."""
        with self._catalog.reader() as c:
            row = c.execute("SELECT study_instance_uid FROM instances WHERE sop_instance_uid=?",
                            (sop_instance_uid,)).fetchone()
        return row is not None and row[0] == study_instance_uid
