"""Pull the catalog attributes out of a parsed data set (pure)."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from imageshare.store.records import InstanceRecord


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not fail the whole store
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value: Any = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


def extract(ds: Dataset, *, transfer_syntax_uid: str) -> InstanceRecord:
    """
    Build the catalog record of ``ds``.

    Parameters
    ----------
    ds
        The received data set (without pixel data is fine).
    transfer_syntax_uid
        The syntax it was received (and is stored) in.
    """
    return InstanceRecord(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        instance_number=_int(ds, "InstanceNumber"),
        content_date=_text(ds, "ContentDate"),
        content_time=_text(ds, "ContentTime"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        photometric_interpretation=_text(ds, "PhotometricInterpretation"),
        specific_character_set=_text(ds, "SpecificCharacterSet"),
    )
