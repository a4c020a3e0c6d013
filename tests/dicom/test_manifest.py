"""The study manifest builder (KOS for XDS-I.b), checked with dicom3tools and dcmtk."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import attrs
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imageshare.dicom.manifest import (
    KOS_SOP_CLASS,
    InstanceRef,
    StudySummary,
    build_manifest,
    encode_manifest,
    series_uid_for,
    value_type,
)
from imageshare.dicom.uids import is_valid_uid
from tests.dicom.dciodvfy import dcmdump_ok, requires_dciodvfy, requires_dcmdump, validate
from tests.helpers import sample_file

LOCATION = "2.25.123456789"
URL = "http://imageshare.example/wado"
NOW = datetime(2024, 5, 6, 7, 8, 9)


def summary_of(ds: Dataset, **changes: str) -> StudySummary:
    values = dict(
        study_instance_uid=ds.StudyInstanceUID,
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        patient_birth_date=str(ds.get("PatientBirthDate", "")),
        patient_sex=str(ds.get("PatientSex", "")),
        study_date=str(ds.get("StudyDate", "")),
        study_time=str(ds.get("StudyTime", "")),
        accession_number=str(ds.get("AccessionNumber", "")),
        study_id=str(ds.get("StudyID", "")),
        study_description=str(ds.get("StudyDescription", "")),
        referring_physician_name=str(ds.get("ReferringPhysicianName", "")),
        specific_character_set="ISO_IR 100",
    )
    values.update(changes)
    return StudySummary(**values)


def study_of_real_instances() -> tuple[StudySummary, list[InstanceRef]]:
    """CT_small (three copies, one series) and MR_small (another series), one study."""
    ct = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    mr = dcmread(sample_file("MR_small.dcm"), stop_before_pixels=True)
    refs = [InstanceRef(ct.SOPClassUID, generate_uid(entropy_srcs=["ct", str(i)]), ct.SeriesInstanceUID)
            for i in range(3)]
    refs.append(InstanceRef(mr.SOPClassUID, mr.SOPInstanceUID, mr.SeriesInstanceUID))
    return summary_of(ct, accession_number="ACC-42", issuer_of_patient_id="HOSP"), refs


def build(study: StudySummary, refs: list[InstanceRef], **kw: object) -> Dataset:
    args: dict[str, object] = dict(
        retrieve_ae_title="IMAGESHARE",
        retrieve_location_uid=LOCATION,
        retrieve_url=URL,
        sop_instance_uid=generate_uid(prefix=None),
        series_instance_uid=series_uid_for(study.study_instance_uid),
        now=NOW,
        series_number=3,
    )
    args.update(kw)
    return build_manifest(study, refs, **args)  # type: ignore[arg-type]


def write_part10(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(path, ds, enforce_file_format=True)
    return path


@requires_dciodvfy
@requires_dcmdump
@pytest.mark.parametrize("accession", ["ACC-42", ""])
def test_manifest_is_a_valid_xds_i_manifest(tmp_path: Path, accession: str) -> None:
    """A manifest of real instances passes dciodvfy as a KOS and under the IHE XDS-I manifest
    profile with no error, with and without an accession number; dcmdump reads it."""
    study, refs = study_of_real_instances()
    ds = build(attrs.evolve(study, accession_number=accession), refs)
    path = write_part10(ds, tmp_path / "kos.dcm")
    errors, _ = validate(path)
    assert errors == []
    errors, _ = validate(path, profile="IHEXDSIManifest")
    assert errors == []
    assert dcmdump_ok(path)


@requires_dciodvfy
def test_profile_needs_retrieve_location(tmp_path: Path) -> None:
    """The profile check is real: without Retrieve AE Title and Location UID it reports errors."""
    study, refs = study_of_real_instances()
    ds = build(study, refs)
    for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        del series.RetrieveAETitle, series.RetrieveLocationUID
    errors, _ = validate(write_part10(ds, tmp_path / "kos.dcm"), profile="IHEXDSIManifest")
    assert any("RetrieveAETitle" in e for e in errors)
    assert any("RetrieveLocationUID" in e for e in errors)


def test_evidence_lists_every_series_and_instance() -> None:
    """Every series carries AE title, location UID and URL; every instance is listed once,
    under its series, and again as a CONTAINS content item."""
    study, refs = study_of_real_instances()
    ds = build(study, refs)
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study.study_instance_uid
    listed = []
    for series in evidence.ReferencedSeriesSequence:
        assert (series.RetrieveAETitle, series.RetrieveLocationUID, series.RetrieveURL) == ("IMAGESHARE", LOCATION, URL)
        listed += [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID, series.SeriesInstanceUID)
                   for r in series.ReferencedSOPSequence]
    assert len(evidence.ReferencedSeriesSequence) == 2
    assert sorted(listed) == sorted((r.sop_class_uid, r.sop_instance_uid, r.series_instance_uid) for r in refs)
    items = [(i.RelationshipType, i.ValueType, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
             for i in ds.ContentSequence]
    assert items == [("CONTAINS", "IMAGE", r.sop_instance_uid) for r in refs]


def test_document_attributes() -> None:
    """Title (113030, DCM, Manifest), TID 2010, KO series, and the patient and study copied."""
    study, refs = study_of_real_instances()
    uid = generate_uid(prefix=None)
    ds = build(study, refs, sop_instance_uid=uid)
    assert (ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.SeriesNumber) == (KOS_SOP_CLASS, uid, "KO", 3)
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113030", "DCM", "Manifest")
    assert (ds.ValueType, ds.ContinuityOfContent) == ("CONTAINER", "SEPARATE")
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    assert (ds.ContentDate, ds.ContentTime) == ("20240506", "070809")
    assert ds.SeriesInstanceUID == series_uid_for(study.study_instance_uid)
    assert ds.Manufacturer == "ImageShare"
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName"):
        field = {"PatientName": "patient_name", "PatientID": "patient_id", "IssuerOfPatientID": "issuer_of_patient_id",
                 "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
                 "StudyInstanceUID": "study_instance_uid", "StudyDate": "study_date", "StudyTime": "study_time",
                 "AccessionNumber": "accession_number", "StudyID": "study_id",
                 "ReferringPhysicianName": "referring_physician_name"}[keyword]
        assert str(ds[keyword].value) == getattr(study, field), keyword
    assert ds.ReferencedRequestSequence[0].AccessionNumber == "ACC-42"
    assert ds.ReferencedPerformedProcedureStepSequence == []


def test_encoding_round_trips_with_other_character_sets() -> None:
    """The encoded data set (Explicit VR Little Endian, no file meta) reads back with the
    names intact in the study's own character set."""
    study, refs = study_of_real_instances()
    for charset, name in (("ISO_IR 192", "山田^太郎"), ("ISO_IR 100", "Dürer^Albrecht"),
                          ("ISO 2022 IR 6\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎")):
        raw = encode_manifest(build(attrs.evolve(study, patient_name=name, specific_character_set=charset), refs))
        back = read_dataset(DicomBytesIO(raw), is_implicit_VR=False, is_little_endian=True)
        back.decode()
        assert str(back.PatientName) == name
        assert back.SOPClassUID == KOS_SOP_CLASS


def test_value_types() -> None:
    """Images are IMAGE, waveforms WAVEFORM, anything else (SR, KOS, RT plan, private) COMPOSITE."""
    assert value_type("1.2.840.10008.5.1.4.1.1.2") == "IMAGE"  # CT
    assert value_type("1.2.840.10008.5.1.4.1.1.2.1") == "IMAGE"  # Enhanced CT
    assert value_type("1.2.840.10008.5.1.4.1.1.66.4") == "IMAGE"  # Segmentation
    assert value_type("1.2.840.10008.5.1.4.1.1.9.1.1") == "WAVEFORM"  # 12-lead ECG
    assert value_type("1.2.840.10008.5.1.4.1.1.481.5") == "COMPOSITE"  # RT Plan
    assert value_type(KOS_SOP_CLASS) == "COMPOSITE"
    assert value_type("1.2.3.4.5") == "COMPOSITE"


def test_lists_neither_itself_nor_nothing() -> None:
    """An instance with the manifest's own UID is skipped; a manifest of nothing is refused."""
    study, refs = study_of_real_instances()
    own = InstanceRef(KOS_SOP_CLASS, generate_uid(prefix=None), "1.2.3")
    ds = build(study, refs + [own], sop_instance_uid=own.sop_instance_uid)
    assert len(ds.ContentSequence) == len(refs)
    with pytest.raises(ValueError):
        build(study, [own], sop_instance_uid=own.sop_instance_uid)


def test_series_uid_is_stable_per_study() -> None:
    """The manifest series UID depends on the study alone and is a valid 2.25 UID."""
    a, b = series_uid_for("1.2.3"), series_uid_for("1.2.4")
    assert a == series_uid_for("1.2.3") and a != b
    assert a.startswith("2.25.") and is_valid_uid(a)
