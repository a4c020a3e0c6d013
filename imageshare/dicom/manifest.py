"""
The study manifest: a DICOM Key Object Selection document listing a whole study (pure).

XDS-I.b publishes a study as one KOS (``1.2.840.10008.5.1.4.1.1.88.59``) titled
(113030, DCM, "Manifest"). Its Current Requested Procedure Evidence Sequence names every
series and instance together with where to retrieve them (Retrieve AE Title, Retrieve
Location UID, Retrieve URL per series): the IHE XDS-I manifest profile requires the first
two on every series (dciodvfy ``-profile IHEXDSIManifest``). One manifest per study, so
the Identical Documents Sequence is never needed (DICOM C.17.6.2.1).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Sequence

import attrs
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
MANUFACTURER = "ImageShare"
_SERIES_NAMESPACE = uuid.UUID("5f0c3a57-3b5e-4c1e-9d0e-6d2b1a7c9e41")  # ours, fixed for ever

# Image IODs whose SOP Class name does not say "Image Storage".
_OTHER_IMAGE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
})


@attrs.frozen
class StudySummary:
    """Patient and study attributes as the catalog holds them (decoded text)."""

    study_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    specific_character_set: str = ""


@attrs.frozen
class InstanceRef:
    """One instance a manifest lists."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@attrs.frozen
class ManifestSources:
    """
    What a study's manifest is built from, read from the catalog in one transaction.

    ``receives`` (the sum of the listed instances' generations) grows with every receive,
    new instance or re-send; with ``len(instances)`` it tells whether the manifest in force
    (``current_*``) is out of date. ``updated_at`` is the study's last receive time as the
    catalog recorded it.
    """

    study: StudySummary
    instances: tuple[InstanceRef, ...]
    receives: int
    updated_at: float
    series_number: int  # for the manifest's own series: after the study's others
    current_uid: str | None = None
    current_instances: int = 0
    current_receives: int = 0

    @property
    def changed(self) -> bool:
        """Whether the manifest in force (if any) no longer matches the study."""
        return self.current_uid is None or (self.current_instances, self.current_receives) != (
            len(self.instances),
            self.receives,
        )


def series_uid_for(study_instance_uid: str) -> str:
    """The manifest series of a study: the same for every rebuild, so a study holds one."""
    return f"2.25.{uuid.uuid5(_SERIES_NAMESPACE, study_instance_uid).int}"


def value_type(sop_class_uid: str) -> str:
    """The content item Value Type that references an instance of this class (TID 2010)."""
    if sop_class_uid in _OTHER_IMAGE_CLASSES:
        return "IMAGE"
    name = UID(sop_class_uid).name
    if "Image Storage" in name:
        return "IMAGE"
    if "Waveform Storage" in name:
        return "WAVEFORM"
    return "COMPOSITE"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _sop_ref(ref: InstanceRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def build_manifest(
    study: StudySummary,
    instances: Sequence[InstanceRef],
    *,
    retrieve_ae_title: str,
    retrieve_location_uid: str,
    retrieve_url: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    now: datetime,
    series_number: int = 1,
) -> Dataset:
    """
    The Key Object Selection document that lists ``instances`` of ``study``.

    Parameters
    ----------
    study
        Patient and study attributes, copied as they are.
    instances
        What to list, in order; an instance that is the manifest itself is skipped.
    retrieve_ae_title, retrieve_location_uid, retrieve_url
        Written on every referenced series: where a consumer retrieves the instances
        (DICOM, XDS-I.b RAD-69 repository unique ID, HTTP).
    sop_instance_uid, series_instance_uid
        The manifest's own identity: a new SOP Instance UID for every build.
    now
        Content and instance creation date and time.
    series_number
        Series Number of the manifest's own series.

    Raises
    ------
    ValueError
        When nothing is left to list.
    """
    listed = [i for i in instances if i.sop_instance_uid != sop_instance_uid]
    if not listed:
        raise ValueError("a manifest needs at least one instance")
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = Dataset()
    if study.specific_character_set:
        ds.SpecificCharacterSet = study.specific_character_set.split("\\")
    # SOP Common
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient (Type 2 values stay present when empty)
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    # General Study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    if study.study_description:
        ds.StudyDescription = study.study_description
    # Key Object Document Series
    ds.Modality = "KO"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    # Key Object Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    if study.accession_number:
        # Type 1C (the manifest answers no request), kept when known for consumers
        # that look studies up by accession number (xds-i.md section 4).
        request = Dataset()
        request.StudyInstanceUID = study.study_instance_uid
        request.ReferencedStudySequence = DicomSequence()
        request.AccessionNumber = study.accession_number
        request.PlacerOrderNumberImagingServiceRequest = ""
        request.FillerOrderNumberImagingServiceRequest = ""
        request.RequestedProcedureID = ""
        request.RequestedProcedureDescription = ""
        request.RequestedProcedureCodeSequence = DicomSequence()
        ds.ReferencedRequestSequence = DicomSequence([request])
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([_evidence(
        study.study_instance_uid, listed, retrieve_ae_title, retrieve_location_uid, retrieve_url
    )])
    # SR Document Content, TID 2010
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("113030", "DCM", "Manifest")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    items = []
    for ref in listed:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = value_type(ref.sop_class_uid)
        item.ReferencedSOPSequence = DicomSequence([_sop_ref(ref)])
        items.append(item)
    ds.ContentSequence = DicomSequence(items)
    return ds


def _evidence(
    study_uid: str, listed: Sequence[InstanceRef], ae_title: str, location_uid: str, url: str
) -> Dataset:
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in listed:
        by_series.setdefault(ref.series_instance_uid, []).append(ref)
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.RetrieveAETitle = ae_title
        item.RetrieveLocationUID = location_uid
        item.RetrieveURL = url
        item.ReferencedSOPSequence = DicomSequence([_sop_ref(r) for r in refs])
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = DicomSequence(series_items)
    return study


def encode_manifest(ds: Dataset) -> bytes:
    """The data set alone (no file meta), Explicit VR Little Endian: what a C-STORE carries."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()
