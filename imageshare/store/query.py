"""
Query/Retrieve over the catalog: C-FIND identifiers in, response identifiers out; and the
instances a C-GET or C-MOVE identifier names.

The information models (PS3.4 C.6.1 Patient Root, C.6.2 Study Root) are served with the
hierarchical rules: the level's unique keys above the Query/Retrieve Level are required
(single values, no wildcards); a C-FIND whose association negotiated relational queries
(PS3.4 C.4.1.2.2.2) needs none of them. Keys of the level and above are matched (the rules are in
:mod:`imageshare.dicom.matching`), keys of lower levels and keys the catalog does not hold
come back empty. Every response carries Query/Retrieve Level and Retrieve AE Title, and
Specific Character Set when its values need one.

A C-FIND with more than ``limit`` matches is refused as a whole with 0xA700 (Out of
resources) and a comment asking to narrow it, rather than answered in part: a truncated
list that ends in a failure is easy to take for the full answer.

Blocking: these functions run SQL on the caller's connection (``with catalog.reader() as
conn``), in pynetdicom's association threads, never on the reactor. They fetch every row
before they return, so the caller can hand the connection back before it sends responses.
"""

from __future__ import annotations

import re
import sqlite3
import struct
from typing import Any, Iterator

import attrs
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from imageshare.dicom.matching import MatchingError, condition, has_wildcards, response_charset
from imageshare.store.records import State

# Query/Retrieve failure statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).
OUT_OF_RESOURCES = 0xA700
TOO_MANY_TO_RETRIEVE = 0xA701  # Out of resources: unable to calculate number of matches
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

PATIENT_ROOT = "PATIENT"
STUDY_ROOT = "STUDY"
_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": PATIENT_ROOT,  # FIND
    "1.2.840.10008.5.1.4.1.2.1.2": PATIENT_ROOT,  # MOVE
    "1.2.840.10008.5.1.4.1.2.1.3": PATIENT_ROOT,  # GET
    "1.2.840.10008.5.1.4.1.2.2.1": STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.2": STUDY_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.3": STUDY_ROOT,
}

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}


def information_model(sop_class_uid: str) -> str | None:
    """:data:`PATIENT_ROOT` or :data:`STUDY_ROOT` for a Q/R FIND, GET or MOVE SOP class."""
    return _MODELS.get(str(sop_class_uid))


class QueryError(Exception):
    """The identifier cannot be served; ``status`` and ``comment`` go back to the peer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        # Error Comment is LO: 64 characters at most, no backslash, no control characters.
        self.comment = re.sub(r"[^\x20-\x5b\x5d-\x7e]", "?", comment)[:64]


@attrs.frozen
class Key:
    """A catalog attribute usable as a key: where it lives and how it matches."""

    level: str
    column: str  # SQL expression of the returned value
    vr: str
    matchable: bool = True
    # Matched through another table: (column to match, SQL with "{}" for the condition).
    through: tuple[str, str] | None = None


def _count(level: str, sql: str) -> Key:
    """A return-only key counting related rows (PS3.4 C.3: not used for matching)."""
    return Key(level, f"(SELECT COUNT(*) {sql})", "IS", matchable=False)


KEYS: dict[str, Key] = {
    "PatientName": Key("PATIENT", "p.patient_name", "PN"),
    "PatientID": Key("PATIENT", "p.patient_id", "LO"),
    "IssuerOfPatientID": Key("PATIENT", "p.issuer_of_patient_id", "LO"),
    "PatientBirthDate": Key("PATIENT", "p.patient_birth_date", "DA"),
    "PatientSex": Key("PATIENT", "p.patient_sex", "CS"),
    "NumberOfPatientRelatedStudies": _count("PATIENT", "FROM studies x WHERE x.patient_pk = p.pk"),
    "NumberOfPatientRelatedSeries": _count(
        "PATIENT", "FROM series x JOIN studies y ON y.study_instance_uid = x.study_instance_uid WHERE y.patient_pk = p.pk"),
    "NumberOfPatientRelatedInstances": _count(
        "PATIENT", "FROM instances x JOIN studies y ON y.study_instance_uid = x.study_instance_uid WHERE y.patient_pk = p.pk"),
    "StudyInstanceUID": Key("STUDY", "s.study_instance_uid", "UI"),
    "StudyDate": Key("STUDY", "s.study_date", "DA"),
    "StudyTime": Key("STUDY", "s.study_time", "TM"),
    "AccessionNumber": Key("STUDY", "s.accession_number", "SH"),
    "StudyID": Key("STUDY", "s.study_id", "SH"),
    "StudyDescription": Key("STUDY", "s.study_description", "LO"),
    "ReferringPhysicianName": Key("STUDY", "s.referring_physician_name", "PN"),
    "ModalitiesInStudy": Key(
        "STUDY",
        "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT x.modality AS m FROM series x"
        " WHERE x.study_instance_uid = s.study_instance_uid AND x.modality <> '' ORDER BY m))",
        "CS",
        through=("x.modality",
                 "EXISTS (SELECT 1 FROM series x WHERE x.study_instance_uid = s.study_instance_uid AND {})"),
    ),
    "NumberOfStudyRelatedSeries": _count("STUDY", "FROM series x WHERE x.study_instance_uid = s.study_instance_uid"),
    "NumberOfStudyRelatedInstances": _count("STUDY", "FROM instances x WHERE x.study_instance_uid = s.study_instance_uid"),
    "SeriesInstanceUID": Key("SERIES", "se.series_instance_uid", "UI"),
    "Modality": Key("SERIES", "se.modality", "CS"),
    "SeriesNumber": Key("SERIES", "se.series_number", "IS"),
    "SeriesDescription": Key("SERIES", "se.series_description", "LO"),
    "BodyPartExamined": Key("SERIES", "se.body_part_examined", "CS"),
    "NumberOfSeriesRelatedInstances": _count(
        "SERIES", "FROM instances x WHERE x.series_instance_uid = se.series_instance_uid"),
    "SOPInstanceUID": Key("IMAGE", "i.sop_instance_uid", "UI"),
    "SOPClassUID": Key("IMAGE", "i.sop_class_uid", "UI"),
    "InstanceNumber": Key("IMAGE", "i.instance_number", "IS"),
    "ContentDate": Key("IMAGE", "i.content_date", "DA"),
    "ContentTime": Key("IMAGE", "i.content_time", "TM"),
    "Rows": Key("IMAGE", "i.rows", "US"),
    "Columns": Key("IMAGE", "i.columns", "US"),
    "NumberOfFrames": Key("IMAGE", "i.number_of_frames", "IS"),
    "BitsAllocated": Key("IMAGE", "i.bits_allocated", "US"),
    "BitsStored": Key("IMAGE", "i.bits_stored", "US"),
    "SamplesPerPixel": Key("IMAGE", "i.samples_per_pixel", "US"),
    "PhotometricInterpretation": Key("IMAGE", "i.photometric_interpretation", "CS"),
}

_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON p.pk = s.patient_pk",
    "SERIES": "series se JOIN studies s ON s.study_instance_uid = se.study_instance_uid"
              " JOIN patients p ON p.pk = s.patient_pk",
    "IMAGE": "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid"
             " JOIN studies s ON s.study_instance_uid = i.study_instance_uid JOIN patients p ON p.pk = s.patient_pk",
}
_ORDER = {
    "PATIENT": "p.patient_id, p.pk",
    "STUDY": "s.study_date, s.study_time, s.study_instance_uid",
    "SERIES": "s.study_instance_uid, se.series_number, se.series_instance_uid",
    "IMAGE": "s.study_instance_uid, se.series_number, se.series_instance_uid, i.instance_number, i.sop_instance_uid",
}
# The character set the strings of a result were stored from: a patient takes the one of
# its most recently updated study, which also last updated the patient's attributes.
_CHARSET = {
    "PATIENT": "(SELECT x.specific_character_set FROM studies x WHERE x.patient_pk = p.pk"
               " ORDER BY x.updated_at DESC LIMIT 1)",
    "STUDY": "s.specific_character_set",
    "SERIES": "s.specific_character_set",
    "IMAGE": "s.specific_character_set",
}
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}
_SCS = Tag("SpecificCharacterSet")
_QR_LEVEL = Tag("QueryRetrieveLevel")


@attrs.frozen
class FindResult:
    """The responses to a C-FIND, made as they are sent, and the keys not supported."""

    responses: Iterator[Dataset]
    unsupported: tuple[str, ...]  # requested keys always returned empty (status 0xFF01)


@attrs.frozen
class Match:
    """An instance a C-GET or C-MOVE identifier selects."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # archive file, relative to the data directory
    state: State


@attrs.frozen
class _Requested:
    tag: BaseTag
    keyword: str
    vr: str


@attrs.frozen
class _Identifier:
    level: str
    values: dict[str, str]  # catalog keys asked for, as text
    requested: tuple[_Requested, ...]  # every element asked for, in order


def find(
    conn: sqlite3.Connection,
    model: str,
    identifier: Dataset,
    *,
    retrieve_ae_title: str,
    limit: int = 10_000,
    relational: bool = False,
) -> FindResult:
    """
    Run a C-FIND; ``relational`` when the association negotiated relational queries, so
    that the unique keys of the levels above the Query/Retrieve Level are not required.

    Raises
    ------
    QueryError
        The identifier breaks the information model's rules, a value cannot be matched,
        or there are more than ``limit`` matches.
    """
    ident = _read(identifier)
    rank = _check_level(model, ident)
    if not relational:
        _require_unique_keys(model, ident, rank)
    keys = {kw: KEYS[kw] for kw in ident.values if LEVELS.index(KEYS[kw].level) <= rank}
    where, params = _where({kw: ident.values[kw] for kw, k in keys.items() if k.matchable}, keys)
    names = list(keys)
    sql = (
        f"SELECT {', '.join([k.column for k in keys.values()] + [_CHARSET[ident.level]])}"
        f" FROM {_FROM[ident.level]}{where} ORDER BY {_ORDER[ident.level]} LIMIT ?"
    )
    rows = conn.execute(sql, (*params, limit + 1)).fetchall()
    if len(rows) > limit:
        raise QueryError(OUT_OF_RESOURCES, f"more than {limit} matches: narrow the query")
    unsupported = tuple(
        e.keyword or str(e.tag) for e in ident.requested
        if e.tag not in (_SCS, _QR_LEVEL) and e.keyword not in KEYS and e.keyword not in _ALWAYS
    )
    responses = (
        _response(ident, dict(zip(names, row[:-1])), row[-1] or "", retrieve_ae_title) for row in rows
    )
    return FindResult(responses, unsupported)


def resolve(conn: sqlite3.Connection, model: str, identifier: Dataset, *, limit: int = 65_535) -> list[Match]:
    """
    The instances a C-GET or C-MOVE identifier names, by its unique keys.

    Raises
    ------
    QueryError
        The identifier breaks the information model's rules (the unique key of the level
        and those above it are required) or names more than ``limit`` instances.
    """
    ident = _read(identifier)
    rank = _check_level(model, ident)
    _require_unique_keys(model, ident, rank + 1)
    top = 0 if model == PATIENT_ROOT else 1
    unique = {UNIQUE_KEYS[level]: ident.values[UNIQUE_KEYS[level]] for level in LEVELS[top : rank + 1]}
    where, params = _where(unique, KEYS)
    rows = conn.execute(
        "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, i.state"
        f" FROM {_FROM['IMAGE']}{where} ORDER BY {_ORDER['IMAGE']} LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    if len(rows) > limit:
        raise QueryError(TOO_MANY_TO_RETRIEVE, f"more than {limit} instances: retrieve less at once")
    return [Match(uid, cls, ts, path, State(state)) for uid, cls, ts, path, state in rows]


def _read(identifier: Dataset) -> _Identifier:
    """The level, the catalog keys as text, and every element asked for.

    Values are decoded here from the raw bytes rather than by pydicom: pydicom's value
    validation would log invalid values, and query values are patient names and IDs.
    """
    try:
        encodings = _encodings(identifier)
        requested = []
        values: dict[str, str] = {}
        for tag in identifier.keys():  # keys() leaves raw elements undecoded
            if tag.element == 0:  # group lengths
                continue
            elem = identifier.get_item(tag)
            vr = elem.VR or (dictionary_VR(tag) if dictionary_has_tag(tag) else "UN")
            keyword = keyword_for_tag(tag)
            requested.append(_Requested(tag, keyword, vr))
            if (keyword in KEYS or tag == _QR_LEVEL) and vr != "SQ":
                values[keyword] = _raw_text(elem, vr, encodings) if isinstance(elem, RawDataElement) else _text(elem.value)
    except Exception as e:  # pydicom raises many types for damaged data
        raise QueryError(UNABLE_TO_PROCESS, f"cannot read the identifier: {type(e).__name__}") from None
    level = values.pop("QueryRetrieveLevel", "").strip().upper()
    return _Identifier(level, values, tuple(requested))


def _encodings(identifier: Dataset) -> list[str] | None:
    if _SCS not in identifier:
        return None
    elem = identifier.get_item(_SCS)
    raw = elem.value if isinstance(elem, RawDataElement) else _text(elem.value)
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")
    terms = [t.strip(" \x00") for t in text.split("\\")]
    if all(t in ("", "ISO_IR 6", "ISO 2022 IR 6") for t in terms):
        return None
    return convert_encodings(terms)


_BINARY_INTEGERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}


def _raw_text(elem: RawDataElement, vr: str, encodings: list[str] | None) -> str:
    data = bytes(elem.value or b"")
    if vr in _BINARY_INTEGERS:
        code = _BINARY_INTEGERS[vr]
        count = len(data) // struct.calcsize(code)
        order = "<" if elem.is_little_endian else ">"
        return "\\".join(str(v) for v in struct.unpack(f"{order}{count}{code}", data[: count * struct.calcsize(code)]))
    if encodings is not None and vr in _TEXT_VRS:
        text = decode_bytes(data, encodings, {0x5E, 0x3D} if vr == "PN" else {0x5C})
    else:
        text = data.decode("latin-1")
    return text.strip(" \x00")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join("" if v is None else str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _check_level(model: str, ident: _Identifier) -> int:
    if not ident.level:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "no Query/Retrieve Level")
    if ident.level not in LEVELS:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"unknown Query/Retrieve Level {ident.level}")
    if model == STUDY_ROOT and ident.level == "PATIENT":
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Study Root has no PATIENT level")
    return LEVELS.index(ident.level)


def _require_unique_keys(model: str, ident: _Identifier, upto: int) -> None:
    """The unique keys of the levels above ``upto`` (a rank) must be given, without wildcards."""
    top = 0 if model == PATIENT_ROOT else 1
    for level in LEVELS[top:upto]:
        key = UNIQUE_KEYS[level]
        value = ident.values.get(key, "").strip(" \x00\\")
        if not value or has_wildcards(value):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{key} is required at level {ident.level}")


def _where(values: dict[str, str], keys: dict[str, Key]) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    for keyword, value in values.items():
        key = keys[keyword]
        column, template = key.through or (key.column, "{}")
        try:
            cond = condition(column, key.vr, value)
        except MatchingError as e:
            raise QueryError(UNABLE_TO_PROCESS, f"{keyword}: {e}") from None
        if cond is not None:
            clauses.append(template.format(cond.sql))
            params.extend(cond.params)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


# Returned whatever the level, when asked for (Retrieve AE Title: always).
_ALWAYS = {"RetrieveAETitle", "InstanceAvailability"}


def _response(ident: _Identifier, row: dict[str, Any], stored_charset: str, ae_title: str) -> Dataset:
    ds = Dataset()
    texts: list[str] = []
    for elem in ident.requested:
        if elem.tag in (_SCS, _QR_LEVEL):
            continue
        keyword = elem.keyword
        if keyword in row:
            key = KEYS[keyword]
            value = row[keyword]
            if value is None:
                value = None if key.vr == "US" else ""
            elif key.vr == "CS" and "\\" in value:
                value = value.split("\\")
            if key.vr in _TEXT_VRS and isinstance(value, str):
                texts.append(value)
            ds.add_new(elem.tag, key.vr, value)
        elif keyword == "InstanceAvailability":
            ds.InstanceAvailability = "ONLINE"
        elif keyword != "RetrieveAETitle":
            # Not held in the catalog, or below the query level: zero length (PS3.4 C.4.1.1.3.2).
            vr = "UN" if " or " in elem.vr else elem.vr  # e.g. "US or SS" from an implicit VR identifier
            ds.add_new(elem.tag, vr, [] if vr == "SQ" else None)
    ds.QueryRetrieveLevel = ident.level
    ds.RetrieveAETitle = ae_title
    charset = response_charset(stored_charset, texts)
    asked = any(e.tag == _SCS for e in ident.requested)
    if charset is not None and (asked or not all(t.isascii() for t in texts)):
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    elif asked:
        ds.SpecificCharacterSet = None
    return ds
