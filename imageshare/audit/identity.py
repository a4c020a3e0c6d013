"""
Who and what an image served over HTTP concerns, for its audit message: the catalog row of
the instance with its study's accession number and its patient.

Blocking (one indexed SQLite read): call :func:`served_record` on the worker that already
looked the instance up (the WADO and RAD-69 pools, the JPIP target loader), never on the
reactor. It never raises: without the catalog's answer the message still names the
instance and the study, without the patient.
"""

from __future__ import annotations

from typing import Any

import attrs

from imageshare.audit.messages import Patient
from imageshare.logsafe import Logger

__all__ = ["ServedRecord", "patient_of_study", "served_record"]

log = Logger(namespace="imageshare.audit")

_SQL = (
    "SELECT p.patient_id, p.issuer_of_patient_id, p.patient_name, s.accession_number"
    " FROM studies s JOIN patients p ON p.pk = s.patient_pk WHERE s.study_instance_uid=?"
)


@attrs.frozen
class ServedRecord:
    """What :func:`imageshare.audit.trail.study_of` reads of an instance served."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""


def _study_row(catalog: Any, study_instance_uid: str) -> Any:
    reader = getattr(catalog, "reader", None)
    if reader is None:
        return None
    try:
        with reader() as c:
            return c.execute(_SQL, (study_instance_uid,)).fetchone()
    except Exception as e:
        log.warn("the patient of a study could not be read for its audit message: {error}", error=type(e).__name__)
        return None


def patient_of_study(catalog: Any, study_instance_uid: str) -> Patient | None:
    """The patient of a study in ``catalog``, or ``None``. Blocking."""
    found = _study_row(catalog, study_instance_uid)
    if found is None or not found[0]:
        return None
    return Patient(str(found[0]), str(found[1] or ""), str(found[2] or ""))


def served_record(catalog: Any, row: Any) -> ServedRecord:
    """``row`` (an ``InstanceRow``) with its patient and accession number from ``catalog``. Blocking."""
    record = ServedRecord(str(row.sop_instance_uid), str(row.sop_class_uid), str(row.study_instance_uid))
    found = _study_row(catalog, record.study_instance_uid)
    if found is None:
        return record
    return attrs.evolve(record, patient_id=str(found[0] or ""), issuer_of_patient_id=str(found[1] or ""),
                        patient_name=str(found[2] or ""), accession_number=str(found[3] or ""))
