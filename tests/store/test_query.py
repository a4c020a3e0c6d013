"""C-FIND and retrieve resolution over a real SQLite catalog holding several patients and studies."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from imageshare.store import query
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.query import PATIENT_ROOT, STUDY_ROOT, QueryError
from imageshare.store.records import InstanceRecord, State

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"

# patient, study (date, accession), series (modality, number), instances
LAYOUT = [
    (("P1", "Doe^Jane", "19700101", "F", ""), "1.1", ("20200115", "A100"), [("1.1.1", "CT", 1), ("1.1.2", "MR", 2)]),
    (("P1", "Doe^Jane", "19700101", "F", ""), "1.2", ("20210610", "A200"), [("1.2.1", "CT", 1)]),
    (("P2", "Smith^John", "19800202", "M", ""), "2.1", ("20201231", "B100"), [("2.1.1", "CR", 1)]),
    (("P3", "Müller^Jörg", "19900303", "M", "ISO_IR 100"), "3.1", ("20190101", ""), [("3.1.1", "US", 3)]),
]


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[SqliteCatalog]:
    c = SqliteCatalog(tmp_path / "catalog.db")
    for (pid, name, birth, sex, charset), study, (date, accession), series in LAYOUT:
        for series_uid, modality, number in series:
            for n in (1, 2):
                uid = f"{series_uid}.{n}"
                c.record_instance(
                    InstanceRecord(
                        sop_instance_uid=uid,
                        sop_class_uid=MR if modality == "MR" else CT,
                        study_instance_uid=study,
                        series_instance_uid=series_uid,
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        patient_id=pid,
                        patient_name=name,
                        patient_birth_date=birth,
                        patient_sex=sex,
                        study_date=date,
                        study_time="101500",
                        accession_number=accession,
                        study_description="Chest" if study == "1.1" else "Other",
                        modality=modality,
                        series_number=number,
                        instance_number=n,
                        rows=512,
                        columns=256 + n,
                        number_of_frames=None,
                        specific_character_set=charset,
                    ),
                    path=f"objects/{uid}.dcm", size=10, incoming="x", calling_aet="TEST",
                )
    yield c
    c.close()


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some values are meant to be invalid
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


def find(catalog: SqliteCatalog, model: str, ds: Dataset, **kw: Any) -> list[Dataset]:
    with catalog.reader() as conn:
        result = query.find(conn, model, ds, retrieve_ae_title="IMAGESHARE", **kw)
    return list(result.responses)  # made from rows fetched inside the block


def test_patient_level_with_wildcard_name(catalog: SqliteCatalog) -> None:
    """Patient Root, PATIENT level: a case-insensitive name wildcard, related counts returned."""
    out = find(catalog, PATIENT_ROOT, identifier("PATIENT", PatientName="doe*", PatientID="",
                                                 NumberOfPatientRelatedStudies=None,
                                                 NumberOfPatientRelatedInstances=None, PatientBirthDate=""))
    assert len(out) == 1
    ds = out[0]
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == ("Doe^Jane", "P1", "19700101")
    assert (ds.NumberOfPatientRelatedStudies, ds.NumberOfPatientRelatedInstances) == (2, 6)
    assert ds.QueryRetrieveLevel == "PATIENT" and ds.RetrieveAETitle == "IMAGESHARE"


def test_study_root_study_level(catalog: SqliteCatalog) -> None:
    """Study Root, STUDY level: date range, modalities in study matched and returned, counts,
    and unknown keys and keys of lower levels come back empty."""
    out = find(catalog, STUDY_ROOT, identifier(
        "STUDY", StudyDate="20200101-20201231", StudyInstanceUID="", ModalitiesInStudy="",
        NumberOfStudyRelatedSeries=None, NumberOfStudyRelatedInstances=None, AccessionNumber="",
        PatientName="", OperatorsName="", SeriesInstanceUID="", InstanceAvailability=""))
    assert [d.StudyInstanceUID for d in out] == ["1.1", "2.1"]
    first = out[0]
    assert list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert (first.NumberOfStudyRelatedSeries, first.NumberOfStudyRelatedInstances) == (2, 4)
    assert first.AccessionNumber == "A100" and first.PatientName == "Doe^Jane"
    assert not first.OperatorsName and not first.SeriesInstanceUID  # zero length
    assert first.InstanceAvailability == "ONLINE"
    assert [d.StudyInstanceUID for d in find(catalog, STUDY_ROOT, identifier(
        "STUDY", ModalitiesInStudy="MR", StudyInstanceUID=""))] == ["1.1"]
    assert [d.StudyInstanceUID for d in find(catalog, STUDY_ROOT, identifier(
        "STUDY", ModalitiesInStudy="CT\\US", StudyInstanceUID=""))] == ["3.1", "1.1", "1.2"]


def test_unsupported_keys_are_reported(catalog: SqliteCatalog) -> None:
    """Keys the catalog does not hold are listed, so the SCP can answer Pending 0xFF01."""
    with catalog.reader() as conn:
        result = query.find(conn, STUDY_ROOT, identifier("STUDY", StudyInstanceUID="", OperatorsName=""),
                            retrieve_ae_title="X")
    assert result.unsupported == ("OperatorsName",)


def test_lower_levels_need_the_unique_keys_above(catalog: SqliteCatalog) -> None:
    """Hierarchical rules: each level above the query level needs its unique key, without wildcards."""
    with pytest.raises(QueryError) as e:
        find(catalog, PATIENT_ROOT, identifier("STUDY", StudyInstanceUID=""))
    assert e.value.status == 0xA900 and "PatientID" in e.value.comment
    with pytest.raises(QueryError):
        find(catalog, STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.*"))
    with pytest.raises(QueryError):
        find(catalog, STUDY_ROOT, identifier("IMAGE", StudyInstanceUID="1.1"))
    out = find(catalog, PATIENT_ROOT, identifier("STUDY", PatientID="P1", StudyInstanceUID=""))
    assert [d.StudyInstanceUID for d in out] == ["1.1", "1.2"]


def test_relational_queries_need_no_unique_keys_above(catalog: SqliteCatalog) -> None:
    """Relational queries (negotiated): any level, keys of the level and above matched, no
    unique key of a level above required; the model's levels still apply."""
    out = find(catalog, STUDY_ROOT, identifier("IMAGE", Modality="MR", SOPInstanceUID="", StudyInstanceUID=""),
               relational=True)
    assert [(d.StudyInstanceUID, d.SOPInstanceUID) for d in out] == [("1.1", "1.1.2.1"), ("1.1", "1.1.2.2")]
    out = find(catalog, PATIENT_ROOT, identifier("SERIES", PatientName="Doe*", StudyDate="20210101-", SeriesInstanceUID=""),
               relational=True)
    assert [d.SeriesInstanceUID for d in out] == ["1.2.1"]
    with pytest.raises(QueryError) as e:
        find(catalog, STUDY_ROOT, identifier("PATIENT", PatientID=""), relational=True)
    assert e.value.status == 0xA900
    with pytest.raises(QueryError) as e:  # the same query, not negotiated
        find(catalog, STUDY_ROOT, identifier("IMAGE", Modality="MR", SOPInstanceUID=""))
    assert e.value.status == 0xA900 and "StudyInstanceUID" in e.value.comment


def test_series_and_image_levels(catalog: SqliteCatalog) -> None:
    """SERIES and IMAGE levels: modality, series number, counts, UID lists, image attributes."""
    out = find(catalog, STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.1", SeriesInstanceUID="",
                                               Modality="MR", SeriesNumber=None, NumberOfSeriesRelatedInstances=None))
    assert [(d.SeriesInstanceUID, d.SeriesNumber, d.NumberOfSeriesRelatedInstances) for d in out] == [("1.1.2", 2, 2)]
    out = find(catalog, PATIENT_ROOT, identifier(
        "IMAGE", PatientID="P1", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1",
        SOPInstanceUID="1.1.1.2\\1.1.1.9", SOPClassUID="", Rows=None, Columns=None, NumberOfFrames=None,
        InstanceNumber=None))
    assert len(out) == 1
    ds = out[0]
    assert (ds.SOPInstanceUID, ds.SOPClassUID, ds.Rows, ds.Columns, ds.InstanceNumber) == ("1.1.1.2", CT, 512, 258, 2)
    assert ds.NumberOfFrames is None or ds.NumberOfFrames == ""


@pytest.mark.parametrize(
    ("model", "ds", "status"),
    [
        (STUDY_ROOT, identifier("PATIENT", PatientID=""), 0xA900),
        (STUDY_ROOT, identifier("WORLD", PatientID=""), 0xA900),
        (STUDY_ROOT, Dataset(), 0xA900),
        (STUDY_ROOT, identifier("STUDY", StudyDate="last week"), 0xC000),
    ],
    ids=["study-root-patient-level", "unknown-level", "no-level", "bad-date"],
)
def test_bad_identifiers(catalog: SqliteCatalog, model: str, ds: Dataset, status: int) -> None:
    """Identifiers that break the model or hold unusable values get the failure status."""
    with pytest.raises(QueryError) as e:
        find(catalog, model, ds)
    assert e.value.status == status and e.value.comment


def test_too_many_matches(catalog: SqliteCatalog) -> None:
    """More matches than the cap: refused as a whole with Out of resources."""
    with pytest.raises(QueryError) as e:
        find(catalog, STUDY_ROOT, identifier("STUDY", StudyInstanceUID=""), limit=3)
    assert e.value.status == 0xA700
    assert len(find(catalog, STUDY_ROOT, identifier("STUDY", StudyInstanceUID=""), limit=4)) == 4


def roundtrip(ds: Dataset) -> Dataset:
    """Encode as a peer receives it, and decode again with its character set."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    fp.seek(0)
    out = read_dataset(fp, is_implicit_VR=False, is_little_endian=True)
    out.decode()
    return out


def test_character_sets(catalog: SqliteCatalog) -> None:
    """Names come back in the study's character set; a set is declared when values need one."""
    (latin,) = find(catalog, STUDY_ROOT, identifier("STUDY", PatientName="M*", StudyInstanceUID=""))
    assert latin.SpecificCharacterSet == "ISO_IR 100"
    assert str(roundtrip(latin).PatientName) == "Müller^Jörg"
    (ascii_,) = find(catalog, STUDY_ROOT, identifier("STUDY", PatientName="Smith*", StudyInstanceUID=""))
    assert "SpecificCharacterSet" not in ascii_
    (asked,) = find(catalog, STUDY_ROOT, identifier("STUDY", PatientName="Smith*", StudyInstanceUID="",
                                                    SpecificCharacterSet=""))
    assert "SpecificCharacterSet" in asked and not asked.SpecificCharacterSet


def test_resolve_by_unique_keys(catalog: SqliteCatalog) -> None:
    """Retrieves select instances by the unique keys of the level and those above it."""
    with catalog.reader() as conn:
        study = query.resolve(conn, STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.1\\2.1"))
        assert [m.sop_instance_uid for m in study] == ["1.1.1.1", "1.1.1.2", "1.1.2.1", "1.1.2.2", "2.1.1.1", "2.1.1.2"]
        assert study[0].path == "objects/1.1.1.1.dcm" and study[0].state is State.PENDING
        patient = query.resolve(conn, PATIENT_ROOT, identifier("PATIENT", PatientID="P1"))
        assert len(patient) == 6
        image = query.resolve(conn, STUDY_ROOT, identifier("IMAGE", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.2",
                                                           SOPInstanceUID="1.1.2.2", PatientName="ignored*"))
        assert [(m.sop_instance_uid, m.sop_class_uid) for m in image] == [("1.1.2.2", MR)]
        for model, ds in [
            (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="")),  # universal at the retrieve level
            (PATIENT_ROOT, identifier("STUDY", StudyInstanceUID="1.1")),  # PatientID missing
            (STUDY_ROOT, identifier("SERIES", SeriesInstanceUID="1.1.1")),
        ]:
            with pytest.raises(QueryError) as e:
                query.resolve(conn, model, ds)
            assert e.value.status == 0xA900
        with pytest.raises(QueryError) as e:
            query.resolve(conn, STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.1"), limit=3)
        assert e.value.status == 0xA701


def wire(ds: Dataset, implicit: bool = False) -> Dataset:
    """The identifier as pynetdicom hands it over: encoded, then decoded lazily (raw elements)."""
    from io import BytesIO

    from pynetdicom.dsutils import decode, encode

    return decode(BytesIO(encode(ds, implicit, True)), implicit, True)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_identifiers_off_the_wire(catalog: SqliteCatalog, implicit: bool, recwarn: pytest.WarningsRecorder) -> None:
    """Raw identifiers: names in the query's character set, binary US keys, and invalid
    values refused without pydicom warning about (and so logging) the value."""
    key = identifier("STUDY", SpecificCharacterSet="ISO_IR 100", PatientName="Müller*", StudyInstanceUID="")
    (found,) = find(catalog, STUDY_ROOT, wire(key, implicit))
    assert str(found.PatientName) == "Müller^Jörg" and found.SpecificCharacterSet == "ISO_IR 100"
    rows = identifier("IMAGE", StudyInstanceUID="1.1", SeriesInstanceUID="1.1.1", SOPInstanceUID="", Rows=512,
                      Columns=257)
    assert [d.SOPInstanceUID for d in find(catalog, STUDY_ROOT, wire(rows, implicit))] == ["1.1.1.1"]
    bad = wire(identifier("STUDY", PatientID="secret-id", StudyDate="not a date"), implicit)
    recwarn.clear()
    with pytest.raises(QueryError) as e:
        find(catalog, STUDY_ROOT, bad)
    assert e.value.status == 0xC000
    assert not [w for w in recwarn if "secret" in str(w.message) or "not a date" in str(w.message)]
