"""Pull the catalog attributes out of a received data set (pure)."""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword

from imageshare.store.records import InstanceRecord

# (record field, DICOM keyword, integer?) for every attribute the catalog keeps.
_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("sop_instance_uid", "SOPInstanceUID", False),
    ("sop_class_uid", "SOPClassUID", False),
    ("study_instance_uid", "StudyInstanceUID", False),
    ("series_instance_uid", "SeriesInstanceUID", False),
    ("patient_id", "PatientID", False),
    ("issuer_of_patient_id", "IssuerOfPatientID", False),
    ("patient_name", "PatientName", False),
    ("patient_birth_date", "PatientBirthDate", False),
    ("patient_sex", "PatientSex", False),
    ("study_date", "StudyDate", False),
    ("study_time", "StudyTime", False),
    ("accession_number", "AccessionNumber", False),
    ("study_id", "StudyID", False),
    ("study_description", "StudyDescription", False),
    ("referring_physician_name", "ReferringPhysicianName", False),
    ("modality", "Modality", False),
    ("series_number", "SeriesNumber", True),
    ("series_description", "SeriesDescription", False),
    ("body_part_examined", "BodyPartExamined", False),
    ("instance_number", "InstanceNumber", True),
    ("content_date", "ContentDate", False),
    ("content_time", "ContentTime", False),
    ("rows", "Rows", True),
    ("columns", "Columns", True),
    ("number_of_frames", "NumberOfFrames", True),
    ("bits_allocated", "BitsAllocated", True),
    ("bits_stored", "BitsStored", True),
    ("samples_per_pixel", "SamplesPerPixel", True),
    ("photometric_interpretation", "PhotometricInterpretation", False),
    ("specific_character_set", "SpecificCharacterSet", False),
)

_TAG_OF = {k: int(tag_for_keyword(k) or 0) for _, k, _ in _FIELDS}
_VR_OF = {k: dictionary_VR(_TAG_OF[k]) for _, k, _ in _FIELDS}
_SCS = _TAG_OF["SpecificCharacterSet"]

#: The top-level tags the catalog reads.
CATALOG_TAGS: frozenset[int] = frozenset(_TAG_OF.values())


_PN_DELIMITERS = {0x5E, 0x3D}  # ^ and =
_DELIMITERS = {0x5C}  # backslash


def _charset(raw: bytes | None) -> list[str] | None:
    """Python codecs for a Specific Character Set value; None for the default repertoire."""
    if not raw:
        return None
    terms = [t.strip() for t in raw.decode("ascii", "replace").split("\\")]
    if all(t in ("", "ISO_IR 6", "ISO 2022 IR 6") for t in terms):
        return None
    return convert_encodings(terms)


def _tidy_name(value: str) -> str:
    """Drop insignificant trailing separators of a PN value (PS3.5 6.2.1): ``A^B^^=`` is ``A^B``."""
    groups = [g.rstrip("^ ") for g in value.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def extract_raw(
    data: bytes | memoryview,
    found: dict[int, tuple[bytes | None, int, int]],
    *,
    implicit_vr: bool,
    little_endian: bool,
    transfer_syntax_uid: str,
) -> InstanceRecord:
    """
    Build the catalog record straight from the encoded values the structural check located.

    Decoding the handful of values the catalog needs directly costs a fraction of building
    pydicom elements for them; names in a non-default character set still go through
    pydicom's decoder.
    """
    e = "<" if little_endian else ">"
    charset = _charset(bytes(data[found[_SCS][2] : found[_SCS][2] + found[_SCS][1]]) if _SCS in found else None)
    values: dict[str, Any] = {}
    for name, keyword, numeric in _FIELDS:
        tag = _TAG_OF[keyword]
        if tag not in found:
            values[name] = None if numeric else ""
            continue
        vr_bytes, length, offset = found[tag]
        vr = vr_bytes.decode() if vr_bytes else _VR_OF[keyword]
        raw = bytes(data[offset : offset + length])
        if vr == "US":
            values[name] = struct.unpack_from(e + "H", raw)[0] if length >= 2 else None
            continue
        if charset is not None and vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC"):
            text = decode_bytes(raw, charset, _PN_DELIMITERS if vr == "PN" else _DELIMITERS)
        else:
            text = raw.decode("latin-1")
        text = text.strip(" \x00")
        if vr == "PN":
            text = "\\".join(_tidy_name(v) for v in text.split("\\"))
        if numeric:
            try:
                values[name] = int(text.split("\\")[0]) if text else None
            except ValueError:
                values[name] = None
        else:
            values[name] = text
    return InstanceRecord(transfer_syntax_uid=transfer_syntax_uid, **values)
